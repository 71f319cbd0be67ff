//! The low-rank change every edit method produces and every writer stores: ΔW = Σᵢ uᵢ vᵢᵀ on one
//! named weight matrix. Pure data: computing it lives in `edit`, applying it in `model`, writing
//! it in `write`.

use crate::{Error, Result};
use serde::Serialize;

/// A low-rank change of one weight matrix: ΔW = Σᵢ out_vecsᵢ · in_vecsᵢᵀ (W is [out, in]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta {
    /// GGUF name of the edited tensor.
    pub tensor: String,
    /// Layer of the edited tensor.
    pub layer: usize,
    /// Output-side vectors (model dim for FF2).
    pub out_vecs: Vec<Vec<f32>>,
    /// Input-side vectors (ff dim for FF2).
    pub in_vecs: Vec<Vec<f32>>,
}

impl Delta {
    /// The dense ΔW as a row-major (out, in) buffer.
    pub fn dense(&self) -> Vec<f32> {
        let (n_out, n_in) = (self.out_vecs[0].len(), self.in_vecs[0].len());
        let mut w = vec![0f32; n_out * n_in];
        for (u, v) in self.out_vecs.iter().zip(&self.in_vecs) {
            for (o, &uo) in u.iter().enumerate() {
                let row = &mut w[o * n_in..(o + 1) * n_in];
                for (r, &vi) in row.iter_mut().zip(v) {
                    *r += uo * vi;
                }
            }
        }
        w
    }

    /// Adds ΔW to row-major `values` of the same shape.
    pub fn add_to(&self, values: &mut [f32]) {
        for (w, d) in values.iter_mut().zip(self.dense()) {
            *w += d;
        }
    }

    /// Fails when ΔW holds a non-finite number or is exactly zero (a step too small to change
    /// any stored value).
    pub fn check_finite(&self) -> Result<()> {
        let values = || self.out_vecs.iter().chain(&self.in_vecs).flatten();
        if values().any(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "the edit of '{}' holds non-finite values (step too large, or non-finite weights)",
                self.tensor
            )));
        }
        if self.dense_is_zero() {
            return Err(Error::Numeric(format!(
                "the edit of '{}' is zero in f32 (step too small): nothing would change",
                self.tensor
            )));
        }
        Ok(())
    }

    /// Whether every product uᵢ[o]·vᵢ[j] rounds to zero in f32.
    fn dense_is_zero(&self) -> bool {
        self.out_vecs
            .iter()
            .zip(&self.in_vecs)
            .all(|(u, v)| u.iter().all(|&a| v.iter().all(|&b| a * b == 0.0)))
    }
}
