//! The smallest step per layer that makes an edit succeed in llama.cpp (the paper's Figure 26),
//! for forward-pass shifting (ΔW = s·e xᵀ) and for one SGD step on FF2 (ΔW = −s·Σₜ δₜaₜᵀ).
//! Each layer's change at s = 1 is written once as a LoRA adapter, which llama.cpp applies at
//! scale s (y = Wx + s·B(Ax): the same ΔW as an adapter with s baked in); the edit succeeds
//! when the target's first token is llama.cpp's unique top-1 after the prompt. The step is
//! bracketed upwards on s = 4^k (k = −10..=10; the first success) and bisected in log space
//! until the succeeding step is within [`STEP_RATIO`] of the failing one below it.

use crate::edit::{grad, shift, Delta, EditRequest};
use crate::lens::backward_pass;
use crate::model::Transformer;
use crate::numeric::argmax;
use crate::patch;
use crate::runtime::{LlamaRuntime, Session};
use crate::tokenizer::Tokenizer;
use crate::write::{OutputClaim, OutputKind};
use crate::{Error, Result};
use llama_cpp_2::model::LlamaLoraAdapter;
use serde::Serialize;
use std::ops::Range;
use std::path::Path;

/// Exponents k of the bracket's steps 4^k, smallest first.
const SCAN: std::ops::RangeInclusive<i32> = -10..=10;
/// Ratio between neighbouring steps of the bracket.
const SCAN_BASE: f64 = 4.0;
/// The bisection stops when the succeeding step is at most this ratio above the failing one.
pub const STEP_RATIO: f64 = 1.01;

/// The two edits whose step is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepMethod {
    /// Forward-pass shifting: ΔW = s·e xᵀ.
    Shift,
    /// One SGD step on FF2: ΔW = −s·Σₜ δₜaₜᵀ.
    Grad,
}

impl StepMethod {
    fn name(self) -> &'static str {
        match self {
            StepMethod::Shift => "shift",
            StepMethod::Grad => "grad",
        }
    }
}

/// The search of one method at one layer.
#[derive(Debug, Clone, Serialize)]
pub struct StepSearch {
    /// Smallest step found that makes the target llama.cpp's top-1 (None: no step of the
    /// bracket does).
    pub step: Option<f64>,
    /// Largest step checked below `step` that does not (None when the bracket's first step
    /// already succeeds, or when none succeeds).
    pub below: Option<f64>,
    /// Target logit minus the largest other logit at `step`, through llama.cpp.
    pub margin: Option<f64>,
    /// llama.cpp decodes the search took.
    pub checks: usize,
}

/// Both searches at one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSteps {
    /// Layer index.
    pub layer: usize,
    /// Forward-pass shifting.
    pub shift: StepSearch,
    /// One SGD step.
    pub grad: StepSearch,
}

/// The `lens --min-step` report.
#[derive(Debug, Clone, Serialize)]
pub struct MinStepReport {
    /// Prompt text.
    pub prompt: String,
    /// Target as tokenized (with its leading space).
    pub target: String,
    /// First target token id, the one that must become top-1.
    pub target_id: u32,
    /// llama.cpp's top-1 after the prompt before any edit.
    pub answer: String,
    /// Smallest and largest step of the bracket.
    pub bracket: (f64, f64),
    /// The bisection's stopping ratio.
    pub ratio: f64,
    /// One entry per searched layer.
    pub layers: Vec<LayerSteps>,
}

/// Target logit minus the largest other logit.
fn target_margin(logits: &[f32], target: u32) -> f64 {
    let other = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != target as usize)
        .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
    (logits[target as usize] - other) as f64
}

/// Margin of the target after `prompt` with `adapter` applied at `step`.
fn margin_at(
    s: &mut Session,
    adapter: &mut LlamaLoraAdapter,
    step: f64,
    prompt: &[u32],
    target: u32,
) -> Result<f64> {
    s.set_lora(adapter, step as f32)?;
    Ok(target_margin(&s.logits_last(prompt)?, target))
}

/// Bracket and bisection of one unit change (loaded as `adapter`) in a fresh session.
fn search(
    rt: &LlamaRuntime,
    adapter: &mut LlamaLoraAdapter,
    prompt: &[u32],
    target: u32,
) -> Result<StepSearch> {
    let mut s = rt.session()?;
    let mut checks = 0;
    let mut check = |step: f64| -> Result<f64> {
        checks += 1;
        margin_at(&mut s, adapter, step, prompt, target)
    };
    let mut below = None;
    let mut found = None;
    for k in SCAN {
        let step = SCAN_BASE.powi(k);
        let m = check(step)?;
        if m > 0.0 {
            found = Some((step, m));
            break;
        }
        below = Some(step);
    }
    let Some((mut hi, mut margin)) = found else {
        return Ok(StepSearch {
            step: None,
            below: None,
            margin: None,
            checks,
        });
    };
    if let Some(mut lo) = below {
        while hi > lo * STEP_RATIO {
            let mid = (lo * hi).sqrt();
            let m = check(mid)?;
            match m > 0.0 {
                true => (hi, margin) = (mid, m),
                false => lo = mid,
            }
        }
        below = Some(lo);
    }
    Ok(StepSearch {
        step: Some(hi),
        below,
        margin: Some(margin),
        checks,
    })
}

/// Writes `delta` as an F32 adapter in `scratch` and loads it into llama.cpp (the staged file
/// is removed once loaded).
fn load_adapter(
    rt: &mut LlamaRuntime,
    arch: &str,
    delta: &Delta,
    scratch: &Path,
    tag: &str,
) -> Result<LlamaLoraAdapter> {
    let name = format!("min-step-{}-{tag}.gguf", std::process::id());
    let claim = OutputClaim::new(&scratch.join(name), OutputKind::File, &[], false)?;
    let staged = patch::stage_adapter(arch, std::slice::from_ref(delta), claim)?;
    rt.load_lora(staged.path())
}

/// The change of `method` at `layer` for step 1: FPS with the key at the last prompt token,
/// or the SGD step on the loss of the target's first token.
pub fn unit_delta(
    bp: &crate::lens::BackwardPass,
    e: &[f32],
    method: StepMethod,
    layer: usize,
) -> Result<Delta> {
    match method {
        StepMethod::Shift => {
            let x = bp.trace.ff2_in[layer]
                .get(bp.prompt_len - 1)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            Ok(shift::fps_delta(layer, 1.0, e, x))
        }
        StepMethod::Grad => grad::step(bp, layer, 1.0),
    }
}

/// The smallest step of both methods at each of `layers` for `req` on the GGUF `gguf` (loaded
/// in candle as `model`, which computes the changes); adapters are staged in `scratch`.
/// `progress` is called after each layer. Refused when the target already is llama.cpp's
/// top-1 (every step would succeed).
pub fn min_steps(
    gguf: &Path,
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layers: Range<usize>,
    scratch: &Path,
    mut progress: impl FnMut(usize),
) -> Result<MinStepReport> {
    let n_layer = model.hp.n_layer;
    if layers.is_empty() || layers.end > n_layer {
        return Err(Error::LayerOutOfRange {
            layer: layers.end.max(1) - 1,
            n_layer,
        });
    }
    if req.target_new.trim().is_empty() {
        return Err(Error::BadRequest("the target is empty".into()));
    }
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target_ids = tok.encode_target(&req.target_new)?;
    let bp = backward_pass(model, &prompt, &target_ids, false)?;
    let target = target_ids[0];
    let e = shift::embedding(model, target)?;
    let mut rt = LlamaRuntime::load(gguf)?;
    let answer = argmax(&rt.session()?.logits_last(&prompt)?) as u32;
    if answer == target {
        return Err(Error::BadRequest(format!(
            "{:?}: the target {:?} already is llama.cpp's top-1 after the prompt (every step succeeds)",
            req.prompt,
            tok.token_text(target)
        )));
    }
    let arch = model.hp.arch.name();
    let mut out = Vec::new();
    for layer in layers {
        let mut one = |method: StepMethod| -> Result<StepSearch> {
            let delta = unit_delta(&bp, &e, method, layer)?;
            let tag = format!("{layer}-{}", method.name());
            let mut adapter = load_adapter(&mut rt, arch, &delta, scratch, &tag)?;
            search(&rt, &mut adapter, &prompt, target)
        };
        out.push(LayerSteps {
            layer,
            shift: one(StepMethod::Shift)?,
            grad: one(StepMethod::Grad)?,
        });
        progress(layer);
    }
    Ok(MinStepReport {
        prompt: req.prompt.clone(),
        target: tok.decode(&target_ids),
        target_id: target,
        answer: tok.token_text(answer),
        bracket: (SCAN_BASE.powi(*SCAN.start()), SCAN_BASE.powi(*SCAN.end())),
        ratio: STEP_RATIO,
        layers: out,
    })
}

/// log10 of the minimal step of each method against the layer (a gap where none was found).
pub fn svg(r: &MinStepReport) -> String {
    let series = |name: &str, f: fn(&LayerSteps) -> &StepSearch| {
        let points = r
            .layers
            .iter()
            .map(|l| (l.layer as f64, f(l).step.map_or(f64::NAN, f64::log10)))
            .collect();
        (name.to_string(), points)
    };
    let title = format!("log10 minimal step: {:?} -> {:?}", r.prompt, r.target);
    crate::report::line_plot_svg(
        &title,
        "layer",
        &[
            series("FPS (shift)", |l| &l.shift),
            series("SGD step (grad)", |l| &l.grad),
        ],
    )
}
