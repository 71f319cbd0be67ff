//! The value optimisation ROME and MEMIT share: a vector δ added to the residual stream right
//! after block `layer` at the subject's last token (for ROME this is FF2's output of that
//! layer, since the block adds FF2's output to the stream), found by Adam on
//!
//! ```text
//! L(δ) = mean over prompts c and target tokens t of −log p(t | c; δ)
//!      + kl_factor · KL(p(· | "{subject} is a"; δ) ‖ p(· | "{subject} is a"; 0))
//!      + v_weight_decay · ‖δ‖ / ‖v₀‖²,
//! ```
//!
//! over the prompt and the prompt behind each context prefix, with ‖δ‖ ≤ clamp · ‖v₀‖ after
//! every step (v₀ = the original vector at the subject's last token of the bare prompt). The
//! blocks up to `layer` do not depend on δ: they run once per prompt. Nor do the rows before
//! the subject's last token at any block: their keys and values are computed once, and each
//! step runs only the later rows through the blocks after `layer`, and the logits of the
//! scored rows.

use super::hparams::RomeParams;
use super::EditRequest;
use crate::model::{log_softmax_last, PastRows, Transformer};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

/// Which vector δ is measured against (v₀ for the decay and the clamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// FF2's output at the layer (ROME).
    Ff2Out,
    /// The residual stream after the layer (MEMIT).
    Residual,
}

/// One step of the optimisation: the loss and its terms at the δ of that step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossStep {
    /// The whole loss.
    pub loss: f64,
    /// Mean −log p(target token) over the rewriting prompts.
    pub nll: f64,
    /// The weighted KL term.
    pub kl: f64,
    /// The weighted decay term.
    pub decay: f64,
    /// Mean p(target token) over the rewriting prompts.
    pub p_target: f64,
}

/// What the optimisation found, with what the key side of an edit needs.
#[derive(Debug, Clone, Serialize)]
pub struct Optimisation {
    /// Layer after which δ is added.
    pub layer: usize,
    /// The loss of each step, first (δ = 0) to last (the returned δ).
    pub steps: Vec<LossStep>,
    /// ‖δ‖ (ft: ‖ΔW‖∞, the largest entry).
    pub delta_norm: f64,
    /// ‖v₀‖ (ft: 0).
    pub reference_norm: f64,
    /// δ.
    #[serde(skip)]
    pub delta: Vec<f32>,
    /// FF2's input at `layer` at the subject's last token, one per rewriting prompt (the bare
    /// prompt first).
    #[serde(skip)]
    pub keys: Vec<Vec<f32>>,
}

impl Optimisation {
    /// Whether the loss went down from the first step to the last.
    pub fn converged(&self) -> bool {
        match (self.steps.first(), self.steps.last()) {
            (Some(a), Some(b)) => self.steps.len() > 1 && b.loss < a.loss,
            _ => false,
        }
    }
}

/// Index of the subject's last token in `encode_prompt(text)`, where `text` contains `subject`
/// (its first occurrence).
pub fn subject_last(tok: &Tokenizer, text: &str, subject: &str) -> Result<usize> {
    let at = text
        .find(subject)
        .filter(|_| !subject.is_empty())
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "the subject {subject:?} does not occur in {text:?} (rome, memit and ft need it)"
            ))
        })?;
    let ids = tok.encode_prompt(&text[..at + subject.len()])?;
    Ok(ids.len().saturating_sub(1))
}

/// The request's subject, required by the subject-keyed methods.
pub fn subject_of(req: &EditRequest) -> Result<&str> {
    req.subject
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "the request {:?} names no subject (rome and memit key the edit on it; give --subject or a \"subject\" field)",
                req.prompt
            ))
        })
}

/// One prompt of the optimisation, with its fixed part computed.
struct Prepared {
    /// Residual stream after block `layer` without δ.
    h: Tensor,
    /// Row where δ is added (the subject's last token).
    at: usize,
    /// Scored rows and the token each should predict (empty for the KL prompt).
    scored: Vec<(usize, u32)>,
}

fn prepare(
    model: &Transformer,
    tok: &Tokenizer,
    text: &str,
    subject: &str,
    target: &[u32],
    layer: usize,
) -> Result<(Prepared, crate::model::Trace)> {
    let prompt = tok.encode_prompt(text)?;
    let at = subject_last(tok, text, subject)?;
    let mut ids = prompt.clone();
    ids.extend_from_slice(&target[..target.len().saturating_sub(1)]);
    let (h, trace) = model.resid_after(&ids, layer)?;
    let scored = match target.is_empty() {
        true => vec![(prompt.len() - 1, 0)],
        false => (0..target.len())
            .map(|i| (prompt.len() - 1 + i, target[i]))
            .collect(),
    };
    Ok((Prepared { h, at, scored }, trace))
}

/// Every prompt packed into one sequence, split at each prompt's subject row: the rows before
/// it do not depend on δ at any block after `layer`, so their keys and values are computed once
/// ([`Transformer::past_rows`]) and each step runs only the rows from the subject row on.
struct Packed {
    /// The residual streams after block `layer` from each prompt's subject row on, one prompt
    /// after another.
    h: Tensor,
    /// (rows, 1): 1 at each prompt's subject row (its first row in `h`), where δ is added.
    hot: Tensor,
    /// Keys and values of the rows before each prompt's subject row.
    past: PastRows,
    /// Rows of each prompt in `h`.
    counts: Vec<usize>,
    /// Scored rows (in `h`) of the rewriting prompts, then the KL prompt's row.
    rows: Vec<usize>,
    /// The token each rewriting row should predict.
    targets: Vec<u32>,
}

fn pack(
    model: &Transformer,
    layer: usize,
    rewriting: &[Prepared],
    kl: &Prepared,
) -> Result<Packed> {
    let all: Vec<&Prepared> = rewriting.iter().chain(std::iter::once(kl)).collect();
    let (mut past_h, mut h, mut past, mut counts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut hot, mut rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, p) in all.iter().enumerate() {
        let len = p.h.dim(0)?;
        past_h.push(p.h.narrow(0, 0, p.at)?);
        h.push(p.h.narrow(0, p.at, len - p.at)?);
        let offset = hot.len();
        hot.push(1f32);
        hot.extend(std::iter::repeat_n(0f32, len - p.at - 1));
        for &(row, t) in &p.scored {
            rows.push(offset + row - p.at);
            if i < rewriting.len() {
                targets.push(t);
            }
        }
        past.push(p.at);
        counts.push(len - p.at);
    }
    let h = Tensor::cat(&h, 0)?;
    let past = model.past_rows(&Tensor::cat(&past_h, 0)?, layer + 1, &past)?;
    let n = hot.len();
    Ok(Packed {
        hot: Tensor::from_vec(hot, (n, 1), &Device::Cpu)?.to_dtype(h.dtype())?,
        h,
        past,
        counts,
        rows,
        targets,
    })
}

fn row_f32(t: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(t.narrow(0, row, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// Runs the optimisation of δ after block `layer` for `req` (the model is not changed).
pub fn optimise(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    reference: Reference,
    clamp_norm_factor: f64,
    p: &RomeParams,
) -> Result<Optimisation> {
    let subject = subject_of(req)?;
    let target = tok.encode_target(&req.target_new)?;
    if target.is_empty() {
        return Err(Error::BadRequest("the target tokenizes to nothing".into()));
    }
    let mut rewriting = Vec::with_capacity(p.context_prefixes.len() + 1);
    let mut keys = Vec::with_capacity(rewriting.capacity());
    let mut reference_vec = Vec::new();
    for prefix in std::iter::once("").chain(p.context_prefixes.iter().map(String::as_str)) {
        let text = format!("{prefix}{}", req.prompt);
        let (prep, trace) = prepare(model, tok, &text, subject, &target, layer)?;
        keys.push(row_f32(&trace.ff2_in[layer], prep.at)?);
        if reference_vec.is_empty() {
            reference_vec = match reference {
                Reference::Ff2Out => row_f32(&trace.ff2_out[layer], prep.at)?,
                Reference::Residual => row_f32(&prep.h, prep.at)?,
            };
        }
        rewriting.push(prep);
    }
    let kl_text = p.kl_prompt.replace("{}", subject);
    let (kl, _) = prepare(model, tok, &kl_text, subject, &[], layer)?;
    let ref_norm = norm(&reference_vec);
    if !(ref_norm.is_finite() && ref_norm > 0.0) {
        return Err(Error::Numeric(format!(
            "value optimisation at layer {layer}: the reference vector has norm {ref_norm}"
        )));
    }
    let n_embd = model.hp.n_embd;
    let packed = pack(model, layer, &rewriting, &kl)?;
    let n_scored = packed.targets.len();
    let mut delta = vec![0f64; n_embd];
    let mut adam = Adam::new(n_embd, p.v_lr);
    let mut kl_init: Option<Tensor> = None;
    let mut steps = Vec::new();
    for it in 0..p.v_num_grad_steps {
        let dv = Var::from_tensor(
            &Tensor::from_vec(
                delta.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
                (1, n_embd),
                &Device::Cpu,
            )?
            .to_dtype(model.dtype())?,
        )?;
        let h = (&packed.h + packed.hot.matmul(dv.as_tensor())?)?;
        let logp = log_softmax_last(&model.forward_after(
            &h,
            &packed.past,
            &packed.counts,
            &packed.rows,
        )?)?;
        let ids: Vec<u32> = packed.targets.clone();
        let picked = logp
            .narrow(0, 0, n_scored)?
            .gather(&Tensor::from_vec(ids, (n_scored, 1), &Device::Cpu)?, 1)?;
        let nll = (picked.sum_all()?.neg()? / n_scored as f64)?;
        let p_mean = picked
            .exp()?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        let lp = logp.narrow(0, n_scored, 1)?;
        let init = kl_init.get_or_insert_with(|| lp.detach()).clone();
        let kl_term = ((lp.exp()? * (&lp - init)?)?.sum_all()? * p.kl_factor)?;
        let total = (&nll + &kl_term)?;
        let dn = norm(&delta);
        let decay = p.v_weight_decay * dn / (ref_norm * ref_norm);
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let step = LossStep {
            nll: scalar(&nll)?,
            kl: scalar(&kl_term)?,
            decay,
            loss: scalar(&total)? + decay,
            p_target: p_mean,
        };
        if !step.loss.is_finite() {
            return Err(Error::Numeric(format!(
                "value optimisation at layer {layer}: the loss is {} at step {it}",
                step.loss
            )));
        }
        steps.push(step);
        if step.loss < p.early_stop_loss || it + 1 == p.v_num_grad_steps {
            break;
        }
        let grads = total.backward()?;
        let g = grads
            .get(dv.as_tensor())
            .ok_or_else(|| Error::Invalid("no gradient reached the value shift".into()))?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        // The decay's gradient, analytic (‖δ‖ has none at δ = 0).
        let g: Vec<f64> = match dn > 0.0 {
            true => g
                .iter()
                .zip(&delta)
                .map(|(g, d)| g + p.v_weight_decay * d / (dn * ref_norm * ref_norm))
                .collect(),
            false => g,
        };
        adam.step(&mut delta, &g);
        let max = clamp_norm_factor * ref_norm;
        let dn = norm(&delta);
        if dn > max {
            delta.iter_mut().for_each(|v| *v *= max / dn);
        }
    }
    Ok(Optimisation {
        layer,
        steps,
        delta_norm: norm(&delta),
        reference_norm: ref_norm,
        delta: delta.iter().map(|&v| v as f32).collect(),
        keys,
    })
}

fn norm<T: Copy + Into<f64>>(v: &[T]) -> f64 {
    v.iter().map(|&x| x.into() * x.into()).sum::<f64>().sqrt()
}

/// Adam (β₁ 0.9, β₂ 0.999, ε 1e-8, as torch's defaults) on a vector.
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    fn new(n: usize, lr: f64) -> Adam {
        Adam {
            lr,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    fn step(&mut self, x: &mut [f64], g: &[f64]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        for i in 0..x.len() {
            self.m[i] = B1 * self.m[i] + (1.0 - B1) * g[i];
            self.v[i] = B2 * self.v[i] + (1.0 - B2) * g[i] * g[i];
            x[i] -= self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}
