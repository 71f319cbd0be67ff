//! One error type for the library; every variant names the file, key or tensor at fault.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors raised by backlens. The binary prints `error: {self}` on one line and exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A GGUF file is malformed or unsupported.
    #[error("{path}: {problem}")]
    Gguf { path: PathBuf, problem: String },
    /// A LoRA adapter that llama.cpp would refuse or crash on, or that does not fit its base.
    #[error("{path}: {problem}")]
    Adapter { path: PathBuf, problem: String },
    /// A safetensors file or HF checkpoint folder is malformed or unsupported.
    #[error("{path}: {problem}")]
    Safetensors { path: PathBuf, problem: String },
    /// The file is a model, but of an architecture backlens does not know.
    #[error("unknown architecture '{0}' (supported: gpt2, llama, qwen2, qwen3, phi3, gemma3)")]
    UnknownArch(String),
    /// A tensor the architecture needs is absent.
    #[error("missing required tensor '{0}'")]
    MissingTensor(String),
    /// A metadata key the architecture needs is absent or has the wrong type.
    #[error("missing or invalid metadata key '{0}'")]
    MissingKey(String),
    /// A tensor has another shape than the hyperparameters imply.
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// An output path backlens may not write (a device, a link, a folder of other files, ...).
    #[error("{path}: {problem}")]
    Output { path: PathBuf, problem: String },
    /// A tensor type that cannot be converted to f32 here.
    #[error("tensor '{name}' has type {type_name}, which backlens cannot dequantize")]
    UnsupportedType { name: String, type_name: String },
    /// The user asked for something that cannot be done (bad layer, empty target, ...).
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer could not be built or failed on the input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tokenizer kind or pre-tokenizer backlens does not implement.
    #[error("{key} = '{value}' is not supported (supported: {supported})")]
    UnsupportedTokenizer {
        key: String,
        value: String,
        supported: String,
    },
    /// llama.cpp refused to load or run something.
    #[error("llama.cpp: {0}")]
    Runtime(String),
    /// A tensor computation failed.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    /// A numeric routine failed (no convergence, a matrix that is not positive definite).
    #[error("numerics: {0}")]
    Numeric(String),
    /// A layer index outside the model.
    #[error("layer {layer} out of range: the model has layers 0 to {}", n_layer.saturating_sub(1))]
    LayerOutOfRange { layer: usize, n_layer: usize },
    /// An edit or lens request that cannot be run (empty prompt, target that tokenizes to
    /// nothing, prompt longer than the context, ...).
    #[error("{0}")]
    BadRequest(String),
    /// An error about the contents of a file, with the file's path in front.
    #[error("{path}: {error}")]
    InFile { path: PathBuf, error: Box<Error> },
    /// A JSON file could not be parsed.
    #[error("{path}: {problem}")]
    Json { path: PathBuf, problem: String },
}

impl Error {
    /// Puts `path` in front of an error that does not name a file yet.
    pub fn in_file(self, path: &std::path::Path) -> Error {
        match self {
            Error::Io { .. }
            | Error::Adapter { .. }
            | Error::Gguf { .. }
            | Error::Safetensors { .. }
            | Error::Output { .. }
            | Error::Json { .. }
            | Error::InFile { .. } => self,
            other => Error::InFile {
                path: path.to_path_buf(),
                error: Box::new(other),
            },
        }
    }

    /// Whether this is (or wraps) [`Error::UnknownArch`].
    pub fn is_unknown_arch(&self) -> bool {
        match self {
            Error::UnknownArch(_) => true,
            Error::InFile { error, .. } => error.is_unknown_arch(),
            _ => false,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}
