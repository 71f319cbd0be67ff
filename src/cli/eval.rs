//! `eval`: CounterFact metrics through llama.cpp, with optional layer/step sweeps.

use super::{open, print_json, require_gguf};
use anyhow::{bail, Result};
use backlens::edit::batch::JointOptions;
use backlens::edit::minimal::{KeyAt, ValueRule};
use backlens::edit::{EditSettings, Method};
use backlens::eval::{self, EvalConfig, EvalReport, LayerChoice, LrChoice};
use backlens::model::Transformer;
use backlens::patch::Forward;
use backlens::write::gguf::Ff2Type;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

mod many;

/// An edit method, or none for the unedited baseline.
#[derive(Debug, Clone, Copy)]
struct EvalMethod(Option<Method>);

impl std::str::FromStr for EvalMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<EvalMethod, String> {
        eval::parse_method(s).map(EvalMethod)
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model.
    model: PathBuf,
    /// CounterFact-shaped JSON records.
    #[arg(long)]
    data: PathBuf,
    /// Number of records (default all).
    #[arg(long)]
    n: Option<usize>,
    /// Records to skip first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Edit method: none (the unedited model), shift, shift-whitened, grad, batch, rome or ft.
    #[arg(long, default_value = "shift")]
    method: EvalMethod,
    /// Layer, or "auto" (chosen per record from the Backward Lens) [default: round(0.73 · n_layers)].
    #[arg(long)]
    layer: Option<LayerChoice>,
    /// Step, or "auto" (smallest step making the target top-1 by a margin).
    #[arg(long, default_value = "0.24")]
    lr: LrChoice,
    #[command(flatten)]
    whiten: super::edit::WhitenArgs,
    /// Keep edits cumulative and report how many still hold at the end.
    #[arg(long, conflicts_with = "table1")]
    sequential: bool,
    /// Skip the generation-entropy fluency score (faster).
    #[arg(long)]
    no_fluency: bool,
    /// Storage of the edited FF2 being evaluated: f32 (exact) or keep (requantized to its
    /// original type, as `edit --ff2-type keep` writes it).
    #[arg(long, default_value = "f32")]
    ff2_type: Ff2Type,
    /// Engine of each record's shift key and skip rule: candle (exact f32) or llama (llama.cpp's
    /// own graph, the activations the scored model computes, one llama.cpp model for keys and
    /// scores and no candle model; shift with a fixed --layer and --lr) [default: llama where
    /// candle lacks the architecture, else candle].
    #[arg(long)]
    forward: Option<Forward>,
    /// Sweep layers A..B (end exclusive) and write an SVG plot of the scores.
    #[arg(long)]
    sweep_layers: Option<String>,
    /// Sweep steps, comma-separated, and write an SVG plot of the scores.
    #[arg(long, value_delimiter = ',')]
    sweep_lr: Vec<f64>,
    /// Where the sweep plot goes.
    #[arg(long, default_value = "sweep.svg")]
    plot: PathBuf,
    /// Replace an existing plot file.
    #[arg(long)]
    force: bool,
    /// Edit the first N records into one model and score them all on it (with perplexity on
    /// the shipped general text and fluency on fixed prompts).
    #[arg(long, conflicts_with_all = ["curve", "sequential", "sweep_layers", "sweep_lr", "table1"])]
    edits: Option<usize>,
    /// As --edits, at each of these N (ascending, comma-separated), with an SVG plot (--plot).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["sequential", "sweep_layers", "sweep_lr", "table1"])]
    curve: Vec<usize>,
    /// Tokens of the general text the perplexity of --edits/--curve is taken over.
    #[arg(long, default_value_t = backlens::perplexity::DEFAULT_TOKENS)]
    ppl_tokens: usize,
    /// Threads for batch's value searches in --edits/--curve [default: one per core]; the
    /// scores do not depend on it.
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Write the paper's Table 1 for every method of --methods on these records: Markdown here,
    /// JSON beside it (same name, .json).
    #[arg(long)]
    table1: Option<PathBuf>,
    /// Methods of --edits/--curve [default: --method] or --table1 [default: none, grad, ft,
    /// shift, shift-whitened, rome, memit], comma-separated.
    #[arg(long, value_delimiter = ',')]
    methods: Vec<EvalMethod>,
    /// The value batch and shift-protected write at each key: steepest (the smallest step along
    /// the gradient of the target's lead that makes it top-1 by --margin), minimal (the smallest
    /// multiple of the target embedding that does, at most FPS's) or fps (lr·‖x‖²·e).
    #[arg(long, default_value = "steepest", value_parser = ["steepest", "minimal", "fps"])]
    value: String,
    /// Logits by which a minimal value makes the target lead every other token.
    #[arg(long, default_value_t = backlens::edit::minimal::DEFAULT_MARGIN)]
    margin: f64,
    /// Ridge ρ of batch and shift-protected: the weight of the generic-text statistics against
    /// the edit keys, relative to the keys' mean xᵀC⁻¹x.
    #[arg(long, default_value_t = JointOptions::default().ridge)]
    ridge: f64,
    /// The token whose FF2 input is the key of batch and shift-protected: last (the prompt's
    /// last token) or subject (the subject's last token; the records must name the subject).
    #[arg(long, default_value_t = JointOptions::default().key)]
    key: KeyAt,
    /// Layers batch spreads each value over, ending at --layer (MEMIT's; 1: that layer alone).
    #[arg(long, default_value_t = JointOptions::default().layers)]
    spread: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// The ridge and key position of --ridge and --key.
    fn joint(&self) -> Result<JointOptions> {
        backlens::edit::batch::check_ridge(self.ridge)?;
        Ok(JointOptions {
            ridge: self.ridge,
            key: self.key,
            layers: self.spread,
        })
    }

    /// The value rule of --value and --margin.
    fn value_rule(&self) -> ValueRule {
        match self.value.as_str() {
            "fps" => ValueRule::Fps,
            "minimal" => ValueRule::Minimal {
                margin: self.margin,
            },
            _ => ValueRule::Steepest {
                margin: self.margin,
            },
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    // eval runs nothing beside its llama.cpp decodes.
    backlens::runtime::claim_cores();
    if args.edits.is_some() || !args.curve.is_empty() {
        return many::run(args);
    }
    let sweep = args.sweep_layers.is_some() || !args.sweep_lr.is_empty();
    let plot_claim = match sweep {
        true => Some(OutputClaim::new(
            &args.plot,
            OutputKind::File,
            &[&args.model, &args.data],
            args.force,
        )?),
        false => None,
    };
    let table_claims = match &args.table1 {
        Some(md) => {
            let inputs = [args.model.as_path(), args.data.as_path()];
            let json = md.with_extension("json");
            Some((
                OutputClaim::new(md, OutputKind::File, &inputs, args.force)?,
                OutputClaim::new(&json, OutputKind::File, &inputs, args.force)?,
            ))
        }
        None => None,
    };
    let forward = match args.forward {
        Some(f) => f,
        None => Forward::default_for(&backlens::source::ModelSource::open(&args.model)?),
    };
    if forward == Forward::Llama && plot_claim.is_none() && table_claims.is_none() {
        return run_traced(&args);
    }
    let m = open(&args.model)?;
    let gguf = require_gguf(&m.source)?;
    let records = eval::load_records(&args.data, args.offset, args.n)?;
    let model = Transformer::load(&m.source, DType::F32)?;
    let n_layer = model.hp.n_layer;
    let method = args.method.0;
    let layer = match (args.layer, method) {
        (Some(l), _) => l,
        (None, Some(m)) => LayerChoice::Fixed(m.default_layer(&model.hp)?),
        (None, None) => LayerChoice::Fixed(EditSettings::default_layer(n_layer)),
    };
    let lr = args.lr;
    if let Some(path) = &args.whiten.stats_data {
        let eval_end = args.offset + records.len();
        if method.is_some_and(Method::needs_stats)
            && same_file(path, &args.data)
            && args.whiten.stats_skip < eval_end
        {
            bail!(
                "--stats-data is the evaluated file and its records {}.. overlap the evaluated records {}..{eval_end}: \
                 pass --stats-skip {eval_end} (or more) so the statistics never see evaluated prompts",
                args.whiten.stats_skip,
                args.offset
            );
        }
    }
    if let Some((md, json)) = table_claims {
        let methods = match args.methods.is_empty() {
            true => eval::table1::METHODS
                .iter()
                .map(|m| eval::parse_method(m))
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(anyhow::Error::msg)?,
            false => args.methods.iter().map(|m| m.0).collect(),
        };
        let config = eval::table1::Table1Config {
            methods,
            layer: args.layer,
            lr,
            fluency: !args.no_fluency,
            ff2_type: args.ff2_type,
            forward,
            whiten: args.whiten.setup(),
            value: args.value_rule(),
        };
        let rows = eval::table1::run(
            &gguf,
            &model,
            &m.tok,
            &records,
            &config,
            &std::env::temp_dir(),
            |name| eprintln!("table1: {name}"),
        )?;
        let table = eval::table1::Table {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            records: records.len(),
            rows,
        };
        super::table1::write(&table, md, json)?;
        print!("{}", eval::table1::markdown(&table));
        return Ok(());
    }
    let t_stats = std::time::Instant::now();
    let store = match method {
        Some(method) => args.whiten.setup().store(method, &model, &m.tok, &gguf)?,
        None => None,
    };
    if let (Some(s), LayerChoice::Fixed(l)) = (&store, layer) {
        s.get(l)?;
        eprintln!(
            "key statistics of layer {l}: {} prompts, {:.1} s (cache: {})",
            s.n_prompts(),
            t_stats.elapsed().as_secs_f64(),
            s.cache_path(l)
                .map_or("off".into(), |p| p.display().to_string())
        );
    }
    let ctx = backlens::edit::EditContext {
        stats: store.as_ref(),
        value: args.value_rule(),
        joint: args.joint()?,
        ..backlens::edit::EditContext::default()
    };
    let base = EvalConfig {
        method,
        layer,
        lr,
        sequential: args.sequential,
        fluency: !args.no_fluency,
        ff2_type: args.ff2_type,
        forward,
    };
    let scratch = std::env::temp_dir();
    let run_one = |config: &EvalConfig, label: &str| -> Result<EvalReport> {
        let bar = progress_bar(records.len(), label);
        let mut fresh = model.clone();
        let report = eval::evaluate_with(
            &gguf,
            &mut fresh,
            &m.tok,
            &records,
            config,
            &ctx,
            &scratch,
            |i| bar.set_position(i as u64),
        )?;
        bar.finish_and_clear();
        Ok(report)
    };
    if let Some(plot_claim) = plot_claim {
        let mut points: Vec<(f64, EvalReport)> = Vec::new();
        let x_label;
        if let Some(spec) = &args.sweep_layers {
            x_label = "layer";
            for l in super::lens::parse_layers(spec, n_layer)? {
                let c = EvalConfig {
                    layer: LayerChoice::Fixed(l),
                    ..base.clone()
                };
                points.push((l as f64, run_one(&c, &format!("layer {l}"))?));
            }
        } else {
            x_label = "lr";
            for &x in &args.sweep_lr {
                let c = EvalConfig {
                    lr: LrChoice::Fixed(x),
                    ..base.clone()
                };
                points.push((x, run_one(&c, &format!("lr {x}"))?));
            }
        }
        let series = |name: &str, f: &dyn Fn(&EvalReport) -> f64| {
            (
                name.to_string(),
                points.iter().map(|(x, r)| (*x, f(r))).collect::<Vec<_>>(),
            )
        };
        let plot = backlens::report::line_plot_svg(
            &format!(
                "CounterFact scores by {x_label} ({} records)",
                records.len()
            ),
            x_label,
            &[
                series("efficacy", &|r| r.summary.efficacy.mean),
                series("paraphrase", &|r| r.summary.paraphrase.mean),
                series("neighborhood", &|r| r.summary.neighborhood.mean),
            ],
        );
        let mut out = plot_claim.stage_file()?;
        out.write_all(plot.as_bytes())?;
        out.commit()?;
        if args.json {
            return print_json(
                &points
                    .iter()
                    .map(|(x, r)| (x, &r.summary))
                    .collect::<Vec<_>>(),
            );
        }
        println!(
            "{:>8}  {:>6} {:>6} {:>6} {:>6}",
            x_label, "ES", "PS", "NS", "NS-top1"
        );
        for (x, r) in &points {
            let s = &r.summary;
            println!(
                "{:>8}  {:>6.3} {:>6.3} {:>6.3} {:>6.3}",
                x,
                s.efficacy.mean,
                s.paraphrase.mean,
                s.neighborhood.mean,
                s.neighborhood_top1.mean
            );
        }
        println!("plot: {}", args.plot.display());
        return Ok(());
    }
    let report = run_one(&base, "eval")?;
    print_report(&args, records.len(), &report)
}

/// `eval --forward llama` of one configuration: keys and scores from one llama.cpp model, no
/// candle model, so any architecture llama.cpp loads with a dense `ffn_down` is evaluated.
fn run_traced(args: &Args) -> Result<()> {
    let m = super::open_any(&args.model)?;
    let gguf = require_gguf(&m.source)?;
    let records = eval::load_records(&args.data, args.offset, args.n)?;
    let n_layer = backlens::patch::n_layer(&m.source)?;
    let config = EvalConfig {
        method: args.method.0,
        layer: args
            .layer
            .unwrap_or(LayerChoice::Fixed(EditSettings::default_layer(n_layer))),
        lr: args.lr,
        sequential: args.sequential,
        fluency: !args.no_fluency,
        ff2_type: args.ff2_type,
        forward: Forward::Llama,
    };
    let bar = progress_bar(records.len(), "eval");
    let report = eval::traced::evaluate(&gguf, &m.tok, &records, &config, |i| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    print_report(args, records.len(), &report)
}

/// A progress bar over `n` records.
fn progress_bar(n: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Prints one evaluation's summary (or its JSON).
fn print_report(args: &Args, n_records: usize, report: &EvalReport) -> Result<()> {
    if args.json {
        return print_json(report);
    }
    let s = &report.summary;
    println!(
        "{} records of {} ({}):",
        n_records,
        args.data.display(),
        args.method.0.map_or("none", Method::name)
    );
    let row = |name: &str, st: &eval::Stat| {
        println!(
            "  {name:<24} {:>7.3} ± {:.3}  (n = {})",
            st.mean, st.ci95, st.n
        )
    };
    row("efficacy score", &s.efficacy);
    row("paraphrase score", &s.paraphrase);
    row("neighborhood score", &s.neighborhood);
    row("neighborhood top-1 kept", &s.neighborhood_top1);
    row("efficacy magnitude", &s.efficacy_magnitude);
    if !args.no_fluency {
        row("fluency (gen. entropy)", &s.fluency);
    }
    row("skipped (already top-1)", &s.skipped);
    if let Some(r) = &report.retained {
        row("edits retained at end", r);
    }
    println!("  {:.2} records/s", report.records_per_second);
    Ok(())
}

/// Whether two paths name the same existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
