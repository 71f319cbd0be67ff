//! Constrained fine-tuning (`--method ft`, the FT-L baseline of ROME and the Backward Lens
//! paper): a few steps of gradient descent on one FF2 matrix for L = −Σ log p(target tokens)
//! (teacher-forced), every entry of ΔW kept within ±ε.
//!
//! Each step's gradient is the Backward Lens identity ∂L/∂W = Σₜ δₜ aₜᵀ, a sum of one rank-one
//! term per token, so after s steps over an n-token sequence ΔW = −lr Σ_steps Σₜ δₜ aₜᵀ is held
//! exactly as a [`Delta`] of at most s·n rank-one terms (a LoRA adapter of that rank). The
//! constraint keeps that structure: when ‖ΔW‖∞ (the largest entry) exceeds ε, the whole ΔW is
//! scaled back to ‖ΔW‖∞ = ε, rather than clipped entry by entry (which would make it
//! full-rank). Plain gradient steps, not Adam, for the same reason.

use super::hparams::FtParams;
use super::value::LossStep;
use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::lens::backward_pass;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;

/// Computes the FT edit of `req` at `layer` (the model is not changed). Skips when the target
/// already is the model's top-1 next token.
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    p: &FtParams,
) -> Result<EditOutcome> {
    let lr = p.lr;
    let key = super::shift::prompt_key(model, tok, req, layer)?;
    if key.top1 == key.target_id {
        return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
    }
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target = tok.encode_target(&req.target_new)?;
    let mut delta = Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: Vec::new(),
        in_vecs: Vec::new(),
    };
    let mut steps = Vec::new();
    let mut edited = model.clone();
    for it in 0..p.steps {
        let bp = backward_pass(&edited, &prompt, &target, true)?;
        if !bp.loss.is_finite() {
            return Err(Error::Numeric(format!(
                "ft at layer {layer}: the loss is {} at step {it}",
                bp.loss
            )));
        }
        steps.push(LossStep {
            loss: bp.loss,
            nll: bp.loss,
            kl: 0.0,
            decay: 0.0,
            p_target: (-bp.loss).exp(),
        });
        if bp.loss < p.early_stop_loss || it + 1 == p.steps {
            break;
        }
        let d2 = bp.d2[layer].to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let a = bp.trace.ff2_in[layer]
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (d, a) in d2.into_iter().zip(a) {
            delta
                .out_vecs
                .push(d.iter().map(|v| (-lr * *v as f64) as f32).collect());
            delta.in_vecs.push(a);
        }
        let max = delta.dense().iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        if max > p.norm_constraint {
            let s = (p.norm_constraint / max) as f32;
            delta.out_vecs.iter_mut().flatten().for_each(|v| *v *= s);
        }
        edited.blocks[layer] = model.blocks[layer].clone();
        edited.blocks[layer].add_delta(&delta)?;
    }
    if delta.out_vecs.is_empty() {
        return Err(Error::Numeric(format!(
            "ft at layer {layer}: no step was taken (the loss {:.3} is already below {})",
            steps[0].loss, p.early_stop_loss
        )));
    }
    let max = delta.dense().iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut outcome = EditOutcome::edited(req, key.target_id, key.top1, delta);
    outcome.optimisation = Some(super::value::Optimisation {
        layer,
        delta_norm: max,
        reference_norm: 0.0,
        steps,
        delta: Vec::new(),
        keys: Vec::new(),
    });
    Ok(outcome)
}
