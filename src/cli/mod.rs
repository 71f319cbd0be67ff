//! Command-line parsing and dispatch; each subcommand lives in its own file.

mod audit;
mod bench;
mod edit;
mod eval;
mod inspect;
mod lens;
mod predict;
mod serve;
mod table1;

use anyhow::Result;
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Version line with the llama-server pin from `vendor/llama-cpp.lock` (read by build.rs).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nllama-server for end-to-end checks: ",
    env!("BACKLENS_LLAMA_CPP_PACKAGE"),
    "==",
    env!("BACKLENS_LLAMA_CPP_VERSION"),
    " (sdist sha256 ",
    env!("BACKLENS_LLAMA_CPP_SHA256"),
    ")"
);

/// Backward Lens for llama.cpp models: inspect, lens, edit, audit and evaluate GGUF/safetensors models.
#[derive(Debug, Parser)]
#[command(name = "backlens-patch", version, long_version = LONG_VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Architecture, hyperparameters, tensor table and tokenizer of a model.
    Inspect(inspect::Args),
    /// Top-k next tokens for a prompt, in candle or llama.cpp.
    Predict(predict::Args),
    /// Project FF1 inputs and FF2 gradients of one backward pass into the vocabulary.
    Lens(lens::Args),
    /// Edit FF2 (forward-pass shift or gradient step) and write a patched model or adapter.
    Edit(edit::Args),
    /// Wall times of load, predict, lens, edit+write and eval next to copying the file.
    Bench(bench::Args),
    /// CounterFact metrics of edits, measured through llama.cpp.
    Eval(eval::Args),
    /// Greedy generation through llama.cpp, optionally with a LoRA adapter.
    Generate(edit::GenerateArgs),
    /// Explain a patch: changed tensors, their rank and singular values, and what they write into the vocabulary.
    Audit(audit::Args),
    /// Serve a model (and adapters) with stock llama-server on 127.0.0.1.
    Serve(serve::Args),
}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Inspect(a) => inspect::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Lens(a) => lens::run(a),
        Command::Edit(a) => edit::run(a),
        Command::Generate(a) => edit::generate(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

/// A model opened with its tokenizer, of a family backlens runs in candle.
struct Opened {
    source: ModelSource,
    tok: Tokenizer,
}

/// Opens a model for candle work: fails first, naming the key or tensor, when its
/// hyperparameters do not resolve.
fn open(path: &Path) -> Result<Opened> {
    let source = ModelSource::open(path)?;
    source.hparams()?;
    let tok = Tokenizer::from_source(&source).map_err(|e| e.in_file(path))?;
    Ok(Opened { source, tok })
}

/// A model opened for llama.cpp or forward-only work: any architecture, hyperparameters not
/// resolved (commands that need candle's forward resolve them and name what is missing).
struct OpenedAny {
    source: ModelSource,
    tok: Tokenizer,
}

fn open_any(path: &Path) -> Result<OpenedAny> {
    let source = ModelSource::open(path)?;
    let tok = Tokenizer::from_source(&source).map_err(|e| e.in_file(path))?;
    Ok(OpenedAny { source, tok })
}

/// Prints `value` as pretty JSON.
fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Requires a GGUF path for llama.cpp.
fn require_gguf(source: &ModelSource) -> Result<PathBuf> {
    match source {
        ModelSource::Gguf(g) => Ok(g.path().to_path_buf()),
        ModelSource::Hf(h) => anyhow::bail!(
            "{}: llama.cpp needs a GGUF file (this is an HF safetensors checkpoint)",
            h.ckpt.dir.display()
        ),
    }
}
