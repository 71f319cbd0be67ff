//! Llama (llama.cpp `src/models/llama.cpp`; also Mistral and SmolLM files): the family table,
//! and hyperparameters from an HF `config.json`.

use super::family::{
    spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout, RopeStyle, Spec,
};
use super::{Arch, HParams};
use crate::Result;
use serde::Deserialize;

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

/// The fields of HF `LlamaConfig` that backlens uses.
#[derive(Debug, Deserialize)]
pub struct LlamaConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope")]
    rope_theta: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_ctx() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope() -> f64 {
    10_000.0
}

impl LlamaConfig {
    /// Resolves the config into hyperparameters.
    pub fn into_hparams(self) -> Result<HParams> {
        HParams {
            arch: Arch::Llama,
            n_layer: self.num_hidden_layers,
            n_embd: self.hidden_size,
            n_ff: self.intermediate_size,
            n_head: self.num_attention_heads,
            n_head_kv: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            n_vocab: self.vocab_size,
            n_ctx: self.max_position_embeddings,
            norm_eps: self.rms_norm_eps,
            rope_base: self.rope_theta,
            tied_embeddings: self.tie_word_embeddings,
            ..HParams::plain(Arch::Llama, self.hidden_size, self.num_attention_heads)
        }
        .validate()
    }
}
