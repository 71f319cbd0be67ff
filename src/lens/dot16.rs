//! Exact integer dot products of int16 rows, for the lens's pre-screen: [`tile`] returns
//! `a·b` for [`GROUPS`]·[`GROUP`] packed rows and [`TILE`] queries at once. An AVX-512 VNNI
//! kernel (`vpdpwssd`) is chosen at run time; a portable one returns the same integers. Every
//! sum is exact when ‖a‖·‖b‖ < 2³¹ (each partial sum is bounded by Cauchy–Schwarz, and the
//! wrapping lanes then hold the true value). Also the exact f64 score [`exact`] (of one row
//! with several queries at once: [`exact_many`]), AVX-512 or portable, the same bits; [`wide`]
//! (plain code compiled for AVX-512) is [`crate::kernel`]'s.

use crate::kernel;
pub use crate::kernel::{threads, wide, Wide};
use crate::{Error, Result};

/// Rows per packed group: the 16 i32 lanes of one 512-bit register.
pub const GROUP: usize = 16;

/// Groups per [`tile`].
pub const GROUPS: usize = 2;

/// Rows per [`tile`].
pub const TILE_ROWS: usize = GROUP * GROUPS;

/// Queries per [`tile`]: with [`GROUPS`], 24 accumulators in registers.
pub const TILE: usize = 12;

/// Integer rows packed for [`tile`]: blocks of [`TILE_ROWS`] rows (the row count padded with
/// zero rows), each block stored as `pairs` runs of `TILE_ROWS × 2` values: the block's row r
/// holds its elements 2p, 2p + 1 at values `2p·TILE_ROWS + 2r` (group r / GROUP is one
/// register).
#[derive(Debug)]
pub struct Packed {
    rows: usize,
    pairs: usize,
    data: Vec<i16>,
}

impl Packed {
    /// Packs `rows` rows of `len` values, filling row r with `fill(r, a)` (`len` zeros, to get
    /// the row's integers), on every core; also returns what each `fill` returned, in order.
    pub fn new<T: Send>(
        rows: usize,
        len: usize,
        fill: impl Fn(usize, &mut [i16]) -> Result<T> + Sync,
    ) -> Result<(Packed, Vec<T>)> {
        if len == 0 {
            return Err(Error::Invalid("int16 rows of no values".into()));
        }
        let pairs = len.div_ceil(2);
        let blocks = rows.div_ceil(TILE_ROWS);
        let block_len = TILE_ROWS * pairs * 2;
        let mut data = vec![0i16; blocks * block_len];
        let per = blocks.div_ceil(threads()).max(1);
        let parts = std::thread::scope(|scope| {
            let handles: Vec<_> = data
                .chunks_mut(per * block_len)
                .enumerate()
                .map(|(t, part)| {
                    let fill = &fill;
                    scope.spawn(move || -> Result<Vec<T>> {
                        let mut a = vec![0i16; pairs * 2];
                        let mut kept = Vec::new();
                        for (b, block) in part.chunks_mut(block_len).enumerate() {
                            for lane in 0..TILE_ROWS {
                                let at = (t * per + b) * TILE_ROWS + lane;
                                if at >= rows {
                                    break;
                                }
                                a.fill(0);
                                kept.push(fill(at, &mut a[..len])?);
                                for (p, v) in a.chunks_exact(2).enumerate() {
                                    let o = p * TILE_ROWS * 2 + lane * 2;
                                    block[o..o + 2].copy_from_slice(v);
                                }
                            }
                        }
                        Ok(kept)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a packing thread panicked"))
                .collect::<Vec<_>>()
        });
        let mut kept = Vec::with_capacity(rows);
        for part in parts {
            kept.extend(part?);
        }
        Ok((Packed { rows, pairs, data }, kept))
    }

    /// Rows packed (without the padding).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of [`TILE_ROWS`] rows.
    pub fn blocks(&self) -> usize {
        self.data.len() / (TILE_ROWS * self.pairs * 2)
    }

    /// Query length: the row length padded to even.
    pub fn query_len(&self) -> usize {
        self.pairs * 2
    }

    fn block(&self, b: usize) -> &[i16] {
        let n = TILE_ROWS * self.pairs * 2;
        &self.data[b * n..(b + 1) * n]
    }
}

/// The score the lens reports for unembedding row `e` and query `q`: f64 products (exact, as
/// each is of two f32) summed in eight fixed lanes, the lanes added pairwise, rounded to f32.
pub fn exact(e: &[f32], q: &[f32]) -> f32 {
    exact_many(e, [q])[0]
}

/// [`exact`] of row `e` with each of `qs` (the row read once for all of them). The AVX-512
/// kernel holds each lane's sum in one f64 register lane and adds each exact product with a
/// fused multiply-add: one rounding per addition, as the portable sums.
pub fn exact_many<const N: usize>(e: &[f32], qs: [&[f32]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if kernel::has_avx512() && qs.iter().all(|q| q.len() == e.len()) {
        // SAFETY: AVX-512F was detected, and every query is as long as the row.
        return unsafe { vnni::exact_many(e, qs) };
    }
    qs.map(|q| exact_lanes(e, q))
}

/// The products of `e` and `q` past their last whole eight, summed in order.
#[inline(always)]
fn tail(e: &[f32], q: &[f32]) -> f64 {
    let (ec, qc) = (e.chunks_exact(8), q.chunks_exact(8));
    ec.remainder()
        .iter()
        .zip(qc.remainder())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

/// The eight lane sums added pairwise, then the tail, rounded to f32.
#[inline(always)]
fn finish(acc: &[f64; 8], tail: f64) -> f32 {
    let s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    (s + tail) as f32
}

/// The reference for the AVX-512 [`exact_many`]: lane t adds the products of elements t,
/// t + 8, … in order.
fn exact_lanes(e: &[f32], q: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    for (a, b) in e.chunks_exact(8).zip(q.chunks_exact(8)) {
        for t in 0..8 {
            acc[t] += a[t] as f64 * b[t] as f64;
        }
    }
    finish(&acc, tail(e, q))
}

/// The dots of [`TILE`] query rows `q` (each [`Packed::query_len`] long, zero padded) with
/// block `b`'s rows: `out[t][r]` = query t · row `b·TILE_ROWS + r`, exactly when every
/// ‖row‖·‖query‖ < 2³¹.
pub fn tile(p: &Packed, b: usize, q: &[i16], out: &mut [[i32; TILE_ROWS]; TILE]) -> Result<()> {
    if q.len() != TILE * p.query_len() || b >= p.blocks() {
        return Err(Error::Invalid(format!(
            "int16 tile: {} query values for {TILE} rows of {}, block {b} of {}",
            q.len(),
            p.query_len(),
            p.blocks()
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if kernel::has_avx512() {
        // SAFETY: the features the kernel is compiled for were detected on this CPU, and the
        // lengths it indexes by were checked above.
        unsafe { vnni::tile(p.block(b), p.pairs, q, out) };
        return Ok(());
    }
    portable(p.block(b), p.pairs, q, out);
    Ok(())
}

/// The reference kernel: plain wrapping integer sums in the packed order.
fn portable(block: &[i16], pairs: usize, q: &[i16], out: &mut [[i32; TILE_ROWS]; TILE]) {
    for (t, o) in out.iter_mut().enumerate() {
        let qt = &q[t * pairs * 2..(t + 1) * pairs * 2];
        *o = [0; TILE_ROWS];
        for p in 0..pairs {
            let run = &block[p * TILE_ROWS * 2..(p + 1) * TILE_ROWS * 2];
            for (r, acc) in o.iter_mut().enumerate() {
                let x = run[2 * r] as i32 * qt[2 * p] as i32
                    + run[2 * r + 1] as i32 * qt[2 * p + 1] as i32;
                *acc = acc.wrapping_add(x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{finish, tail, GROUP, GROUPS, TILE, TILE_ROWS};
    use std::arch::x86_64::*;

    /// [`super::exact_lanes`] for each of `qs`: eight elements of `e` widened to f64 once,
    /// then one exact product per query added to its lanes (a fused multiply-add rounds once,
    /// as the product of two f32 is exact in f64).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every query must be as long as `e`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exact_many<const N: usize>(e: &[f32], qs: [&[f32]; N]) -> [f32; N] {
        let full = e.len() / 8 * 8;
        let mut acc = [_mm512_setzero_pd(); N];
        let mut c = 0;
        while c < full {
            // SAFETY: c + 8 ≤ full ≤ the length of e and of every query.
            let ev = _mm512_cvtps_pd(_mm256_loadu_ps(e.as_ptr().add(c)));
            for (a, q) in acc.iter_mut().zip(&qs) {
                let qv = _mm512_cvtps_pd(_mm256_loadu_ps(q.as_ptr().add(c)));
                *a = _mm512_fmadd_pd(ev, qv, *a);
            }
            c += 8;
        }
        let mut out = [0f32; N];
        for ((o, a), q) in out.iter_mut().zip(&acc).zip(&qs) {
            let mut lanes = [0f64; 8];
            _mm512_storeu_pd(lanes.as_mut_ptr(), *a);
            *o = finish(&lanes, tail(e, q));
        }
        out
    }

    /// [`super::portable`] with `vpdpwssd`: run p's two groups in two registers, each query's
    /// pair p broadcast, [`TILE`] × [`GROUPS`] accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `block` must hold `pairs` runs and `q`
    /// [`TILE`] rows of `2·pairs` values.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile(block: &[i16], pairs: usize, q: &[i16], out: &mut [[i32; TILE_ROWS]; TILE]) {
        let mut acc = [[_mm512_setzero_si512(); GROUPS]; TILE];
        let (e, qp) = (block.as_ptr(), q.as_ptr() as *const i32);
        for p in 0..pairs {
            // SAFETY: run p is TILE_ROWS·2 values inside the block (p < pairs).
            let rows = [0, 1]
                .map(|h| _mm512_loadu_si512(e.add(p * TILE_ROWS * 2 + h * GROUP * 2) as *const _));
            for (t, at) in acc.iter_mut().enumerate() {
                // SAFETY: query t's pair p lies inside q (t < TILE, p < pairs).
                let b = _mm512_set1_epi32(qp.add(t * pairs + p).read_unaligned());
                for (a, &r) in at.iter_mut().zip(&rows) {
                    *a = _mm512_dpwssd_epi32(*a, b, r);
                }
            }
        }
        for (o, at) in out.iter_mut().zip(&acc) {
            for (h, &a) in at.iter().enumerate() {
                // SAFETY: o holds TILE_ROWS i32; group h's 16 lanes start at h·GROUP.
                _mm512_storeu_si512(o.as_mut_ptr().add(h * GROUP) as *mut _, a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The detected exact score equals the portable lanes bit for bit, alone and four at a
    /// time, with tails past whole eights, mixed magnitudes and cancelling sums.
    #[test]
    fn the_exact_scores_equal_the_portable_lanes() {
        let mut state = 0x94d0_49bb_1331_11ebu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            v * [1.0, 1e-7, 3e5][(state & 3) as usize % 3]
        };
        for len in [1, 7, 8, 37, 576] {
            let e: Vec<f32> = (0..len).map(|_| next()).collect();
            let mut qs: Vec<Vec<f32>> =
                (0..4).map(|_| (0..len).map(|_| next()).collect()).collect();
            qs[3] = e.iter().map(|&v| -v).collect();
            let want: Vec<f32> = qs.iter().map(|q| exact_lanes(&e, q)).collect();
            let four = exact_many(&e, [&qs[0][..], &qs[1], &qs[2], &qs[3]]);
            let alone: Vec<f32> = qs.iter().map(|q| exact(&e, q)).collect();
            assert_eq!(
                four.map(f32::to_bits),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()[..]
            );
            assert_eq!(alone, want, "len {len}");
            let true_dot: f64 = e
                .iter()
                .zip(&qs[0])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!(
                (want[0] as f64 - true_dot).abs() <= 1e-6 * true_dot.abs().max(1e-30),
                "len {len}"
            );
            assert!(want[3] < 0.0, "len {len}");
        }
    }

    #[test]
    fn the_detected_kernel_equals_the_portable_one() {
        let (rows, len) = (70, 37);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (((state >> 33) % 16383) as i32 - 8191) as i16
        };
        let v: Vec<i16> = (0..rows * len).map(|_| next()).collect();
        let (p, kept) = Packed::new(rows, len, |r, a| {
            a.copy_from_slice(&v[r * len..(r + 1) * len]);
            Ok(r)
        })
        .unwrap();
        assert_eq!(kept, (0..rows).collect::<Vec<_>>());
        assert_eq!(p.blocks(), 3);
        let ql = p.query_len();
        let mut q = vec![0i16; TILE * ql];
        for t in 0..TILE {
            for j in 0..len {
                q[t * ql + j] = next();
            }
        }
        q[..len].fill(-8191);
        for b in 0..p.blocks() {
            let (mut fast, mut slow) = ([[0; TILE_ROWS]; TILE], [[0; TILE_ROWS]; TILE]);
            tile(&p, b, &q, &mut fast).unwrap();
            portable(p.block(b), p.pairs, &q, &mut slow);
            assert_eq!(fast, slow, "block {b}");
            for (t, o) in fast.iter().enumerate() {
                for (lane, &got) in o.iter().enumerate() {
                    let r = b * TILE_ROWS + lane;
                    let want: i32 = match r < rows {
                        true => (0..len)
                            .map(|j| q[t * ql + j] as i32 * v[r * len + j] as i32)
                            .sum(),
                        false => 0,
                    };
                    assert_eq!(got, want, "query {t} row {r}");
                }
            }
        }
        assert!(tile(&p, 3, &q, &mut [[0; TILE_ROWS]; TILE]).is_err());
    }
}
