//! What backlens can do with a model file (lens, edit methods, audit, eval), and why not where it
//! cannot: `inspect`'s last line.

use crate::arch::{Arch, HParams};
use crate::edit::Method;
use crate::source::ModelSource;
use crate::Result;

/// What backlens can do with a model file, and why not where it cannot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capabilities {
    /// The file's architecture name (`general.architecture`, or the HF `model_type`).
    pub architecture: String,
    /// The hyperparameters, when backlens implements the family.
    pub hparams: Option<HParams>,
    /// The Backward Lens (candle forward and backward).
    pub lens: bool,
    /// Edit methods that run on it.
    pub edit_methods: Vec<&'static str>,
    /// `audit` of a patch against it.
    pub audit: bool,
    /// `eval` through llama.cpp.
    pub eval: bool,
    /// Why something is missing, in one sentence.
    pub why_not: Option<String>,
}

impl Capabilities {
    /// Reads a file's capabilities. Fails only when the file is broken: an architecture backlens
    /// does not implement is a capability answer, not an error.
    pub fn of(source: &ModelSource) -> Result<Capabilities> {
        let architecture = match source {
            ModelSource::Gguf(g) => g.get_str("general.architecture")?.to_string(),
            ModelSource::Hf(h) => h.hparams.arch.name().to_string(),
        };
        match source.hparams() {
            Ok(hp) => Ok(Capabilities {
                architecture,
                hparams: Some(hp),
                lens: true,
                edit_methods: Method::ALL.iter().map(|m| m.name()).collect(),
                audit: true,
                eval: matches!(source, ModelSource::Gguf(_)),
                why_not: match source {
                    ModelSource::Gguf(_) => None,
                    ModelSource::Hf(_) => Some(
                        "eval and llama.cpp checks need a GGUF file (convert it with llama.cpp's convert_hf_to_gguf.py)".into(),
                    ),
                },
            }),
            Err(e) if e.is_unknown_arch() => Ok(Capabilities {
                why_not: Some(format!(
                    "backlens has no forward for architecture '{architecture}' (its families: {}); llama.cpp-only commands (generate, serve) run it if the pinned llama.cpp does",
                    Arch::NAMES.join(", ")
                )),
                architecture,
                hparams: None,
                lens: false,
                edit_methods: Vec::new(),
                audit: false,
                eval: false,
            }),
            Err(e) => Err(e),
        }
    }
}
