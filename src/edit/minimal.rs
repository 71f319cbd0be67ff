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

/// Which token of the edit prompt gives the key the value is written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAt {
    /// The prompt's last token (FPS's key).
    #[default]
    Last,
    /// The subject's last token (ROME's and MEMIT's; the request must name its subject).
    Subject,
}

crate::named_enum!(KeyAt, "key position", [
    Last => "last",
    Subject => "subject",
]);

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
    /// FF2's input at the key's token.
    pub x: Vec<f32>,
    /// That token's position in the prompt.
    pub row: usize,
    /// The value r = s·e; None when the target already is the top-1.
    pub value: Option<Vec<f64>>,
}

/// Keys (at the token `key` picks) and values of `requests` at `layer` on `model` (unchanged)
/// under `rule`, with the statistics `stats` of that layer giving each key's whitened
/// direction; the packs of [`PACK`] requests are searched on up to `threads` threads.
/// Refuses a value rule that cannot be read at `key`: FPS's value is an embedding row keyed at
/// the prompt's last token.
pub fn check_key(rule: ValueRule, key: KeyAt) -> Result<()> {
    match (rule, key) {
        (ValueRule::Fps, KeyAt::Subject) => Err(Error::Invalid(
            "FPS's value (--value fps) is keyed at the prompt's last token: use --key last".into(),
        )),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn keyed(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    rule: ValueRule,
    key: KeyAt,
    stats: &KeyStats,
    threads: usize,
) -> Result<Vec<Keyed>> {
    rule.check()?;
    check_key(rule, key)?;
    over_packs(requests, threads, |pack| match rule {
        ValueRule::Fps => pack
            .iter()
            .map(|req| fps_keyed(model, tok, req, layer, lr))
            .collect(),
        ValueRule::Minimal { margin } => {
            search(model, tok, pack, layer, lr, margin, false, key, stats)
        }
        ValueRule::Steepest { margin } => {
            search(model, tok, pack, layer, lr, margin, true, key, stats)
        }
    })
}

/// `search` of each pack of [`PACK`] requests, pack p on thread p mod `threads`, joined in
/// request order. Each pack's result depends on its own requests only, so the output is the
/// same for every thread count; the error returned is the first failing pack's (a thread
/// stops at its own first error, after every earlier pack of the other threads has run).
fn over_packs(
    requests: &[EditRequest],
    threads: usize,
    search: impl Fn(&[EditRequest]) -> Result<Vec<Keyed>> + Sync,
) -> Result<Vec<Keyed>> {
    let packs: Vec<&[EditRequest]> = requests.chunks(PACK).collect();
    let threads = threads.clamp(1, packs.len().max(1));
    let mut done: Vec<Option<Result<Vec<Keyed>>>> = (0..packs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let (packs, search) = (&packs, &search);
                scope.spawn(move || {
                    let mut results = Vec::new();
                    for p in (w..packs.len()).step_by(threads) {
                        let result = search(packs[p]);
                        let failed = result.is_err();
                        results.push((p, result));
                        if failed {
                            break;
                        }
                    }
                    results
                })
            })
            .collect();
        for worker in workers {
            let results = worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (p, result) in results {
                done[p] = Some(result);
            }
        }
    });
    let mut out = Vec::with_capacity(requests.len());
    for result in done {
        match result {
            Some(keyed) => out.extend(keyed?),
            None => unreachable!("a pack is skipped only after an earlier pack failed"),
        }
    }
    Ok(out)
}

/// FPS's value lr·‖x‖²·e for one request (none when the target already is the top-1).
fn fps_keyed(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
) -> Result<Keyed> {
    let key = super::shift::prompt_key(model, tok, req, layer)?;
    let row = tok.encode_prompt(&req.prompt)?.len() - 1;
    let value = (key.top1 != key.target_id).then(|| {
        let e = embedding(model, key.target_id)?;
        let s = lr * key.x.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        Ok::<_, Error>(e.iter().map(|&v| s * v as f64).collect())
    });
    Ok(Keyed {
        target_id: key.target_id,
        top1: key.top1,
        x: key.x,
        row,
        value: value.transpose()?,
    })
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
    /// kᵀxₜ per token (tokens, 1), 1 at the key's token.
    weights: Tensor,
    /// The value's direction as a (1, n_embd) row of the model's dtype: e, or the unit gradient.
    e: Tensor,
    target_id: u32,
    top1: u32,
    x: Vec<f32>,
    row: usize,
    /// Largest scale known below the margin, and f there.
    lo: (f64, f64),
    /// Smallest scale known at or above it, and f there.
    hi: (f64, f64),
}

/// The minimal values of up to [`PACK`] requests, searched together (along the logit gradient
/// when `steepest`), each keyed at the token `key` picks.
#[allow(clippy::too_many_arguments)]
fn search(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    layer: usize,
    lr: f64,
    margin: f64,
    steepest: bool,
    key: KeyAt,
    stats: &KeyStats,
) -> Result<Vec<Keyed>> {
    let prompts = requests
        .iter()
        .map(|r| tok.encode_prompt(&r.prompt))
        .collect::<Result<Vec<_>>>()?;
    let segments: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let (h_all, mut trace) = model.resid_after_packed(&prompts.concat(), &segments, layer)?;
    let keys: Vec<Vec<f64>> = trace.ff2_in[layer].to_dtype(DType::F64)?.to_vec2()?;
    // Only layer L's FF2 output is needed from here on: the rest of the trace is freed now,
    // not held through the whole search.
    let ff2_out = trace.ff2_out.swap_remove(layer);
    drop(trace);
    let mut trials = Vec::with_capacity(requests.len());
    let mut at = 0;
    for (req, &n) in requests.iter().zip(&segments) {
        let target_id = super::first_target_token(tok, req)?;
        let rows = &keys[at..at + n];
        let row = match key {
            KeyAt::Last => n - 1,
            KeyAt::Subject => subject_row(tok, req, n)?,
        };
        let x = &rows[row];
        let z = stats.solve(x);
        let xz = dot(x, &z);
        if !(xz.is_finite() && xz > 0.0) {
            return Err(Error::Numeric(format!(
                "minimal value at layer {layer}: the key of {:?} has no weight under the statistics (xᵀC⁻¹x = {xz})",
                req.prompt
            )));
        }
        let w: Vec<f64> = rows.iter().map(|r| dot(r, &z) / xz).collect();
        let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let h = h_all.narrow(0, at, n)?;
        trials.push(Trial {
            weights: Tensor::from_vec(w, (n, 1), h.device())?.to_dtype(h.dtype())?,
            out: ff2_out.narrow(0, at, n)?,
            h,
            e: model.tok_embd.narrow(0, target_id as usize, 1)?,
            target_id,
            top1: target_id,
            lo: (0.0, 0.0),
            hi: (
                lr * x.iter().map(|&v| v as f64 * v as f64).sum::<f64>(),
                0.0,
            ),
            x,
            row,
        });
        at += n;
    }
    let all: Vec<usize> = (0..trials.len()).collect();
    let (base, directions) = match steepest {
        true => gradients(model, layer, &trials)?,
        false => (
            evaluate(model, layer, &trials, &all, &vec![0.0; trials.len()])?,
            Vec::new(),
        ),
    };
    let mut open = Vec::new();
    for (i, (top1, f, _)) in base.into_iter().enumerate() {
        let t = &mut trials[i];
        t.top1 = top1;
        t.lo.1 = f;
        if top1 != t.target_id {
            open.push(i);
        }
    }
    for (&i, (d, slope)) in open.iter().zip(directions) {
        let t = &mut trials[i];
        t.e = d;
        t.hi.0 = 1.5 * (margin - t.lo.1).max(0.0) / slope;
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
                row: t.row,
                value,
            })
        })
        .collect()
}

/// The row of the subject's last token in the `n` tokens of `req`'s prompt.
fn subject_row(tok: &Tokenizer, req: &EditRequest, n: usize) -> Result<usize> {
    let row = super::value::subject_last(tok, &req.prompt, super::value::subject_of(req)?)?;
    match row < n {
        true => Ok(row),
        false => Err(Error::BadRequest(format!(
            "the subject of {:?} ends past the prompt's {n} tokens",
            req.prompt
        ))),
    }
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

/// The first pass of the steepest search: top-1, f(0) and the best other token of every
/// trial (as [`evaluate`] at s = 0), and for each trial whose target is not the top-1, in
/// order, the unit gradient d of f at 0 with respect to its value (the lead over that best
/// other token) as a (1, n_embd) row, with the slope ‖∂f/∂r‖: one packed pass and one
/// backward, the packed sequences being independent.
#[allow(clippy::type_complexity)]
fn gradients(
    model: &Transformer,
    layer: usize,
    trials: &[Trial],
) -> Result<(Vec<(u32, f64, u32)>, Vec<(Tensor, f64)>)> {
    let first = &trials[0].e;
    let r = candle_core::Var::zeros((trials.len(), first.dim(1)?), first.dtype(), first.device())?;
    let mut pieces = Vec::with_capacity(trials.len());
    let (mut segments, mut rows) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (k, t) in trials.iter().enumerate() {
        let added = t.weights.broadcast_mul(&r.as_tensor().narrow(0, k, 1)?)?;
        pieces.push(shifted(model, layer, t, &added)?);
        let n = t.h.dim(0)?;
        segments.push(n);
        rows.push(start + n - 1);
        start += n;
    }
    let logits = model.forward_packed(&Tensor::cat(&pieces, 0)?, layer + 1, &segments, &rows)?;
    let base = logits
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .iter()
        .zip(trials)
        .map(|(row, t)| lead(row, t.target_id))
        .collect::<Result<Vec<_>>>()?;
    let open: Vec<usize> = (0..trials.len())
        .filter(|&k| base[k].0 != trials[k].target_id)
        .collect();
    if open.is_empty() {
        return Ok((base, Vec::new()));
    }
    let at: Vec<u32> = open.iter().map(|&k| k as u32).collect();
    let picked = logits.index_select(&Tensor::new(at.as_slice(), logits.device())?, 0)?;
    let column = |ids: Vec<u32>| -> Result<Tensor> {
        let n = ids.len();
        Ok(picked.gather(&Tensor::from_vec(ids, (n, 1), logits.device())?, 1)?)
    };
    let targets = open.iter().map(|&k| trials[k].target_id).collect();
    let rivals = open.iter().map(|&k| base[k].2).collect();
    let total = (column(targets)? - column(rivals)?)?.sum_all()?;
    let g = total
        .backward()?
        .get(r.as_tensor())
        .ok_or_else(|| Error::Invalid("no gradient reached the value".into()))?
        .clone();
    let mut directions = Vec::with_capacity(open.len());
    for &k in &open {
        let row = g.narrow(0, k, 1)?;
        let slope = row
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
        directions.push(((row / slope)?, slope));
    }
    Ok((base, directions))
}

/// Top-1, f = the target's lead over the best other token, and that token, of one logit row.
fn lead(row: &[f32], target: u32) -> Result<(u32, f64, u32)> {
    let top1 = finite_argmax(row)? as u32;
    let t = target as usize;
    let (rival, best_other) = row.iter().enumerate().filter(|&(j, _)| j != t).fold(
        (0, f32::NEG_INFINITY),
        |b, (j, &v)| match v > b.1 {
            true => (j, v),
            false => b,
        },
    );
    Ok((top1, (row[t] - best_other) as f64, rival as u32))
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
        .map(|(&i, row)| lead(&row, trials[i].target_id))
        .collect()
}
