//! Exact picks with less arithmetic: every score row first estimated from int16 copies of the
//! unembedding and the query ([`dot16`]), each estimate with a proven error interval, then only
//! the tokens those intervals cannot place scored exactly ([`exact`]). The top/bottom-k and ranks
//! equal those of [`brute_force`], which scores every token exactly (docs/methods.md, "The int16
//! pre-screen"). The intervals are read while the integer tiles are hot: per query, running
//! k-th thresholds drop most tokens at once and the asked ids' ranks are counted on the way.

use super::dot16::{self, exact, exact_many, Packed, Wide, TILE, TILE_ROWS};
use super::project::{pick_entries, pick_signs, Picked};
use crate::{Error, Result};
use std::sync::Arc;

/// Relative slack (to |s̃| + ‖e‖‖q‖) covering every f32 and f64 rounding of the screen's
/// arithmetic and of [`exact`] (16 units of f32 rounding; docs/methods.md).
const SLACK: f32 = 1.0 / (1u32 << 20) as f32;

/// Absolute slack for subnormal roundings (above 2⁻¹²⁰).
const TINY: f32 = 1e-36;

/// Beyond this an interval end is widened to ±∞ (it would be near f32 overflow).
const HUGE: f32 = 1e37;

/// [`Scan::read`] keeps one bit per token of a tile block in a `u32`.
const _: () = assert!(TILE_ROWS <= 32);

/// Largest |integer| of an unembedding row.
const ROW_LEVEL: f32 = 8191.0;

/// Largest |integer| of a query (lowered until ‖a‖·‖b‖ < 2³¹ for every row a).
const QUERY_LEVEL: f32 = 32767.0;

/// The exactness limit of the integer dots, with room for the f64 rounding of the check.
const DOT_LIMIT: f64 = 2_147_483_647.0 * (1.0 - 1e-9);

/// A row quantized as `scale · a` with integers |a| ≤ level: ‖x − scale·a‖, ‖x‖ (each rounded
/// up) and ‖a‖.
#[derive(Debug, Clone, Copy)]
struct Quantized {
    scale: f32,
    err: f32,
    norm: f32,
    ints: f64,
}

/// Quantizes `x` into `a` with scale σ = max|x|/`level` (a = x/σ rounded to nearest, ties to
/// even); `None` when `x` holds NaN or Inf. The error and norms are measured in f64.
#[inline(always)]
fn quantize(x: &[f32], a: &mut [i16], level: f32) -> Option<Quantized> {
    // A comparison rather than `f32::max`, so the loop vectorizes.
    let (mut top, mut bad) = ([0f32; 16], [false; 16]);
    let mut lane = |t: usize, v: f32| {
        let m = v.abs();
        top[t] = if m > top[t] { m } else { top[t] };
        bad[t] |= !v.is_finite();
    };
    let chunks = x.chunks_exact(16);
    for &v in chunks.remainder() {
        lane(0, v);
    }
    for c in chunks {
        for (t, &v) in c.iter().enumerate() {
            lane(t, v);
        }
    }
    if bad.iter().any(|&b| b) {
        return None;
    }
    let amax = top.iter().fold(0f32, |m, &v| m.max(v));
    let scale = amax / level;
    let inv = if scale.is_normal() { 1.0 / scale } else { 0.0 };
    // x/σ clamped to ±level (< 2²²), then rounded to nearest, ties to even, by adding 1.5·2²³:
    // the integer is then the low bits of the sum's representation.
    const MAGIC: f32 = 12_582_912.0;
    let a = &mut a[..x.len()];
    for (q, &v) in a.iter_mut().zip(x) {
        let t = v * inv;
        let t = if t > level {
            level
        } else if t < -level {
            -level
        } else {
            t
        };
        *q = ((t + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i16;
    }
    // ‖x‖², ‖x − σa‖² (a subnormal scale quantizes to zero: then the error is all of x) and
    // ‖a‖², in eight lanes.
    let mut sums = Sums::default();
    let (xc, ac) = (x.chunks_exact(8), a.chunks_exact(8));
    let (xr, ar) = (xc.remainder(), ac.remainder());
    for (xs, qs) in xc.zip(ac) {
        sums.add(scale, xs, qs);
    }
    sums.add(scale, xr, ar);
    let Sums { norm2, err2, ints2 } = sums;
    let root_up = |l: [f64; 8]| up(l.iter().sum::<f64>().sqrt() * (1.0 + 1e-12));
    Some(Quantized {
        scale,
        err: root_up(err2),
        norm: root_up(norm2),
        ints: (ints2.iter().sum::<i64>() as f64).sqrt(),
    })
}

/// ‖x‖², ‖x − σa‖² and ‖a‖² of a row in eight lanes.
#[derive(Default)]
struct Sums {
    norm2: [f64; 8],
    err2: [f64; 8],
    ints2: [i64; 8],
}

impl Sums {
    /// Adds up to eight elements, one per lane.
    #[inline(always)]
    fn add(&mut self, scale: f32, xs: &[f32], qs: &[i16]) {
        for (t, (&v, &q)) in xs.iter().zip(qs).enumerate() {
            let d = v as f64 - scale as f64 * q as f64;
            self.norm2[t] += v as f64 * v as f64;
            self.err2[t] += d * d;
            self.ints2[t] += q as i64 * q as i64;
        }
    }
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

/// An unembedding's int16 copy and per-row quantization figures (padded with zeros to whole
/// [`dot16::tile`] blocks): what the pre-screen reads, built once per model
/// ([`crate::model::Derived`]).
#[derive(Debug)]
pub struct Int16Rows {
    vocab: usize,
    d: usize,
    packed: Packed,
    scale: Vec<f32>,
    err: Vec<f32>,
    norm: Vec<f32>,
    /// The largest ‖a‖ over the rows.
    ints: f64,
}

impl Int16Rows {
    /// Quantizes the `vocab` rows of `e` (row-major, `d` wide) on every core.
    pub fn new(e: &[f32], vocab: usize, d: usize) -> Result<Int16Rows> {
        if e.len() != vocab * d || d == 0 {
            return Err(Error::Invalid(format!(
                "unembedding of {} values is not {vocab} rows of {d}",
                e.len()
            )));
        }
        let (packed, rows) = Packed::new(vocab, d, |r, a| {
            dot16::wide(QuantizeRow(&e[r * d..(r + 1) * d], a, ROW_LEVEL))
                .ok_or_else(|| Error::Numeric(format!("unembedding row {r} holds NaN or Inf")))
        })?;
        let padded = packed.blocks() * TILE_ROWS;
        let column = |f: fn(&Quantized) -> f32| -> Vec<f32> {
            let mut v: Vec<f32> = rows.iter().map(f).collect();
            v.resize(padded, 0.0);
            v
        };
        Ok(Int16Rows {
            vocab,
            d,
            scale: column(|r| r.scale),
            err: column(|r| r.err),
            norm: column(|r| r.norm),
            ints: rows.iter().fold(0f64, |m, r| m.max(r.ints)),
            packed,
        })
    }
}

/// The unembedding (vocab, d) in f32 with its [`Int16Rows`].
#[derive(Debug)]
pub struct Unembedding<'a> {
    e: &'a [f32],
    d: usize,
    q: Arc<Int16Rows>,
}

impl<'a> Unembedding<'a> {
    /// Quantizes the `vocab` rows of `e` (row-major, `d` wide) on every core.
    pub fn new(e: &'a [f32], vocab: usize, d: usize) -> Result<Unembedding<'a>> {
        Unembedding::with(e, Arc::new(Int16Rows::new(e, vocab, d)?))
    }

    /// `e` with its int16 copy `q` made earlier by [`Int16Rows::new`] from the same values.
    pub fn with(e: &'a [f32], q: Arc<Int16Rows>) -> Result<Unembedding<'a>> {
        if e.len() != q.vocab * q.d {
            return Err(Error::Invalid(format!(
                "unembedding of {} values for an int16 copy of {} rows of {}",
                e.len(),
                q.vocab,
                q.d
            )));
        }
        Ok(Unembedding { e, d: q.d, q })
    }

    fn vocab(&self) -> usize {
        self.q.packed.rows()
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

    /// Quantizes query `q` into `b` at the highest level that keeps every dot exact.
    fn quantize_query(&self, q: &[f32], b: &mut [i16]) -> Result<Quantized> {
        let mut level = QUERY_LEVEL;
        loop {
            let st = quantize(q, b, level).ok_or_else(|| {
                Error::Numeric(
                    "a projected vector holds NaN or Inf: the pass produced non-finite values"
                        .into(),
                )
            })?;
            let bound = self.q.ints * st.ints;
            if bound < DOT_LIMIT {
                return Ok(st);
            }
            level = (level as f64 * DOT_LIMIT / bound * 0.999).floor() as f32;
            if level < 1.0 {
                return Err(Error::Invalid(format!(
                    "rows of {} values are too long for the int16 pre-screen",
                    self.d
                )));
            }
        }
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

/// [`brute_force`]'s picks through the int16 pre-screen, on every core: each core scans a
/// share of the rows; the tokens the intervals leave open are then scored exactly token by
/// token (each unembedding row read once for all the rows that need it). Also returns how many
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
    let per = rows.div_ceil(dot16::threads()).max(1);
    let parts: Vec<Result<Vec<Scan>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queries
            .chunks(per * u.d)
            .map(|part| scope.spawn(move || scan_part(u, part, k, ids)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a projection thread panicked"))
            .collect()
    });
    let mut scans = Vec::with_capacity(rows);
    for part in parts {
        scans.extend(part?);
    }
    let scores = rescore(u, queries, &scans);
    let mut out = Vec::with_capacity(rows);
    let mut rescored = 0;
    for (scan, s) in scans.into_iter().zip(scores) {
        rescored += s.len();
        out.push(scan.finish(&s, signs, k.min(u.vocab()))?);
    }
    Ok((out, rescored))
}
/// The [`exact`] scores of every scan's kept tokens, per scan in kept order: the (token, row)
/// pairs bucketed by token, the buckets split over the cores.
fn rescore(u: &Unembedding, queries: &[f32], scans: &[Scan]) -> Vec<Vec<f32>> {
    let mut starts = vec![0usize; u.vocab() + 1];
    for scan in scans {
        for &(j, _, _) in &scan.kept {
            starts[j as usize + 1] += 1;
        }
    }
    for j in 0..u.vocab() {
        starts[j + 1] += starts[j];
    }
    // (row, slot in that row's kept list) of each pair, by token.
    let mut pairs = vec![(0u32, 0u32); starts[u.vocab()]];
    let mut fill = starts.clone();
    for (i, scan) in scans.iter().enumerate() {
        for (slot, &(j, _, _)) in scan.kept.iter().enumerate() {
            pairs[fill[j as usize]] = (i as u32, slot as u32);
            fill[j as usize] += 1;
        }
    }
    let per = pairs.len().div_ceil(dot16::threads()).max(1);
    let parts: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let (starts, pairs) = (&starts, &pairs);
        let handles: Vec<_> = (0..pairs.len().div_ceil(per))
            .map(|c| {
                scope.spawn(move || {
                    let range = c * per..((c + 1) * per).min(pairs.len());
                    let mut j = starts.partition_point(|&s| s <= range.start) - 1;
                    let mut scores = Vec::with_capacity(range.len());
                    let mut p = range.start;
                    while p < range.end {
                        while starts[j + 1] <= p {
                            j += 1;
                        }
                        // This token's pairs in the range, four queries per read of its row.
                        let end = starts[j + 1].min(range.end);
                        let query = |p: usize| {
                            let i = pairs[p].0 as usize;
                            &queries[i * u.d..(i + 1) * u.d]
                        };
                        while p + 4 <= end {
                            let qs = [query(p), query(p + 1), query(p + 2), query(p + 3)];
                            scores.extend(exact_many(u.row(j), qs));
                            p += 4;
                        }
                        for p in p..end {
                            scores.push(exact(u.row(j), query(p)));
                        }
                        p = end;
                    }
                    scores
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a scoring thread panicked"))
            .collect()
    });
    let mut out: Vec<Vec<f32>> = scans.iter().map(|s| vec![0.0; s.kept.len()]).collect();
    for (&(i, slot), s) in pairs.iter().zip(parts.into_iter().flatten()) {
        out[i as usize][slot as usize] = s;
    }
    out
}

/// One query's scan over the vocabulary, in id order.
struct Scan {
    st: Quantized,
    /// Exact scores of the asked ids.
    targets: Vec<f32>,
    /// Per asked id, the tokens whose interval lies wholly above and wholly below it.
    counts: Vec<(usize, usize)>,
    k: usize,
    /// The k largest lo and the k smallest hi seen so far, best first.
    top: Vec<f32>,
    bottom: Vec<f32>,
    /// The k-th largest lo and the k-th smallest hi so far (−∞ and +∞ until k are seen): a
    /// token with hi < τ or lo > ρ is out of a list for good.
    tau: f32,
    rho: f32,
    /// (id, lo, hi) of every token that was a candidate or undecided when seen (after
    /// [`Scan::settle`], those still open).
    kept: Vec<(u32, f32, f32)>,
}

impl Scan {
    fn new(u: &Unembedding, q: &[f32], st: Quantized, k: usize, ids: &[u32]) -> Scan {
        let (tau, rho) = match k {
            0 => (f32::INFINITY, f32::NEG_INFINITY),
            _ => (f32::NEG_INFINITY, f32::INFINITY),
        };
        Scan {
            st,
            targets: ids.iter().map(|&t| exact(u.row(t as usize), q)).collect(),
            counts: vec![(0, 0); ids.len()],
            k,
            top: Vec::with_capacity(k + 1),
            bottom: Vec::with_capacity(k + 1),
            tau,
            rho,
            kept: Vec::new(),
        }
    }

    /// Reads the integer dots `ints` of tokens `j0..`: their intervals (see [`bounds`]), the
    /// rank counts, and the tokens that may matter kept for [`Scan::finish`].
    #[inline(always)]
    fn read(&mut self, u: &Unembedding, j0: usize, ints: &[i32]) {
        let n = ints.len();
        let (mut lo, mut hi) = ([0f32; TILE_ROWS], [0f32; TILE_ROWS]);
        bounds(u, &self.st, j0, ints, &mut lo[..n], &mut hi[..n]);
        let (lo, hi) = (&lo[..n], &hi[..n]);
        let (tau, rho) = (self.tau, self.rho);
        // Bit r: token j0 + r may enter a list or holds an asked id's score in its interval.
        // The thresholds only tighten as tokens are offered, so a token without its bit would
        // be turned away by `offer` too: only the set bits are offered, in id order.
        let mut keep = lo
            .iter()
            .zip(hi)
            .enumerate()
            .fold(0u32, |m, (r, (&l, &h))| {
                m | u32::from((h >= tau) | (l <= rho)) << r
            });
        for (c, &t) in self.counts.iter_mut().zip(&self.targets) {
            let (mut above, mut below, mut open) = (0usize, 0usize, 0u32);
            for (r, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                above += usize::from(l > t);
                below += usize::from(h < t);
                open |= u32::from((l <= t) & (t <= h)) << r;
            }
            *c = (c.0 + above, c.1 + below);
            keep |= open;
        }
        while keep != 0 {
            let r = keep.trailing_zeros() as usize;
            keep &= keep - 1;
            self.offer((j0 + r) as u32, lo[r], hi[r]);
        }
    }

    fn offer(&mut self, id: u32, l: f32, h: f32) {
        let top = h >= self.tau;
        let bottom = l <= self.rho;
        if !top && !bottom && !self.targets.iter().any(|&t| l <= t && t <= h) {
            return;
        }
        self.kept.push((id, l, h));
        let k = self.k;
        if top && k > 0 {
            let at = self.top.partition_point(|&x| x >= l);
            self.top.insert(at, l);
            self.top.truncate(k);
            if self.top.len() == k {
                self.tau = self.top[k - 1];
            }
        }
        if bottom && k > 0 {
            let at = self.bottom.partition_point(|&x| x <= h);
            self.bottom.insert(at, h);
            self.bottom.truncate(k);
            if self.bottom.len() == k {
                self.rho = self.bottom[k - 1];
            }
        }
    }

    /// Keeps only the tokens the final thresholds cannot exclude from a list and those whose
    /// interval holds an asked id's score: what [`rescore`] scores exactly.
    fn settle(&mut self) {
        let (tau, rho, targets) = (self.tau, self.rho, &self.targets);
        self.kept
            .retain(|&(_, l, h)| h >= tau || l <= rho || targets.iter().any(|&t| l <= t && t <= h));
    }

    /// The lists from the kept tokens' exact `scores` (in kept order).
    fn finish(mut self, scores: &[f32], signs: &[f32], k: usize) -> Result<Vec<Picked>> {
        let (tau, rho) = (self.tau, self.rho);
        let mut candidates = Vec::new();
        for (&(j, l, h), &s) in self.kept.iter().zip(scores) {
            for (c, &t) in self.counts.iter_mut().zip(&self.targets) {
                if l <= t && t <= h {
                    c.0 += usize::from(s > t);
                    c.1 += usize::from(s < t);
                }
            }
            if h >= tau || l <= rho {
                candidates.push((j, s));
            }
        }
        pick_entries(candidates, signs, k, &self.counts)
    }
}

/// The scans of [`pick_rows`] on one core: queries quantized, then [`ScanBlocks`].
fn scan_part(u: &Unembedding, queries: &[f32], k: usize, ids: &[u32]) -> Result<Vec<Scan>> {
    let ql = u.q.packed.query_len();
    let tiles = (queries.len() / u.d).div_ceil(TILE);
    let mut q16 = vec![0i16; tiles * TILE * ql];
    let k_list = k.min(u.vocab());
    let mut scans = queries
        .chunks_exact(u.d)
        .zip(q16.chunks_exact_mut(ql))
        .map(|(q, b)| {
            let st = u.quantize_query(q, &mut b[..u.d])?;
            Ok(Scan::new(u, q, st, k_list, ids))
        })
        .collect::<Result<Vec<_>>>()?;
    dot16::wide(ScanBlocks {
        u,
        q16: &q16,
        scans: &mut scans,
    })?;
    scans.iter_mut().for_each(Scan::settle);
    Ok(scans)
}

/// [`quantize`] for [`dot16::wide`].
struct QuantizeRow<'a>(&'a [f32], &'a mut [i16], f32);

impl Wide for QuantizeRow<'_> {
    type Out = Option<Quantized>;
    #[inline(always)]
    fn run(self) -> Option<Quantized> {
        quantize(self.0, self.1, self.2)
    }
}

/// [`scan_part`]'s loop for [`dot16::wide`]: for each block of unembedding rows, every
/// [`TILE`] of quantized queries dotted and read.
struct ScanBlocks<'a> {
    u: &'a Unembedding<'a>,
    q16: &'a [i16],
    scans: &'a mut [Scan],
}

impl Wide for ScanBlocks<'_> {
    type Out = Result<()>;
    #[inline(always)]
    fn run(self) -> Result<()> {
        let (u, ql) = (self.u, self.u.q.packed.query_len());
        let mut out = [[0i32; TILE_ROWS]; TILE];
        for b in 0..u.q.packed.blocks() {
            let j0 = b * TILE_ROWS;
            let n = TILE_ROWS.min(u.vocab() - j0);
            for (t, tile) in self.q16.chunks_exact(TILE * ql).enumerate() {
                dot16::tile(&u.q.packed, b, tile, &mut out)?;
                for (scan, ints) in self.scans[t * TILE..].iter_mut().zip(&out) {
                    scan.read(u, j0, &ints[..n]);
                }
            }
        }
        Ok(())
    }
}

/// The intervals [lo, hi] that hold the [`exact`] scores of tokens `j0..` from their integer
/// dots: with ẽ = σₑa and q̃ = σ_q b, s̃ = σₑσ_q(a·b) is ẽ·q̃, so
/// |s − s̃| ≤ ‖e − ẽ‖‖q‖ + ‖ẽ‖‖q − q̃‖ (+ slack), with ‖ẽ‖ ≤ ‖e‖ + ‖e − ẽ‖.
#[inline(always)]
fn bounds(u: &Unembedding, q: &Quantized, j0: usize, ints: &[i32], lo: &mut [f32], hi: &mut [f32]) {
    let (sq, nq, eq) = (q.scale, q.norm, q.err);
    let n = ints.len();
    let (scale, err, norm) = (
        &u.q.scale[j0..j0 + n],
        &u.q.err[j0..j0 + n],
        &u.q.norm[j0..j0 + n],
    );
    for j in 0..n {
        let s = (scale[j] * sq) * ints[j] as f32;
        let w = err[j] * nq + (norm[j] + err[j]) * eq + SLACK * (s.abs() + norm[j] * nq) + TINY;
        let (l, h) = (s - w, s + w);
        let wide = !(l.abs() < HUGE && h.abs() < HUGE);
        lo[j] = if wide { f32::NEG_INFINITY } else { l };
        hi[j] = if wide { f32::INFINITY } else { h };
    }
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
        for k in [0, 1, 4, 30] {
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

    /// Queries with one huge coordinate and flat ones: the query level drops until every dot is
    /// exact, and the picks still equal the brute force.
    #[test]
    fn the_query_level_keeps_every_integer_dot_exact() {
        let (vocab, d) = (500, 64);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let e: Vec<f32> = (0..vocab * d).map(|_| next().signum()).collect();
        let mut queries: Vec<f32> = (0..2 * d).map(|_| next().signum()).collect();
        queries[d + 3] = 1e4;
        let u = Unembedding::new(&e, vocab, d).unwrap();
        let mut b = vec![0i16; d];
        for q in queries.chunks_exact(d) {
            let st = u.quantize_query(q, &mut b).unwrap();
            assert!(u.q.ints * st.ints < DOT_LIMIT);
        }
        let ids = [7, 400];
        let want = brute_force(&u, &queries, &[1.0, -1.0], 5, &ids).unwrap();
        let (got, _) = pick_rows(&u, &queries, &[1.0, -1.0], 5, &ids).unwrap();
        assert_eq!(got, want);
    }
}
