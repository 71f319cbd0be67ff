//! The paper's other readings of one backward pass: the rank and singular values of each
//! layer's FF2 gradient (Lemma 4.1) from n×n Gram matrices, the cosine similarity of
//! residual-stream VJPs across layers (Appendix G), and the scale between the plain and the
//! normalised logit lens.

use crate::model::Norm;
use crate::numeric::symmetric_eigen;
use crate::Result;
use serde::Serialize;

/// Singular values below this fraction of the largest count as zero.
pub const RANK_TOL: f64 = 1e-6;

/// The FF2 gradient ∂L/∂W = Σₜ δₜ aₜᵀ of one layer, read from its spanning set.
#[derive(Debug, Clone, Serialize)]
pub struct GradRank {
    /// Numerical rank: singular values above `RANK_TOL` × the largest.
    pub rank: usize,
    /// Fed tokens whose δ is not exactly zero (Lemma 4.1: the rank is at most this).
    pub nonzero_tokens: usize,
    /// Singular values, largest first (one per fed token).
    pub singular_values: Vec<f64>,
}

/// Gram of rows: (n, n) row-major, entries in f64.
fn gram(rows: &[Vec<f32>]) -> Vec<f64> {
    let n = rows.len();
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let v: f64 = rows[i]
                .iter()
                .zip(&rows[j])
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum();
            g[i * n + j] = v;
            g[j * n + i] = v;
        }
    }
    g
}

/// Product of row-major (n, n) matrices.
fn mul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    c
}

/// Rank and singular values of G = Σₜ δₜ aₜᵀ (rows `d` and `a`, one per token) without forming
/// G: with K_a = A Aᵀ = U Λ Uᵀ and S = U Λ^½ Uᵀ, the nonzero eigenvalues of GᵀG = Aᵀ K_d A
/// are those of the symmetric n×n matrix S K_d S.
pub fn grad_rank(d: &[Vec<f32>], a: &[Vec<f32>]) -> Result<GradRank> {
    let n = d.len().min(a.len());
    let (d, a) = (&d[..n], &a[..n]);
    let (lambda, u) = symmetric_eigen(gram(a), n)?;
    let mut s = vec![0.0; n * n];
    for (l, v) in lambda.iter().zip(&u) {
        let r = l.max(0.0).sqrt();
        for i in 0..n {
            for j in 0..n {
                s[i * n + j] += r * v[i] * v[j];
            }
        }
    }
    let m = mul(&mul(&s, &gram(d), n), &s, n);
    let (sigma2, _) = symmetric_eigen(m, n)?;
    let singular_values: Vec<f64> = sigma2.iter().map(|x| x.max(0.0).sqrt()).collect();
    let max = singular_values.first().copied().unwrap_or(0.0);
    Ok(GradRank {
        rank: singular_values
            .iter()
            .filter(|&&x| max > 0.0 && x > RANK_TOL * max)
            .count(),
        nonzero_tokens: d.iter().filter(|r| r.iter().any(|&x| x != 0.0)).count(),
        singular_values,
    })
}

/// Cosine similarity of every pair of vectors (0 where one is zero).
pub fn cosine_matrix(vectors: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let norms: Vec<f64> = vectors
        .iter()
        .map(|v| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    vectors
        .iter()
        .zip(&norms)
        .map(|(u, nu)| {
            vectors
                .iter()
                .zip(&norms)
                .map(|(v, nv)| {
                    let dot: f64 = u.iter().zip(v).map(|(&x, &y)| x as f64 * y as f64).sum();
                    match nu * nv > 0.0 {
                        true => (dot / (nu * nv)) as f32,
                        false => 0.0,
                    }
                })
                .collect()
        })
        .collect()
}

/// The positive factor c with scores(v/‖v‖) = c · scores(v) when the final norm has no shift
/// (RMSNorm, bias-free LayerNorm) or is skipped (`norm` None): for a norm with ε,
/// c = √(var + ε) / √(var + ‖v‖²ε) (var the mean square after centring); without it, 1/‖v‖.
/// None for a norm with a shift, whose unit-vector scores need their own projection.
pub fn unit_factor(norm: Option<&Norm>, v: &[f32]) -> Option<f64> {
    let s2: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
    if s2 == 0.0 {
        return Some(0.0);
    }
    let Some(norm) = norm else {
        return Some(1.0 / s2.sqrt());
    };
    if norm.b.is_some() {
        return None;
    }
    let n = v.len() as f64;
    let mean = match norm.rms {
        true => 0.0,
        false => v.iter().map(|&x| x as f64).sum::<f64>() / n,
    };
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    Some(((var + norm.eps) / (var + s2 * norm.eps)).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Singular values of G from the eigenvalues of GᵀG formed explicitly.
    fn explicit(d: &[Vec<f32>], a: &[Vec<f32>]) -> Vec<f64> {
        let (m, f) = (d[0].len(), a[0].len());
        let mut gtg = vec![0.0; f * f];
        let g: Vec<f64> = (0..m * f)
            .map(|ij| {
                let (i, j) = (ij / f, ij % f);
                d.iter()
                    .zip(a)
                    .map(|(dt, at)| dt[i] as f64 * at[j] as f64)
                    .sum()
            })
            .collect();
        for p in 0..f {
            for q in 0..f {
                gtg[p * f + q] = (0..m).map(|i| g[i * f + p] * g[i * f + q]).sum();
            }
        }
        let (l, _) = symmetric_eigen(gtg, f).unwrap();
        l.iter().map(|x| x.max(0.0).sqrt()).collect()
    }

    #[test]
    fn gram_singular_values_equal_the_explicit_ones() {
        let row = |seed: u32, w: usize| -> Vec<f32> {
            (0..w)
                .map(|i| ((seed * 31 + i as u32 * 17) % 13) as f32 - 6.0)
                .collect()
        };
        // Token 2's δ is zero: rank 3 of 4 tokens.
        let d = vec![row(1, 5), row(2, 5), vec![0.0; 5], row(4, 5)];
        let a = vec![row(5, 7), row(6, 7), row(7, 7), row(8, 7)];
        let r = grad_rank(&d, &a).unwrap();
        let explicit = explicit(&d, &a);
        // The explicit route squares G, so its zero singular values come out near √ε·σ₁.
        for (got, want) in r.singular_values.iter().zip(&explicit) {
            assert!((got - want).abs() <= 1e-6 * explicit[0], "{got} vs {want}");
        }
        assert_eq!((r.rank, r.nonzero_tokens), (3, 3));
        let c = cosine_matrix(&[vec![1.0, 0.0], vec![1.0, 1.0], vec![0.0, 0.0]]);
        assert!((c[0][1] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
        assert_eq!((c[0][0], c[2][1]), (1.0, 0.0));
    }
}
