//! Gemma 3 (llama.cpp `src/models/gemma3.cpp`): √d embedding scale, sandwich norms, per-head q/k
//! norms, GeGLU, sliding-window layers with their own RoPE base beside global layers, optional
//! final logit softcapping.

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle,
};
use super::llama::QKV_BIASES;

/// RMSNorm (GGUF stores the weight itself, HF stores weight − 1), RoPE on halves, q/k norms,
/// post-attention and post-FFN norms, GeGLU (tanh GELU).
pub const FAMILY: Family = Family {
    norm: NormKind::Rms,
    eps_key: "attention.layer_norm_rms_epsilon",
    positions: Positions::Rope(RopeStyle::Halves),
    qkv: QkvLayout::Split,
    ffn: FfnKind::GeGlu,
    qk_norm: true,
    sandwich_norms: true,
    embed_scale: true,
    sliding_window: true,
    logit_softcap: true,
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
        spec("post_attention_norm.weight", &[Embd], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_gate.weight", &[Ff, Embd], Required),
        spec("ffn_up.weight", &[Ff, Embd], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
        spec("post_ffw_norm.weight", &[Embd], Required),
    ],
};
