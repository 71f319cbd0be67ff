//! The Backward Lens: one forward and one backward pass, then every layer's FF1 input and FF2
//! gradient projected into the vocabulary through the final norm and the unembedding, with the
//! paper's other readings of the same pass (`views`).

pub mod aggregate;
pub mod dot16;
pub mod project;
pub mod screen;
pub mod stream;
pub mod views;

use crate::model::{log_softmax_last, Probes, Trace, Transformer};
use crate::numeric::argmax;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use project::{pick, project_and_pick, Picked};
use serde::Serialize;
use views::{cosine_matrix, grad_rank, unit_factor, GradRank};

/// Everything one backward pass yields, per layer tensors of shape (tokens, width).
#[derive(Debug)]
pub struct BackwardPass {
    /// Tokens fed to the model (prompt, then the teacher-forced target prefix if any).
    pub tokens: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_len: usize,
    /// Target token ids scored by the loss.
    pub target_ids: Vec<u32>,
    /// L = −Σ log p(target tokens).
    pub loss: f64,
    /// Forward activations.
    pub trace: Trace,
    /// ∂L/∂(FF2 output), model dim.
    pub d2: Vec<Tensor>,
    /// ∂L/∂(FF1 up output), ff dim.
    pub d1_up: Vec<Tensor>,
    /// ∂L/∂(FF1 gate output), ff dim (Llama only).
    pub d1_gate: Vec<Option<Tensor>>,
    /// Logits of every fed position.
    pub logits: Tensor,
    /// All gradients of the pass (weights made variables by the caller included).
    pub grads: candle_core::backprop::GradStore,
}

/// The tokens fed to the model (the prompt, then the teacher-forced target prefix) and the
/// scored target tokens: the first, or all when `full_target`.
fn fed_tokens<'t>(
    prompt: &[u32],
    target: &'t [u32],
    full_target: bool,
) -> Result<(Vec<u32>, &'t [u32])> {
    if prompt.is_empty() {
        return Err(Error::BadRequest("the prompt tokenizes to nothing".into()));
    }
    if target.is_empty() {
        return Err(Error::BadRequest("the target tokenizes to nothing".into()));
    }
    let scored = if full_target { target } else { &target[..1] };
    let mut tokens = prompt.to_vec();
    tokens.extend_from_slice(&scored[..scored.len() - 1]);
    Ok((tokens, scored))
}

/// L = −Σᵢ log p(scoredᵢ) at the positions after the prompt (a scalar tensor).
fn target_loss(logits: &Tensor, prompt_len: usize, scored: &[u32]) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let mut loss: Option<Tensor> = None;
    for (i, &t) in scored.iter().enumerate() {
        let term = logp
            .narrow(0, prompt_len - 1 + i, 1)?
            .narrow(1, t as usize, 1)?
            .sum_all()?
            .neg()?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    loss.ok_or_else(|| Error::BadRequest("the target tokenizes to nothing".into()))
}

/// Runs forward and backward for L = NLL of the target's first token after the prompt, or of
/// every target token (teacher-forced) when `full_target`.
pub fn backward_pass(
    model: &Transformer,
    prompt: &[u32],
    target: &[u32],
    full_target: bool,
) -> Result<BackwardPass> {
    let (tokens, scored) = fed_tokens(prompt, target, full_target)?;
    let probes = Probes::new(&model.hp, tokens.len(), model.dtype())?;
    let (logits, trace) = model.forward(&tokens, Some(&probes))?;
    let loss = target_loss(&logits, prompt.len(), scored)?;
    let grads = loss.backward()?;
    let grad_of = |v: &candle_core::Var| -> Result<Tensor> {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Invalid("no gradient reached a probe".into()))
    };
    let d2 = probes.ff2_out.iter().map(grad_of).collect::<Result<_>>()?;
    let d1_up = probes.ff1_up.iter().map(grad_of).collect::<Result<_>>()?;
    let d1_gate = probes
        .ff1_gate
        .iter()
        .map(|g| g.as_ref().map(grad_of).transpose())
        .collect::<Result<_>>()?;
    Ok(BackwardPass {
        tokens,
        prompt_len: prompt.len(),
        target_ids: scored.to_vec(),
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        trace,
        d2,
        d1_up,
        d1_gate,
        logits,
        grads,
    })
}

/// One scored token of a projection.
#[derive(Debug, Clone, Serialize)]
pub struct TokenScore {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub token: String,
    /// Logit-lens score.
    pub score: f32,
}

/// A vector projected into the vocabulary.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    /// Highest-scoring tokens, best first.
    pub top: Vec<TokenScore>,
    /// Lowest-scoring tokens, lowest first.
    pub bottom: Vec<TokenScore>,
    /// Rank of the target token (0 = top-1).
    pub target_rank: usize,
    /// Rank of the model's own answer (its top-1 after the prompt), in lens reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_rank: Option<usize>,
}

/// Projects rows of `vectors` (n, n_embd) into the vocabulary: final norm (unless `use_norm` is
/// false) then the unembedding. Returns the score rows as f32.
pub fn project_rows(
    model: &Transformer,
    vectors: &Tensor,
    use_norm: bool,
) -> Result<Vec<Vec<f32>>> {
    let v = vectors.to_dtype(model.dtype())?;
    let scores = if use_norm {
        model.unembed(&v)?
    } else {
        v.matmul(&model.output.t()?)?
    };
    Ok(scores.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Top-k, bottom-k and the target's rank of one score row (ties by lower id at the top and by
/// higher id at the bottom).
pub fn summarize(scores: &[f32], target: u32, k: usize, tok: &Tokenizer) -> Result<Projection> {
    let p = pick(scores, 1.0, k, &[target])?;
    Ok(Projection::new(&p, 1.0, tok, false))
}

impl Projection {
    /// Token texts for a [`Picked`] whose ranks are (target, answer); scores times `scale`.
    fn new(p: &Picked, scale: f64, tok: &Tokenizer, with_answer: bool) -> Projection {
        let list = |l: &[(u32, f32)]| -> Vec<TokenScore> {
            l.iter()
                .map(|&(id, score)| TokenScore {
                    id,
                    token: tok.token_text(id),
                    score: (score as f64 * scale) as f32,
                })
                .collect()
        };
        Projection {
            top: list(&p.top),
            bottom: list(&p.bottom),
            target_rank: p.ranks[0],
            answer_rank: match with_answer {
                true => p.ranks.get(1).copied(),
                false => None,
            },
        }
    }
}

/// Options of a lens run.
#[derive(Debug, Clone)]
pub struct LensOptions {
    /// Layers to report (start..end).
    pub layers: std::ops::Range<usize>,
    /// Tokens per top/bottom list.
    pub k: usize,
    /// Report every prompt position, or only the last.
    pub all_positions: bool,
    /// Apply the final norm before the unembedding.
    pub use_norm: bool,
    /// Teacher-forced loss over every target token.
    pub full_target: bool,
    /// Also the normalised lens: x1 and −δ scaled to unit length before the projection.
    pub unit: bool,
}

/// The lens at one layer and prompt position.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Prompt position.
    pub pos: usize,
    /// FF1 input x1 projected.
    pub x1: Projection,
    /// −δ (FF2 output gradient, the direction a descent step writes) projected.
    pub neg_d2: Projection,
    /// +δ projected.
    pub pos_d2: Projection,
    /// x1/‖x1‖ projected (the normalised lens, with [`LensOptions::unit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x1_unit: Option<Projection>,
    /// −δ/‖δ‖ projected (with [`LensOptions::unit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neg_d2_unit: Option<Projection>,
    /// ‖x1‖.
    pub norm_x1: f32,
    /// ‖δ‖.
    pub norm_d2: f32,
    /// ‖a‖ (FF2 input).
    pub norm_a: f32,
    /// ‖δ‖·‖a‖, the Frobenius norm of this token's rank-one FF2 gradient δ aᵀ.
    pub grad_norm: f32,
}

/// The lens of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerLens {
    /// Layer index.
    pub layer: usize,
    /// One cell per reported position.
    pub cells: Vec<Cell>,
    /// Rank and singular values of this layer's FF2 gradient over every fed token.
    pub grad_rank: GradRank,
}

/// What the run shows about the paper's two claims.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    /// Layers where the target is top-1 in −δ at the last token (the "shift" layers).
    pub shift_layers: Vec<usize>,
    /// Per reported layer, the position with the largest FF2 gradient norm.
    pub max_grad_position: Vec<(usize, usize)>,
    /// Position of the last subject token, if a subject was given.
    pub last_subject_pos: Option<usize>,
    /// Plain-language reading of the above.
    pub notes: Vec<String>,
}

/// A full lens report (the `--json` schema of `backlens-patch lens`).
#[derive(Debug, Clone, Serialize)]
pub struct LensReport {
    /// Prompt text.
    pub prompt: String,
    /// Target text as tokenized (with its leading space).
    pub target: String,
    /// First target token id.
    pub target_id: u32,
    /// Prompt token texts.
    pub tokens: Vec<String>,
    /// L.
    pub loss: f64,
    /// Probability of the first target token after the prompt.
    pub target_prob: f64,
    /// The model's own answer: its top-1 token after the prompt.
    pub answer_id: u32,
    /// That token's text.
    pub answer: String,
    /// Whether the final norm was applied in projections.
    pub normed: bool,
    /// Per-layer results.
    pub layers: Vec<LayerLens>,
    /// Cosine similarity of the residual-stream VJPs after each pair of reported layers at the
    /// last prompt token (δ of a layer is ∂L/∂ of the residual stream after it), in the order of
    /// `layers`.
    pub vjp_cosine: Vec<Vec<f32>>,
    /// The paper's claims checked on this prompt.
    pub claims: Claims,
}

pub(crate) fn l2(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Index of the last prompt token that belongs to `subject` (by decoded-text overlap).
pub fn last_subject_token(
    tok: &Tokenizer,
    prompt: &str,
    ids: &[u32],
    subject: &str,
) -> Option<usize> {
    subject_tokens(tok, prompt, ids, subject).map(|r| r.end - 1)
}

/// The prompt tokens whose decoded text overlaps the first occurrence of `subject`.
pub fn subject_tokens(
    tok: &Tokenizer,
    prompt: &str,
    ids: &[u32],
    subject: &str,
) -> Option<std::ops::Range<usize>> {
    let start = prompt.find(subject)?;
    let end = start + subject.len();
    let mut offset = 0;
    let mut span: Option<std::ops::Range<usize>> = None;
    for (i, &id) in ids.iter().enumerate() {
        let piece = tok.token_text(id);
        let (s, e) = (offset, offset + piece.len());
        if s < end && e > start {
            span = Some(span.map_or(i..i + 1, |r| r.start..i + 1));
        }
        offset = e;
    }
    span
}

/// Rows `positions` of each tensor (one per reported layer), stacked layer-major.
fn gather(tensors: &[Tensor], positions: &[usize]) -> Result<Tensor> {
    let idx = Tensor::new(
        positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        &candle_core::Device::Cpu,
    )?;
    let parts = tensors
        .iter()
        .map(|t| t.index_select(&idx, 0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?)
}

/// Each row scaled to unit length (zero rows stay zero).
fn unit_rows(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| {
            let n = r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            r.iter()
                .map(move |&x| if n > 0.0 { (x as f64 / n) as f32 } else { 0.0 })
        })
        .collect()
}

/// What the lens reads from one backward pass; the per-layer tensors are (fed tokens, width),
/// one per reported layer.
#[derive(Debug)]
pub struct LensInputs {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Target token ids (" " + target).
    pub target_ids: Vec<u32>,
    /// L.
    pub loss: f64,
    /// Next-token logits after the prompt.
    pub last_logits: Vec<f32>,
    /// Reported layers.
    pub layers: Vec<usize>,
    /// FF1 inputs x1.
    pub x1: Vec<Tensor>,
    /// δ = ∂L/∂(FF2 output).
    pub d2: Vec<Tensor>,
    /// FF2 inputs a.
    pub a: Vec<Tensor>,
}

/// Tokenizes the request and checks the layer range.
fn encode(
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
    layers: &std::ops::Range<usize>,
    n_layer: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if target.trim().is_empty() {
        return Err(Error::BadRequest("the target is empty".into()));
    }
    let prompt_ids = tok.encode_prompt(prompt)?;
    let target_ids = tok.encode_target(target)?;
    if layers.end > n_layer || layers.is_empty() {
        return Err(Error::Invalid(format!(
            "layers {}..{} out of range: the model has layers 0..{n_layer}",
            layers.start, layers.end
        )));
    }
    Ok((prompt_ids, target_ids))
}

/// Runs the lens for `prompt` → `target` on a model in memory: [`inputs`], then [`report`].
pub fn run(
    model: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
    subject: Option<&str>,
    opts: &LensOptions,
) -> Result<LensReport> {
    let inputs = inputs(model, tok, prompt, target, opts)?;
    report(model, tok, prompt, subject, opts, inputs)
}

/// One forward and backward pass for `prompt` → `target` on a model in memory, and what the
/// lens reads from it at the layers of `opts`.
pub fn inputs(
    model: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
    opts: &LensOptions,
) -> Result<LensInputs> {
    let (prompt_ids, target_ids) = encode(tok, prompt, target, &opts.layers, model.hp.n_layer)?;
    let bp = backward_pass(model, &prompt_ids, &target_ids, opts.full_target)?;
    let n = bp.prompt_len;
    let layers: Vec<usize> = opts.layers.clone().collect();
    let pick = |t: &[Tensor]| layers.iter().map(|&l| t[l].clone()).collect::<Vec<_>>();
    Ok(LensInputs {
        last_logits: bp
            .logits
            .narrow(0, n - 1, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
        x1: pick(&bp.trace.ff1_in),
        d2: pick(&bp.d2),
        a: pick(&bp.trace.ff2_in),
        layers,
        prompt_ids,
        target_ids,
        loss: bp.loss,
    })
}

/// [`run`] for a model whose f32 weights need not fit in memory: `src`'s blocks are
/// dequantized one at a time (twice: forward, then recomputed in the backward), with only
/// `unembedding` ([`Transformer::load_unembedding`]) held. Layers below `opts.layers` are
/// never recomputed.
pub fn run_streamed(
    src: &crate::source::ModelSource,
    unembedding: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
    subject: Option<&str>,
    opts: &LensOptions,
) -> Result<LensReport> {
    let n_layer = unembedding.hp.n_layer;
    let (prompt_ids, target_ids) = encode(tok, prompt, target, &opts.layers, n_layer)?;
    let inputs = stream::backward(
        src,
        unembedding,
        prompt_ids,
        target_ids,
        opts.full_target,
        opts.layers.clone(),
    )?;
    report(unembedding, tok, prompt, subject, opts, inputs)
}

/// The report from a pass's [`LensInputs`]: x1 and −δ of every reported layer and position
/// projected in a few large matmuls through `model`'s final norm and unembedding. The final
/// norm is odd (RMSNorm, LayerNorm without shift, or none), so +δ's scores are −δ's negated
/// and are not projected again; with a shift, +δ gets its own rows.
pub fn report(
    model: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    subject: Option<&str>,
    opts: &LensOptions,
    inputs: LensInputs,
) -> Result<LensReport> {
    let LensInputs {
        prompt_ids,
        target_ids,
        loss,
        last_logits,
        layers: layer_ids,
        x1: x1_all,
        d2: d2_all,
        a: a_all,
    } = inputs;
    let n = prompt_ids.len();
    let positions: Vec<usize> = match opts.all_positions {
        true => (0..n).collect(),
        false => vec![n - 1],
    };
    let target_id = target_ids[0];
    let answer_id = argmax(&last_logits) as u32;
    let target_prob = crate::numeric::log_probs(&last_logits)[target_id as usize].exp();
    let ids = [target_id, answer_id];

    let x1 = gather(&x1_all, &positions)?;
    let neg = gather(&d2_all, &positions)?.neg()?;
    let a = gather(&a_all, &positions)?;
    let rows = x1.dim(0)?;
    let norm = opts.use_norm.then_some(&model.out_norm);
    let odd = norm.is_none_or(|nm| nm.b.is_none());
    let mut stacked = vec![x1.clone(), neg.clone()];
    if !odd {
        stacked.push(neg.neg()?);
    }
    let x1v = x1.to_vec2::<f32>()?;
    let negv = neg.to_vec2::<f32>()?;
    let av = a.to_vec2::<f32>()?;
    // The normalised lens: derived from the plain scores by a per-row factor when the norm is
    // odd and shift-free, else projected from unit rows.
    let unit_projected = opts.unit && !odd;
    if unit_projected {
        let d = model.hp.n_embd;
        stacked.push(Tensor::from_vec(unit_rows(&x1v), (rows, d), x1.device())?);
        stacked.push(Tensor::from_vec(unit_rows(&negv), (rows, d), x1.device())?);
    }
    let signs: &[f32] = if odd { &[1.0, -1.0] } else { &[1.0] };
    let picked = project_and_pick(
        model,
        &Tensor::cat(&stacked, 0)?,
        opts.use_norm,
        signs,
        opts.k,
        &ids,
    )?;
    let proj = |p: &Picked, scale: f64| Projection::new(p, scale, tok, true);
    let pos_d2 = |i: usize| match odd {
        true => proj(&picked[rows + i][1], 1.0),
        false => proj(&picked[2 * rows + i][0], 1.0),
    };
    let unit = |i: usize, v: &[f32], plain: &Picked, projected: usize| -> Option<Projection> {
        if !opts.unit {
            return None;
        }
        Some(match unit_factor(norm, v) {
            Some(c) if !unit_projected => proj(plain, c),
            _ => proj(&picked[projected + i][0], 1.0),
        })
    };
    let mut layers = Vec::new();
    for (li, &l) in layer_ids.iter().enumerate() {
        let cells = positions
            .iter()
            .enumerate()
            .map(|(j, &pos)| {
                let i = li * positions.len() + j;
                let (nd, na) = (l2(&negv[i]), l2(&av[i]));
                Cell {
                    pos,
                    x1: proj(&picked[i][0], 1.0),
                    neg_d2: proj(&picked[rows + i][0], 1.0),
                    pos_d2: pos_d2(i),
                    x1_unit: unit(i, &x1v[i], &picked[i][0], 3 * rows),
                    neg_d2_unit: unit(i, &negv[i], &picked[rows + i][0], 4 * rows),
                    norm_x1: l2(&x1v[i]),
                    norm_d2: nd,
                    norm_a: na,
                    grad_norm: nd * na,
                }
            })
            .collect();
        let d2 = d2_all[li].to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let a = a_all[li].to_dtype(DType::F32)?.to_vec2::<f32>()?;
        layers.push(LayerLens {
            layer: l,
            cells,
            grad_rank: grad_rank(&d2, &a)?,
        });
    }
    let last_vjps: Vec<Vec<f32>> = d2_all
        .iter()
        .map(|d| Ok(d.get(n - 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
        .collect::<Result<_>>()?;
    let last_subject_pos = subject.and_then(|s| last_subject_token(tok, prompt, &prompt_ids, s));
    let claims = claims(&layers, n, last_subject_pos, model.hp.n_layer);
    Ok(LensReport {
        prompt: prompt.to_string(),
        target: tok.decode(&target_ids),
        target_id,
        tokens: prompt_ids.iter().map(|&t| tok.token_text(t)).collect(),
        loss,
        target_prob,
        answer_id,
        answer: tok.token_text(answer_id),
        normed: opts.use_norm,
        layers,
        vjp_cosine: cosine_matrix(&last_vjps),
        claims,
    })
}

fn claims(layers: &[LayerLens], n: usize, subject: Option<usize>, n_layer: usize) -> Claims {
    let last = n - 1;
    let shift_layers: Vec<usize> = layers
        .iter()
        .filter(|l| {
            l.cells
                .iter()
                .any(|c| c.pos == last && c.neg_d2.target_rank == 0)
        })
        .map(|l| l.layer)
        .collect();
    let max_grad_position: Vec<(usize, usize)> = layers
        .iter()
        .filter(|l| l.cells.len() > 1)
        .map(|l| {
            let best = l
                .cells
                .iter()
                .max_by(|a, b| a.grad_norm.total_cmp(&b.grad_norm))
                .expect("non-empty");
            (l.layer, best.pos)
        })
        .collect();
    let mut notes = Vec::new();
    notes.push(match shift_layers.is_empty() {
        true => "the target is top-1 in −δ at the last token in no reported layer".to_string(),
        false => format!("the target is top-1 in −δ at the last token in layers {shift_layers:?}"),
    });
    if !max_grad_position.is_empty() {
        let half = n_layer / 2;
        for (name, range) in [("early", 0..half), ("late", half..n_layer)] {
            let in_range: Vec<usize> = max_grad_position
                .iter()
                .filter(|(l, _)| range.contains(l))
                .map(|&(_, p)| p)
                .collect();
            if in_range.is_empty() {
                continue;
            }
            let count = |p: usize| in_range.iter().filter(|&&q| q == p).count();
            let mut msg = format!(
                "{name} layers ({}..{}): largest FF2 gradient at the last token in {}/{} layers",
                range.start,
                range.end,
                count(last),
                in_range.len()
            );
            if let Some(s) = subject {
                msg += &format!(
                    ", at the last subject token in {}/{}",
                    count(s),
                    in_range.len()
                );
            }
            if last != 0 {
                msg += &format!(", at position 0 in {}/{}", count(0), in_range.len());
            }
            notes.push(msg);
        }
        let sink = max_grad_position.iter().filter(|&&(_, p)| p == 0).count();
        if sink * 2 > max_grad_position.len() && last != 0 {
            notes.push("position 0 dominates the gradient norm in most layers: it acts as an attention sink with very large norms, so the paper's early/late position claim is masked there".to_string());
        }
    }
    Claims {
        shift_layers,
        max_grad_position,
        last_subject_pos: subject,
        notes,
    }
}
