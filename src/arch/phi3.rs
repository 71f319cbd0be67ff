//! Phi-3 (llama.cpp `src/models/phi3.cpp`): fused q|k|v in `attn_qkv`, gate and up stacked in
//! `ffn_up`; FF2 is `ffn_down` as everywhere.

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle,
};

/// RMSNorm, RoPE on halves, fused q|k|v, SwiGLU with gate|up in one matrix.
pub const FAMILY: Family = Family {
    norm: NormKind::Rms,
    eps_key: "attention.layer_norm_rms_epsilon",
    positions: Positions::Rope(RopeStyle::Halves),
    qkv: QkvLayout::Fused,
    ffn: FfnKind::SwiGluFused,
    qk_norm: false,
    sandwich_norms: false,
    embed_scale: false,
    sliding_window: false,
    logit_softcap: false,
    globals: &[
        spec("token_embd.weight", &[Vocab, Embd], Required),
        spec("output_norm.weight", &[Embd], Required),
        spec("output.weight", &[Vocab, Embd], Untied),
        spec("rope_factors_long.weight", &[HalfHead], Optional),
        spec("rope_factors_short.weight", &[HalfHead], Optional),
    ],
    block: &[
        spec("attn_norm.weight", &[Embd], Required),
        spec("attn_qkv.weight", &[Qkv, Embd], Required),
        spec("attn_qkv.bias", &[Qkv], Optional),
        spec("attn_output.weight", &[Embd, Q], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_up.weight", &[Ff2, Embd], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
    ],
};
