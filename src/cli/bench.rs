//! `bench`: wall times of the main operations on one model, next to the time to copy the file.

use super::{open, print_json, require_gguf};
use anyhow::Result;
use backlens::edit::{self, EditRequest, EditSettings, Method};
use backlens::eval::{self, EvalConfig, LayerChoice, LrChoice};
use backlens::lens::{self, LensOptions};
use backlens::lora;
use backlens::model::Transformer;
use backlens::runtime::LlamaRuntime;
use backlens::source::ModelSource;
use backlens::write::gguf::{patch_plan, Ff2Type};
use candle_core::DType;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model.
    #[arg(default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// CounterFact-shaped records for the eval throughput figure.
    #[arg(
        long,
        default_value = "../shared/data/counterfact/counterfact-val.json"
    )]
    data: PathBuf,
    /// Records for the eval throughput figure.
    #[arg(long, default_value_t = 20)]
    eval_records: usize,
    /// Folder for scratch files (default: beside the model, so copies measure the same disk).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Instead: the scale benchmark in this folder (a synthetic 7B-shaped Q4_0 GGUF, about
    /// 4 GB, written once, with MODEL's tokenizer): inspect, audit and edit with wall time and
    /// peak RSS.
    #[arg(long)]
    scale: Option<PathBuf>,
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
    if let Some(dir) = &args.scale {
        return super::scale::run(&args.model, dir, args.json);
    }
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
    };
    let (_, lens_time) = time(|| Ok(lens::run(&model, &tok, prompt, "Paris", None, &opts)?))?;
    figures.push(("lens (all layers and positions)", lens_time));

    let settings = EditSettings {
        method: Method::Shift,
        layer: EditSettings::default_layer(model.hp.n_layer),
        lr: 0.24,
    };
    let ModelSource::Gguf(g) = &src else {
        unreachable!("checked GGUF above")
    };
    for (name, ty) in [
        ("edit + write GGUF (f32 FF2)", Ff2Type::F32),
        ("edit + write GGUF (keep FF2 type)", Ff2Type::Keep),
    ] {
        // What `edit` runs: the streamed FPS forward from the file, then the write.
        let (_, t) = time(|| {
            let outcomes =
                edit::apply_sequence_streamed(&src, &tok, std::slice::from_ref(&req), &settings)?;
            let deltas: Vec<_> = outcomes.into_iter().filter_map(|o| o.delta).collect();
            patch_plan(g, &deltas, ty, &[])?.write(&tmp("patched.gguf"))?;
            Ok(())
        })?;
        figures.push((name, t));
    }
    std::fs::remove_file(tmp("patched.gguf"))?;
    let (_, lora_time) = time(|| {
        let outcomes =
            edit::apply_sequence_streamed(&src, &tok, std::slice::from_ref(&req), &settings)?;
        let deltas: Vec<_> = outcomes.into_iter().filter_map(|o| o.delta).collect();
        lora::write_adapter(&tmp("lora.gguf"), model.hp.arch, &deltas, &[])?;
        Ok(())
    })?;
    std::fs::remove_file(tmp("lora.gguf"))?;
    figures.push(("edit + write LoRA adapter", lora_time));

    let records = eval::load_records(&args.data, 0, Some(args.eval_records))?;
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

    let rows: Vec<Figure> = figures
        .iter()
        .map(|&(name, seconds)| Figure {
            name,
            seconds,
            ratio_to_copy: seconds / copy,
        })
        .collect();
    if args.json {
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
        "  eval throughput: {:.2} records/s",
        report.records_per_second
    );
    Ok(())
}
