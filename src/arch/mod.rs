//! Architectures: hyperparameters, the tensor names each one needs, and how HF checkpoints map
//! onto GGUF names and layouts (`hf`).

pub mod family;
pub mod gemma3;
pub mod generic;
pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use crate::weights::gguf::{GgufFile, Value};
use crate::{Error, Result};
use family::{Dim, Family, Need, Positions};
use serde::Serialize;

/// A supported transformer family; its table is [`Arch::family`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: learned positions, LayerNorm, fused QKV with biases, GELU MLP.
    Gpt2,
    /// Llama (also Mistral, SmolLM, Llama 3.x): RoPE, RMSNorm, grouped-query attention, SwiGLU.
    Llama,
    /// Qwen2 / Qwen2.5: Llama with q/k/v biases and RoPE on halves.
    Qwen2,
    /// Qwen3: per-head q/k RMSNorm, its own head width.
    Qwen3,
    /// Phi-3: fused q|k|v and gate|up.
    Phi3,
    /// Gemma 3: sandwich norms, q/k norms, GeGLU, sliding-window layers.
    Gemma3,
}

impl Arch {
    /// The GGUF names of every supported family.
    pub const NAMES: [&'static str; 6] = ["gpt2", "llama", "qwen2", "qwen3", "phi3", "gemma3"];
    /// Every supported family, in the order of [`Self::NAMES`].
    pub const ALL: [Arch; 6] = [
        Arch::Gpt2,
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma3,
    ];

    /// Parses the GGUF `general.architecture` string.
    pub fn from_name(name: &str) -> Result<Arch> {
        Self::NAMES
            .iter()
            .position(|&n| n == name)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| Error::UnknownArch(name.to_string()))
    }

    /// The GGUF architecture string.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The family's table.
    pub fn family(self) -> &'static Family {
        match self {
            Arch::Gpt2 => &gpt2::FAMILY,
            Arch::Llama => &llama::FAMILY,
            Arch::Qwen2 => &qwen2::FAMILY,
            Arch::Qwen3 => &qwen3::FAMILY,
            Arch::Phi3 => &phi3::FAMILY,
            Arch::Gemma3 => &gemma3::FAMILY,
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
    /// Width of one attention head (`attention.key_length`; n_embd / n_head unless given).
    pub n_embd_head: usize,
    /// Vocabulary size (rows of the embedding).
    pub n_vocab: usize,
    /// Trained context length.
    pub n_ctx: usize,
    /// Epsilon of the normalization layers.
    pub norm_eps: f64,
    /// RoPE base frequency (0 without RoPE).
    pub rope_base: f64,
    /// RoPE position scale: 1 / `rope.scaling.factor` under linear scaling, else 1.
    pub rope_freq_scale: f64,
    /// `rope.scaling.attn_factor`: multiplies RoPE's cos and sin (1 unless given).
    pub rope_attn_factor: f64,
    /// RoPE base of the sliding-window layers (`rope.freq_base_swa`).
    pub rope_base_swa: f64,
    /// Sliding-window width in positions (0: every layer attends to the whole prefix).
    pub n_swa: usize,
    /// Which layers use the sliding window (empty when `n_swa` is 0).
    pub swa_layers: Vec<bool>,
    /// Factor on q·k before the softmax.
    pub attn_scale: f64,
    /// Final logit softcapping c (logits = c·tanh(logits / c)); 0 for none.
    pub logit_softcap: f64,
    /// Whether the unembedding reuses the token embedding.
    pub tied_embeddings: bool,
}

/// RoPE scaling types the forward implements (`rope.scaling.type`; llama.cpp's default is
/// "linear", a no-op without a factor). "longrope" is Phi-3's: per-pair factors in tensors.
const ROPE_SCALINGS: [&str; 3] = ["none", "linear", "longrope"];

/// LongRoPE factors for sequences up to the original context (llama.cpp's choice whenever its
/// context is no longer than that); the forward stops there.
pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

/// Tensors the forward implements only where the family's table lists them; a file holding one
/// elsewhere is refused rather than silently computed without it.
const UNSUPPORTED_TENSORS: [&str; 3] = [
    "rope_factors_long.weight",
    "rope_factors_short.weight",
    "output.bias",
];

impl HParams {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd_head
    }

    /// The family's defaults for a model of width `n_embd` with `n_head` heads, sizes zero: a
    /// base for struct updates that fill in the sizes (head width n_embd / n_head, scale
    /// 1/√head, no RoPE scaling, no sliding window, no softcapping).
    pub fn plain(arch: Arch, n_embd: usize, n_head: usize) -> HParams {
        let head = n_embd.checked_div(n_head).unwrap_or(0);
        HParams {
            arch,
            n_layer: 0,
            n_embd,
            n_ff: 0,
            n_head,
            n_head_kv: n_head,
            n_embd_head: head,
            n_vocab: 0,
            n_ctx: 0,
            norm_eps: 0.0,
            rope_base: match arch.family().positions {
                Positions::Rope(_) => 10_000.0,
                Positions::Learned => 0.0,
            },
            rope_freq_scale: 1.0,
            rope_attn_factor: 1.0,
            rope_base_swa: 10_000.0,
            n_swa: 0,
            swa_layers: Vec::new(),
            attn_scale: 1.0 / (head.max(1) as f64).sqrt(),
            logit_softcap: 0.0,
            tied_embeddings: true,
        }
    }

    /// Whether layer `l` attends through the sliding window.
    pub fn is_swa(&self, l: usize) -> bool {
        self.n_swa > 0 && self.swa_layers.get(l).copied().unwrap_or(false)
    }

    /// Reads hyperparameters from GGUF metadata and tensor shapes, with the keys and defaults
    /// llama.cpp's `load_hparams` uses for the family.
    pub fn from_gguf(file: &GgufFile) -> Result<HParams> {
        let arch = Arch::from_name(file.get_str("general.architecture")?)?;
        let fam = arch.family();
        let key = |k: &str| format!("{}.{k}", arch.name());
        let opt_u64 = |k: &str| file.get(&key(k)).and_then(Value::as_u64);
        let opt_f64 = |k: &str| file.get(&key(k)).and_then(Value::as_f64);
        let n_vocab = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        let n_layer = file.get_u64(&key("block_count"))? as usize;
        let n_embd = file.get_u64(&key("embedding_length"))? as usize;
        let n_head = file.get_u64(&key("attention.head_count"))? as usize;
        let default_head = n_embd.checked_div(n_head).unwrap_or(0) as u64;
        let n_embd_head = opt_u64("attention.key_length").unwrap_or(default_head);
        let value_head = opt_u64("attention.value_length").unwrap_or(default_head);
        if value_head != n_embd_head {
            return Err(Error::Invalid(format!(
                "invalid hyperparameters: {} is {value_head}, but the key width is {n_embd_head} (different key and value widths are not supported)",
                key("attention.value_length")
            )));
        }
        let rope = matches!(fam.positions, Positions::Rope(_));
        let scaling = match file.get(&key("rope.scaling.type")) {
            None => "linear",
            Some(v) => v.as_str().ok_or_else(|| {
                Error::Invalid(format!("{} is not a string", key("rope.scaling.type")))
            })?,
        };
        if rope && !ROPE_SCALINGS.contains(&scaling) {
            return Err(Error::Invalid(format!(
                "{} is '{scaling}': backlens implements RoPE scaling {}",
                key("rope.scaling.type"),
                ROPE_SCALINGS.join(", ")
            )));
        }
        let factor = opt_f64("rope.scaling.factor")
            .or_else(|| opt_f64("rope.scale_linear"))
            .unwrap_or(0.0);
        let rope_freq_scale = match (scaling, factor) {
            ("none", _) => 1.0,
            (_, 0.0) => 1.0,
            (_, f) => 1.0 / f,
        };
        let n_swa = match fam.sliding_window {
            true => opt_u64("attention.sliding_window").unwrap_or(0) as usize,
            false => 0,
        };
        let mut hp = HParams {
            arch,
            n_layer,
            n_embd,
            n_ff: file.get_u64(&key("feed_forward_length"))? as usize,
            n_head,
            n_head_kv: opt_u64("attention.head_count_kv").map_or(n_head, |v| v as usize),
            n_embd_head: n_embd_head as usize,
            n_vocab,
            n_ctx: file.get_u64(&key("context_length"))? as usize,
            norm_eps: file.get_f64(&key(fam.eps_key))?,
            rope_base: match rope {
                true => opt_f64("rope.freq_base").unwrap_or(10_000.0),
                false => 0.0,
            },
            rope_freq_scale,
            rope_attn_factor: opt_f64("rope.scaling.attn_factor").unwrap_or(1.0),
            rope_base_swa: opt_f64("rope.freq_base_swa").unwrap_or(10_000.0),
            n_swa,
            swa_layers: match n_swa {
                0 => Vec::new(),
                _ => swa_pattern(file, &key("attention.sliding_window_pattern"), n_layer)?,
            },
            attn_scale: 1.0 / (n_embd_head as f64).sqrt(),
            logit_softcap: match fam.logit_softcap {
                true => opt_f64("final_logit_softcapping").unwrap_or(0.0),
                false => 0.0,
            },
            tied_embeddings: file.tensor("output.weight").is_none(),
        };
        // llama.cpp (gemma3.cpp, after gemma_pytorch): the 62-layer (27B) Gemma 3 scales by
        // n_embd / n_head rather than by the head width.
        if arch == Arch::Gemma3 && n_layer == 62 && n_head > 0 {
            hp.attn_scale = 1.0 / ((n_embd / n_head) as f64).sqrt();
        }
        if let Some(n_rot) = opt_u64("rope.dimension_count") {
            if rope && n_rot != n_embd_head {
                return Err(Error::Invalid(format!(
                    "invalid hyperparameters: {} is {n_rot}, but the head width is {n_embd_head} (partial rotary embeddings are not supported)",
                    key("rope.dimension_count"),
                )));
            }
        }
        let listed = |name: &&str| fam.globals.iter().any(|s| s.name == *name);
        if let Some(name) = UNSUPPORTED_TENSORS
            .iter()
            .find(|n| file.tensor(n).is_some() && !listed(n))
        {
            return Err(Error::Invalid(format!(
                "tensor {name}: backlens's forward does not implement it"
            )));
        }
        // llama.cpp uses the short LongRoPE factors only while its context is at most the
        // original one; past it the long ones, which the forward does not implement.
        if file.tensor(ROPE_FACTORS_SHORT).is_some() {
            let original =
                opt_u64("rope.scaling.original_context_length").unwrap_or(hp.n_ctx as u64);
            hp.n_ctx = hp.n_ctx.min(original as usize);
        }
        hp.validate()?.bounded_by(file.tensors.len())
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
        let rope = matches!(self.arch.family().positions, Positions::Rope(_));
        if self.n_layer == 0 || self.n_embd == 0 || self.n_ff == 0 || self.n_vocab == 0 {
            return bad("zero layers, width or vocabulary");
        }
        if self.n_head == 0 || self.n_embd_head == 0 {
            return bad("zero heads or head width");
        }
        if self.arch == Arch::Gpt2 && self.n_head * self.n_embd_head != self.n_embd {
            return bad("embedding width is not a multiple of the head count");
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad("head count is not a multiple of the key/value head count");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(&format!("norm epsilon {} is not in (0, 1)", self.norm_eps));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if rope && !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(&format!(
                "RoPE base {} is not a number above 1",
                self.rope_base
            ));
        }
        if rope && self.n_swa > 0 && !(self.rope_base_swa.is_finite() && self.rope_base_swa > 1.0) {
            return bad(&format!(
                "sliding-window RoPE base {} is not a number above 1",
                self.rope_base_swa
            ));
        }
        if !positive(self.rope_freq_scale) || !positive(self.rope_attn_factor) {
            return bad("RoPE scaling factor or attention factor is not a positive number");
        }
        if !positive(self.attn_scale) {
            return bad("attention scale is not a positive number");
        }
        if !(self.logit_softcap.is_finite() && self.logit_softcap >= 0.0) {
            return bad("final logit softcapping is negative or not a number");
        }
        if self.n_ctx == 0 {
            return bad("context length 0");
        }
        if rope && !self.head_dim().is_multiple_of(2) {
            return bad("RoPE needs an even head width");
        }
        Ok(self)
    }

    /// A table dimension's size.
    pub fn dim(&self, d: Dim) -> usize {
        let (q, kv) = (
            self.n_head * self.n_embd_head,
            self.n_head_kv * self.n_embd_head,
        );
        match d {
            Dim::Embd => self.n_embd,
            Dim::Ff => self.n_ff,
            Dim::Ff2 => 2 * self.n_ff,
            Dim::Vocab => self.n_vocab,
            Dim::Ctx => self.n_ctx,
            Dim::Head => self.n_embd_head,
            Dim::HalfHead => self.n_embd_head / 2,
            Dim::Q => q,
            Dim::Kv => kv,
            Dim::Qkv => q + 2 * kv,
        }
    }
}

/// Which layers slide (llama.cpp `load_swa_pattern`, dense last): an array with one flag per
/// layer (booleans or integers; layers past its end are global), or a period n (default 6)
/// where every n-th layer is global.
fn swa_pattern(file: &GgufFile, key: &str, n_layer: usize) -> Result<Vec<bool>> {
    let bad = || Error::Invalid(format!("{key} is neither a period nor one flag per layer"));
    match file.get(key) {
        Some(Value::Array(_, items)) => (0..n_layer)
            .map(|l| match items.get(l) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => v.as_u64().map(|x| x != 0).ok_or_else(bad),
            })
            .collect(),
        Some(v) => {
            let n = v.as_u64().ok_or_else(bad)? as usize;
            Ok((0..n_layer).map(|l| n == 0 || l % n < n - 1).collect())
        }
        None => Ok((0..n_layer).map(|l| l % 6 < 5).collect()),
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

/// Every tensor of the family's table with its row-major shape and need.
pub fn tensor_specs(hp: &HParams) -> Vec<(String, Vec<usize>, Need)> {
    let fam = hp.arch.family();
    let resolve = |shape: &[Dim]| shape.iter().map(|&d| hp.dim(d)).collect::<Vec<_>>();
    let mut out: Vec<(String, Vec<usize>, Need)> = fam
        .globals
        .iter()
        .map(|s| (s.name.to_string(), resolve(s.shape), s.need))
        .collect();
    for l in 0..hp.n_layer {
        out.extend(
            fam.block
                .iter()
                .map(|s| (block_tensor(l, s.name), resolve(s.shape), s.need)),
        );
    }
    out
}

/// Every tensor name (with its row-major shape) the file must hold, used to validate files.
pub fn required_tensors(hp: &HParams) -> Vec<(String, Vec<usize>)> {
    tensor_specs(hp)
        .into_iter()
        .filter(|(_, _, need)| need.required(hp.tied_embeddings))
        .map(|(name, shape, _)| (name, shape))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_round_trips_its_name_and_the_error_lists_them_all() {
        for arch in Arch::ALL {
            assert_eq!(Arch::from_name(arch.name()).unwrap(), arch);
        }
        let message = Arch::from_name("mamba9").unwrap_err().to_string();
        assert!(message.ends_with(&format!("(supported: {})", Arch::NAMES.join(", "))));
    }

    #[test]
    fn table_shapes_resolve_against_the_hyperparameters() {
        let hp = HParams {
            n_layer: 1,
            n_ff: 96,
            n_head_kv: 2,
            n_vocab: 10,
            n_ctx: 8,
            norm_eps: 1e-5,
            ..HParams::plain(Arch::Phi3, 64, 4)
        };
        let specs = tensor_specs(&hp);
        let shape = |name: &str| specs.iter().find(|s| s.0 == name).unwrap().1.clone();
        assert_eq!(shape("blk.0.attn_qkv.weight"), vec![64 + 2 * 32, 64]);
        assert_eq!(shape("blk.0.ffn_up.weight"), vec![192, 64]);
        assert_eq!(shape("blk.0.ffn_down.weight"), vec![64, 96]);
        assert!(required_tensors(&hp)
            .iter()
            .all(|(n, _)| n != "output.weight"));
    }
}
