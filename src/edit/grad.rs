//! The paper's baseline: one plain gradient-descent step on FF2 of one layer, using the Backward
//! Lens identity ∂L/∂W = Σₜ δₜ aₜᵀ (δ = ∂L/∂(FF2 output), a = FF2 input).

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::lens::{backward_pass, BackwardPass};
use crate::model::Transformer;
use crate::numeric::argmax;
use crate::tokenizer::Tokenizer;
use crate::Result;
use candle_core::DType;

/// Computes W -= lr · Σₜ δₜ aₜᵀ for L = NLL of the target's first token (model unchanged).
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
) -> Result<EditOutcome> {
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target = tok.encode_target(&req.target_new)?;
    let bp = backward_pass(model, &prompt, &target, false)?;
    let last = prompt.len() - 1;
    let top1 = argmax(
        &bp.logits
            .narrow(0, last, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ) as u32;
    let delta = step(&bp, layer, lr)?;
    Ok(EditOutcome::edited(req, target[0], top1, delta))
}

/// The step −lr · Σₜ δₜ aₜᵀ on FF2 of `layer`, from a backward pass over every fed token.
pub fn step(bp: &BackwardPass, layer: usize, lr: f64) -> Result<Delta> {
    let d2 = bp.d2[layer].to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let a = bp.trace.ff2_in[layer]
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    Ok(Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: d2
            .iter()
            .map(|row| row.iter().map(|v| (-lr * *v as f64) as f32).collect())
            .collect(),
        in_vecs: a,
    })
}
