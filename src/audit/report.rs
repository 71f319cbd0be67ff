//! The audit report: every type of the `--json` output (schema in the [`super`] docs).

use super::LensScore;
use crate::lens::TokenScore;
use serde::Serialize;
use std::path::PathBuf;

/// What the second file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    /// A complete model GGUF with (some) changed tensors.
    Full,
    /// A LoRA adapter GGUF (`general.type` = "adapter").
    Adapter,
}

/// One `backlens.*` metadata entry of the patch.
#[derive(Debug, Clone, Serialize)]
pub struct ProvenanceEntry {
    /// The key, e.g. `backlens.method`.
    pub key: String,
    /// The value as JSON.
    pub value: serde_json::Value,
}

/// How a metadata key differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Only in the patch.
    Added,
    /// Only in the base.
    Removed,
    /// In both, with different values.
    Changed,
}

/// A metadata key (outside `backlens.*`) that differs between base and patch.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataChange {
    /// The key.
    pub key: String,
    /// Added, removed or changed.
    pub change: Change,
    /// Short rendering of the base value.
    pub base: Option<String>,
    /// Short rendering of the patch value.
    pub patch: Option<String>,
}

/// A tensor present in only one of the files.
#[derive(Debug, Clone, Serialize)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// ggml type name.
    #[serde(rename = "type")]
    pub ggml_type: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

/// LoRA factors of one adapter pair.
#[derive(Debug, Clone, Serialize)]
pub struct LoraInfo {
    /// r, the inner dimension of B·A.
    pub rank: usize,
    /// `adapter.lora.alpha`, if present.
    pub alpha: Option<f64>,
    /// The scale llama.cpp applies: alpha / r, or 1 when alpha is absent or 0.
    pub scale: f64,
}

/// The sign convention of the leading singular pair (u₁, v₁), with ΔW·v₁ = σ₁u₁ always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orientation {
    /// For tensors that write into the residual stream (`ffn_down`, `attn_output`) and were
    /// projected: the sign whose logit-lens projection reaches the higher top score, i.e. the
    /// vocabulary direction the update writes most distinctly counts as "promoted". A probe with
    /// positive cosine then makes the patch write the `promotes` tokens.
    Lens,
    /// Otherwise: v₁ has a positive sum of entries (when the sum is zero, its entry of largest
    /// magnitude is positive).
    InputSum,
}

/// How one prompt triggers a changed `ffn_down`.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeHit {
    /// The prompt.
    pub prompt: String,
    /// Text of the prompt's last token (where FF2's input x is taken).
    pub last_token: String,
    /// cos(x, v₁), signed by the tensor's [`Orientation`].
    pub cosine: f64,
    /// ‖ΔW·x‖ / ‖x‖.
    pub gain: f64,
    /// gain / σ₁ (1 when x lies along v₁).
    pub relative_gain: f64,
}

/// The leading output direction u₁ scored against the base model's vocabulary.
#[derive(Debug, Clone, Serialize)]
pub struct LensView {
    /// How tokens were scored.
    pub score: LensScore,
    /// Highest-scoring tokens of +u₁, best first.
    pub promotes: Vec<TokenScore>,
    /// Lowest-scoring tokens of +u₁ (the top of −u₁ for an RMSNorm model), lowest first.
    pub suppresses: Vec<TokenScore>,
    /// Where the edit targets named in the `backlens.edits` provenance land among all tokens.
    pub targets: Vec<TargetRank>,
}

/// The place of a provenance target token in a [`LensView`].
#[derive(Debug, Clone, Serialize)]
pub struct TargetRank {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub token: String,
    /// Tokens that score strictly higher (0 = first in `promotes`).
    pub rank: usize,
    /// Its score.
    pub score: f32,
}

/// One changed tensor and its explanation.
#[derive(Debug, Clone, Serialize)]
pub struct TensorChange {
    /// GGUF name.
    pub name: String,
    /// Block index for `blk.{L}.*` tensors.
    pub layer: Option<usize>,
    /// [out, in] of ΔW as analysed (a 1-D tensor of n values is [1, n]).
    pub shape: [usize; 2],
    /// Storage type in the base.
    pub base_type: String,
    /// Storage type in a full patched GGUF.
    pub patch_type: Option<String>,
    /// The LoRA pair, for adapters.
    pub lora: Option<LoraInfo>,
    /// Elements whose value differs (full GGUFs).
    pub changed_elements: Option<u64>,
    /// ‖ΔW‖_F.
    pub frobenius: f64,
    /// Largest |ΔW| entry (full GGUFs).
    pub max_abs: Option<f64>,
    /// Singular values above `rank_tolerance`.
    pub rank: usize,
    /// max(σ₁·[`RANK_REL_TOL`](super::RANK_REL_TOL), [`RANK_ABS_TOL`](super::RANK_ABS_TOL)).
    pub rank_tolerance: f64,
    /// Leading singular values, descending (at most [`MAX_SINGULAR_VALUES`](super::MAX_SINGULAR_VALUES)).
    pub singular_values: Vec<f64>,
    /// σ₁² / Σσ² = σ₁² / ‖ΔW‖_F².
    pub energy_share: f64,
    /// Sign convention of u₁ and v₁.
    pub orientation: Orientation,
    /// u₁ scored against the vocabulary, for residual-writing tensors of model width.
    pub lens: Option<LensView>,
    /// Probe results (changed `ffn_down` tensors only).
    pub probes: Vec<ProbeHit>,
    /// u₁, unit length, output side (not serialized).
    #[serde(skip)]
    pub u1: Vec<f64>,
    /// v₁, unit length, input side (not serialized).
    #[serde(skip)]
    pub v1: Vec<f64>,
}

/// The result of an audit (the `--json` schema; see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Base model path.
    pub base: PathBuf,
    /// Patched model or adapter path.
    pub patch: PathBuf,
    /// Full GGUF or adapter.
    pub kind: PatchKind,
    /// Base architecture.
    pub architecture: String,
    /// `backlens.*` keys of the patch.
    pub provenance: Vec<ProvenanceEntry>,
    /// Whether `backlens.base_sha256` matches the base file (None when absent).
    pub base_sha256_matches: Option<bool>,
    /// Other metadata differences (full GGUFs).
    pub metadata_changes: Vec<MetadataChange>,
    /// Tensors only in the patch.
    pub added_tensors: Vec<TensorEntry>,
    /// Tensors only in the base.
    pub missing_tensors: Vec<TensorEntry>,
    /// Tensors (or LoRA pairs) compared.
    pub compared_tensors: usize,
    /// Changed tensors, in base order.
    pub changed: Vec<TensorChange>,
    /// No difference at all.
    pub identical: bool,
    /// Remarks.
    pub notes: Vec<String>,
}

impl AuditReport {
    /// Names of the changed tensors.
    pub fn changed_names(&self) -> Vec<&str> {
        self.changed.iter().map(|c| c.name.as_str()).collect()
    }

    /// A changed tensor by name.
    pub fn change(&self, name: &str) -> Option<&TensorChange> {
        self.changed.iter().find(|c| c.name == name)
    }
}
