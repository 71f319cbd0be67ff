//! Explain a patch from the files alone: which tensors a patched GGUF or a LoRA adapter changes
//! relative to its base, the numerical rank and leading singular values of each change ΔW, what
//! the leading output direction writes into the vocabulary (through the base model's final norm
//! and unembedding), and how strongly given prompts trigger an FF2 change.
//!
//! Everything is computed from the two files: `backlens.*` provenance keys ([`crate::provenance`])
//! are shown when present but never needed. The singular value decomposition is done here, in f64
//! and deterministically: the Gram matrix of ΔW on its smaller side (ΔW ΔWᵀ or ΔWᵀ ΔW) is
//! diagonalized by Householder tridiagonalization and implicit QR steps with Wilkinson shifts. A
//! LoRA pair ΔW = s·B·A is never made dense: its singular values come from r × r matrices built
//! from the factors.
//!
//! A patch that presents itself as an adapter in any way ([`lora::looks_like_adapter`]) is
//! audited as one only after [`lora::validate`] accepts it against the base; otherwise the audit
//! fails with that error, so an adapter llama.cpp would refuse is never explained as a full GGUF.
//!
//! One job per file: `diff` finds what changed (full GGUFs tensor by tensor, adapters pair by
//! pair), `spectrum` takes each change apart numerically, `explain` reads it through the lens
//! and runs the probes, and `report` holds the types below.
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

mod diff;
mod explain;
mod report;
mod spectrum;

pub use report::{
    AuditReport, Change, LensView, LoraInfo, MetadataChange, Orientation, PatchKind, ProbeHit,
    ProvenanceEntry, TargetRank, TensorChange, TensorEntry,
};

use crate::arch::generic::Shape;
use crate::lora;
use crate::model::Transformer;
use crate::provenance::{self, Provenance};
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::{GgufFile, Value};
use crate::weights::quant::GgmlType;
use crate::{Error, Result};
use serde::Serialize;
use spectrum::{orient_by_input_sum, spectrum, Operator};
use std::path::Path;

/// How many leading singular values a report lists.
pub const MAX_SINGULAR_VALUES: usize = 8;
/// Singular values at or below σ₁ times this do not count toward the numerical rank.
pub const RANK_REL_TOL: f64 = 1e-4;
/// Singular values at or below this absolute floor never count toward the rank.
pub const RANK_ABS_TOL: f64 = 1e-20;
/// Largest Gram side (the smaller dimension of a dense ΔW) the audit diagonalizes.
pub const MAX_GRAM_DIM: usize = 8192;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
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

crate::named_enum!(LensScore, "lens score", [Cosine => "cosine", Logit => "logit", Raw => "raw"]);

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            k: 20,
            probes: Vec::new(),
            score: LensScore::Cosine,
        }
    }
}

/// Audits `patch` (a full patched GGUF or a LoRA adapter GGUF) against `base`.
pub fn audit(base: &Path, patch: &Path, opts: &AuditOptions) -> Result<AuditReport> {
    let base_g = GgufFile::open(base)?;
    if lora::is_adapter(&base_g) {
        return Err(Error::Invalid(format!(
            "{} is a LoRA adapter; the first file must be the base model",
            base.display()
        )));
    }
    let shape = Shape::from_gguf(&base_g)?;
    let source = ModelSource::Gguf(base_g);
    // None for an architecture candle does not implement: no lens, probes through llama.cpp.
    let hp = match source.hparams() {
        Ok(hp) => Some(hp),
        Err(e) if e.is_unknown_arch() => None,
        Err(e) => return Err(e),
    };
    let ModelSource::Gguf(base_g) = &source else {
        unreachable!("opened as GGUF")
    };
    let architecture = base_g.get_str("general.architecture")?.to_string();
    let patch_g = GgufFile::open(patch)?;
    let adapter = match lora::looks_like_adapter(&patch_g) {
        true => Some(lora::validate(base_g, &patch_g)?),
        false => None,
    };
    let kind = match adapter {
        Some(_) => PatchKind::Adapter,
        None => {
            match patch_g.get("general.architecture").and_then(Value::as_str) {
                Some(a) if a == architecture => {}
                Some(a) => {
                    return Err(Error::Invalid(format!(
                        "{} is a '{a}' model, but the base {} is '{architecture}'",
                        patch.display(),
                        base.display()
                    )))
                }
                None => {
                    return Err(Error::Gguf {
                        path: patch.to_path_buf(),
                        problem: "no general.architecture: not a model GGUF".into(),
                    })
                }
            }
            PatchKind::Full
        }
    };
    let mut report = AuditReport {
        base: base.to_path_buf(),
        patch: patch.to_path_buf(),
        kind,
        architecture,
        provenance: provenance::entries(&patch_g)
            .into_iter()
            .map(|(key, value)| ProvenanceEntry {
                key: key.to_string(),
                value: value.to_json(),
            })
            .collect(),
        base_sha256_matches: None,
        metadata_changes: Vec::new(),
        added_tensors: Vec::new(),
        missing_tensors: Vec::new(),
        compared_tensors: 0,
        changed: Vec::new(),
        identical: true,
        notes: Vec::new(),
    };
    if let Some(want) = Provenance::base_sha256_of(&patch_g) {
        report.base_sha256_matches = Some(base_g.sha256_hex() == want);
    }
    let found = match &adapter {
        None => diff::compare_full(base_g, &patch_g, &mut report)?,
        Some(a) => diff::adapter_changes(a, &patch_g, &mut report)?,
    };
    let targets = explain::edit_targets(&patch_g);
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
        .any(|c| writes_residual(&c.name) && c.shape[0] == shape.n_embd);
    if want_probes && kept.is_empty() {
        report
            .notes
            .push("no ffn_down tensor changed: the probes were not run".into());
    }
    if !needs_lens && kept.is_empty() {
        return Ok(report);
    }
    let tok = Tokenizer::from_gguf(base_g)?;
    match &hp {
        // Projections need only the final norm and the unembedding.
        Some(_) if needs_lens => {
            let model = Transformer::load_unembedding(&source)?;
            for c in report.changed.iter_mut() {
                if writes_residual(&c.name) && c.shape[0] == shape.n_embd {
                    explain::explain_with_lens(&model, &tok, c, opts, &targets)?;
                }
            }
        }
        Some(_) => {}
        None => report.notes.push(format!(
            "no vocabulary projection: backlens has no final norm for architecture '{}' (the probes run through llama.cpp)",
            shape.arch
        )),
    }
    if !kept.is_empty() {
        // Probes stream the blocks in candle, or run llama.cpp's own graph where candle lacks
        // the architecture.
        let mut tracer = match hp {
            Some(_) => None,
            None => Some(crate::trace::Tracer::load(base)?),
        };
        let forward = |ids: &[u32], layers: &[usize]| -> Result<Vec<Vec<f32>>> {
            match tracer.as_mut() {
                Some(t) => Ok(t.last_position(ids, layers)?.ff2_in),
                None => Ok(crate::model::streamed_last_position(&source, ids, &[], layers)?.ff2_in),
            }
        };
        explain::run_probes(
            &tok,
            shape.n_layer,
            &opts.probes,
            &kept,
            &mut report,
            forward,
        )?;
    }
    Ok(report)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_roles_and_score_names() {
        assert_eq!(block_layer("blk.22.ffn_down.weight"), Some(22));
        assert_eq!(block_layer("token_embd.weight"), None);
        assert!(writes_residual("blk.3.attn_output.weight") && !is_ff2("blk.3.attn_output.weight"));
        for s in [LensScore::Cosine, LensScore::Logit, LensScore::Raw] {
            assert_eq!(s.to_string().parse::<LensScore>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert!("dot".parse::<LensScore>().is_err());
    }
}
