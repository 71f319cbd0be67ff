//! What a patch changes: a full GGUF compared with its base tensor by tensor (metadata, added and
//! missing tensors, dense differences of the values), or a validated adapter's pairs.

use super::report::{AuditReport, Change, LoraInfo, MetadataChange, TensorEntry};
use super::spectrum::Operator;
use crate::lora::Adapter;
use crate::provenance;
use crate::weights::gguf::{GgufFile, TensorInfo, RELEASE_CHUNK};
use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};

/// Elements dequantized at a time while comparing tensors of different storage.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// A change found by comparing the files, before it is explained.
pub(super) struct Found {
    pub(super) name: String,
    pub(super) base_type: GgmlType,
    pub(super) patch_type: Option<GgmlType>,
    pub(super) lora: Option<LoraInfo>,
    pub(super) changed_elements: Option<u64>,
    pub(super) max_abs: Option<f64>,
    pub(super) op: Operator,
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

/// Compares a full patched GGUF with its base: metadata outside the provenance keys, tensors
/// added or missing, and the values of every tensor in both (its shape must agree).
pub(super) fn compare_full(
    base: &GgufFile,
    patch: &GgufFile,
    report: &mut AuditReport,
) -> Result<Vec<Found>> {
    for (k, v) in &base.metadata {
        if provenance::is_provenance_key(k) {
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
        if !provenance::is_provenance_key(k) && base.get(k).is_none() {
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
    let chunk = RELEASE_CHUNK;
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

/// The pairs of a validated adapter as changes, in the base's tensor order.
pub(super) fn adapter_changes(
    adapter: &Adapter,
    file: &GgufFile,
    report: &mut AuditReport,
) -> Result<Vec<Found>> {
    let mut found = Vec::with_capacity(adapter.pairs.len());
    for p in &adapter.pairs {
        report.compared_tensors += 1;
        if p.base.dims.len() < 2 {
            report.notes.push(format!(
                "{}: llama.cpp loads this pair but applies adapters only to matrix products, so this vector never changes",
                p.name()
            ));
        }
        found.push(Found {
            name: p.name().to_string(),
            base_type: p.base.ggml_type,
            patch_type: None,
            lora: Some(LoraInfo {
                rank: p.rank,
                alpha: adapter.alpha.map(f64::from),
                scale: p.scale,
            }),
            changed_elements: None,
            max_abs: None,
            op: p.factors(file)?.into(),
        });
    }
    for name in &adapter.ignored {
        report.notes.push(format!(
            "{name}: not a LoRA factor; skipped, as llama.cpp skips *_norm.weight tensors in adapters"
        ));
    }
    Ok(found)
}
