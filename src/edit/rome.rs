//! ROME (Meng et al., 2022): a rank-one update of FF2 at one layer that maps the subject's key
//! k* to a value v* found by optimisation, changing as little as possible elsewhere in the metric
//! of the FF2-input second moment C:
//!
//! ```text
//! k* = mean FF2 input at the subject's last token over the prompt and the context prefixes,
//! v* = W k* + δ,  δ from the value optimisation (module edit::value),
//! ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*),
//! ```
//!
//! so ΔW k* = δ exactly. C = E[a aᵀ] + λ·I over the `shift-whitened` statistics prompts (the same
//! cached moments), λ = `mom2_ridge` · mean diagonal. Hyperparameters: edit::hparams.

use super::hparams::RomeParams;
use super::value::{self, Optimisation, Reference};
use super::whiten::KeyStats;
use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Computes the ROME edit of `req` at `layer` (the model is not changed). Skips when the target
/// already is the model's top-1 next token. `stats` is C at `layer` ([`key_options`]).
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    p: &RomeParams,
    stats: &KeyStats,
) -> Result<EditOutcome> {
    check_stats(model, stats, layer)?;
    let key = super::shift::prompt_key(model, tok, req, layer)?;
    if key.top1 == key.target_id {
        return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
    }
    let opt = value::optimise(
        model,
        tok,
        req,
        layer,
        Reference::Ff2Out,
        p.clamp_norm_factor,
        p,
    )?;
    let k = mean_key(&opt);
    let delta = rank_one(layer, &opt.delta, &k, stats)?;
    let mut outcome = EditOutcome::edited(req, key.target_id, key.top1, delta);
    outcome.optimisation = Some(opt);
    Ok(outcome)
}

/// The options under which [`super::whiten::StatsStore::get_with`] gives ROME's C: the
/// all-position second moment only, with the ridge of `p`.
pub fn key_options(p: &RomeParams) -> super::whiten::WhitenOptions {
    super::whiten::WhitenOptions {
        lambda_ratio: p.mom2_ridge,
        last_weight: 0.0,
        contrast_weight: 0.0,
        context: false,
    }
}

/// k*: the mean of the optimisation's keys.
pub fn mean_key(opt: &Optimisation) -> Vec<f64> {
    let n = opt.keys.len() as f64;
    let mut k = vec![0f64; opt.keys[0].len()];
    for key in &opt.keys {
        k.iter_mut().zip(key).for_each(|(a, &b)| *a += b as f64 / n);
    }
    k
}

/// ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k), stored as out = r, in = C⁻¹k / (kᵀC⁻¹k).
pub fn rank_one(layer: usize, r: &[f32], k: &[f64], stats: &KeyStats) -> Result<Delta> {
    let z = stats.solve(k);
    let kz: f64 = k.iter().zip(&z).map(|(a, b)| a * b).sum();
    if !(kz.is_finite() && kz > 0.0) {
        return Err(Error::Numeric(format!(
            "rome at layer {layer}: the key has no weight under the statistics (kᵀC⁻¹k = {kz})"
        )));
    }
    Ok(Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: vec![r.to_vec()],
        in_vecs: vec![z.iter().map(|v| (v / kz) as f32).collect()],
    })
}

fn check_stats(model: &Transformer, stats: &KeyStats, layer: usize) -> Result<()> {
    if stats.layer != layer || stats.n != model.hp.n_ff {
        return Err(Error::Invalid(format!(
            "key statistics are for layer {} (width {}), the edit is at layer {layer} (width {})",
            stats.layer, stats.n, model.hp.n_ff
        )));
    }
    Ok(())
}
