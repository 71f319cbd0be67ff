//! Llama: tensor names and shapes, and hyperparameters from an HF `config.json`.

use super::{block_tensor, Arch, HParams};
use crate::Result;
use serde::Deserialize;

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
        }
        .validate()
    }
}

/// Required tensors with row-major shapes (GGUF layout: linear weights are [out, in]).
pub fn required_tensors(hp: &HParams) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (hp.n_embd, hp.n_ff, hp.n_vocab);
    let kv = hp.n_head_kv * hp.head_dim();
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, d]),
        ("output_norm.weight".to_string(), vec![d]),
    ];
    if !hp.tied_embeddings {
        out.push(("output.weight".to_string(), vec![v, d]));
    }
    for l in 0..hp.n_layer {
        for (role, shape) in [
            ("attn_norm.weight", vec![d]),
            ("attn_q.weight", vec![d, d]),
            ("attn_k.weight", vec![kv, d]),
            ("attn_v.weight", vec![kv, d]),
            ("attn_output.weight", vec![d, d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_gate.weight", vec![f, d]),
            ("ffn_up.weight", vec![f, d]),
            ("ffn_down.weight", vec![d, f]),
        ] {
            out.push((block_tensor(l, role), shape));
        }
    }
    out
}
