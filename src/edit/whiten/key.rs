//! The factored whitening matrix C and the whitened key k = C'⁻¹x / (xᵀC'⁻¹x).

use super::{Moments, WhitenOptions};
use crate::numeric::{cholesky_in_place, cholesky_solve, dot};
use crate::{Error, Result};

/// The factored whitening matrix C = E[a aᵀ] + β·E[a_last a_lastᵀ] + λ·I of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStats {
    /// Layer the statistics belong to.
    pub layer: usize,
    /// Width of the FF2 input (n_ff).
    pub n: usize,
    /// Positions the all-position moment was accumulated over.
    pub count: usize,
    /// Mean diagonal of the (weighted) second moment: the scale λ and γ are relative to.
    pub scale: f64,
    /// λ added to the diagonal.
    pub lambda: f64,
    /// Options used.
    pub options: WhitenOptions,
    /// Lower-triangular Cholesky factor of C, row-major (n, n).
    chol: Vec<f64>,
}

impl KeyStats {
    /// Factors C = `moment` + λ·I with λ = `lambda_ratio` · mean diagonal of `moment` (n, n).
    pub fn new(
        layer: usize,
        n: usize,
        count: usize,
        moment: Vec<f64>,
        options: WhitenOptions,
    ) -> Result<KeyStats> {
        options.check()?;
        if moment.len() != n * n || n == 0 {
            return Err(Error::Invalid(format!(
                "key statistics of layer {layer}: a moment of {} values for width {n}",
                moment.len()
            )));
        }
        let scale = (0..n).map(|i| moment[i * n + i]).sum::<f64>() / n as f64;
        let lambda = options.lambda_ratio * scale;
        let mut chol = moment;
        for i in 0..n {
            chol[i * n + i] += lambda;
        }
        cholesky_in_place(&mut chol, n).map_err(|i| {
            Error::Invalid(format!(
                "key statistics of layer {layer}: C is not positive definite (pivot {i})"
            ))
        })?;
        Ok(KeyStats {
            layer,
            n,
            count,
            scale,
            lambda,
            options,
            chol,
        })
    }

    /// Factors C from raw moments: `all` + β·`last` (+ λ·I).
    pub fn from_moments(layer: usize, m: &Moments, options: WhitenOptions) -> Result<KeyStats> {
        let n = m.mean.len();
        if m.all.len() != n * n || m.last.len() != n * n || m.count == 0 {
            return Err(Error::Invalid(format!(
                "key statistics of layer {layer}: inconsistent moments ({} and {} values for \
                 width {n}, {} positions)",
                m.all.len(),
                m.last.len(),
                m.count
            )));
        }
        let beta = options.last_weight;
        let moment = m
            .all
            .iter()
            .zip(&m.last)
            .map(|(a, l)| a + beta * l)
            .collect();
        KeyStats::new(layer, n, m.count, moment, options)
    }

    /// Solves C z = v.
    pub fn solve(&self, v: &[f64]) -> Vec<f64> {
        cholesky_solve(&self.chol, self.n, v.to_vec())
    }

    /// The whitened key k = C⁻¹x / (xᵀC⁻¹x), so that k·x = 1.
    pub fn key(&self, x: &[f32]) -> Result<Vec<f64>> {
        self.key_with_contrast(x, &[])
    }

    /// The key with contrast inputs: k = C'⁻¹x / (xᵀC'⁻¹x) for
    /// C' = C + (γ/J)·Σⱼ xⱼ xⱼᵀ, γ = `contrast_weight` · `scale` (Woodbury on C's factor).
    pub fn key_with_contrast(&self, x: &[f32], contrast: &[Vec<f32>]) -> Result<Vec<f64>> {
        self.key_toward(x, x, contrast)
    }

    /// The key along C'⁻¹·`dir` scaled so that k·x = 1 (`dir` = x gives
    /// [`KeyStats::key_with_contrast`]).
    pub fn key_toward(&self, dir: &[f32], x: &[f32], contrast: &[Vec<f32>]) -> Result<Vec<f64>> {
        let layer = self.layer;
        if x.len() != self.n || dir.len() != self.n || contrast.iter().any(|c| c.len() != self.n) {
            return Err(Error::Invalid(format!(
                "key of width {} for the statistics of layer {layer} (width {})",
                x.len(),
                self.n
            )));
        }
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dd: Vec<f64> = dir.iter().map(|&v| v as f64).collect();
        let mut z = self.solve(&dd);
        let gamma = self.options.contrast_weight * self.scale;
        let j = contrast.len();
        if j > 0 && gamma > 0.0 {
            // C'⁻¹x = z − C⁻¹U (I + UᵀC⁻¹U)⁻¹ Uᵀz with U = √(γ/J)·[x₁ … x_J].
            let w = (gamma / j as f64).sqrt();
            let u: Vec<Vec<f64>> = contrast
                .iter()
                .map(|c| c.iter().map(|&v| v as f64 * w).collect())
                .collect();
            let cu: Vec<Vec<f64>> = u.iter().map(|v| self.solve(v)).collect();
            let mut g = vec![0f64; j * j];
            for a in 0..j {
                for b in 0..=a {
                    g[a * j + b] = dot(&u[a], &cu[b]) + if a == b { 1.0 } else { 0.0 };
                }
            }
            cholesky_in_place(&mut g, j).map_err(|_| {
                Error::Invalid(format!(
                    "layer {layer}: the contrast inputs give a singular system"
                ))
            })?;
            let rhs: Vec<f64> = u.iter().map(|v| dot(v, &z)).collect();
            let coef = cholesky_solve(&g, j, rhs);
            for (c, v) in coef.iter().zip(&cu) {
                for (zi, vi) in z.iter_mut().zip(v) {
                    *zi -= c * vi;
                }
            }
        }
        let q = dot(&xd, &z);
        if !(q.is_finite() && q > 0.0) {
            return Err(Error::Invalid(format!(
                "layer {layer}: the whitened key is orthogonal to the FF2 input at the edit \
                 prompt: nothing to key on"
            )));
        }
        Ok(z.iter().map(|v| v / q).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        // B Bᵀ + I for a deterministic B.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 101) as f64 / 50.0) - 1.0)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        a
    }

    fn opts(contrast_weight: f64) -> WhitenOptions {
        WhitenOptions {
            lambda_ratio: 1e-12,
            last_weight: 0.0,
            contrast_weight,
            context: false,
        }
    }

    #[test]
    fn cholesky_solves() {
        let n = 37;
        let a = spd(n);
        let stats = KeyStats::new(0, n, 1, a.clone(), opts(0.0)).unwrap();
        let v: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
        let z = stats.solve(&v);
        for i in 0..n {
            let az: f64 = (0..n).map(|j| a[i * n + j] * z[j]).sum();
            assert!((az - v[i]).abs() < 1e-8, "row {i}: {az} vs {}", v[i]);
        }
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        let k = stats.key(&x).unwrap();
        let kx: f64 = k.iter().zip(&x).map(|(a, b)| a * *b as f64).sum();
        assert!((kx - 1.0).abs() < 1e-10);
    }

    #[test]
    fn woodbury_contrast_matches_dense_solve() {
        let n = 23;
        let a = spd(n);
        let stats = KeyStats::new(0, n, 1, a.clone(), opts(3.0)).unwrap();
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() + 0.5).collect();
        let negs: Vec<Vec<f32>> = (0..4)
            .map(|j| {
                (0..n)
                    .map(|i| ((i * (j + 2)) as f32 * 0.37).cos())
                    .collect()
            })
            .collect();
        let k = stats.key_with_contrast(&x, &negs).unwrap();
        // Dense C' = A + λI + (γ/J) Σ xⱼ xⱼᵀ, γ = 3 · mean diag(A).
        let gamma = 3.0 * stats.scale / negs.len() as f64;
        let mut c = a.clone();
        for i in 0..n {
            c[i * n + i] += stats.lambda;
            for j in 0..n {
                c[i * n + j] += gamma * negs.iter().map(|v| v[i] as f64 * v[j] as f64).sum::<f64>();
            }
        }
        let dense = KeyStats::new(0, n, 1, c, opts(0.0)).unwrap();
        let want = dense.key(&x).unwrap();
        let top = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let err = k
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / top;
        assert!(err < 1e-9, "relative error {err}");
        let kx: f64 = k.iter().zip(&x).map(|(a, b)| a * *b as f64).sum();
        assert!((kx - 1.0).abs() < 1e-10);
    }

    #[test]
    fn errors_name_the_layer() {
        let mut not_pd = vec![0f64; 4];
        not_pd[0] = -1.0;
        let err = KeyStats::new(7, 2, 1, not_pd, opts(0.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 7") && err.contains("positive definite"),
            "{err}"
        );
        let stats = KeyStats::new(5, 3, 1, spd(3), opts(0.0)).unwrap();
        let err = stats.key(&[1.0, 2.0]).unwrap_err().to_string();
        assert!(err.contains("layer 5"), "{err}");
    }
}
