//! Many vectors projected into the vocabulary at once: the final norm and the unembedding as a
//! few large matmuls (chunks of rows), then the top/bottom tokens and chosen ranks of every score
//! row in one pass each, without sorting the vocabulary, on every core.

use crate::model::Transformer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// Rows per matmul: bounds the score buffer at `CHUNK_ROWS × n_vocab` f32.
const CHUNK_ROWS: usize = 256;

/// What one pass over a score row keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    /// The k highest (id, score), best first; equal scores by lower id.
    pub top: Vec<(u32, f32)>,
    /// The k lowest (id, score), lowest first; equal scores by higher id.
    pub bottom: Vec<(u32, f32)>,
    /// For each asked id, how many tokens score strictly higher.
    pub ranks: Vec<usize>,
}

/// The order-preserving integer image of `f32::total_cmp`.
fn key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// Top-k, bottom-k and the ranks of `ids` in `scores` read with `sign` (−1 reads the negated row:
/// the +δ scores from the −δ scores), in one pass. The order is that of a full sort by
/// `f32::total_cmp` with the tie rules of [`Picked`]; a rank compares with `>`. A non-finite
/// score is an error (it would be the first or last under `total_cmp`, so two checks suffice).
pub fn pick(scores: &[f32], sign: f32, k: usize, ids: &[u32]) -> Result<Picked> {
    let k = k.min(scores.len());
    let at = |id: u32| -> Result<f32> {
        scores
            .get(id as usize)
            .map(|s| sign * s)
            .ok_or_else(|| Error::Invalid(format!("token id {id} past {} scores", scores.len())))
    };
    let thresholds = ids.iter().map(|&id| at(id)).collect::<Result<Vec<f32>>>()?;
    let ranks = thresholds
        .iter()
        .map(|&t| scores.iter().filter(|&&x| sign * x > t).count())
        .collect();
    let mut top: Vec<(i32, u32)> = Vec::with_capacity(k + 1);
    let mut bottom: Vec<(i32, u32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        // Once both lists are full, a value strictly between their worst entries changes
        // neither: one float comparison pair rejects almost every token.
        let (mut lo, mut hi) = (f32::NEG_INFINITY, f32::INFINITY);
        for (i, &x) in scores.iter().enumerate() {
            let v = sign * x;
            if v < lo && v > hi {
                continue;
            }
            let (kv, id) = (key(v), i as u32);
            if top.len() < k || kv > top[k - 1].0 {
                let at = top.partition_point(|&(q, _)| q >= kv);
                top.insert(at, (kv, id));
                top.truncate(k);
            }
            if bottom.len() < k || kv <= bottom[k - 1].0 {
                let at = bottom.partition_point(|&(q, _)| q < kv);
                bottom.insert(at, (kv, id));
                bottom.truncate(k);
            }
            if top.len() == k && bottom.len() == k {
                lo = sign * scores[top[k - 1].1 as usize];
                hi = sign * scores[bottom[k - 1].1 as usize];
            }
        }
    }
    let with_score = |list: Vec<(i32, u32)>| -> Vec<(u32, f32)> {
        list.into_iter()
            .map(|(_, id)| (id, sign * scores[id as usize]))
            .collect()
    };
    let (top, bottom) = (with_score(top), with_score(bottom));
    for &(id, s) in top.first().into_iter().chain(bottom.first()) {
        if !s.is_finite() {
            return Err(Error::Numeric(format!(
                "projection score of token {id} is {s}: the vectors or the unembedding hold NaN or Inf"
            )));
        }
    }
    Ok(Picked { top, bottom, ranks })
}

/// Projects every row of `vectors` (rows, n_embd) through the final norm (when `use_norm`) and
/// the unembedding, `CHUNK_ROWS` rows per matmul, and picks from each score row once per entry
/// of `signs`: result `[row][sign]`.
pub fn project_and_pick(
    model: &Transformer,
    vectors: &Tensor,
    use_norm: bool,
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<Vec<Vec<Picked>>> {
    let rows = vectors.dim(0)?;
    let vocab = model.output.dim(0)?;
    let mut out = Vec::with_capacity(rows);
    let mut start = 0;
    while start < rows {
        let n = CHUNK_ROWS.min(rows - start);
        let chunk = vectors.narrow(0, start, n)?.to_dtype(model.dtype())?;
        let x = match use_norm {
            true => model.out_norm.forward(&chunk)?,
            false => chunk,
        };
        let scores: Vec<f32> = x
            .matmul(&model.output.t()?)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        out.extend(pick_rows(&scores, vocab, signs, k, ids)?);
        start += n;
    }
    Ok(out)
}

/// [`pick`] over the rows of a flattened (rows, vocab) score buffer, split across the cores.
fn pick_rows(
    scores: &[f32],
    vocab: usize,
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<Vec<Vec<Picked>>> {
    let rows: Vec<&[f32]> = scores.chunks_exact(vocab).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.len().max(1));
    let per = rows.len().div_ceil(threads.max(1)).max(1);
    let one = |row: &[f32]| -> Result<Vec<Picked>> {
        signs.iter().map(|&s| pick(row, s, k, ids)).collect()
    };
    let parts: Vec<Result<Vec<Vec<Picked>>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(|r| one(r)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a projection thread panicked"))
            .collect()
    });
    let mut out = Vec::with_capacity(rows.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full sort that [`pick`] must equal.
    fn sorted(scores: &[f32], sign: f32, k: usize) -> (Vec<u32>, Vec<u32>) {
        let v: Vec<f32> = scores.iter().map(|x| sign * x).collect();
        let mut order: Vec<u32> = (0..v.len() as u32).collect();
        order.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
        let top = order[..k].to_vec();
        order.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]).then(b.cmp(&a)));
        (top, order[..k].to_vec())
    }

    #[test]
    fn pick_equals_a_full_sort_with_ties_and_signed_zeros() {
        // Coarse values make many exact ties; ±0.0 differ under total_cmp.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut scores: Vec<f32> = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) % 41) as f32 - 20.0
            })
            .collect();
        scores[17] = -0.0;
        scores[18] = 0.0;
        let ids = [17, 18, 4999, 0];
        for sign in [1.0, -1.0] {
            for k in [1, 5, 37] {
                let p = pick(&scores, sign, k, &ids).unwrap();
                let (top, bottom) = sorted(&scores, sign, k);
                assert_eq!(p.top.iter().map(|t| t.0).collect::<Vec<_>>(), top);
                assert_eq!(p.bottom.iter().map(|t| t.0).collect::<Vec<_>>(), bottom);
                for (&id, &rank) in ids.iter().zip(&p.ranks) {
                    let s = sign * scores[id as usize];
                    assert_eq!(rank, scores.iter().filter(|&&x| sign * x > s).count());
                }
            }
        }
        scores[99] = f32::NAN;
        assert!(pick(&scores, 1.0, 3, &[0]).is_err());
        assert!(pick(&scores, 1.0, 3, &[5000]).is_err());
    }
}
