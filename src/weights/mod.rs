//! Model file readers: GGUF ([`gguf`], with ggml's tensor types in [`quant`]) and HF safetensors
//! folders ([`safetensors`]). They know file formats only; what the tensors mean is `arch`'s job,
//! and `source` puts both behind one interface. [`ggml_cpu`] holds ggml's CPU arithmetic on
//! those types, for the forward that reproduces llama.cpp's.

pub mod ggml_cpu;
pub mod gguf;
pub mod quant;
pub mod safetensors;

/// The bytes behind a parsed file: a read-only map, or an owned buffer (fuzzing, tests).
enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}
