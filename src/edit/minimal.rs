//! The value each request writes in `batch` and `shift-protected`: FPS's r = lr·‖x‖²·e, or by
//! default the smallest multiple of e that makes the target the top-1 by a margin m,
//!
//! ```text
//! r = s*·e,   s* = min { s ∈ (0, 4·lr·‖x‖²] : f(s) ≥ m },   f(s) = z_t(s) − max_{j≠t} z_j(s),
//! ```
//!
//! with z(s) the next-token logits when the edit s·e kᵀ is applied to FF2 of the edited layer
//! (t the target's first token, k = C⁻¹x / (xᵀC⁻¹x) the request's whitened key: s·e at the last
//! token, s·e·(kᵀxₜ) at each earlier token t, as the written edit does). FPS's value is far larger than most records
//! need, and every unit written at a key also lands on the generic text the key overlaps, so the
//! smallest value that flips is what keeps many edits from breaking the model.
//!
//! Only the blocks after the edited layer run again for a trial value, many requests packed
//! into one pass ([`Transformer::forward_packed`]): f(0) from the first pass, f at FPS's scale
//! (doubled at most twice while below m), then a safeguarded secant search on the bracket.

use super::whiten::KeyStats;
use super::EditRequest;
use crate::model::Transformer;
use crate::numeric::{dot, finite_argmax};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// Default margin m, in logits (nats of log-probability).
pub const DEFAULT_MARGIN: f64 = 1.0;

/// Times the upper end of the bracket may double past FPS's scale.
const MAX_DOUBLINGS: usize = 2;

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
}

impl Default for ValueRule {
    fn default() -> ValueRule {
        ValueRule::Minimal {
            margin: DEFAULT_MARGIN,
        }
    }
}

impl ValueRule {
    /// Refuses a margin that is negative or not finite.
    pub fn check(self) -> Result<()> {
        match self {
            ValueRule::Minimal { margin } if !(margin.is_finite() && margin >= 0.0) => {
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
                out.extend(search(model, tok, chunk, layer, lr, margin, stats)?);
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
    /// e as a (1, n_embd) row of the model's dtype.
    e: Tensor,
    target_id: u32,
    top1: u32,
    x: Vec<f32>,
    /// Largest scale known below the margin, and f there.
    lo: (f64, f64),
    /// Smallest scale known at or above it, and f there.
    hi: (f64, f64),
}

/// The minimal values of up to [`PACK`] requests, searched together.
fn search(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    margin: f64,
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
    for (i, (top1, f)) in evaluate(model, layer, &trials, &all, &zero)?
        .into_iter()
        .enumerate()
    {
        trials[i].top1 = top1;
        trials[i].lo.1 = f;
    }
    let mut open: Vec<usize> = all
        .into_iter()
        .filter(|&i| trials[i].top1 != trials[i].target_id)
        .collect();
    // The upper end: FPS's scale, doubled while f stays below the margin.
    let mut rising = open.clone();
    for round in 0..=MAX_DOUBLINGS {
        if rising.is_empty() {
            break;
        }
        let scales: Vec<f64> = rising.iter().map(|&i| trials[i].hi.0).collect();
        let fs = evaluate(model, layer, &trials, &rising, &scales)?;
        let mut next = Vec::new();
        for (&i, (_, f)) in rising.iter().zip(fs) {
            trials[i].hi.1 = f;
            if f < margin && round < MAX_DOUBLINGS {
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
        for ((&i, &s), (_, f)) in open.iter().zip(&scales).zip(fs) {
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

/// Top-1 and f(s) of the requests `which` with `scales[k]`·e·(kᵀxₜ) added to FF2's output at
/// each token t of request `which[k]`, in one packed pass through the blocks after `layer`.
fn evaluate(
    model: &Transformer,
    layer: usize,
    trials: &[Trial],
    which: &[usize],
    scales: &[f64],
) -> Result<Vec<(u32, f64)>> {
    let post_norm = model.blocks[layer].ffn_post_norm.as_ref();
    let mut pieces = Vec::with_capacity(which.len());
    let (mut segments, mut rows) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (&i, &s) in which.iter().zip(scales) {
        let t = &trials[i];
        let n = t.h.dim(0)?;
        let added = (&t.weights * s)?.broadcast_mul(&t.e)?;
        // The residual after the block is the FF2 output (normed, where the family norms it)
        // plus a part the value does not change.
        let shift = match post_norm {
            None => added,
            Some(norm) => (norm.forward(&(&t.out + added)?)? - norm.forward(&t.out)?)?,
        };
        pieces.push((&t.h + shift)?);
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
            let best_other = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != t)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            Ok((top1, (row[t] - best_other) as f64))
        })
        .collect()
}
