//! `eval --edits N` and `eval --curve A,B,…`: many records edited into one model.

use super::{open, print_json, require_gguf, same_file, Args};
use anyhow::{bail, Result};
use backlens::edit::{EditContext, EditSettings, Method};
use backlens::eval::many::{self, ManyConfig};
use backlens::eval::{self, LayerChoice, LrChoice};
use backlens::model::Transformer;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::DType;

pub fn run(args: Args) -> Result<()> {
    let sizes = match args.edits {
        Some(n) => vec![n],
        None => args.curve.clone(),
    };
    let chosen = match args.methods.is_empty() {
        true => vec![args.method.0],
        false => args.methods.iter().map(|m| m.0).collect(),
    };
    let Some(methods) = chosen.into_iter().collect::<Option<Vec<Method>>>() else {
        bail!("--edits/--curve need edit methods (--method or --methods), not none")
    };
    let lr = match args.lr {
        LrChoice::Fixed(lr) => lr,
        LrChoice::Auto => bail!("--edits/--curve take a fixed --lr, not auto"),
    };
    let value = args.value_rule();
    value.check()?;
    let joint = args.joint()?;
    let all = eval::load_records(&args.data, args.offset, None)?;
    many::check_sizes(&sizes, all.len(), &args.data.display().to_string())?;
    if let Some(path) = &args.whiten.stats_data {
        let end = args.offset + sizes.last().expect("checked");
        if same_file(path, &args.data) && args.whiten.stats_skip < end {
            bail!(
                "--stats-data is the evaluated file and its records overlap the edited ones: pass --stats-skip {end} (or more)"
            );
        }
    }
    let plot_claim = match args.curve.is_empty() {
        true => None,
        false => Some(OutputClaim::new(
            &args.plot,
            OutputKind::File,
            &[&args.model, &args.data],
            args.force,
        )?),
    };
    let m = open(&args.model)?;
    let gguf = require_gguf(&m.source)?;
    let model = Transformer::load(&m.source, DType::F32)?;
    let layer = match args.layer {
        None => EditSettings::default_layer(model.hp.n_layer),
        Some(LayerChoice::Fixed(l)) => l,
        Some(LayerChoice::Auto) => bail!("--edits/--curve take a fixed --layer, not auto"),
    };
    let store = match methods.iter().any(|m| m.needs_stats()) {
        true => args
            .whiten
            .setup()
            .store(Method::Batch, &model, &m.tok, &gguf)?,
        false => None,
    };
    if let Some(s) = &store {
        s.get(layer)?;
    }
    let ctx = EditContext {
        stats: store.as_ref(),
        value,
        joint,
        threads: args.threads,
    };
    let config = ManyConfig {
        methods,
        layer,
        lr,
        sizes,
        ppl_tokens: args.ppl_tokens,
        ff2_type: args.ff2_type,
        value,
        joint,
    };
    let t = std::time::Instant::now();
    let report = many::evaluate_many(
        &gguf,
        &model,
        &m.tok,
        &all,
        &config,
        &ctx,
        &std::env::temp_dir(),
        |phase| eprintln!("[{:>6.1} s] {phase}", t.elapsed().as_secs_f64()),
    )?;
    if let Some(claim) = plot_claim {
        let mut out = claim.stage_file()?;
        out.write_all(many::curve_svg(&report).as_bytes())?;
        out.commit()?;
    }
    if args.json {
        return print_json(&report);
    }
    let b = &report.baseline;
    println!(
        "unedited: perplexity {:.3} ({} tokens), fluency {:.3}",
        b.perplexity.perplexity, b.perplexity.tokens, b.fluency.mean
    );
    println!(
        "{:<16} {:>5} {:>6} {:>6} {:>6} {:>6} {:>7} {:>9} {:>8} {:>9}",
        "method", "N", "edited", "ES", "PS", "NS", "NS-top1", "ppl ×", "fluency", "s/edit"
    );
    for p in &report.points {
        let s = &p.summary;
        let per_edit = p.compute_seconds.map_or("-".into(), |c| {
            format!("{:.3}", (c + p.write_seconds) / p.n as f64)
        });
        println!(
            "{:<16} {:>5} {:>6} {:>6.3} {:>6.3} {:>6.3} {:>7.3} {:>9.4} {:>8.3} {:>9}",
            p.method.name(),
            p.n,
            p.edited,
            s.efficacy.mean,
            s.paraphrase.mean,
            s.neighborhood.mean,
            s.neighborhood_top1.mean,
            p.perplexity_ratio,
            p.fluency.mean,
            per_edit
        );
    }
    if !args.curve.is_empty() {
        println!("plot: {}", args.plot.display());
    }
    Ok(())
}
