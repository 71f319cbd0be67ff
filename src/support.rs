//! What backlens can do with a model file (lens, edit methods, audit, eval), and why not where it
//! cannot: `inspect`'s last line.

use crate::arch::generic::Shape;
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
            Err(e) if e.is_unknown_arch() => {
                // Forward-only work runs through llama.cpp's own graph where it loads the file.
                let llama = match source {
                    ModelSource::Gguf(g) => Shape::from_gguf(g).map_err(|e| e.to_string()),
                    ModelSource::Hf(_) => Err("not a GGUF file".to_string()),
                };
                let shift = llama.as_ref().is_ok_and(|s| s.no_editable_layer().is_none());
                Ok(Capabilities {
                    why_not: Some(match &llama {
                        Ok(_) => format!(
                            "backlens has no candle forward for architecture '{architecture}' (its families: {}): no lens; shift edits, audit probes, predict --runtime llama and generate run through llama.cpp's own graph",
                            Arch::NAMES.join(", ")
                        ),
                        Err(why) => format!(
                            "backlens has no forward for architecture '{architecture}' (its families: {}), and llama.cpp cannot run it here: {why}",
                            Arch::NAMES.join(", ")
                        ),
                    }),
                    architecture,
                    hparams: None,
                    lens: false,
                    edit_methods: match shift {
                        true => vec![Method::Shift.name()],
                        false => Vec::new(),
                    },
                    audit: llama.is_ok(),
                    eval: false,
                })
            }
            Err(e) => Err(e),
        }
    }
}
