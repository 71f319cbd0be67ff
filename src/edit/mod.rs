//! Edits to FF2 (the down projection): forward-pass shifting ([`shift`]), FPS with a whitened
//! key ([`whiten`]) and a one-step gradient edit ([`grad`]). Computing an edit ([`Delta`]) is
//! kept apart from applying or writing it.

pub mod batch;
pub mod ft;
pub mod grad;
pub mod hparams;
pub mod memit;
pub mod minimal;
pub mod protected;
pub mod request;
pub mod rome;
pub mod shift;
pub mod value;
pub mod whiten;

use crate::model::Transformer;
use crate::Result;
use serde::Serialize;

pub use crate::delta::Delta;
pub use request::EditRequest;

/// Which edit method to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Forward-pass shifting: W += lr · e(target) xᵀ (no backward pass).
    Shift,
    /// FPS with a ROME-style whitened key: W += lr·‖x‖² · e kᵀ, k = C⁻¹x / (xᵀC⁻¹x), C = second
    /// moment of FF2 inputs over generic text plus the prompt's with its subject swapped for
    /// made-up ones: the same write as shift at x, much less elsewhere (module edit::whiten).
    #[serde(rename = "shift-whitened")]
    ShiftWhitened,
    /// One SGD step on the target's NLL: W -= lr · Σₜ δₜ aₜᵀ.
    Grad,
    /// All requests solved jointly (MEMIT-style least squares in the metric of the FF2-input
    /// statistics): each key gets the write plain FPS would give it, everything else as little
    /// as possible (module edit::batch).
    Batch,
    /// Sequential edits that keep earlier edits' and generic text's outputs: the batch solve
    /// updated one request at a time, ending where it would (module edit::protected).
    #[serde(rename = "shift-protected")]
    ShiftProtected,
    /// ROME: a rank-one update mapping the subject's mean key k* to a value found by gradient
    /// descent, least change in the metric of the FF2-input second moment (module edit::rome).
    Rome,
    /// Constrained fine-tuning of one FF2 matrix: a few gradient steps, every entry of ΔW within
    /// ±ε (ROME's FT-L baseline; module edit::ft).
    Ft,
    /// MEMIT: ROME's value at the edited layer spread over FF2 of the layers below it, all
    /// requests solved jointly (module edit::memit).
    Memit,
}

/// Layer and step of an edit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EditSettings {
    /// Method.
    pub method: Method,
    /// Edited layer.
    pub layer: usize,
    /// Step size.
    pub lr: f64,
}

impl EditSettings {
    /// Fails for a layer outside the model or a step that is not a positive number.
    pub fn check(&self, n_layer: usize) -> Result<()> {
        if self.layer >= n_layer {
            return Err(crate::Error::LayerOutOfRange {
                layer: self.layer,
                n_layer,
            });
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(crate::Error::Invalid(format!(
                "lr must be a positive number, got {}",
                self.lr
            )));
        }
        Ok(())
    }

    /// The paper's defaults scaled to the model depth: layer round(0.73 · n_layer) (35 of 48 in
    /// GPT-2 XL), lr 0.24.
    pub fn default_layer(n_layer: usize) -> usize {
        ((0.73 * n_layer as f64).round() as usize).min(n_layer - 1)
    }
}

/// The result of computing one edit.
#[derive(Debug, Clone, Serialize)]
pub struct EditOutcome {
    /// The request.
    pub request: EditRequest,
    /// First token of " " + target.
    pub target_id: u32,
    /// The model's top-1 next token before the edit.
    pub top1_before: u32,
    /// The change, or None when skipped.
    pub delta: Option<Delta>,
    /// The value optimisation of an optimising method (its loss per step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimisation: Option<value::Optimisation>,
    /// A multi-layer method's changes of the other layers (memit: the layers below `delta`'s).
    #[serde(skip)]
    pub extra: Vec<Delta>,
}

impl EditOutcome {
    fn skipped(req: &EditRequest, target_id: u32, top1: u32) -> EditOutcome {
        EditOutcome {
            request: req.clone(),
            target_id,
            top1_before: top1,
            delta: None,
            optimisation: None,
            extra: Vec::new(),
        }
    }

    fn edited(req: &EditRequest, target_id: u32, top1: u32, delta: Delta) -> EditOutcome {
        EditOutcome {
            request: req.clone(),
            target_id,
            top1_before: top1,
            delta: Some(delta),
            optimisation: None,
            extra: Vec::new(),
        }
    }

    /// Every change of the edit: `delta`, then `extra`.
    pub fn deltas(&self) -> impl Iterator<Item = &Delta> {
        self.delta.iter().chain(&self.extra)
    }
}

fn first_target_token(tok: &crate::tokenizer::Tokenizer, req: &EditRequest) -> Result<u32> {
    tok.encode_target(&req.target_new)?
        .first()
        .copied()
        .ok_or_else(|| crate::Error::BadRequest("the target tokenizes to nothing".into()))
}

impl Method {
    /// Whether the method needs key statistics in its [`EditContext`].
    pub fn needs_stats(self) -> bool {
        matches!(
            self,
            Method::ShiftWhitened
                | Method::Batch
                | Method::ShiftProtected
                | Method::Rome
                | Method::Memit
        )
    }

    /// Whether the method optimises a value through candle's backward (rome, ft, memit): its
    /// defaults come from the family's hyperparameter file.
    pub fn optimises(self) -> bool {
        matches!(self, Method::Rome | Method::Ft | Method::Memit)
    }

    /// The method's default layer for the model: round(0.73 · n_layer) for the FPS family
    /// ([`EditSettings::default_layer`]), the family's hyperparameter file for the optimising
    /// methods ([`hparams::MethodParams`]).
    pub fn default_layer(self, hp: &crate::arch::HParams) -> Result<usize> {
        Ok(match self {
            Method::Rome | Method::Ft | Method::Memit => {
                hparams::MethodParams::for_arch(hp.arch)?.default_layer(hp.n_layer)
            }
            _ => EditSettings::default_layer(hp.n_layer),
        })
    }
}

crate::named_enum!(Method, "method", [
    Shift => "shift",
    ShiftWhitened => "shift-whitened",
    Grad => "grad",
    Batch => "batch",
    ShiftProtected => "shift-protected",
    Rome => "rome",
    Ft => "ft",
    Memit => "memit",
]);

/// What an edit may need besides the model and the request.
#[derive(Clone, Copy, Default)]
pub struct EditContext<'a> {
    /// Key statistics of the unedited model (required by [`Method::needs_stats`] methods).
    pub stats: Option<&'a whiten::StatsStore>,
    /// The value each key receives in [`Method::Batch`] and [`Method::ShiftProtected`].
    pub value: minimal::ValueRule,
    /// Ridge and key position of [`Method::Batch`] and [`Method::ShiftProtected`].
    pub joint: batch::JointOptions,
    /// Threads for [`Method::Batch`]'s value searches (None: one per core); the result does not
    /// depend on it.
    pub threads: Option<std::num::NonZeroUsize>,
}

impl EditContext<'_> {
    /// The thread count: [`Self::threads`], or the machine's cores.
    pub fn thread_count(&self) -> usize {
        self.threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, std::num::NonZeroUsize::get)
    }

    /// The key statistics store, which the settings' method needs.
    pub fn store(&self, settings: &EditSettings) -> Result<&whiten::StatsStore> {
        self.stats.ok_or_else(|| {
            crate::Error::Invalid(format!(
                "{} needs key statistics (EditContext::stats)",
                settings.method
            ))
        })
    }

    /// The key statistics at the settings' layer.
    pub fn stats_at(&self, settings: &EditSettings) -> Result<std::sync::Arc<whiten::KeyStats>> {
        self.store(settings)?.get(settings.layer)
    }

    /// The key statistics at the settings' layer under other key options.
    fn stats_with(
        &self,
        settings: &EditSettings,
        options: whiten::WhitenOptions,
    ) -> Result<std::sync::Arc<whiten::KeyStats>> {
        self.store(settings)?.get_with(settings.layer, options)
    }
}

/// Computes one edit with `settings` on the current model (unchanged); for methods without
/// context ([`Method::needs_stats`] false).
pub fn compute(
    model: &Transformer,
    tok: &crate::tokenizer::Tokenizer,
    req: &EditRequest,
    settings: &EditSettings,
) -> Result<EditOutcome> {
    compute_with(model, tok, req, settings, &EditContext::default())
}

/// Computes one edit with `settings` and `ctx` on the current model (unchanged).
pub fn compute_with(
    model: &Transformer,
    tok: &crate::tokenizer::Tokenizer,
    req: &EditRequest,
    settings: &EditSettings,
    ctx: &EditContext,
) -> Result<EditOutcome> {
    settings.check(model.hp.n_layer)?;
    req.validate()?;
    match settings.method {
        Method::Shift => shift::compute(model, tok, req, settings.layer, settings.lr),
        Method::Grad => grad::compute(model, tok, req, settings.layer, settings.lr),
        Method::ShiftWhitened => {
            let stats = ctx.stats_at(settings)?;
            whiten::compute(model, tok, req, settings.layer, settings.lr, &stats)
        }
        Method::Batch => {
            let store = ctx.store(settings)?;
            let reqs = std::slice::from_ref(req);
            let (layer, lr, joint) = (settings.layer, settings.lr, ctx.joint);
            let mut one =
                batch::compute_all(model, tok, reqs, layer, lr, store, joint, ctx.value, 1)?;
            Ok(one.remove(0))
        }
        Method::ShiftProtected => {
            let stats = ctx.stats_at(settings)?;
            protected::Sequence::new(stats, settings.layer, settings.lr, ctx.joint, ctx.value)?
                .step(model, tok, req)
        }
        Method::Rome => {
            let p = hparams::MethodParams::for_arch(model.hp.arch)?.rome;
            let stats = ctx.stats_with(settings, rome::key_options(&p))?;
            rome::compute(model, tok, req, settings.layer, &p, &stats)
        }
        Method::Ft => {
            let p = hparams::MethodParams::for_arch(model.hp.arch)?.ft;
            ft::compute(model, tok, req, settings.layer, &p)
        }
        Method::Memit => {
            let mut one = compute_memit(model, tok, std::slice::from_ref(req), settings, ctx)?;
            Ok(one.remove(0))
        }
    }
}

/// Applies requests in order, each computed on the model already edited by the ones before.
pub fn apply_sequence(
    model: &mut Transformer,
    tok: &crate::tokenizer::Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
) -> Result<Vec<EditOutcome>> {
    apply_sequence_with(model, tok, requests, settings, &EditContext::default())
}

/// [`apply_sequence`] for [`Method::Shift`] without loading the model: each request runs
/// through the streamed forward with the edits before it applied (one block in memory).
pub fn apply_sequence_streamed(
    src: &crate::source::ModelSource,
    tok: &crate::tokenizer::Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
) -> Result<Vec<EditOutcome>> {
    if settings.method != Method::Shift {
        return Err(crate::Error::Invalid(format!(
            "the streamed edit supports shift only, not {}",
            settings.method.name()
        )));
    }
    settings.check(src.hparams()?.n_layer)?;
    apply_in_order(requests, |req, prior| {
        shift::compute_streamed(src, tok, req, settings.layer, settings.lr, prior)
    })
}

/// Computes each request with `step(request, deltas of the requests before it)`, for engines
/// that read the file and so take earlier edits as deltas rather than as an edited model.
pub fn apply_in_order(
    requests: &[EditRequest],
    mut step: impl FnMut(&EditRequest, &[Delta]) -> Result<EditOutcome>,
) -> Result<Vec<EditOutcome>> {
    let mut outcomes: Vec<EditOutcome> = Vec::with_capacity(requests.len());
    for req in requests {
        req.validate()?;
        let prior: Vec<Delta> = outcomes.iter().flat_map(|o| o.deltas().cloned()).collect();
        outcomes.push(step(req, &prior)?);
    }
    Ok(outcomes)
}

/// [`apply_sequence`] with a context (key statistics always come from the unedited model).
/// [`Method::Batch`] solves all requests jointly on the unedited model instead;
/// [`Method::ShiftProtected`] carries its protection from one request to the next.
pub fn apply_sequence_with(
    model: &mut Transformer,
    tok: &crate::tokenizer::Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
    ctx: &EditContext,
) -> Result<Vec<EditOutcome>> {
    if settings.method == Method::Memit {
        settings.check(model.hp.n_layer)?;
        let outcomes = compute_memit(model, tok, requests, settings, ctx)?;
        for d in outcomes.iter().flat_map(EditOutcome::deltas) {
            model.apply_delta(d)?;
        }
        return Ok(outcomes);
    }
    if settings.method == Method::Batch {
        settings.check(model.hp.n_layer)?;
        let store = ctx.store(settings)?;
        let (layer, lr) = (settings.layer, settings.lr);
        let outcomes = batch::compute_all(
            model,
            tok,
            requests,
            layer,
            lr,
            store,
            ctx.joint,
            ctx.value,
            ctx.thread_count(),
        )?;
        for d in outcomes.iter().flat_map(EditOutcome::deltas) {
            model.apply_delta(d)?;
        }
        return Ok(outcomes);
    }
    let mut protection = match settings.method {
        Method::ShiftProtected => {
            settings.check(model.hp.n_layer)?;
            let stats = ctx.stats_at(settings)?;
            let (layer, lr) = (settings.layer, settings.lr);
            Some(protected::Sequence::new(
                stats, layer, lr, ctx.joint, ctx.value,
            )?)
        }
        _ => None,
    };
    let mut outcomes = Vec::with_capacity(requests.len());
    for req in requests {
        let outcome = match &mut protection {
            Some(seq) => {
                req.validate()?;
                seq.step(model, tok, req)?
            }
            None => compute_with(model, tok, req, settings, ctx)?,
        };
        for d in outcome.deltas() {
            model.apply_delta(d)?;
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// MEMIT over `requests` with the context's statistics store.
fn compute_memit(
    model: &Transformer,
    tok: &crate::tokenizer::Tokenizer,
    requests: &[EditRequest],
    settings: &EditSettings,
    ctx: &EditContext,
) -> Result<Vec<EditOutcome>> {
    let store = ctx.store(settings)?;
    let p = hparams::MethodParams::for_arch(model.hp.arch)?;
    memit::compute_all(model, tok, requests, settings.layer, &p, store)
}
