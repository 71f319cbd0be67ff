//! Many edits solved jointly (`--method batch`), MEMIT-style least squares on one layer's FF2.
//!
//! For the edit keys K = [x₁ … x_m] (FF2 inputs at the last token of each edit prompt, on the
//! unedited model) and the desired output changes R = [r₁ … r_m] (by default the smallest value
//! that makes request i's target top-1 by a margin, [`super::minimal`]; or what
//! plain FPS writes at its own key, lr·eᵢxᵢᵀ·xᵢ = lr·‖xᵢ‖²·eᵢ), the update is the smallest change in the
//! metric of the FF2-input second moment C (the `shift-whitened` statistics) that writes R at K:
//!
//! ```text
//! ΔW = argmin ‖ΔW K − R‖² · (1/ρ) + tr(ΔW C ΔWᵀ)
//!    = R (ρ·s·I + Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹,      s = mean diagonal of Kᵀ C⁻¹ K,
//! ```
//!
//! the closed form of MEMIT's ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (Woodbury) with the ridge ρ relative to
//! the keys' own scale. For one key it is exactly `shift-whitened` without contrast (k·x = 1),
//! for ρ → 0 every key receives exactly its rᵢ, and the written change is as small as possible on
//! everything else C has seen (generic text), which is what protects unrelated prompts when
//! hundreds of edits share one matrix. The result is one rank-one term per edited request,
//! ΔW = Σᵢ r'ᵢ zᵢᵀ with zᵢ = C⁻¹xᵢ and R' = R (ρ·s·I + KᵀZ)⁻¹, so a LoRA adapter of rank m
//! carries it exactly.

use super::minimal::{self, ValueRule};
use super::whiten::KeyStats;
use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::numeric::{cholesky_in_place, cholesky_solve, dot};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Default ridge ρ, relative to the mean diagonal of KᵀC⁻¹K.
pub const DEFAULT_RIDGE: f64 = 1e-3;

/// Computes the joint edit of `requests` at `layer` on the unedited `model` (unchanged), each
/// key receiving the value of `rule` (FPS's with step `lr`, or the smallest that flips): one
/// outcome per request, skipped when the target already is the top-1,
/// else holding its rank-one share of ΔW. Requests that edit the same prompt toward different
/// targets are refused (a joint solve cannot satisfy both). The values are searched on up to
/// `threads` threads (the result does not depend on how many).
#[allow(clippy::too_many_arguments)]
pub fn compute_all(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    stats: &KeyStats,
    ridge: f64,
    rule: ValueRule,
    threads: usize,
) -> Result<Vec<EditOutcome>> {
    if stats.layer != layer || stats.n != model.hp.n_ff {
        return Err(Error::Invalid(format!(
            "key statistics are for layer {} (width {}), the edit is at layer {layer} (width {})",
            stats.layer, stats.n, model.hp.n_ff
        )));
    }
    if !(ridge.is_finite() && ridge >= 0.0) {
        return Err(Error::Invalid(format!(
            "the batch ridge must be ≥ 0, got {ridge}"
        )));
    }
    super::request::refuse_conflicts(requests)?;
    for req in requests {
        req.validate()?;
    }
    let keyed = minimal::keyed(model, tok, requests, layer, lr, rule, stats, threads)?;
    let (xs, rs): (Vec<Vec<f64>>, Vec<Vec<f64>>) = keyed
        .iter()
        .filter_map(|k| {
            let x = k.x.iter().map(|&v| v as f64).collect();
            k.value.clone().map(|r| (x, r))
        })
        .unzip();
    let mut shares = joint_shares(&xs, &rs, stats, Ridge::Relative(ridge), layer)?.into_iter();
    Ok(requests
        .iter()
        .zip(&keyed)
        .map(|(req, k)| match k.value {
            Some(_) => EditOutcome::edited(
                req,
                k.target_id,
                k.top1,
                shares.next().expect("one share per edited request"),
            ),
            None => EditOutcome::skipped(req, k.target_id, k.top1),
        })
        .collect())
}

/// The ridge added to the diagonal of KᵀC⁻¹K.
#[derive(Debug, Clone, Copy)]
pub enum Ridge {
    /// ρ · s, s = the mean diagonal of KᵀC⁻¹K.
    Relative(f64),
    /// λ itself (MEMIT's `mom2_update_weight` for C normalised per position).
    Absolute(f64),
}

/// The least-squares write of values `rs` at keys `xs` in the metric of C: the rank-one shares
/// r'ᵢ zᵢᵀ of ΔW = R (λ·I + KᵀZ)⁻¹ Zᵀ, Z = C⁻¹K, one per key (m Cholesky solves against the
/// factor of C and one m × m Cholesky).
pub fn joint_shares(
    xs: &[Vec<f64>],
    rs: &[Vec<f64>],
    stats: &KeyStats,
    ridge: Ridge,
    layer: usize,
) -> Result<Vec<Delta>> {
    let m = xs.len();
    if m == 0 {
        return Ok(Vec::new());
    }
    let zs: Vec<Vec<f64>> = xs.iter().map(|x| stats.solve(x)).collect();
    let mut g = vec![0f64; m * m];
    for a in 0..m {
        for b in 0..=a {
            let v = dot(&xs[a], &zs[b]);
            g[a * m + b] = v;
            g[b * m + a] = v;
        }
    }
    let s = (0..m).map(|i| g[i * m + i]).sum::<f64>() / m as f64;
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::Numeric(format!(
            "joint edit at layer {layer}: the keys have no weight under the statistics (mean xᵀC⁻¹x = {s})"
        )));
    }
    let lambda = match ridge {
        Ridge::Relative(rho) => rho * s,
        Ridge::Absolute(l) => l,
    };
    for i in 0..m {
        g[i * m + i] += lambda;
    }
    cholesky_in_place(&mut g, m).map_err(|i| {
        Error::Numeric(format!(
            "joint edit at layer {layer}: the keys are linearly dependent (pivot {i}); raise the ridge"
        ))
    })?;
    // R' = R G⁻¹: row o of R' solves G y = (row o of R) since G is symmetric.
    let n_out = rs[0].len();
    let solved: Vec<Vec<f64>> = (0..n_out)
        .map(|o| cholesky_solve(&g, m, rs.iter().map(|r| r[o]).collect()))
        .collect();
    Ok((0..m)
        .zip(zs)
        .map(|(i, z)| Delta {
            tensor: ff2_weight(layer),
            layer,
            out_vecs: vec![solved.iter().map(|y| y[i] as f32).collect()],
            in_vecs: vec![z.into_iter().map(|v| v as f32).collect()],
        })
        .collect())
}
