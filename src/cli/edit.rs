//! `edit` and `generate`: parse the arguments of an edit and print what [`backlens::patch::run`]
//! did; greedy generation through llama.cpp.

use super::{open_any, print_json, require_gguf};
use anyhow::{bail, Result};
use backlens::edit::whiten::{self, StatsCorpus, WhitenOptions};
use backlens::edit::{EditRequest, EditSettings, Method};
use backlens::patch::{self, Format, Forward, Job, WhitenSetup};
use backlens::runtime::LlamaRuntime;
use backlens::source::ModelSource;
use backlens::write::gguf::Ff2Type;
use backlens::write::OutputClaim;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF file or HF checkpoint folder.
    model: PathBuf,
    /// The prompt to edit.
    #[arg(long, requires = "target", conflicts_with = "requests")]
    prompt: Option<String>,
    /// The new target continuation.
    #[arg(long, requires = "prompt")]
    target: Option<String>,
    /// Subject inside the prompt (optional).
    #[arg(long)]
    subject: Option<String>,
    /// JSON file of requests (CounterFact/EasyEdit or ROME shape), applied in order.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Edit method: shift, shift-whitened, grad, batch (all requests solved jointly), rome or ft
    /// (hyperparameters from src/edit/hparams; --lr does not apply to them).
    #[arg(long, default_value = "shift")]
    method: Method,
    /// Layer to edit (default round(0.73 · n_layers); rome and ft: their hyperparameter file).
    #[arg(long)]
    layer: Option<usize>,
    /// Step size.
    #[arg(long, default_value_t = 0.24)]
    lr: f64,
    /// Engine of the forward pass shift reads its key and skip rule from: llama (llama.cpp's own
    /// graph; GGUF inputs, every architecture the pinned llama.cpp loads) or candle (exact f32,
    /// gpt2 and llama) [default: llama when candle does not implement the GGUF's architecture,
    /// candle otherwise].
    #[arg(long)]
    forward: Option<Forward>,
    #[command(flatten)]
    whiten: WhitenArgs,
    /// Output path (a file, or a new folder for safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// Output format: gguf, lora or safetensors.
    #[arg(long, default_value = "gguf")]
    format: Format,
    /// Storage of the edited FF2 in a GGUF output: f32 or keep (requantized to its type).
    #[arg(long, default_value = "f32")]
    ff2_type: Ff2Type,
    /// Replace an existing output (a file, or a folder backlens wrote).
    #[arg(long)]
    force: bool,
    /// Threads for batch's value searches [default: one per core]; the output does not depend
    /// on it.
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Skip the llama.cpp before/after check.
    #[arg(long)]
    no_check: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Key statistics for `--method shift-whitened` (ignored by the other methods).
#[derive(Debug, Clone, clap::Args)]
pub struct WhitenArgs {
    /// Prompts for the shift-whitened key statistics: CounterFact-shaped JSON records (their
    /// prompt, rephrase and locality strings) or a text file with one prompt a line
    /// [default: backlens's built-in generic prompts].
    #[arg(long)]
    pub stats_data: Option<PathBuf>,
    /// Records (or lines) of --stats-data to skip.
    #[arg(long, default_value_t = 0)]
    pub stats_skip: usize,
    /// Ridge λ of the whitening, relative to the mean diagonal of the second moment.
    #[arg(long, default_value_t = WhitenOptions::default().lambda_ratio)]
    pub whiten_lambda: f64,
    /// Weight of the last-position second moment added to the all-position one.
    #[arg(long, default_value_t = WhitenOptions::default().last_weight)]
    pub whiten_last_weight: f64,
    /// Weight of the contrast-subject term (prompt rerun with made-up subjects; needs the
    /// request's subject), relative to the mean diagonal; 0 turns contrast off.
    #[arg(long, default_value_t = WhitenOptions::default().contrast_weight)]
    pub contrast_weight: f64,
    /// Key direction averaged over the prompt behind a few unrelated sentences (ROME's context
    /// templates): better paraphrase reach, weaker specificity.
    #[arg(long)]
    pub whiten_context: bool,
    /// Do not read or write the statistics cache ($HOME/.cache/backlens/stats).
    #[arg(long)]
    pub no_stats_cache: bool,
}

impl WhitenArgs {
    /// The statistics setup these arguments describe.
    pub fn setup(&self) -> WhitenSetup {
        WhitenSetup {
            corpus: match &self.stats_data {
                Some(path) => StatsCorpus::File {
                    path: path.clone(),
                    skip: self.stats_skip,
                },
                None => StatsCorpus::Builtin,
            },
            options: WhitenOptions {
                lambda_ratio: self.whiten_lambda,
                last_weight: self.whiten_last_weight,
                contrast_weight: self.contrast_weight,
                context: self.whiten_context,
            },
            cache_dir: match self.no_stats_cache {
                true => None,
                false => whiten::default_cache_dir(),
            },
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// GGUF model.
    model: PathBuf,
    /// The prompt.
    prompt: String,
    /// LoRA adapter applied at scale 1.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short, default_value_t = 40)]
    n: usize,
}

fn requests(args: &Args) -> Result<Vec<EditRequest>> {
    Ok(match (&args.requests, &args.prompt, &args.target) {
        (Some(path), _, _) => EditRequest::load_file(path)?,
        (None, Some(p), Some(t)) => vec![EditRequest::new(p, t, args.subject.as_deref())?],
        _ => bail!("give --prompt and --target, or --requests FILE"),
    })
}

pub fn run(args: Args) -> Result<()> {
    let mut inputs = vec![args.model.as_path()];
    inputs.extend(args.requests.as_deref());
    inputs.extend(args.whiten.stats_data.as_deref());
    let claim = OutputClaim::new(&args.output, args.format.output_kind(), &inputs, args.force)?;
    // The tokenizer is built inside `patch::run_building_tokenizer`, beside llama.cpp's load.
    let source = ModelSource::open(&args.model)?;
    let layer = match (args.layer, args.method.optimises()) {
        (Some(l), _) => l,
        (None, true) => args.method.default_layer(&source.hparams()?)?,
        (None, false) => EditSettings::default_layer(patch::n_layer(&source)?),
    };
    let job = Job {
        requests: requests(&args)?,
        settings: EditSettings {
            method: args.method,
            layer,
            lr: args.lr,
        },
        whiten: args.whiten.setup(),
        format: args.format,
        ff2_type: args.ff2_type,
        check: !args.no_check,
        forward: args
            .forward
            .unwrap_or_else(|| Forward::default_for(&source)),
        threads: args.threads,
    };
    let report = patch::run_building_tokenizer(&source, &job, claim)?;
    if args.json {
        return print_json(&report);
    }
    for e in &report.edits {
        match e.skipped {
            true => println!(
                "skip: {:?} already continues with {:?}",
                e.prompt, e.top1_before
            ),
            false => println!(
                "edit: {:?}: {:?} -> {:?}",
                e.prompt, e.top1_before, e.target
            ),
        }
    }
    let s = &report.settings;
    println!(
        "wrote {} ({}, layer {}, lr {}, {})",
        report.output.display(),
        report.format,
        s.layer,
        s.lr,
        s.method
    );
    if let Some(c) = &report.check {
        println!("\nthrough llama.cpp, before -> after:");
        for (b, a) in c.before.iter().zip(&c.after) {
            println!(
                "  {:?} -> {:?}: p {:.4} -> {:.4}, rank {} -> {}, top-1 {:?} -> {:?}",
                b.prompt, b.target, b.prob, a.prob, b.rank, a.rank, b.top1, a.top1
            );
        }
    }
    Ok(())
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let m = open_any(&args.model)?;
    let mut rt = LlamaRuntime::load(&require_gguf(&m.source)?)?;
    let mut adapter = match &args.lora {
        Some(p) => Some(rt.load_lora(p)?),
        None => None,
    };
    let mut s = rt.session()?;
    if let Some(a) = adapter.as_mut() {
        s.set_lora(a, 1.0)?;
    }
    let ids = m.tok.encode_prompt(&args.prompt)?;
    let out = s.generate(&ids, args.n)?;
    println!("{}{}", args.prompt, m.tok.decode(&out));
    Ok(())
}
