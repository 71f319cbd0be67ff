//! Patched HF checkpoint folders: every file is copied, and in the shard holding an edited tensor
//! only that tensor's bytes change (same name, dtype, shape and offsets; HF layout respected, so
//! GPT-2's Conv1D [in, out] weights get the transposed update).

use super::output::{OutputClaim, OutputKind, Staged, StagedFolder};
use crate::arch::hf;
use crate::delta::Delta;
use crate::source::HfModel;
use crate::weights::safetensors::encode;
use crate::{Error, Result};
use std::path::Path;

/// Writes `model` with `deltas` applied into the staged folder `out` (every small text file of
/// the checkpoint is copied, each shard rewritten with its patched bytes).
pub fn stage_patched(model: &HfModel, deltas: &[Delta], mut out: StagedFolder) -> Result<Staged> {
    let ckpt = &model.ckpt;
    // Replacement bytes per (shard, absolute byte range).
    let mut patches: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    let mut names: Vec<&str> = deltas.iter().map(|d| d.tensor.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let (hf_name, layout) = hf::hf_name(&model.hparams, name, &ckpt.prefix)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let (values, hf_shape) = ckpt
            .read_f32(&hf_name)?
            .ok_or_else(|| Error::MissingTensor(hf_name.clone()))?;
        let (mut gguf_values, gguf_shape) = hf::to_gguf(values, &hf_shape, layout);
        for d in deltas.iter().filter(|d| d.tensor == name) {
            d.add_to(&mut gguf_values);
        }
        let hf_values = hf::to_hf(&gguf_values, &gguf_shape, layout);
        let (shard, info) = ckpt.find(&hf_name).expect("read above");
        let bytes = encode(&hf_values, info.dtype).ok_or_else(|| Error::UnsupportedType {
            name: hf_name.clone(),
            type_name: format!("{:?}", info.dtype),
        })?;
        let start = shard.bytes(info).as_ptr() as usize - shard.file_bytes().as_ptr() as usize;
        let idx = ckpt
            .shards
            .iter()
            .position(|s| std::ptr::eq(s, shard))
            .expect("shard of this checkpoint");
        patches.push((idx, start, bytes));
    }
    for entry in std::fs::read_dir(&ckpt.dir).map_err(|e| Error::io(&ckpt.dir, e))? {
        let path = entry.map_err(|e| Error::io(&ckpt.dir, e))?.path();
        let name = path.file_name().expect("entry has a name").to_owned();
        let is_shard = ckpt.shards.iter().any(|s| s.path == path);
        let small_text = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "txt" | "model" | "jinja")
        );
        if is_shard || !path.is_file() || !small_text {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        out.write_file(&name.to_string_lossy(), &bytes)?;
    }
    for (i, shard) in ckpt.shards.iter().enumerate() {
        let mut bytes = shard.file_bytes().to_vec();
        for (_, start, data) in patches.iter().filter(|p| p.0 == i) {
            bytes[*start..*start + data.len()].copy_from_slice(data);
        }
        let name = shard.path.file_name().expect("shard file name");
        out.write_file(&name.to_string_lossy(), &bytes)?;
    }
    out.finish()
}

/// Writes `model` with `deltas` applied into the new folder `out`.
pub fn write_patched(model: &HfModel, deltas: &[Delta], out: &Path) -> Result<()> {
    let claim = OutputClaim::new(out, OutputKind::Folder, &[&model.ckpt.dir], false)?;
    stage_patched(model, deltas, claim.stage_folder()?)?.commit()
}
