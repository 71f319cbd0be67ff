//! The Backward Lens: one forward and one backward pass, then every layer's FF1 input and FF2
//! gradient projected into the vocabulary through the final norm and the unembedding.

use crate::model::{log_softmax_last, Probes, Trace, Transformer};
use crate::numeric::rank_of;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

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

/// Runs forward and backward for L = NLL of the target's first token after the prompt, or of
/// every target token (teacher-forced) when `full_target`.
pub fn backward_pass(
    model: &Transformer,
    prompt: &[u32],
    target: &[u32],
    full_target: bool,
) -> Result<BackwardPass> {
    if prompt.is_empty() {
        return Err(Error::BadRequest("the prompt tokenizes to nothing".into()));
    }
    if target.is_empty() {
        return Err(Error::BadRequest("the target tokenizes to nothing".into()));
    }
    let scored = if full_target { target } else { &target[..1] };
    let mut tokens = prompt.to_vec();
    tokens.extend_from_slice(&scored[..scored.len() - 1]);
    let probes = Probes::new(&model.hp, tokens.len(), model.dtype())?;
    let (logits, trace) = model.forward(&tokens, Some(&probes))?;
    let logp = log_softmax_last(&logits)?;
    let mut loss: Option<Tensor> = None;
    for (i, &t) in scored.iter().enumerate() {
        let term = logp
            .narrow(0, prompt.len() - 1 + i, 1)?
            .narrow(1, t as usize, 1)?
            .sum_all()?
            .neg()?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    let loss = loss.expect("at least one target token");
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

/// Top-k, bottom-k and the target's rank of one score row.
pub fn summarize(scores: &[f32], target: u32, k: usize, tok: &Tokenizer) -> Projection {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let k = k.min(scores.len());
    let cmp = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let score = |id: u32| TokenScore {
        id,
        token: tok.token_text(id),
        score: scores[id as usize],
    };
    order.select_nth_unstable_by(k.saturating_sub(1).min(scores.len() - 1), cmp);
    let mut top: Vec<u32> = order[..k].to_vec();
    top.sort_by(cmp);
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let rcmp = |a: &u32, b: &u32| cmp(b, a);
    order.select_nth_unstable_by(k.saturating_sub(1).min(scores.len() - 1), rcmp);
    let mut bottom: Vec<u32> = order[..k].to_vec();
    bottom.sort_by(rcmp);
    Projection {
        top: top.into_iter().map(score).collect(),
        bottom: bottom.into_iter().map(score).collect(),
        target_rank: rank_of(scores, target),
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
    /// Whether the final norm was applied in projections.
    pub normed: bool,
    /// Per-layer results.
    pub layers: Vec<LayerLens>,
    /// The paper's claims checked on this prompt.
    pub claims: Claims,
}

fn l2(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Index of the last prompt token that belongs to `subject` (by decoded-text overlap).
pub fn last_subject_token(
    tok: &Tokenizer,
    prompt: &str,
    ids: &[u32],
    subject: &str,
) -> Option<usize> {
    let start = prompt.find(subject)?;
    let end = start + subject.len();
    let mut offset = 0;
    let mut last = None;
    for (i, &id) in ids.iter().enumerate() {
        let piece = tok.token_text(id);
        let (s, e) = (offset, offset + piece.len());
        if s < end && e > start {
            last = Some(i);
        }
        offset = e;
    }
    last
}

/// Runs the lens for `prompt` → `target`.
pub fn run(
    model: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    target: &str,
    subject: Option<&str>,
    opts: &LensOptions,
) -> Result<LensReport> {
    if target.trim().is_empty() {
        return Err(Error::BadRequest("the target is empty".into()));
    }
    let prompt_ids = tok.encode_prompt(prompt)?;
    let target_ids = tok.encode_target(target)?;
    if opts.layers.end > model.hp.n_layer || opts.layers.is_empty() {
        return Err(Error::Invalid(format!(
            "layers {}..{} out of range: the model has layers 0..{}",
            opts.layers.start, opts.layers.end, model.hp.n_layer
        )));
    }
    let bp = backward_pass(model, &prompt_ids, &target_ids, opts.full_target)?;
    let n = bp.prompt_len;
    let positions: Vec<usize> = match opts.all_positions {
        true => (0..n).collect(),
        false => vec![n - 1],
    };
    let target_id = target_ids[0];
    let last_logits = bp.logits.narrow(0, n - 1, 1)?;
    let target_prob = log_softmax_last(&last_logits)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[target_id as usize]
        .exp();
    let mut layers = Vec::new();
    for l in opts.layers.clone() {
        let idx = Tensor::new(
            positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
            bp.d2[l].device(),
        )?;
        let x1 = bp.trace.ff1_in[l].index_select(&idx, 0)?;
        let d2 = bp.d2[l].index_select(&idx, 0)?;
        let a = bp.trace.ff2_in[l].index_select(&idx, 0)?;
        let stacked = Tensor::cat(&[&x1, &d2.neg()?, &d2], 0)?;
        let scores = project_rows(model, &stacked, opts.use_norm)?;
        let x1v = x1.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let d2v = d2.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let av = a.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let m = positions.len();
        let cells = positions
            .iter()
            .enumerate()
            .map(|(i, &pos)| {
                let (nd, na) = (l2(&d2v[i]), l2(&av[i]));
                Cell {
                    pos,
                    x1: summarize(&scores[i], target_id, opts.k, tok),
                    neg_d2: summarize(&scores[m + i], target_id, opts.k, tok),
                    pos_d2: summarize(&scores[2 * m + i], target_id, opts.k, tok),
                    norm_x1: l2(&x1v[i]),
                    norm_d2: nd,
                    norm_a: na,
                    grad_norm: nd * na,
                }
            })
            .collect();
        layers.push(LayerLens { layer: l, cells });
    }
    let last_subject_pos = subject.and_then(|s| last_subject_token(tok, prompt, &prompt_ids, s));
    let claims = claims(&layers, n, last_subject_pos, model.hp.n_layer);
    Ok(LensReport {
        prompt: prompt.to_string(),
        target: tok.decode(&target_ids),
        target_id,
        tokens: prompt_ids.iter().map(|&t| tok.token_text(t)).collect(),
        loss: bp.loss,
        target_prob,
        normed: opts.use_norm,
        layers,
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
