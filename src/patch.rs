//! The library's `edit`: compute the edits of a request list, write them in the chosen format
//! with provenance, check the written file through llama.cpp, and only then move it into place.
//! The CLI (`edit`), `eval` (its per-record adapters) and `bench` all go through these steps:
//! [`compute`] → [`stage`] → [`check`] → [`Staged::commit`], or [`run`] for all four.

use crate::arch::generic::Shape;
use crate::delta::Delta;
use crate::edit::whiten::{self, StatsCorpus, StatsStore, WhitenOptions};
use crate::edit::{self, EditContext, EditOutcome, EditRequest, EditSettings, Method};
use crate::lora;
use crate::model::Transformer;
use crate::numeric::{argmax, log_probs, rank_of};
use crate::provenance::{EditRecord, Provenance};
use crate::runtime::{Decoder, LlamaRuntime};
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;
use crate::trace::Tracer;
use crate::weights::gguf::GgufFile;
use crate::write::gguf::{patch_plan, Ff2Type};
use crate::write::{safetensors, OutputClaim, OutputKind, Staged};
use crate::{Error, Result};
use candle_core::DType;
use serde::Serialize;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

/// Output format of an edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A full patched GGUF.
    Gguf,
    /// A low-rank LoRA adapter GGUF for llama.cpp's `--lora`.
    Lora,
    /// A patched HF safetensors folder (safetensors inputs only).
    Safetensors,
}

impl Format {
    /// Whether the output is a file or a folder.
    pub fn output_kind(self) -> OutputKind {
        match self {
            Format::Safetensors => OutputKind::Folder,
            Format::Gguf | Format::Lora => OutputKind::File,
        }
    }

    /// Fails when this format cannot be written from `source`.
    pub fn check_input(self, source: &ModelSource) -> Result<()> {
        match (self, source) {
            (Format::Safetensors, ModelSource::Gguf(_)) => Err(Error::Invalid(
                "--format safetensors needs an HF safetensors input".into(),
            )),
            (Format::Gguf | Format::Lora, ModelSource::Hf(_)) => Err(Error::Invalid(format!(
                "--format {} needs a GGUF input; use --format safetensors",
                self.name()
            ))),
            _ => Ok(()),
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::Lora => "lora",
            Format::Safetensors => "safetensors",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Gguf => "GGUF",
            Format::Lora => "LoRA",
            Format::Safetensors => "safetensors",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Format, String> {
        match s {
            "gguf" => Ok(Format::Gguf),
            "lora" => Ok(Format::Lora),
            "safetensors" => Ok(Format::Safetensors),
            other => Err(format!(
                "unknown format '{other}' (choose gguf, lora or safetensors)"
            )),
        }
    }
}

/// Where `shift-whitened` takes its key statistics from.
#[derive(Debug, Clone, Default)]
pub struct WhitenSetup {
    /// The prompts the statistics are accumulated over.
    pub corpus: StatsCorpus,
    /// Key options.
    pub options: WhitenOptions,
    /// Cache folder for the statistics (None: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl WhitenSetup {
    /// The default corpus and options with the default cache folder.
    pub fn cached() -> WhitenSetup {
        WhitenSetup {
            cache_dir: whiten::default_cache_dir(),
            ..WhitenSetup::default()
        }
    }

    /// The statistics store for the unedited `model` loaded from `path`, when `method` needs one.
    pub fn store(
        &self,
        method: Method,
        model: &Transformer,
        tok: &Tokenizer,
        path: &Path,
    ) -> Result<Option<StatsStore>> {
        if !method.needs_stats() {
            return Ok(None);
        }
        StatsStore::new(
            model,
            tok,
            path,
            &self.corpus,
            self.options,
            self.cache_dir.clone(),
        )
        .map(Some)
    }
}

/// Everything an edit run needs besides the model and the output.
#[derive(Debug, Clone)]
pub struct Job {
    /// The requests, applied in order.
    pub requests: Vec<EditRequest>,
    /// Method, layer and step.
    pub settings: EditSettings,
    /// Key statistics for `shift-whitened`.
    pub whiten: WhitenSetup,
    /// Output format.
    pub format: Format,
    /// Storage of the edited FF2 in a GGUF output.
    pub ff2_type: Ff2Type,
    /// Run the before/after check through llama.cpp (GGUF and LoRA outputs).
    pub check: bool,
    /// The engine of the forward pass that `shift` takes its key and skip rule from.
    pub forward: Forward,
    /// Threads of `batch`'s value searches (None: one per core); the output does not depend on it.
    pub threads: Option<NonZeroUsize>,
}

/// Which engine runs the forward pass of a forward-only edit ([`Method::Shift`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// llama.cpp's own graph, read through [`crate::trace`] (GGUF inputs, shift only): the
    /// activations the served model computes, for any architecture llama.cpp runs.
    Llama,
    /// backlens's candle forward (streamed one block at a time for shift on a GGUF).
    #[default]
    Candle,
}

crate::named_enum!(Forward, "forward", [Llama => "llama", Candle => "candle"]);

impl Forward {
    /// The engine `edit` uses when none is given: llama.cpp for a GGUF whose architecture
    /// candle does not implement (the only engine that runs it), candle otherwise (the exact
    /// f32 reference; shift on a GGUF streams one block at a time, so the f32 copy of the whole
    /// model is never needed and model size does not change the choice).
    pub fn default_for(source: &ModelSource) -> Forward {
        match source {
            ModelSource::Gguf(_) if source.hparams().is_err_and(|e| e.is_unknown_arch()) => {
                Forward::Llama
            }
            _ => Forward::Candle,
        }
    }
}

/// Layer count of `source`: from the forward-only shape of a GGUF (any architecture the pinned
/// llama.cpp loads), from the hyperparameters of an HF folder.
pub fn n_layer(source: &ModelSource) -> Result<usize> {
    match source {
        ModelSource::Gguf(g) => Ok(Shape::from_gguf(g)?.n_layer),
        ModelSource::Hf(h) => Ok(h.hparams.n_layer),
    }
}

/// Computes the edits of `requests` in order, each on the model with the ones before applied.
/// Plain FPS on a GGUF runs its forward through llama.cpp ([`Forward::Llama`], the earlier
/// edits applied as an adapter) or streams the model one block at a time in candle
/// ([`Forward::Candle`]); the other methods (and safetensors inputs) load the whole model in
/// f32 and need [`Forward::Candle`]; `threads` as in [`Job::threads`]. The file is not changed.
pub fn compute(
    source: &ModelSource,
    tok: &Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
    whiten: &WhitenSetup,
    forward: Forward,
    threads: Option<NonZeroUsize>,
) -> Result<Vec<EditOutcome>> {
    match (source, settings.method, forward) {
        (ModelSource::Gguf(g), Method::Shift, Forward::Llama) => {
            let mut tracer = traced_for(g, settings)?;
            compute_on(&mut tracer, source, tok, requests, settings)
        }
        (ModelSource::Hf(_), _, Forward::Llama) => Err(Error::Invalid(
            "--forward llama needs a GGUF input (llama.cpp reads GGUF only); use --forward candle"
                .into(),
        )),
        (_, method, Forward::Llama) => Err(Error::Invalid(format!(
            "--forward llama runs shift only ({method} needs candle's backward pass or key statistics); use --forward candle"
        ))),
        (ModelSource::Gguf(_), Method::Shift, _) => {
            edit::apply_sequence_streamed(source, tok, requests, settings)
        }
        _ => {
            let mut model = Transformer::load(source, DType::F32)?;
            let store = whiten.store(settings.method, &model, tok, source.path())?;
            let ctx = EditContext {
                stats: store.as_ref(),
                threads,
                ..EditContext::default()
            };
            edit::apply_sequence_with(&mut model, tok, requests, settings, &ctx)
        }
    }
}

/// A tracer on `g` once `settings` is checked against its shape (layer range, a dense FF2).
fn traced_for(g: &GgufFile, settings: &EditSettings) -> Result<Tracer> {
    let shape = Shape::from_gguf(g)?;
    settings.check(shape.n_layer)?;
    shape
        .ff2_width(settings.layer)
        .map_err(|e| e.in_file(g.path()))?;
    Tracer::load_opened(g)
}

/// [`compute`]'s shift edits through llama.cpp's forward on `tracer` (a tracer on `source`).
fn compute_on(
    tracer: &mut Tracer,
    source: &ModelSource,
    tok: &Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
) -> Result<Vec<EditOutcome>> {
    let (layer, lr) = (settings.layer, settings.lr);
    edit::apply_in_order(requests, |req, prior| {
        edit::shift::compute_traced(tracer, source, tok, req, layer, lr, prior)
    })
}

/// The provenance of a run: its settings, requests and the sha256 of its base file.
pub fn provenance(
    settings: &EditSettings,
    outcomes: &[EditOutcome],
    whiten: &WhitenSetup,
    base_sha256: String,
) -> Provenance {
    let stats = settings.method.needs_stats();
    Provenance {
        method: settings.method.name().to_string(),
        layer: settings.layer,
        lr: settings.lr,
        edits: outcomes
            .iter()
            .map(|o| EditRecord {
                prompt: o.request.prompt.clone(),
                target_new: o.request.target_new.clone(),
                target_id: o.target_id,
                skipped: o.delta.is_none(),
            })
            .collect(),
        base_sha256,
        whiten: stats
            .then(|| serde_json::to_string(&whiten.options).expect("whiten options serialize")),
        stats_corpus: stats.then(|| whiten.corpus.describe()),
    }
}

/// Writes `deltas` from `source` in `format` to the claimed output, finished but not committed.
pub fn stage(
    source: &ModelSource,
    deltas: &[Delta],
    format: Format,
    ff2_type: Ff2Type,
    provenance: Option<&Provenance>,
    claim: OutputClaim,
) -> Result<Staged> {
    format.check_input(source)?;
    let keys = provenance.map(Provenance::to_metadata).unwrap_or_default();
    match (source, format) {
        (ModelSource::Gguf(g), Format::Gguf) => {
            patch_plan(g, deltas, ff2_type, &keys)?.write_to(claim.stage_file()?)
        }
        (ModelSource::Gguf(g), Format::Lora) => {
            let arch = Shape::from_gguf(g)?.arch;
            lora::adapter_plan(&arch, deltas, &keys).write_to(claim.stage_file()?)
        }
        (ModelSource::Hf(h), Format::Safetensors) => {
            safetensors::stage_patched(h, deltas, claim.stage_folder()?)
        }
        _ => unreachable!("format checked against the input above"),
    }
}

/// Writes `deltas` as a LoRA adapter for architecture `arch` to the claimed output, finished
/// but not committed (eval's per-record adapters).
pub fn stage_adapter(arch: &str, deltas: &[Delta], claim: OutputClaim) -> Result<Staged> {
    lora::adapter_plan(arch, deltas, &[]).write_to(claim.stage_file()?)
}

/// Probability, rank and top-1 of a target after a prompt, through llama.cpp.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The prompt.
    pub prompt: String,
    /// The target's first token, as text.
    pub target: String,
    /// Its probability.
    pub prob: f64,
    /// Its rank (0 = top-1).
    pub rank: usize,
    /// The top-1 token, as text.
    pub top1: String,
}

/// The before/after probes of a written file.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// On the base model.
    pub before: Vec<Probe>,
    /// On the written file (or the base with the written adapter).
    pub after: Vec<Probe>,
}

/// Share of the largest possible entropy above which a next-token distribution counts as
/// destroyed (near uniform).
const DESTROYED_ENTROPY: f64 = 0.9;

fn probe(
    s: &mut (impl Decoder + ?Sized),
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
) -> Result<Probe> {
    let ids = tok.encode_prompt(prompt)?;
    let t = first_token(tok, target)?;
    let logits = crate::runtime::logits_last(s, &ids)?;
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::Numeric(format!(
            "llama.cpp gives non-finite logits after {prompt:?}"
        )));
    }
    let logp = log_probs(&logits);
    let entropy: f64 = -logp.iter().map(|&l| l.exp() * l).sum::<f64>();
    if entropy > DESTROYED_ENTROPY * (logp.len() as f64).ln() {
        return Err(Error::Numeric(format!(
            "the next-token distribution after {prompt:?} is near uniform (entropy {entropy:.2} nats): the model is destroyed"
        )));
    }
    Ok(Probe {
        prompt: prompt.into(),
        target: tok.token_text(t),
        prob: logp[t as usize].exp(),
        rank: rank_of(&logits, t),
        top1: tok.token_text(argmax(&logits) as u32),
    })
}

fn first_token(tok: &Tokenizer, target: &str) -> Result<u32> {
    tok.encode_target(target)?
        .first()
        .copied()
        .ok_or_else(|| Error::BadRequest(format!("the target {target:?} tokenizes to nothing")))
}

fn probes(
    s: &mut (impl Decoder + ?Sized),
    tok: &Tokenizer,
    reqs: &[EditRequest],
) -> Result<Vec<Probe>> {
    let mut out = Vec::new();
    for r in reqs {
        out.push(probe(s, tok, &r.prompt, &r.target_new)?);
        for p in [&r.rephrase_prompt, &r.locality_prompt]
            .into_iter()
            .flatten()
        {
            out.push(probe(s, tok, p, &r.target_new)?);
        }
    }
    Ok(out)
}

/// Probes every request's prompts through llama.cpp on the base GGUF and on the staged output
/// (a patched GGUF, or the base with the staged adapter). Fails when llama.cpp cannot load the
/// output or the edited model's predictions are non-finite or near uniform.
pub fn check(
    source: &ModelSource,
    tok: &Tokenizer,
    staged: &Staged,
    format: Format,
    reqs: &[EditRequest],
) -> Result<Check> {
    check_after(source, tok, staged, format, reqs, None)
}

/// The base model's probes of [`check`] on a tracer of it (earlier edits removed), taken before
/// the tracer is freed, so that checking a patched GGUF loads only the patched file.
fn base_probes(tracer: &mut Tracer, tok: &Tokenizer, reqs: &[EditRequest]) -> Result<Vec<Probe>> {
    tracer.apply_deltas(&[])?;
    probes(tracer, tok, reqs)
}

/// [`check`] with the base's probes already taken (`before`, from [`base_probes`]), or taken
/// here on a fresh load of the base.
fn check_after(
    source: &ModelSource,
    tok: &Tokenizer,
    staged: &Staged,
    format: Format,
    reqs: &[EditRequest],
    before: Option<Vec<Probe>>,
) -> Result<Check> {
    let ModelSource::Gguf(g) = source else {
        return Err(Error::Invalid(
            "the llama.cpp check needs a GGUF input".into(),
        ));
    };
    let (base, before) = match (format, before) {
        (Format::Gguf, Some(before)) => (None, before),
        _ => {
            let base = LlamaRuntime::load(g.path())?;
            let before = probes(&mut base.session()?, tok, reqs)?;
            (Some(base), before)
        }
    };
    let after = match (format, base) {
        (Format::Lora, Some(mut base)) => {
            let mut adapter = base.load_lora(staged.path())?;
            let mut s = base.session()?;
            s.set_lora(&mut adapter, 1.0)?;
            probes(&mut s, tok, reqs)?
        }
        (_, base) => {
            drop(base);
            let patched = LlamaRuntime::load(staged.path())?;
            let after = probes(&mut patched.session()?, tok, reqs)?;
            after
        }
    };
    Ok(Check { before, after })
}

/// [`check`] of a staged LoRA adapter with the tracer the edit was computed on as the base
/// model, so that llama.cpp loads the base once per run: the base probes on it (earlier edits
/// removed), then again with the adapter applied (after [`crate::lora::validate`]).
pub fn check_adapter_on(
    mut tracer: Tracer,
    source: &ModelSource,
    tok: &Tokenizer,
    staged: &Staged,
    reqs: &[EditRequest],
) -> Result<Check> {
    let ModelSource::Gguf(g) = source else {
        return Err(Error::Invalid(
            "the llama.cpp check needs a GGUF input".into(),
        ));
    };
    let before = base_probes(&mut tracer, tok, reqs)?;
    tracer.apply_adapter_file(g, staged.path())?;
    let after = probes(&mut tracer, tok, reqs)?;
    Ok(Check { before, after })
}

/// Fails before any work when a prompt of `r` is longer than a llama.cpp check session takes.
fn check_fits_session(tok: &Tokenizer, r: &EditRequest) -> Result<()> {
    let limit = crate::runtime::SESSION_CTX as usize;
    for p in [
        Some(&r.prompt),
        r.rephrase_prompt.as_ref(),
        r.locality_prompt.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let n = tok.encode_prompt(p)?.len();
        if n > limit {
            return Err(Error::BadRequest(format!(
                "a prompt of {n} tokens is longer than the {limit} the llama.cpp check takes (pass --no-check to skip it): {:.60}…",
                p
            )));
        }
    }
    Ok(())
}

/// What one request did.
#[derive(Debug, Clone, Serialize)]
pub struct EditSummary {
    /// The prompt.
    pub prompt: String,
    /// The new target.
    pub target: String,
    /// First token id of " " + target.
    pub target_id: u32,
    /// The top-1 token before the edit, as text.
    pub top1_before: String,
    /// True when the target already was the top-1 and nothing was written for it.
    pub skipped: bool,
    /// The optimising methods' loss per step (rome).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimisation: Option<crate::edit::value::Optimisation>,
}

/// The result of [`run`].
#[derive(Debug, Clone, Serialize)]
pub struct PatchReport {
    /// The committed output.
    pub output: PathBuf,
    /// Its format.
    pub format: Format,
    /// Method, layer and step.
    pub settings: EditSettings,
    /// One entry per request.
    pub edits: Vec<EditSummary>,
    /// The llama.cpp before/after check, when run.
    pub check: Option<Check>,
}

/// Computes, writes, checks and commits: the whole `edit` command. `claim` is taken by the
/// caller before any work, so that a bad output path fails first.
pub fn run(
    source: &ModelSource,
    tok: &Tokenizer,
    job: &Job,
    claim: OutputClaim,
) -> Result<PatchReport> {
    run_with(source, Some(tok), job, claim)
}

/// [`run`] on a model opened without its tokenizer, what `edit` does: the tokenizer is built
/// while llama.cpp loads the tracer on another thread (shift through llama.cpp), so that the
/// two loads overlap.
pub fn run_building_tokenizer(
    source: &ModelSource,
    job: &Job,
    claim: OutputClaim,
) -> Result<PatchReport> {
    run_with(source, None, job, claim)
}

/// [`run`] with the tokenizer `given`, or built from `source` beside the tracer's load.
fn run_with(
    source: &ModelSource,
    given: Option<&Tokenizer>,
    job: &Job,
    claim: OutputClaim,
) -> Result<PatchReport> {
    job.format.check_input(source)?;
    job.settings.check(n_layer(source)?)?;
    edit::request::refuse_conflicts(&job.requests)?;
    for r in &job.requests {
        r.validate()?;
    }
    if job.forward == Forward::Candle {
        // Cheap checks first, so that a model candle cannot run fails before any hashing.
        source.hparams()?;
    }
    let traced = match (source, job.settings.method, job.forward) {
        (ModelSource::Gguf(g), Method::Shift, Forward::Llama) => Some(g),
        _ => None,
    };
    // A llama.cpp forward keeps its tracer for the check: one load of the base per run.
    let (mut tracer, mut built) = (None, None);
    let (outcomes, base_sha256) = std::thread::scope(|s| -> Result<_> {
        let build = || Tokenizer::from_source(source).map_err(|e| e.in_file(source.path()));
        let building = given.is_none().then(|| s.spawn(build));
        // llama.cpp loads the tracer on this thread while the tokenizer is built on another.
        let loaded = traced.map(|g| traced_for(g, &job.settings));
        let tok = match (given, building) {
            (Some(t), _) => t,
            (None, Some(b)) => {
                &*built.insert(b.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?)
            }
            (None, None) => unreachable!("a tokenizer is given or being built"),
        };
        if job.check && job.format != Format::Safetensors {
            for r in &job.requests {
                check_fits_session(tok, r)?;
            }
        }
        // The base's hash (provenance of a GGUF output) reads the whole file unless its cache
        // entry holds it: it runs on a thread of its own beside the load and the forward.
        let hash = match source {
            ModelSource::Gguf(g) => Some(s.spawn(|| crate::base_hash::base_sha256(g))),
            ModelSource::Hf(_) => None,
        };
        let outcomes = match loaded {
            Some(l) => l.and_then(|t| {
                let t = tracer.insert(t);
                compute_on(t, source, tok, &job.requests, &job.settings)
            }),
            None => compute(
                source,
                tok,
                &job.requests,
                &job.settings,
                &job.whiten,
                job.forward,
                job.threads,
            ),
        };
        let hash = hash.map(|h| h.join().expect("hashing a mapped file does not panic"));
        Ok((outcomes, hash))
    })?;
    let tok = given
        .or(built.as_ref())
        .expect("a tokenizer given or built");
    let outcomes = outcomes?;
    // The tracer checks a LoRA output (whose check needs the base loaded anyway); for a
    // patched GGUF it takes the check's base probes, then is freed before the file is written,
    // so that the write and the patched file's load never hold the base's pages as well.
    let before = match (job.check, job.format, tracer.as_mut()) {
        (true, Format::Gguf, Some(t)) => Some(base_probes(t, tok, &job.requests)?),
        _ => None,
    };
    if !(job.check && job.format == Format::Lora) {
        tracer = None;
    }
    let deltas: Vec<Delta> = outcomes.iter().flat_map(|o| o.deltas().cloned()).collect();
    if deltas.is_empty() {
        return Err(Error::Invalid(
            "every target is already the model's top-1 continuation: nothing to edit, no file written"
                .into(),
        ));
    }
    for d in &deltas {
        d.check_finite()?;
    }
    let prov = base_sha256.map(|h| provenance(&job.settings, &outcomes, &job.whiten, h));
    let output = claim.target().to_path_buf();
    let staged = stage(
        source,
        &deltas,
        job.format,
        job.ff2_type,
        prov.as_ref(),
        claim,
    )?;
    let check = match (job.check, job.format, tracer.take()) {
        (true, Format::Lora, Some(t)) => {
            Some(check_adapter_on(t, source, tok, &staged, &job.requests)?)
        }
        (true, Format::Gguf | Format::Lora, _) => Some(check_after(
            source,
            tok,
            &staged,
            job.format,
            &job.requests,
            before,
        )?),
        _ => None,
    };
    staged.commit()?;
    Ok(PatchReport {
        output,
        format: job.format,
        settings: job.settings,
        edits: outcomes
            .iter()
            .map(|o| EditSummary {
                prompt: o.request.prompt.clone(),
                target: o.request.target_new.clone(),
                target_id: o.target_id,
                top1_before: tok.token_text(o.top1_before),
                skipped: o.delta.is_none(),
                optimisation: o.optimisation.clone(),
            })
            .collect(),
        check,
    })
}
