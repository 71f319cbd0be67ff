//! Forward-pass shifting (FPS), as in the paper's official code: at the edited layer take FF2's
//! input x at the last prompt token and the input embedding e of the target's first token, and
//! add lr · e xᵀ to FF2, so that FF2 writes e into the residual whenever it sees x again.

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::runtime::argmax;
use crate::tokenizer::Tokenizer;
use crate::Result;
use candle_core::DType;

/// Computes the FPS edit of `req` at `layer` with step `lr` (the model is not changed).
/// Skips when the target already is the model's top-1 next token.
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
) -> Result<EditOutcome> {
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target_id = super::first_target_token(tok, req)?;
    let (logits, trace) = model.forward(&prompt, None)?;
    let last = prompt.len() - 1;
    let top1 = argmax(
        &logits
            .narrow(0, last, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ) as u32;
    if top1 == target_id {
        return Ok(EditOutcome::skipped(req, target_id, top1));
    }
    let x: Vec<f32> = trace.ff2_in[layer]
        .narrow(0, last, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let e: Vec<f32> = model
        .tok_embd
        .narrow(0, target_id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let delta = Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: vec![e.iter().map(|v| (lr * *v as f64) as f32).collect()],
        in_vecs: vec![x],
    };
    Ok(EditOutcome::edited(req, target_id, top1, delta))
}
