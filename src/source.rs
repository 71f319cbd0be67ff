//! One interface over a GGUF file and an HF safetensors folder that speaks GGUF names and GGUF
//! layouts: what every reader above the file formats (model, tokenizer, edit, audit) opens.

use crate::arch::{self, hf, HParams};
use crate::weights::gguf::{self, GgufFile};
use crate::weights::quant;
use crate::weights::safetensors::HfCheckpoint;
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// An HF checkpoint folder with the hyperparameters its `config.json` resolves to.
pub struct HfModel {
    /// The folder's files.
    pub ckpt: HfCheckpoint,
    /// Resolved hyperparameters from `config.json`.
    pub hparams: HParams,
}

impl HfModel {
    /// Opens a folder holding `config.json` and safetensors weights.
    pub fn open(dir: &Path) -> Result<HfModel> {
        let ckpt = HfCheckpoint::open(dir)?;
        let config = dir.join("config.json");
        let n_tensors = ckpt
            .shards
            .iter()
            .map(|s| s.metadata.offset_keys().len())
            .sum();
        let hparams = hf::hparams_from_config(&config, &ckpt.config_text)
            .and_then(|hp| hp.bounded_by(n_tensors))
            .map_err(|e| e.in_file(&config))?;
        Ok(HfModel { ckpt, hparams })
    }
}

/// A model file or folder opened for reading.
pub enum ModelSource {
    /// A GGUF file.
    Gguf(GgufFile),
    /// An HF checkpoint folder.
    Hf(HfModel),
}

impl ModelSource {
    /// Opens a GGUF file, an HF checkpoint folder, or a `.safetensors` file inside such a folder.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelSource> {
        let path = path.as_ref();
        Self::open_unnamed(path).map_err(|e| e.in_file(path))
    }

    fn open_unnamed(path: &Path) -> Result<ModelSource> {
        if path.is_dir() {
            return Ok(ModelSource::Hf(HfModel::open(path)?));
        }
        let mut magic = [0u8; 4];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|e| Error::io(path, e))?;
        let is_gguf = n == 4 && &magic == gguf::MAGIC;
        if !is_gguf && path.extension().is_some_and(|e| e == "safetensors") {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Ok(ModelSource::Hf(HfModel::open(dir)?));
        }
        Ok(ModelSource::Gguf(GgufFile::open(path)?))
    }

    /// The file or folder this was opened from.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(g) => g.path(),
            ModelSource::Hf(h) => &h.ckpt.dir,
        }
    }

    /// Hyperparameters, checked against the shapes of every required tensor.
    pub fn hparams(&self) -> Result<HParams> {
        self.hparams_unnamed().map_err(|e| e.in_file(self.path()))
    }

    fn hparams_unnamed(&self) -> Result<HParams> {
        let hp = match self {
            ModelSource::Gguf(g) => HParams::from_gguf(g)?,
            ModelSource::Hf(h) => h.hparams.clone(),
        };
        for (name, expected, need) in arch::tensor_specs(&hp) {
            let got = match self.shape(&name) {
                Some(got) => got,
                None if need.required(hp.tied_embeddings) => {
                    return Err(Error::MissingTensor(name))
                }
                None => continue,
            };
            if got != expected {
                return Err(Error::Shape {
                    name,
                    expected,
                    got,
                });
            }
        }
        Ok(hp)
    }

    /// Row-major GGUF-layout shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            ModelSource::Gguf(g) => g.tensor(name).map(|t| t.shape()),
            ModelSource::Hf(h) => {
                let (hf_name, layout) = hf::hf_name(&h.hparams, name, &h.ckpt.prefix)?;
                let (_, info) = h.ckpt.find(&hf_name)?;
                let mut shape = info.shape.clone();
                if layout == hf::Layout::Transposed {
                    shape.reverse();
                }
                Some(shape)
            }
        }
    }

    /// A tensor as f32 in the GGUF layout with its row-major shape, or None when absent.
    pub fn tensor_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        self.tensor_f32_unnamed(name)
            .map_err(|e| e.in_file(self.path()))
    }

    fn tensor_f32_unnamed(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        match self {
            ModelSource::Gguf(g) => {
                let Some(info) = g.tensor(name) else {
                    return Ok(None);
                };
                let bytes = g.tensor_bytes(info);
                let values = quant::dequantize(info.ggml_type, bytes, name)?;
                // The f32 copy is what callers keep; the mapped bytes need not stay resident.
                g.release(bytes);
                Ok(Some((values, info.shape())))
            }
            ModelSource::Hf(h) => {
                let Some((hf_name, layout)) = hf::hf_name(&h.hparams, name, &h.ckpt.prefix) else {
                    return Ok(None);
                };
                Ok(h.ckpt
                    .read_f32(&hf_name)?
                    .map(|(v, shape)| hf::to_gguf(v, &shape, layout)))
            }
        }
    }

    /// Calls `f(first_row, values)` on consecutive chunks of up to `chunk_rows` rows of the 2-D
    /// tensor `name` (GGUF layout), dequantizing one chunk at a time; a GGUF's mapped pages are
    /// released after each chunk, so that streaming a large tensor keeps little resident.
    pub fn for_row_chunks(
        &self,
        name: &str,
        chunk_rows: usize,
        f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.for_row_chunks_unnamed(name, chunk_rows, f)
            .map_err(|e| e.in_file(self.path()))
    }

    fn for_row_chunks_unnamed(
        &self,
        name: &str,
        chunk_rows: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        match self {
            ModelSource::Gguf(g) => {
                let (info, row_bytes) = gguf_rows(g, name)?;
                let bytes = g.tensor_bytes(info);
                for (i, chunk) in bytes.chunks(row_bytes * chunk_rows.max(1)).enumerate() {
                    let values = quant::dequantize(info.ggml_type, chunk, name)?;
                    g.release(chunk);
                    f(i * chunk_rows.max(1), &values)?;
                }
                Ok(())
            }
            ModelSource::Hf(_) => {
                let (values, shape) = self.require_f32(name)?;
                let row_len = shape.last().copied().unwrap_or(1);
                for (i, chunk) in values.chunks(row_len * chunk_rows.max(1)).enumerate() {
                    f(i * chunk_rows.max(1), chunk)?;
                }
                Ok(())
            }
        }
    }

    /// Rows `rows` of the 2-D tensor `name` (GGUF layout) as f32, dequantizing only those rows.
    pub fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.rows_f32_unnamed(name, rows)
            .map_err(|e| e.in_file(self.path()))
    }

    fn rows_f32_unnamed(&self, name: &str, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let ModelSource::Gguf(g) = self else {
            let (values, shape) = self.require_f32(name)?;
            let row_len = shape.last().copied().unwrap_or(1);
            return rows
                .iter()
                .map(|&r| {
                    values
                        .get(r * row_len..(r + 1) * row_len)
                        .map(<[f32]>::to_vec)
                        .ok_or_else(|| Error::Invalid(format!("row {r} out of range in '{name}'")))
                })
                .collect();
        };
        let (info, row_bytes) = gguf_rows(g, name)?;
        let bytes = g.tensor_bytes(info);
        rows.iter()
            .map(|&r| {
                let row = bytes
                    .get(r * row_bytes..(r + 1) * row_bytes)
                    .ok_or_else(|| Error::Invalid(format!("row {r} out of range in '{name}'")))?;
                quant::dequantize(info.ggml_type, row, name)
            })
            .collect()
    }

    /// Like [`Self::tensor_f32`] but fails when the tensor is absent.
    pub fn require_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.tensor_f32(name)?
            .ok_or_else(|| Error::MissingTensor(name.to_string()).in_file(self.path()))
    }
}

/// A GGUF tensor's info and the bytes one of its rows (ne0 values) takes.
fn gguf_rows<'g>(g: &'g GgufFile, name: &str) -> Result<(&'g gguf::TensorInfo, usize)> {
    let info = g
        .tensor(name)
        .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
    let row_bytes =
        info.ggml_type
            .bytes_for(info.dims[0])
            .ok_or_else(|| Error::UnsupportedType {
                name: name.to_string(),
                type_name: info.ggml_type.name(),
            })?;
    Ok((info, row_bytes as usize))
}
