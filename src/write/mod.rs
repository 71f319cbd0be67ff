//! Writers for patched models: GGUF, LoRA adapter GGUF and safetensors. Every writer goes through
//! [`AtomicOutput`]: bytes go to a temporary file beside the target, are fsynced, then renamed
//! into place, so a failed or killed write never leaves a half-written or overwritten output.

pub mod gguf;
pub mod lora;
pub mod safetensors;

use crate::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Marker in the names of temporary files, so leftovers of a killed run are recognisable.
pub const PARTIAL_MARKER: &str = ".backlens-partial-";

/// Refuses an output path that is one of the inputs (also through links) or that exists
/// without `force`.
pub fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let out_abs = absolute(out);
    for input in inputs {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
            if a == b {
                return Err(Error::Invalid(format!(
                    "output {} is the input file; choose another path",
                    out.display()
                )));
            }
        }
        if absolute(input) == out_abs {
            return Err(Error::Invalid(format!(
                "output {} is the input file; choose another path",
                out.display()
            )));
        }
    }
    if out.exists() && !force {
        return Err(Error::Invalid(format!(
            "output {} exists; pass --force to replace it",
            out.display()
        )));
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A file being written to a temporary path; [`AtomicOutput::commit`] moves it into place.
/// Dropping it without committing removes the temporary file.
pub struct AtomicOutput {
    target: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
    committed: bool,
}

impl AtomicOutput {
    /// Starts writing `target`; removes leftovers of earlier killed writes to the same target.
    pub fn create(target: &Path) -> Result<AtomicOutput> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = target
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} is not a file path", target.display())))?
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".{file_name}{PARTIAL_MARKER}");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let temp = dir.join(format!("{prefix}{}", std::process::id()));
        let file = File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            temp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            committed: false,
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().expect("writer present until commit");
        w.write_all(bytes).map_err(|e| Error::io(&self.target, e))
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer present until commit");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&self.target, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.target, e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        drop(self.writer.take());
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// sha256 of a file's bytes, hex-encoded.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
