//! Qwen2 / Qwen2.5 (llama.cpp `src/models/qwen2.cpp`): the Llama block with q/k/v biases and
//! RoPE on halves.

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle,
};

/// RMSNorm, RoPE on halves, split q/k/v with biases, SwiGLU.
pub const FAMILY: Family = Family {
    norm: NormKind::Rms,
    eps_key: "attention.layer_norm_rms_epsilon",
    positions: Positions::Rope(RopeStyle::Halves),
    qkv: QkvLayout::Split,
    ffn: FfnKind::SwiGlu,
    qk_norm: false,
    sandwich_norms: false,
    embed_scale: false,
    sliding_window: false,
    logit_softcap: false,
    globals: &[
        spec("token_embd.weight", &[Vocab, Embd], Required),
        spec("output_norm.weight", &[Embd], Required),
        spec("output.weight", &[Vocab, Embd], Untied),
    ],
    block: &[
        spec("attn_norm.weight", &[Embd], Required),
        spec("attn_q.weight", &[Q, Embd], Required),
        spec("attn_k.weight", &[Kv, Embd], Required),
        spec("attn_v.weight", &[Kv, Embd], Required),
        spec("attn_q.bias", &[Q], Required),
        spec("attn_k.bias", &[Kv], Required),
        spec("attn_v.bias", &[Kv], Required),
        spec("attn_output.weight", &[Embd, Q], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_gate.weight", &[Ff, Embd], Required),
        spec("ffn_up.weight", &[Ff, Embd], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
    ],
};
