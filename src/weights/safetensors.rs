//! HF checkpoint folders: `config.json`, `model.safetensors` (or a sharded index) and
//! `tokenizer.json`, read through memory maps.

use super::Backing;
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One mapped `.safetensors` file and its parsed header.
pub struct Shard {
    /// File path.
    pub path: PathBuf,
    map: Backing,
    header_len: usize,
    /// Parsed header.
    pub metadata: Metadata,
}

impl Shard {
    /// Maps and validates one safetensors file.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; see GgufFile::open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Backing::Map(map))
    }

    /// Parses safetensors bytes held in memory; `name` stands in for the path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Shard> {
        Self::parse(Path::new(name), Backing::Owned(bytes))
    }

    fn parse(path: &Path, map: Backing) -> Result<Shard> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                problem: describe(&e, map.len()),
            })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata,
        })
    }

    /// The stored bytes of a tensor (a view into the map).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = 8 + self.header_len + info.data_offsets.0;
        &self.map[start..8 + self.header_len + info.data_offsets.1]
    }

    /// The raw bytes of the whole file.
    pub fn file_bytes(&self) -> &[u8] {
        &self.map
    }
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError::*;
    match e {
        HeaderTooSmall => "too short to be a safetensors file".to_string(),
        InvalidHeaderLength => {
            format!("safetensors header length runs past the end of the file ({file_len} bytes)")
        }
        MetadataIncompleteBuffer => {
            "tensor data does not match the file size: truncated or corrupt".to_string()
        }
        other => format!("invalid safetensors file: {other}"),
    }
}

/// An HF checkpoint folder.
pub struct HfCheckpoint {
    /// The folder.
    pub dir: PathBuf,
    /// The raw `config.json` text, copied verbatim by writers.
    pub config_text: String,
    /// Mapped shards.
    pub shards: Vec<Shard>,
    index: HashMap<String, usize>,
    /// Name prefix in front of GPT-2 tensor names ("" or "transformer.").
    pub prefix: String,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl HfCheckpoint {
    /// Opens a folder holding `config.json` and safetensors weights.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                problem: "folder has no config.json, not an HF checkpoint".into(),
            });
        }
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let shard_paths = Self::shard_paths(dir)?;
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in shard_paths {
            let shard = Shard::open(&path)?;
            for name in shard.metadata.offset_keys() {
                index.insert(name, shards.len());
            }
            shards.push(shard);
        }
        let prefix = if index.keys().any(|k| k.starts_with("transformer.")) {
            "transformer.".to_string()
        } else {
            String::new()
        };
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            config_text,
            shards,
            index,
            prefix,
        })
    }

    fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                problem: "no model.safetensors or model.safetensors.index.json".into(),
            });
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index_path.clone(),
            problem: e.to_string(),
        })?;
        let mut files: Vec<&String> = idx.weight_map.values().collect();
        files.sort();
        files.dedup();
        files
            .into_iter()
            .map(|f| {
                if f.contains('/') || f.contains("..") {
                    return Err(Error::Safetensors {
                        path: index_path.clone(),
                        problem: format!("shard name '{f}' must be a plain file name"),
                    });
                }
                Ok(dir.join(f))
            })
            .collect()
    }

    /// Finds a tensor by its HF name.
    pub fn find(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    /// Reads a tensor by HF name as f32 (F32, F16 and BF16 are supported).
    pub fn read_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some((shard, info)) = self.find(name) else {
            return Ok(None);
        };
        let bytes = shard.bytes(info);
        let values = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedType {
                    name: name.to_string(),
                    type_name: format!("{other:?}"),
                })
            }
        };
        Ok(Some((values, info.shape.clone())))
    }
}

/// Encodes f32 values in a safetensors float dtype (F32, F16 or BF16).
pub fn encode(values: &[f32], dtype: Dtype) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => return None,
    })
}
