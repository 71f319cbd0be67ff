//! MEMIT (Meng et al., 2023): ROME's value optimisation at the last layer of a range, its
//! residual spread over FF2 of every layer of the range with the joint least-squares solve of
//! [`super::batch::joint_shares`]:
//!
//! ```text
//! zᵢ   = h_last(sᵢ) + δᵢ               (δᵢ from edit::value, added to the residual after `last`)
//! for the layers l = last−n+1 … last in order, on the model with the lower layers' changes:
//!   kᵢ   = mean FF2 input of layer l at the subject's last token over the context prompts
//!   rᵢ   = (zᵢ − h_last(sᵢ)) / (layers left, l included)
//!   ΔW_l = R (λ·I + KᵀC_l⁻¹K)⁻¹ (C_l⁻¹K)ᵀ   = R Kᵀ (λ C_l + K Kᵀ)⁻¹,
//! ```
//!
//! C_l = E[a aᵀ] + ridge·I of layer l (the `shift-whitened` moments, as for ROME) and
//! λ = `mom2_update_weight`. Every request's outcome holds its rank-one share at `last` in
//! `delta` and its shares of the lower layers in `extra`.

use super::hparams::MethodParams;
use super::value::{self, subject_last, subject_of, Reference};
use super::whiten::StatsStore;
use super::{batch, EditOutcome, EditRequest};
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;

/// Computes MEMIT for `requests` jointly, the range ending at `last` (the model is not
/// changed). Requests whose target already is the top-1 are skipped.
pub fn compute_all(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[EditRequest],
    last: usize,
    p: &MethodParams,
    store: &StatsStore,
) -> Result<Vec<EditOutcome>> {
    let n = p.memit.layers;
    if n > last + 1 {
        return Err(Error::Invalid(format!(
            "memit edits {n} layers ending at layer {last}: pick layer {} or above",
            n - 1
        )));
    }
    let mut outcomes = Vec::with_capacity(requests.len());
    // Per edited request: its outcome's index and z.
    let mut targets: Vec<(usize, Vec<f64>)> = Vec::new();
    for req in requests {
        req.validate()?;
        let key = super::shift::prompt_key(model, tok, req, last)?;
        if key.top1 == key.target_id {
            outcomes.push(EditOutcome::skipped(req, key.target_id, key.top1));
            continue;
        }
        let opt = value::optimise(
            model,
            tok,
            req,
            last,
            Reference::Residual,
            p.memit.clamp_norm_factor,
            &p.rome,
        )?;
        let h0 = residual_at(model, tok, req, last)?;
        let z = h0
            .iter()
            .zip(&opt.delta)
            .map(|(h, &d)| h + d as f64)
            .collect();
        let mut outcome = EditOutcome::skipped(req, key.target_id, key.top1);
        outcome.optimisation = Some(opt);
        targets.push((outcomes.len(), z));
        outcomes.push(outcome);
    }
    if targets.is_empty() {
        return Ok(outcomes);
    }
    let options = super::rome::key_options(&p.rome);
    let mut edited = model.clone();
    for (i, l) in (last + 1 - n..=last).enumerate() {
        let left = (n - i) as f64;
        let mut keys = Vec::with_capacity(targets.len());
        let mut resid = Vec::with_capacity(targets.len());
        for (at, z) in &targets {
            let req = &outcomes[*at].request;
            keys.push(mean_key(&edited, tok, req, l, &p.rome.context_prefixes)?);
            let h = residual_at(&edited, tok, req, last)?;
            resid.push(z.iter().zip(&h).map(|(z, h)| (z - h) / left).collect());
        }
        let stats = store.get_with(l, options)?;
        let shares = batch::joint_shares(
            &keys,
            &resid,
            &stats,
            batch::Ridge::Absolute(p.memit.mom2_update_weight),
            l,
        )?;
        for ((at, _), share) in targets.iter().zip(shares) {
            edited.apply_delta(&share)?;
            let o = &mut outcomes[*at];
            match l == last {
                true => o.delta = Some(share),
                false => o.extra.push(share),
            }
        }
    }
    Ok(outcomes)
}

/// The residual stream after block `layer` at the subject's last token of the bare prompt.
fn residual_at(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
) -> Result<Vec<f64>> {
    let ids = tok.encode_prompt(&req.prompt)?;
    let at = subject_last(tok, &req.prompt, subject_of(req)?)?;
    let (h, _) = model.resid_after(&ids, layer)?;
    Ok(h.narrow(0, at, 1)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

/// The mean FF2 input of `layer` at the subject's last token over the prompt alone and behind
/// each prefix.
fn mean_key(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    prefixes: &[String],
) -> Result<Vec<f64>> {
    let subject = subject_of(req)?;
    let texts: Vec<String> = std::iter::once("")
        .chain(prefixes.iter().map(String::as_str))
        .map(|c| format!("{c}{}", req.prompt))
        .collect();
    let mut k = vec![0f64; model.hp.n_ff];
    for text in &texts {
        let ids = tok.encode_prompt(text)?;
        let at = subject_last(tok, text, subject)?;
        let trace = model.trace_through(&ids, layer)?;
        let row: Vec<f64> = trace.ff2_in[layer]
            .narrow(0, at, 1)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        k.iter_mut()
            .zip(row)
            .for_each(|(a, b)| *a += b / texts.len() as f64);
    }
    Ok(k)
}
