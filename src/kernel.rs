//! f32 weight products for few rows (the backward passes' m ≤ [`SMALL_M`] tokens): y = x·Wᵀ
//! ([`x_wt`]) and dx = dy·W ([`dy_w`]) with W (n, k) row-major read once, every row of x or dy
//! used per weight row, no packing, the output columns split over the cores. Each output value
//! is summed in one fixed order whatever m and the thread count, so a row gets the same numbers
//! alone or with others. Also [`wide`] (plain code compiled for AVX-512 where the CPU has it)
//! and [`threads`], which the lens's int16 pre-screen shares. This module and `lens::dot16`
//! hold the crate's SIMD `unsafe`.

use crate::{Error, Result};
use std::ops::Range;

/// The most rows [`x_wt`] and [`dy_w`] are meant for: beyond it a packed gemm wins.
pub const SMALL_M: usize = 16;

/// f32 lanes of one 512-bit register: the unit of every inner loop.
const LANES: usize = 16;

/// Weight rows per block of [`dy_w`]: its partial sums are added into the output once per block
/// (a two-level sum, so long sums over the rows keep their precision).
const ROW_BLOCK: usize = 64;

/// Below this many weight values a product runs on one core (a thread costs more).
const PARALLEL_FROM: usize = 1 << 17;

/// The cores to use.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether [`wide`] runs the AVX-512 copy on this CPU (and `lens::dot16` its VNNI tile).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Plain code for [`wide`]: `run` (marked `#[inline(always)]`) is inlined into a copy
/// compiled for AVX-512.
pub trait Wide {
    /// What `run` returns.
    type Out;
    /// The work.
    fn run(self) -> Self::Out;
}

/// Runs `w` compiled for AVX-512 where the CPU has it (its loops then use 512-bit registers;
/// IEEE arithmetic without fused multiply-adds gives the same values at any width).
pub fn wide<W: Wide>(w: W) -> W::Out {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features `avx512::wide` is compiled for were detected on this CPU.
        return unsafe { avx512::wide(w) };
    }
    w.run()
}

fn check(what: &str, a: usize, b: usize, w: usize, n: usize, k: usize) -> Result<()> {
    if a != b || w != n * k || k == 0 {
        return Err(Error::Invalid(format!(
            "{what}: {a} values for {b}, weight of {w} values for ({n}, {k})"
        )));
    }
    Ok(())
}

/// Ranges of `len` (in whole [`LANES`] where possible), one per thread when the weight has
/// `weights` values or more than [`PARALLEL_FROM`].
fn parts(len: usize, weights: usize) -> Vec<Range<usize>> {
    let n = match weights >= PARALLEL_FROM {
        true => threads().min(len.div_ceil(LANES)).max(1),
        false => 1,
    };
    let per = len.div_ceil(LANES).div_ceil(n) * LANES;
    (0..n)
        .map(|p| (p * per).min(len)..((p + 1) * per).min(len))
        .filter(|r| !r.is_empty())
        .collect()
}

/// `f` on each of `parts` (the first on this thread, the others on threads of their own),
/// results in order.
fn on_parts<T: Send>(parts: &[Range<usize>], f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    if parts.is_empty() {
        return Vec::new();
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = parts[1..]
            .iter()
            .map(|r| {
                let r = r.clone();
                scope.spawn(move || f(r))
            })
            .collect();
        let mut out = vec![f(parts[0].clone())];
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("a matmul thread panicked")),
        );
        out
    })
}

/// Whether the AVX-512 kernels run on this CPU.
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// y = x·Wᵀ for x (m, k) and W (n, k), both row-major: y (m, n). y[i][j] is x_i·w_j summed in
/// [`LANES`] lanes (lane t adds the products of columns t, t + 16, … in order, each product
/// rounded, then added), the lanes then added pairwise ([`reduce`]).
pub fn x_wt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    check("x·Wᵀ", x.len(), m * k, w.len(), n, k)?;
    let parts = parts(n, w.len());
    let blocks = on_parts(&parts, |rows| {
        let mut out = vec![0f32; rows.len() * m];
        xwt_rows(x, m, w, k, rows, &mut out);
        out
    });
    // Each block is (its rows of W, m), weight-row major.
    let mut y = vec![0f32; m * n];
    for (r, block) in parts.iter().zip(&blocks) {
        for (j, col) in r.clone().zip(block.chunks_exact(m.max(1))) {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
    }
    Ok(y)
}

/// [`x_wt`] for the weight rows `rows`, into `out` (rows × m, weight-row major).
fn xwt_rows(x: &[f32], m: usize, w: &[f32], k: usize, rows: Range<usize>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F was detected; the lengths were checked by `x_wt`.
        unsafe { avx512::xwt_rows(x, m, w, k, rows, out) };
        return;
    }
    portable_xwt_rows(x, m, w, k, rows, out)
}

/// The reference for the AVX-512 kernel: the same lanes and order, one value at a time.
fn portable_xwt_rows(
    x: &[f32],
    m: usize,
    w: &[f32],
    k: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    for (jj, j) in rows.enumerate() {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; LANES];
            for c in (0..k).step_by(LANES) {
                for (t, a) in acc.iter_mut().enumerate() {
                    // Past k the lanes add 0·0, as the kernel's zero-filled loads do.
                    let p = match c + t < k {
                        true => xr[c + t] * wr[c + t],
                        false => 0.0,
                    };
                    *a += p;
                }
            }
            out[jj * m + i] = reduce(&acc);
        }
    }
}

/// The lanes added pairwise: lane t + 8 into lane t, then t + 4, t + 2, t + 1.
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut s = *a;
    let mut half = LANES / 2;
    while half > 0 {
        for t in 0..half {
            s[t] += s[t + half];
        }
        half /= 2;
    }
    s[0]
}

/// dx = dy·W for dy (m, n) and W (n, k), both row-major: dx (m, k). dx[i][c] adds
/// dy[i][j]·W[j][c] (each product rounded, then added) over j in order within blocks of
/// [`ROW_BLOCK`] rows, each block's sum then added to the total in order.
pub fn dy_w(dy: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    check("dy·W", dy.len(), m * n, w.len(), n, k)?;
    let parts = parts(k, w.len());
    let blocks = on_parts(&parts, |cols| {
        let mut out = vec![0f32; m * cols.len()];
        dyw_cols(dy, m, w, n, k, cols, &mut out);
        out
    });
    // Each block is (m, its columns), row-major.
    let mut dx = vec![0f32; m * k];
    for (r, block) in parts.iter().zip(&blocks) {
        for (i, part) in block.chunks_exact(r.len()).enumerate() {
            dx[i * k + r.start..i * k + r.end].copy_from_slice(part);
        }
    }
    Ok(dx)
}

/// [`dy_w`] for the output columns `cols`, into `out` (m × cols, row-major).
fn dyw_cols(
    dy: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F was detected; the lengths were checked by `dy_w`.
        unsafe { avx512::dyw_cols(dy, m, w, n, k, cols, out) };
        return;
    }
    portable_dyw_cols(dy, m, w, n, k, cols, out)
}

/// The reference for the AVX-512 kernel: the same sums in the same order.
fn portable_dyw_cols(
    dy: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    let mut part = vec![0f32; width];
    for i in 0..m {
        let o = &mut out[i * width..(i + 1) * width];
        for j0 in (0..n).step_by(ROW_BLOCK) {
            part.fill(0.0);
            for j in j0..(j0 + ROW_BLOCK).min(n) {
                let a = dy[i * n + j];
                let wr = &w[j * k + cols.start..j * k + cols.end];
                for (p, &v) in part.iter_mut().zip(wr) {
                    *p += a * v;
                }
            }
            for (t, &p) in o.iter_mut().zip(&part) {
                *t += p;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{reduce, LANES, ROW_BLOCK};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Runs `w` with AVX-512F, BW and VNNI enabled.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn wide<W: super::Wide>(w: W) -> W::Out {
        w.run()
    }

    /// The lanes below `left` (all 16 when `left` ≥ 16).
    #[inline(always)]
    fn mask(left: usize) -> __mmask16 {
        match left >= LANES {
            true => 0xffff,
            false => ((1u32 << left) - 1) as __mmask16,
        }
    }

    /// [`super::portable_xwt_rows`] with 512-bit registers: two weight rows at a time against
    /// 8, 4, 2 or 1 rows of x, the accumulators in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; x holds m rows and w the rows `rows` of k values, and out
    /// `rows.len()·m` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn xwt_rows(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        assert!(x.len() >= m * k && w.len() >= rows.end * k && out.len() >= rows.len() * m);
        let mut j = rows.start;
        while j < rows.end {
            let o = out.as_mut_ptr().add((j - rows.start) * m);
            let wr = w.as_ptr().add(j * k);
            if j + 2 <= rows.end {
                block::<2>(x.as_ptr(), m, wr, k, o);
                j += 2;
            } else {
                block::<1>(x.as_ptr(), m, wr, k, o);
                j += 1;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize>(
        x: *const f32,
        m: usize,
        w: *const f32,
        k: usize,
        out: *mut f32,
    ) {
        let mut i = 0;
        while i < m {
            match m - i {
                8.. => {
                    dots::<R, 8>(x, i, m, w, k, out);
                    i += 8;
                }
                4..=7 => {
                    dots::<R, 4>(x, i, m, w, k, out);
                    i += 4;
                }
                2..=3 => {
                    dots::<R, 2>(x, i, m, w, k, out);
                    i += 2;
                }
                _ => {
                    dots::<R, 1>(x, i, m, w, k, out);
                    i += 1;
                }
            }
        }
    }

    /// `out[r·m + i0 + i]` = x_{i0+i}·w_r for r < R, i < M.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dots<const R: usize, const M: usize>(
        x: *const f32,
        i0: usize,
        m: usize,
        w: *const f32,
        k: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut c = 0;
        while c < k {
            let lanes = mask(k - c);
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(lanes, w.add(r * k + c));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(lanes, x.add((i0 + i) * k + c));
                for (a, &wr) in row.iter_mut().zip(&wv) {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(xv, wr));
                }
            }
            c += LANES;
        }
        let mut lanes = [0f32; LANES];
        for (i, row) in acc.iter().enumerate() {
            for (r, &a) in row.iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr(), a);
                *out.add(r * m + i0 + i) = reduce(&lanes);
            }
        }
    }

    /// [`super::portable_dyw_cols`] with 512-bit registers: four weight rows at a time into
    /// the partial sums of 8, 4, 2 or 1 rows of dy (in order, so the sums are the same).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; dy holds m rows of n values, w n rows of k values, `cols`
    /// lies within k and out holds `m·cols.len()` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dyw_cols(
        dy: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        cols: Range<usize>,
        out: &mut [f32],
    ) {
        let width = cols.len();
        assert!(dy.len() >= m * n && w.len() >= n * k && cols.end <= k && out.len() >= m * width);
        // Partial sums padded to whole lanes (the padding adds 0 and is dropped).
        let padded = width.div_ceil(LANES) * LANES;
        let mut part = vec![0f32; m * padded];
        let wc = w.as_ptr().add(cols.start);
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + ROW_BLOCK).min(n);
            part.fill(0.0);
            let mut j = j0;
            while j < j1 {
                if j + 4 <= j1 {
                    rows::<4>(dy, m, n, wc, k, j, width, &mut part, padded);
                    j += 4;
                } else {
                    rows::<1>(dy, m, n, wc, k, j, width, &mut part, padded);
                    j += 1;
                }
            }
            for i in 0..m {
                for (o, &p) in out[i * width..(i + 1) * width]
                    .iter_mut()
                    .zip(&part[i * padded..])
                {
                    *o += p;
                }
            }
            j0 = j1;
        }
    }

    /// Weight rows j..j + J into every row's partial sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const J: usize>(
        dy: &[f32],
        m: usize,
        n: usize,
        w: *const f32,
        k: usize,
        j: usize,
        width: usize,
        part: &mut [f32],
        padded: usize,
    ) {
        let mut i = 0;
        while i < m {
            match m - i {
                8.. => {
                    axpy::<J, 8>(dy, i, n, w, k, j, width, part, padded);
                    i += 8;
                }
                4..=7 => {
                    axpy::<J, 4>(dy, i, n, w, k, j, width, part, padded);
                    i += 4;
                }
                2..=3 => {
                    axpy::<J, 2>(dy, i, n, w, k, j, width, part, padded);
                    i += 2;
                }
                _ => {
                    axpy::<J, 1>(dy, i, n, w, k, j, width, part, padded);
                    i += 1;
                }
            }
        }
    }

    /// `part[i] += dy[i][j + r] · w_{j+r}` for r < J in order, i in i0..i0 + M.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn axpy<const J: usize, const M: usize>(
        dy: &[f32],
        i0: usize,
        n: usize,
        w: *const f32,
        k: usize,
        j: usize,
        width: usize,
        part: &mut [f32],
        padded: usize,
    ) {
        let mut a = [[0f32; J]; M];
        let mut any = false;
        for (i, row) in a.iter_mut().enumerate() {
            for (r, v) in row.iter_mut().enumerate() {
                *v = dy[(i0 + i) * n + j + r];
                any |= *v != 0.0;
            }
        }
        if !any {
            // 0·w is ±0 for finite w, and adding ±0 leaves every partial sum as it is (they
            // start at +0, and +0 + −0 = +0): rows of dy that are zero here (the unembedding's
            // gradient outside the scored positions) cost nothing.
            return;
        }
        let mut c = 0;
        while c < width {
            let lanes = mask(width - c);
            let mut wv = [_mm512_setzero_ps(); J];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(lanes, w.add((j + r) * k + c));
            }
            for (i, coef) in a.iter().enumerate() {
                let at = part.as_mut_ptr().add((i0 + i) * padded + c);
                let mut p = _mm512_loadu_ps(at);
                for r in 0..J {
                    p = _mm512_add_ps(p, _mm512_mul_ps(_mm512_set1_ps(coef[r]), wv[r]));
                }
                _mm512_storeu_ps(at, p);
            }
            c += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, state: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Both products equal candle's matmul to 1e-6 of Σ|a||b| (the scale of each sum's
    /// rounding), including m = 1, sizes off whole lanes, zero rows of dy and the split over
    /// the cores; the detected kernel equals the portable one bit for bit, and every row equals
    /// its own product alone.
    #[test]
    fn small_m_products_equal_candles_matmul() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let cpu = &Device::Cpu;
        for (m, n, k) in [
            (1, 5, 3),
            (7, 37, 50),
            (3, 16, 16),
            (8, 130, 17),
            (13, 576, 192),
            (16, 700, 300),
        ] {
            let x = random(m * k, &mut state);
            let w = random(n * k, &mut state);
            let mut dy = random(m * n, &mut state);
            dy[..n.min(m * n)].fill(0.0);
            let (xt, wt) = (
                Tensor::from_slice(&x, (m, k), cpu).unwrap(),
                Tensor::from_slice(&w, (n, k), cpu).unwrap(),
            );
            let dyt = Tensor::from_slice(&dy, (m, n), cpu).unwrap();
            let want_y: Vec<f32> = xt
                .matmul(&wt.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want_dx: Vec<f32> = dyt
                .matmul(&wt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let y = x_wt(&x, m, &w, n, k).unwrap();
            let dx = dy_w(&dy, m, &w, n, k).unwrap();
            let mut slow = vec![0f32; n * m];
            portable_xwt_rows(&x, m, &w, k, 0..n, &mut slow);
            let slow: Vec<f32> = (0..m * n).map(|e| slow[(e % n) * m + e / n]).collect();
            assert_eq!(y, slow, "portable x·Wᵀ ({m},{n},{k})");
            let mut slow = vec![0f32; m * k];
            portable_dyw_cols(&dy, m, &w, n, k, 0..k, &mut slow);
            assert_eq!(dx, slow, "portable dy·W ({m},{n},{k})");
            for i in 0..m {
                for j in 0..n {
                    let scale: f32 = (0..k).map(|c| (x[i * k + c] * w[j * k + c]).abs()).sum();
                    let (a, b) = (y[i * n + j], want_y[i * n + j]);
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "y ({m},{n},{k}) [{i}][{j}]: {a} vs {b}"
                    );
                }
                for c in 0..k {
                    let scale: f32 = (0..n).map(|j| (dy[i * n + j] * w[j * k + c]).abs()).sum();
                    let (a, b) = (dx[i * k + c], want_dx[i * k + c]);
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "dx ({m},{n},{k}) [{i}][{c}]: {a} vs {b}"
                    );
                }
                let alone = x_wt(&x[i * k..(i + 1) * k], 1, &w, n, k).unwrap();
                assert_eq!(alone, y[i * n..(i + 1) * n], "y row {i} alone");
                let alone = dy_w(&dy[i * n..(i + 1) * n], 1, &w, n, k).unwrap();
                assert_eq!(alone, dx[i * k..(i + 1) * k], "dx row {i} alone");
            }
        }
        // Big enough for the threads: the same numbers as the portable sums on one core.
        let (m, n, k) = (7, 1536, 576);
        let x = random(m * k, &mut state);
        let w = random(n * k, &mut state);
        let dy = random(m * n, &mut state);
        assert_eq!(parts(k, n * k).len(), threads().min(k / LANES));
        let mut one = vec![0f32; n * m];
        portable_xwt_rows(&x, m, &w, k, 0..n, &mut one);
        let y = x_wt(&x, m, &w, n, k).unwrap();
        for j in 0..n {
            for i in 0..m {
                assert_eq!(y[i * n + j], one[j * m + i]);
            }
        }
        let mut one = vec![0f32; m * k];
        portable_dyw_cols(&dy, m, &w, n, k, 0..k, &mut one);
        assert_eq!(dy_w(&dy, m, &w, n, k).unwrap(), one);
        assert!(x_wt(&x, m, &w, n, k + 1).is_err());
        assert!(dy_w(&dy, m + 1, &w, n, k).is_err());
    }
}
