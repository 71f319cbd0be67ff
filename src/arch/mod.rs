//! Architectures: hyperparameters, the tensor names each one needs, and how HF checkpoints map
//! onto GGUF names and layouts (`hf`).

pub mod generic;
pub mod gpt2;
pub mod hf;
pub mod llama;

use crate::weights::gguf::GgufFile;
use crate::{Error, Result};
use serde::Serialize;

/// A supported transformer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: learned positions, LayerNorm, fused QKV with biases, GELU MLP.
    Gpt2,
    /// Llama: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP.
    Llama,
}

impl Arch {
    /// The GGUF names of every supported family.
    pub const NAMES: [&'static str; 2] = ["gpt2", "llama"];

    /// Parses the GGUF `general.architecture` string.
    pub fn from_name(name: &str) -> Result<Arch> {
        match name {
            "gpt2" => Ok(Arch::Gpt2),
            "llama" => Ok(Arch::Llama),
            other => Err(Error::UnknownArch(other.to_string())),
        }
    }

    /// The GGUF architecture string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

/// Resolved hyperparameters of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HParams {
    /// Architecture family.
    pub arch: Arch,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Model (residual) width.
    pub n_embd: usize,
    /// Hidden width of the feed-forward block.
    pub n_ff: usize,
    /// Attention heads for queries.
    pub n_head: usize,
    /// Attention heads for keys and values (grouped-query attention when < n_head).
    pub n_head_kv: usize,
    /// Vocabulary size (rows of the embedding).
    pub n_vocab: usize,
    /// Trained context length.
    pub n_ctx: usize,
    /// Epsilon of the normalization layers.
    pub norm_eps: f64,
    /// RoPE base frequency (Llama only).
    pub rope_base: f64,
    /// Whether the unembedding reuses the token embedding.
    pub tied_embeddings: bool,
}

impl HParams {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Reads hyperparameters from GGUF metadata and tensor shapes.
    pub fn from_gguf(file: &GgufFile) -> Result<HParams> {
        let arch = Arch::from_name(file.get_str("general.architecture")?)?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let n_vocab = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        let n_head = file.get_u64(&key("attention.head_count"))? as usize;
        let hp = HParams {
            arch,
            n_layer: file.get_u64(&key("block_count"))? as usize,
            n_embd: file.get_u64(&key("embedding_length"))? as usize,
            n_ff: file.get_u64(&key("feed_forward_length"))? as usize,
            n_head,
            n_head_kv: file
                .get(&key("attention.head_count_kv"))
                .and_then(|v| v.as_u64())
                .map_or(n_head, |v| v as usize),
            n_vocab,
            n_ctx: file.get_u64(&key("context_length"))? as usize,
            norm_eps: match arch {
                Arch::Gpt2 => file.get_f64(&key("attention.layer_norm_epsilon"))?,
                Arch::Llama => file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            },
            rope_base: match arch {
                Arch::Gpt2 => 0.0,
                Arch::Llama => file
                    .get(&key("rope.freq_base"))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(10_000.0),
            },
            tied_embeddings: file.tensor("output.weight").is_none(),
        };
        if let Some(n_rot) = file
            .get(&key("rope.dimension_count"))
            .and_then(|v| v.as_u64())
        {
            if arch == Arch::Llama && n_rot as usize != hp.head_dim_checked() {
                return Err(Error::Invalid(format!(
                    "invalid hyperparameters: {} is {n_rot}, but the head width is {} (partial rotary embeddings are not supported)",
                    key("rope.dimension_count"),
                    hp.head_dim_checked()
                )));
            }
        }
        hp.validate()?.bounded_by(file.tensors.len())
    }

    /// Head width, 0 when the head count is 0 (for messages before [`Self::validate`]).
    fn head_dim_checked(&self) -> usize {
        self.n_embd.checked_div(self.n_head).unwrap_or(0)
    }

    /// Rejects a layer count larger than the number of tensors the file holds (each layer has
    /// several), before anything is allocated per layer.
    pub fn bounded_by(self, n_tensors: usize) -> Result<HParams> {
        if self.n_layer > n_tensors {
            return Err(Error::Invalid(format!(
                "invalid hyperparameters: {} layers claimed, but the file holds only {n_tensors} tensors",
                self.n_layer
            )));
        }
        Ok(self)
    }

    /// Rejects hyperparameters that cannot describe a working model.
    pub fn validate(self) -> Result<HParams> {
        let bad = |what: &str| Err(Error::Invalid(format!("invalid hyperparameters: {what}")));
        if self.n_layer == 0 || self.n_embd == 0 || self.n_ff == 0 || self.n_vocab == 0 {
            return bad("zero layers, width or vocabulary");
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad("embedding width is not a multiple of the head count");
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad("head count is not a multiple of the key/value head count");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(&format!("norm epsilon {} is not in (0, 1)", self.norm_eps));
        }
        if self.arch == Arch::Llama && !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(&format!(
                "RoPE base {} is not a number above 1",
                self.rope_base
            ));
        }
        if self.n_ctx == 0 {
            return bad("context length 0");
        }
        if self.arch == Arch::Llama && !self.head_dim().is_multiple_of(2) {
            return bad("RoPE needs an even head width");
        }
        Ok(self)
    }
}

/// The role a weight plays in a block, named as in GGUF (`blk.{i}.{role}`).
pub fn block_tensor(layer: usize, role: &str) -> String {
    format!("blk.{layer}.{role}")
}

/// GGUF name of a layer's FF2 (down-projection) weight, the matrix backlens edits.
pub fn ff2_weight(layer: usize) -> String {
    block_tensor(layer, "ffn_down.weight")
}

/// Every tensor name (with its row-major shape) the architecture requires, used to validate files.
pub fn required_tensors(hp: &HParams) -> Vec<(String, Vec<usize>)> {
    match hp.arch {
        Arch::Gpt2 => gpt2::required_tensors(hp),
        Arch::Llama => llama::required_tensors(hp),
    }
}
