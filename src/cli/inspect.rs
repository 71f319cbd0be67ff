//! `inspect`: what a model file holds.

use super::{open, print_json};
use anyhow::Result;
use backlens::source::ModelSource;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF file or HF checkpoint folder.
    model: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    shape: Vec<usize>,
    bytes: u64,
}

#[derive(Serialize)]
struct Report {
    path: PathBuf,
    format: &'static str,
    hparams: backlens::arch::HParams,
    tokenizer: TokenizerSummary,
    metadata: Vec<(String, String)>,
    tensors: Vec<TensorRow>,
}

#[derive(Serialize)]
struct TokenizerSummary {
    vocab_size: usize,
    example: String,
    example_ids: Vec<u32>,
}

pub fn run(args: Args) -> Result<()> {
    let m = open(&args.model)?;
    let hparams = m.source.hparams()?;
    let example = "The Eiffel Tower is located in the city of";
    let tokenizer = TokenizerSummary {
        vocab_size: m.tok.vocab_size(),
        example: example.into(),
        example_ids: m.tok.encode_prompt(example)?,
    };
    let (format, metadata, tensors) = match &m.source {
        ModelSource::Gguf(g) => (
            "gguf",
            g.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.summary()))
                .collect(),
            g.tensors
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    ty: t.ggml_type.name(),
                    shape: t.shape(),
                    bytes: t.size,
                })
                .collect(),
        ),
        ModelSource::Hf(h) => {
            let mut rows: Vec<TensorRow> = h
                .ckpt
                .shards
                .iter()
                .flat_map(|s| {
                    s.metadata
                        .tensors()
                        .into_iter()
                        .map(|(name, info)| TensorRow {
                            name,
                            ty: format!("{:?}", info.dtype),
                            shape: info.shape.clone(),
                            bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
                        })
                })
                .collect();
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            ("safetensors", Vec::new(), rows)
        }
    };
    let report = Report {
        path: args.model.clone(),
        format,
        hparams,
        tokenizer,
        metadata,
        tensors,
    };
    if args.json {
        return print_json(&report);
    }
    let hp = &report.hparams;
    println!("{} ({})", report.path.display(), report.format);
    println!(
        "arch {}: {} layers, d_model {}, d_ff {}, heads {}/{} (q/kv), vocab {}, ctx {}, eps {:e}, rope base {}, tied embeddings {}",
        hp.arch.name(), hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv, hp.n_vocab, hp.n_ctx,
        hp.norm_eps, hp.rope_base, hp.tied_embeddings
    );
    println!(
        "tokenizer: {} tokens; {:?} -> {:?}",
        report.tokenizer.vocab_size, example, report.tokenizer.example_ids
    );
    if !report.metadata.is_empty() {
        println!("\nmetadata ({} keys):", report.metadata.len());
        for (k, v) in &report.metadata {
            println!("  {k:<40} {v}");
        }
    }
    let total: u64 = report.tensors.iter().map(|t| t.bytes).sum();
    println!(
        "\ntensors ({}, {:.1} MiB):",
        report.tensors.len(),
        total as f64 / 1048576.0
    );
    for t in &report.tensors {
        println!(
            "  {:<40} {:<6} {:<16} {:>12}",
            t.name,
            t.ty,
            format!("{:?}", t.shape),
            t.bytes
        );
    }
    Ok(())
}
