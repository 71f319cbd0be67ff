//! Writers for patched models: GGUF and safetensors (LoRA adapters are [`crate::lora`]'s). Every
//! writer goes through [`output`]: the path is checked and locked before any work, bytes go to a
//! temporary file beside the target, are fsynced, and are renamed into place only when everything
//! has passed, so a failed or interrupted write never leaves a half-written or overwritten output.

pub mod gguf;
pub mod output;
pub mod safetensors;

pub use output::{AtomicOutput, OutputClaim, OutputKind, Staged, PARTIAL_MARKER};

/// sha256 of a file's bytes, hex-encoded.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
