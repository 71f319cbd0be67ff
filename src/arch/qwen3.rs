//! Qwen3 (llama.cpp `src/models/qwen3.cpp`): the Llama block with per-head q/k RMSNorm, RoPE on
//! halves, and a head width of its own (`attention.key_length`).

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle,
};
use super::llama::QKV_BIASES;

/// RMSNorm, RoPE on halves, split q/k/v (biases optional), q/k norms, SwiGLU.
pub const FAMILY: Family = Family {
    norm: NormKind::Rms,
    eps_key: "attention.layer_norm_rms_epsilon",
    positions: Positions::Rope(RopeStyle::Halves),
    qkv: QkvLayout::Split,
    ffn: FfnKind::SwiGlu,
    qk_norm: true,
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
        QKV_BIASES[0],
        QKV_BIASES[1],
        QKV_BIASES[2],
        spec("attn_q_norm.weight", &[Head], Required),
        spec("attn_k_norm.weight", &[Head], Required),
        spec("attn_output.weight", &[Embd, Q], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_gate.weight", &[Ff, Embd], Required),
        spec("ffn_up.weight", &[Ff, Embd], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
    ],
};
