//! The value each request writes in `batch` and `shift-protected`: FPS's r = lr·‖x‖²·e, or the
//! smallest value along a direction d that makes the target the top-1 by a margin m,
//!
//! ```text
//! r = s*·d,   s* = min { s > 0 : f(s·d) ≥ m },   f(r) = z_t(r) − max_{j≠t} z_j(r),
//! ```
//!
//! with z(r) the next-token logits when the edit r kᵀ is applied to FF2 of the edited layer
//! (t the target's first token, k = C⁻¹x / (xᵀC⁻¹x) the request's whitened key: r at the last
//! token, r·(kᵀxₜ) at each earlier token t, as the written edit does) and d the unit gradient of
//! f ([`ValueRule::Steepest`], the default) or e ([`ValueRule::Minimal`], at most FPS's scale).
//! What a value costs unrelated text grows with its size, and along the gradient a lead takes the
//! smallest value.
//!
//! Only the blocks after the edited layer run again for a trial value, many requests packed
//! into one pass ([`Transformer::forward_packed`]): f(0) from the first pass, a first trial (FPS's
//! scale along e, 1.5 × the linear estimate along the gradient, doubled at most three times while
//! below m), then a safeguarded secant search on the bracket.

use super::whiten::KeyStats;
use super::EditRequest;
use crate::model::Transformer;
use crate::numeric::{dot, finite_argmax};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// Default margin m, in logits (nats of log-probability).
pub const DEFAULT_MARGIN: f64 = 0.25;

/// Times the upper end of the bracket may double past its first trial along the logit
/// gradient (along e the first trial, FPS's scale, is also the largest).
const MAX_DOUBLINGS: usize = 3;

/// Secant steps on the bracket at most.
const MAX_STEPS: usize = 4;

/// The search stops when the bracket is narrower than this fraction of its upper end.
const TOLERANCE: f64 = 0.05;

/// Requests run through the later blocks in one packed pass.
const PACK: usize = 32;

/// Which value each edited key receives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueRule {
    /// FPS's lr·‖x‖²·e.
    Fps,
    /// The smallest s·e that makes the target lead every other token by `margin` logits.
    Minimal {
        /// m.
        margin: f64,
    },
    /// The smallest s·d that does, d the unit gradient of the lead with respect to the value.
    Steepest {
        /// m.
        margin: f64,
    },
}

impl Default for ValueRule {
    fn default() -> ValueRule {
        ValueRule::Steepest {
            margin: DEFAULT_MARGIN,
        }
    }
}

impl ValueRule {
    /// Refuses a margin that is negative or not finite.
    pub fn check(self) -> Result<()> {
        match self {
            ValueRule::Minimal { margin } | ValueRule::Steepest { margin }
                if !(margin.is_finite() && margin >= 0.0) =>
            {
                Err(Error::Invalid(format!(
                    "--margin must be a finite number ≥ 0, got {margin}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// One request at the edited layer: its key, target and, when it needs an edit, its value.
pub struct Keyed {
    /// First token of " " + target.
    pub target_id: u32,
    /// The model's top-1 next token.
    pub top1: u32,
    /// FF2's input at the last prompt token.
    pub x: Vec<f32>,
    /// The value r = s·e; None when the target already is the top-1.
    pub value: Option<Vec<f64>>,
}

/// Keys and values of `requests` at `layer` on `model` (unchanged) under `rule`, with the
/// statistics `stats` of that layer giving each key's whitened direction.
pub fn keyed(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    rule: ValueRule,
    stats: &KeyStats,
) -> Result<Vec<Keyed>> {
    rule.check()?;
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(PACK) {
        match rule {
            ValueRule::Fps => {
                for req in chunk {
                    let key = super::shift::prompt_key(model, tok, req, layer)?;
                    let value = (key.top1 != key.target_id).then(|| {
                        let e = embedding(model, key.target_id)?;
                        let s = lr * key.x.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
                        Ok::<_, Error>(e.iter().map(|&v| s * v as f64).collect())
                    });
                    out.push(Keyed {
                        target_id: key.target_id,
                        top1: key.top1,
                        x: key.x,
                        value: value.transpose()?,
                    });
                }
            }
            ValueRule::Minimal { margin } => {
                out.extend(search(model, tok, chunk, layer, lr, margin, false, stats)?);
            }
            ValueRule::Steepest { margin } => {
                out.extend(search(model, tok, chunk, layer, lr, margin, true, stats)?);
            }
        }
    }
    Ok(out)
}

/// The target's input-embedding row.
fn embedding(model: &Transformer, id: u32) -> Result<Vec<f32>> {
    Ok(model
        .tok_embd
        .narrow(0, id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// One request during the search.
struct Trial {
    /// Residual stream after the edited block, one row per prompt token.
    h: Tensor,
    /// FF2's output (tokens, n_embd), for a family that norms it before the residual sum.
    out: Tensor,
    /// kᵀxₜ per token (tokens, 1), 1 at the last.
    weights: Tensor,
    /// The value's direction as a (1, n_embd) row of the model's dtype: e, or the unit gradient.
    e: Tensor,
    target_id: u32,
    top1: u32,
    x: Vec<f32>,
    /// Largest scale known below the margin, and f there.
    lo: (f64, f64),
    /// Smallest scale known at or above it, and f there.
    hi: (f64, f64),
}

/// The minimal values of up to [`PACK`] requests, searched together (along the logit gradient
/// when `steepest`).
#[allow(clippy::too_many_arguments)]
fn search(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    margin: f64,
    steepest: bool,
    stats: &KeyStats,
) -> Result<Vec<Keyed>> {
    let mut trials = Vec::with_capacity(requests.len());
    for req in requests {
        let prompt = tok.encode_prompt(&req.prompt)?;
        let target_id = super::first_target_token(tok, req)?;
        let (h, trace) = model.resid_after(&prompt, layer)?;
        let rows: Vec<Vec<f64>> = trace.ff2_in[layer].to_dtype(DType::F64)?.to_vec2()?;
        let last = rows.last().expect("a prompt has a token");
        let z = stats.solve(last);
        let xz = dot(last, &z);
        if !(xz.is_finite() && xz > 0.0) {
            return Err(Error::Numeric(format!(
                "minimal value at layer {layer}: the key of {:?} has no weight under the statistics (xᵀC⁻¹x = {xz})",
                req.prompt
            )));
        }
        let w: Vec<f64> = rows.iter().map(|r| dot(r, &z) / xz).collect();
        let n = w.len();
        let x: Vec<f32> = last.iter().map(|&v| v as f32).collect();
        trials.push(Trial {
            weights: Tensor::from_vec(w, (n, 1), h.device())?.to_dtype(h.dtype())?,
            h,
            out: trace.ff2_out[layer].clone(),
            e: model.tok_embd.narrow(0, target_id as usize, 1)?,
            target_id,
            top1: target_id,
            lo: (0.0, 0.0),
            hi: (
                lr * x.iter().map(|&v| v as f64 * v as f64).sum::<f64>(),
                0.0,
            ),
            x,
        });
    }
    let all: Vec<usize> = (0..trials.len()).collect();
    let zero = vec![0.0; trials.len()];
    let base = evaluate(model, layer, &trials, &all, &zero)?;
    let mut open = Vec::new();
    for (i, (top1, f, rival)) in base.into_iter().enumerate() {
        let t = &mut trials[i];
        t.top1 = top1;
        t.lo.1 = f;
        if top1 == t.target_id {
            continue;
        }
        open.push(i);
        if steepest {
            let (d, slope) = gradient(model, layer, t, rival)?;
            t.e = d;
            t.hi.0 = 1.5 * (margin - f).max(0.0) / slope;
        }
    }
    // The upper end: the first trial (FPS's scale along e, the linear estimate × 1.5 along the
    // gradient), doubled while f stays below the margin.
    let doublings = if steepest { MAX_DOUBLINGS } else { 0 };
    let mut rising = open.clone();
    for round in 0..=doublings {
        if rising.is_empty() {
            break;
        }
        let scales: Vec<f64> = rising.iter().map(|&i| trials[i].hi.0).collect();
        let fs = evaluate(model, layer, &trials, &rising, &scales)?;
        let mut next = Vec::new();
        for (&i, (_, f, _)) in rising.iter().zip(fs) {
            trials[i].hi.1 = f;
            if f < margin && round < doublings {
                trials[i].lo = trials[i].hi;
                trials[i].hi.0 *= 2.0;
                next.push(i);
            }
        }
        rising = next;
    }
    // Requests that do not reach the margin at the largest scale keep that scale.
    open.retain(|&i| trials[i].hi.1 >= margin);
    for _ in 0..MAX_STEPS {
        open.retain(|&i| trials[i].hi.0 - trials[i].lo.0 > TOLERANCE * trials[i].hi.0);
        if open.is_empty() {
            break;
        }
        let scales: Vec<f64> = open
            .iter()
            .map(|&i| secant(trials[i].lo, trials[i].hi, margin))
            .collect();
        let fs = evaluate(model, layer, &trials, &open, &scales)?;
        for ((&i, &s), (_, f, _)) in open.iter().zip(&scales).zip(fs) {
            match f >= margin {
                true => trials[i].hi = (s, f),
                false => trials[i].lo = (s, f),
            }
        }
    }
    trials
        .into_iter()
        .map(|t| {
            let value = match t.top1 == t.target_id {
                true => None,
                false => {
                    let e = t.e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    Some(e.iter().map(|&v| t.hi.0 * v as f64).collect())
                }
            };
            Ok(Keyed {
                target_id: t.target_id,
                top1: t.top1,
                x: t.x,
                value,
            })
        })
        .collect()
}

/// Where the line through the bracket's ends meets the margin, kept inside the middle 80% of
/// the bracket so that it always shrinks.
fn secant(lo: (f64, f64), hi: (f64, f64), margin: f64) -> f64 {
    let w = hi.0 - lo.0;
    let t = match hi.1 > lo.1 {
        true => (margin - lo.1) / (hi.1 - lo.1),
        false => 0.5,
    };
    lo.0 + w * t.clamp(0.1, 0.9)
}

/// The unit gradient d of f at s = 0 with respect to the value (the lead over `rival`, the best
/// other token there), as a (1, n_embd) row, and the slope ‖∂f/∂r‖.
fn gradient(model: &Transformer, layer: usize, t: &Trial, rival: u32) -> Result<(Tensor, f64)> {
    let r = candle_core::Var::zeros((1, t.e.dim(1)?), t.e.dtype(), t.e.device())?;
    let h = shifted(model, layer, t, &t.weights.broadcast_mul(r.as_tensor())?)?;
    let n = h.dim(0)?;
    let logits = model.forward_from(&h, layer + 1, &[n - 1])?;
    let lead = (logits.narrow(1, t.target_id as usize, 1)?
        - logits.narrow(1, rival as usize, 1)?)?
    .sum_all()?;
    let g = lead
        .backward()?
        .get(r.as_tensor())
        .ok_or_else(|| Error::Invalid("no gradient reached the value".into()))?
        .clone();
    let slope = g
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?;
    if !(slope.is_finite() && slope > 0.0) {
        return Err(Error::Numeric(format!(
            "minimal value at layer {layer}: the lead's gradient has norm {slope}"
        )));
    }
    Ok(((g / slope)?, slope))
}

/// The residual after block `layer` of trial `t` with `added` (tokens, n_embd) added to FF2's
/// output: the residual is that output (normed, where the family norms it) plus a part the
/// value does not change.
fn shifted(model: &Transformer, layer: usize, t: &Trial, added: &Tensor) -> Result<Tensor> {
    let shift = match model.blocks[layer].ffn_post_norm.as_ref() {
        None => added.clone(),
        Some(norm) => (norm.forward(&(&t.out + added)?)? - norm.forward(&t.out)?)?,
    };
    Ok((&t.h + shift)?)
}

/// Top-1, f(s) and the best token other than the target, of the requests `which` with `scales[k]`·e·(kᵀxₜ) added to FF2's output at
/// each token t of request `which[k]`, in one packed pass through the blocks after `layer`.
fn evaluate(
    model: &Transformer,
    layer: usize,
    trials: &[Trial],
    which: &[usize],
    scales: &[f64],
) -> Result<Vec<(u32, f64, u32)>> {
    let mut pieces = Vec::with_capacity(which.len());
    let (mut segments, mut rows) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (&i, &s) in which.iter().zip(scales) {
        let t = &trials[i];
        let n = t.h.dim(0)?;
        let added = (&t.weights * s)?.broadcast_mul(&t.e)?;
        pieces.push(shifted(model, layer, t, &added)?);
        segments.push(n);
        rows.push(start + n - 1);
        start += n;
    }
    let h = Tensor::cat(&pieces, 0)?;
    let logits = model
        .forward_packed(&h, layer + 1, &segments, &rows)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    which
        .iter()
        .zip(logits)
        .map(|(&i, row)| {
            let top1 = finite_argmax(&row)? as u32;
            let t = trials[i].target_id as usize;
            let (rival, best_other) = row.iter().enumerate().filter(|&(j, _)| j != t).fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &v)| match v > b.1 {
                    true => (j, v),
                    false => b,
                },
            );
            Ok((top1, (row[t] - best_other) as f64, rival as u32))
        })
        .collect()
}
