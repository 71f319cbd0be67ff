//! backlens: the Backward Lens (Katz et al., EMNLP 2024) for llama.cpp models.
//!
//! Read GGUF and HF safetensors models ([`weights`], [`arch`]), run them in candle with capture
//! points and a backward pass ([`model`], [`lens`]), edit FF2 with forward-pass shifting or a
//! gradient step ([`edit`]), write patched GGUF and safetensors ([`write`]) or LoRA adapters
//! ([`lora`], which also checks adapters the way llama.cpp loads them), explain a patch
//! ([`audit`]), check everything through llama.cpp itself ([`runtime`]), and read FF2's inputs
//! off llama.cpp's own graph ([`trace`]).

pub mod arch;
pub mod audit;
pub mod base_hash;
pub mod cleanup;
pub mod delta;
pub mod edit;
mod error;
pub mod eval;
pub mod kernel;
pub mod lens;
pub mod lora;
pub mod model;
mod names;
pub mod numeric;
pub mod patch;
pub mod perplexity;
pub mod provenance;
pub mod report;
pub mod runtime;
pub mod source;
pub mod support;
pub mod tokenizer;
pub mod trace;
pub mod weights;
pub mod write;

pub use error::{Error, Result};
