//! The one place that maps HF checkpoint tensors onto GGUF names and layouts, both ways, and
//! HF `config.json` files onto hyperparameters.
//!
//! GGUF (and backlens internally) stores every linear weight row-major as [out, in]. HF GPT-2's
//! Conv1D stores [in, out]; HF Llama stores q/k rows in the rotate-half RoPE order, which
//! llama.cpp's converter permutes into the interleaved order its RoPE kernel expects (the other
//! RoPE families rotate halves in both); HF Gemma stores each norm weight as w − 1, GGUF as w.

use super::family::{Positions, RopeStyle};
use super::gpt2::Gpt2Config;
use super::{Arch, HParams};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The `config.json` fields of the Llama-like HF decoders (Llama, Mistral, Qwen2, Qwen3, Phi-3,
/// Gemma 3 text) that backlens uses; the family decides the defaults.
#[derive(Debug, Deserialize)]
struct DecoderConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
}

/// HF `rope_scaling` (`rope_type`, or the older `type`).
#[derive(Debug, Deserialize)]
struct RopeScaling {
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
    #[serde(default)]
    factor: Option<f64>,
}

impl DecoderConfig {
    /// Resolves the config into hyperparameters of `arch`, with the defaults of HF's config
    /// class for the family.
    fn into_hparams(self, arch: Arch) -> Result<HParams> {
        let gemma = arch == Arch::Gemma3;
        let plain = HParams::plain(arch, self.hidden_size, self.num_attention_heads);
        let n_embd_head = self.head_dim.unwrap_or(plain.n_embd_head);
        let rope_freq_scale = match &self.rope_scaling {
            None => 1.0,
            Some(r) => match (r.rope_type.as_deref(), r.factor) {
                (Some("linear") | None, Some(f)) if f > 0.0 => 1.0 / f,
                (kind, _) => {
                    return Err(Error::Invalid(format!(
                        "rope_scaling of type {:?}: backlens implements only linear RoPE scaling from config.json",
                        kind.unwrap_or("?")
                    )))
                }
            },
        };
        let n_layer = self.num_hidden_layers;
        let n_swa = match gemma {
            true => self.sliding_window.unwrap_or(4096),
            false => 0,
        };
        let swa_layers = match (n_swa, &self.layer_types) {
            (0, _) => Vec::new(),
            (_, Some(types)) => (0..n_layer)
                .map(|l| types.get(l).is_some_and(|t| t == "sliding_attention"))
                .collect(),
            (_, None) => {
                let n = self.sliding_window_pattern.unwrap_or(6);
                (0..n_layer).map(|l| n == 0 || l % n < n - 1).collect()
            }
        };
        let mut hp = HParams {
            n_layer,
            n_ff: self.intermediate_size,
            n_head_kv: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            n_embd_head,
            n_vocab: self.vocab_size,
            n_ctx: self.max_position_embeddings.unwrap_or(2048),
            norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_base: self
                .rope_theta
                .unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 }),
            rope_freq_scale,
            rope_base_swa: self.rope_local_base_freq.unwrap_or(10_000.0),
            n_swa,
            swa_layers,
            attn_scale: 1.0 / (n_embd_head.max(1) as f64).sqrt(),
            logit_softcap: match gemma {
                true => self.final_logit_softcapping.unwrap_or(0.0),
                false => 0.0,
            },
            tied_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            ..plain
        };
        // As llama.cpp reads the converted file (gemma3.cpp): the 62-layer Gemma 3 scales by
        // n_embd / n_head.
        if gemma && n_layer == 62 {
            hp.attn_scale = 1.0 / ((hp.n_embd / hp.n_head.max(1)) as f64).sqrt();
        }
        hp.validate()
    }
}

/// The two `config.json` fields that name the architecture.
#[derive(serde::Deserialize)]
struct ArchProbe {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

/// Hyperparameters from the text of an HF `config.json` (at `path`, for messages).
pub fn hparams_from_config(path: &Path, text: &str) -> Result<HParams> {
    let json_err = |e: serde_json::Error| Error::Json {
        path: path.to_path_buf(),
        problem: e.to_string(),
    };
    let probe: ArchProbe = serde_json::from_str(text).map_err(json_err)?;
    let kind = probe
        .model_type
        .or_else(|| probe.architectures.first().cloned())
        .unwrap_or_default();
    let arch = match kind.as_str() {
        "gpt2" | "GPT2LMHeadModel" => {
            return serde_json::from_str::<Gpt2Config>(text)
                .map_err(json_err)?
                .into_hparams()
        }
        "llama" | "LlamaForCausalLM" | "mistral" | "MistralForCausalLM" => Arch::Llama,
        "qwen2" | "Qwen2ForCausalLM" => Arch::Qwen2,
        "qwen3" | "Qwen3ForCausalLM" => Arch::Qwen3,
        "phi3" | "Phi3ForCausalLM" => Arch::Phi3,
        "gemma3_text" | "Gemma3ForCausalLM" => Arch::Gemma3,
        other => return Err(Error::UnknownArch(other.to_string())),
    };
    serde_json::from_str::<DecoderConfig>(text)
        .map_err(json_err)?
        .into_hparams(arch)
}

/// How an HF tensor's values must be rearranged to reach the GGUF layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Same values, same order.
    AsIs,
    /// A 2-D matrix stored transposed (GPT-2 Conv1D).
    Transposed,
    /// Llama q/k rows: HF rotate-half order, `heads` heads.
    RopeRows { heads: usize },
    /// Gemma norm weights: HF stores w − 1.
    PlusOne,
}

/// The HF name and layout of a GGUF tensor, or None when the architecture has no such tensor.
/// `prefix` is the prefix the checkpoint uses ("" or "transformer." for GPT-2).
pub fn hf_name(hp: &HParams, gguf: &str, prefix: &str) -> Option<(String, Layout)> {
    let (name, layout) = match hp.arch {
        Arch::Gpt2 => gpt2_name(gguf)?,
        _ => decoder_name(hp, gguf)?,
    };
    let full = if name == "lm_head.weight" {
        name
    } else {
        format!("{prefix}{name}")
    };
    Some((full, layout))
}

fn split_block(gguf: &str) -> Option<(usize, &str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, role) = rest.split_once('.')?;
    Some((layer.parse().ok()?, role))
}

fn gpt2_name(gguf: &str) -> Option<(String, Layout)> {
    use Layout::*;
    let fixed = match gguf {
        "token_embd.weight" => Some("wte.weight"),
        "position_embd.weight" => Some("wpe.weight"),
        "output_norm.weight" => Some("ln_f.weight"),
        "output_norm.bias" => Some("ln_f.bias"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), AsIs));
    }
    let (l, role) = split_block(gguf)?;
    let (hf, layout) = match role {
        "attn_norm.weight" => ("ln_1.weight", AsIs),
        "attn_norm.bias" => ("ln_1.bias", AsIs),
        "attn_qkv.weight" => ("attn.c_attn.weight", Transposed),
        "attn_qkv.bias" => ("attn.c_attn.bias", AsIs),
        "attn_output.weight" => ("attn.c_proj.weight", Transposed),
        "attn_output.bias" => ("attn.c_proj.bias", AsIs),
        "ffn_norm.weight" => ("ln_2.weight", AsIs),
        "ffn_norm.bias" => ("ln_2.bias", AsIs),
        "ffn_up.weight" => ("mlp.c_fc.weight", Transposed),
        "ffn_up.bias" => ("mlp.c_fc.bias", AsIs),
        "ffn_down.weight" => ("mlp.c_proj.weight", Transposed),
        "ffn_down.bias" => ("mlp.c_proj.bias", AsIs),
        _ => return None,
    };
    Some((format!("h.{l}.{hf}"), layout))
}

/// The Llama-like decoders: `model.layers.{l}.self_attn.*` and `mlp.*`, with the family's
/// differences (Llama's RoPE row order, Phi-3's fused matrices, Gemma's four norms stored as
/// w − 1).
fn decoder_name(hp: &HParams, gguf: &str) -> Option<(String, Layout)> {
    use Layout::*;
    let gemma = hp.arch == Arch::Gemma3;
    let norm = if gemma { PlusOne } else { AsIs };
    let fixed = match gguf {
        "token_embd.weight" => Some(("model.embed_tokens.weight", AsIs)),
        "output_norm.weight" => Some(("model.norm.weight", norm)),
        "output.weight" => Some(("lm_head.weight", AsIs)),
        _ => None,
    };
    if let Some((name, layout)) = fixed {
        return Some((name.to_string(), layout));
    }
    let (l, role) = split_block(gguf)?;
    let (stem, kind) = role.rsplit_once('.')?;
    let rope_rows = |heads: usize| match hp.arch.family().positions {
        Positions::Rope(RopeStyle::Pairs) => RopeRows { heads },
        _ => AsIs,
    };
    let (hf, layout) = match stem {
        "attn_norm" => ("input_layernorm", norm),
        "attn_q" => ("self_attn.q_proj", rope_rows(hp.n_head)),
        "attn_k" => ("self_attn.k_proj", rope_rows(hp.n_head_kv)),
        "attn_v" => ("self_attn.v_proj", AsIs),
        "attn_qkv" => ("self_attn.qkv_proj", AsIs),
        "attn_output" => ("self_attn.o_proj", AsIs),
        "attn_q_norm" => ("self_attn.q_norm", norm),
        "attn_k_norm" => ("self_attn.k_norm", norm),
        "post_attention_norm" => ("post_attention_layernorm", norm),
        "ffn_norm" if gemma => ("pre_feedforward_layernorm", norm),
        "ffn_norm" => ("post_attention_layernorm", norm),
        "post_ffw_norm" => ("post_feedforward_layernorm", norm),
        "ffn_gate" => ("mlp.gate_proj", AsIs),
        "ffn_up" if hp.arch == Arch::Phi3 => ("mlp.gate_up_proj", AsIs),
        "ffn_up" => ("mlp.up_proj", AsIs),
        "ffn_down" => ("mlp.down_proj", AsIs),
        _ => return None,
    };
    Some((format!("model.layers.{l}.{hf}.{kind}"), layout))
}

/// Rearranges `values` (row-major, HF shape `hf_shape`) into the GGUF layout.
/// Returns the values and the GGUF row-major shape.
pub fn to_gguf(values: Vec<f32>, hf_shape: &[usize], layout: Layout) -> (Vec<f32>, Vec<usize>) {
    match layout {
        Layout::AsIs => (values, hf_shape.to_vec()),
        Layout::Transposed => {
            let (rows, cols) = (hf_shape[0], hf_shape[1]);
            (transpose(&values, rows, cols), vec![cols, rows])
        }
        Layout::RopeRows { heads } => (
            permute_rope_rows(&values, hf_shape, heads, true),
            hf_shape.to_vec(),
        ),
        Layout::PlusOne => (values.iter().map(|v| v + 1.0).collect(), hf_shape.to_vec()),
    }
}

/// The inverse of [`to_gguf`]: GGUF-layout values (row-major `gguf_shape`) back to the HF layout.
pub fn to_hf(values: &[f32], gguf_shape: &[usize], layout: Layout) -> Vec<f32> {
    match layout {
        Layout::AsIs => values.to_vec(),
        Layout::Transposed => transpose(values, gguf_shape[0], gguf_shape[1]),
        Layout::RopeRows { heads } => permute_rope_rows(values, gguf_shape, heads, false),
        Layout::PlusOne => values.iter().map(|v| v - 1.0).collect(),
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Within each head of `rows / heads` rows, HF keeps the two RoPE halves apart (row i pairs with
/// row i + half); GGUF interleaves them (row 2i pairs with row 2i + 1).
fn permute_rope_rows(values: &[f32], shape: &[usize], heads: usize, hf_to_gguf: bool) -> Vec<f32> {
    let rows = shape[0];
    let cols = values.len() / rows.max(1);
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let hf_row = h * head_rows + j * half + i;
                let gguf_row = h * head_rows + 2 * i + j;
                let (src, dst) = if hf_to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        for layout in [
            Layout::AsIs,
            Layout::Transposed,
            Layout::RopeRows { heads: 2 },
        ] {
            let (g, shape) = to_gguf(values.clone(), &[8, 3], layout);
            assert_eq!(to_hf(&g, &shape, layout), values, "{layout:?}");
        }
        // Rope rows: head 0 has rows 0..4; HF rows (0, 2) pair up and land on GGUF rows (0, 1).
        let (g, _) = to_gguf(values, &[8, 3], Layout::RopeRows { heads: 2 });
        assert_eq!(&g[3..6], &[6.0, 7.0, 8.0]);
    }
}
