//! `bench`: wall times of the main operations on one model, next to the time to copy the file.

use super::{open, print_json, require_gguf};
use anyhow::Result;
use backlens::edit::{EditRequest, EditSettings, Method};
use backlens::eval::{self, EvalConfig, LayerChoice, LrChoice};
use backlens::lens::{self, LensOptions};
use backlens::model::Transformer;
use backlens::patch::{self, Format, Forward, Job, WhitenSetup};
use backlens::runtime::LlamaRuntime;
use backlens::write::gguf::Ff2Type;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::DType;
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

    let ids = tok.encode_prompt("The Eiffel Tower is located in the city of")?;
    let (_, predict) = time(|| Ok(model.forward(&ids, None)?))?;
    figures.push(("predict forward (candle, 10 tokens)", predict));
    let opts = LensOptions {
        layers: 0..model.hp.n_layer,
        k: 10,
        all_positions: true,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    let (_, lens_time) = time(|| Ok(lens::run(&model, &tok, prompt, "Paris", None, &opts)?))?;
    figures.push(("lens (all layers and positions)", lens_time));

    let settings = EditSettings {
        method: Method::Shift,
        layer: EditSettings::default_layer(model.hp.n_layer),
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

    let mut records_per_second = None;
    if let Some(data) = &args.data {
        let records = eval::load_records(data, 0, Some(args.eval_records))?;
        let config = EvalConfig {
            method: Some(Method::Shift),
            layer: LayerChoice::Fixed(settings.layer),
            lr: LrChoice::Fixed(0.24),
            sequential: false,
            fluency: false,
            ff2_type: Ff2Type::F32,
        };
        let mut m2 = model.clone();
        let report = eval::evaluate(&gguf, &mut m2, &tok, &records, &config, &scratch, |_| {})?;
        let per_record = 1.0 / report.records_per_second;
        figures.push(("eval per record (shift, no fluency)", per_record));
        records_per_second = Some(report.records_per_second);
    }

    let rows: Vec<Figure> = figures
        .iter()
        .map(|&(name, seconds)| Figure {
            name,
            seconds,
            ratio_to_copy: seconds / copy,
        })
        .collect();
    if args.json {
        if records_per_second.is_none() {
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
    match records_per_second {
        Some(rate) => println!("  eval throughput: {rate:.2} records/s"),
        None => println!("  eval: skipped (it needs --data RECORDS)"),
    }
    Ok(())
}
