//! Exact integer dot products of two-level int8 rows, for the lens's pre-screen: a row is
//! `a₁ + a₂/K`, a query `b₁ + b₂/K`, and [`dots`] returns `a₁·b₁`, `a₁·b₂ + a₂·b₁` and `a₂·b₂`. An AVX-512
//! VNNI kernel is chosen at run time; a portable one returns the same integers. This module
//! owns the lens's SIMD `unsafe`.

use crate::{Error, Result};

/// Rows per packed group: the 16 i32 lanes of one 512-bit register.
pub const GROUP: usize = 16;

/// Longest row [`dots`] accepts: |Σ| ≤ 2·len·255·128 stays below 2³¹ (the biased VNNI sums).
const MAX_LEN: usize = 32_000;

/// Two-level int8 rows packed for [`dots`]: groups of [`GROUP`] rows (a pair of groups at a
/// time, the row count padded with zero rows to `2·GROUP`), each level of a group stored as
/// `len4` runs of `GROUP × 4` bytes (row r's elements 4k..4k+4 at run k, bytes 4r..4r+4), with
/// each row's sums Σa₁, Σa₁ + Σa₂ and Σa₂.
#[derive(Debug)]
pub struct Packed {
    rows: usize,
    len4: usize,
    data: [Vec<i8>; 2],
    sums: [Vec<i32>; 3],
}

impl Packed {
    /// Packs `rows` rows of `len` values, filling row r's two levels with `fill(r, a1, a2)`
    /// (each `len` zeros, to get values in −127..=127), on every core; also returns what each
    /// `fill` returned, in row order.
    pub fn new<T: Send>(
        rows: usize,
        len: usize,
        fill: impl Fn(usize, &mut [i8], &mut [i8]) -> Result<T> + Sync,
    ) -> Result<(Packed, Vec<T>)> {
        if len > MAX_LEN {
            return Err(Error::Invalid(format!(
                "rows of {len} values: the int8 pre-screen takes at most {MAX_LEN}"
            )));
        }
        let len4 = len.div_ceil(4);
        let padded = rows.div_ceil(2 * GROUP) * 2 * GROUP;
        let group_bytes = GROUP * len4 * 4;
        let mut data = [vec![0i8; padded * len4 * 4], vec![0i8; padded * len4 * 4]];
        let mut sums = [vec![0i32; padded], vec![0i32; padded], vec![0i32; padded]];
        let per = (padded / GROUP).div_ceil(threads()).max(1);
        let [d1, d2] = &mut data;
        let [s1, s12, s2] = &mut sums;
        let parts = std::thread::scope(|scope| {
            let handles: Vec<_> = d1
                .chunks_mut(per * group_bytes)
                .zip(d2.chunks_mut(per * group_bytes))
                .zip(s1.chunks_mut(per * GROUP).zip(s12.chunks_mut(per * GROUP)))
                .zip(s2.chunks_mut(per * GROUP))
                .enumerate()
                .map(|(t, (((d1, d2), (s1, s12)), s2))| {
                    let fill = &fill;
                    scope.spawn(move || -> Result<Vec<T>> {
                        let (mut a1, mut a2) = (vec![0i8; len4 * 4], vec![0i8; len4 * 4]);
                        let mut kept = Vec::new();
                        for r in 0..s1.len() {
                            let at = t * per * GROUP + r;
                            if at >= rows {
                                break;
                            }
                            a1.fill(0);
                            a2.fill(0);
                            kept.push(fill(at, &mut a1[..len], &mut a2[..len])?);
                            let sum = |a: &[i8]| a.iter().map(|&v| v as i32).sum::<i32>();
                            s1[r] = sum(&a1);
                            s2[r] = sum(&a2);
                            s12[r] = s1[r] + s2[r];
                            let group = (r / GROUP) * group_bytes + (r % GROUP) * 4;
                            for (k, (x1, x2)) in
                                a1.chunks_exact(4).zip(a2.chunks_exact(4)).enumerate()
                            {
                                let o = group + k * GROUP * 4;
                                d1[o..o + 4].copy_from_slice(x1);
                                d2[o..o + 4].copy_from_slice(x2);
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
        let packed = Packed {
            rows,
            len4,
            data,
            sums,
        };
        Ok((packed, kept))
    }

    /// Rows packed (without the padding).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Stride of a [`dots`] output row: the row count padded to `2·GROUP`.
    pub fn stride(&self) -> usize {
        self.sums[0].len()
    }

    /// Query stride: `len` padded to a multiple of 4.
    pub fn query_len(&self) -> usize {
        self.len4 * 4
    }
}

/// The cores to use.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The three integer sums of two-level rows and queries, each `m × stride` (query-major).
pub struct Sums<'a> {
    /// a₁·b₁.
    pub high: &'a mut [i32],
    /// a₁·b₂ + a₂·b₁.
    pub cross: &'a mut [i32],
    /// a₂·b₂.
    pub low: &'a mut [i32],
}

/// For the `m` two-level int8 query rows `q1`, `q2` (each [`Packed::query_len`] long, values in
/// −127..=127, zero padded): the [`Sums`] of query i and packed row r at `i·stride + r`, exactly.
pub fn dots(p: &Packed, q1: &[i8], q2: &[i8], m: usize, out: Sums) -> Result<()> {
    let ql = p.query_len();
    let (nq, no) = (m * ql, m * p.stride());
    if q1.len() != nq
        || q2.len() != nq
        || [out.high.len(), out.cross.len(), out.low.len()] != [no; 3]
    {
        return Err(Error::Invalid(format!(
            "int8 dots: {} and {} query bytes, {} outputs for {m} rows of {ql} and {} packed rows",
            q1.len(),
            q2.len(),
            out.high.len(),
            p.stride()
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
    {
        let bias = |q: &[i8]| -> Vec<u8> { q.iter().map(|&v| (v as u8) ^ 0x80).collect() };
        // SAFETY: the three features the kernel is compiled for were detected on this CPU just
        // above, and the slice lengths it indexes by were checked at the top.
        unsafe { vnni::dots(p, &bias(q1), &bias(q2), m, out) };
        return Ok(());
    }
    portable(p, q1, q2, m, out);
    Ok(())
}

/// The reference kernel: plain integer sums in the packed order.
fn portable(p: &Packed, q1: &[i8], q2: &[i8], m: usize, out: Sums) {
    let (ql, stride) = (p.query_len(), p.stride());
    let group_bytes = GROUP * ql;
    let groups = p.data[0]
        .chunks_exact(group_bytes)
        .zip(p.data[1].chunks_exact(group_bytes));
    for (g, (e1, e2)) in groups.enumerate() {
        for i in 0..m {
            let (b1, b2) = (&q1[i * ql..(i + 1) * ql], &q2[i * ql..(i + 1) * ql]);
            let mut x = [[0i32; 3]; GROUP];
            for k in 0..ql / 4 {
                for (r, xr) in x.iter_mut().enumerate() {
                    for t in 0..4 {
                        let at = k * GROUP * 4 + r * 4 + t;
                        let (a1, a2) = (e1[at] as i32, e2[at] as i32);
                        let (v1, v2) = (b1[4 * k + t] as i32, b2[4 * k + t] as i32);
                        xr[0] += a1 * v1;
                        xr[1] += a1 * v2 + a2 * v1;
                        xr[2] += a2 * v2;
                    }
                }
            }
            let o = i * stride + g * GROUP;
            for (r, xr) in x.iter().enumerate() {
                out.high[o + r] = xr[0];
                out.cross[o + r] = xr[1];
                out.low[o + r] = xr[2];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Packed, Sums, GROUP};
    use std::arch::x86_64::*;

    /// Queries per register tile: 6·TILE accumulators, 4 row registers, 2 query broadcasts.
    const TILE: usize = 4;

    /// [`super::portable`] with `vpdpbusd`: the queries biased to u8 (b + 128), the bias removed
    /// with the packed row sums (128·Σa₁, 128·(Σa₁ + Σa₂), 128·Σa₂), so every sum is the same
    /// integer.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI, and the lengths must be those
    /// [`super::dots`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dots(p: &Packed, q1: &[u8], q2: &[u8], m: usize, out: Sums) {
        let (ql, stride) = (p.query_len(), p.stride());
        let group_bytes = GROUP * ql;
        let sums = |s: &[i32], g: usize| {
            // SAFETY: g < stride / GROUP and each sums vector holds `stride` i32.
            _mm512_slli_epi32(_mm512_loadu_si512(s.as_ptr().add(g * GROUP) as *const _), 7)
        };
        let outs = [
            out.high.as_mut_ptr(),
            out.cross.as_mut_ptr(),
            out.low.as_mut_ptr(),
        ];
        for pair in 0..stride / (2 * GROUP) {
            // SAFETY: each level holds stride / GROUP groups of `group_bytes`; a pair index
            // stays below stride / (2·GROUP), so both groups of the pair lie inside it.
            let a = p.data[0].as_ptr().add(2 * pair * group_bytes);
            let b = p.data[1].as_ptr().add(2 * pair * group_bytes);
            let corr: [[__m512i; 2]; 3] =
                [0, 1, 2].map(|l| [sums(&p.sums[l], 2 * pair), sums(&p.sums[l], 2 * pair + 1)]);
            let mut i = 0;
            while i < m {
                let n = TILE.min(m - i);
                let mut x = [[[_mm512_setzero_si512(); 2]; 3]; TILE];
                for k in 0..ql / 4 {
                    // SAFETY: run k of each group is 64 bytes inside the group (k < ql / 4).
                    let a1 = [
                        _mm512_loadu_si512(a.add(64 * k) as *const _),
                        _mm512_loadu_si512(a.add(group_bytes + 64 * k) as *const _),
                    ];
                    let a2 = [
                        _mm512_loadu_si512(b.add(64 * k) as *const _),
                        _mm512_loadu_si512(b.add(group_bytes + 64 * k) as *const _),
                    ];
                    for (t, xt) in x.iter_mut().enumerate().take(n) {
                        // SAFETY: query i + t < m has ql bytes; 4k + 4 ≤ ql.
                        let at = (i + t) * ql + 4 * k;
                        let b1 =
                            _mm512_set1_epi32((q1.as_ptr().add(at) as *const i32).read_unaligned());
                        let b2 =
                            _mm512_set1_epi32((q2.as_ptr().add(at) as *const i32).read_unaligned());
                        for h in 0..2 {
                            xt[0][h] = _mm512_dpbusd_epi32(xt[0][h], b1, a1[h]);
                            xt[1][h] = _mm512_dpbusd_epi32(xt[1][h], b2, a1[h]);
                            xt[1][h] = _mm512_dpbusd_epi32(xt[1][h], b1, a2[h]);
                            xt[2][h] = _mm512_dpbusd_epi32(xt[2][h], b2, a2[h]);
                        }
                    }
                }
                for (t, xt) in x.iter().enumerate().take(n) {
                    for (l, xl) in xt.iter().enumerate() {
                        for h in 0..2 {
                            // SAFETY: row i + t < m of each output has `stride` i32, and the
                            // pair's two groups end at 2·GROUP·(pair + 1) ≤ stride.
                            let o = outs[l].add((i + t) * stride + (2 * pair + h) * GROUP);
                            _mm512_storeu_si512(o as *mut _, _mm512_sub_epi32(xl[h], corr[l][h]));
                        }
                    }
                }
                i += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detected_kernel_equals_the_portable_one() {
        let (rows, len, m) = (70, 37, 11);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (((state >> 33) % 255) as i32 - 127) as i8
        };
        let v1: Vec<i8> = (0..rows * len).map(|_| next()).collect();
        let v2: Vec<i8> = (0..rows * len).map(|_| next()).collect();
        let (p, kept) = Packed::new(rows, len, |r, a1, a2| {
            a1.copy_from_slice(&v1[r * len..(r + 1) * len]);
            a2.copy_from_slice(&v2[r * len..(r + 1) * len]);
            Ok(r)
        })
        .unwrap();
        assert_eq!(kept, (0..rows).collect::<Vec<_>>());
        let ql = p.query_len();
        let (mut q1, mut q2) = (vec![0i8; m * ql], vec![0i8; m * ql]);
        for i in 0..m {
            for j in 0..len {
                q1[i * ql + j] = next();
                q2[i * ql + j] = next();
            }
        }
        q1[..len].fill(-127);
        q2[..len].fill(127);
        let n = m * p.stride();
        let mut fast = [vec![0; n], vec![0; n], vec![0; n]];
        let mut slow = fast.clone();
        fn sums(x: &mut [Vec<i32>; 3]) -> Sums<'_> {
            let [h, c, l] = x;
            Sums {
                high: h,
                cross: c,
                low: l,
            }
        }
        dots(&p, &q1, &q2, m, sums(&mut fast)).unwrap();
        portable(&p, &q1, &q2, m, sums(&mut slow));
        assert_eq!(fast, slow);
        for i in 0..m {
            for r in 0..rows {
                let dot = |x: &[i8], y: &[i8]| -> i32 {
                    (0..len)
                        .map(|j| x[i * ql + j] as i32 * y[r * len + j] as i32)
                        .sum()
                };
                let o = i * p.stride() + r;
                assert_eq!(fast[0][o], dot(&q1, &v1), "query {i} row {r}");
                assert_eq!(
                    fast[1][o],
                    dot(&q2, &v1) + dot(&q1, &v2),
                    "query {i} row {r}"
                );
                assert_eq!(fast[2][o], dot(&q2, &v2), "query {i} row {r}");
            }
        }
    }
}
