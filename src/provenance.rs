//! The `backlens.*` metadata keys that patched GGUFs and LoRA adapters carry: which edits made the
//! file, with which method, layer and step, from which base file. This module is the only place
//! that names those keys, for writing and for reading them back (audit, serve).

use crate::weights::gguf::{GgufFile, Value};
use serde::{Deserialize, Serialize};

/// Prefix of every provenance key.
pub const PREFIX: &str = "backlens.";

const VERSION: &str = "backlens.version";
const METHOD: &str = "backlens.method";
const LAYER: &str = "backlens.layer";
const LR: &str = "backlens.lr";
const EDITS: &str = "backlens.edits";
const BASE_SHA256: &str = "backlens.base_sha256";
const WHITEN: &str = "backlens.whiten";
const STATS_CORPUS: &str = "backlens.stats_corpus";

/// One request of the edit, as recorded in `backlens.edits` (a JSON array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// The edited prompt.
    pub prompt: String,
    /// The new target.
    pub target_new: String,
    /// First token id of " " + target.
    pub target_id: u32,
    /// True when the target already was the top-1 and nothing was written for it.
    pub skipped: bool,
}

/// Everything a written file records about how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// Edit method name (`shift`, `shift-whitened`, `grad`).
    pub method: String,
    /// Edited layer.
    pub layer: usize,
    /// Step size.
    pub lr: f64,
    /// The requests, in order.
    pub edits: Vec<EditRecord>,
    /// sha256 of the base file, hex.
    pub base_sha256: String,
    /// Key options of `shift-whitened` as JSON, when that method was used.
    pub whiten: Option<String>,
    /// Description of the key-statistics corpus, when that method was used.
    pub stats_corpus: Option<String>,
}

impl Provenance {
    /// The metadata entries to write, in a fixed order.
    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        let edits = serde_json::to_string(&self.edits).expect("edit records serialize");
        let mut keys = vec![
            (
                VERSION.to_string(),
                Value::String(env!("CARGO_PKG_VERSION").into()),
            ),
            (METHOD.to_string(), Value::String(self.method.clone())),
            (LAYER.to_string(), Value::U32(self.layer as u32)),
            (LR.to_string(), Value::F32(self.lr as f32)),
            (EDITS.to_string(), Value::String(edits)),
            (
                BASE_SHA256.to_string(),
                Value::String(self.base_sha256.clone()),
            ),
        ];
        if let Some(w) = &self.whiten {
            keys.push((WHITEN.to_string(), Value::String(w.clone())));
        }
        if let Some(c) = &self.stats_corpus {
            keys.push((STATS_CORPUS.to_string(), Value::String(c.clone())));
        }
        keys
    }

    /// The edit records of a file, or an empty list when it has none or they do not parse.
    pub fn edits_of(file: &GgufFile) -> Vec<EditRecord> {
        file.get(EDITS)
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }

    /// The sha256 of the base file a patch records, if any.
    pub fn base_sha256_of(file: &GgufFile) -> Option<&str> {
        file.get(BASE_SHA256).and_then(Value::as_str)
    }
}

/// Every provenance key of a file with its value, in file order.
pub fn entries(file: &GgufFile) -> Vec<(&str, &Value)> {
    file.metadata
        .iter()
        .filter(|(k, _)| is_provenance_key(k))
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

/// Whether a metadata key is one of backlens's own.
pub fn is_provenance_key(key: &str) -> bool {
    key.starts_with(PREFIX)
}
