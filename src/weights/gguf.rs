//! GGUF reader over a memory map. Every count, length and offset is checked against the bytes that
//! remain before anything is allocated; tensors are borrowed slices of the map, never copies.

use super::quant::GgmlType;
use super::Backing;
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// At most this many dimensions per tensor (as in ggml).
pub const MAX_DIMS: usize = 4;
/// Longest tensor name ggml accepts, in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// Deepest nesting of arrays accepted.
const MAX_ARRAY_DEPTH: usize = 8;

/// GGUF metadata value types, as numbered by the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(code: u32) -> Option<Self> {
        use ValueType::*;
        Some(match code {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Smallest encoded size of one value of this type (used to bound array counts).
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array keeps its element type so that empty arrays round-trip.
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value as u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// The value as JSON: strings, bools, numbers (a non-finite float is null) and arrays.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::String(s) => J::String(s.clone()),
            Value::Bool(b) => J::Bool(*b),
            Value::Array(_, items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
            Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::I8(x) => J::from(*x),
            Value::I16(x) => J::from(*x),
            Value::I32(x) => J::from(*x),
            Value::I64(x) => J::from(*x),
            other => other.as_u64().map_or(J::Null, J::from),
        }
    }

    /// A short human-readable rendering (arrays are summarized).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!("{:?}…", s.chars().take(60).collect::<String>())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(t, items) => format!("[{:?}; {}]", t, items.len()),
            Value::Bool(b) => b.to_string(),
            v => v
                .as_u64()
                .map(|u| u.to_string())
                .or_else(|| v.as_f64().map(|f| f.to_string()))
                .unwrap_or_else(|| format!("{v:?}")),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.3.ffn_down.weight`.
    pub name: String,
    /// Dimensions fastest-first, as GGUF stores them (ne[0] is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape slowest-first (row-major), as candle and PyTorch write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file; tensor bytes stay in the map.
pub struct GgufFile {
    path: PathBuf,
    map: Backing,
    /// The open file the map was made from (None for bytes held in memory): writers copy
    /// untouched tensors from it in the kernel ([`crate::write::AtomicOutput::copy_range`]).
    file: Option<File>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of each tensor.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounded little-endian cursor over the header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type Parse<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Parse<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated header: {what} needs {n} bytes at offset {}, file has {} left",
                self.pos,
                self.remaining()
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, version: u32, what: &str) -> Parse<u64> {
        if version == 1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, version: u32, what: &str) -> Parse<String> {
        let len = self.count(version, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: ValueType, version: u32, key: &str, depth: usize) -> Parse<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("key '{key}': bool byte {b} is neither 0 nor 1")),
            },
            ValueType::String => Value::String(self.string(version, key)?),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let code = self.u32(key)?;
                let elem = ValueType::from_u32(code)
                    .ok_or_else(|| format!("key '{key}': unknown array element type {code}"))?;
                let n = self.count(version, key)?;
                if n.saturating_mul(elem.min_size()) > self.remaining() {
                    return Err(format!(
                        "key '{key}': array claims {n} elements but only {} bytes remain",
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, version, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`. Fails with a message naming the file and the problem.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; like llama.cpp we assume the file is not truncated while
        // mapped (doing so would raise SIGBUS, not undefined reads).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let mut g = Self::parse(path, Backing::Map(map))?;
        g.file = Some(file);
        Ok(g)
    }

    /// Parses GGUF bytes held in memory; `name` stands in for the path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(PathBuf::from(name), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, map: Backing) -> Result<Self> {
        let fail = |problem: String| Error::Gguf {
            path: path.clone(),
            problem,
        };
        if map.is_empty() {
            return Err(fail("empty file, not a GGUF model".into()));
        }
        let mut cur = Cursor {
            bytes: &map,
            pos: 0,
        };
        let magic = cur
            .take(4, "magic")
            .map_err(|_| fail("too short to be a GGUF file".into()))?;
        if magic != MAGIC {
            return Err(fail(format!(
                "not a GGUF file (magic {:?}, expected \"GGUF\")",
                String::from_utf8_lossy(magic)
            )));
        }
        let version = cur.u32("version").map_err(fail)?;
        if !(2..=3).contains(&version) {
            return Err(fail(format!(
                "unsupported GGUF version {version} (supported: 2, 3)"
            )));
        }
        let n_tensors = cur.u64("tensor count").map_err(fail)?;
        let n_kv = cur.u64("metadata count").map_err(fail)?;
        // Each metadata entry takes at least 12 bytes, each tensor info at least 24.
        if n_kv.saturating_mul(12) > cur.remaining() {
            return Err(fail(format!(
                "truncated header: it claims {n_kv} metadata entries but the file has only {} bytes left",
                cur.remaining()
            )));
        }
        if n_tensors.saturating_mul(24) > cur.remaining() {
            return Err(fail(format!(
                "truncated header: it claims {n_tensors} tensors but the file has only {} bytes left",
                cur.remaining()
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut seen = std::collections::HashSet::new();
        for i in 0..n_kv {
            let key = cur
                .string(version, &format!("metadata key #{i}"))
                .map_err(fail)?;
            if key.is_empty() {
                return Err(fail(format!("metadata key #{i} is empty")));
            }
            if !seen.insert(key.clone()) {
                return Err(fail(format!("duplicate metadata key '{key}'")));
            }
            let code = cur.u32(&key).map_err(fail)?;
            let ty = ValueType::from_u32(code)
                .ok_or_else(|| fail(format!("key '{key}': unknown value type {code}")))?;
            let value = cur.value(ty, version, &key, 0).map_err(fail)?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(fail(format!(
                    "general.alignment must be a power-of-two u32, found {v:?}"
                )))
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = cur
                .string(version, &format!("tensor name #{i}"))
                .map_err(fail)?;
            if name.len() > MAX_NAME_LEN {
                return Err(fail(format!(
                    "tensor name '{name}' is longer than {MAX_NAME_LEN} bytes"
                )));
            }
            let n_dims = cur.u32(&name).map_err(fail)? as usize;
            if n_dims > MAX_DIMS {
                return Err(fail(format!(
                    "tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = cur.u64(&name).map_err(fail)?;
                if d > i64::MAX as u64 {
                    return Err(fail(format!("tensor '{name}' has a negative dimension")));
                }
                dims.push(d);
            }
            let code = cur.u32(&name).map_err(fail)?;
            let ggml_type = GgmlType(code);
            if !ggml_type.is_known() {
                return Err(fail(format!(
                    "tensor '{name}' has unknown tensor type {code}"
                )));
            }
            let offset = cur.u64(&name).map_err(fail)?;
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    fail(format!(
                        "tensor '{name}': dimensions {dims:?} overflow the element count"
                    ))
                })?;
            let row_len = dims.first().copied().unwrap_or(1);
            if row_len % ggml_type.block_size() != 0 {
                return Err(fail(format!(
                    "tensor '{name}': row length {row_len} is not a multiple of the {} block size {}",
                    ggml_type.name(),
                    ggml_type.block_size()
                )));
            }
            let size = ggml_type
                .bytes_for(n)
                .ok_or_else(|| fail(format!("tensor '{name}': byte size overflows")))?;
            if offset % alignment != 0 {
                return Err(fail(format!(
                    "tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(fail(format!("duplicate tensor name '{name}'")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }
        let data_offset = (cur.pos as u64).next_multiple_of(alignment);
        let file_len = map.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(fail(format!(
                        "tensor '{}' data (offset {}, {} bytes) runs past the end of the file ({} bytes): truncated or corrupt",
                        t.name,
                        data_offset.saturating_add(t.offset),
                        t.size,
                        file_len
                    )))
                }
            }
        }
        Ok(GgufFile {
            path,
            map,
            file: None,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            index,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The raw bytes of the whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A required integer key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::MissingKey(key.to_string()))
    }

    /// A required float key.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::MissingKey(key.to_string()))
    }

    /// A required string key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::MissingKey(key.to_string()))
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor (a view into the map).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.size as usize]
    }

    /// The open file the map was made from (None for bytes held in memory).
    pub fn opened_file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// The open file and the byte range of `bytes` in it, when `bytes` is a slice of this
    /// file's map (None for bytes held in memory or taken from elsewhere).
    pub fn file_range(&self, bytes: &[u8]) -> Option<(&File, u64)> {
        let file = self.file.as_ref()?;
        let base = self.map.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        (start >= base && start + bytes.len() <= base + self.map.len())
            .then(|| (file, (start - base) as u64))
    }

    /// Drops the mapped pages of `bytes` (a slice of this file's map) from memory, so that
    /// reading a multi-gigabyte file once does not keep it resident; they are read from disk
    /// again if touched. A no-op for owned buffers.
    pub fn release(&self, bytes: &[u8]) {
        let Backing::Map(map) = &self.map else {
            return;
        };
        let base = map.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        if start < base || start + bytes.len() > base + map.len() {
            return;
        }
        // Whole pages inside the slice only, so that neighbouring data stays mapped.
        let page = 4096;
        let from = (start - base).next_multiple_of(page);
        let to = (start - base + bytes.len()) / page * page;
        if to > from {
            // SAFETY: a read-only, file-backed private mapping: dropping its pages only makes
            // the next access read them from the file again; no data can be lost.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }

    /// SHA-256 of the whole file, read through the map a chunk at a time with each chunk
    /// released after hashing (resident memory stays small for any file size).
    pub fn sha256_hex(&self) -> String {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        for chunk in self.map.chunks(RELEASE_CHUNK) {
            hasher.update(chunk);
            self.release(chunk);
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Bytes read between page releases when streaming through a whole file.
pub const RELEASE_CHUNK: usize = 64 << 20;
