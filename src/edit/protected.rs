//! Sequential edits that protect what came before (`--method shift-protected`): the joint solve
//! of [`super::batch`] updated one request at a time (recursive least squares), so a request file
//! applied in order ends exactly where the batch solve with the same ridge would.
//!
//! With λC the protection of generic text (C the `shift-whitened` statistics) and the keys
//! K_m = [x₁ … x_m] of the edits so far, P_m = (λC + K_m K_mᵀ)⁻¹ and ΔW_m = R_m K_mᵀ P_m (the
//! batch solution). Request m+1 with key x and value r adds the rank-one
//!
//! ```text
//! ΔW_{m+1} − ΔW_m = (r − ΔW_m x) vᵀ,   v = P_m x / (1 + xᵀ P_m x),
//! ```
//!
//! which writes at x only what the earlier edits do not already write there, and, since P_m x is
//! nearly orthogonal to the earlier keys and small along everything C has seen, changes their
//! outputs and generic text's as little as possible (AlphaEdit's null-space projection in the
//! limit λ → 0). P_m x is never formed as a matrix: by Woodbury,
//! P_m x = (z − Z_m (λI + K_mᵀ Z_m)⁻¹ K_mᵀ z) / λ with z = C⁻¹x and Z_m = C⁻¹K_m, and the m × m
//! factor grows by one row per edit. λ = ρ·x₁ᵀC⁻¹x₁ of the first edited key (the batch solve
//! takes ρ times the mean over all keys, unknown to a sequence).
//!
//! The value is FPS's r = lr·‖x‖²·e, or by default r = ΔW_m x + s·d with s·d the smallest
//! change that flips the request on the model carrying the earlier edits ([`super::minimal`]),
//! so that the new key receives exactly that change on top of what it already gets.

use super::batch::JointOptions;
use super::minimal::{self, KeyAt, ValueRule};
use super::whiten::KeyStats;
use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::numeric::{dot, GrowingCholesky};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::sync::Arc;

/// The state of a protected sequence: the keys edited so far and their written changes.
pub struct Sequence {
    stats: Arc<KeyStats>,
    layer: usize,
    lr: f64,
    ridge: f64,
    key: KeyAt,
    rule: ValueRule,
    /// λ, fixed by the first edited key.
    lambda: Option<f64>,
    keys: Vec<Vec<f64>>,
    /// C⁻¹xⱼ of each key.
    whitened: Vec<Vec<f64>>,
    /// Factor of λI + KᵀC⁻¹K.
    gram: GrowingCholesky,
    /// The rank-one terms uⱼvⱼᵀ written so far.
    written: Vec<(Vec<f64>, Vec<f64>)>,
}

impl Sequence {
    /// An empty sequence at `layer` with step `lr`, the ridge ρ and key position of `options`
    /// and values by `rule`.
    pub fn new(
        stats: Arc<KeyStats>,
        layer: usize,
        lr: f64,
        options: JointOptions,
        rule: ValueRule,
    ) -> Result<Sequence> {
        rule.check()?;
        let JointOptions { ridge, key, layers } = options;
        if layers != 1 {
            return Err(Error::Invalid(format!(
                "shift-protected edits one layer; --spread {layers} is for batch"
            )));
        }
        if !(ridge.is_finite() && ridge > 0.0) {
            return Err(Error::Invalid(format!(
                "the protection ridge must be > 0, got {ridge}"
            )));
        }
        Ok(Sequence {
            stats,
            layer,
            lr,
            ridge,
            key,
            rule,
            lambda: None,
            keys: Vec::new(),
            whitened: Vec::new(),
            gram: GrowingCholesky::default(),
            written: Vec::new(),
        })
    }

    /// Computes the next request's edit on `model` (the earlier edits of this sequence applied,
    /// which only the skip rule sees: FF2's input at the edited layer does not depend on that
    /// layer's FF2). The model is not changed.
    pub fn step(
        &mut self,
        model: &Transformer,
        tok: &Tokenizer,
        req: &EditRequest,
    ) -> Result<EditOutcome> {
        if self.stats.layer != self.layer || self.stats.n != model.hp.n_ff {
            return Err(Error::Invalid(format!(
                "key statistics are for layer {} (width {}), the edit is at layer {} (width {})",
                self.stats.layer, self.stats.n, self.layer, model.hp.n_ff
            )));
        }
        let one = std::slice::from_ref(req);
        let (layer, lr, rule, at) = (self.layer, self.lr, self.rule, self.key);
        let key = minimal::keyed(model, tok, one, layer, lr, rule, at, &self.stats, 1)?.remove(0);
        let Some(value) = key.value else {
            return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
        };
        let x: Vec<f64> = key.x.iter().map(|&v| v as f64).collect();
        let on_top = matches!(self.rule, ValueRule::Minimal { .. });
        let delta = self.push(x, value, on_top)?;
        Ok(EditOutcome::edited(req, key.target_id, key.top1, delta))
    }

    /// Adds key `x` with value `r`: the rank-one change (r − ΔW_m x) vᵀ, or r vᵀ when `on_top`
    /// (r is then the change on top of what the earlier edits write at x).
    fn push(&mut self, x: Vec<f64>, r: Vec<f64>, on_top: bool) -> Result<Delta> {
        let layer = self.layer;
        let z = self.stats.solve(&x);
        let xz = dot(&x, &z);
        if !(xz.is_finite() && xz > 0.0) {
            return Err(Error::Numeric(format!(
                "protected edit at layer {layer}: the key has no weight under the statistics (xᵀC⁻¹x = {xz})"
            )));
        }
        let lambda = *self.lambda.get_or_insert(self.ridge * xz);
        // g = K_mᵀ z, y = (λI + KᵀZ)⁻¹ g, P_m x = (z − Z y)/λ.
        let g: Vec<f64> = self.keys.iter().map(|k| dot(k, &z)).collect();
        let y = self.gram.solve(g.clone());
        let mut p = z.clone();
        for (zj, yj) in self.whitened.iter().zip(&y) {
            p.iter_mut().zip(zj).for_each(|(a, b)| *a -= yj * b);
        }
        p.iter_mut().for_each(|v| *v /= lambda);
        let denom = 1.0 + dot(&x, &p);
        let v: Vec<f64> = p.iter().map(|a| a / denom).collect();
        // u = r − ΔW_m x.
        let mut u = r;
        for (uj, vj) in self.written.iter().filter(|_| !on_top) {
            let c = dot(vj, &x);
            u.iter_mut().zip(uj).for_each(|(a, b)| *a -= c * b);
        }
        self.gram.push(&g, xz + lambda).map_err(|_| {
            Error::Numeric(format!(
                "protected edit at layer {layer}: the key is a combination of earlier ones (edit #{}); raise the ridge",
                self.keys.len()
            ))
        })?;
        self.keys.push(x);
        self.whitened.push(z);
        let delta = Delta {
            tensor: ff2_weight(layer),
            layer,
            out_vecs: vec![u.iter().map(|&a| a as f32).collect()],
            in_vecs: vec![v.iter().map(|&a| a as f32).collect()],
        };
        self.written.push((u, v));
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::whiten::WhitenOptions;

    /// A seeded xorshift stream in [-1, 1).
    fn stream(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    #[test]
    fn the_sequence_sums_to_the_joint_least_squares_solution() {
        let (n, n_out, m, lr) = (12, 5, 6, 0.3);
        let mut r = stream(7);
        // C = AAᵀ/n + 0.1 I from a seeded A.
        let a: Vec<f64> = (0..n * n).map(|_| r()).collect();
        let mut moment = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                moment[i * n + j] =
                    (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>() / n as f64;
            }
            moment[i * n + i] += 0.1;
        }
        let options = WhitenOptions {
            lambda_ratio: 1e-6,
            ..WhitenOptions::default()
        };
        let stats = Arc::new(KeyStats::new(0, n, 100, moment.clone(), options).unwrap());
        let keys: Vec<Vec<f64>> = (0..m).map(|_| (0..n).map(|_| r()).collect()).collect();
        let embs: Vec<Vec<f32>> = (0..m)
            .map(|_| (0..n_out).map(|_| r() as f32).collect())
            .collect();
        let mut seq = Sequence::new(
            stats.clone(),
            0,
            lr,
            JointOptions::default(),
            ValueRule::Fps,
        )
        .unwrap();
        let mut sum = vec![0f64; n_out * n];
        for (x, e) in keys.iter().zip(&embs) {
            let r = e.iter().map(|&a| lr * dot(x, x) * a as f64).collect();
            let d = seq.push(x.clone(), r, false).unwrap();
            for o in 0..n_out {
                for i in 0..n {
                    sum[o * n + i] += d.out_vecs[0][o] as f64 * d.in_vecs[0][i] as f64;
                }
            }
        }
        // Direct: ΔW = R Kᵀ (λC + KKᵀ)⁻¹ with λ = ρ·x₁ᵀC⁻¹x₁.
        let lambda = seq.lambda.unwrap();
        // C as the statistics hold it: the moment plus their own small diagonal.
        let mut h: Vec<f64> = moment.iter().map(|c| lambda * c).collect();
        for i in 0..n {
            h[i * n + i] += lambda * stats.lambda;
        }
        for k in &keys {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += k[i] * k[j];
                }
            }
        }
        crate::numeric::cholesky_in_place(&mut h, n).unwrap();
        let mut worst: f64 = 0.0;
        for o in 0..n_out {
            // Row o of R Kᵀ, then solved against the symmetric H.
            let row: Vec<f64> = (0..n)
                .map(|i| {
                    keys.iter()
                        .zip(&embs)
                        .map(|(k, e)| lr * dot(k, k) * e[o] as f64 * k[i])
                        .sum()
                })
                .collect();
            let want = crate::numeric::cholesky_solve(&h, n, row);
            for i in 0..n {
                let err = (sum[o * n + i] - want[i]).abs() / want[i].abs().max(1e-3);
                worst = worst.max(err);
            }
        }
        assert!(worst < 1e-4, "protected sequence vs joint solve: {worst:e}");
        // And every key still receives (nearly) its value after all later edits.
        for (x, e) in keys.iter().zip(&embs) {
            for o in 0..n_out {
                let got: f64 = (0..n).map(|i| sum[o * n + i] * x[i]).sum();
                let want = lr * dot(x, x) * e[o] as f64;
                assert!(
                    (got - want).abs() < 0.02 * want.abs().max(0.1),
                    "{got} vs {want}"
                );
            }
        }
    }
}
