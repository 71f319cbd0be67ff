//! Forward-pass shifting (FPS), as in the paper's official code: at the edited layer take FF2's
//! input x at the last prompt token and the input embedding e of the target's first token, and
//! add lr · e xᵀ to FF2, so that FF2 writes e into the residual whenever it sees x again.

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::numeric::finite_argmax;
use crate::source::ModelSource;
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
    let key = prompt_key(model, tok, req, layer)?;
    if key.top1 == key.target_id {
        return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
    }
    let (x, target_id, top1) = (key.x, key.target_id, key.top1);
    let e = embedding(model, target_id)?;
    Ok(EditOutcome::edited(
        req,
        target_id,
        top1,
        fps_delta(layer, lr, &e, x),
    ))
}

/// [`compute`] without a loaded model: the prompt runs through
/// [`crate::model::streamed_last_position`], one block in memory at a time, with the `prior`
/// deltas (earlier edits of a sequence) applied. Same result as [`compute`] on a model with
/// those deltas; for models whose f32 weights do not fit in memory.
pub fn compute_streamed(
    src: &ModelSource,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
    prior: &[Delta],
) -> Result<EditOutcome> {
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target_id = super::first_target_token(tok, req)?;
    let pass = crate::model::streamed_last_position(src, &prompt, prior, &[layer])?;
    from_last_position(src, req, target_id, &pass.logits, pass.ff2_in, layer, lr)
}

/// [`compute_streamed`] with the forward run by llama.cpp itself ([`crate::trace::Tracer`],
/// loaded from `src`'s file): x is read off llama.cpp's graph, the skip rule uses llama.cpp's
/// logits and e is one dequantized row of `token_embd.weight`. The `prior` deltas reach the
/// forward as a LoRA adapter applied to the tracer (replacing any applied before).
pub fn compute_traced(
    tracer: &mut crate::trace::Tracer,
    src: &ModelSource,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
    prior: &[Delta],
) -> Result<EditOutcome> {
    let reqs = std::slice::from_ref(req);
    Ok(compute_traced_many(tracer, src, tok, reqs, layer, lr, prior)?.remove(0))
}

/// [`compute_traced`] of several independent requests with the same `prior` deltas, their
/// prompts traced together ([`crate::trace::Tracer::last_positions`]).
pub fn compute_traced_many(
    tracer: &mut crate::trace::Tracer,
    src: &ModelSource,
    tok: &Tokenizer,
    reqs: &[EditRequest],
    layer: usize,
    lr: f64,
    prior: &[Delta],
) -> Result<Vec<EditOutcome>> {
    let prompts = reqs
        .iter()
        .map(|r| tok.encode_prompt(&r.prompt))
        .collect::<Result<Vec<_>>>()?;
    let targets = reqs
        .iter()
        .map(|r| super::first_target_token(tok, r))
        .collect::<Result<Vec<_>>>()?;
    tracer.apply_deltas(prior)?;
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let passes = tracer.last_positions(&refs, &[layer])?;
    reqs.iter()
        .zip(targets)
        .zip(passes)
        .map(|((r, t), p)| from_last_position(src, r, t, &p.logits, p.ff2_in, layer, lr))
        .collect()
}

/// The FPS outcome from one forward's last-position logits and FF2 input (either engine): the
/// skip rule, then e from one dequantized embedding row.
fn from_last_position(
    src: &ModelSource,
    req: &EditRequest,
    target_id: u32,
    logits: &[f32],
    ff2_in: Vec<Vec<f32>>,
    layer: usize,
    lr: f64,
) -> Result<EditOutcome> {
    let top1 = finite_argmax(logits)? as u32;
    if top1 == target_id {
        return Ok(EditOutcome::skipped(req, target_id, top1));
    }
    let e = src
        .rows_f32("token_embd.weight", &[target_id as usize])?
        .remove(0);
    let x = ff2_in.into_iter().next().unwrap_or_default();
    Ok(EditOutcome::edited(
        req,
        target_id,
        top1,
        fps_delta(layer, lr, &e, x),
    ))
}

/// Row `id` of the model's input embedding (FPS's value e).
pub fn embedding(model: &Transformer, id: u32) -> Result<Vec<f32>> {
    Ok(model
        .tok_embd
        .narrow(0, id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// The FPS change at `layer`: lr · e xᵀ.
pub fn fps_delta(layer: usize, lr: f64, e: &[f32], x: Vec<f32>) -> Delta {
    Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: vec![e.iter().map(|v| (lr * *v as f64) as f32).collect()],
        in_vecs: vec![x],
    }
}

/// What both shift variants take from one forward pass over the edit prompt.
pub(super) struct PromptKey {
    /// First token of " " + target.
    pub target_id: u32,
    /// The model's top-1 next token.
    pub top1: u32,
    /// FF2 input at the last prompt token of the edited layer.
    pub x: Vec<f32>,
}

/// Runs the prompt once and reads the target id, the top-1 next token and the key x.
pub(super) fn prompt_key(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
) -> Result<PromptKey> {
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target_id = super::first_target_token(tok, req)?;
    let (logits, trace) = model.forward(&prompt, None)?;
    let last = prompt.len() - 1;
    let row = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
        Ok(t.narrow(0, last, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    Ok(PromptKey {
        target_id,
        top1: finite_argmax(&row(&logits)?)? as u32,
        x: row(&trace.ff2_in[layer])?,
    })
}
