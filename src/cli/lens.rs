//! `lens`: the Backward Lens for one prompt and target; `--min-step`, the smallest edit step per
//! layer through llama.cpp; `--requests`, aggregates over a request file.

use super::{open, print_json};
use anyhow::{bail, Context, Result};
use backlens::edit::EditRequest;
use backlens::eval::min_step::{self, MinStepReport, StepSearch};
use backlens::lens::aggregate::{self, AggregateReport, Query, Segment};
use backlens::lens::{self, LensOptions, LensReport};
use backlens::model::Transformer;
use backlens::report;
use backlens::source::ModelSource;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::DType;
use std::path::{Path, PathBuf};

/// Which prompt positions to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Positions {
    /// Only the last prompt token.
    Last,
    /// Every prompt token.
    All,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF file or HF checkpoint folder.
    model: PathBuf,
    /// The prompt.
    #[arg(long, required_unless_present = "requests")]
    prompt: Option<String>,
    /// The target continuation (a leading space is added unless present).
    #[arg(long, required_unless_present = "requests")]
    target: Option<String>,
    /// Aggregate over this request file (CounterFact shape, each record with its subject):
    /// mean ‖δ‖ and ‖x1‖ per layer by prompt segment, the target's rank in x1 and −δ per layer.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "target", "subject", "min_step", "svg", "stream", "unit", "no_norm", "full_target"])]
    requests: Option<PathBuf>,
    /// Records of --requests to read, from the first (default all).
    #[arg(long, requires = "requests")]
    n: Option<usize>,
    /// Instead of the lens: per layer, the smallest step of FPS and of one SGD step on FF2
    /// that makes the target llama.cpp's top-1 (a GGUF model; --svg plots it).
    #[arg(long, conflicts_with_all = ["html", "stream", "unit", "no_norm", "full_target"])]
    min_step: bool,
    /// Subject inside the prompt; its last token is marked in every view.
    #[arg(long)]
    subject: Option<String>,
    /// Layers to report, as A..B (end exclusive); default all.
    #[arg(long)]
    layers: Option<String>,
    /// Tokens per top/bottom list.
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Positions to report.
    #[arg(long, value_enum, default_value_t = Positions::All)]
    positions: Positions,
    /// Project without the final norm.
    #[arg(long)]
    no_norm: bool,
    /// Loss over every target token (teacher-forced) instead of the first.
    #[arg(long)]
    full_target: bool,
    /// Also the normalised lens: x1 and −δ scaled to unit length before the projection.
    #[arg(long)]
    unit: bool,
    /// Stream the blocks: dequantize one at a time (forward, then recomputed in the backward),
    /// holding only the unembedding, for models whose f32 weights do not fit in memory;
    /// layers below --layers are never recomputed.
    #[arg(long)]
    stream: bool,
    /// Print the full JSON report.
    #[arg(long)]
    json: bool,
    /// Write the lens grid SVG (Figure 11 style) here, the gradient-norm SVG (Figure 16 style)
    /// beside it as `<stem>-norms.svg`, and the VJP cosine heatmap (Appendix G) as
    /// `<stem>-vjp.svg`.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Write a self-contained HTML page with both figures and the claims here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Replace existing --svg / --html files.
    #[arg(long)]
    force: bool,
}

/// Parses "A..B" (end exclusive) or a single layer "A".
pub fn parse_layers(spec: &str, n_layer: usize) -> Result<std::ops::Range<usize>> {
    let range = match spec.split_once("..") {
        Some((a, b)) => {
            let a: usize = a.trim().parse().context("layer range start")?;
            let b: usize = if b.trim().is_empty() {
                n_layer
            } else {
                b.trim().parse().context("layer range end")?
            };
            a..b
        }
        None => {
            let a: usize = spec.trim().parse().context("layer")?;
            a..a + 1
        }
    };
    if range.is_empty() || range.end > n_layer {
        anyhow::bail!(
            "layers {spec} out of range: the model has layers 0..{n_layer} (end exclusive)"
        );
    }
    Ok(range)
}

pub fn run(args: Args) -> Result<()> {
    if args.requests.is_some() {
        return run_requests(args);
    }
    if args.min_step {
        return run_min_step(args);
    }
    // Every output path is checked (and locked) before any work.
    let claim = |path: &Path| OutputClaim::new(path, OutputKind::File, &[&args.model], args.force);
    let svg = match &args.svg {
        Some(path) => Some((
            claim(path)?,
            claim(&beside(path, "norms"))?,
            claim(&beside(path, "vjp"))?,
        )),
        None => None,
    };
    let html = args.html.as_deref().map(claim).transpose()?;
    let m = open(&args.model)?;
    let model = match args.stream {
        true => Transformer::load_unembedding(&m.source)?,
        false => Transformer::load(&m.source, DType::F32)?,
    };
    let opts = LensOptions {
        layers: layers(&args, model.hp.n_layer)?,
        k: args.k.max(1),
        all_positions: args.positions == Positions::All,
        use_norm: !args.no_norm,
        full_target: args.full_target,
        unit: args.unit,
    };
    let (prompt, target) = prompt_target(&args)?;
    let subject = args.subject.as_deref();
    let report = match args.stream {
        true => lens::run_streamed(&m.source, &model, &m.tok, prompt, target, subject, &opts)?,
        false => lens::run(&model, &m.tok, prompt, target, subject, &opts)?,
    };
    if let Some((grid, norms, vjp)) = svg {
        write_file(grid, &report::lens_grid_svg(&report))?;
        write_file(norms, &report::lens_norms_svg(&report))?;
        write_file(vjp, &report::lens_vjp_svg(&report))?;
    }
    if let Some(page) = html {
        write_file(page, &report::lens_html(&report))?;
    }
    if args.json {
        return print_json(&report);
    }
    print_table(&report);
    Ok(())
}

/// --prompt and --target (clap requires both unless --requests is given).
fn prompt_target(args: &Args) -> Result<(&str, &str)> {
    match (&args.prompt, &args.target) {
        (Some(p), Some(t)) => Ok((p, t)),
        _ => bail!("give --prompt and --target, or --requests FILE"),
    }
}

/// The layers of --layers, default all.
fn layers(args: &Args, n_layer: usize) -> Result<std::ops::Range<usize>> {
    match &args.layers {
        Some(spec) => parse_layers(spec, n_layer),
        None => Ok(0..n_layer),
    }
}

/// `lens --min-step`: the search per layer, then the table, JSON or SVG.
fn run_min_step(args: Args) -> Result<()> {
    let claim = |path: &Path| OutputClaim::new(path, OutputKind::File, &[&args.model], args.force);
    let svg = args.svg.as_deref().map(claim).transpose()?;
    let (prompt, target) = prompt_target(&args)?;
    let m = open(&args.model)?;
    if !matches!(m.source, ModelSource::Gguf(_)) {
        bail!(
            "{}: --min-step checks edits through llama.cpp, which needs a GGUF model",
            args.model.display()
        );
    }
    let model = Transformer::load(&m.source, DType::F32)?;
    let layers = layers(&args, model.hp.n_layer)?;
    let req = EditRequest::new(prompt, target, args.subject.as_deref())?;
    let scratch = std::env::temp_dir();
    let report = min_step::min_steps(&args.model, &model, &m.tok, &req, layers, &scratch, |l| {
        eprintln!("layer {l} searched")
    })?;
    if let Some(svg) = svg {
        write_file(svg, &min_step::svg(&report))?;
    }
    if args.json {
        return print_json(&report);
    }
    print_min_steps(&report);
    Ok(())
}

fn print_min_steps(r: &MinStepReport) {
    println!(
        "{:?} -> {:?} (id {}); llama.cpp's top-1 before: {:?}",
        r.prompt, r.target, r.target_id, r.answer
    );
    println!(
        "smallest step making the target llama.cpp's top-1 (bracket {:e}..{:e}, bisected to ×{}):\n",
        r.bracket.0, r.bracket.1, r.ratio
    );
    println!(
        "{:>5}  {:>11} {:>8}  {:>11} {:>8}",
        "layer", "FPS step", "margin", "SGD step", "margin"
    );
    let show = |s: &StepSearch| match (s.step, s.margin) {
        (Some(step), Some(m)) => format!("{step:>11.4e} {m:>8.3}"),
        _ => format!("{:>11} {:>8}", "none", "-"),
    };
    for l in &r.layers {
        println!("{:>5}  {}  {}", l.layer, show(&l.shift), show(&l.grad));
    }
}

/// `lens --requests`: the aggregate, then the table, JSON or HTML page.
fn run_requests(args: Args) -> Result<()> {
    let Some(path) = &args.requests else {
        bail!("--requests needs a file");
    };
    let claim = |p: &Path| OutputClaim::new(p, OutputKind::File, &[&args.model, path], args.force);
    let html = args.html.as_deref().map(claim).transpose()?;
    let records = backlens::eval::load_records(path, 0, args.n)?;
    if records.is_empty() {
        bail!("no records to aggregate (--n 0)");
    }
    let m = open(&args.model)?;
    let model = Transformer::load(&m.source, DType::F32)?;
    let layers = layers(&args, model.hp.n_layer)?;
    let queries: Vec<Query> = records
        .iter()
        .map(|r| Query {
            case_id: r.case_id,
            prompt: &r.prompt,
            target: &r.target_new,
            subject: r.subject.as_deref(),
        })
        .collect();
    let total = queries.len();
    let report = aggregate::run(&model, &m.tok, &queries, layers, |i| {
        if i % 10 == 0 || i == total {
            eprintln!("{i}/{total} records");
        }
    })?;
    if let Some(page) = html {
        let name = |p: &Path| {
            p.file_name()
                .map_or(String::new(), |f| f.to_string_lossy().into_owned())
        };
        let title = format!(
            "Backward Lens over {} records of {} on {}",
            report.records,
            name(path),
            name(&args.model)
        );
        write_file(page, &report::analyses::aggregate_html(&report, &title))?;
    }
    if args.json {
        return print_json(&report);
    }
    print_aggregate(&report);
    Ok(())
}

fn print_aggregate(r: &AggregateReport) {
    let c = &r.segment_tokens;
    println!(
        "{} records; prompt tokens: {} prefix, {} subject, {} relation, {} last\n",
        r.records, c.prefix, c.subject, c.relation, c.last
    );
    println!(
        "{:>5}  {:>9} {:>9} {:>9} {:>9}  {:>13} {:>13} {:>6}",
        "layer",
        "‖δ‖ pre",
        "‖δ‖ subj",
        "‖δ‖ rel",
        "‖δ‖ last",
        "rank x1 med",
        "rank −δ med",
        "top-1"
    );
    for l in &r.layers {
        let segs: Vec<String> = Segment::ALL
            .iter()
            .map(|&s| {
                l.norm_d2
                    .get(s)
                    .as_ref()
                    .map_or(format!("{:>9}", "-"), |v| format!("{:>9.3e}", v.mean))
            })
            .collect();
        println!(
            "{:>5}  {}  {:>13} {:>13} {:>6.2}",
            l.layer,
            segs.join(" "),
            l.rank_x1.median,
            l.rank_neg_d2.median,
            l.top1_neg_d2
        );
    }
    println!("\ntop-1 = share of records whose target is top-1 in −δ at the last token");
}

/// `<stem>-<what>.svg` beside the grid SVG.
fn beside(svg: &Path, what: &str) -> PathBuf {
    let stem = svg
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lens".into());
    svg.with_file_name(format!("{stem}-{what}.svg"))
}

/// Writes `text` to the claimed file and says so on stderr (stdout may carry JSON).
fn write_file(claim: OutputClaim, text: &str) -> Result<()> {
    let path = claim.target().to_path_buf();
    let mut out = claim.stage_file()?;
    out.write_all(text.as_bytes())?;
    out.commit()?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn print_table(r: &LensReport) {
    println!(
        "{:?} -> {:?} (id {}), p = {:.4}, L = {:.4}{}",
        r.prompt,
        r.target,
        r.target_id,
        r.target_prob,
        r.loss,
        if r.normed { "" } else { ", no final norm" }
    );
    let marked: Vec<String> = r
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match r.claims.last_subject_pos == Some(i) {
            true => format!("[{t}]*"),
            false => format!("[{t}]"),
        })
        .collect();
    println!("tokens: {}  (* = last subject token)\n", marked.join(""));
    let max_norm = r
        .layers
        .iter()
        .filter_map(|l| l.cells.last())
        .map(|c| c.norm_d2)
        .fold(0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    println!(
        "{:>5}  {:<30} {:<30} {:>6} {:>6} {:>5}  ‖δ‖ at the last token",
        "layer", "FF1 input x1: top-3", "FF2 −δ: top-3", "target", "answer", "rank"
    );
    println!(
        "{:>5}  {:<30} {:<30} {:>6} {:>6} {:>5}",
        "", "", "", "in −δ", "in +δ", "∂L/∂W"
    );
    let top3 = |p: &lens::Projection| {
        p.top
            .iter()
            .take(3)
            .map(|t| format!("{:?}", t.token))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for l in &r.layers {
        let Some(c) = l.cells.last() else { continue };
        let bar = "█".repeat(((c.norm_d2 / max_norm) * 20.0).round() as usize);
        println!(
            "{:>5}  {:<30} {:<30} {:>6} {:>6} {:>5}  {:<20} {:.3e}",
            l.layer,
            top3(&c.x1),
            top3(&c.neg_d2),
            c.neg_d2.target_rank,
            c.pos_d2.answer_rank.map_or("-".into(), |r| r.to_string()),
            format!("{}/{}", l.grad_rank.rank, l.grad_rank.nonzero_tokens),
            bar,
            c.norm_d2
        );
    }
    println!(
        "\nanswer = the model's own top-1 {:?}; rank ∂L/∂W = rank of the FF2 gradient / tokens with δ ≠ 0",
        r.answer
    );
    let units: Vec<_> = r
        .layers
        .iter()
        .filter_map(|l| l.cells.last().map(|c| (l.layer, c)))
        .filter_map(|(l, c)| Some((l, c.x1_unit.as_ref()?, c.neg_d2_unit.as_ref()?)))
        .collect();
    if !units.is_empty() {
        println!("\nnormalised lens (unit vectors) at the last token:");
        println!(
            "{:>5}  {:<30} {:<30} {:>6}",
            "layer", "x1: top-3", "−δ: top-3", "target"
        );
        for (l, x1, neg) in units {
            println!(
                "{l:>5}  {:<30} {:<30} {:>6}",
                top3(x1),
                top3(neg),
                neg.target_rank
            );
        }
    }
    if let (Some(first), Some(last)) = (r.layers.first(), r.layers.last()) {
        let n = r.vjp_cosine.len();
        let adjacent: Vec<f32> = (1..n).map(|i| r.vjp_cosine[i][i - 1]).collect();
        let mean = adjacent.iter().sum::<f32>() / adjacent.len().max(1) as f32;
        println!(
            "\nresidual-stream VJP cosine (last token): adjacent layers mean {mean:.3}, layers {} and {}: {:.3}",
            first.layer,
            last.layer,
            r.vjp_cosine[0][n - 1]
        );
    }
    println!();
    for note in &r.claims.notes {
        println!("- {note}");
    }
}
