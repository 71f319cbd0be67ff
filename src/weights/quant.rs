//! ggml tensor types: sizes, dequantization and requantization through ggml itself
//! (`llama-cpp-sys-2` links the same ggml that llama.cpp uses, so the bytes agree exactly).

use crate::{Error, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::CStr;

/// A ggml tensor type code as stored in GGUF tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType(sys::GGML_TYPE_F32);
    /// 16-bit IEEE float.
    pub const F16: GgmlType = GgmlType(sys::GGML_TYPE_F16);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(sys::GGML_TYPE_BF16);
    /// 8-bit blocks of 32 with an f16 scale.
    pub const Q8_0: GgmlType = GgmlType(sys::GGML_TYPE_Q8_0);
    /// 8-bit blocks of 32 with f16 scale and scaled sum (ggml's activation type for Q4_1/Q5_1).
    pub const Q8_1: GgmlType = GgmlType(sys::GGML_TYPE_Q8_1);
    /// 8-bit super-blocks of 256 with an f32 scale (ggml's activation type for k-quants).
    pub const Q8_K: GgmlType = GgmlType(sys::GGML_TYPE_Q8_K);
    /// 4-bit blocks of 32 with an f16 scale.
    pub const Q4_0: GgmlType = GgmlType(sys::GGML_TYPE_Q4_0);
    /// 4-bit blocks of 32 with f16 scale and minimum.
    pub const Q4_1: GgmlType = GgmlType(sys::GGML_TYPE_Q4_1);
    /// 5-bit blocks of 32 with an f16 scale.
    pub const Q5_0: GgmlType = GgmlType(sys::GGML_TYPE_Q5_0);
    /// 5-bit blocks of 32 with f16 scale and minimum.
    pub const Q5_1: GgmlType = GgmlType(sys::GGML_TYPE_Q5_1);
    /// 4-bit k-quant super-blocks of 256.
    pub const Q4_K: GgmlType = GgmlType(sys::GGML_TYPE_Q4_K);
    /// 5-bit k-quant super-blocks of 256.
    pub const Q5_K: GgmlType = GgmlType(sys::GGML_TYPE_Q5_K);
    /// 6-bit k-quant super-blocks of 256.
    pub const Q6_K: GgmlType = GgmlType(sys::GGML_TYPE_Q6_K);

    /// The types this project tests for reading and writing.
    pub const TESTED: [GgmlType; 11] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    fn traits(self) -> Option<&'static sys::ggml_type_traits> {
        if self.0 >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: ggml returns a pointer into its static traits table for every code below COUNT.
        let traits = unsafe { sys::ggml_get_type_traits(self.0).as_ref()? };
        (traits.blck_size > 0 && traits.type_size > 0).then_some(traits)
    }

    /// Whether ggml knows this type code (removed codes such as the old Q4_2 count as unknown).
    pub fn is_known(self) -> bool {
        self.traits().is_some()
    }

    /// ggml's name for the type ("q4_1", "f32", ...), or `type#N` when unknown.
    pub fn name(self) -> String {
        match self.traits() {
            // SAFETY: type_name points at a static NUL-terminated string.
            Some(t) if !t.type_name.is_null() => unsafe { CStr::from_ptr(t.type_name) }
                .to_string_lossy()
                .into_owned(),
            _ => format!("type#{}", self.0),
        }
    }

    /// Parses a ggml type name such as "q4_1" (case-insensitive).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        (0..sys::GGML_TYPE_COUNT)
            .map(GgmlType)
            .find(|t| t.is_known() && t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block (1 for float types).
    pub fn block_size(self) -> u64 {
        self.traits().map_or(0, |t| t.blck_size as u64)
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        self.traits().map_or(0, |t| t.type_size as u64)
    }

    /// The type ggml's CPU backend converts activations to before it multiplies them with weights
    /// of this type (Q8_1 for Q4_1, Q8_0 for Q4_0/Q8_0, Q8_K for k-quants, F16 for F16).
    pub fn activation_type(self) -> Option<GgmlType> {
        Some(GgmlType(self.cpu_traits()?.vec_dot_type))
    }

    /// ggml's CPU-backend traits of a known type (its SIMD converter and dot-product type).
    fn cpu_traits(self) -> Option<&'static sys::ggml_type_traits_cpu> {
        self.traits()?;
        // SAFETY: ggml_cpu_init only fills static lookup tables (idempotent); the CPU traits
        // table has a static entry for every known type code.
        unsafe {
            sys::ggml_cpu_init();
            sys::ggml_get_type_traits_cpu(self.0).as_ref()
        }
    }

    /// Bytes taken by `n` elements, or None on overflow or when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let block = self.block_size();
        if block == 0 || !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(self.block_bytes())
    }
}

/// Converts `bytes` holding `n` elements of type `ty` to f32 with ggml's own row converter.
pub fn dequantize(ty: GgmlType, bytes: &[u8], name: &str) -> Result<Vec<f32>> {
    let unsupported = || Error::UnsupportedType {
        name: name.to_string(),
        type_name: ty.name(),
    };
    let traits = ty.traits().ok_or_else(unsupported)?;
    let n_blocks = bytes.len() as u64 / ty.block_bytes();
    if n_blocks * ty.block_bytes() != bytes.len() as u64 {
        return Err(Error::Invalid(format!(
            "tensor '{name}': {} bytes is not a whole number of {} blocks",
            bytes.len(),
            ty.name()
        )));
    }
    let n = (n_blocks * ty.block_size()) as usize;
    let mut out = vec![0f32; n];
    if ty == GgmlType::F32 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return Ok(out);
    }
    let to_float = traits.to_float.ok_or_else(unsupported)?;
    // SAFETY: `bytes` holds exactly n_blocks blocks of `ty` and `out` has room for their n values.
    unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    Ok(out)
}

/// Quantizes `values` laid out as rows of `row_len` into type `ty` with ggml (as llama-quantize does).
pub fn quantize(ty: GgmlType, values: &[f32], row_len: usize, name: &str) -> Result<Vec<u8>> {
    if ty == GgmlType::F32 {
        return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    if ty.traits().is_none() || row_len == 0 || !values.len().is_multiple_of(row_len) {
        return Err(Error::UnsupportedType {
            name: name.to_string(),
            type_name: ty.name(),
        });
    }
    // SAFETY: plain queries on a known type.
    let needs_imatrix = unsafe { sys::ggml_quantize_requires_imatrix(ty.0) };
    let row_bytes = ty.bytes_for(row_len as u64);
    let (false, Some(row_bytes)) = (needs_imatrix, row_bytes) else {
        return Err(Error::UnsupportedType {
            name: name.to_string(),
            type_name: ty.name(),
        });
    };
    let rows = values.len() / row_len;
    let mut out = vec![0u8; rows * row_bytes as usize];
    // SAFETY: `out` holds rows * row_bytes bytes; `values` holds rows * row_len floats.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.0,
            values.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            rows as i64,
            row_len as i64,
            std::ptr::null(),
        )
    };
    debug_assert_eq!(written, out.len());
    Ok(out)
}

/// Rounds `row` in place to the values ggml's CPU matmul actually multiplies when activations
/// meet weights of a type whose activation type is `act` (see [`GgmlType::activation_type`]):
/// the row goes through ggml's own SIMD converter and is decoded back to f32. F32 is a no-op.
///
/// For Q8_1 it returns, per block of 32, how much the block sum ggml stores (rounded to f16)
/// differs from the sum of the decoded values: ggml multiplies that stored sum with the
/// weight's block minimum (see [`block_minimums`]). For other types the result is empty.
pub fn round_activations(act: GgmlType, row: &mut [f32]) -> Result<Vec<f32>> {
    if act == GgmlType::F32 {
        return Ok(Vec::new());
    }
    let unsupported = || Error::UnsupportedType {
        name: "activations".into(),
        type_name: act.name(),
    };
    let Some(bytes) = act.bytes_for(row.len() as u64) else {
        return Err(unsupported());
    };
    let from_float = act
        .cpu_traits()
        .and_then(|t| t.from_float)
        .ok_or_else(unsupported)?;
    let mut packed = vec![0u8; bytes as usize];
    // SAFETY: `packed` holds exactly the bytes of row.len() values of type `act`.
    unsafe { from_float(row.as_ptr(), packed.as_mut_ptr().cast(), row.len() as i64) };
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    match act {
        // Blocks of 32: f16 scale, f16 scaled sum, 32 signed bytes.
        GgmlType::Q8_1 => {
            decode_q8(&packed, row, 32, 4, |b| f16(b));
            Ok(row
                .chunks_exact(32)
                .zip(packed.chunks_exact(36))
                .map(|(values, b)| f16(&b[2..4]) - values.iter().sum::<f32>())
                .collect())
        }
        // Super-blocks of 256: f32 scale, 256 signed bytes, 16 partial sums (unused here).
        GgmlType::Q8_K => {
            decode_q8(&packed, row, 256, 4, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            });
            Ok(Vec::new())
        }
        _ => {
            let decoded = dequantize(act, &packed, "activations")?;
            row.copy_from_slice(&decoded);
            Ok(Vec::new())
        }
    }
}

/// `W x` the way ggml's CPU backend computes a matrix product whose weight type has no tiled
/// (llamafile) kernel: `x` converted to the weight's activation type by ggml's own converter,
/// then each output one call of ggml's own dot product on the stored row, so the result is
/// bit for bit llama.cpp's. `w` holds rows of `x.len()` values of type `wty`, back to back.
pub fn matvec_like_ggml(wty: GgmlType, w: &[u8], x: &[f32]) -> Result<Vec<f32>> {
    let unsupported = || Error::UnsupportedType {
        name: "matrix product".into(),
        type_name: wty.name(),
    };
    let traits = wty.cpu_traits().ok_or_else(unsupported)?;
    let vec_dot = traits.vec_dot.ok_or_else(unsupported)?;
    let act = GgmlType(traits.vec_dot_type);
    let n = x.len();
    let (Some(row_bytes), Some(x_bytes)) = (wty.bytes_for(n as u64), act.bytes_for(n as u64))
    else {
        return Err(unsupported());
    };
    let row_bytes = row_bytes as usize;
    if row_bytes == 0 || !w.len().is_multiple_of(row_bytes) {
        return Err(Error::Invalid(format!(
            "{} weight of {} bytes is not whole rows of {n} values",
            wty.name(),
            w.len()
        )));
    }
    let converted: Vec<u8>;
    let xq: *const std::ffi::c_void = match act == GgmlType::F32 {
        true => x.as_ptr().cast(),
        false => {
            let from_float = act
                .cpu_traits()
                .and_then(|t| t.from_float)
                .ok_or_else(unsupported)?;
            let mut packed = vec![0u8; x_bytes as usize];
            // SAFETY: `packed` holds exactly the bytes of n values of type `act`.
            unsafe { from_float(x.as_ptr(), packed.as_mut_ptr().cast(), n as i64) };
            converted = packed;
            converted.as_ptr().cast()
        }
    };
    Ok(w.chunks_exact(row_bytes)
        .map(|row| {
            let mut s = 0f32;
            // SAFETY: `row` is one row of n values of `wty` and `xq` n values of its activation
            // type (both checked above); ggml's dot writes one float to `s` (nrc = 1).
            unsafe { vec_dot(n as i32, &mut s, 0, row.as_ptr().cast(), 0, xq, 0, 1) };
            s
        })
        .collect())
}

/// The per-block minimum `m` of weights stored as Q4_1 or Q5_1 (blocks of 32 whose values are
/// d·q + m), row-major (rows, blocks per row); None for other types.
pub fn block_minimums(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    if ty != GgmlType::Q4_1 && ty != GgmlType::Q5_1 {
        return None;
    }
    let stride = ty.block_bytes() as usize;
    Some(
        bytes
            .chunks_exact(stride)
            .map(|b| half::f16::from_le_bytes([b[2], b[3]]).to_f32())
            .collect(),
    )
}

/// Decodes 8-bit blocks of `block` values whose scale sits at the block's start and whose
/// signed bytes start `header` bytes in.
fn decode_q8(
    packed: &[u8],
    row: &mut [f32],
    block: usize,
    header: usize,
    scale: impl Fn(&[u8]) -> f32,
) {
    let stride = packed.len() / (row.len() / block);
    for (out, b) in row.chunks_exact_mut(block).zip(packed.chunks_exact(stride)) {
        let d = scale(b);
        for (o, &q) in out.iter_mut().zip(&b[header..header + block]) {
            *o = d * q as i8 as f32;
        }
    }
}
