//! `edit` and `generate`: compute an edit, write it as a patched GGUF, LoRA adapter or
//! safetensors folder, and check the written file through llama.cpp.

use super::{open, print_json, require_gguf};
use anyhow::{bail, Result};
use backlens::edit::whiten::{self, StatsCorpus, StatsStore, WhitenOptions};
use backlens::edit::{self, EditContext, EditOutcome, EditRequest, EditSettings, Method};
use backlens::model::Transformer;
use backlens::runtime::{argmax, log_probs, LlamaRuntime, Session};
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::Value;
use backlens::weights::ModelSource;
use backlens::write::gguf::{patch_plan, Ff2Type};
use backlens::write::{check_output, lora, safetensors};
use candle_core::DType;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Output format of an edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A full patched GGUF.
    Gguf,
    /// A low-rank LoRA adapter GGUF for llama.cpp's --lora.
    Lora,
    /// A patched HF safetensors folder (safetensors inputs only).
    Safetensors,
}

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
    /// Edit method.
    #[arg(long, value_enum, default_value_t = Method::Shift)]
    method: Method,
    /// Layer to edit (default round(0.73 · n_layers)).
    #[arg(long)]
    layer: Option<usize>,
    /// Step size.
    #[arg(long, default_value_t = 0.24)]
    lr: f64,
    #[command(flatten)]
    whiten: WhitenArgs,
    /// Output path (a file, or a folder for safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Gguf)]
    format: Format,
    /// Storage of the edited FF2 in a GGUF output.
    #[arg(long, value_enum, default_value_t = Ff2Type::F32)]
    ff2_type: Ff2Type,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
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
    /// The statistics corpus.
    pub fn corpus(&self) -> StatsCorpus {
        match &self.stats_data {
            Some(path) => StatsCorpus::File {
                path: path.clone(),
                skip: self.stats_skip,
            },
            None => StatsCorpus::Builtin,
        }
    }

    /// The key options.
    pub fn options(&self) -> WhitenOptions {
        WhitenOptions {
            lambda_ratio: self.whiten_lambda,
            last_weight: self.whiten_last_weight,
            contrast_weight: self.contrast_weight,
            context: self.whiten_context,
        }
    }

    /// A statistics store for the unedited `model` loaded from `path`, when `method` needs one.
    pub fn store(
        &self,
        method: Option<Method>,
        model: &Transformer,
        tok: &Tokenizer,
        path: &Path,
    ) -> Result<Option<StatsStore>> {
        if !method.is_some_and(Method::needs_stats) {
            return Ok(None);
        }
        let cache = match self.no_stats_cache {
            true => None,
            false => whiten::default_cache_dir(),
        };
        Ok(Some(StatsStore::new(
            model,
            tok,
            path,
            &self.corpus(),
            self.options(),
            cache,
        )?))
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

/// Probability, rank and top-1 of a target after a prompt, through llama.cpp.
#[derive(Debug, Serialize)]
struct Probe {
    prompt: String,
    target: String,
    prob: f64,
    rank: usize,
    top1: String,
}

#[derive(Serialize)]
struct Check {
    before: Vec<Probe>,
    after: Vec<Probe>,
}

#[derive(Serialize)]
struct Report<'a> {
    output: &'a Path,
    format: Format,
    settings: EditSettings,
    edits: Vec<EditSummary>,
    check: Option<Check>,
}

#[derive(Serialize)]
struct EditSummary {
    prompt: String,
    target: String,
    target_id: u32,
    top1_before: String,
    skipped: bool,
}

/// Provenance keys written into patched GGUFs and adapters.
fn provenance(
    settings: &EditSettings,
    outcomes: &[EditOutcome],
    base_sha256: &str,
    whiten: &WhitenArgs,
) -> Vec<(String, Value)> {
    let edits: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "prompt": o.request.prompt,
                "target_new": o.request.target_new,
                "target_id": o.target_id,
                "skipped": o.delta.is_none(),
            })
        })
        .collect();
    let method = settings.method.name();
    let mut keys = vec![
        (
            "backlens.version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        ),
        ("backlens.method".into(), Value::String(method.into())),
        ("backlens.layer".into(), Value::U32(settings.layer as u32)),
        ("backlens.lr".into(), Value::F32(settings.lr as f32)),
        (
            "backlens.edits".into(),
            Value::String(serde_json::Value::Array(edits).to_string()),
        ),
        (
            "backlens.base_sha256".into(),
            Value::String(base_sha256.to_string()),
        ),
    ];
    if settings.method.needs_stats() {
        keys.push((
            "backlens.whiten".into(),
            Value::String(serde_json::to_string(&whiten.options()).unwrap_or_default()),
        ));
        keys.push((
            "backlens.stats_corpus".into(),
            Value::String(whiten.corpus().describe()),
        ));
    }
    keys
}

fn requests(args: &Args) -> Result<Vec<EditRequest>> {
    Ok(match (&args.requests, &args.prompt, &args.target) {
        (Some(path), _, _) => EditRequest::load_file(path)?,
        (None, Some(p), Some(t)) => vec![EditRequest::new(p, t, args.subject.as_deref())?],
        _ => bail!("give --prompt and --target, or --requests FILE"),
    })
}

pub fn run(args: Args) -> Result<()> {
    check_output(&args.output, &[&args.model], args.force)?;
    let m = open(&args.model)?;
    let reqs = requests(&args)?;
    let is_hf = matches!(m.source, ModelSource::Hf(_));
    match (args.format, is_hf) {
        (Format::Safetensors, false) => bail!("--format safetensors needs an HF safetensors input"),
        (Format::Gguf | Format::Lora, true) => bail!(
            "--format {:?} needs a GGUF input; use --format safetensors",
            args.format
        ),
        _ => {}
    }
    let settings = EditSettings {
        method: args.method,
        layer: args
            .layer
            .unwrap_or_else(|| EditSettings::default_layer(m.hp.n_layer)),
        lr: args.lr,
    };
    // Plain FPS on a GGUF needs only one block in memory at a time; the other methods (and
    // safetensors inputs, which are small here) load the whole model in f32.
    let outcomes = match (&m.source, settings.method) {
        (ModelSource::Gguf(_), Method::Shift) => {
            edit::apply_sequence_streamed(&m.source, &m.tok, &reqs, &settings)?
        }
        _ => {
            let mut model = Transformer::load(&m.source, DType::F32)?;
            let store =
                args.whiten
                    .store(Some(settings.method), &model, &m.tok, m.source.path())?;
            let ctx = EditContext {
                stats: store.as_ref(),
            };
            edit::apply_sequence_with(&mut model, &m.tok, &reqs, &settings, &ctx)?
        }
    };
    let deltas: Vec<_> = outcomes.iter().filter_map(|o| o.delta.clone()).collect();
    let edits: Vec<EditSummary> = outcomes
        .iter()
        .map(|o| EditSummary {
            prompt: o.request.prompt.clone(),
            target: o.request.target_new.clone(),
            target_id: o.target_id,
            top1_before: m.tok.token_text(o.top1_before),
            skipped: o.delta.is_none(),
        })
        .collect();
    if !args.json {
        for e in &edits {
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
    }
    if deltas.is_empty() {
        bail!("every target is already the model's top-1 continuation: nothing to edit, no file written");
    }
    match (&m.source, args.format) {
        (ModelSource::Gguf(g), Format::Gguf) => {
            let prov = provenance(&settings, &outcomes, &g.sha256_hex(), &args.whiten);
            patch_plan(g, &deltas, args.ff2_type, &prov)?.write(&args.output)?
        }
        (ModelSource::Gguf(g), Format::Lora) => {
            let prov = provenance(&settings, &outcomes, &g.sha256_hex(), &args.whiten);
            lora::write_adapter(&args.output, model_arch(&m.source)?, &deltas, &prov)?
        }
        (ModelSource::Hf(h), Format::Safetensors) => {
            safetensors::write_patched(h, &deltas, &args.output, args.force)?
        }
        _ => unreachable!("format checked above"),
    }
    let check = match (args.no_check, args.format) {
        (false, Format::Gguf | Format::Lora) => {
            Some(check_with_llama(&m.source, &m.tok, &args, &reqs)?)
        }
        _ => None,
    };
    let report = Report {
        output: &args.output,
        format: args.format,
        settings,
        edits,
        check,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "wrote {} ({:?}, layer {}, lr {}, {:?})",
        args.output.display(),
        args.format,
        settings.layer,
        settings.lr,
        settings.method
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

fn model_arch(source: &ModelSource) -> Result<backlens::arch::Arch> {
    Ok(source.hparams()?.arch)
}

fn probe(s: &mut Session, tok: &Tokenizer, prompt: &str, target: &str) -> Result<Probe> {
    let ids = tok.encode_prompt(prompt)?;
    let t = tok.encode_target(target)?[0];
    let logp = log_probs(&s.logits_last(&ids)?);
    let scores: Vec<f32> = logp.iter().map(|&v| v as f32).collect();
    Ok(Probe {
        prompt: prompt.into(),
        target: tok.token_text(t),
        prob: logp[t as usize].exp(),
        rank: backlens::lens::rank_of(&scores, t),
        top1: tok.token_text(argmax(&scores) as u32),
    })
}

fn probes(s: &mut Session, tok: &Tokenizer, reqs: &[EditRequest]) -> Result<Vec<Probe>> {
    let mut out = Vec::new();
    for r in reqs {
        out.push(probe(s, tok, &r.prompt, &r.target_new)?);
        if let Some(p) = &r.rephrase_prompt {
            out.push(probe(s, tok, p, &r.target_new)?);
        }
        if let Some(p) = &r.locality_prompt {
            out.push(probe(s, tok, p, &r.target_new)?);
        }
    }
    Ok(out)
}

fn check_with_llama(
    source: &ModelSource,
    tok: &Tokenizer,
    args: &Args,
    reqs: &[EditRequest],
) -> Result<Check> {
    let base_path = require_gguf(source)?;
    let mut base = LlamaRuntime::load(&base_path)?;
    let before = probes(&mut base.session()?, tok, reqs)?;
    let after = match args.format {
        Format::Lora => {
            let mut adapter = base.load_lora(&args.output)?;
            let mut s = base.session()?;
            s.set_lora(&mut adapter, 1.0)?;
            probes(&mut s, tok, reqs)?
        }
        _ => {
            drop(base);
            let patched = LlamaRuntime::load(&args.output)?;
            let after = probes(&mut patched.session()?, tok, reqs)?;
            after
        }
    };
    Ok(Check { before, after })
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let m = open(&args.model)?;
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
