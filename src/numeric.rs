//! Small numeric kernels shared by the lens, the edits, audit and eval: argmax, log-softmax,
//! ranks, dot products, Cholesky and a symmetric eigensolver. Plain slices in, plain values out.

use crate::{Error, Result};

/// Index of the largest value.
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// [`argmax`] of logits that must all be finite (a NaN would make every comparison false and
/// the answer meaningless).
pub fn finite_argmax(logits: &[f32]) -> Result<usize> {
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numeric(format!(
            "logit {i} is {}: the model's weights hold NaN or Inf",
            logits[i]
        )));
    }
    Ok(argmax(logits))
}

/// Log-softmax of f32 logits, computed in f64.
pub fn log_probs(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Rank of `id` in `scores` (how many tokens score strictly higher).
pub fn rank_of(scores: &[f32], id: u32) -> usize {
    let s = scores[id as usize];
    scores.iter().filter(|&&x| x > s).count()
}

/// Solves L Lᵀ z = v for a lower-triangular row-major factor `l` (n, n).
pub fn cholesky_solve(l: &[f64], n: usize, mut y: Vec<f64>) -> Vec<f64> {
    for i in 0..n {
        let s = dot(&l[i * n..i * n + i], &y[..i]);
        y[i] = (y[i] - s) / l[i * n + i];
    }
    for i in (0..n).rev() {
        y[i] /= l[i * n + i];
        let zi = y[i];
        for (yk, &lik) in y[..i].iter_mut().zip(&l[i * n..i * n + i]) {
            *yk -= lik * zi;
        }
    }
    y
}

/// Dot product of two f64 slices (four partial sums, so it vectorizes).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// In-place lower Cholesky factorization of the symmetric positive definite row-major (n, n)
/// matrix `a` (only its lower triangle is read; the upper one is zeroed). Err(i): pivot i ≤ 0.
pub fn cholesky_in_place(a: &mut [f64], n: usize) -> std::result::Result<(), usize> {
    for i in 0..n {
        let (before, rest) = a.split_at_mut(i * n);
        let row_i = &mut rest[..n];
        for j in 0..i {
            let row_j = &before[j * n..j * n + j + 1];
            let s = dot(&row_i[..j], &row_j[..j]);
            row_i[j] = (row_i[j] - s) / row_j[j];
        }
        let d = row_i[i] - dot(&row_i[..i], &row_i[..i]);
        if !(d.is_finite() && d > 0.0) {
            return Err(i);
        }
        row_i[i] = d.sqrt();
        row_i[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    }
    Ok(())
}

/// The lower Cholesky factor of a symmetric positive definite matrix that grows by one row and
/// column at a time (rows stored ragged: row i holds i + 1 entries).
#[derive(Debug, Clone, Default)]
pub struct GrowingCholesky {
    rows: Vec<Vec<f64>>,
}

impl GrowingCholesky {
    /// Order of the factored matrix.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing has been pushed.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Extends the matrix by the column `col` (its entries against the existing rows) and the
    /// diagonal `diag`. Err(pivot) when the extended matrix is not positive definite (the factor
    /// is left unchanged).
    pub fn push(&mut self, col: &[f64], diag: f64) -> std::result::Result<(), f64> {
        assert_eq!(col.len(), self.rows.len(), "one entry per existing row");
        let mut row = Vec::with_capacity(col.len() + 1);
        for (j, &c) in col.iter().enumerate() {
            let s = dot(&row[..j], &self.rows[j][..j]);
            row.push((c - s) / self.rows[j][j]);
        }
        let d = diag - dot(&row, &row);
        if !(d.is_finite() && d > 0.0) {
            return Err(d);
        }
        row.push(d.sqrt());
        self.rows.push(row);
        Ok(())
    }

    /// Solves L Lᵀ y = b.
    pub fn solve(&self, mut y: Vec<f64>) -> Vec<f64> {
        let n = self.rows.len();
        for i in 0..n {
            let s = dot(&self.rows[i][..i], &y[..i]);
            y[i] = (y[i] - s) / self.rows[i][i];
        }
        for i in (0..n).rev() {
            y[i] /= self.rows[i][i];
            let yi = y[i];
            for (yk, &lik) in y[..i].iter_mut().zip(&self.rows[i][..i]) {
                *yk -= lik * yi;
            }
        }
        y
    }
}

/// y += a·x.
pub fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Euclidean norm.
pub fn norm2(v: &[f64]) -> f64 {
    dot(v, v).sqrt()
}

/// `v` scaled to unit length (unchanged when zero).
pub fn unit(mut v: Vec<f64>) -> Vec<f64> {
    let n = norm2(&v);
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Eigen-decomposition of a symmetric n × n matrix (row-major): eigenvalues in descending order
/// and the matching orthonormal eigenvectors, one per row. Householder reduction to tridiagonal
/// form, then implicit QR steps with Wilkinson shifts; every step is deterministic.
pub fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    assert_eq!(a.len(), n * n, "square matrix expected");
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    // Householder: step k zeroes column k below the subdiagonal with H = I − 2vvᵀ acting on
    // indices k+1..n, so A = Q T Qᵀ with Q = H₀ H₁ ⋯.
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(n.saturating_sub(2));
    for k in 0..n.saturating_sub(2) {
        let off = k + 1;
        let m = n - off;
        let x: Vec<f64> = (0..m).map(|i| a[(off + i) * n + k]).collect();
        if x[1..].iter().all(|&v| v == 0.0) {
            reflectors.push(Vec::new());
            continue;
        }
        let norm = norm2(&x);
        let alpha = if x[0] > 0.0 { -norm } else { norm };
        let mut v = x;
        v[0] -= alpha;
        let vn = norm2(&v);
        v.iter_mut().for_each(|e| *e /= vn);
        // S ← H S H = S − v wᵀ − w vᵀ with p = S v, w = 2p − 2(vᵀp) v.
        let p: Vec<f64> = (0..m)
            .map(|i| dot(&a[(off + i) * n + off..(off + i + 1) * n], &v))
            .collect();
        let vp = dot(&v, &p);
        let w: Vec<f64> = p
            .iter()
            .zip(&v)
            .map(|(pi, vi)| 2.0 * pi - 2.0 * vp * vi)
            .collect();
        for i in 0..m {
            let row = &mut a[(off + i) * n + off..(off + i + 1) * n];
            let (vi, wi) = (v[i], w[i]);
            for j in 0..m {
                row[j] -= vi * w[j] + wi * v[j];
            }
        }
        a[off * n + k] = alpha;
        a[k * n + off] = alpha;
        for i in 1..m {
            a[(off + i) * n + k] = 0.0;
            a[k * n + off + i] = 0.0;
        }
        reflectors.push(v);
    }
    let mut d: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    let mut e: Vec<f64> = (0..n - 1).map(|i| a[i * n + i + 1]).collect();
    drop(a);
    // Q by backward accumulation, stored row-major; then its columns as rows (vt).
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        q[i * n + i] = 1.0;
    }
    for (k, v) in reflectors.iter().enumerate().rev() {
        if v.is_empty() {
            continue;
        }
        let off = k + 1;
        let mut t = vec![0.0; n - off];
        for (i, &vi) in v.iter().enumerate() {
            axpy(&mut t, vi, &q[(off + i) * n + off..(off + i + 1) * n]);
        }
        for (i, &vi) in v.iter().enumerate() {
            axpy(
                &mut q[(off + i) * n + off..(off + i + 1) * n],
                -2.0 * vi,
                &t,
            );
        }
    }
    let mut vt: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| q[j * n + i]).collect())
        .collect();
    drop(q);
    // Implicit symmetric QR on (d, e); each rotation R acts on rows k, k+1 of vt.
    let anorm = d
        .iter()
        .zip(e.iter().chain(std::iter::once(&0.0)))
        .map(|(x, y)| x.abs() + y.abs())
        .fold(0.0, f64::max);
    let floor = f64::EPSILON * f64::EPSILON * anorm;
    let negligible =
        |e: f64, a: f64, b: f64| e.abs() <= f64::EPSILON * (a.abs() + b.abs()) || e.abs() <= floor;
    let max_iter = 50 * n + 50;
    let mut iter = 0;
    let mut hi = n - 1;
    while hi > 0 {
        if negligible(e[hi - 1], d[hi - 1], d[hi]) {
            e[hi - 1] = 0.0;
            hi -= 1;
            continue;
        }
        let mut lo = hi - 1;
        while lo > 0 && !negligible(e[lo - 1], d[lo - 1], d[lo]) {
            lo -= 1;
        }
        iter += 1;
        if iter > max_iter {
            return Err(Error::Numeric(format!(
                "symmetric eigen-solver did not converge for a {n} × {n} matrix"
            )));
        }
        let delta = (d[hi - 1] - d[hi]) / 2.0;
        let b = e[hi - 1];
        let sign = if delta >= 0.0 { 1.0 } else { -1.0 };
        let mu = d[hi] - b * b / (delta + sign * delta.hypot(b));
        let (mut x, mut z) = (d[lo] - mu, e[lo]);
        for k in lo..hi {
            let r = x.hypot(z);
            let (c, s) = if r == 0.0 { (1.0, 0.0) } else { (x / r, z / r) };
            if k > lo {
                e[k - 1] = r;
            }
            let (a0, b0, f0) = (d[k], e[k], d[k + 1]);
            d[k] = c * c * a0 + 2.0 * c * s * b0 + s * s * f0;
            d[k + 1] = s * s * a0 - 2.0 * c * s * b0 + c * c * f0;
            e[k] = c * s * (f0 - a0) + (c * c - s * s) * b0;
            if k + 1 < hi {
                z = s * e[k + 1];
                e[k + 1] *= c;
                x = e[k];
            }
            let (top, bottom) = vt.split_at_mut(k + 1);
            for (p, q) in top[k].iter_mut().zip(bottom[0].iter_mut()) {
                let (vp, vq) = (*p, *q);
                *p = c * vp + s * vq;
                *q = c * vq - s * vp;
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]).then(i.cmp(&j)));
    let values = order.iter().map(|&i| d[i]).collect();
    let vectors = order.iter().map(|&i| std::mem::take(&mut vt[i])).collect();
    Ok((values, vectors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers in [−1, 1) (also used by other modules' tests).
    pub(crate) fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn check_eigen(a: &[f64], n: usize) {
        let (vals, vecs) = symmetric_eigen(a.to_vec(), n).unwrap();
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1.0);
        for w in vals.windows(2) {
            assert!(w[0] >= w[1]);
        }
        for (lam, v) in vals.iter().zip(&vecs) {
            assert!((norm2(v) - 1.0).abs() < 1e-10);
            for i in 0..n {
                let av = dot(&a[i * n..(i + 1) * n], v);
                assert!(
                    (av - lam * v[i]).abs() < 1e-9 * scale * n as f64,
                    "A v ≠ λ v"
                );
            }
        }
        for i in 0..n {
            for j in 0..i {
                assert!(dot(&vecs[i], &vecs[j]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn eigen_random_and_special() {
        let mut seed = 7;
        for n in [1, 2, 3, 5, 17, 60] {
            let mut a = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let v = lcg(&mut seed);
                    a[i * n + j] = v;
                    a[j * n + i] = v;
                }
            }
            check_eigen(&a, n);
        }
        // Diagonal with repeats, and zero.
        let n = 6;
        let mut a = vec![0.0; n * n];
        for (i, v) in [3.0, 1.0, 3.0, 0.0, -2.0, 1.0].iter().enumerate() {
            a[i * n + i] = *v;
        }
        check_eigen(&a, n);
        check_eigen(&[0.0; 16], 4);
        // Rank one: u uᵀ.
        let u: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
        let a: Vec<f64> = (0..1600).map(|k| u[k / 40] * u[k % 40]).collect();
        let (vals, vecs) = symmetric_eigen(a.clone(), 40).unwrap();
        assert!((vals[0] - dot(&u, &u)).abs() < 1e-10);
        assert!(vals[1].abs() < 1e-12);
        assert!((dot(&vecs[0], &u).abs() - norm2(&u)).abs() < 1e-10);
        check_eigen(&a, 40);
    }
}
