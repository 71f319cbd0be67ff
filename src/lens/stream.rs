//! The lens's backward pass one block at a time, for models whose f32 weights do not fit:
//! the forward keeps only each block's input; the backward recomputes each block from it
//! (checkpointing) and pulls the residual-stream gradient through, so peak memory is one
//! dequantized block plus the unembedding.

use super::{fed_tokens, target_loss, LensInputs};
use crate::model::{BlockStream, Transformer};
use crate::source::ModelSource;
use crate::{Error, Result};
use candle_core::{DType, Var};
use std::ops::Range;

/// The [`LensInputs`] of `layers` from `src` streamed block by block; `unembedding` holds the
/// final norm and the unembedding. δ of a layer is the residual-stream gradient after its block
/// (the FF2 output is added to the stream), so no probes are needed. Blocks below
/// `layers.start` run once (forward only).
pub fn backward(
    src: &ModelSource,
    unembedding: &Transformer,
    prompt_ids: Vec<u32>,
    target_ids: Vec<u32>,
    full_target: bool,
    layers: Range<usize>,
) -> Result<LensInputs> {
    let n_layer = unembedding.hp.n_layer;
    let (tokens, scored) = fed_tokens(&prompt_ids, &target_ids, full_target)?;
    let (stream, mut h) = BlockStream::new(src, &tokens)?;
    let mut block_inputs = Vec::with_capacity(n_layer - layers.start);
    for l in 0..n_layer {
        if l >= layers.start {
            block_inputs.push(h.clone());
        }
        h = stream.forward(l, &h)?;
    }
    let last = Var::from_tensor(&h)?;
    let logits = unembedding.unembed(last.as_tensor())?;
    let loss = target_loss(&logits, prompt_ids.len(), scored)?;
    let grads = loss.backward()?;
    let mut grad = grads
        .get(last.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Invalid("no gradient reached the last block's output".into()))?;
    let (mut x1, mut d2, mut a) = (Vec::new(), Vec::new(), Vec::new());
    for l in (layers.start..n_layer).rev() {
        let vjp = stream.vjp(l, &block_inputs[l - layers.start], &grad)?;
        if l < layers.end {
            x1.push(vjp.ff1_in);
            d2.push(grad);
            a.push(vjp.ff2_in);
        }
        grad = vjp.grad_in;
    }
    x1.reverse();
    d2.reverse();
    a.reverse();
    let n = prompt_ids.len();
    Ok(LensInputs {
        last_logits: logits
            .narrow(0, n - 1, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        layers: layers.collect(),
        prompt_ids,
        target_ids,
        x1,
        d2,
        a,
    })
}
