//! The raw second moments of the FF2 inputs at one layer over a prompt set.

use crate::model::Transformer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Rows of FF2 inputs gathered before one Aᵀ·A update of the second moment.
const CHUNK_ROWS: usize = 2048;

/// Raw statistics of the FF2 inputs at one layer, at f32 precision (the precision they are
/// cached at, so that an edit is the same whether its statistics were computed or read back).
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Positions counted in `all` (every position but the first of each prompt).
    pub count: usize,
    /// Prompts counted in `last` (one last position each).
    pub count_last: usize,
    /// E[a] over `count` positions.
    pub mean: Vec<f64>,
    /// E[a aᵀ] over every position but the first, row-major (n, n).
    pub all: Vec<f64>,
    /// E[a aᵀ] over the last position of each prompt, row-major (n, n).
    pub last: Vec<f64>,
}

/// Tokens of statistics prompts run in one packed forward pass (a prompt longer than this
/// runs alone).
const PACK_TOKENS: usize = 256;

/// Consecutive runs of `prompts` of at most [`PACK_TOKENS`] tokens together.
fn packs<'a>(prompts: &[&'a [u32]]) -> Vec<Vec<&'a [u32]>> {
    let mut out: Vec<Vec<&[u32]>> = Vec::new();
    let mut tokens = 0;
    for &p in prompts {
        match out.last_mut() {
            Some(last) if tokens + p.len() <= PACK_TOKENS => {
                last.push(p);
                tokens += p.len();
            }
            _ => {
                out.push(vec![p]);
                tokens = p.len();
            }
        }
    }
    out
}

/// Accumulates the [`Moments`] of the FF2 inputs at `layer` over `prompts` (each cut to the
/// model's context), running only the blocks up to `layer`, prompts packed
/// [`PACK_TOKENS`] tokens at a time.
pub fn accumulate(model: &Transformer, prompts: &[Vec<u32>], layer: usize) -> Result<Moments> {
    if layer >= model.blocks.len() {
        return Err(Error::Invalid(format!(
            "statistics for layer {layer}: the model has layers 0..{}",
            model.blocks.len().saturating_sub(1)
        )));
    }
    let n = model.hp.n_ff;
    let mut sum = vec![0f64; n];
    let mut all = vec![0f64; n * n];
    let mut last = vec![0f64; n * n];
    let mut rows: Vec<f32> = Vec::with_capacity(CHUNK_ROWS * n);
    let mut last_rows: Vec<f32> = Vec::with_capacity(CHUNK_ROWS * n);
    let (mut count, mut count_last) = (0usize, 0usize);
    let flush = |rows: &mut Vec<f32>, acc: &mut Vec<f64>| -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let a = Tensor::from_slice(rows, (rows.len() / n, n), &Device::Cpu)?;
        let ata: Vec<f32> = a.t()?.matmul(&a)?.flatten_all()?.to_vec1()?;
        for (o, v) in acc.iter_mut().zip(ata) {
            *o += v as f64;
        }
        rows.clear();
        Ok(())
    };
    let prompts: Vec<&[u32]> = prompts
        .iter()
        .map(|ids| &ids[..ids.len().min(model.hp.n_ctx)])
        .filter(|ids| ids.len() >= 2)
        .collect();
    for batch in packs(&prompts) {
        let segments: Vec<usize> = batch.iter().map(|p| p.len()).collect();
        let tokens: Vec<u32> = batch.concat();
        let packed = model
            .ff2_in_packed(&tokens, &segments, layer)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut start = 0;
        for len in segments {
            // Every position but the first of the prompt.
            let a = &packed[(start + 1) * n..(start + len) * n];
            start += len;
            for row in a.chunks_exact(n) {
                for (s, &v) in sum.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            count += a.len() / n;
            count_last += 1;
            rows.extend_from_slice(a);
            last_rows.extend_from_slice(&a[a.len() - n..]);
            if rows.len() >= CHUNK_ROWS * n {
                flush(&mut rows, &mut all)?;
            }
            if last_rows.len() >= CHUNK_ROWS * n {
                flush(&mut last_rows, &mut last)?;
            }
        }
    }
    flush(&mut rows, &mut all)?;
    flush(&mut last_rows, &mut last)?;
    if count == 0 {
        return Err(Error::Invalid(format!(
            "statistics for layer {layer}: no statistics prompts of two or more tokens"
        )));
    }
    let (c, cl) = (count as f64, count_last as f64);
    // Divide, then round to f32: the values a cache file holds.
    let to_f32 = |v: f64| v as f32 as f64;
    sum.iter_mut().for_each(|v| *v = to_f32(*v / c));
    all.iter_mut().for_each(|v| *v = to_f32(*v / c));
    last.iter_mut().for_each(|v| *v = to_f32(*v / cl));
    Ok(Moments {
        count,
        count_last,
        mean: sum,
        all,
        last,
    })
}
