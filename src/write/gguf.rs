//! GGUF writer: metadata, dense padded tensor offsets (as ggml computes them), and tensor bytes
//! that are either borrowed from the input map (untouched tensors, byte-identical) or new.

use super::{AtomicOutput, Staged};
use crate::weights::gguf::{GgufFile, TensorInfo, Value, MAGIC};
use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::Path;

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct OutTensor<'a> {
    /// Name.
    pub name: String,
    /// Dimensions fastest-first (GGUF order).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Stored bytes.
    pub data: Cow<'a, [u8]>,
}

impl<'a> OutTensor<'a> {
    /// An F32 tensor from row-major values and a row-major shape.
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> OutTensor<'a> {
        OutTensor {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: GgmlType::F32,
            data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }
}

/// A complete GGUF file to write: metadata in order, then tensors in order.
#[derive(Debug, Default)]
pub struct GgufPlan<'a> {
    /// Metadata entries (a `general.alignment` entry, if any, sets the alignment).
    pub metadata: Vec<(String, Value)>,
    /// Tensors.
    pub tensors: Vec<OutTensor<'a>>,
    /// The file borrowed tensors come from ([`Self::copy_of`]): they are copied from its file
    /// in the kernel (or, from a map without a file, their mapped pages are released once
    /// written), so copying a big model does not keep it resident.
    pub source: Option<&'a GgufFile>,
}

impl<'a> GgufPlan<'a> {
    /// A plan that copies `src` as it is: all metadata, every tensor borrowed from its map.
    pub fn copy_of(src: &'a GgufFile) -> GgufPlan<'a> {
        GgufPlan {
            metadata: src.metadata.clone(),
            tensors: src
                .tensors
                .iter()
                .map(|t| OutTensor {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ggml_type: t.ggml_type,
                    data: Cow::Borrowed(src.tensor_bytes(t)),
                })
                .collect(),
            source: Some(src),
        }
    }

    /// Sets (replacing or appending) a metadata entry.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Replaces a tensor by name.
    pub fn replace(&mut self, tensor: OutTensor<'a>) -> Result<()> {
        let slot = self
            .tensors
            .iter_mut()
            .find(|t| t.name == tensor.name)
            .ok_or_else(|| Error::MissingTensor(tensor.name.clone()))?;
        *slot = tensor;
        Ok(())
    }

    fn alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) => u64::from(*a),
            _ => crate::weights::gguf::DEFAULT_ALIGNMENT,
        }
    }

    /// Serializes the header (magic through tensor infos, before padding).
    fn header(&self) -> Result<Vec<u8>> {
        for t in &self.tensors {
            let n: u64 = t.dims.iter().product();
            if t.ggml_type.bytes_for(n) != Some(t.data.len() as u64) {
                return Err(Error::Invalid(format!(
                    "tensor '{}': {} bytes do not match {:?} of {}",
                    t.name,
                    t.data.len(),
                    t.dims,
                    t.ggml_type.name()
                )));
            }
        }
        Ok(header_bytes(
            &self.metadata,
            self.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.dims.as_slice(), t.ggml_type)),
            self.alignment(),
        ))
    }

    /// The whole file in memory, laid out exactly as [`Self::write_to`] writes it (tests,
    /// fuzzing).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let alignment = self.alignment() as usize;
        let mut out = self.header()?;
        out.resize(out.len().next_multiple_of(alignment), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len().next_multiple_of(alignment), 0);
        }
        Ok(out)
    }

    /// Writes the file atomically to a new `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.write_to(AtomicOutput::create(path)?)?.commit()
    }

    /// Writes the file into `out` and returns it finished but not yet committed.
    pub fn write_to(&self, mut out: AtomicOutput) -> Result<Staged> {
        let header = self.header()?;
        let alignment = self.alignment() as usize;
        out.write_all(&header)?;
        let zeros = vec![0u8; alignment];
        out.write_all(&zeros[..header.len().next_multiple_of(alignment) - header.len()])?;
        for t in &self.tensors {
            // Untouched tensors go from the input file to the output in the kernel.
            match (&t.data, self.source) {
                (Cow::Borrowed(bytes), Some(src)) => match src.file_range(bytes) {
                    Some((file, offset)) => out.copy_range(file, offset, bytes)?,
                    None => {
                        out.write_all(bytes)?;
                        src.release(bytes);
                    }
                },
                _ => out.write_all(&t.data)?,
            }
            let pad = t.data.len().next_multiple_of(alignment) - t.data.len();
            out.write_all(&zeros[..pad])?;
        }
        out.finish()
    }
}

/// Magic through tensor infos, with each tensor's offset laid out densely at `alignment`.
fn header_bytes<'t>(
    metadata: &[(String, Value)],
    tensors: impl ExactSizeIterator<Item = (&'t str, &'t [u64], GgmlType)>,
    alignment: u64,
) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut h, key);
        h.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        put_value(&mut h, value);
    }
    let mut offset = 0u64;
    for (name, dims, ggml_type) in tensors {
        put_str(&mut h, name);
        h.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&ggml_type.0.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        let n: u64 = dims.iter().product();
        offset += ggml_type
            .bytes_for(n)
            .unwrap_or(0)
            .next_multiple_of(alignment);
    }
    h
}

/// A tensor whose bytes [`write_generated`] asks for when it reaches it.
#[derive(Debug, Clone)]
pub struct GeneratedTensor {
    /// Name.
    pub name: String,
    /// Dimensions fastest-first (GGUF order).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
}

/// Writes a GGUF atomically whose tensor bytes `fill(index, buffer)` produces one tensor at a
/// time into a buffer of the right length (for files too big to hold in memory, such as the
/// synthetic models of the scale benchmark).
pub fn write_generated(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GeneratedTensor],
    mut fill: impl FnMut(usize, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let alignment = crate::weights::gguf::DEFAULT_ALIGNMENT;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n: u64 = t.dims.iter().product();
        sizes.push(t.ggml_type.bytes_for(n).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor '{}': {:?} is not whole {} blocks",
                t.name,
                t.dims,
                t.ggml_type.name()
            ))
        })? as usize);
    }
    let header = header_bytes(
        metadata,
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dims.as_slice(), t.ggml_type)),
        alignment,
    );
    let align = alignment as usize;
    let mut out = AtomicOutput::create(path)?;
    out.write_all(&header)?;
    let zeros = vec![0u8; align];
    out.write_all(&zeros[..header.len().next_multiple_of(align) - header.len()])?;
    let mut buffer = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        buffer.resize(size, 0);
        fill(i, &mut buffer)?;
        out.write_all(&buffer)?;
        out.write_all(&zeros[..size.next_multiple_of(align) - size])?;
    }
    out.commit()
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::Array(elem, items) => {
            h.extend_from_slice(&(*elem as u32).to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}

/// How the edited FF2 is stored in a patched GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ff2Type {
    /// F32: the edit is stored exactly.
    F32,
    /// Requantized to the tensor's original type with ggml.
    Keep,
}

crate::named_enum!(Ff2Type, "FF2 type", [F32 => "f32", Keep => "keep"]);

/// A copy of `src` with each delta added to its (dequantized) tensor, which is then stored as
/// F32 or requantized; every other tensor is borrowed byte for byte. `provenance` keys are set.
pub fn patch_plan<'a>(
    src: &'a GgufFile,
    deltas: &[crate::delta::Delta],
    ff2_type: Ff2Type,
    provenance: &[(String, Value)],
) -> Result<GgufPlan<'a>> {
    let mut plan = GgufPlan::copy_of(src);
    for name in edited_tensors(deltas) {
        let (info, data, ggml_type) = stored_ff2(src, name, deltas, ff2_type)?;
        if ggml_type == info.ggml_type && data.as_slice() == src.tensor_bytes(info) {
            return Err(Error::Numeric(format!(
                "the edit changes no stored value of '{name}' (step too small for {})",
                ggml_type.name()
            )));
        }
        plan.replace(OutTensor {
            name: name.to_string(),
            dims: info.dims.clone(),
            ggml_type,
            data: Cow::Owned(data),
        })?;
    }
    for (k, v) in provenance {
        plan.set(k, v.clone());
    }
    Ok(plan)
}

/// The distinct tensor names the deltas edit, sorted.
fn edited_tensors(deltas: &[crate::delta::Delta]) -> Vec<&str> {
    let mut names: Vec<&str> = deltas.iter().map(|d| d.tensor.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Tensor `name` of `src` with every delta on it added, encoded as `ff2_type` would store it:
/// its info, bytes and type.
fn stored_ff2<'f>(
    src: &'f GgufFile,
    name: &str,
    deltas: &[crate::delta::Delta],
    ff2_type: Ff2Type,
) -> Result<(&'f TensorInfo, Vec<u8>, GgmlType)> {
    let info = src
        .tensor(name)
        .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
    let mut values = quant::dequantize(info.ggml_type, src.tensor_bytes(info), name)?;
    for d in deltas.iter().filter(|d| d.tensor == name) {
        d.add_to(&mut values);
    }
    let ggml_type = match ff2_type {
        Ff2Type::F32 => GgmlType::F32,
        Ff2Type::Keep => info.ggml_type,
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numeric(format!(
            "'{name}' would hold {} at element {i} after the edit",
            values[i]
        )));
    }
    let data = quant::quantize(ggml_type, &values, info.dims[0] as usize, name)?;
    Ok((info, data, ggml_type))
}

/// The change a patched file written with `ff2_type` really makes, as deltas: for F32 the
/// deltas themselves; for `Keep`, the requantized tensor minus the original, one rank-one term
/// per changed row (so that a LoRA adapter can carry a requantized edit exactly).
pub fn stored_deltas(
    src: &GgufFile,
    deltas: &[crate::delta::Delta],
    ff2_type: Ff2Type,
) -> Result<Vec<crate::delta::Delta>> {
    if ff2_type == Ff2Type::F32 {
        return Ok(deltas.to_vec());
    }
    let mut out = Vec::new();
    for name in edited_tensors(deltas) {
        let (info, data, ggml_type) = stored_ff2(src, name, deltas, ff2_type)?;
        let before = quant::dequantize(info.ggml_type, src.tensor_bytes(info), name)?;
        let after = quant::dequantize(ggml_type, &data, name)?;
        let n_in = info.dims[0] as usize;
        let n_out = before.len() / n_in;
        let mut delta = crate::delta::Delta {
            tensor: name.to_string(),
            layer: deltas
                .iter()
                .find(|d| d.tensor == name)
                .map_or(0, |d| d.layer),
            out_vecs: Vec::new(),
            in_vecs: Vec::new(),
        };
        for row in 0..n_out {
            let span = row * n_in..(row + 1) * n_in;
            let diff: Vec<f32> = after[span.clone()]
                .iter()
                .zip(&before[span])
                .map(|(a, b)| a - b)
                .collect();
            if diff.iter().any(|&v| v != 0.0) {
                let mut unit = vec![0f32; n_out];
                unit[row] = 1.0;
                delta.out_vecs.push(unit);
                delta.in_vecs.push(diff);
            }
        }
        if !delta.out_vecs.is_empty() {
            out.push(delta);
        }
    }
    Ok(out)
}
