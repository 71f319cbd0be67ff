//! The one place that maps HF checkpoint tensors onto GGUF names and layouts, both ways.
//!
//! GGUF (and backlens internally) stores every linear weight row-major as [out, in]. HF GPT-2's
//! Conv1D stores [in, out]; HF Llama stores q/k rows in the rotate-half RoPE order, which
//! llama.cpp's converter permutes into the interleaved order its RoPE kernel expects.

use super::gpt2::Gpt2Config;
use super::llama::LlamaConfig;
use super::{Arch, HParams};
use crate::{Error, Result};
use std::path::Path;

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
    match kind.as_str() {
        "gpt2" | "GPT2LMHeadModel" => serde_json::from_str::<Gpt2Config>(text)
            .map_err(json_err)?
            .into_hparams(),
        "llama" | "LlamaForCausalLM" => serde_json::from_str::<LlamaConfig>(text)
            .map_err(json_err)?
            .into_hparams(),
        other => Err(Error::UnknownArch(other.to_string())),
    }
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
}

/// The HF name and layout of a GGUF tensor, or None when the architecture has no such tensor.
/// `prefix` is the prefix the checkpoint uses ("" or "transformer." for GPT-2).
pub fn hf_name(hp: &HParams, gguf: &str, prefix: &str) -> Option<(String, Layout)> {
    let (name, layout) = match hp.arch {
        Arch::Gpt2 => gpt2_name(gguf)?,
        Arch::Llama => llama_name(hp, gguf)?,
        Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 | Arch::Gemma3 => return None,
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

fn llama_name(hp: &HParams, gguf: &str) -> Option<(String, Layout)> {
    use Layout::*;
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), AsIs));
    }
    let (l, role) = split_block(gguf)?;
    let (hf, layout) = match role {
        "attn_norm.weight" => ("input_layernorm.weight", AsIs),
        "attn_q.weight" => ("self_attn.q_proj.weight", RopeRows { heads: hp.n_head }),
        "attn_k.weight" => (
            "self_attn.k_proj.weight",
            RopeRows {
                heads: hp.n_head_kv,
            },
        ),
        "attn_v.weight" => ("self_attn.v_proj.weight", AsIs),
        "attn_output.weight" => ("self_attn.o_proj.weight", AsIs),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", AsIs),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", AsIs),
        "ffn_up.weight" => ("mlp.up_proj.weight", AsIs),
        "ffn_down.weight" => ("mlp.down_proj.weight", AsIs),
        _ => return None,
    };
    Some((format!("model.layers.{l}.{hf}"), layout))
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
    }
}

/// The inverse of [`to_gguf`]: GGUF-layout values (row-major `gguf_shape`) back to the HF layout.
pub fn to_hf(values: &[f32], gguf_shape: &[usize], layout: Layout) -> Vec<f32> {
    match layout {
        Layout::AsIs => values.to_vec(),
        Layout::Transposed => transpose(values, gguf_shape[0], gguf_shape[1]),
        Layout::RopeRows { heads } => permute_rope_rows(values, gguf_shape, heads, false),
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
