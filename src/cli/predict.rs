//! `predict`: top-k next tokens in candle or llama.cpp.

use super::{open_any, print_json, require_gguf};
use anyhow::Result;
use backlens::model::{log_softmax_last, Numerics, Transformer};
use backlens::runtime::LlamaRuntime;
use candle_core::DType;
use serde::Serialize;
use std::path::PathBuf;

/// Which engine computes the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// backlens's own candle forward (exact f32).
    Candle,
    /// The candle forward with each matmul's input rounded as llama.cpp's CPU backend does.
    CandleGgml,
    /// llama.cpp in process.
    Llama,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Candle => "candle",
            Engine::CandleGgml => "candle-ggml",
            Engine::Llama => "llama",
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF file or HF checkpoint folder.
    model: PathBuf,
    /// The prompt.
    prompt: String,
    /// How many tokens to list.
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Engine (llama runs every architecture the pinned llama.cpp loads; the candle engines
    /// only gpt2 and llama).
    #[arg(long, value_enum, default_value_t = Engine::Candle)]
    runtime: Engine,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Prediction {
    token: String,
    id: u32,
    prob: f64,
}

#[derive(Serialize)]
struct Report {
    prompt: String,
    runtime: Engine,
    tokens: Vec<u32>,
    top: Vec<Prediction>,
}

pub fn run(args: Args) -> Result<()> {
    let m = open_any(&args.model)?;
    let tokens = m.tok.encode_prompt(&args.prompt)?;
    if tokens.is_empty() {
        anyhow::bail!("the prompt tokenizes to nothing");
    }
    let logp: Vec<f64> = match args.runtime {
        Engine::Candle | Engine::CandleGgml => {
            let numerics = match args.runtime {
                Engine::CandleGgml => Numerics::LlamaCpp,
                _ => Numerics::Exact,
            };
            let model = Transformer::load_with(&m.source, DType::F32, numerics)?;
            let (logits, _) = model.forward(&tokens, None)?;
            let last = logits.narrow(0, tokens.len() - 1, 1)?;
            log_softmax_last(&last.to_dtype(DType::F64)?)?
                .flatten_all()?
                .to_vec1()?
        }
        Engine::Llama => {
            let rt = LlamaRuntime::load(&require_gguf(&m.source)?)?;
            let logits = rt.session()?.logits_last(&tokens)?;
            backlens::numeric::log_probs(&logits)
        }
    };
    let mut order: Vec<usize> = (0..logp.len()).collect();
    order.sort_by(|&a, &b| logp[b].total_cmp(&logp[a]));
    let report = Report {
        prompt: args.prompt,
        runtime: args.runtime,
        top: order
            .iter()
            .take(args.k)
            .map(|&i| Prediction {
                token: m.tok.token_text(i as u32),
                id: i as u32,
                prob: logp[i].exp(),
            })
            .collect(),
        tokens,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{:?} ({} tokens, {})",
        report.prompt,
        report.tokens.len(),
        report.runtime
    );
    for (i, p) in report.top.iter().enumerate() {
        println!(
            "{:>3}. {:<20} {:>7.4}  (id {})",
            i + 1,
            format!("{:?}", p.token),
            p.prob,
            p.id
        );
    }
    Ok(())
}
