//! Exact picks with less arithmetic: every score row first estimated from int8 copies of the
//! unembedding and the query ([`dot8`]), each estimate with a proven error interval, then only the
//! tokens those intervals cannot place scored exactly ([`exact`]). The top/bottom-k and ranks equal
//! those of [`brute_force`], which scores every token exactly (docs/methods.md, "The int8
//! pre-screen").

use super::dot8::{self, Packed};
use super::project::{pick_entries, pick_signs, Picked};
use crate::{Error, Result};

/// Relative slack (to |s̃| + ‖e‖‖q‖) covering every f32 and f64 rounding of the screen's
/// arithmetic and of [`exact`] (16 units of f32 rounding; docs/methods.md).
const SLACK: f32 = 1.0 / (1u32 << 20) as f32;

/// Absolute slack for subnormal roundings (above 2⁻¹²⁰).
const TINY: f32 = 1e-36;

/// Beyond this an interval end is widened to ±∞ (it would be near f32 overflow).
const HUGE: f32 = 1e37;

/// Query rows per int8 matmul on each core.
const BLOCK: usize = 64;

/// The second level's step: a row is `scale · (a₁ + a₂/K)`.
const K: f32 = 254.0;

/// A row quantized as `scale · (a₁ + a₂/K)` (a₁, a₂ in −127..=127), with ‖x − that‖ and ‖x‖,
/// each rounded up.
#[derive(Debug, Clone, Copy)]
struct Quantized {
    scale: f32,
    err: f32,
    norm: f32,
}

/// `x` (|x| < 2²²) rounded to nearest, ties to even (the 1.5·2²³ trick), clamped to −127..=127.
fn to_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    ((x + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8
}

/// Quantizes `x` into `a1`, `a2` with scale σ = max|x|/127; `None` when `x` holds NaN or Inf.
/// The error norm is measured in f64 when `measure` (the few query rows), else bounded: each
/// element's error is at most σ(1/2K + 2⁻¹⁵): t = fl(x/σ) is within 2⁻¹⁶ of x/σ (|t| ≤ 128,
/// two roundings), a₁ rounds t to nearest and the exact remainder t − a₁ times K rounds to a₂
/// (an f32 product within 2⁻¹⁷), so ‖x − σ(a₁ + a₂/K)‖ ≤ √d·σ(1/2K + 2⁻¹⁵).
fn quantize(x: &[f32], a1: &mut [i8], a2: &mut [i8], measure: bool) -> Option<Quantized> {
    let (mut top, mut bad) = ([0f32; 8], [false; 8]);
    let chunks = x.chunks_exact(8);
    for &v in chunks.remainder() {
        top[0] = top[0].max(v.abs());
        bad[0] |= !v.is_finite();
    }
    for c in chunks {
        for t in 0..8 {
            top[t] = top[t].max(c[t].abs());
            bad[t] |= !c[t].is_finite();
        }
    }
    if bad.iter().any(|&b| b) {
        return None;
    }
    let amax = top.iter().fold(0f32, |m, &v| m.max(v));
    let scale = amax / 127.0;
    let inv = if scale.is_normal() { 1.0 / scale } else { 0.0 };
    let n = x.len();
    let (a1, a2) = (&mut a1[..n], &mut a2[..n]);
    for i in 0..n {
        let t = x[i] * inv;
        let r1 = to_i8(t);
        a1[i] = r1;
        a2[i] = to_i8((t - r1 as f32) * K);
    }
    let sq = |v: f64| v * v;
    let norm = up(lanes_sum(x, |i| sq(x[i] as f64)).sqrt() * (1.0 + 1e-12));
    let step = 0.5 / K as f64 + 1.0 / 32768.0;
    // A subnormal scale quantizes to zero: then the error is all of x.
    let err = if inv == 0.0 {
        norm
    } else if measure {
        let approx = |i: usize| scale as f64 * (a1[i] as f64 + a2[i] as f64 / K as f64);
        up(lanes_sum(x, |i| sq(x[i] as f64 - approx(i))).sqrt() * (1.0 + 1e-12))
    } else {
        up((n as f64).sqrt() * scale as f64 * step * (1.0 + 1e-12))
    };
    Some(Quantized { scale, err, norm })
}

/// Σᵢ f(i) over the indices of `x`, in eight lanes.
fn lanes_sum(x: &[f32], f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let whole = x.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        for (t, lane) in lanes.iter_mut().enumerate() {
            *lane += f(i + t);
        }
    }
    lanes.iter().sum::<f64>() + (whole..x.len()).map(f).sum::<f64>()
}

/// The smallest f32 not below `x`.
fn up(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x {
        f.next_up()
    } else {
        f
    }
}

/// The score [`brute_force`] reports for unembedding row `e` and query `q`: f64 products
/// summed in eight fixed lanes, rounded to f32.
pub fn exact(e: &[f32], q: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    let (ec, qc) = (e.chunks_exact(8), q.chunks_exact(8));
    let tail: f64 = ec
        .remainder()
        .iter()
        .zip(qc.remainder())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    for (a, b) in ec.zip(qc) {
        for t in 0..8 {
            acc[t] += a[t] as f64 * b[t] as f64;
        }
    }
    let s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    (s + tail) as f32
}

/// The unembedding (vocab, d) in f32 with its int8 copy and per-row quantization figures.
#[derive(Debug)]
pub struct Unembedding<'a> {
    e: &'a [f32],
    d: usize,
    packed: Packed,
    scale: Vec<f32>,
    err: Vec<f32>,
    norm: Vec<f32>,
}

impl<'a> Unembedding<'a> {
    /// Quantizes the `vocab` rows of `e` (row-major, `d` wide) on every core.
    pub fn new(e: &'a [f32], vocab: usize, d: usize) -> Result<Unembedding<'a>> {
        if e.len() != vocab * d || d == 0 {
            return Err(Error::Invalid(format!(
                "unembedding of {} values is not {vocab} rows of {d}",
                e.len()
            )));
        }
        let (packed, rows) = Packed::new(vocab, d, |r, a1, a2| {
            quantize(&e[r * d..(r + 1) * d], a1, a2, false)
                .ok_or_else(|| Error::Numeric(format!("unembedding row {r} holds NaN or Inf")))
        })?;
        Ok(Unembedding {
            e,
            d,
            packed,
            scale: rows.iter().map(|r| r.scale).collect(),
            err: rows.iter().map(|r| r.err).collect(),
            norm: rows.iter().map(|r| r.norm).collect(),
        })
    }

    fn vocab(&self) -> usize {
        self.packed.rows()
    }

    fn row(&self, j: usize) -> &[f32] {
        &self.e[j * self.d..(j + 1) * self.d]
    }

    fn check(&self, queries: &[f32], ids: &[u32]) -> Result<()> {
        if !queries.len().is_multiple_of(self.d) {
            return Err(Error::Invalid(format!(
                "{} query values are not rows of {}",
                queries.len(),
                self.d
            )));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab()) {
            return Err(Error::Invalid(format!(
                "token id {id} past {} scores",
                self.vocab()
            )));
        }
        Ok(())
    }
}

/// Every row of `queries` scored exactly against every unembedding row, then picked as
/// [`pick_signs`] does: the reference [`pick_rows`] equals.
pub fn brute_force(
    u: &Unembedding,
    queries: &[f32],
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<Vec<Vec<Picked>>> {
    u.check(queries, ids)?;
    queries
        .chunks_exact(u.d)
        .map(|q| {
            let scores: Vec<f32> = (0..u.vocab()).map(|j| exact(u.row(j), q)).collect();
            pick_signs(&scores, signs, k, ids)
        })
        .collect()
}

/// [`brute_force`]'s picks through the int8 pre-screen, on every core. Also returns how many
/// (row, token) scores were computed exactly besides the asked ids.
pub fn pick_rows(
    u: &Unembedding,
    queries: &[f32],
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<(Vec<Vec<Picked>>, usize)> {
    u.check(queries, ids)?;
    let rows = queries.len() / u.d;
    let per = rows.div_ceil(dot8::threads()).max(1);
    let parts: Vec<Result<(Vec<Vec<Picked>>, usize)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queries
            .chunks(per * u.d)
            .map(|part| scope.spawn(move || pick_part(u, part, signs, k, ids)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a projection thread panicked"))
            .collect()
    });
    let (mut out, mut rescored) = (Vec::with_capacity(rows), 0);
    for part in parts {
        let (picked, n) = part?;
        out.extend(picked);
        rescored += n;
    }
    Ok((out, rescored))
}

/// [`pick_rows`] on one core, [`BLOCK`] query rows per int8 matmul.
fn pick_part(
    u: &Unembedding,
    queries: &[f32],
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<(Vec<Vec<Picked>>, usize)> {
    let (ql, stride, vocab) = (u.packed.query_len(), u.packed.stride(), u.vocab());
    let mut ints = [0, 1, 2].map(|_| vec![0i32; BLOCK * stride]);
    let (mut b1, mut b2) = (vec![0i8; BLOCK * ql], vec![0i8; BLOCK * ql]);
    let (mut lo, mut hi) = (vec![0f32; vocab], vec![0f32; vocab]);
    let (mut out, mut rescored) = (Vec::new(), 0);
    for block in queries.chunks(BLOCK * u.d) {
        let m = block.len() / u.d;
        b1.fill(0);
        b2.fill(0);
        let stats = block
            .chunks_exact(u.d)
            .zip(b1.chunks_exact_mut(ql).zip(b2.chunks_exact_mut(ql)))
            .map(|(q, (b1, b2))| {
                quantize(q, &mut b1[..u.d], &mut b2[..u.d], true).ok_or_else(|| {
                    Error::Numeric(
                        "a projected vector holds NaN or Inf: the pass produced non-finite values"
                            .into(),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (nq, no) = (m * ql, m * stride);
        let [i1, i2, i3] = &mut ints;
        let sums = dot8::Sums {
            high: &mut i1[..no],
            cross: &mut i2[..no],
            low: &mut i3[..no],
        };
        dot8::dots(&u.packed, &b1[..nq], &b2[..nq], m, sums)?;
        for (i, (q, st)) in block.chunks_exact(u.d).zip(&stats).enumerate() {
            let row = i * stride..i * stride + vocab;
            let ints = [&i1[row.clone()], &i2[row.clone()], &i3[row]];
            let (picked, n) = pick_one(u, q, st, ints, &mut lo, &mut hi, signs, k, ids)?;
            out.push(picked);
            rescored += n;
        }
    }
    Ok((out, rescored))
}

/// The interval [lo, hi] that holds each token's [`exact`] score, from its int8 dots: with
/// ẽ = σₑ(a₁ + a₂/K) and q̃ = σ_q(b₁ + b₂/K), s̃ = σₑσ_q(a₁·b₁ + (a₁·b₂ + a₂·b₁)/K + a₂·b₂/K²)
/// is ẽ·q̃, so |s − s̃| ≤ ‖e − ẽ‖‖q‖ + ‖ẽ‖‖q − q̃‖ (+ slack), with ‖ẽ‖ ≤ ‖e‖ + ‖e − ẽ‖. Also counts, for each of `targets`, the tokens whose interval lies
/// wholly above it and wholly below it.
#[allow(clippy::too_many_arguments)]
fn bounds(
    u: &Unembedding,
    q: &Quantized,
    [i1, i2, i3]: [&[i32]; 3],
    lo: &mut [f32],
    hi: &mut [f32],
    targets: &[f32],
    counts: &mut [(usize, usize)],
) {
    let (sq, nq, eq) = (q.scale, q.norm, q.err);
    let n = i1.len();
    let (i2, i3, lo, hi) = (&i2[..n], &i3[..n], &mut lo[..n], &mut hi[..n]);
    let (scale, err, norm) = (&u.scale[..n], &u.err[..n], &u.norm[..n]);
    for j in 0..n {
        let c = scale[j] * sq;
        let s = c * (i1[j] as f32 + (i2[j] as f32 + i3[j] as f32 * (1.0 / K)) * (1.0 / K));
        let w = err[j] * nq + (norm[j] + err[j]) * eq + SLACK * (s.abs() + norm[j] * nq) + TINY;
        let (l, h) = (s - w, s + w);
        let wide = !(l.abs() < HUGE && h.abs() < HUGE);
        lo[j] = if wide { f32::NEG_INFINITY } else { l };
        hi[j] = if wide { f32::INFINITY } else { h };
    }
    for (c, &t) in counts.iter_mut().zip(targets) {
        let (mut above, mut below) = (0usize, 0usize);
        for j in 0..n {
            above += usize::from(lo[j] > t);
            below += usize::from(hi[j] < t);
        }
        *c = (above, below);
    }
}

/// The k-th best of `v` under `better` (k ≥ 1, k ≤ len).
fn kth(v: &[f32], k: usize, better: impl Fn(f32, f32) -> bool) -> f32 {
    let mut best: Vec<f32> = Vec::with_capacity(k + 1);
    for &x in v {
        if best.len() == k && !better(x, best[k - 1]) {
            continue;
        }
        let at = best.partition_point(|&b| !better(x, b));
        best.insert(at, x);
        best.truncate(k);
    }
    best[k - 1]
}

/// One query row: its intervals ([`bounds`]), then the candidates they cannot exclude from a
/// top or bottom list and the tokens they cannot place above or below an asked id, scored
/// exactly.
#[allow(clippy::too_many_arguments)]
fn pick_one(
    u: &Unembedding,
    q: &[f32],
    st: &Quantized,
    ints: [&[i32]; 3],
    lo: &mut [f32],
    hi: &mut [f32],
    signs: &[f32],
    k: usize,
    ids: &[u32],
) -> Result<(Vec<Picked>, usize)> {
    let targets: Vec<f32> = ids.iter().map(|&t| exact(u.row(t as usize), q)).collect();
    let mut counts = vec![(0usize, 0usize); ids.len()];
    bounds(u, st, ints, lo, hi, &targets, &mut counts);
    let (lo, hi) = (&lo[..], &hi[..]);
    let k = k.min(lo.len());
    // Any token with hi < τ has a score below the k-th highest; any with lo > ρ, above the
    // k-th lowest.
    let (tau, rho) = match k {
        0 => (f32::INFINITY, f32::NEG_INFINITY),
        _ => (kth(lo, k, |a, b| a > b), kth(hi, k, |a, b| a < b)),
    };
    // lo and hi are never NaN, nor is an exact score of finite inputs.
    let open = |l: f32, h: f32, t: f32| l <= t && t <= h;
    let undecided = |l: f32, h: f32| targets.iter().any(|&t| open(l, h, t));
    let (mut candidates, mut rescored) = (Vec::new(), 0);
    for (j, (&l, &h)) in lo.iter().zip(hi).enumerate() {
        let candidate = h >= tau || l <= rho;
        if !candidate && !undecided(l, h) {
            continue;
        }
        let s = exact(u.row(j), q);
        rescored += 1;
        for (c, &t) in counts.iter_mut().zip(&targets) {
            if open(l, h, t) {
                c.0 += usize::from(s > t);
                c.1 += usize::from(s < t);
            }
        }
        if candidate {
            candidates.push((j as u32, s));
        }
    }
    Ok((pick_entries(candidates, signs, k, &counts)?, rescored))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary where many rows are equal or nearly so: scores tie exactly or sit inside the
    /// intervals, so the exact re-scoring decides most picks.
    #[test]
    fn ties_and_near_ties_are_rescored_to_the_brute_force() {
        let (vocab, d) = (3000, 40);
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let base: Vec<Vec<f32>> = (0..7).map(|_| (0..d).map(|_| next()).collect()).collect();
        let mut e = Vec::with_capacity(vocab * d);
        for j in 0..vocab {
            let b = &base[j % base.len()];
            // A third of the rows copy a base row exactly; the rest nudge it by ~1e-6.
            for &x in b {
                let nudge = if j % 3 == 0 { 0.0 } else { next() * 2e-6 };
                e.push(x + nudge);
            }
        }
        let mut queries: Vec<f32> = (0..5 * d).map(|_| next()).collect();
        queries[3 * d..4 * d].fill(0.0);
        queries[4 * d..].copy_from_slice(&base[2]);
        let u = Unembedding::new(&e, vocab, d).unwrap();
        for k in [1, 4, 30] {
            let ids = [0, 2, 2999];
            let want = brute_force(&u, &queries, &[1.0, -1.0], k, &ids).unwrap();
            let (got, rescored) = pick_rows(&u, &queries, &[1.0, -1.0], k, &ids).unwrap();
            assert_eq!(got, want, "k {k}");
            assert!(
                rescored > 5 * vocab / 2,
                "k {k}: only {rescored} exact scores"
            );
        }
        let mut bad_e = e.clone();
        bad_e[5 * d + 1] = f32::INFINITY;
        let err = Unembedding::new(&bad_e, vocab, d).unwrap_err().to_string();
        assert!(err.contains("unembedding row 5"), "{err}");
        let bad = [f32::NAN; 40];
        assert!(pick_rows(&u, &bad, &[1.0], 3, &[0]).is_err());
        assert!(pick_rows(&u, &queries, &[1.0], 3, &[3000]).is_err());
    }
}
