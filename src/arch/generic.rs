//! The shape of any architecture the pinned llama.cpp runs, as far as forward-only work needs
//! it (FPS edits, adapters, probes through llama.cpp's own graph): the architecture name, the
//! layer count, the residual width, the vocabulary and what each layer's FFN is. Read from the
//! `{arch}.*` keys every llama.cpp family shares and bounded by the tensors present, so that a
//! file llama.cpp would abort on (an unknown architecture, a layer count past its limit) is
//! refused here first. Families backlens runs in candle also have an [`super::HParams`].

use crate::weights::gguf::GgufFile;
use crate::{Error, Result};
use serde::Serialize;

/// The `general.architecture` names the pinned llama.cpp (`llama-cpp-sys-2` 0.1.161) loads:
/// the table of architecture names in its `src/llama-arch.cpp`. Any other name is refused
/// before llama.cpp reads the file.
pub const LLAMA_CPP_ARCHS: &[&str] = &[
    "afmoe",
    "apertus",
    "arcee",
    "arctic",
    "arwkv7",
    "baichuan",
    "bailingmoe",
    "bailingmoe2",
    "bailingmoe3",
    "bert",
    "bitnet",
    "bloom",
    "chameleon",
    "chatglm",
    "clef",
    "clip",
    "codeshell",
    "cogvlm",
    "cohere2",
    "cohere2moe",
    "command-r",
    "dbrx",
    "deci",
    "deepseek",
    "deepseek2",
    "deepseek2-ocr",
    "deepseek32",
    "deepseek4",
    "dflash",
    "dots1",
    "dots3note",
    "dream",
    "eagle3",
    "ernie4_5",
    "ernie4_5-moe",
    "eurobert",
    "exaone",
    "exaone-moe",
    "exaone4",
    "falcon",
    "falcon-h1",
    "gemma",
    "gemma-embedding",
    "gemma2",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4-assistant",
    "glm-dsa",
    "glm4",
    "glm4moe",
    "glm5-next",
    "gpt-oss",
    "gpt2",
    "gptj",
    "gptneox",
    "granite",
    "granite_swa",
    "granitehybrid",
    "granitemoe",
    "graniteswitch",
    "grok",
    "grovemoe",
    "hrm_text",
    "hunyuan-dense",
    "hunyuan-moe",
    "hunyuan_vl",
    "hy_v3",
    "hy_v4",
    "internlm2",
    "jais",
    "jais2",
    "jamba",
    "jina-bert-v2",
    "jina-bert-v3",
    "kimi-k3",
    "kimi-linear",
    "laguna",
    "lfm2",
    "lfm2moe",
    "llada",
    "llada-moe",
    "llama",
    "llama-embed",
    "llama4",
    "maincoder",
    "mamba",
    "mamba2",
    "maple",
    "mellum",
    "mimo2",
    "minicpm",
    "minicpm3",
    "minimax-01",
    "minimax-m2",
    "minimax-m3",
    "mistral3",
    "mistral4",
    "modern-bert",
    "mpt",
    "muse-glimmer",
    "nanbeige",
    "nemotron",
    "nemotron_h",
    "nemotron_h_moe",
    "neo-bert",
    "nomic-bert",
    "nomic-bert-moe",
    "olmo",
    "olmo2",
    "olmoe",
    "openelm",
    "orion",
    "paddleocr",
    "pangu-embedded",
    "phi2",
    "phi3",
    "phimoe",
    "plamo",
    "plamo2",
    "plamo3",
    "plm",
    "pockettts",
    "qwen",
    "qwen2",
    "qwen2moe",
    "qwen2vl",
    "qwen3",
    "qwen35",
    "qwen35moe",
    "qwen3moe",
    "qwen3next",
    "qwen3tts",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen4exp",
    "refact",
    "rnd1",
    "rwkv6",
    "rwkv6qwen2",
    "rwkv7",
    "seed_oss",
    "smallthinker",
    "smollm3",
    "spark2_5",
    "stablelm",
    "starcoder",
    "starcoder2",
    "step35",
    "t5",
    "t5encoder",
    "talkie",
    "wavtokenizer-dec",
    "xverse",
];

/// llama.cpp's largest layer count (`LLAMA_MAX_LAYERS`); a larger `{arch}.block_count` makes
/// its loader abort.
pub const MAX_LAYERS: usize = 512;
/// llama.cpp's largest expert count (`LLAMA_MAX_EXPERTS`); a larger one makes it abort.
pub const MAX_EXPERTS: u64 = 1024;

/// What one layer's FFN is, from the file's tensor names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ffn {
    /// One dense down projection `blk.L.ffn_down.weight` of n_ff inputs.
    Dense {
        /// Its input width.
        n_ff: usize,
    },
    /// A mixture of experts (the named tensor shows it).
    Experts(String),
    /// No down projection at all.
    Missing,
}

/// The forward-only shape of a GGUF model of any architecture the pinned llama.cpp loads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shape {
    /// `general.architecture`.
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: usize,
    /// Residual width (`{arch}.embedding_length`, equal to the token embedding's rows).
    pub n_embd: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub n_vocab: usize,
    /// Each layer's FFN.
    pub ffn: Vec<Ffn>,
}

impl Shape {
    /// Reads the shape of `file`. Fails, naming the key or tensor, for an architecture the
    /// pinned llama.cpp does not know, a layer count of 0, past llama.cpp's limit or past the
    /// tensors present, an expert count past llama.cpp's limit, and a token embedding or down
    /// projection whose width is not the residual width.
    pub fn from_gguf(file: &GgufFile) -> Result<Shape> {
        Self::read(file).map_err(|e| e.in_file(file.path()))
    }

    fn read(file: &GgufFile) -> Result<Shape> {
        let arch = file.get_str("general.architecture")?.to_string();
        if !LLAMA_CPP_ARCHS.contains(&arch.as_str()) {
            return Err(Error::Invalid(format!(
                "architecture '{arch}' is not one the pinned llama.cpp loads (refused before llama.cpp reads the file)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = file.get_u64(&key("block_count"))?;
        let n_tensors = file.tensors.len() as u64;
        if n_layer == 0 || n_layer > MAX_LAYERS as u64 || n_layer > n_tensors {
            return Err(Error::Invalid(format!(
                "invalid hyperparameters: {} is {n_layer}, but llama.cpp takes 1 to {MAX_LAYERS} layers and the file holds {n_tensors} tensors",
                key("block_count")
            )));
        }
        if let Some(n) = file.get(&key("expert_count")).and_then(|v| v.as_u64()) {
            if n > MAX_EXPERTS {
                return Err(Error::Invalid(format!(
                    "invalid hyperparameters: {} is {n}, past llama.cpp's {MAX_EXPERTS}",
                    key("expert_count")
                )));
            }
        }
        let n_embd = file.get_u64(&key("embedding_length"))? as usize;
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = match embd.dims[..] {
            [w, v] if w as usize == n_embd && v > 0 => v as usize,
            _ => {
                return Err(Error::Shape {
                    name: "token_embd.weight".into(),
                    expected: vec![0, n_embd],
                    got: embd.shape(),
                })
            }
        };
        let ffn = (0..n_layer as usize)
            .map(|l| ffn_of(file, l, n_embd))
            .collect::<Result<_>>()?;
        Ok(Shape {
            arch,
            n_layer: n_layer as usize,
            n_embd,
            n_vocab,
            ffn,
        })
    }

    /// The input width of `layer`'s down projection; fails, naming the layer, when it is past
    /// the last or its FFN is not one dense down projection (what forward-pass shifting edits).
    pub fn ff2_width(&self, layer: usize) -> Result<usize> {
        match self.ffn.get(layer) {
            None => Err(Error::LayerOutOfRange {
                layer,
                n_layer: self.n_layer,
            }),
            Some(Ffn::Dense { n_ff }) => Ok(*n_ff),
            Some(Ffn::Experts(t)) => Err(Error::Invalid(format!(
                "layer {layer} has a mixture-of-experts FFN ({t}): forward-pass shifting needs one dense down projection"
            ))),
            Some(Ffn::Missing) => Err(Error::Invalid(format!(
                "layer {layer} has no down projection ({}): forward-pass shifting edits that tensor",
                super::ff2_weight(layer)
            ))),
        }
    }

    /// The first layer [`Self::ff2_width`] refuses when none can be edited (None when one can).
    pub fn no_editable_layer(&self) -> Option<Error> {
        match self.ffn.iter().any(|f| matches!(f, Ffn::Dense { .. })) {
            true => None,
            false => self.ff2_width(0).err(),
        }
    }
}

/// Layer `l`'s FFN from the tensor names; a dense down projection must be [n_embd, n_ff].
fn ffn_of(file: &GgufFile, l: usize, n_embd: usize) -> Result<Ffn> {
    let experts = ["ffn_down_exps.weight", "ffn_gate_inp.weight"]
        .into_iter()
        .map(|role| super::block_tensor(l, role))
        .find(|n| file.tensor(n).is_some());
    if let Some(t) = experts {
        return Ok(Ffn::Experts(t));
    }
    let name = super::ff2_weight(l);
    let Some(t) = file.tensor(&name) else {
        return Ok(Ffn::Missing);
    };
    match t.dims[..] {
        [n_ff, out] if out as usize == n_embd && n_ff > 0 => Ok(Ffn::Dense {
            n_ff: n_ff as usize,
        }),
        _ => Err(Error::Shape {
            name,
            expected: vec![n_embd, 0],
            got: t.shape(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_architecture_table_is_sorted_and_holds_the_candle_families() {
        assert!(LLAMA_CPP_ARCHS.windows(2).all(|w| w[0] < w[1]));
        for name in super::super::Arch::NAMES {
            assert!(LLAMA_CPP_ARCHS.contains(&name), "{name}");
        }
        assert!(!LLAMA_CPP_ARCHS.contains(&"nosucharch"));
    }
}
