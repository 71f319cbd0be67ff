//! `inspect`: what a model file holds.

use super::print_json;
use anyhow::Result;
use backlens::source::ModelSource;
use backlens::support::Capabilities;
use backlens::tokenizer::Tokenizer;
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
    #[serde(flatten)]
    capabilities: Capabilities,
    /// None when no tokenizer could be built (the reason is in `tokenizer_error`).
    tokenizer: Option<TokenizerSummary>,
    tokenizer_error: Option<String>,
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
    let source = ModelSource::open(&args.model)?;
    let capabilities = Capabilities::of(&source)?;
    let example = "The Eiffel Tower is located in the city of";
    let summary = Tokenizer::from_source(&source).and_then(|tok| {
        Ok(TokenizerSummary {
            vocab_size: tok.vocab_size(),
            example: example.into(),
            example_ids: tok.encode_prompt(example)?,
        })
    });
    let (tokenizer, tokenizer_error) = match summary {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (format, metadata, tensors) = match &source {
        ModelSource::Gguf(g) => (
            "GGUF",
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
        capabilities,
        tokenizer,
        tokenizer_error,
        metadata,
        tensors,
    };
    if args.json {
        return print_json(&report);
    }
    let c = &report.capabilities;
    println!("{} ({})", report.path.display(), report.format);
    match &c.hparams {
        Some(hp) => println!(
            "arch {}: {} layers, d_model {}, d_ff {}, heads {}/{} (q/kv), vocab {}, ctx {}, eps {:e}, rope base {}, tied embeddings {}",
            hp.arch.name(), hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv, hp.n_vocab, hp.n_ctx,
            hp.norm_eps, hp.rope_base, hp.tied_embeddings
        ),
        None => println!("arch {}", c.architecture),
    }
    match (&report.tokenizer, &report.tokenizer_error) {
        (Some(t), _) => println!(
            "tokenizer: {} tokens; {:?} -> {:?}",
            t.vocab_size, example, t.example_ids
        ),
        (None, e) => println!("tokenizer: none ({})", e.as_deref().unwrap_or("unknown")),
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "backlens: lens {}, edit {}, audit {}, eval {}{}",
        yes_no(c.lens),
        match c.edit_methods.is_empty() {
            true => "no".to_string(),
            false => c.edit_methods.join("/"),
        },
        yes_no(c.audit),
        yes_no(c.eval),
        c.why_not
            .as_ref()
            .map_or(String::new(), |w| format!(" ({w})"))
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
