//! What a change ΔW is, numerically: the [`Operator`] (dense, or LoRA factors never made dense)
//! and its singular values and leading singular pair, in f64 and deterministically. A dense ΔW
//! goes through its Gram matrix on the smaller side (ΔW ΔWᵀ or ΔWᵀ ΔW); a LoRA pair through r × r
//! matrices built from the factors; both are diagonalized by [`symmetric_eigen`].

use super::{MAX_GRAM_DIM, RANK_ABS_TOL};
use crate::lora::Factors;
use crate::numeric::{axpy, dot, symmetric_eigen, unit};
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// ΔW of one tensor, dense or as LoRA factors.
pub(super) enum Operator {
    /// Row-major (m, n).
    Dense { m: usize, n: usize, w: Vec<f64> },
    /// scale · B·A with B (m, r) and A (r, n), both row-major.
    LowRank {
        m: usize,
        n: usize,
        r: usize,
        b: Vec<f64>,
        a: Vec<f64>,
        scale: f64,
    },
}

impl From<Factors> for Operator {
    fn from(f: Factors) -> Operator {
        Operator::LowRank {
            m: f.m,
            n: f.n,
            r: f.r,
            b: f.b,
            a: f.a,
            scale: f.scale,
        }
    }
}

impl Operator {
    /// (rows, columns) of ΔW.
    pub(super) fn dims(&self) -> (usize, usize) {
        match *self {
            Operator::Dense { m, n, .. } | Operator::LowRank { m, n, .. } => (m, n),
        }
    }

    /// ΔW·x.
    pub(super) fn apply(&self, x: &[f64]) -> Vec<f64> {
        match self {
            Operator::Dense { n, w, .. } => w.chunks_exact(*n).map(|row| dot(row, x)).collect(),
            Operator::LowRank {
                r, b, a, scale, n, ..
            } => {
                let ax: Vec<f64> = a.chunks_exact(*n).map(|row| scale * dot(row, x)).collect();
                b.chunks_exact(*r).map(|row| dot(row, &ax)).collect()
            }
        }
    }

    /// ΔWᵀ·y.
    fn apply_t(&self, y: &[f64]) -> Vec<f64> {
        match self {
            Operator::Dense { n, w, .. } => {
                let mut out = vec![0.0; *n];
                for (row, &yi) in w.chunks_exact(*n).zip(y) {
                    axpy(&mut out, yi, row);
                }
                out
            }
            Operator::LowRank {
                n, r, b, a, scale, ..
            } => {
                let mut by = vec![0.0; *r];
                for (row, &yi) in b.chunks_exact(*r).zip(y) {
                    axpy(&mut by, yi * scale, row);
                }
                let mut out = vec![0.0; *n];
                for (row, &c) in a.chunks_exact(*n).zip(&by) {
                    axpy(&mut out, c, row);
                }
                out
            }
        }
    }
}

/// Leading singular triplet and spectrum of a ΔW.
#[derive(Debug, Clone)]
pub(super) struct Spectrum {
    /// All singular values the method yields, descending.
    pub(super) sigma: Vec<f64>,
    /// ‖ΔW‖_F².
    pub(super) energy: f64,
    /// Unit u₁ (empty when ΔW = 0).
    pub(super) u1: Vec<f64>,
    /// Unit v₁ (empty when ΔW = 0).
    pub(super) v1: Vec<f64>,
}

/// Singular values and the leading singular pair of ΔW.
pub(super) fn spectrum(op: &Operator, name: &str) -> Result<Spectrum> {
    match op {
        Operator::Dense { m, n, w } => dense_spectrum(*m, *n, w, op, name),
        Operator::LowRank {
            m,
            r,
            b,
            a,
            scale,
            n,
        } => {
            // A·Aᵀ = Q Λ Qᵀ, L = Q Λ^½, C = s·B·L: then ΔW ΔWᵀ = C Cᵀ, whose non-zero spectrum is
            // that of the r × r matrix CᵀC.
            let (r, m, n) = (*r, *m, *n);
            if r > MAX_GRAM_DIM {
                return Err(Error::Invalid(format!(
                    "tensor '{name}': a LoRA pair of rank {r} is too large to audit (above {MAX_GRAM_DIM})"
                )));
            }
            let mut gram_a = vec![0.0; r * r];
            for i in 0..r {
                for j in 0..=i {
                    let v = dot(&a[i * n..(i + 1) * n], &a[j * n..(j + 1) * n]);
                    gram_a[i * r + j] = v;
                    gram_a[j * r + i] = v;
                }
            }
            let (lam, q) = symmetric_eigen(gram_a, r)?;
            // L[i][k] = Q[i][k] · sqrt(λ_k), with eigenvector k = q[k].
            let mut l = vec![0.0; r * r];
            for (k, (&lk, qk)) in lam.iter().zip(&q).enumerate() {
                let s = lk.max(0.0).sqrt();
                for i in 0..r {
                    l[i * r + k] = qk[i] * s;
                }
            }
            let mut c = vec![0.0; m * r];
            for o in 0..m {
                let brow = &b[o * r..(o + 1) * r];
                for k in 0..r {
                    c[o * r + k] = scale * (0..r).map(|i| brow[i] * l[i * r + k]).sum::<f64>();
                }
            }
            let mut h = vec![0.0; r * r];
            for o in 0..m {
                let row = &c[o * r..(o + 1) * r];
                for i in 0..r {
                    for j in 0..=i {
                        h[i * r + j] += row[i] * row[j];
                    }
                }
            }
            for i in 0..r {
                for j in 0..i {
                    h[j * r + i] = h[i * r + j];
                }
            }
            let energy: f64 = (0..r).map(|i| h[i * r + i]).sum();
            let (mu, wv) = symmetric_eigen(h, r)?;
            let sigma: Vec<f64> = mu.iter().map(|&x| x.max(0.0).sqrt()).collect();
            let s1 = sigma[0];
            if s1 <= RANK_ABS_TOL {
                return Ok(Spectrum {
                    sigma,
                    energy,
                    u1: Vec::new(),
                    v1: Vec::new(),
                });
            }
            let u1: Vec<f64> = c.chunks_exact(r).map(|row| dot(row, &wv[0]) / s1).collect();
            let v1: Vec<f64> = op.apply_t(&u1).into_iter().map(|x| x / s1).collect();
            Ok(Spectrum {
                sigma,
                energy,
                u1: unit(u1),
                v1: unit(v1),
            })
        }
    }
}

fn dense_spectrum(m: usize, n: usize, w: &[f64], op: &Operator, name: &str) -> Result<Spectrum> {
    let side = m.min(n);
    if side > MAX_GRAM_DIM {
        return Err(Error::Invalid(format!(
            "tensor '{name}': a dense change of {m} × {n} is too large to audit (smaller side above {MAX_GRAM_DIM})"
        )));
    }
    let energy: f64 = w.iter().map(|x| x * x).sum();
    let t = Tensor::from_slice(w, (m, n), &Device::Cpu)?;
    let gram = match m <= n {
        true => t.matmul(&t.t()?)?,
        false => t.t()?.matmul(&t)?,
    };
    let gram: Vec<f64> = gram.flatten_all()?.to_vec1()?;
    let (lam, vecs) = symmetric_eigen(gram, side)?;
    let sigma: Vec<f64> = lam.iter().map(|&x| x.max(0.0).sqrt()).collect();
    let s1 = sigma[0];
    if s1 <= RANK_ABS_TOL {
        return Ok(Spectrum {
            sigma,
            energy,
            u1: Vec::new(),
            v1: Vec::new(),
        });
    }
    let (u1, v1) = match m <= n {
        true => {
            let u = vecs[0].clone();
            let v = op.apply_t(&u);
            (u, v)
        }
        false => {
            let v = vecs[0].clone();
            let u = op.apply(&v);
            (u, v)
        }
    };
    Ok(Spectrum {
        sigma,
        energy,
        u1: unit(u1),
        v1: unit(v1),
    })
}

/// The [`Orientation::InputSum`] sign: v₁ sums positive; on a zero sum, its largest entry is
/// positive. u₁ flips along so that ΔW·v₁ = σ₁u₁ still holds.
pub(super) fn orient_by_input_sum(u: &mut [f64], v: &mut [f64]) {
    let sum: f64 = v.iter().sum();
    let l1: f64 = v.iter().map(|x| x.abs()).sum();
    let positive = if sum.abs() > 1e-12 * l1 {
        sum > 0.0
    } else {
        v.iter().copied().fold(
            0.0f64,
            |best, x| if x.abs() > best.abs() { x } else { best },
        ) >= 0.0
    };
    if !positive {
        u.iter_mut().for_each(|x| *x = -*x);
        v.iter_mut().for_each(|x| *x = -*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::numeric::tests::lcg;

    #[test]
    fn dense_and_factored_spectra_agree() {
        let mut seed = 11;
        let (m, n, r) = (12, 30, 3);
        let b: Vec<f64> = (0..m * r).map(|_| lcg(&mut seed)).collect();
        let a: Vec<f64> = (0..r * n).map(|_| lcg(&mut seed)).collect();
        let scale = 0.5;
        let low = Operator::LowRank {
            m,
            n,
            r,
            b: b.clone(),
            a: a.clone(),
            scale,
        };
        let mut w = vec![0.0; m * n];
        for o in 0..m {
            for j in 0..n {
                w[o * n + j] = scale * (0..r).map(|i| b[o * r + i] * a[i * n + j]).sum::<f64>();
            }
        }
        let dense = Operator::Dense { m, n, w: w.clone() };
        let sl = spectrum(&low, "x").unwrap();
        let sd = spectrum(&dense, "x").unwrap();
        assert_eq!(sl.sigma.len(), r);
        for i in 0..r {
            assert!((sl.sigma[i] - sd.sigma[i]).abs() < 1e-10 * sd.sigma[0]);
        }
        assert!(sd.sigma[r] < 1e-7 * sd.sigma[0]);
        assert!((sl.energy - sd.energy).abs() < 1e-10 * sd.energy);
        // ΔW v₁ = σ₁ u₁ for both, and the pairs agree up to sign.
        for s in [&sl, &sd] {
            let wv = dense.apply(&s.v1);
            for (x, y) in wv.iter().zip(&s.u1) {
                assert!((x - s.sigma[0] * y).abs() < 1e-9);
            }
        }
        assert!((dot(&sl.u1, &sd.u1).abs() - 1.0).abs() < 1e-9);
        // Tall matrices go through ΔWᵀΔW.
        let mut wt = vec![0.0; n * m];
        for o in 0..m {
            for j in 0..n {
                wt[j * m + o] = w[o * n + j];
            }
        }
        let st = spectrum(&Operator::Dense { m: n, n: m, w: wt }, "t").unwrap();
        assert!((st.sigma[0] - sd.sigma[0]).abs() < 1e-10 * sd.sigma[0]);
        assert!((dot(&st.u1, &sd.v1).abs() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn orientation_rule() {
        let mut u = vec![1.0, 2.0];
        let mut v = vec![-1.0, 0.5];
        orient_by_input_sum(&mut u, &mut v);
        assert_eq!((u, v), (vec![-1.0, -2.0], vec![1.0, -0.5]));
        let mut u = vec![1.0];
        let mut v = vec![0.5, -0.5, -0.9, 0.9];
        orient_by_input_sum(&mut u, &mut v);
        assert_eq!(u, vec![-1.0]);
    }
}
