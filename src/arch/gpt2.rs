//! GPT-2 (llama.cpp `src/models/gpt2.cpp`): the family table, and hyperparameters from an HF
//! `config.json`.

use super::family::{spec, Dim::*, Family, FfnKind, Need::*, NormKind, Positions, QkvLayout};
use super::{Arch, HParams};
use crate::Result;
use serde::Deserialize;

/// Learned positions, LayerNorm, fused q|k|v, a biased GELU MLP, tied unembedding.
pub const FAMILY: Family = Family {
    norm: NormKind::Layer,
    eps_key: "attention.layer_norm_epsilon",
    positions: Positions::Learned,
    qkv: QkvLayout::Fused,
    ffn: FfnKind::Gelu,
    qk_norm: false,
    sandwich_norms: false,
    embed_scale: false,
    sliding_window: false,
    logit_softcap: false,
    globals: &[
        spec("token_embd.weight", &[Vocab, Embd], Required),
        spec("position_embd.weight", &[Ctx, Embd], Required),
        spec("output_norm.weight", &[Embd], Required),
        spec("output_norm.bias", &[Embd], Required),
        spec("output.weight", &[Vocab, Embd], Untied),
    ],
    block: &[
        spec("attn_norm.weight", &[Embd], Required),
        spec("attn_norm.bias", &[Embd], Required),
        spec("attn_qkv.weight", &[Qkv, Embd], Required),
        spec("attn_qkv.bias", &[Qkv], Required),
        spec("attn_output.weight", &[Embd, Q], Required),
        spec("attn_output.bias", &[Embd], Required),
        spec("ffn_norm.weight", &[Embd], Required),
        spec("ffn_norm.bias", &[Embd], Required),
        spec("ffn_up.weight", &[Ff, Embd], Required),
        spec("ffn_up.bias", &[Ff], Required),
        spec("ffn_down.weight", &[Embd, Ff], Required),
        spec("ffn_down.bias", &[Embd], Required),
    ],
};

/// The fields of HF `GPT2Config` that backlens uses.
#[derive(Debug, Deserialize)]
pub struct Gpt2Config {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    #[serde(default)]
    n_inner: Option<usize>,
    vocab_size: usize,
    n_positions: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl Gpt2Config {
    /// Resolves the config into hyperparameters (GPT-2 always ties its embeddings).
    pub fn into_hparams(self) -> Result<HParams> {
        HParams {
            arch: Arch::Gpt2,
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_ff: self.n_inner.unwrap_or(4 * self.n_embd),
            n_head: self.n_head,
            n_head_kv: self.n_head,
            n_vocab: self.vocab_size,
            n_ctx: self.n_positions,
            norm_eps: self.layer_norm_epsilon,
            tied_embeddings: true,
            ..HParams::plain(Arch::Gpt2, self.n_embd, self.n_head)
        }
        .validate()
    }
}
