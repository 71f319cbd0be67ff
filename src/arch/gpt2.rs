//! GPT-2: tensor names and shapes, and hyperparameters from an HF `config.json`.

use super::{block_tensor, Arch, HParams};
use crate::Result;
use serde::Deserialize;

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
            rope_base: 0.0,
            tied_embeddings: true,
        }
        .validate()
    }
}

/// Required tensors with row-major shapes (GGUF layout: linear weights are [out, in]).
pub fn required_tensors(hp: &HParams) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (hp.n_embd, hp.n_ff, hp.n_vocab);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, d]),
        ("position_embd.weight".to_string(), vec![hp.n_ctx, d]),
        ("output_norm.weight".to_string(), vec![d]),
        ("output_norm.bias".to_string(), vec![d]),
    ];
    for l in 0..hp.n_layer {
        for (role, shape) in [
            ("attn_norm.weight", vec![d]),
            ("attn_norm.bias", vec![d]),
            ("attn_qkv.weight", vec![3 * d, d]),
            ("attn_qkv.bias", vec![3 * d]),
            ("attn_output.weight", vec![d, d]),
            ("attn_output.bias", vec![d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_norm.bias", vec![d]),
            ("ffn_up.weight", vec![f, d]),
            ("ffn_up.bias", vec![f]),
            ("ffn_down.weight", vec![d, f]),
            ("ffn_down.bias", vec![d]),
        ] {
            out.push((block_tensor(l, role), shape));
        }
    }
    out
}
