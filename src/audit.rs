//! Explain a patch from the files alone: which tensors a patched GGUF or a LoRA adapter changes
//! relative to its base, the numerical rank and leading singular values of each change ΔW, what
//! the leading output direction writes into the vocabulary (through the base model's final norm
//! and unembedding), and how strongly given prompts trigger an FF2 change.
//!
//! Everything is computed from the two files: `backlens.*` provenance keys are shown when present
//! but never needed. The singular value decomposition is done here, in f64 and deterministically:
//! the Gram matrix of ΔW on its smaller side (ΔW ΔWᵀ or ΔWᵀ ΔW) is diagonalized by Householder
//! tridiagonalization and implicit QR steps with Wilkinson shifts. A LoRA pair ΔW = s·B·A is never
//! made dense: its singular values come from r × r matrices built from the factors.
//!
//! # JSON schema (`backlens-patch audit --json`)
//!
//! The report is an [`AuditReport`] object:
//!
//! - `base`, `patch`: the two paths as given.
//! - `kind`: `"full"` (a complete GGUF) or `"adapter"` (a LoRA adapter GGUF).
//! - `architecture`: the base's `general.architecture`.
//! - `provenance`: `[{key, value}]`, every `backlens.*` metadata key of the patch in file order
//!   (value as JSON: string, number, bool or array); empty when the patch has none.
//! - `base_sha256_matches`: whether `backlens.base_sha256` equals the sha256 of the base file;
//!   `null` when the key is absent.
//! - `metadata_changes`: `[{key, change, base, patch}]` for full GGUFs, keys outside `backlens.*`
//!   that were `"added"`, `"removed"` or `"changed"`, with short renderings of both values.
//! - `added_tensors`, `missing_tensors`: `[{name, type, shape}]` tensors only in the patch, or
//!   only in the base (full GGUFs).
//! - `compared_tensors`: tensors present in both (full) or LoRA pairs read (adapter).
//! - `changed`: one [`TensorChange`] per tensor whose values differ, in the base's tensor order:
//!   `name`, `layer` (block index or null), `shape` `[out, in]` (row-major, as analysed),
//!   `base_type`, `patch_type` (full only, else null), `lora` (`{rank, alpha, scale}`, adapter
//!   only), `changed_elements` (full only), `frobenius` ‖ΔW‖_F, `max_abs` (full only), `rank`,
//!   `rank_tolerance`, `singular_values` (leading, at most 8, descending), `energy_share`
//!   σ₁²/Σσ², `orientation` (`"lens"` or `"input_sum"`, see [`Orientation`]), `lens` (null, or
//!   for `ffn_down`/`attn_output` of model width `{score, promotes, suppresses, targets}`:
//!   `score` is `"cosine"`, `"logit"` or `"raw"` ([`LensScore`]), `promotes`/`suppresses` are
//!   lists of `{id, token, score}`, `targets` lists `{id, token, rank, score}` for the target
//!   tokens named in `backlens.edits`), and `probes`
//!   (`[{prompt, last_token, cosine, gain, relative_gain}]`).
//! - `identical`: true when no tensor changed, none was added or removed, and (full GGUFs) no
//!   metadata outside `backlens.*` changed.
//! - `notes`: plain-language remarks (types that changed without a value change, zero LoRA
//!   pairs, ...).

use crate::lens::{self, TokenScore};
use crate::model::Transformer;
use crate::numeric::{axpy, dot, norm2, rank_of, symmetric_eigen, unit};
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::{GgufFile, TensorInfo, Value};
use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How many leading singular values a report lists.
pub const MAX_SINGULAR_VALUES: usize = 8;
/// Singular values at or below σ₁ times this do not count toward the numerical rank.
pub const RANK_REL_TOL: f64 = 1e-4;
/// Singular values at or below this absolute floor never count toward the rank.
pub const RANK_ABS_TOL: f64 = 1e-20;
/// Largest Gram side (the smaller dimension of a dense ΔW) the audit diagonalizes.
pub const MAX_GRAM_DIM: usize = 8192;
/// Elements dequantized at a time while comparing tensors of different storage.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// Options of an audit.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Tokens per promotes/suppresses list.
    pub k: usize,
    /// Prompts whose FF2 input at their last token is tested against each changed `ffn_down`.
    pub probes: Vec<String>,
    /// How u₁ is scored against the vocabulary.
    pub score: LensScore,
}

/// How the leading output direction u₁ is scored against each token of the base vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LensScore {
    /// The logit lens: final norm, then the dot product with each unembedding row (the logit
    /// change u₁ would cause if it reached the output unchanged). Favors tokens whose
    /// unembedding rows are long: on SmolLM2 a few code tokens ("<filename>", " noqa") top the
    /// list for almost any direction.
    Logit,
    /// The dot product with each unembedding row, without the final norm.
    Raw,
    /// Cosine between the normed u₁ and each unembedding row: which tokens' directions u₁ is
    /// closest to, independent of how long their rows are (the default).
    #[default]
    Cosine,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            k: 20,
            probes: Vec::new(),
            score: LensScore::Cosine,
        }
    }
}

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
    /// max(σ₁·[`RANK_REL_TOL`], [`RANK_ABS_TOL`]).
    pub rank_tolerance: f64,
    /// Leading singular values, descending (at most [`MAX_SINGULAR_VALUES`]).
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

/// ΔW of one tensor, dense or as LoRA factors.
enum Operator {
    /// Row-major (m, n).
    Dense { m: usize, n: usize, w: Vec<f64> },
    /// scale · B·A with B (m, r) and A (r, n), both row-major.
    LowRank {
        m: usize,
        n: usize,
        r: usize,
        b: Vec<f64>,
        a: Vec<f64>,
        scale: f64,
    },
}

impl Operator {
    fn dims(&self) -> (usize, usize) {
        match *self {
            Operator::Dense { m, n, .. } | Operator::LowRank { m, n, .. } => (m, n),
        }
    }

    /// ΔW·x.
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        match self {
            Operator::Dense { n, w, .. } => w.chunks_exact(*n).map(|row| dot(row, x)).collect(),
            Operator::LowRank {
                r, b, a, scale, n, ..
            } => {
                let ax: Vec<f64> = a.chunks_exact(*n).map(|row| scale * dot(row, x)).collect();
                b.chunks_exact(*r).map(|row| dot(row, &ax)).collect()
            }
        }
    }

    /// ΔWᵀ·y.
    fn apply_t(&self, y: &[f64]) -> Vec<f64> {
        match self {
            Operator::Dense { n, w, .. } => {
                let mut out = vec![0.0; *n];
                for (row, &yi) in w.chunks_exact(*n).zip(y) {
                    axpy(&mut out, yi, row);
                }
                out
            }
            Operator::LowRank {
                n, r, b, a, scale, ..
            } => {
                let mut by = vec![0.0; *r];
                for (row, &yi) in b.chunks_exact(*r).zip(y) {
                    axpy(&mut by, yi * scale, row);
                }
                let mut out = vec![0.0; *n];
                for (row, &c) in a.chunks_exact(*n).zip(&by) {
                    axpy(&mut out, c, row);
                }
                out
            }
        }
    }
}

/// A change found by comparing the files, before it is explained.
struct Found {
    name: String,
    base_type: GgmlType,
    patch_type: Option<GgmlType>,
    lora: Option<LoraInfo>,
    changed_elements: Option<u64>,
    max_abs: Option<f64>,
    op: Operator,
}

/// Leading singular triplet and spectrum of a ΔW.
#[derive(Debug, Clone)]
struct Spectrum {
    /// All singular values the method yields, descending.
    sigma: Vec<f64>,
    /// ‖ΔW‖_F².
    energy: f64,
    /// Unit u₁ (empty when ΔW = 0).
    u1: Vec<f64>,
    /// Unit v₁ (empty when ΔW = 0).
    v1: Vec<f64>,
}

/// Audits `patch` (a full patched GGUF or a LoRA adapter GGUF) against `base`.
pub fn audit(base: &Path, patch: &Path, opts: &AuditOptions) -> Result<AuditReport> {
    let base_g = GgufFile::open(base)?;
    if is_adapter(&base_g) {
        return Err(Error::Invalid(format!(
            "{} is a LoRA adapter; the first file must be the base model",
            base.display()
        )));
    }
    let source = ModelSource::Gguf(base_g);
    let hp = source.hparams()?;
    let ModelSource::Gguf(base_g) = &source else {
        unreachable!("opened as GGUF")
    };
    let architecture = base_g.get_str("general.architecture")?.to_string();
    let patch_g = GgufFile::open(patch)?;
    let kind = match is_adapter(&patch_g) {
        true => PatchKind::Adapter,
        false => PatchKind::Full,
    };
    match patch_g.get("general.architecture").and_then(Value::as_str) {
        Some(a) if a == architecture => {}
        Some(a) => {
            return Err(Error::Invalid(format!(
                "{} is a '{a}' {}, but the base {} is '{architecture}'",
                patch.display(),
                match kind {
                    PatchKind::Adapter => "adapter",
                    PatchKind::Full => "model",
                },
                base.display()
            )))
        }
        None if kind == PatchKind::Full => {
            return Err(Error::Gguf {
                path: patch.to_path_buf(),
                problem: "no general.architecture: not a model GGUF".into(),
            })
        }
        None => {}
    }
    let mut report = AuditReport {
        base: base.to_path_buf(),
        patch: patch.to_path_buf(),
        kind,
        architecture,
        provenance: provenance(&patch_g),
        base_sha256_matches: None,
        metadata_changes: Vec::new(),
        added_tensors: Vec::new(),
        missing_tensors: Vec::new(),
        compared_tensors: 0,
        changed: Vec::new(),
        identical: true,
        notes: Vec::new(),
    };
    if let Some(want) = patch_g.get("backlens.base_sha256").and_then(Value::as_str) {
        report.base_sha256_matches = Some(base_g.sha256_hex() == want);
    }
    let found = match kind {
        PatchKind::Full => compare_full(base_g, &patch_g, &mut report)?,
        PatchKind::Adapter => read_adapter(base_g, &patch_g, &mut report)?,
    };
    drop(patch_g);

    // Spectra first; keep the operator only where probes will need it.
    let want_probes = !opts.probes.is_empty();
    let mut kept: Vec<(usize, Operator)> = Vec::new();
    for f in found {
        let spec = spectrum(&f.op, &f.name)?;
        let sigma1 = spec.sigma.first().copied().unwrap_or(0.0);
        if sigma1 <= RANK_ABS_TOL {
            report.notes.push(format!(
                "{}: the change is exactly zero (no effect)",
                f.name
            ));
            continue;
        }
        let tol = (sigma1 * RANK_REL_TOL).max(RANK_ABS_TOL);
        let (m, n) = f.op.dims();
        let (mut u1, mut v1) = (spec.u1, spec.v1);
        orient_by_input_sum(&mut u1, &mut v1);
        let change = TensorChange {
            layer: block_layer(&f.name),
            shape: [m, n],
            base_type: f.base_type.name(),
            patch_type: f.patch_type.map(GgmlType::name),
            lora: f.lora,
            changed_elements: f.changed_elements,
            frobenius: spec.energy.sqrt(),
            max_abs: f.max_abs,
            rank: spec.sigma.iter().filter(|&&s| s > tol).count(),
            rank_tolerance: tol,
            singular_values: spec
                .sigma
                .iter()
                .take(MAX_SINGULAR_VALUES)
                .copied()
                .collect(),
            energy_share: sigma1 * sigma1 / spec.energy,
            orientation: Orientation::InputSum,
            lens: None,
            probes: Vec::new(),
            u1,
            v1,
            name: f.name,
        };
        if want_probes && is_ff2(&change.name) {
            kept.push((report.changed.len(), f.op));
        }
        report.changed.push(change);
    }
    report.identical = report.changed.is_empty()
        && report.added_tensors.is_empty()
        && report.missing_tensors.is_empty()
        && report.metadata_changes.is_empty();

    let needs_lens = report
        .changed
        .iter()
        .any(|c| writes_residual(&c.name) && c.shape[0] == hp.n_embd);
    if want_probes && kept.is_empty() {
        report
            .notes
            .push("no ffn_down tensor changed: the probes were not run".into());
    }
    if !needs_lens && kept.is_empty() {
        return Ok(report);
    }
    // Projections need only the final norm and the unembedding; probes stream the blocks.
    let model = Transformer::load_unembedding(&source)?;
    let tok = Tokenizer::from_gguf(base_g)?;
    let targets = provenance_targets(&report.provenance);
    for c in report.changed.iter_mut() {
        if writes_residual(&c.name) && c.shape[0] == hp.n_embd {
            explain_with_lens(&model, &tok, c, opts, &targets)?;
        }
    }
    if !kept.is_empty() {
        run_probes(&source, &tok, &opts.probes, &kept, &mut report)?;
    }
    Ok(report)
}

fn is_adapter(g: &GgufFile) -> bool {
    g.get("general.type").and_then(Value::as_str) == Some("adapter")
}

/// Whether a tensor is an FF2 (down-projection) weight.
fn is_ff2(name: &str) -> bool {
    name.starts_with("blk.") && name.ends_with(".ffn_down.weight")
}

/// Whether a tensor's output side is the residual stream.
fn writes_residual(name: &str) -> bool {
    is_ff2(name) || (name.starts_with("blk.") && name.ends_with(".attn_output.weight"))
}

/// The block index of `blk.{L}.…`.
fn block_layer(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::String(s) => J::String(s.clone()),
        Value::Bool(b) => J::Bool(*b),
        Value::Array(_, items) => J::Array(items.iter().map(value_json).collect()),
        Value::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::I8(x) => J::from(*x),
        Value::I16(x) => J::from(*x),
        Value::I32(x) => J::from(*x),
        Value::I64(x) => J::from(*x),
        other => other.as_u64().map_or(J::Null, J::from),
    }
}

fn provenance(g: &GgufFile) -> Vec<ProvenanceEntry> {
    g.metadata
        .iter()
        .filter(|(k, _)| k.starts_with("backlens."))
        .map(|(k, v)| ProvenanceEntry {
            key: k.clone(),
            value: value_json(v),
        })
        .collect()
}

fn entry(t: &TensorInfo) -> TensorEntry {
    TensorEntry {
        name: t.name.clone(),
        ggml_type: t.ggml_type.name(),
        shape: t.shape(),
    }
}

/// Analysed (out, in) of a tensor: ne[0] is the input side, the rest is flattened into rows.
fn matrix_dims(t: &TensorInfo) -> (usize, usize) {
    let n = t.dims.first().copied().unwrap_or(1) as usize;
    let m = t.dims.iter().skip(1).product::<u64>() as usize;
    (m, n)
}

fn compare_full(base: &GgufFile, patch: &GgufFile, report: &mut AuditReport) -> Result<Vec<Found>> {
    for (k, v) in &base.metadata {
        if k.starts_with("backlens.") {
            continue;
        }
        match patch.get(k) {
            None => report.metadata_changes.push(MetadataChange {
                key: k.clone(),
                change: Change::Removed,
                base: Some(v.summary()),
                patch: None,
            }),
            Some(p) if p != v => report.metadata_changes.push(MetadataChange {
                key: k.clone(),
                change: Change::Changed,
                base: Some(v.summary()),
                patch: Some(p.summary()),
            }),
            Some(_) => {}
        }
    }
    for (k, v) in &patch.metadata {
        if !k.starts_with("backlens.") && base.get(k).is_none() {
            report.metadata_changes.push(MetadataChange {
                key: k.clone(),
                change: Change::Added,
                base: None,
                patch: Some(v.summary()),
            });
        }
    }
    // Shapes first, so that a file of another model fails before any value is compared.
    for bt in &base.tensors {
        match patch.tensor(&bt.name) {
            Some(pt) if pt.dims != bt.dims => {
                return Err(Error::Gguf {
                    path: patch.path().to_path_buf(),
                    problem: format!(
                        "tensor '{}' has shape {:?} here but {:?} in the base {}: not a patch of this base",
                        bt.name,
                        pt.shape(),
                        bt.shape(),
                        base.path().display()
                    ),
                })
            }
            Some(_) => {}
            None => report.missing_tensors.push(entry(bt)),
        }
    }
    report.added_tensors = patch
        .tensors
        .iter()
        .filter(|t| base.tensor(&t.name).is_none())
        .map(entry)
        .collect();
    let mut found = Vec::new();
    for bt in &base.tensors {
        let Some(pt) = patch.tensor(&bt.name) else {
            continue;
        };
        report.compared_tensors += 1;
        let (bb, pb) = (base.tensor_bytes(bt), patch.tensor_bytes(pt));
        if bt.ggml_type == pt.ggml_type && same_bytes(base, bb, patch, pb) {
            continue;
        }
        match dense_diff(bt, bb, pt, pb)? {
            Some((w, changed, max_abs)) => {
                let (m, n) = matrix_dims(bt);
                found.push(Found {
                    name: bt.name.clone(),
                    base_type: bt.ggml_type,
                    patch_type: Some(pt.ggml_type),
                    lora: None,
                    changed_elements: Some(changed),
                    max_abs: Some(max_abs),
                    op: Operator::Dense { m, n, w },
                });
            }
            None if bt.ggml_type != pt.ggml_type => report.notes.push(format!(
                "{}: stored as {} instead of {}, with identical values",
                bt.name,
                pt.ggml_type.name(),
                bt.ggml_type.name()
            )),
            None => report.notes.push(format!(
                "{}: bytes differ but the values are identical",
                bt.name
            )),
        }
    }
    Ok(found)
}

/// Whether two tensors' bytes are equal, compared a chunk at a time with each chunk's pages
/// released afterwards (so that comparing two big files keeps little resident).
fn same_bytes(base: &GgufFile, a: &[u8], patch: &GgufFile, b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let chunk = crate::weights::gguf::RELEASE_CHUNK;
    a.chunks(chunk).zip(b.chunks(chunk)).all(|(x, y)| {
        let same = x == y;
        base.release(x);
        patch.release(y);
        same
    })
}

/// patch − base as f64, row-major, when any value differs: (ΔW, changed elements, max |ΔW|).
/// Dequantizes whole rows a chunk at a time; ΔW is allocated only once a difference is seen.
fn dense_diff(
    bt: &TensorInfo,
    bb: &[u8],
    pt: &TensorInfo,
    pb: &[u8],
) -> Result<Option<(Vec<f64>, u64, f64)>> {
    let row_len = bt.dims.first().copied().unwrap_or(1);
    let rows = (bt.n_elements() / row_len.max(1)) as usize;
    let row_len = row_len as usize;
    let row_bytes = |t: &TensorInfo| t.ggml_type.bytes_for(row_len as u64).unwrap_or(0) as usize;
    let (brow, prow) = (row_bytes(bt), row_bytes(pt));
    let chunk_rows = (CHUNK_ELEMENTS / row_len.max(1)).max(1);
    let mut out: Option<Vec<f64>> = None;
    let (mut changed, mut max_abs) = (0u64, 0f64);
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + chunk_rows).min(rows);
        let b = quant::dequantize(bt.ggml_type, &bb[r0 * brow..r1 * brow], &bt.name)?;
        let p = quant::dequantize(pt.ggml_type, &pb[r0 * prow..r1 * prow], &pt.name)?;
        for (i, (&x, &y)) in b.iter().zip(&p).enumerate() {
            let d = f64::from(y) - f64::from(x);
            if d == 0.0 {
                continue;
            }
            if !d.is_finite() {
                return Err(Error::Invalid(format!(
                    "tensor '{}': non-finite value at element {} (base {x}, patch {y})",
                    bt.name,
                    r0 * row_len + i
                )));
            }
            let w = out.get_or_insert_with(|| vec![0.0; rows * row_len]);
            w[r0 * row_len + i] = d;
            changed += 1;
            max_abs = max_abs.max(d.abs());
        }
        r0 = r1;
    }
    Ok(out.map(|w| (w, changed, max_abs)))
}

fn read_adapter(base: &GgufFile, patch: &GgufFile, report: &mut AuditReport) -> Result<Vec<Found>> {
    let bad = |problem: String| Error::Gguf {
        path: patch.path().to_path_buf(),
        problem,
    };
    match patch.get("adapter.type").and_then(Value::as_str) {
        Some("lora") | None => {}
        Some(other) => {
            return Err(bad(format!(
                "adapter.type is '{other}'; only LoRA adapters can be audited"
            )))
        }
    }
    let alpha = patch
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64().or_else(|| v.as_u64().map(|u| u as f64)));
    let mut pairs: Vec<(&str, Option<&TensorInfo>, Option<&TensorInfo>)> = Vec::new();
    for t in &patch.tensors {
        let (stem, is_a) = if let Some(s) = t.name.strip_suffix(".lora_a") {
            (s, true)
        } else if let Some(s) = t.name.strip_suffix(".lora_b") {
            (s, false)
        } else {
            return Err(bad(format!(
                "tensor '{}' is neither a .lora_a nor a .lora_b factor",
                t.name
            )));
        };
        let idx = match pairs.iter().position(|p| p.0 == stem) {
            Some(i) => i,
            None => {
                pairs.push((stem, None, None));
                pairs.len() - 1
            }
        };
        match is_a {
            true => pairs[idx].1 = Some(t),
            false => pairs[idx].2 = Some(t),
        }
    }
    // Report in the base's tensor order.
    let order = |name: &str| base.tensors.iter().position(|t| t.name == name);
    pairs.sort_by_key(|p| order(p.0).unwrap_or(usize::MAX));
    let mut found = Vec::new();
    for (stem, a, b) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!(
                "'{stem}' has only one of its two factors (.lora_a, .lora_b)"
            )));
        };
        let w = base.tensor(stem).ok_or_else(|| {
            bad(format!(
                "adapts '{stem}', which the base {} does not have",
                base.path().display()
            ))
        })?;
        let fits = w.dims.len() == 2
            && a.dims.len() == 2
            && b.dims.len() == 2
            && a.dims[0] == w.dims[0]
            && b.dims[1] == w.dims[1]
            && a.dims[1] == b.dims[0]
            && a.dims[1] > 0;
        if !fits {
            return Err(bad(format!(
                "'{stem}': lora_a {:?} and lora_b {:?} do not fit the base tensor {:?} (ggml dims)",
                a.dims, b.dims, w.dims
            )));
        }
        report.compared_tensors += 1;
        let (n, m, r) = (w.dims[0] as usize, w.dims[1] as usize, a.dims[1] as usize);
        let to_f64 = |t: &TensorInfo| -> Result<Vec<f64>> {
            let v = quant::dequantize(t.ggml_type, patch.tensor_bytes(t), &t.name)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("tensor '{}' holds non-finite values", t.name)));
            }
            Ok(v.into_iter().map(f64::from).collect())
        };
        let scale = match alpha {
            Some(al) if al != 0.0 => al / r as f64,
            _ => 1.0,
        };
        found.push(Found {
            name: stem.to_string(),
            base_type: w.ggml_type,
            patch_type: None,
            lora: Some(LoraInfo {
                rank: r,
                alpha,
                scale,
            }),
            changed_elements: None,
            max_abs: None,
            op: Operator::LowRank {
                m,
                n,
                r,
                b: to_f64(b)?,
                a: to_f64(a)?,
                scale,
            },
        });
    }
    Ok(found)
}

/// Singular values and the leading singular pair of ΔW.
fn spectrum(op: &Operator, name: &str) -> Result<Spectrum> {
    match op {
        Operator::Dense { m, n, w } => dense_spectrum(*m, *n, w, op, name),
        Operator::LowRank {
            m,
            r,
            b,
            a,
            scale,
            n,
        } => {
            // A·Aᵀ = Q Λ Qᵀ, L = Q Λ^½, C = s·B·L: then ΔW ΔWᵀ = C Cᵀ, whose non-zero spectrum is
            // that of the r × r matrix CᵀC.
            let (r, m, n) = (*r, *m, *n);
            let mut gram_a = vec![0.0; r * r];
            for i in 0..r {
                for j in 0..=i {
                    let v = dot(&a[i * n..(i + 1) * n], &a[j * n..(j + 1) * n]);
                    gram_a[i * r + j] = v;
                    gram_a[j * r + i] = v;
                }
            }
            let (lam, q) = symmetric_eigen(gram_a, r)?;
            // L[i][k] = Q[i][k] · sqrt(λ_k), with eigenvector k = q[k].
            let mut l = vec![0.0; r * r];
            for (k, (&lk, qk)) in lam.iter().zip(&q).enumerate() {
                let s = lk.max(0.0).sqrt();
                for i in 0..r {
                    l[i * r + k] = qk[i] * s;
                }
            }
            let mut c = vec![0.0; m * r];
            for o in 0..m {
                let brow = &b[o * r..(o + 1) * r];
                for k in 0..r {
                    c[o * r + k] = scale * (0..r).map(|i| brow[i] * l[i * r + k]).sum::<f64>();
                }
            }
            let mut h = vec![0.0; r * r];
            for o in 0..m {
                let row = &c[o * r..(o + 1) * r];
                for i in 0..r {
                    for j in 0..=i {
                        h[i * r + j] += row[i] * row[j];
                    }
                }
            }
            for i in 0..r {
                for j in 0..i {
                    h[j * r + i] = h[i * r + j];
                }
            }
            let energy: f64 = (0..r).map(|i| h[i * r + i]).sum();
            let (mu, wv) = symmetric_eigen(h, r)?;
            let sigma: Vec<f64> = mu.iter().map(|&x| x.max(0.0).sqrt()).collect();
            let s1 = sigma[0];
            if s1 <= RANK_ABS_TOL {
                return Ok(Spectrum {
                    sigma,
                    energy,
                    u1: Vec::new(),
                    v1: Vec::new(),
                });
            }
            let u1: Vec<f64> = c.chunks_exact(r).map(|row| dot(row, &wv[0]) / s1).collect();
            let v1: Vec<f64> = op.apply_t(&u1).into_iter().map(|x| x / s1).collect();
            Ok(Spectrum {
                sigma,
                energy,
                u1: unit(u1),
                v1: unit(v1),
            })
        }
    }
}

fn dense_spectrum(m: usize, n: usize, w: &[f64], op: &Operator, name: &str) -> Result<Spectrum> {
    let side = m.min(n);
    if side > MAX_GRAM_DIM {
        return Err(Error::Invalid(format!(
            "tensor '{name}': a dense change of {m} × {n} is too large to audit (smaller side above {MAX_GRAM_DIM})"
        )));
    }
    let energy: f64 = w.iter().map(|x| x * x).sum();
    let t = Tensor::from_slice(w, (m, n), &Device::Cpu)?;
    let gram = match m <= n {
        true => t.matmul(&t.t()?)?,
        false => t.t()?.matmul(&t)?,
    };
    let gram: Vec<f64> = gram.flatten_all()?.to_vec1()?;
    let (lam, vecs) = symmetric_eigen(gram, side)?;
    let sigma: Vec<f64> = lam.iter().map(|&x| x.max(0.0).sqrt()).collect();
    let s1 = sigma[0];
    if s1 <= RANK_ABS_TOL {
        return Ok(Spectrum {
            sigma,
            energy,
            u1: Vec::new(),
            v1: Vec::new(),
        });
    }
    let (u1, v1) = match m <= n {
        true => {
            let u = vecs[0].clone();
            let v = op.apply_t(&u);
            (u, v)
        }
        false => {
            let v = vecs[0].clone();
            let u = op.apply(&v);
            (u, v)
        }
    };
    Ok(Spectrum {
        sigma,
        energy,
        u1: unit(u1),
        v1: unit(v1),
    })
}

/// The [`Orientation::InputSum`] sign: v₁ sums positive; on a zero sum, its largest entry is
/// positive. u₁ flips along so that ΔW·v₁ = σ₁u₁ still holds.
fn orient_by_input_sum(u: &mut [f64], v: &mut [f64]) {
    let sum: f64 = v.iter().sum();
    let l1: f64 = v.iter().map(|x| x.abs()).sum();
    let positive = if sum.abs() > 1e-12 * l1 {
        sum > 0.0
    } else {
        v.iter().copied().fold(
            0.0f64,
            |best, x| if x.abs() > best.abs() { x } else { best },
        ) >= 0.0
    };
    if !positive {
        u.iter_mut().for_each(|x| *x = -*x);
        v.iter_mut().for_each(|x| *x = -*x);
    }
}

/// Scores ±u₁ against the vocabulary ([`LensScore`]), orients the pair by
/// [`Orientation::Lens`] and fills in the promotes/suppresses lists and the target ranks.
fn explain_with_lens(
    model: &Transformer,
    tok: &Tokenizer,
    c: &mut TensorChange,
    opts: &AuditOptions,
    targets: &[u32],
) -> Result<()> {
    let plus: Vec<f32> = c.u1.iter().map(|&x| x as f32).collect();
    let minus: Vec<f32> = plus.iter().map(|x| -x).collect();
    let d = plus.len();
    let rows = Tensor::from_vec([plus, minus].concat(), (2, d), &Device::Cpu)?;
    let mut scores = lens::project_rows(model, &rows, opts.score != LensScore::Raw)?;
    if opts.score == LensScore::Cosine {
        let normed = model.out_norm.forward(&rows.to_dtype(model.dtype())?)?;
        let row_norms: Vec<f32> = normed
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let vocab_norms: Vec<f32> = model
            .output
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for (row, rn) in scores.iter_mut().zip(row_norms) {
            for (s, vn) in row.iter_mut().zip(&vocab_norms) {
                *s = if rn > 0.0 && *vn > 0.0 {
                    *s / (rn * vn)
                } else {
                    0.0
                };
            }
        }
    }
    let top = |s: &[f32]| s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let flip = top(&scores[1]) > top(&scores[0]);
    if flip {
        c.u1.iter_mut().for_each(|x| *x = -*x);
        c.v1.iter_mut().for_each(|x| *x = -*x);
    }
    let chosen = &scores[usize::from(flip)];
    let p = lens::summarize(chosen, 0, opts.k.max(1), tok);
    c.orientation = Orientation::Lens;
    c.lens = Some(LensView {
        score: opts.score,
        promotes: p.top,
        suppresses: p.bottom,
        targets: targets
            .iter()
            .filter(|&&id| (id as usize) < chosen.len())
            .map(|&id| TargetRank {
                id,
                token: tok.token_text(id),
                rank: rank_of(chosen, id),
                score: chosen[id as usize],
            })
            .collect(),
    });
    Ok(())
}

/// Target token ids named in a `backlens.edits` provenance entry (edits not skipped).
fn provenance_targets(provenance: &[ProvenanceEntry]) -> Vec<u32> {
    let Some(edits) = provenance.iter().find(|p| p.key == "backlens.edits") else {
        return Vec::new();
    };
    let parsed: serde_json::Value = match &edits.value {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or_default(),
        v => v.clone(),
    };
    let mut ids: Vec<u32> = parsed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.get("skipped").and_then(serde_json::Value::as_bool) != Some(true))
        .filter_map(|e| e.get("target_id")?.as_u64())
        .filter_map(|id| u32::try_from(id).ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn run_probes(
    source: &ModelSource,
    tok: &Tokenizer,
    prompts: &[String],
    kept: &[(usize, Operator)],
    report: &mut AuditReport,
) -> Result<()> {
    let n_layer = source.hparams()?.n_layer;
    let layers: Vec<usize> = kept
        .iter()
        .filter_map(|(idx, _)| report.changed[*idx].layer)
        .filter(|&l| l < n_layer)
        .collect();
    for prompt in prompts {
        let ids = tok.encode_prompt(prompt)?;
        let pass = crate::model::streamed_last_position(source, &ids, &[], &layers)?;
        let last_token = tok.token_text(ids[ids.len() - 1]);
        for (idx, op) in kept {
            let c = &mut report.changed[*idx];
            let Some(slot) = c.layer.and_then(|l| layers.iter().position(|&x| x == l)) else {
                continue;
            };
            let x: Vec<f64> = pass.ff2_in[slot].iter().map(|&v| f64::from(v)).collect();
            if x.len() != c.shape[1] {
                continue;
            }
            let nx = norm2(&x);
            let sigma1 = c.singular_values[0];
            let (cosine, gain) = match nx > 0.0 {
                true => (dot(&x, &c.v1) / nx, norm2(&op.apply(&x)) / nx),
                false => (0.0, 0.0),
            };
            c.probes.push(ProbeHit {
                prompt: prompt.clone(),
                last_token: last_token.clone(),
                cosine,
                gain,
                relative_gain: gain / sigma1,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers in [−1, 1).
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn dense_and_factored_spectra_agree() {
        let mut seed = 11;
        let (m, n, r) = (12, 30, 3);
        let b: Vec<f64> = (0..m * r).map(|_| lcg(&mut seed)).collect();
        let a: Vec<f64> = (0..r * n).map(|_| lcg(&mut seed)).collect();
        let scale = 0.5;
        let low = Operator::LowRank {
            m,
            n,
            r,
            b: b.clone(),
            a: a.clone(),
            scale,
        };
        let mut w = vec![0.0; m * n];
        for o in 0..m {
            for j in 0..n {
                w[o * n + j] = scale * (0..r).map(|i| b[o * r + i] * a[i * n + j]).sum::<f64>();
            }
        }
        let dense = Operator::Dense { m, n, w: w.clone() };
        let sl = spectrum(&low, "x").unwrap();
        let sd = spectrum(&dense, "x").unwrap();
        assert_eq!(sl.sigma.len(), r);
        for i in 0..r {
            assert!((sl.sigma[i] - sd.sigma[i]).abs() < 1e-10 * sd.sigma[0]);
        }
        assert!(sd.sigma[r] < 1e-7 * sd.sigma[0]);
        assert!((sl.energy - sd.energy).abs() < 1e-10 * sd.energy);
        // ΔW v₁ = σ₁ u₁ for both, and the pairs agree up to sign.
        for s in [&sl, &sd] {
            let wv = dense.apply(&s.v1);
            for (x, y) in wv.iter().zip(&s.u1) {
                assert!((x - s.sigma[0] * y).abs() < 1e-9);
            }
        }
        assert!((dot(&sl.u1, &sd.u1).abs() - 1.0).abs() < 1e-9);
        // Tall matrices go through ΔWᵀΔW.
        let mut wt = vec![0.0; n * m];
        for o in 0..m {
            for j in 0..n {
                wt[j * m + o] = w[o * n + j];
            }
        }
        let st = spectrum(&Operator::Dense { m: n, n: m, w: wt }, "t").unwrap();
        assert!((st.sigma[0] - sd.sigma[0]).abs() < 1e-10 * sd.sigma[0]);
        assert!((dot(&st.u1, &sd.v1).abs() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn orientation_rule() {
        let mut u = vec![1.0, 2.0];
        let mut v = vec![-1.0, 0.5];
        orient_by_input_sum(&mut u, &mut v);
        assert_eq!((u, v), (vec![-1.0, -2.0], vec![1.0, -0.5]));
        let mut u = vec![1.0];
        let mut v = vec![0.5, -0.5, -0.9, 0.9];
        orient_by_input_sum(&mut u, &mut v);
        assert_eq!(u, vec![-1.0]);
        assert_eq!(block_layer("blk.22.ffn_down.weight"), Some(22));
        assert_eq!(block_layer("token_embd.weight"), None);
    }
}
