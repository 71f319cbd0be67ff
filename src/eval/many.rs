//! Many edits in one model (`eval --edits N`, `--curve`): the first N records are edited into
//! one set of deltas with one method (sequentially, or jointly for `batch`), written as one LoRA
//! adapter, loaded into llama.cpp, and every record is scored on that single edited model;
//! general quality is the perplexity on the shipped general English text ([`crate::perplexity`])
//! and the n-gram entropy of greedy continuations of fixed prompts, against the unedited model.
//!
//! Sequential methods are computed once for the largest N (the first n outcomes of a sequence
//! are the sequence of the first n records). `batch` reads every record's key and searches its
//! value once, for the largest N, on the unedited model (each depends on its own record only),
//! and only the joint solve is done anew at each N over the first N keys and values.

use super::{encode, locality_top1, ngram_entropy, score, summarize, Encoded, Stat, Summary};
use super::{load_adapter, FLUENCY_TOKENS};
use crate::edit::batch::{self, JointOptions};
use crate::edit::minimal::{self, ValueRule};
use crate::edit::{self, Delta, EditContext, EditOutcome, EditRequest, EditSettings, Method};
use crate::model::Transformer;
use crate::perplexity::{self, Perplexity, GENERAL_TEXT};
use crate::runtime::{LlamaRuntime, Session};
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::GgufFile;
use crate::write::gguf::{stored_deltas, Ff2Type};
use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Prompts whose greedy continuations give the fluency score (general text no edit targets).
pub const FLUENCY_PROMPTS: [&str; 3] = [
    "The history of the city begins",
    "The most important thing about science is",
    "When the war ended, the people",
];

/// Settings of a many-edit evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct ManyConfig {
    /// Methods, one curve each.
    pub methods: Vec<Method>,
    /// Edited layer.
    pub layer: usize,
    /// Step.
    pub lr: f64,
    /// Numbers of records edited into one model, ascending.
    pub sizes: Vec<usize>,
    /// Tokens of the general text the perplexity is taken over.
    pub ppl_tokens: usize,
    /// Storage of the edited FF2 the adapter reproduces.
    pub ff2_type: Ff2Type,
    /// The value `batch` and `shift-protected` write at each key (replaces the context's).
    pub value: ValueRule,
    /// Their ridge and key position (replaces the context's).
    pub joint: JointOptions,
}

/// The unedited model's general quality.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Perplexity on the general text.
    pub perplexity: Perplexity,
    /// Generation entropy on [`FLUENCY_PROMPTS`].
    pub fluency: Stat,
}

/// One method at one N.
#[derive(Debug, Clone, Serialize)]
pub struct ManyPoint {
    /// Method.
    pub method: Method,
    /// Records edited into the model.
    pub n: usize,
    /// Records that needed an edit (the adapter's rank).
    pub edited: usize,
    /// ES / PS / NS / NS-top1 / EM over the n records, all on the one edited model.
    pub summary: Summary,
    /// Perplexity on the general text.
    pub perplexity: Perplexity,
    /// That perplexity over the unedited model's.
    pub perplexity_ratio: f64,
    /// Generation entropy on [`FLUENCY_PROMPTS`].
    pub fluency: Stat,
    /// Seconds computing the edits (batch: this N's joint solve, plus, at the largest N, the
    /// keys and values of all records; sequential methods: the whole sequence, reported at the
    /// largest N only).
    pub compute_seconds: Option<f64>,
    /// Seconds writing the adapter.
    pub write_seconds: f64,
}

/// A many-edit evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct ManyReport {
    /// Settings.
    pub config: ManyConfig,
    /// The unedited model.
    pub baseline: Baseline,
    /// One point per method and N, methods in order, N ascending.
    pub points: Vec<ManyPoint>,
}

/// Checks the sizes against the records before any work: ascending, at least 1, at most the
/// records given.
pub fn check_sizes(sizes: &[usize], available: usize, source: &str) -> Result<()> {
    if sizes.is_empty() || sizes.contains(&0) || sizes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Invalid(format!(
            "--edits/--curve: sizes must be ascending and at least 1, got {sizes:?}"
        )));
    }
    let max = *sizes.last().expect("not empty");
    if max > available {
        return Err(Error::Invalid(format!(
            "{source}: --edits/--curve asks for {max} records, it has {available} (after --offset)"
        )));
    }
    Ok(())
}

/// Runs the evaluation of `records` (at least the largest size) on the GGUF at `gguf`, loaded
/// in candle as `model` (unchanged). `progress` hears each phase.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_many(
    gguf: &Path,
    model: &Transformer,
    tok: &Tokenizer,
    records: &[EditRequest],
    config: &ManyConfig,
    ctx: &EditContext,
    scratch: &Path,
    mut progress: impl FnMut(&str),
) -> Result<ManyReport> {
    check_sizes(&config.sizes, records.len(), "the records given")?;
    config.value.check()?;
    minimal::check_key(config.value, config.joint.key)?;
    let ctx = &EditContext {
        value: config.value,
        joint: config.joint,
        ..*ctx
    };
    let max = *config.sizes.last().expect("checked");
    let records = &records[..max];
    for &method in &config.methods {
        EditSettings {
            method,
            layer: config.layer,
            lr: config.lr,
        }
        .check(model.hp.n_layer)?;
        if config.joint.layers != 1 && method != Method::Batch {
            return Err(Error::Invalid(format!(
                "--spread {} is for batch; {method} edits one layer",
                config.joint.layers
            )));
        }
    }
    batch::spread_start(config.joint.layers, config.layer)?;
    let mut rt = LlamaRuntime::load(gguf)?;
    let encoded = encode_all(tok, records, rt.session()?.max_tokens())?;
    edit::request::refuse_conflicts(records)?;
    let file = GgufFile::open(gguf)?;
    let text = perplexity::text_tokens(&rt, GENERAL_TEXT, Some(config.ppl_tokens))?;
    progress("unedited model");
    let (base_top1, baseline) = {
        let mut s = rt.session()?;
        let top1 = locality_top1(&mut s, &encoded)?;
        let perplexity = perplexity::perplexity(&mut s, &text)?;
        (
            top1,
            Baseline {
                perplexity,
                fluency: fluency(&mut s, tok)?,
            },
        )
    };
    let mut points = Vec::new();
    for &method in &config.methods {
        let settings = EditSettings {
            method,
            layer: config.layer,
            lr: config.lr,
        };
        let t = Instant::now();
        let prepared = match method {
            Method::Batch => {
                progress(&format!("{method}: keys and values of {max} records"));
                let stats = ctx.stats_at(&settings)?;
                let (layer, lr) = (settings.layer, settings.lr);
                let keyed = batch::keys_and_values(
                    model,
                    tok,
                    records,
                    layer,
                    lr,
                    &stats,
                    config.joint.key,
                    ctx.value,
                    ctx.thread_count(),
                )?;
                Prepared::Keys(keyed, stats)
            }
            _ => {
                progress(&format!("{method}: {max} edits in sequence"));
                let mut m = model.clone();
                Prepared::Sequence(edit::apply_sequence_with(
                    &mut m, tok, records, &settings, ctx,
                )?)
            }
        };
        let prepare_seconds = t.elapsed().as_secs_f64();
        for &n in &config.sizes {
            let at_max = (n == max).then_some(prepare_seconds);
            let (outcomes, compute_seconds) = match &prepared {
                Prepared::Sequence(all) => (all[..n].to_vec(), at_max),
                Prepared::Keys(keyed, stats) => {
                    progress(&format!("{method}: {n} edits solved jointly"));
                    let t = Instant::now();
                    let (ridge, layer) = (config.joint.ridge, config.layer);
                    let (reqs, keys) = (&records[..n], &keyed[..n]);
                    let o = match config.joint.layers {
                        1 => batch::solve(reqs, keys, stats, ridge, layer)?,
                        spread => {
                            let store = ctx.store(&settings)?;
                            batch::solve_over_layers(
                                model, tok, reqs, keys, store, ridge, layer, spread,
                            )?
                        }
                    };
                    let solve = t.elapsed().as_secs_f64();
                    (o, Some(solve + at_max.unwrap_or(0.0)))
                }
            };
            progress(&format!("{method}: scoring {n} records on one model"));
            let point = score_point(
                &mut rt,
                &file,
                model.hp.arch,
                tok,
                &outcomes,
                &encoded[..n],
                &base_top1[..n],
                config,
                scratch,
                &text,
                &baseline,
            )?;
            let s = &point.summary;
            progress(&format!(
                "{method} N = {n}: ES {:.3} PS {:.3} NS {:.3} NS-top1 {:.3} perplexity ×{:.4} fluency {:.3}",
                s.efficacy.mean,
                s.paraphrase.mean,
                s.neighborhood.mean,
                s.neighborhood_top1.mean,
                point.perplexity_ratio,
                point.fluency.mean
            ));
            points.push(ManyPoint {
                method,
                compute_seconds,
                ..point
            });
        }
    }
    Ok(ManyReport {
        config: config.clone(),
        baseline,
        points,
    })
}

/// What a method's points are cut from: a sequence's outcomes, or `batch`'s keys and values
/// with the statistics of the edited layer.
enum Prepared {
    Sequence(Vec<EditOutcome>),
    Keys(
        Vec<edit::minimal::Keyed>,
        std::sync::Arc<edit::whiten::KeyStats>,
    ),
}

/// Encodes every record and checks that each of its prompts with its longest continuation fits
/// a llama.cpp session (before any edit is computed).
fn encode_all(tok: &Tokenizer, records: &[EditRequest], limit: usize) -> Result<Vec<Encoded>> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let e = encode(tok, r)?;
            let cont = e.new.len().max(e.truth.len()).max(e.locality_truth.len());
            let longest = [Some(&e.prompt), e.rephrase.as_ref(), e.locality.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.len() + cont)
                .max()
                .unwrap_or(0);
            if longest > limit {
                return Err(Error::BadRequest(format!(
                    "record #{i} (case_id {}): a prompt with its target takes {longest} tokens, more than the {limit} a llama.cpp session holds",
                    r.case_id.map_or("none".into(), |c| c.to_string())
                )));
            }
            Ok(e)
        })
        .collect()
}

/// Mean generation entropy of greedy continuations of [`FLUENCY_PROMPTS`].
fn fluency(s: &mut Session, tok: &Tokenizer) -> Result<Stat> {
    let values = FLUENCY_PROMPTS
        .iter()
        .map(|p| {
            let ids = tok.encode_prompt(p)?;
            Ok(ngram_entropy(
                &tok.decode(&s.generate(&ids, FLUENCY_TOKENS)?),
            ))
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(Stat::of(&values))
}

/// Writes the outcomes' deltas as one adapter and scores every record, the perplexity and the
/// fluency on it.
#[allow(clippy::too_many_arguments)]
fn score_point(
    rt: &mut LlamaRuntime,
    file: &GgufFile,
    arch: crate::arch::Arch,
    tok: &Tokenizer,
    outcomes: &[EditOutcome],
    encoded: &[Encoded],
    base_top1: &[Option<usize>],
    config: &ManyConfig,
    scratch: &Path,
    text: &[u32],
    baseline: &Baseline,
) -> Result<ManyPoint> {
    let deltas: Vec<Delta> = outcomes.iter().flat_map(|o| o.deltas().cloned()).collect();
    for d in &deltas {
        d.check_finite()?;
    }
    let t = Instant::now();
    let mut adapter = match deltas.is_empty() {
        true => None,
        false => {
            let stored = stored_deltas(file, &deltas, config.ff2_type)?;
            Some(load_adapter(rt, arch, &stored, scratch, outcomes.len())?)
        }
    };
    let write_seconds = t.elapsed().as_secs_f64();
    let mut s = rt.session()?;
    if let Some(a) = adapter.as_mut() {
        s.set_lora(a, 1.0)?;
    }
    let mut records = Vec::with_capacity(encoded.len());
    for ((o, e), top1) in outcomes.iter().zip(encoded).zip(base_top1) {
        let mut r = score(&mut s, tok, e, *top1, false)?;
        r.case_id = o.request.case_id;
        r.skipped = o.delta.is_none();
        records.push(r);
    }
    let perplexity = perplexity::perplexity(&mut s, text)?;
    Ok(ManyPoint {
        method: Method::Shift,
        n: outcomes.len(),
        edited: deltas.len(),
        summary: summarize(&records),
        perplexity_ratio: perplexity.perplexity / baseline.perplexity.perplexity,
        perplexity,
        fluency: fluency(&mut s, tok)?,
        compute_seconds: None,
        write_seconds,
    })
}

/// The curve as panels (ES, PS, NS-top1, perplexity ratio, fluency) against N, one line per
/// method.
pub fn curve_svg(report: &ManyReport) -> String {
    type Pick = fn(&ManyPoint) -> f64;
    let metrics: [(&str, Pick); 5] = [
        ("efficacy (ES)", |p| p.summary.efficacy.mean),
        ("paraphrase (PS)", |p| p.summary.paraphrase.mean),
        ("neighborhood top-1 kept", |p| {
            p.summary.neighborhood_top1.mean
        }),
        ("perplexity / unedited", |p| p.perplexity_ratio),
        ("fluency (generation entropy)", |p| p.fluency.mean),
    ];
    let panels: Vec<String> = metrics
        .iter()
        .map(|(title, pick)| {
            let series: Vec<(String, Vec<(f64, f64)>)> = report
                .config
                .methods
                .iter()
                .map(|&m| {
                    let pts = report
                        .points
                        .iter()
                        .filter(|p| p.method == m)
                        .map(|p| ((p.n as f64).log10(), pick(p)))
                        .collect();
                    (m.name().to_string(), pts)
                })
                .collect();
            crate::report::line_plot_svg(title, "log10 N (edits in one model)", &series)
        })
        .collect();
    crate::report::line_plot_grid_svg(&panels)
}
