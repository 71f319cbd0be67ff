//! The transformer forward pass in candle, built only from primitive differentiable ops so that a
//! backward pass works through every step. Each layer records its capture points in a [`Trace`],
//! and optional zero-valued [`Probes`] at the FF1/FF2 outputs expose ∂L/∂(output) after backward.

use crate::arch::{block_tensor, Arch, HParams};
use crate::delta::Delta;
use crate::source::ModelSource;
use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// A dense layer `y = x Wᵀ + b` with W stored [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, shape (out, in).
    pub w: Tensor,
    /// Optional bias, shape (out).
    pub b: Option<Tensor>,
    /// Under [`Numerics::LlamaCpp`], how ggml rounds this layer's input.
    pub rounding: Option<GgmlRounding>,
}

/// How ggml's CPU matmul treats the input of one weight ([`Numerics::LlamaCpp`]).
#[derive(Debug, Clone)]
pub struct GgmlRounding {
    /// The type the input is quantized to.
    pub act: GgmlType,
    /// For Q4_1/Q5_1 weights, the block minimums (out, blocks): ggml multiplies them with
    /// the input's f16-rounded block sums rather than with the sums of the rounded values.
    pub block_min: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.rounding {
            Some(r) => {
                let (xr, sum_fix) = round_like_ggml(x, r.act)?;
                let y = xr.matmul(&self.w.t()?)?;
                match (&r.block_min, sum_fix) {
                    (Some(m), Some(fix)) => (y + fix.matmul(&m.t()?)?.detach())?,
                    _ => y,
                }
            }
            None => x.matmul(&self.w.t()?)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Rounds each row of `x` as ggml's CPU matmul does before multiplying (see
/// [`quant::round_activations`]); also returns the block-sum corrections (rows, blocks) where
/// the type has them. The rounding is a straight-through step: gradients pass as if it were
/// the identity.
fn round_like_ggml(x: &Tensor, act: GgmlType) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, cols) = x.dims2()?;
    let mut values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut fixes = Vec::new();
    for row in values.chunks_exact_mut(cols) {
        fixes.extend(quant::round_activations(act, row)?);
    }
    let rounded = Tensor::from_vec(values, (rows, cols), x.device())?.to_dtype(x.dtype())?;
    let fix = match fixes.is_empty() {
        true => None,
        false => {
            let blocks = fixes.len() / rows;
            Some(Tensor::from_vec(fixes, (rows, blocks), x.device())?.to_dtype(x.dtype())?)
        }
    };
    Ok(((x + (rounded - x)?.detach())?, fix))
}

/// How a forward pass does its arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Numerics {
    /// Exact f32 (or f64) arithmetic on the dequantized weights: what the lens and edits use.
    #[default]
    Exact,
    /// Also round each matmul's input the way llama.cpp's CPU backend does for the weight's
    /// stored type (8-bit blocks for quantized weights, f16 for f16), to reproduce its logits.
    LlamaCpp,
}

/// LayerNorm (GPT-2) or RMSNorm (Llama) over the last dimension.
#[derive(Debug, Clone)]
pub struct Norm {
    /// Scale.
    pub w: Tensor,
    /// Shift (LayerNorm only).
    pub b: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
    /// RMSNorm when true (no mean subtraction, no shift).
    pub rms: bool,
}

impl Norm {
    /// Normalizes each row of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centered = if self.rms {
            x.clone()
        } else {
            x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
        };
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let scaled = normed.broadcast_mul(&self.w)?;
        Ok(match &self.b {
            Some(b) => scaled.broadcast_add(b)?,
            None => scaled,
        })
    }
}

/// Attention weights of one block.
#[derive(Debug, Clone)]
pub enum Attention {
    /// GPT-2: fused q|k|v projection.
    Fused { qkv: Linear },
    /// Llama: separate projections, q/k rows in GGUF's interleaved RoPE order.
    Split { q: Linear, k: Linear, v: Linear },
}

/// The feed-forward block: FF1 (up, and gate for Llama) and FF2 (down).
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// FF1 up projection (GPT-2's only FF1 matrix).
    pub up: Linear,
    /// Llama's gate projection; its SiLU multiplies the up projection.
    pub gate: Option<Linear>,
    /// FF2, the down projection backlens edits: (n_embd, n_ff).
    pub down: Linear,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: Norm,
    /// Attention projections.
    pub attn: Attention,
    /// Attention output projection.
    pub attn_out: Linear,
    /// Norm before the feed-forward block (its output is FF1's input).
    pub ffn_norm: Norm,
    /// Feed-forward weights.
    pub ffn: FeedForward,
}

/// Activations recorded per layer during a forward pass, each of shape (tokens, width).
#[derive(Debug, Default)]
pub struct Trace {
    /// Residual stream entering the block.
    pub resid_in: Vec<Tensor>,
    /// FF1 input: the normed residual (model dim).
    pub ff1_in: Vec<Tensor>,
    /// FF2 input: the activation after the nonlinearity (ff dim).
    pub ff2_in: Vec<Tensor>,
    /// FF2 output (model dim, bias included for GPT-2).
    pub ff2_out: Vec<Tensor>,
}

/// Zero-valued variables added to layer outputs. After `loss.backward()`, the gradient of each
/// probe equals the gradient with respect to the output it is added to.
#[derive(Debug)]
pub struct Probes {
    /// Added to FF2's output: gradient = ∂L/∂(FF2 output), shape (tokens, n_embd).
    pub ff2_out: Vec<Var>,
    /// Added to FF1's up projection: gradient = ∂L/∂(up output), shape (tokens, n_ff).
    pub ff1_up: Vec<Var>,
    /// Added to Llama's gate projection (None for GPT-2).
    pub ff1_gate: Vec<Option<Var>>,
}

impl Probes {
    /// Fresh zero probes for a sequence of `tokens` positions.
    pub fn new(hp: &HParams, tokens: usize, dtype: DType) -> Result<Probes> {
        let zeros = |w: usize| Var::zeros((tokens, w), dtype, &Device::Cpu);
        let mut probes = Probes {
            ff2_out: Vec::new(),
            ff1_up: Vec::new(),
            ff1_gate: Vec::new(),
        };
        for _ in 0..hp.n_layer {
            probes.ff2_out.push(zeros(hp.n_embd)?);
            probes.ff1_up.push(zeros(hp.n_ff)?);
            probes.ff1_gate.push(match hp.arch {
                Arch::Llama => Some(zeros(hp.n_ff)?),
                Arch::Gpt2 => None,
            });
        }
        Ok(probes)
    }
}

/// A transformer with f32 (or f64) weights held as candle tensors.
#[derive(Debug, Clone)]
pub struct Transformer {
    /// Hyperparameters.
    pub hp: HParams,
    /// Token embedding (n_vocab, n_embd); also the unembedding when tied.
    pub tok_embd: Tensor,
    /// Learned positions (GPT-2 only).
    pub pos_embd: Option<Tensor>,
    /// Blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub out_norm: Norm,
    /// Unembedding (n_vocab, n_embd).
    pub output: Tensor,
    /// Under [`Numerics::LlamaCpp`], the rounding of the unembedding's input.
    pub output_rounding: Option<GgmlRounding>,
}

struct Loader<'a> {
    src: &'a ModelSource,
    dtype: DType,
    numerics: Numerics,
}

impl Loader<'_> {
    fn opt(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((values, shape)) = self.src.tensor_f32(name)? else {
            return Ok(None);
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(Some(if self.dtype == DType::F32 {
            t
        } else {
            t.to_dtype(self.dtype)?
        }))
    }

    fn req(&self, name: &str) -> Result<Tensor> {
        self.opt(name)?
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// The input rounding for a matmul with the stored weight `name`.
    fn rounding(&self, name: &str) -> Result<Option<GgmlRounding>> {
        let (Numerics::LlamaCpp, ModelSource::Gguf(g)) = (self.numerics, self.src) else {
            return Ok(None);
        };
        let Some(info) = g.tensor(name) else {
            return Ok(None);
        };
        let Some(act) = info.ggml_type.activation_type() else {
            return Ok(None);
        };
        let block_min = match quant::block_minimums(info.ggml_type, g.tensor_bytes(info)) {
            Some(m) if act == GgmlType::Q8_1 => {
                let rows = info.shape()[0];
                let blocks = m.len() / rows;
                Some(Tensor::from_vec(m, (rows, blocks), &Device::Cpu)?.to_dtype(self.dtype)?)
            }
            _ => None,
        };
        Ok(Some(GgmlRounding { act, block_min }))
    }

    fn linear(&self, layer: usize, role: &str, bias: bool) -> Result<Linear> {
        let name = block_tensor(layer, &format!("{role}.weight"));
        Ok(Linear {
            rounding: self.rounding(&name)?,
            w: self.req(&name)?,
            b: match bias {
                true => Some(self.req(&block_tensor(layer, &format!("{role}.bias")))?),
                false => None,
            },
        })
    }

    fn block(&self, l: usize, hp: &HParams) -> Result<Block> {
        let gpt2 = hp.arch == Arch::Gpt2;
        let attn = match hp.arch {
            Arch::Gpt2 => Attention::Fused {
                qkv: self.linear(l, "attn_qkv", true)?,
            },
            Arch::Llama => Attention::Split {
                q: self.linear(l, "attn_q", false)?,
                k: self.linear(l, "attn_k", false)?,
                v: self.linear(l, "attn_v", false)?,
            },
        };
        Ok(Block {
            attn_norm: self.norm(&block_tensor(l, "attn_norm"), hp)?,
            attn,
            attn_out: self.linear(l, "attn_output", gpt2)?,
            ffn_norm: self.norm(&block_tensor(l, "ffn_norm"), hp)?,
            ffn: FeedForward {
                up: self.linear(l, "ffn_up", gpt2)?,
                gate: match gpt2 {
                    true => None,
                    false => Some(self.linear(l, "ffn_gate", false)?),
                },
                down: self.linear(l, "ffn_down", gpt2)?,
            },
        })
    }

    fn norm(&self, prefix: &str, hp: &HParams) -> Result<Norm> {
        let rms = hp.arch == Arch::Llama;
        Ok(Norm {
            w: self.req(&format!("{prefix}.weight"))?,
            b: match rms {
                true => None,
                false => Some(self.req(&format!("{prefix}.bias"))?),
            },
            eps: hp.norm_eps,
            rms,
        })
    }
}

impl Transformer {
    /// Adds ΔW to the FF2 weight of the delta's layer.
    pub fn apply_delta(&mut self, delta: &Delta) -> Result<()> {
        let n_layer = self.blocks.len();
        self.blocks
            .get_mut(delta.layer)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "delta for layer {} of a {n_layer}-layer model",
                    delta.layer
                ))
            })?
            .add_delta(delta)
    }

    /// Loads and dequantizes every weight of `src` into `dtype` (F32 or F64).
    pub fn load(src: &ModelSource, dtype: DType) -> Result<Transformer> {
        Self::load_with(src, dtype, Numerics::Exact)
    }

    /// Like [`Self::load`], with the chosen arithmetic.
    pub fn load_with(src: &ModelSource, dtype: DType, numerics: Numerics) -> Result<Transformer> {
        let hp = src.hparams()?;
        let ld = Loader {
            src,
            dtype,
            numerics,
        };
        let gpt2 = hp.arch == Arch::Gpt2;
        let blocks = (0..hp.n_layer)
            .map(|l| ld.block(l, &hp))
            .collect::<Result<Vec<_>>>()?;
        let tok_embd = ld.req("token_embd.weight")?;
        let (output, output_rounding) = match ld.opt("output.weight")? {
            Some(o) => (o, ld.rounding("output.weight")?),
            None => (tok_embd.clone(), ld.rounding("token_embd.weight")?),
        };
        Ok(Transformer {
            pos_embd: match gpt2 {
                true => Some(ld.req("position_embd.weight")?),
                false => None,
            },
            out_norm: ld.norm("output_norm", &hp)?,
            hp,
            tok_embd,
            blocks,
            output,
            output_rounding,
        })
    }

    /// Only what projects residual-stream vectors into the vocabulary: the final norm and the
    /// unembedding (no blocks; `tok_embd` shares the unembedding). For audits of big models.
    pub fn load_unembedding(src: &ModelSource) -> Result<Transformer> {
        let hp = src.hparams()?;
        let ld = Loader {
            src,
            dtype: DType::F32,
            numerics: Numerics::Exact,
        };
        let output = match ld.opt("output.weight")? {
            Some(o) => o,
            None => ld.req("token_embd.weight")?,
        };
        Ok(Transformer {
            out_norm: ld.norm("output_norm", &hp)?,
            hp,
            tok_embd: output.clone(),
            pos_embd: None,
            blocks: Vec::new(),
            output,
            output_rounding: None,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.tok_embd.dtype()
    }

    /// Runs the model on `tokens`; returns logits (tokens, n_vocab) and the per-layer trace.
    pub fn forward(&self, tokens: &[u32], probes: Option<&Probes>) -> Result<(Tensor, Trace)> {
        let (h, trace) = self.run_blocks(tokens, probes, self.blocks.len())?;
        let logits = self.unembed(&h)?;
        Ok((logits, trace))
    }

    /// [`Self::forward`] cut after block `layer`: the trace of blocks 0..=`layer` only, without
    /// the later blocks and the unembedding (for statistics of one layer's activations).
    pub fn trace_through(&self, tokens: &[u32], layer: usize) -> Result<Trace> {
        if layer >= self.blocks.len() {
            return Err(Error::Invalid(format!(
                "layer {layer} out of range: the model has {} layers",
                self.blocks.len()
            )));
        }
        Ok(self.run_blocks(tokens, None, layer + 1)?.1)
    }

    /// The residual stream after block `layer` (rows = tokens) and the trace of blocks
    /// 0..=`layer`: the fixed part of an optimisation that changes only what follows.
    pub fn resid_after(&self, tokens: &[u32], layer: usize) -> Result<(Tensor, Trace)> {
        if layer >= self.blocks.len() {
            return Err(Error::Invalid(format!(
                "layer {layer} out of range: the model has {} layers",
                self.blocks.len()
            )));
        }
        self.run_blocks(tokens, None, layer + 1)
    }

    /// The rest of a forward pass from `h`, the residual stream after block `start - 1` (one row
    /// per token): blocks `start..`, then the logits of the rows `rows` only, shape
    /// (rows.len(), n_vocab). Differentiable in `h`.
    pub fn forward_from(&self, h: &Tensor, start: usize, rows: &[usize]) -> Result<Tensor> {
        self.forward_packed(h, start, &[h.dim(0)?], rows)
    }

    /// [`Self::forward_from`] over several sequences packed one after another in `h` (lengths
    /// `segments`): each attends only within itself and its positions start at 0, so each gets
    /// the logits it would get alone, in one pass over the weights.
    pub fn forward_packed(
        &self,
        h: &Tensor,
        start: usize,
        segments: &[usize],
        rows: &[usize],
    ) -> Result<Tensor> {
        let n = h.dim(0)?;
        if segments.iter().sum::<usize>() != n
            || segments.iter().any(|&s| s == 0 || s > self.hp.n_ctx)
            || rows.iter().any(|&r| r >= n)
            || start > self.blocks.len()
        {
            return Err(Error::Invalid(format!(
                "forward from block {start} over {n} rows in segments {segments:?}: rows {rows:?}, \
                 the segments or the block are out of range"
            )));
        }
        let positions: Vec<usize> = segments.iter().flat_map(|&s| 0..s).collect();
        let mask = packed_mask(segments, self.dtype())?;
        let rope = match self.hp.arch {
            Arch::Llama => Some(RopeTables::at(&self.hp, &positions, self.dtype())?),
            Arch::Gpt2 => None,
        };
        let mut h = h.clone();
        for block in &self.blocks[start..] {
            h = block
                .step(&self.hp, &h, &mask, rope.as_ref(), None)?
                .resid_out;
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let picked = h.index_select(&Tensor::new(idx.as_slice(), h.device())?, 0)?;
        self.unembed(&picked)
    }

    /// The embedding and the first `n_blocks` blocks: the residual stream after them and the
    /// trace of each.
    fn run_blocks(
        &self,
        tokens: &[u32],
        probes: Option<&Probes>,
        n_blocks: usize,
    ) -> Result<(Tensor, Trace)> {
        let n = tokens.len();
        check_tokens(&self.hp, tokens)?;
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut h = self.tok_embd.index_select(&ids, 0)?;
        if let Some(pos) = &self.pos_embd {
            h = (h + pos.narrow(0, 0, n)?)?;
        }
        let (mask, rope) = position_tables(&self.hp, n, self.dtype())?;
        let mut trace = Trace::default();
        for (l, block) in self.blocks.iter().take(n_blocks).enumerate() {
            trace.resid_in.push(h.clone());
            let step = block.step(&self.hp, &h, &mask, rope.as_ref(), probes.map(|p| (p, l)))?;
            h = step.resid_out;
            trace.ff1_in.push(step.ff1_in);
            trace.ff2_in.push(step.ff2_in);
            trace.ff2_out.push(step.ff2_out);
        }
        Ok((h, trace))
    }

    /// Final norm + unembedding of residual vectors (rows of `h`).
    pub fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.out_norm.forward(h)?;
        let unembedding = Linear {
            w: self.output.clone(),
            b: None,
            rounding: self.output_rounding.clone(),
        };
        unembedding.forward(&x)
    }
}

/// The last position of a forward pass: what an FPS edit needs.
#[derive(Debug, Clone)]
pub struct LastPosition {
    /// Next-token logits.
    pub logits: Vec<f32>,
    /// FF2 input at the last position of each requested layer (in the order asked).
    pub ff2_in: Vec<Vec<f32>>,
}

/// A forward pass over `tokens` that dequantizes one block at a time straight from `src`
/// (exact f32), for models whose f32 weights would not fit in memory: peak memory is one
/// block's weights plus a chunk of the unembedding. Each delta is added to its block's FF2
/// before the block runs. Returns the last position's logits and its FF2 inputs at `layers`.
/// Gives the same values as [`Transformer::forward`] on the same weights.
pub fn streamed_last_position(
    src: &ModelSource,
    tokens: &[u32],
    deltas: &[Delta],
    layers: &[usize],
) -> Result<LastPosition> {
    let hp = src.hparams()?;
    let n = tokens.len();
    check_tokens(&hp, tokens)?;
    let ld = Loader {
        src,
        dtype: DType::F32,
        numerics: Numerics::Exact,
    };
    let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
    let rows = |name: &str, which: &[usize]| -> Result<Tensor> {
        let values: Vec<f32> = src.rows_f32(name, which)?.concat();
        Ok(Tensor::from_vec(
            values,
            (which.len(), hp.n_embd),
            &Device::Cpu,
        )?)
    };
    let mut h = rows("token_embd.weight", &ids)?;
    if hp.arch == Arch::Gpt2 {
        h = (h + rows("position_embd.weight", &(0..n).collect::<Vec<_>>())?)?;
    }
    let (mask, rope) = position_tables(&hp, n, DType::F32)?;
    let mut ff2_in = vec![Vec::new(); layers.len()];
    for l in 0..hp.n_layer {
        let mut block = ld.block(l, &hp)?;
        for d in deltas.iter().filter(|d| d.layer == l) {
            block.add_delta(d)?;
        }
        let step = block.step(&hp, &h, &mask, rope.as_ref(), None)?;
        for (slot, _) in layers.iter().enumerate().filter(|(_, &want)| want == l) {
            ff2_in[slot] = step.ff2_in.narrow(0, n - 1, 1)?.flatten_all()?.to_vec1()?;
        }
        h = step.resid_out;
    }
    let last = ld
        .norm("output_norm", &hp)?
        .forward(&h.narrow(0, n - 1, 1)?)?;
    let last: Vec<f32> = last.flatten_all()?.to_vec1()?;
    let unembedding = match src.shape("output.weight") {
        Some(_) => "output.weight",
        None => "token_embd.weight",
    };
    let mut logits = Vec::with_capacity(hp.n_vocab);
    src.for_row_chunks(unembedding, 4096, |_, values| {
        logits.extend(
            values
                .chunks_exact(hp.n_embd)
                .map(|row| row.iter().zip(&last).map(|(w, x)| w * x).sum::<f32>()),
        );
        Ok(())
    })?;
    Ok(LastPosition { logits, ff2_in })
}

/// What one block computes for a sequence (each of shape (tokens, width)).
struct BlockStep {
    /// Residual stream after the block.
    resid_out: Tensor,
    /// FF1 input (normed residual).
    ff1_in: Tensor,
    /// FF2 input (ff dim).
    ff2_in: Tensor,
    /// FF2 output.
    ff2_out: Tensor,
}

impl Block {
    /// Adds ΔW to this block's FF2 weight (in the block's dtype).
    pub fn add_delta(&mut self, delta: &Delta) -> Result<()> {
        let down = &mut self.ffn.down;
        let shape = down.w.dims().to_vec();
        let dw = Tensor::from_vec(delta.dense(), shape, &Device::Cpu)?.to_dtype(down.w.dtype())?;
        down.w = (&down.w + dw)?;
        Ok(())
    }

    /// Runs the block on residual stream `h`; `probes` (with this block's layer) are added to
    /// the FF1/FF2 outputs.
    fn step(
        &self,
        hp: &HParams,
        h: &Tensor,
        mask: &Tensor,
        rope: Option<&RopeTables>,
        probes: Option<(&Probes, usize)>,
    ) -> Result<BlockStep> {
        let x = self.attn_norm.forward(h)?;
        let attn = self.attention(hp, &x, mask, rope)?;
        let h = (h + self.attn_out.forward(&attn)?)?;
        let x1 = self.ffn_norm.forward(&h)?;
        let mut up = self.ffn.up.forward(&x1)?;
        if let Some((p, l)) = probes {
            up = (up + p.ff1_up[l].as_tensor())?;
        }
        let a = match &self.ffn.gate {
            Some(gate) => {
                let mut g = gate.forward(&x1)?;
                if let Some((p, l)) = probes {
                    if let Some(pg) = &p.ff1_gate[l] {
                        g = (g + pg.as_tensor())?;
                    }
                }
                (g.silu()? * up)?
            }
            None => up.gelu()?,
        };
        let mut out = self.ffn.down.forward(&a)?;
        if let Some((p, l)) = probes {
            out = (out + p.ff2_out[l].as_tensor())?;
        }
        Ok(BlockStep {
            resid_out: (h + &out)?,
            ff1_in: x1,
            ff2_in: a,
            ff2_out: out,
        })
    }

    fn attention(
        &self,
        hp: &HParams,
        x: &Tensor,
        mask: &Tensor,
        rope: Option<&RopeTables>,
    ) -> Result<Tensor> {
        let block = self;
        let (n, hd) = (x.dim(0)?, hp.head_dim());
        let d = hp.n_embd;
        let (q, k, v) = match &block.attn {
            Attention::Fused { qkv } => {
                let all = qkv.forward(x)?;
                (
                    all.narrow(1, 0, d)?,
                    all.narrow(1, d, d)?,
                    all.narrow(1, 2 * d, d)?,
                )
            }
            Attention::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
        };
        let heads = |t: Tensor, h: usize| -> Result<Tensor> {
            Ok(t.reshape((n, h, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let (mut q, mut k) = (heads(q, hp.n_head)?, heads(k, hp.n_head_kv)?);
        let mut v = heads(v, hp.n_head_kv)?;
        if let Some(r) = rope {
            q = r.apply(&q)?;
            k = r.apply(&k)?;
        }
        let rep = hp.n_head / hp.n_head_kv;
        if rep > 1 {
            let expand = |t: Tensor| -> Result<Tensor> {
                Ok(t.unsqueeze(1)?
                    .broadcast_as((hp.n_head_kv, rep, n, hd))?
                    .reshape((hp.n_head, n, hd))?)
            };
            k = expand(k)?;
            v = expand(v)?;
        }
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let out = probs.matmul(&v)?.transpose(0, 1)?.reshape((n, d))?;
        Ok(out)
    }
}

/// Fails for empty or over-long token sequences and for ids past the embedding (a tokenizer
/// whose added tokens the model has no rows for).
fn check_tokens(hp: &HParams, tokens: &[u32]) -> Result<()> {
    let n = tokens.len();
    if n == 0 {
        return Err(Error::BadRequest("the prompt tokenizes to nothing".into()));
    }
    if n > hp.n_ctx {
        return Err(Error::BadRequest(format!(
            "{n} tokens exceed the model's context of {}",
            hp.n_ctx
        )));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= hp.n_vocab) {
        return Err(Error::BadRequest(format!(
            "token id {bad} is past the model's vocabulary of {} (the tokenizer has tokens the embedding lacks)",
            hp.n_vocab
        )));
    }
    Ok(())
}

/// The causal mask and (Llama) RoPE tables for `n` positions.
fn position_tables(hp: &HParams, n: usize, dtype: DType) -> Result<(Tensor, Option<RopeTables>)> {
    let rope = match hp.arch {
        Arch::Llama => Some(RopeTables::new(hp, n, dtype)?),
        Arch::Gpt2 => None,
    };
    Ok((causal_mask(n, dtype)?, rope))
}

/// Softmax over the last dimension from primitive ops (the max shift is a constant).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension from primitive ops.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The block-diagonal causal mask of sequences of lengths `segments` packed in one.
fn packed_mask(segments: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = segments.iter().sum();
    let mut values = vec![f32::NEG_INFINITY; n * n];
    let mut at = 0;
    for &s in segments {
        for i in 0..s {
            for j in 0..=i {
                values[(at + i) * n + at + j] = 0.0;
            }
        }
        at += s;
    }
    Ok(Tensor::from_vec(values, (n, n), &Device::Cpu)?.to_dtype(dtype)?)
}

fn causal_mask(n: usize, dtype: DType) -> Result<Tensor> {
    let values: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (n, n), &Device::Cpu)?.to_dtype(dtype)?)
}

/// cos/sin tables for llama.cpp's default (interleaved-pair) RoPE.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    fn new(hp: &HParams, n: usize, dtype: DType) -> Result<RopeTables> {
        Self::at(hp, &(0..n).collect::<Vec<_>>(), dtype)
    }

    /// Tables for the given position of each row.
    fn at(hp: &HParams, positions: &[usize], dtype: DType) -> Result<RopeTables> {
        let (half, n) = (hp.head_dim() / 2, positions.len());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in positions {
            for i in 0..half {
                let theta = hp.rope_base.powf(-2.0 * i as f64 / hp.head_dim() as f64);
                let angle = p as f64 * theta;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, half, 1), &Device::Cpu)?.to_dtype(dtype)?)
        };
        Ok(RopeTables {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Rotates pairs (2i, 2i+1) of each head; `x` is (heads, tokens, head_dim).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (h, n, hd) = x.dims3()?;
        let pairs = x.reshape((h, n, hd / 2, 2))?;
        let x0 = pairs.narrow(3, 0, 1)?;
        let x1 = pairs.narrow(3, 1, 1)?;
        let r0 = (x0.broadcast_mul(&self.cos)? - x1.broadcast_mul(&self.sin)?)?;
        let r1 = (x0.broadcast_mul(&self.sin)? + x1.broadcast_mul(&self.cos)?)?;
        Ok(Tensor::cat(&[r0, r1], 3)?.reshape((h, n, hd))?)
    }
}
