//! `bench`: wall times of the main operations on one model, next to the time to copy the file.

use super::{open, print_json, require_gguf};
use anyhow::Result;
use backlens::base_hash;
use backlens::edit::{EditRequest, EditSettings, Method};
use backlens::eval::{self, EvalConfig, LayerChoice, LrChoice};
use backlens::lens::{self, project, LensOptions};
use backlens::model::Transformer;
use backlens::patch::{self, Format, Forward, Job, WhitenSetup};
use backlens::runtime::LlamaRuntime;
use backlens::trace::Tracer;
use backlens::write::gguf::Ff2Type;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model.
    model: PathBuf,
    /// CounterFact-shaped records for the eval throughput figure (without it, that figure is
    /// skipped).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Records for the eval throughput figure.
    #[arg(long, default_value_t = 20)]
    eval_records: usize,
    /// Records of --data solved jointly by `batch` and written as one LoRA adapter, for the
    /// per-edit figure of many edits (0: skipped).
    #[arg(long, default_value_t = 0)]
    batch_edits: usize,
    /// Runs of the lens rows: each row reports its fastest run (wall and CPU apart), and the
    /// sgemm row the best of this many (at least three).
    #[arg(long, default_value_t = 1)]
    lens_runs: usize,
    /// Folder for scratch files (default: beside the model, so copies measure the same disk).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The row of `--batch-edits`: seconds and CPU seconds per edited record.
const BATCH_ROW: &str = "batch edit + write LoRA, per record";

#[derive(Serialize)]
struct Figure {
    name: &'static str,
    seconds: f64,
    ratio_to_copy: f64,
    /// User + system CPU seconds of the whole process (every thread) during this operation (per
    /// record for the eval rows; none for the sgemm row, a best of `--lens-runs`, at least three).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_seconds: Option<f64>,
    /// Peak resident memory during this operation alone (the lens row).
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
}

/// Resets the process's peak-RSS mark (Linux `clear_refs` 5); false where that is refused.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// FLOPs of a lens run: the projections (2·rows·n_embd·n_vocab) plus a forward and an
/// input-only backward through every weight matrix (4·tokens·weights).
fn lens_flops(model: &Transformer, tokens: usize, rows: usize) -> f64 {
    let hp = &model.hp;
    2.0 * (rows * hp.n_embd * hp.n_vocab) as f64 + 4.0 * (tokens * weight_elems(model)) as f64
}

/// Elements of every weight matrix a forward multiplies by, the unembedding included.
fn weight_elems(model: &Transformer) -> usize {
    let blocks: usize = model
        .blocks
        .iter()
        .map(|b| {
            let attn = [&b.attn.q, &b.attn.k, &b.attn.v, &b.attn_out];
            let ffn = [Some(&b.ffn.up), b.ffn.gate.as_ref(), Some(&b.ffn.down)];
            attn.into_iter()
                .chain(ffn.into_iter().flatten())
                .map(|l| l.w.elem_count())
                .sum::<usize>()
        })
        .sum();
    blocks + model.output.elem_count()
}

/// Seconds of one f32 matmul (m, n_embd) × (n_embd, n_vocab) with m chosen so it does `flops`
/// (best of `runs`), on the same cores and library as the lens.
fn sgemm_seconds(model: &Transformer, flops: f64, runs: usize) -> Result<f64> {
    let (k, n) = (model.hp.n_embd, model.hp.n_vocab);
    let m = ((flops / (2.0 * (k * n) as f64)).round() as usize).max(1);
    let a = Tensor::ones((m, k), DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((n, k), DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let start = Instant::now();
        let c = a.matmul(&b.t()?)?;
        std::hint::black_box(c);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// User + system CPU seconds this process (all its threads) has used so far.
fn cpu_now() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and reads nothing else.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The machine's 1-minute load average (other jobs inflate wall times; see docs/results.md).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` and records its wall and CPU seconds under `name`.
fn timed<T>(
    figures: &mut Vec<(&'static str, f64, Option<f64>)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let (start, cpu) = (Instant::now(), cpu_now());
    let out = f()?;
    figures.push((name, start.elapsed().as_secs_f64(), Some(cpu_now() - cpu)));
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    // bench measures a machine it has to itself: llama.cpp decodes on every core.
    backlens::runtime::claim_cores();
    let gguf = require_gguf(&open(&args.model)?.source)?;
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| gguf.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let tmp = |name: &str| scratch.join(format!(".bench-{}-{name}", std::process::id()));
    let prompt = "Lionel Messi plays for";
    let req = EditRequest::new(prompt, "Paris", None)?;
    let mut figures: Vec<(&'static str, f64, Option<f64>)> = Vec::new();
    let load_before = load_average();

    timed(&mut figures, "copy model file", || {
        Ok(std::fs::copy(&gguf, tmp("copy.gguf"))?)
    })?;
    std::fs::remove_file(tmp("copy.gguf"))?;
    let copy = figures[0].1;

    let (src, tok, model) = timed(&mut figures, "load + dequantize (candle)", || {
        let m = open(&gguf)?;
        let model = Transformer::load(&m.source, DType::F32)?;
        Ok((m.source, m.tok, model))
    })?;
    timed(&mut figures, "tokenizer (backlens, from the GGUF)", || {
        Ok(backlens::tokenizer::Tokenizer::from_source(&src)?)
    })?;
    timed(&mut figures, "load (llama.cpp)", || {
        Ok(LlamaRuntime::load(&gguf)?)
    })?;
    // Where an edit through llama.cpp spends its time besides the write: the base's hash for
    // provenance, the tracer's load, and one traced forward (the first decode of a context
    // also touches the mapped weights and its buffers; the second shows the forward alone).
    let mut hash_sources = None;
    if let backlens::source::ModelSource::Gguf(g) = &src {
        timed(
            &mut figures,
            "sha256 of the base (provenance, cold)",
            || Ok(g.sha256_hex()),
        )?;
        // The cached row reads the entry the first call wrote (when the file's times allow one).
        let dir = base_hash::default_dir();
        let (_, first) = base_hash::base_sha256_in(g, dir.as_deref());
        let (_, cached) = timed(
            &mut figures,
            "sha256 of the base (provenance, cached)",
            || Ok(base_hash::base_sha256_in(g, dir.as_deref())),
        )?;
        hash_sources = Some((first, cached));
    }
    let mut tracer = timed(&mut figures, "load tracer (llama.cpp)", || {
        Ok(Tracer::load(&gguf)?)
    })?;

    let ids = tok.encode_prompt("The Eiffel Tower is located in the city of")?;
    timed(&mut figures, "predict forward (candle, 10 tokens)", || {
        Ok(model.forward(&ids, None)?)
    })?;
    let layer = EditSettings::default_layer(model.hp.n_layer);
    for name in [
        "traced forward (llama.cpp, 10 tokens)",
        "traced forward again (warm context)",
    ] {
        timed(&mut figures, name, || {
            Ok(tracer.last_position(&ids, &[layer])?)
        })?;
    }
    timed(&mut figures, "free the tracer (llama.cpp)", || {
        drop(tracer);
        Ok(())
    })?;
    let opts = LensOptions {
        layers: 0..model.hp.n_layer,
        k: 10,
        all_positions: true,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    // The int16 copy of the unembedding is made once per model: timed apart from the lens.
    timed(
        &mut figures,
        "lens: int16 unembedding (once per model)",
        || Ok(project::prepare_screen(&model)?),
    )?;
    let rss_reset = reset_peak_rss();
    let odd = model.out_norm.b.is_none();
    let signs: &[f32] = if odd { &[1.0, -1.0] } else { &[1.0] };
    let prompt_ids = tok.encode_prompt(prompt)?;
    let target_ids = tok.encode_target("Paris")?;
    let mut runs = Vec::new();
    let mut kept = None;
    for _ in 0..args.lens_runs.max(1) {
        let mut run = Vec::new();
        let lens_report = timed(&mut run, "lens (all layers and positions)", || {
            Ok(lens::run(&model, &tok, prompt, "Paris", None, &opts)?)
        })?;
        // The lens's two parts timed alone: the pass, then the projections of x1 and −δ of
        // every layer and position, through the exact int16 pre-screen (what `lens` runs) and
        // through the f32 matmul.
        let bp = timed(&mut run, "lens: forward + backward", || {
            Ok(lens::backward_pass(
                &model,
                &prompt_ids,
                &target_ids,
                false,
            )?)
        })?;
        let mut parts = Vec::new();
        for l in 0..model.hp.n_layer {
            parts.push(bp.trace.ff1_in[l].clone());
            parts.push(bp.d2[l].neg()?);
        }
        drop(bp);
        let vectors = Tensor::cat(&parts, 0)?;
        let pair = [target_ids[0], lens_report.answer_id];
        let (_, rescored) = timed(&mut run, "lens: projections (int16 pre-screen)", || {
            Ok(project::screen_and_pick(
                &model, &vectors, true, signs, 10, &pair,
            )?)
        })?;
        timed(&mut run, "lens: projections, f32 matmul instead", || {
            Ok(project::matmul_and_pick(
                &model, &vectors, true, signs, 10, &pair,
            )?)
        })?;
        runs.push(run);
        kept = Some((lens_report.tokens.len(), rescored, vectors.dim(0)?));
    }
    let lens_rss = peak_rss().filter(|_| rss_reset);
    // Each lens row's figure is its fastest run's (wall and CPU apart): a loaded machine only
    // adds to them.
    for (i, &(name, _, _)) in runs[0].iter().enumerate() {
        let least = |f: fn(&(&'static str, f64, Option<f64>)) -> f64| {
            runs.iter().map(|r| f(&r[i])).fold(f64::INFINITY, f64::min)
        };
        figures.push((name, least(|r| r.1), Some(least(|r| r.2.unwrap_or(0.0)))));
    }
    let (tokens, rescored, projected) = kept.ok_or_else(|| anyhow::anyhow!("no lens run"))?;
    let lens_rows = model.hp.n_layer * tokens * if odd { 2 } else { 3 };
    let flops = lens_flops(&model, tokens, lens_rows);
    figures.push((
        "f32 sgemm of the lens's FLOPs",
        sgemm_seconds(&model, flops, args.lens_runs.max(3))?,
        None,
    ));

    let settings = EditSettings {
        method: Method::Shift,
        layer,
        lr: 0.24,
    };
    // What `edit` runs, all of it inside the timer: the output claimed, the model opened (GGUF
    // header; the tokenizer is built beside llama.cpp's load), the forward, the write to a temporary file, the llama.cpp check
    // where the row says so, the commit; the file is removed again after the timer.
    let runs = [
        (
            "edit + write GGUF (f32 FF2)",
            Format::Gguf,
            Ff2Type::F32,
            Forward::Candle,
        ),
        (
            "edit + write GGUF (keep FF2 type)",
            Format::Gguf,
            Ff2Type::Keep,
            Forward::Candle,
        ),
        (
            "edit + write LoRA adapter",
            Format::Lora,
            Ff2Type::F32,
            Forward::Candle,
        ),
        (
            "edit + write GGUF, llama.cpp forward",
            Format::Gguf,
            Ff2Type::F32,
            Forward::Llama,
        ),
        (
            "edit + write LoRA, llama.cpp forward",
            Format::Lora,
            Ff2Type::F32,
            Forward::Llama,
        ),
    ];
    let checked = [
        ("edit + write + check GGUF, llama.cpp", Format::Gguf),
        ("edit + write + check LoRA, llama.cpp", Format::Lora),
    ]
    .map(|(name, format)| (name, format, Ff2Type::F32, Forward::Llama));
    // The last row is the LoRA edit again with the base's hash entry removed first: the cost
    // of a base's first edit (the rows before it read the entry the hash rows wrote).
    let cold = (
        "edit + write LoRA, llama.cpp, hash not cached",
        Format::Lora,
        Ff2Type::F32,
        Forward::Llama,
    );
    let n_rows = runs.len() + checked.len();
    for (k, (name, format, ff2_type, forward)) in
        runs.into_iter().chain(checked).chain([cold]).enumerate()
    {
        if k == n_rows {
            if let (backlens::source::ModelSource::Gguf(g), Some(dir)) =
                (&src, base_hash::default_dir())
            {
                base_hash::forget(g, &dir)?;
            }
        }
        let job = Job {
            requests: vec![req.clone()],
            settings,
            whiten: WhitenSetup::default(),
            format,
            ff2_type,
            check: (runs.len()..n_rows).contains(&k),
            forward,
            threads: None,
        };
        let out = tmp("edit.gguf");
        timed(&mut figures, name, || {
            let claim = OutputClaim::new(&out, OutputKind::File, &[&gguf], false)?;
            let source = backlens::source::ModelSource::open(&gguf)?;
            Ok(patch::run_building_tokenizer(&source, &job, claim)?)
        })?;
        std::fs::remove_file(&out)?;
    }

    let mut records_per_second: Vec<(Forward, f64)> = Vec::new();
    if let Some(data) = &args.data {
        let records = eval::load_records(data, 0, Some(args.eval_records))?;
        for (name, forward) in [
            ("eval per record (shift, no fluency)", Forward::Candle),
            ("eval per record, llama.cpp forward", Forward::Llama),
        ] {
            let config = EvalConfig {
                method: Some(Method::Shift),
                layer: LayerChoice::Fixed(settings.layer),
                lr: LrChoice::Fixed(0.24),
                sequential: false,
                fluency: false,
                ff2_type: Ff2Type::F32,
                forward,
            };
            let mut m2 = model.clone();
            let cpu = cpu_now();
            let report = eval::evaluate(&gguf, &mut m2, &tok, &records, &config, &scratch, |_| {})?;
            let per_record_cpu = (cpu_now() - cpu) / records.len() as f64;
            figures.push((name, 1.0 / report.records_per_second, Some(per_record_cpu)));
            records_per_second.push((forward, report.records_per_second));
        }
    }

    let mut batch_rss = None;
    if let (Some(data), n @ 1..) = (&args.data, args.batch_edits) {
        let job = Job {
            requests: eval::load_records(data, 0, Some(n))?,
            settings: EditSettings {
                method: Method::Batch,
                ..settings
            },
            whiten: WhitenSetup::cached(),
            format: Format::Lora,
            ff2_type: Ff2Type::F32,
            check: false,
            forward: Forward::Candle,
            threads: None,
        };
        let out = tmp("batch.gguf");
        let rss_reset = reset_peak_rss();
        let (start, cpu) = (Instant::now(), cpu_now());
        let claim = OutputClaim::new(&out, OutputKind::File, &[&gguf], false)?;
        patch::run(&src, &tok, &job, claim)?;
        let per_edit = |total: f64| total / job.requests.len() as f64;
        figures.push((
            BATCH_ROW,
            per_edit(start.elapsed().as_secs_f64()),
            Some(per_edit(cpu_now() - cpu)),
        ));
        batch_rss = peak_rss().filter(|_| rss_reset);
        std::fs::remove_file(&out)?;
    }

    let rows: Vec<Figure> = figures
        .iter()
        .map(|&(name, seconds, cpu_seconds)| Figure {
            name,
            seconds,
            ratio_to_copy: seconds / copy,
            cpu_seconds,
            peak_rss_bytes: match name {
                BATCH_ROW => batch_rss,
                _ => lens_rss.filter(|_| name.starts_with("lens")),
            },
        })
        .collect();
    if args.json {
        if records_per_second.is_empty() {
            eprintln!("note: no eval figure (it needs --data RECORDS)");
        }
        return print_json(&rows);
    }
    let show = |l: Option<f64>| l.map_or("unknown".into(), |l| format!("{l:.2}"));
    println!(
        "{} ({} bytes); load average {} before, {} after; llama.cpp decode threads: {}",
        gguf.display(),
        std::fs::metadata(&gguf)?.len(),
        show(load_before),
        show(load_average()),
        backlens::runtime::decode_threads()
    );
    println!("  {:<40} {:>9} {:>10} {:>9}", "", "wall", "", "CPU");
    for r in &rows {
        let cpu = r.cpu_seconds.map_or("-".into(), |c| format!("{c:.4} s"));
        println!(
            "  {:<40} {:>9.4} s {:>7.2}× copy {cpu:>9}",
            r.name, r.seconds, r.ratio_to_copy
        );
    }
    println!(
        "  lens: {:.1} GFLOP ({tokens} tokens, {lens_rows} projected rows), peak RSS {}, f32 weights {:.0} MB",
        flops / 1e9,
        lens_rss.map_or("unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6)),
        (weight_elems(&model) * 4) as f64 / 1e6
    );
    if let Some(b) = batch_rss {
        println!(
            "  batch: {} records, peak RSS {:.0} MB (the bench's own model and runtime included)",
            args.batch_edits,
            b as f64 / 1e6
        );
    }
    println!(
        "  lens pre-screen: {rescored} of {} scores computed exactly",
        projected * model.hp.n_vocab
    );
    if let Some((first, cached)) = hash_sources {
        println!("  provenance hash cache: first call {first:?}, cached row {cached:?}");
    }
    for (forward, rate) in &records_per_second {
        println!("  eval throughput, {forward} forward: {rate:.2} records/s");
    }
    if records_per_second.is_empty() {
        println!("  eval: skipped (it needs --data RECORDS)");
    }
    Ok(())
}
