//! ggml's CPU arithmetic for the forward that reproduces llama.cpp's (`model::Numerics::LlamaCpp`):
//! its own softmax and SwiGLU vector kernels (exported by the ggml that `llama-cpp-sys-2` links,
//! the same build llama.cpp runs), and attention with flash attention off summed in the order
//! ggml's CPU backend sums it (K·Q one dot product per score, V·P in the 8-lane tiles of its f32
//! matrix kernel). Every function here is plain f32 in, f32 out. The summation orders written
//! out here (8-float chunks and lanes) are those of the AVX2 build `llama-cpp-sys-2` makes on
//! x86-64 without `target-cpu=native`; an AVX-512 build sums in 16s.

use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};
use std::ffi::c_int;

// ggml's CPU vector kernels (ggml-cpu/vec.h, C linkage). Not part of ggml's public header but
// exported by the pinned build; a llama.cpp without them fails to link, not at run time.
extern "C" {
    fn ggml_vec_soft_max_f32(n: c_int, y: *mut f32, x: *const f32, max: f32) -> f64;
    fn ggml_vec_swiglu_f32(n: c_int, y: *mut f32, x: *const f32, g: *const f32);
}

/// SiLU(gate) · up, element by element, with ggml's kernel (its vectorized exp).
pub fn swiglu(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    if gate.len() != up.len() {
        return Err(Error::Invalid(format!(
            "SwiGLU of {} gates and {} values",
            gate.len(),
            up.len()
        )));
    }
    let mut out = vec![0f32; gate.len()];
    let n =
        c_int::try_from(gate.len()).map_err(|_| Error::Invalid("SwiGLU row too long".into()))?;
    // SAFETY: the three buffers hold n floats each.
    unsafe { ggml_vec_swiglu_f32(n, out.as_mut_ptr(), gate.as_ptr(), up.as_ptr()) };
    Ok(out)
}

/// Softmax of `row` in place as ggml's `soft_max` computes each row: exp(x − max) by its kernel
/// in chunks of 8 (the row is padded with −∞ to a whole chunk, as ggml's padded KV cells are
/// masked), summed in f64, each value times the f32 reciprocal of the sum.
fn softmax(row: &mut Vec<f32>) -> Result<()> {
    let n = row.len();
    row.resize(n.div_ceil(8) * 8, f32::NEG_INFINITY);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if !max.is_finite() {
        return Err(Error::Numeric(format!(
            "attention row whose largest score is {max}"
        )));
    }
    let mut y = vec![0f32; row.len()];
    let len =
        c_int::try_from(row.len()).map_err(|_| Error::Invalid("attention row too long".into()))?;
    // SAFETY: `y` and `row` hold `len` floats each.
    let sum = unsafe { ggml_vec_soft_max_f32(len, y.as_mut_ptr(), row.as_ptr(), max) };
    let inv = (1.0 / sum) as f32;
    y.truncate(n);
    row.clear();
    row.extend(y.iter().map(|v| v * inv));
    Ok(())
}

/// One layer's attention before the output projection, flash attention off, as ggml's CPU
/// backend computes it: `q` (n_head, n, d), `k` and `v` (n_kv_head, m, d) after RoPE, `mask`
/// (n, m) of 0 and −∞ added to the scaled scores; column j of the scores is KV cell j.
/// Returns (n, n_head · d).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (n_head, n_kv_head, n, m, d): (usize, usize, usize, usize, usize),
    scale: f32,
) -> Result<Vec<f32>> {
    if n_kv_head == 0
        || !n_head.is_multiple_of(n_kv_head)
        || q.len() != n_head * n * d
        || k.len() != n_kv_head * m * d
        || v.len() != k.len()
        || mask.len() != n * m
    {
        return Err(Error::Invalid(format!(
            "attention of {n_head} heads over {n_kv_head} KV heads, {n} rows, {m} keys of width {d}: buffers of the wrong size"
        )));
    }
    let rep = n_head / n_kv_head;
    let row_bytes =
        |rows: &[f32]| -> Vec<u8> { rows.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut out = vec![0f32; n * n_head * d];
    for g in 0..n_kv_head {
        let keys = row_bytes(&k[g * m * d..(g + 1) * m * d]);
        // V transposed, as llama.cpp's cache holds it without flash attention: one row per
        // channel over the cells.
        let vt: Vec<f32> = (0..d)
            .flat_map(|c| (0..m).map(move |j| v[(g * m + j) * d + c]))
            .collect();
        for h in g * rep..(g + 1) * rep {
            for t in 0..n {
                let qt = &q[(h * n + t) * d..(h * n + t + 1) * d];
                let scores = quant::matvec_like_ggml(GgmlType::F32, &keys, qt)?;
                let mut p: Vec<f32> = scores
                    .iter()
                    .zip(&mask[t * m..(t + 1) * m])
                    .map(|(s, mk)| s * scale + mk)
                    .collect();
                softmax(&mut p)?;
                for c in 0..d {
                    out[(t * n_head + h) * d + c] = tiled_dot(&vt[c * m..(c + 1) * m], &p);
                }
            }
        }
    }
    Ok(out)
}

/// Σ a·b as ggml's f32 matrix kernel sums it: 8 lanes of fused multiply-adds over the
/// elements, lane r taking elements r, r + 8, …, then the lanes added pairwise (r with r + 4,
/// then 0+2 with 1+3).
fn tiled_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        lanes[i % 8] = x.mul_add(*y, lanes[i % 8]);
    }
    let s: [f32; 4] = std::array::from_fn(|r| lanes[r + 4] + lanes[r]);
    (s[0] + s[2]) + (s[1] + s[3])
}
