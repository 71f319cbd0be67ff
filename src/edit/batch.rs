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

use super::minimal::{self, KeyAt, Keyed, ValueRule};
use super::whiten::{KeyStats, StatsStore};
use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::numeric::{cholesky_in_place, cholesky_solve, dot};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::Serialize;

/// Default ridge ρ, relative to the mean diagonal of KᵀC⁻¹K.
pub const DEFAULT_RIDGE: f64 = 1e-3;

/// How `batch` and `shift-protected` key and weigh their joint solve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JointOptions {
    /// ρ, the weight of the statistics C relative to the keys' mean xᵀC⁻¹x.
    pub ridge: f64,
    /// The prompt token whose FF2 input is each request's key.
    pub key: KeyAt,
    /// Layers the values are spread over, ending at the edited one (`batch` only; 1: that
    /// layer alone).
    pub layers: usize,
}

impl Default for JointOptions {
    fn default() -> JointOptions {
        JointOptions {
            ridge: DEFAULT_RIDGE,
            key: KeyAt::Last,
            layers: 1,
        }
    }
}

/// Refuses a ridge that is negative or not finite.
pub fn check_ridge(ridge: f64) -> Result<()> {
    match ridge.is_finite() && ridge >= 0.0 {
        true => Ok(()),
        false => Err(Error::Invalid(format!(
            "the ridge (--ridge) must be a finite number ≥ 0, got {ridge}"
        ))),
    }
}

/// Computes the joint edit of `requests` at `layer` on the unedited `model` (unchanged), each
/// key receiving the value of `rule` (FPS's with step `lr`, or the smallest that flips): one
/// outcome per request, skipped when the target already is the top-1,
/// else holding its rank-one share of ΔW. Requests that edit the same prompt toward different
/// targets are refused (a joint solve cannot satisfy both). The values are searched on up to
/// `threads` threads (the result does not depend on how many). `store` holds the statistics of
/// every layer the values are spread over.
#[allow(clippy::too_many_arguments)]
pub fn compute_all(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    store: &StatsStore,
    options: JointOptions,
    rule: ValueRule,
    threads: usize,
) -> Result<Vec<EditOutcome>> {
    let stats = store.get(layer)?;
    let (key, ridge, n) = (options.key, options.ridge, options.layers);
    let keyed = keys_and_values(model, tok, requests, layer, lr, &stats, key, rule, threads)?;
    match n {
        1 => solve(requests, &keyed, &stats, ridge, layer),
        _ => solve_over_layers(model, tok, requests, &keyed, store, ridge, layer, n),
    }
}

/// The first half of [`compute_all`]: every request's key and value on the unedited model.
/// Each depends on its own request only, so the keys of a file's first n requests are the first
/// n of the file's.
#[allow(clippy::too_many_arguments)]
pub fn keys_and_values(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    stats: &KeyStats,
    key: KeyAt,
    rule: ValueRule,
    threads: usize,
) -> Result<Vec<Keyed>> {
    if stats.layer != layer || stats.n != model.hp.n_ff {
        return Err(Error::Invalid(format!(
            "key statistics are for layer {} (width {}), the edit is at layer {layer} (width {})",
            stats.layer, stats.n, model.hp.n_ff
        )));
    }
    super::request::refuse_conflicts(requests)?;
    for req in requests {
        req.validate()?;
    }
    minimal::keyed(model, tok, requests, layer, lr, rule, key, stats, threads)
}

/// The second half of [`compute_all`]: the joint solve with ridge ρ = `ridge` over the keys
/// and values `keyed` of `requests` (one each, in order).
pub fn solve(
    requests: &[EditRequest],
    keyed: &[Keyed],
    stats: &KeyStats,
    ridge: f64,
    layer: usize,
) -> Result<Vec<EditOutcome>> {
    check_ridge(ridge)?;
    if keyed.len() != requests.len() {
        return Err(Error::Invalid(format!(
            "joint edit: {} keys for {} requests",
            keyed.len(),
            requests.len()
        )));
    }
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
        .zip(keyed)
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

/// [`solve`] with each value spread over the `n` layers ending at `layer`, MEMIT's way: rᵢ is
/// the change of the residual after block `layer` at request i's key token, zᵢ = h(i) + rᵢ its
/// target; the layers l = layer−n+1 … layer in order, on the model carrying the lower layers'
/// shares, each write the joint solve of (zᵢ − h(i)) / (layers left) at their own keys (FF2's
/// input of layer l at the key token, read again after each layer) with their own statistics.
/// Each outcome holds its share at `layer` in `delta`, the lower ones in `extra`.
#[allow(clippy::too_many_arguments)]
pub fn solve_over_layers(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    keyed: &[Keyed],
    store: &StatsStore,
    ridge: f64,
    layer: usize,
    n: usize,
) -> Result<Vec<EditOutcome>> {
    check_ridge(ridge)?;
    let first = spread_start(n, layer)?;
    if model.blocks[first..=layer]
        .iter()
        .any(|b| b.ffn_post_norm.is_some())
    {
        return Err(Error::Invalid(format!(
            "--spread: {:?} norms FF2's output before the residual sum, so the layers' changes do not add up",
            model.hp.arch
        )));
    }
    let edited: Vec<usize> = (0..keyed.len())
        .filter(|&i| keyed[i].value.is_some())
        .collect();
    let prompts = edited
        .iter()
        .map(|&i| Ok((tok.encode_prompt(&requests[i].prompt)?, keyed[i].row)))
        .collect::<Result<Vec<_>>>()?;
    let (mut xs, h0) = read_at_keys(model, &prompts, first, layer)?;
    let z: Vec<Vec<f64>> = edited
        .iter()
        .zip(&h0)
        .map(|(&i, h)| {
            let r = keyed[i].value.as_ref().expect("edited");
            h.iter().zip(r).map(|(a, b)| a + b).collect()
        })
        .collect();
    let mut h = h0;
    let mut m = model.clone();
    let mut shares: Vec<Vec<Delta>> = vec![Vec::new(); edited.len()];
    for (j, l) in (first..=layer).enumerate() {
        if j > 0 {
            (xs, h) = read_at_keys(&m, &prompts, l, layer)?;
        }
        let left = (n - j) as f64;
        let rs: Vec<Vec<f64>> = z
            .iter()
            .zip(&h)
            .map(|(z, h)| z.iter().zip(h).map(|(a, b)| (a - b) / left).collect())
            .collect();
        let stats = store.get(l)?;
        for (k, share) in joint_shares(&xs, &rs, &stats, Ridge::Relative(ridge), l)?
            .into_iter()
            .enumerate()
        {
            if l < layer {
                m.apply_delta(&share)?;
            }
            shares[k].push(share);
        }
    }
    let mut shares = shares.into_iter();
    Ok(requests
        .iter()
        .zip(keyed)
        .map(|(req, k)| match k.value {
            Some(_) => {
                let mut mine = shares.next().expect("one set per edited request");
                let top = mine.pop().expect("one share per layer");
                let mut o = EditOutcome::edited(req, k.target_id, k.top1, top);
                o.extra = mine;
                o
            }
            None => EditOutcome::skipped(req, k.target_id, k.top1),
        })
        .collect())
}

/// The first layer of a spread over `n` layers ending at `layer`; refused when n is 0 or the
/// range would start below layer 0.
pub fn spread_start(n: usize, layer: usize) -> Result<usize> {
    (layer + 1).checked_sub(n).filter(|_| n > 0).ok_or_else(|| {
        Error::Invalid(format!(
            "--spread {n} layers ending at layer {layer}: give 1 to {} layers",
            layer + 1
        ))
    })
}

/// One f64 vector per request.
type Rows = Vec<Vec<f64>>;

/// FF2's input of layer `l` and the residual after block `last` at each prompt's key row
/// (`prompts`: tokens and that row), in packed passes of 32 prompts.
fn read_at_keys(
    model: &Transformer,
    prompts: &[(Vec<u32>, usize)],
    l: usize,
    last: usize,
) -> Result<(Rows, Rows)> {
    let (mut xs, mut hs) = (Vec::new(), Vec::new());
    for pack in prompts.chunks(32) {
        let segments: Vec<usize> = pack.iter().map(|(p, _)| p.len()).collect();
        let tokens: Vec<u32> = pack.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        let (h, trace) = model.resid_after_packed(&tokens, &segments, last)?;
        let rows: Vec<u32> = pack
            .iter()
            .scan(0, |start, (p, row)| {
                let at = *start + row;
                *start += p.len();
                Some(at as u32)
            })
            .collect();
        let idx = candle_core::Tensor::new(rows.as_slice(), h.device())?;
        let pick = |t: &candle_core::Tensor| -> Result<Vec<Vec<f64>>> {
            Ok(t.index_select(&idx, 0)?
                .to_dtype(candle_core::DType::F64)?
                .to_vec2()?)
        };
        xs.extend(pick(&trace.ff2_in[l])?);
        hs.extend(pick(&h)?);
    }
    Ok((xs, hs))
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
