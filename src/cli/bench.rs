//! `bench`: wall times of the main operations on one model, next to the time to copy the file.

use super::{open, print_json, require_gguf};
use anyhow::Result;
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
    /// Folder for scratch files (default: beside the model, so copies measure the same disk).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Figure {
    name: &'static str,
    seconds: f64,
    ratio_to_copy: f64,
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
/// (best of three), on the same cores and library as the lens.
fn sgemm_seconds(model: &Transformer, flops: f64) -> Result<f64> {
    let (k, n) = (model.hp.n_embd, model.hp.n_vocab);
    let m = ((flops / (2.0 * (k * n) as f64)).round() as usize).max(1);
    let a = Tensor::ones((m, k), DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((n, k), DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        let c = a.matmul(&b.t()?)?;
        std::hint::black_box(c);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

pub fn run(args: Args) -> Result<()> {
    let gguf = require_gguf(&open(&args.model)?.source)?;
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| gguf.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let tmp = |name: &str| scratch.join(format!(".bench-{}-{name}", std::process::id()));
    let prompt = "Lionel Messi plays for";
    let req = EditRequest::new(prompt, "Paris", None)?;
    let mut figures: Vec<(&'static str, f64)> = Vec::new();

    let (_, copy) = time(|| Ok(std::fs::copy(&gguf, tmp("copy.gguf"))?))?;
    std::fs::remove_file(tmp("copy.gguf"))?;
    figures.push(("copy model file", copy));

    let ((src, tok, model), load) = time(|| {
        let m = open(&gguf)?;
        let model = Transformer::load(&m.source, DType::F32)?;
        Ok((m.source, m.tok, model))
    })?;
    figures.push(("load + dequantize (candle)", load));
    let (_, llama_load) = time(|| Ok(LlamaRuntime::load(&gguf)?))?;
    figures.push(("load (llama.cpp)", llama_load));
    // Where an edit through llama.cpp spends its time besides the write: the base's hash for
    // provenance, the tracer's load, and one traced forward.
    if let backlens::source::ModelSource::Gguf(g) = &src {
        let (_, hash) = time(|| Ok(g.sha256_hex()))?;
        figures.push(("sha256 of the base (provenance)", hash));
    }
    let (mut tracer, tracer_load) = time(|| Ok(Tracer::load(&gguf)?))?;
    figures.push(("load tracer (llama.cpp)", tracer_load));

    let ids = tok.encode_prompt("The Eiffel Tower is located in the city of")?;
    let (_, predict) = time(|| Ok(model.forward(&ids, None)?))?;
    figures.push(("predict forward (candle, 10 tokens)", predict));
    let layer = EditSettings::default_layer(model.hp.n_layer);
    let (_, traced) = time(|| Ok(tracer.last_position(&ids, &[layer])?))?;
    figures.push(("traced forward (llama.cpp, 10 tokens)", traced));
    drop(tracer);
    let opts = LensOptions {
        layers: 0..model.hp.n_layer,
        k: 10,
        all_positions: true,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    let rss_reset = reset_peak_rss();
    let (lens_report, lens_time) =
        time(|| Ok(lens::run(&model, &tok, prompt, "Paris", None, &opts)?))?;
    let lens_rss = peak_rss().filter(|_| rss_reset);
    figures.push(("lens (all layers and positions)", lens_time));
    let odd = model.out_norm.b.is_none();
    let tokens = lens_report.tokens.len();
    // The lens's two parts timed alone: the pass, then the projections of x1 and −δ of every
    // layer and position, through the f32 matmul and through the exact int8 pre-screen.
    let prompt_ids = tok.encode_prompt(prompt)?;
    let target_ids = tok.encode_target("Paris")?;
    let (bp, pass) = time(|| {
        Ok(lens::backward_pass(
            &model,
            &prompt_ids,
            &target_ids,
            false,
        )?)
    })?;
    figures.push(("lens: forward + backward", pass));
    let mut parts = Vec::new();
    for l in 0..model.hp.n_layer {
        parts.push(bp.trace.ff1_in[l].clone());
        parts.push(bp.d2[l].neg()?);
    }
    drop(bp);
    let vectors = Tensor::cat(&parts, 0)?;
    let signs: &[f32] = if odd { &[1.0, -1.0] } else { &[1.0] };
    let pair = [target_ids[0], lens_report.answer_id];
    let (_, f32_projections) = time(|| {
        Ok(project::project_and_pick(
            &model, &vectors, true, signs, 10, &pair,
        )?)
    })?;
    figures.push(("lens: projections, f32 matmul", f32_projections));
    let ((_, rescored), screened) = time(|| {
        Ok(project::screen_and_pick(
            &model, &vectors, true, signs, 10, &pair,
        )?)
    })?;
    figures.push(("lens: projections, int8 pre-screen", screened));
    let lens_rows = model.hp.n_layer * tokens * if odd { 2 } else { 3 };
    let flops = lens_flops(&model, tokens, lens_rows);
    figures.push((
        "f32 sgemm of the lens's FLOPs",
        sgemm_seconds(&model, flops)?,
    ));

    let settings = EditSettings {
        method: Method::Shift,
        layer,
        lr: 0.24,
    };
    // What `edit` runs (`patch::run` without the llama.cpp check): the forward, then the write
    // to a temporary file, committed, then removed again.
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
    for (name, format, ff2_type, forward) in runs {
        let job = Job {
            requests: vec![req.clone()],
            settings,
            whiten: WhitenSetup::default(),
            format,
            ff2_type,
            check: false,
            forward,
        };
        let out = tmp("edit.gguf");
        let (_, t) = time(|| {
            let claim = OutputClaim::new(&out, OutputKind::File, &[&gguf], false)?;
            Ok(patch::run(&src, &tok, &job, claim)?)
        })?;
        std::fs::remove_file(&out)?;
        figures.push((name, t));
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
            let report = eval::evaluate(&gguf, &mut m2, &tok, &records, &config, &scratch, |_| {})?;
            figures.push((name, 1.0 / report.records_per_second));
            records_per_second.push((forward, report.records_per_second));
        }
    }

    let rows: Vec<Figure> = figures
        .iter()
        .map(|&(name, seconds)| Figure {
            name,
            seconds,
            ratio_to_copy: seconds / copy,
            peak_rss_bytes: lens_rss.filter(|_| name.starts_with("lens")),
        })
        .collect();
    if args.json {
        if records_per_second.is_empty() {
            eprintln!("note: no eval figure (it needs --data RECORDS)");
        }
        return print_json(&rows);
    }
    println!(
        "{} ({} bytes)",
        gguf.display(),
        std::fs::metadata(&gguf)?.len()
    );
    for r in &rows {
        println!(
            "  {:<40} {:>9.4} s   {:>7.2}× copy",
            r.name, r.seconds, r.ratio_to_copy
        );
    }
    println!(
        "  lens: {:.1} GFLOP ({tokens} tokens, {lens_rows} projected rows), peak RSS {}, f32 weights {:.0} MB",
        flops / 1e9,
        lens_rss.map_or("unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6)),
        (weight_elems(&model) * 4) as f64 / 1e6
    );
    println!(
        "  lens pre-screen: {rescored} of {} scores computed exactly",
        vectors.dim(0)? * model.hp.n_vocab
    );
    for (forward, rate) in &records_per_second {
        println!("  eval throughput, {forward} forward: {rate:.2} records/s");
    }
    if records_per_second.is_empty() {
        println!("  eval: skipped (it needs --data RECORDS)");
    }
    Ok(())
}
