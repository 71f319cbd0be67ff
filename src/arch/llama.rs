//! Llama (llama.cpp `src/models/llama.cpp`; also Mistral and SmolLM files): the family table.

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle, Spec,
};

/// RoPE on adjacent pairs (optionally with Llama 3's `rope_freqs` factors), RMSNorm,
/// grouped-query attention, SwiGLU; every bias optional.
pub const FAMILY: Family = Family {
    norm: NormKind::Rms,
    eps_key: "attention.layer_norm_rms_epsilon",
    positions: Positions::Rope(RopeStyle::Pairs),
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
        spec("rope_freqs.weight", &[HalfHead], Optional),
    ],
    block: &[
        spec("attn_norm.weight", &[Embd], Required),
        spec("attn_q.weight", &[Q, Embd], Required),
        spec("attn_k.weight", &[Kv, Embd], Required),
        spec("attn_v.weight", &[Kv, Embd], Required),
        spec("attn_output.weight", &[Embd, Q], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_gate.weight", &[Ff, Embd], Required),
        spec("ffn_up.weight", &[Ff, Embd], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
        QKV_BIASES[0],
        QKV_BIASES[1],
        QKV_BIASES[2],
        spec("attn_output.bias", &[Embd], Optional),
        spec("ffn_gate.bias", &[Ff], Optional),
        spec("ffn_up.bias", &[Ff], Optional),
        spec("ffn_down.bias", &[Embd], Optional),
    ],
};

/// The q/k/v biases llama.cpp's `create_tensor_qkv` accepts in every family that uses it.
pub const QKV_BIASES: [Spec; 3] = [
    spec("attn_q.bias", &[Q], Optional),
    spec("attn_k.bias", &[Kv], Optional),
    spec("attn_v.bias", &[Kv], Optional),
];
