//! Whitened forward-pass shifting (`shift-whitened`): FPS with a ROME-style key.
//!
//! Plain FPS adds lr · e xᵀ to FF2, so any other FF2 input x' receives lr · (x·x') · e. Prompts
//! that end in the same relation words have FF2 inputs with a large dot product with x, which is
//! why FPS breaks neighbouring facts (CounterFact neighborhood prompts: same relation, another
//! subject). Here the key is whitened:
//!
//! ```text
//! C = E[a aᵀ] + β·E[a_last a_lastᵀ] + λ·I + (γ/J)·Σⱼ xⱼ xⱼᵀ,
//! k = C⁻¹x / (xᵀC⁻¹x),   ΔW = s · e kᵀ,   s = lr · ‖x‖²,
//! ```
//!
//! so that ΔW·x = s·e exactly (k·x = 1) while kᵀCk, the mean square of k·a over the statistics
//! (ROME's argument) plus the contrast penalty, is the smallest among all keys with k·x = 1: the
//! edit writes at x what plain FPS writes with the same lr, and as little as possible elsewhere.
//! Because s = lr·‖x‖², `lr` has the same meaning as for plain FPS at the edit prompt and the
//! delta is linear in lr, so `eval --lr auto` works unchanged. The delta is stored like FPS's:
//! out = lr·e, in = ‖x‖²·k.
//!
//! * E[a aᵀ] is the uncentered second moment of the FF2 inputs at the edited layer over every
//!   position but the first (BOS / attention sink) of a fixed prompt set ([`StatsCorpus`]:
//!   by default backlens's own built-in prompts, [`builtin_prompts`]; or a file, e.g. the
//!   prompt/rephrase/locality strings of CounterFact *val* records), and E[a_last a_lastᵀ] the
//!   same over the last position of each prompt only, weighted by β (`last_weight`), since edit
//!   keys are last positions. Both are computed on the unedited model ([`accumulate`]) and cached
//!   on disk ([`StatsStore`], `$HOME/.cache/backlens/stats/`); λ = `lambda_ratio` · the mean
//!   diagonal.
//! * Contrast ("which subject?"): when the request names its subject and the prompt contains it,
//!   the prompt is rerun with the subject replaced by J made-up subjects ([`CONTRAST_SUBJECTS`])
//!   and their last-position FF2 inputs xⱼ enter C with weight γ = `contrast_weight` · the mean
//!   diagonal, which makes k nearly orthogonal to "same relation, other subject". The low-rank
//!   term is applied with the Woodbury identity on top of the cached Cholesky factor
//!   ([`KeyStats`]).
//!
//! One job a file: `key.rs` factors C and solves for the key ([`KeyStats`]), `corpus.rs` holds
//! the prompts (the statistics corpus, with the built-in prompts in `prompts.txt`, and the
//! contrast and context prompts), `moments.rs` accumulates the second moments ([`Moments`]) and
//! `cache.rs` keeps them per layer, in memory and in a checksummed file ([`StatsStore`],
//! [`parse_cache`]).

mod cache;
mod corpus;
mod key;
mod moments;

pub use cache::{
    default_cache_dir, encode_cache, model_fingerprint, parse_cache, CacheHeader, MomentsSource,
    StatsStore,
};
pub use corpus::{
    builtin_prompts, contrast_prompts, StatsCorpus, CONTEXT_PREFIXES, CONTRAST_SUBJECTS,
};
pub use key::KeyStats;
pub use moments::{accumulate, Moments};

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;
use serde::Serialize;

/// How the whitened key is built.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WhitenOptions {
    /// λ relative to the mean diagonal of the second moment.
    pub lambda_ratio: f64,
    /// β: weight of the last-position second moment added to the all-position one.
    pub last_weight: f64,
    /// γ relative to the mean diagonal for the contrast-subject term; 0 disables contrast.
    pub contrast_weight: f64,
    /// Key direction from the FF2 input averaged over the prompt and the prompt behind each of
    /// [`CONTEXT_PREFIXES`] (ROME's context templates): more paraphrase reach, less specificity.
    pub context: bool,
}

impl Default for WhitenOptions {
    /// The defaults tuned on CounterFact val records (see the crate docs).
    fn default() -> WhitenOptions {
        WhitenOptions {
            lambda_ratio: 1e-2,
            last_weight: 4.0,
            contrast_weight: 10.0,
            context: false,
        }
    }
}

impl WhitenOptions {
    fn check(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !(ok(self.lambda_ratio) && self.lambda_ratio > 0.0) {
            return Err(Error::Invalid(format!(
                "whitening λ ratio must be a positive number, got {}",
                self.lambda_ratio
            )));
        }
        if !ok(self.last_weight) || !ok(self.contrast_weight) {
            return Err(Error::Invalid(format!(
                "whitening weights must be non-negative numbers, got last {} contrast {}",
                self.last_weight, self.contrast_weight
            )));
        }
        Ok(())
    }
}

/// Computes the whitened FPS edit of `req` at `layer` with step `lr` (the model is not changed).
/// Skips when the target already is the model's top-1 next token.
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
    stats: &KeyStats,
) -> Result<EditOutcome> {
    if stats.layer != layer || stats.n != model.hp.n_ff {
        return Err(Error::Invalid(format!(
            "key statistics are for layer {} (width {}), the edit is at layer {layer} (width {})",
            stats.layer, stats.n, model.hp.n_ff
        )));
    }
    let key = super::shift::prompt_key(model, tok, req, layer)?;
    if key.top1 == key.target_id {
        return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
    }
    let (x, target_id, top1) = (key.x, key.target_id, key.top1);
    // FF2 input at the last position of `p`, from the blocks up to `layer` only.
    let run = |p: &str| -> Result<Vec<f32>> {
        let ids = tok.encode_prompt(p)?;
        let trace = model.trace_through(&ids, layer)?;
        Ok(trace.ff2_in[layer]
            .narrow(0, ids.len() - 1, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    let mut contrast = Vec::new();
    if stats.options.contrast_weight > 0.0 {
        for p in contrast_prompts(req) {
            contrast.push(run(&p)?);
        }
    }
    let mut dir = x.clone();
    if stats.options.context {
        for c in CONTEXT_PREFIXES {
            let xc = run(&format!("{c}{}", req.prompt))?;
            dir.iter_mut().zip(&xc).for_each(|(d, v)| *d += v);
        }
    }
    let e: Vec<f32> = model
        .tok_embd
        .narrow(0, target_id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let xx: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let k = stats.key_toward(&dir, &x, &contrast)?;
    let delta = Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: vec![e.iter().map(|v| (lr * *v as f64) as f32).collect()],
        in_vecs: vec![k.iter().map(|v| (xx * v) as f32).collect()],
    };
    Ok(EditOutcome::edited(req, target_id, top1, delta))
}
