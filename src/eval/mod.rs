//! CounterFact evaluation through llama.cpp, as in ROME/MEMIT: each record is edited in memory
//! with the same code as `edit`, the edit is hot-swapped into llama.cpp as a low-rank LoRA
//! adapter (no model reload), scored, and removed again, so records are independent unless
//! `sequential` is set. [`many`] puts many records into one model instead (`eval --edits`).

pub mod many;
pub mod min_step;

pub mod paper;

pub mod table1;
pub mod traced;

use crate::edit::{self, Delta, EditContext, EditRequest, EditSettings, Method};
use crate::lens::backward_pass;
use crate::model::Transformer;
use crate::numeric::{argmax, rank_of};
use crate::patch::{self, Forward};
use crate::runtime::{Decoder, LlamaRuntime, PromptQuery};
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::GgufFile;
use crate::write::gguf::{stored_deltas, Ff2Type};
use crate::write::{OutputClaim, OutputKind};
use crate::{Error, Result};
use candle_core::DType;
use llama_cpp_2::model::LlamaLoraAdapter;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Tokens generated for the fluency (n-gram entropy) score.
pub const FLUENCY_TOKENS: usize = 50;

/// How the layer is chosen: a number, or `auto` (JSON: `22` or `"auto"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerChoice {
    /// A fixed layer.
    Fixed(usize),
    /// Per record, from the Backward Lens: among the candidate layers, the one where −δ at the
    /// last token ranks the target best (ties: larger ‖δ‖).
    Auto,
}

/// How the step is chosen: a number, or `auto` (JSON: `0.24` or `"auto"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrChoice {
    /// A fixed step.
    Fixed(f64),
    /// Per record: the smallest step (upward scan, then bisection) that makes the target the
    /// top-1 next token by `AUTO_MARGIN` nats in the candle model, at most `AUTO_MAX_LR`
    /// (see [`auto_lr`]).
    Auto,
}

impl Serialize for LayerChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LayerChoice::Fixed(l) => s.serialize_u64(*l as u64),
            LayerChoice::Auto => s.serialize_str("auto"),
        }
    }
}

impl Serialize for LrChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LrChoice::Fixed(lr) => s.serialize_f64(*lr),
            LrChoice::Auto => s.serialize_str("auto"),
        }
    }
}

impl std::str::FromStr for LayerChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<LayerChoice, String> {
        match s {
            "auto" => Ok(LayerChoice::Auto),
            n => n
                .parse()
                .map(LayerChoice::Fixed)
                .map_err(|_| format!("'{n}' is not a layer number or 'auto'")),
        }
    }
}

impl std::str::FromStr for LrChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<LrChoice, String> {
        match s {
            "auto" => Ok(LrChoice::Auto),
            x => match x.parse::<f64>() {
                Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(LrChoice::Fixed(lr)),
                _ => Err(format!("'{x}' is not a positive step or 'auto'")),
            },
        }
    }
}

fn method_or_none<S: serde::Serializer>(
    m: &Option<Method>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(m.map_or("none", Method::name))
}

/// Parses an eval method: `none` (the unedited baseline) or an edit method's name.
pub fn parse_method(s: &str) -> std::result::Result<Option<Method>, String> {
    match s {
        "none" => Ok(None),
        m => m.parse().map(Some),
    }
}

/// Log-probability margin the auto step asks for.
pub const AUTO_MARGIN: f64 = 0.5;
/// Largest step the auto rule may take.
pub const AUTO_MAX_LR: f64 = 2.0;

/// Evaluation settings.
#[derive(Debug, Clone, Serialize)]
pub struct EvalConfig {
    /// None = unedited baseline (JSON: `"none"`).
    #[serde(serialize_with = "method_or_none")]
    pub method: Option<Method>,
    /// Layer rule.
    pub layer: LayerChoice,
    /// Step rule.
    pub lr: LrChoice,
    /// Keep edits cumulative.
    pub sequential: bool,
    /// Compute the generation-entropy fluency score.
    pub fluency: bool,
    /// How the edited FF2 is stored: F32 (the edit exactly) or requantized to its type; the
    /// adapter carries exactly the change such a patched file makes.
    pub ff2_type: Ff2Type,
    /// Engine of each record's shift key and skip rule: candle (the loaded model) or llama.cpp's
    /// own graph (a tracer on the same file, earlier edits of a sequential run applied as an
    /// adapter); llama.cpp needs `shift` with a fixed layer and step.
    pub forward: Forward,
}

impl EvalConfig {
    /// Fails when the forward engine cannot compute this configuration's edits.
    fn check_forward(&self) -> Result<()> {
        match (self.forward, self.method, self.layer, self.lr) {
            (Forward::Candle, ..) | (Forward::Llama, None, ..) => Ok(()),
            (Forward::Llama, Some(Method::Shift), LayerChoice::Fixed(_), LrChoice::Fixed(_)) => {
                Ok(())
            }
            (Forward::Llama, Some(m), ..) => Err(Error::Invalid(format!(
                "--forward llama runs shift with a fixed --layer and --lr ({m}, --layer auto and --lr auto need candle's backward pass or statistics); use --forward candle"
            ))),
        }
    }
}

/// Scores of one record.
#[derive(Debug, Clone, Serialize)]
pub struct RecordScores {
    /// Record id.
    pub case_id: Option<u64>,
    /// Layer edited (None: unedited or skipped).
    pub layer: Option<usize>,
    /// Step used.
    pub lr: Option<f64>,
    /// Edit skipped because the target was already top-1.
    pub skipped: bool,
    /// P(new) > P(true) on the prompt.
    pub efficacy: bool,
    /// P(new) − P(true) on the prompt.
    pub efficacy_magnitude: f64,
    /// P(new) > P(true) on the rephrased prompt.
    pub paraphrase: Option<bool>,
    /// P(true) > P(new) on the locality prompt.
    pub neighborhood: Option<bool>,
    /// The locality prompt's top-1 token equals the unedited model's.
    pub neighborhood_top1: Option<bool>,
    /// n-gram entropy of a greedy continuation of the prompt.
    pub fluency: Option<f64>,
    /// The paper's top-1 accuracies.
    #[serde(flatten)]
    pub accuracy: paper::Accuracy,
    /// Seconds spent computing the edit (0 for the unedited model).
    pub edit_seconds: f64,
}

/// Mean and 95% confidence half-width.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// 1.96 · standard error.
    pub ci95: f64,
    /// Count.
    pub n: usize,
}

impl Stat {
    /// Mean ± CI of values.
    pub fn of(values: &[f64]) -> Stat {
        let n = values.len();
        if n == 0 {
            return Stat {
                mean: f64::NAN,
                ci95: f64::NAN,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
        Stat {
            mean,
            ci95: 1.96 * (var / n as f64).sqrt(),
            n,
        }
    }
}

/// Aggregated scores.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Efficacy score (ES).
    pub efficacy: Stat,
    /// Paraphrase score (PS).
    pub paraphrase: Stat,
    /// Neighborhood score (NS).
    pub neighborhood: Stat,
    /// Share of locality prompts whose top-1 is unchanged.
    pub neighborhood_top1: Stat,
    /// Efficacy magnitude (EM).
    pub efficacy_magnitude: Stat,
    /// Fluency (generation entropy), when computed.
    pub fluency: Stat,
    /// Share of records skipped (target already top-1).
    pub skipped: Stat,
    /// The paper's Table 1 metrics (top-1 accuracies, n-gram entropy ×100).
    pub paper: paper::PaperSummary,
    /// Seconds per edit computed (skipped records included).
    pub edit_seconds: Stat,
}

/// A full evaluation result.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Settings.
    pub config: EvalConfig,
    /// Per-record scores.
    pub records: Vec<RecordScores>,
    /// Aggregates.
    pub summary: Summary,
    /// For sequential runs: share of earlier edits whose efficacy still holds at the end.
    pub retained: Option<Stat>,
    /// Records per second.
    pub records_per_second: f64,
}

fn summarize(records: &[RecordScores]) -> Summary {
    let pick = |f: &dyn Fn(&RecordScores) -> Option<f64>| -> Stat {
        Stat::of(&records.iter().filter_map(f).collect::<Vec<_>>())
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    Summary {
        efficacy: pick(&|r| Some(b(r.efficacy))),
        paraphrase: pick(&|r| r.paraphrase.map(b)),
        neighborhood: pick(&|r| r.neighborhood.map(b)),
        neighborhood_top1: pick(&|r| r.neighborhood_top1.map(b)),
        efficacy_magnitude: pick(&|r| Some(r.efficacy_magnitude)),
        fluency: pick(&|r| r.fluency),
        skipped: pick(&|r| Some(b(r.skipped))),
        paper: paper::summarize(
            &records.iter().map(|r| r.accuracy).collect::<Vec<_>>(),
            &records.iter().filter_map(|r| r.fluency).collect::<Vec<_>>(),
        ),
        edit_seconds: pick(&|r| r.layer.map(|_| r.edit_seconds)),
    }
}

/// ROME's generation entropy: weighted mean of the bigram (weight 2/3) and trigram (4/3)
/// entropies, in bits, of the lower-cased words of `text`.
pub fn ngram_entropy(text: &str) -> f64 {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let entropy = |n: usize| -> f64 {
        if words.len() < n {
            return 0.0;
        }
        // Ordered, so that the floating-point sum is the same on every run.
        let mut counts: std::collections::BTreeMap<&[String], usize> = Default::default();
        for g in words.windows(n) {
            *counts.entry(g).or_default() += 1;
        }
        let total = (words.len() + 1 - n) as f64;
        counts
            .values()
            .map(|&c| c as f64 / total)
            .map(|p| -p * p.log2())
            .sum()
    };
    (2.0 / 3.0 * entropy(2) + 4.0 / 3.0 * entropy(3)) / 2.0
}

/// The record's prompts and targets as token ids.
struct Encoded {
    prompt: Vec<u32>,
    new: Vec<u32>,
    truth: Vec<u32>,
    rephrase: Option<Vec<u32>>,
    locality: Option<Vec<u32>>,
    locality_truth: Vec<u32>,
}

fn encode(tok: &Tokenizer, r: &EditRequest) -> Result<Encoded> {
    let truth = r
        .ground_truth
        .as_deref()
        .ok_or_else(|| Error::Invalid(format!("record {:?} has no ground_truth", r.case_id)))?;
    Ok(Encoded {
        prompt: tok.encode_prompt(&r.prompt)?,
        new: tok.encode_target(&r.target_new)?,
        truth: tok.encode_target(truth)?,
        rephrase: r
            .rephrase_prompt
            .as_deref()
            .map(|p| tok.encode_prompt(p))
            .transpose()?,
        locality: r
            .locality_prompt
            .as_deref()
            .map(|p| tok.encode_prompt(p))
            .transpose()?,
        locality_truth: tok.encode_target(r.locality_ground_truth.as_deref().unwrap_or(truth))?,
    })
}

/// Picks the layer from the lens: best rank of the target in −δ at the last token among
/// layers in [0.4·n, 0.9·n), ties broken by the larger ‖δ‖.
pub fn auto_layer(model: &Transformer, prompt: &[u32], target: &[u32]) -> Result<usize> {
    let n = model.hp.n_layer;
    let bp = backward_pass(model, prompt, target, false)?;
    let last = prompt.len() - 1;
    let mut best = (usize::MAX, f32::MIN, 0);
    for l in (2 * n / 5)..(9 * n / 10).max(2 * n / 5 + 1) {
        let d2 = bp.d2[l].narrow(0, last, 1)?.neg()?;
        let norm = d2
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        let scores = &crate::lens::project_rows(model, &d2, true)?[0];
        let rank = rank_of(scores, target[0]);
        if rank < best.0 || (rank == best.0 && norm > best.1) {
            best = (rank, norm, l);
        }
    }
    Ok(best.2)
}

/// Steps of the upward scan of the auto rule: `AUTO_MAX_LR` · 2^-k for k = AUTO_SCAN-1 .. 0.
const AUTO_SCAN: i32 = 8;

/// Smallest step making the target top-1 by `AUTO_MARGIN`: the delta is linear in the step, but
/// the margin is not monotonic in it (past some step the shift swamps the residual stream and
/// other tokens win again), so the rule scans steps `AUTO_MAX_LR` · 2^-k upwards, takes the first
/// that reaches the margin and bisects between it and the step before. When none reaches it, the
/// scanned step with the largest margin is used (not the cap, which often breaks the model).
pub fn auto_lr(
    model: &Transformer,
    prompt: &[u32],
    delta_at_one: &Delta,
    target: u32,
) -> Result<f64> {
    let margin_at = |lr: f64| -> Result<f64> {
        let mut m = model.clone();
        let mut d = delta_at_one.clone();
        d.out_vecs
            .iter_mut()
            .flatten()
            .for_each(|v| *v *= lr as f32);
        m.apply_delta(&d)?;
        let (logits, _) = m.forward(prompt, None)?;
        let row: Vec<f32> = logits
            .narrow(0, prompt.len() - 1, 1)?
            .flatten_all()?
            .to_vec1()?;
        let t = row[target as usize];
        let other = row
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != target as usize)
            .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
        Ok((t - other) as f64)
    };
    let mut lo = 0.0;
    let mut best = (f64::NEG_INFINITY, AUTO_MAX_LR);
    let mut hi = None;
    for k in (0..AUTO_SCAN).rev() {
        let lr = AUTO_MAX_LR * 2f64.powi(-k);
        let m = margin_at(lr)?;
        if m >= AUTO_MARGIN {
            hi = Some(lr);
            break;
        }
        if m > best.0 {
            best = (m, lr);
        }
        lo = lr;
    }
    let Some(mut hi) = hi else {
        return Ok(best.1);
    };
    for _ in 0..6 {
        let mid = 0.5 * (lo + hi);
        if margin_at(mid)? >= AUTO_MARGIN {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// Runs an evaluation of `records` on the GGUF at `gguf` (also loaded in candle as `model`), for
/// methods that need no [`EditContext`].
pub fn evaluate(
    gguf: &Path,
    model: &mut Transformer,
    tok: &Tokenizer,
    records: &[EditRequest],
    config: &EvalConfig,
    scratch: &Path,
    progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let ctx = EditContext::default();
    evaluate_with(gguf, model, tok, records, config, &ctx, scratch, progress)
}

/// Records whose adapters are loaded together before one llama.cpp session scores them (an
/// adapter can only be loaded while no session borrows the model); in `eval --forward llama`,
/// the records whose keys one packed trace takes.
const CHUNK: usize = 16;

/// [`evaluate`] with an edit context (key statistics for `shift-whitened`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    gguf: &Path,
    model: &mut Transformer,
    tok: &Tokenizer,
    records: &[EditRequest],
    config: &EvalConfig,
    ctx: &EditContext,
    scratch: &Path,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    if records.is_empty() {
        return Err(Error::Invalid("no records to evaluate".into()));
    }
    if let LayerChoice::Fixed(l) = config.layer {
        if l >= model.hp.n_layer {
            return Err(Error::LayerOutOfRange {
                layer: l,
                n_layer: model.hp.n_layer,
            });
        }
    }
    config.check_forward()?;
    if config.forward == Forward::Llama {
        return traced::evaluate(gguf, tok, records, config, progress);
    }
    let start = std::time::Instant::now();
    let mut rt = LlamaRuntime::load(gguf)?;
    let file = GgufFile::open(gguf)?;
    let arch = model.hp.arch;
    let encoded = records
        .iter()
        .map(|r| encode(tok, r))
        .collect::<Result<Vec<_>>>()?;
    let base_top1 = locality_top1(&mut rt.session()?, &encoded)?;
    let mut all_deltas: Vec<Delta> = Vec::new();
    let mut scores = Vec::with_capacity(records.len());
    for (chunk, (recs, encs)) in records.chunks(CHUNK).zip(encoded.chunks(CHUNK)).enumerate() {
        let mut edits = Vec::with_capacity(recs.len());
        let mut adapters = Vec::with_capacity(recs.len());
        for (i, (r, enc)) in recs.iter().zip(encs).enumerate() {
            let edit = edit_record(model, tok, r, enc, config, ctx)?;
            let active: Vec<Delta> = match config.sequential {
                true => {
                    for d in &edit.deltas {
                        all_deltas.push(d.clone());
                        model.apply_delta(d)?;
                    }
                    all_deltas.clone()
                }
                false => edit.deltas.clone(),
            };
            let stored = stored_deltas(&file, &active, config.ff2_type)?;
            adapters.push(match stored.is_empty() {
                true => None,
                false => Some(load_adapter(
                    &mut rt,
                    arch,
                    &stored,
                    scratch,
                    chunk * CHUNK + i,
                )?),
            });
            edits.push(edit);
        }
        let mut session = rt.session()?;
        let mut applied: Option<usize> = None;
        for (i, (edit, enc)) in edits.into_iter().zip(encs).enumerate() {
            let index = chunk * CHUNK + i;
            match (adapters[i].is_some(), applied) {
                (true, _) => {
                    session.set_lora(adapters[i].as_mut().expect("adapter"), 1.0)?;
                    applied = Some(i);
                }
                (false, Some(a)) => {
                    session.clear_lora(adapters[a].as_mut().expect("adapter"))?;
                    applied = None;
                }
                (false, None) => {}
            }
            let mut record = score(&mut session, tok, enc, base_top1[index], config.fluency)?;
            edit.stamp(&mut record, records[index].case_id);
            scores.push(record);
            progress(index + 1);
        }
    }
    let retained = match (config.sequential, all_deltas.is_empty()) {
        (true, false) => {
            let stored = stored_deltas(&file, &all_deltas, config.ff2_type)?;
            let mut adapter = load_adapter(&mut rt, arch, &stored, scratch, records.len())?;
            let mut session = rt.session()?;
            session.set_lora(&mut adapter, 1.0)?;
            Some(retention(&mut session, &encoded)?)
        }
        _ => None,
    };
    Ok(EvalReport::of(config, start, scores, retained))
}

/// The share of records whose new target still beats the truth after their prompt on `d`, which
/// has every edit of a sequential run applied.
fn retention(d: &mut impl Decoder, encoded: &[Encoded]) -> Result<Stat> {
    let queries: Vec<PromptQuery> = encoded
        .iter()
        .map(|e| PromptQuery {
            prompt: &e.prompt,
            continuations: vec![&e.new, &e.truth],
        })
        .collect();
    let held: Vec<f64> = crate::runtime::score(d, &queries)?
        .iter()
        .map(|s| f64::from(u8::from(s.logprobs[0] > s.logprobs[1])))
        .collect();
    Ok(Stat::of(&held))
}

impl EvalReport {
    /// The report of a run that started at `start` and scored `scores`.
    fn of(
        config: &EvalConfig,
        start: std::time::Instant,
        scores: Vec<RecordScores>,
        retained: Option<Stat>,
    ) -> EvalReport {
        EvalReport {
            config: config.clone(),
            records_per_second: scores.len() as f64 / start.elapsed().as_secs_f64(),
            summary: summarize(&scores),
            records: scores,
            retained,
        }
    }
}

/// The edit made for one record.
struct RecordEdit {
    layer: Option<usize>,
    lr: Option<f64>,
    /// Every change of the edit (several layers for memit).
    deltas: Vec<Delta>,
    skipped: bool,
    seconds: f64,
}

impl RecordEdit {
    /// Writes the record's case id and this edit's layer, step, skip and time into its scores.
    fn stamp(&self, record: &mut RecordScores, case_id: Option<u64>) {
        record.case_id = case_id;
        record.layer = self.layer;
        record.lr = self.lr;
        record.skipped = self.skipped;
        record.edit_seconds = self.seconds;
    }
}

/// Computes the record's edit in candle with the configured method, layer and step rules.
fn edit_record(
    model: &Transformer,
    tok: &Tokenizer,
    r: &EditRequest,
    enc: &Encoded,
    config: &EvalConfig,
    ctx: &EditContext,
) -> Result<RecordEdit> {
    let Some(method) = config.method else {
        return Ok(RecordEdit {
            layer: None,
            lr: None,
            deltas: Vec::new(),
            skipped: false,
            seconds: 0.0,
        });
    };
    let start = std::time::Instant::now();
    let layer = match config.layer {
        LayerChoice::Fixed(l) => l,
        LayerChoice::Auto => auto_layer(model, &enc.prompt, &enc.new)?,
    };
    let fixed_lr = match config.lr {
        LrChoice::Fixed(lr) => lr,
        LrChoice::Auto => 1.0,
    };
    let settings = EditSettings {
        method,
        layer,
        lr: fixed_lr,
    };
    let outcome = edit::compute_with(model, tok, r, &settings, ctx)?;
    if config.lr == LrChoice::Auto && !outcome.extra.is_empty() {
        return Err(Error::Invalid(format!(
            "--lr auto scales one layer's edit; {method} edits several"
        )));
    }
    let delta = match (outcome.delta, config.lr) {
        (Some(mut d), LrChoice::Auto) => {
            let lr = auto_lr(model, &enc.prompt, &d, outcome.target_id)?;
            d.out_vecs
                .iter_mut()
                .flatten()
                .for_each(|v| *v *= lr as f32);
            Some((d, lr))
        }
        (d, _) => d.map(|d| (d, fixed_lr)),
    };
    Ok(RecordEdit {
        layer: Some(layer),
        lr: delta.as_ref().map(|d| d.1),
        skipped: delta.is_none(),
        deltas: delta
            .map(|d| d.0)
            .into_iter()
            .chain(outcome.extra)
            .collect(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The unedited model's top-1 token after each record's locality prompt (batched decodes).
fn locality_top1(session: &mut impl Decoder, encoded: &[Encoded]) -> Result<Vec<Option<usize>>> {
    let queries: Vec<PromptQuery> = encoded
        .iter()
        .filter_map(|e| e.locality.as_deref())
        .map(|prompt| PromptQuery {
            prompt,
            continuations: Vec::new(),
        })
        .collect();
    let mut tops = crate::runtime::score(session, &queries)?
        .into_iter()
        .map(|s| argmax(&s.next_logits));
    Ok(encoded
        .iter()
        .map(|e| e.locality.as_ref().and_then(|_| tops.next()))
        .collect())
}

/// Writes `deltas` as one adapter in `scratch` and loads it into llama.cpp.
fn load_adapter(
    rt: &mut LlamaRuntime,
    arch: crate::arch::Arch,
    deltas: &[Delta],
    scratch: &Path,
    index: usize,
) -> Result<LlamaLoraAdapter> {
    let path: PathBuf = scratch.join(format!("eval-adapter-{}-{index}.gguf", std::process::id()));
    let claim = OutputClaim::new(&path, OutputKind::File, &[], false)?;
    // Staged only: llama.cpp reads it, and dropping it removes the file.
    let staged = patch::stage_adapter(arch.name(), deltas, claim)?;
    rt.load_lora(staged.path())
}

/// Scores one record on a session that has its edit applied: prompt, paraphrase and locality
/// are scored in one batched decode; fluency adds a greedy generation.
fn score(
    s: &mut impl Decoder,
    tok: &Tokenizer,
    e: &Encoded,
    base_locality_top1: Option<usize>,
    fluency: bool,
) -> Result<RecordScores> {
    let mut queries = vec![PromptQuery {
        prompt: &e.prompt,
        continuations: vec![&e.new, &e.truth],
    }];
    if let Some(p) = &e.rephrase {
        queries.push(PromptQuery {
            prompt: p,
            continuations: vec![&e.new, &e.truth],
        });
    }
    if let Some(p) = &e.locality {
        queries.push(PromptQuery {
            prompt: p,
            continuations: vec![&e.new, &e.locality_truth],
        });
    }
    let scored = crate::runtime::score(s, &queries)?;
    let accuracy = paper::Accuracy::of(&paper::NextTokens {
        prompt: &scored[0].next_logits,
        paraphrase: e.rephrase.as_ref().map(|_| &scored[1].next_logits[..]),
        neighborhood: e
            .locality
            .as_ref()
            .map(|_| &scored.last().expect("locality query").next_logits[..]),
        new: e.new[0],
        neighborhood_truth: e.locality_truth[0],
    });
    let (p_new, p_true) = (scored[0].logprobs[0], scored[0].logprobs[1]);
    let paraphrase = e
        .rephrase
        .as_ref()
        .map(|_| scored[1].logprobs[0] > scored[1].logprobs[1]);
    let (neighborhood, neighborhood_top1) = match &e.locality {
        Some(_) => {
            let loc = scored.last().expect("locality query");
            (
                Some(loc.logprobs[1] >= loc.logprobs[0]),
                Some(Some(argmax(&loc.next_logits)) == base_locality_top1),
            )
        }
        None => (None, None),
    };
    let fluency = match fluency {
        true => Some(ngram_entropy(&tok.decode(&crate::runtime::generate(
            s,
            &e.prompt,
            FLUENCY_TOKENS,
        )?))),
        false => None,
    };
    Ok(RecordScores {
        case_id: None,
        layer: None,
        lr: None,
        skipped: false,
        efficacy: p_new > p_true,
        efficacy_magnitude: p_new.exp() - p_true.exp(),
        paraphrase,
        neighborhood,
        neighborhood_top1,
        fluency,
        accuracy,
        edit_seconds: 0.0,
    })
}

/// Loads CounterFact-shaped records (a JSON list of `EditRequest`s).
pub fn load_records(path: &Path, offset: usize, n: Option<usize>) -> Result<Vec<EditRequest>> {
    let all = EditRequest::load_file(path)?;
    let end = n.map_or(all.len(), |n| (offset + n).min(all.len()));
    if offset >= all.len() {
        return Err(Error::Invalid(format!(
            "offset {offset} is past the {} records of {}",
            all.len(),
            path.display()
        )));
    }
    Ok(all[offset..end].to_vec())
}
