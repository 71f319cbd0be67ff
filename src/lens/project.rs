//! Many vectors projected into the vocabulary at once: the final norm and the unembedding, then
//! the top/bottom tokens and chosen ranks of every score row, without sorting the vocabulary,
//! on every core. An f32 unembedding goes through the exact int16 pre-screen (`screen`: the
//! brute force's picks with a fraction of the exact arithmetic); another float type through
//! chunked matmuls.

use super::screen;
use crate::model::Transformer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// Rows per matmul: bounds the score buffer at `CHUNK_ROWS × n_vocab` f32.
const CHUNK_ROWS: usize = 128;

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

/// The k-slot top and bottom lists of one sign while a row is scanned.
struct Lists {
    k: usize,
    top: Vec<(i32, u32)>,
    bottom: Vec<(i32, u32)>,
    /// Once both lists are full: the worst top value and the worst bottom value. A value
    /// strictly between them changes neither list.
    lo: f32,
    hi: f32,
}

impl Lists {
    fn new(k: usize) -> Lists {
        Lists {
            k,
            top: Vec::with_capacity(k + 1),
            bottom: Vec::with_capacity(k + 1),
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
        }
    }

    fn skips(&self, v: f32) -> bool {
        v < self.lo && v > self.hi
    }

    fn offer(&mut self, v: f32, id: u32) {
        let (k, kv) = (self.k, key(v));
        if self.top.len() < k || kv > self.top[k - 1].0 {
            let at = self.top.partition_point(|&(q, _)| q >= kv);
            self.top.insert(at, (kv, id));
            self.top.truncate(k);
        }
        if self.bottom.len() < k || kv <= self.bottom[k - 1].0 {
            let at = self.bottom.partition_point(|&(q, _)| q < kv);
            self.bottom.insert(at, (kv, id));
            self.bottom.truncate(k);
        }
        if self.top.len() == k && self.bottom.len() == k {
            self.lo = unkey(self.top[k - 1].0);
            self.hi = unkey(self.bottom[k - 1].0);
        }
    }
}

/// The inverse of [`key`].
fn unkey(k: i32) -> f32 {
    f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32)
}

/// Top-k, bottom-k and the ranks of `ids` in `scores` read with `sign` (−1 reads the negated row:
/// the +δ scores from the −δ scores). See [`pick_signs`].
pub fn pick(scores: &[f32], sign: f32, k: usize, ids: &[u32]) -> Result<Picked> {
    Ok(pick_signs(scores, &[sign], k, ids)?.remove(0))
}

/// [`pick`] for each of `signs` (each +1 or −1) in one pass over the row. The order is that of
/// a full sort by `f32::total_cmp` with the tie rules of [`Picked`]; a rank compares with `>`.
/// A non-finite score is an error (it would be first or last under `total_cmp`, so checking
/// the ends suffices).
pub fn pick_signs(scores: &[f32], signs: &[f32], k: usize, ids: &[u32]) -> Result<Vec<Picked>> {
    let at = |id: u32| -> Result<f32> {
        scores
            .get(id as usize)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("token id {id} past {} scores", scores.len())))
    };
    // (above, below) each id's score: the ranks under sign +1 and −1.
    let counts = ids
        .iter()
        .map(|&id| {
            let t = at(id)?;
            Ok(scores.iter().fold((0usize, 0usize), |(gt, lt), &x| {
                (gt + usize::from(x > t), lt + usize::from(x < t))
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let k = k.min(scores.len());
    let entries = scores.iter().enumerate().map(|(i, &x)| (i as u32, x));
    pick_entries(entries, signs, k, &counts)
}

/// The lists of [`pick_signs`] from `entries` (id, score) in increasing id order: the whole row,
/// or a subset holding every token that can reach a list; `counts` holds each asked id's
/// (tokens above, tokens below) over the whole row.
pub fn pick_entries(
    entries: impl IntoIterator<Item = (u32, f32)>,
    signs: &[f32],
    k: usize,
    counts: &[(usize, usize)],
) -> Result<Vec<Picked>> {
    if let Some(s) = signs.iter().find(|s| s.abs() != 1.0) {
        return Err(Error::Invalid(format!(
            "projection sign {s}: +1 or −1 expected"
        )));
    }
    let mut lists: Vec<Lists> = signs.iter().map(|_| Lists::new(k)).collect();
    if k > 0 {
        for (i, x) in entries {
            if lists.iter().zip(signs).all(|(l, &s)| l.skips(s * x)) {
                continue;
            }
            for (l, &s) in lists.iter_mut().zip(signs) {
                l.offer(s * x, i);
            }
        }
    }
    let mut out = Vec::with_capacity(signs.len());
    for (l, &sign) in lists.into_iter().zip(signs) {
        let with_score = |list: Vec<(i32, u32)>| -> Vec<(u32, f32)> {
            list.into_iter().map(|(q, id)| (id, unkey(q))).collect()
        };
        let (top, bottom) = (with_score(l.top), with_score(l.bottom));
        for &(id, s) in top.first().into_iter().chain(bottom.first()) {
            if !s.is_finite() {
                return Err(Error::Numeric(format!(
                    "projection score of token {id} is {s}: the vectors or the unembedding hold NaN or Inf"
                )));
            }
        }
        let ranks = counts
            .iter()
            .map(|&(gt, lt)| if sign < 0.0 { lt } else { gt })
            .collect();
        out.push(Picked { top, bottom, ranks });
    }
    Ok(out)
}

/// Projects every row of `vectors` (rows, n_embd) through the final norm (when `use_norm`) and
/// the unembedding and picks from each score row once per entry of `signs`: result
/// `[row][sign]`. An f32 unembedding in CPU memory goes through [`screen_and_pick`], another
/// through [`matmul_and_pick`].
pub fn project_and_pick(
    model: &Transformer,
    vectors: &Tensor,
    use_norm: bool,
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<Vec<Vec<Picked>>> {
    if model.output.dtype() == DType::F32 && model.output.device().is_cpu() {
        return Ok(screen_and_pick(model, vectors, use_norm, signs, k, ids)?.0);
    }
    matmul_and_pick(model, vectors, use_norm, signs, k, ids)
}

/// [`project_and_pick`] through f32 matmuls of `CHUNK_ROWS` rows (the model's float type).
pub fn matmul_and_pick(
    model: &Transformer,
    vectors: &Tensor,
    use_norm: bool,
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<Vec<Vec<Picked>>> {
    let mut out = chunked(model, vectors, use_norm, signs, k, ids)?;
    softcap(model, &mut out);
    Ok(out)
}

/// [`project_and_pick`] for an f32 model through the int16 pre-screen: the picks of
/// [`screen::brute_force`] (every score exact), with the number of scores computed exactly.
pub fn screen_and_pick(
    model: &Transformer,
    vectors: &Tensor,
    use_norm: bool,
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<(Vec<Vec<Picked>>, usize)> {
    let x = normed(model, vectors, use_norm)?;
    let (mut out, rescored) = with_unembedding(model, |u| screen::pick_rows(u, &x, signs, k, ids))?;
    softcap(model, &mut out);
    Ok((out, rescored))
}

/// A final logit softcap (Gemma) is odd and increasing: the picks and ranks of the capped
/// scores are those of the raw ones, and only the reported scores change.
fn softcap(model: &Transformer, out: &mut [Vec<Picked>]) {
    let cap = model.hp.logit_softcap as f32;
    if cap > 0.0 {
        for picked in out.iter_mut().flatten() {
            for (_, s) in picked.top.iter_mut().chain(picked.bottom.iter_mut()) {
                *s = cap * (*s / cap).tanh();
            }
        }
    }
}

/// The rows of `vectors` through the final norm (when `use_norm`), flattened f32.
pub fn normed(model: &Transformer, vectors: &Tensor, use_norm: bool) -> Result<Vec<f32>> {
    let x = vectors.to_dtype(DType::F32)?;
    let x = match use_norm {
        true => model.out_norm.forward(&x)?,
        false => x,
    };
    Ok(x.flatten_all()?.to_vec1()?)
}

/// Runs `f` on an f32 model's unembedding with its int16 copy for the pre-screen (the f32
/// values read in place; the copy made on the model's first call and kept with it, see
/// [`crate::model::Derived`]; another float type is an error).
pub fn with_unembedding<R>(
    model: &Transformer,
    f: impl FnOnce(&screen::Unembedding) -> Result<R>,
) -> Result<R> {
    let (vocab, d) = model.output.dims2()?;
    if model.output.dtype() != DType::F32 {
        return Err(Error::Invalid(format!(
            "the int16 pre-screen needs an f32 unembedding, not {:?}",
            model.output.dtype()
        )));
    }
    let w = model.output.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let data = match &*storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>()?,
        _ => {
            return Err(Error::Invalid(
                "the unembedding is not in CPU memory".into(),
            ))
        }
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Invalid("the unembedding is not contiguous".into()))?;
    let e = &data[start..end];
    let q = model
        .derived
        .get_or_make(&model.output, || screen::Int16Rows::new(e, vocab, d))?;
    f(&screen::Unembedding::with(e, q)?)
}

/// Makes the int16 copy of an f32 model's unembedding now rather than on the first projection
/// (for timings that leave the one-time cost out).
pub fn prepare_screen(model: &Transformer) -> Result<()> {
    with_unembedding(model, |_| Ok(()))
}

/// The projections and picks of [`matmul_and_pick`], before any softcap.
fn chunked(
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
    let one = |row: &[f32]| pick_signs(row, signs, k, ids);
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
                let both = pick_signs(&scores, &[1.0, -1.0], k, &ids).unwrap();
                assert_eq!(both[usize::from(sign < 0.0)], p);
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
