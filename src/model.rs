//! The transformer forward pass in candle, built only from primitive differentiable ops so that a
//! backward pass works through every step. Each layer records its capture points in a [`Trace`],
//! and optional zero-valued [`Probes`] at the FF1/FF2 outputs expose ∂L/∂(output) after backward.

use crate::arch::family::{Dim, FfnKind, NormKind, Positions, QkvLayout, RopeStyle};
use crate::arch::{block_tensor, HParams};
use crate::delta::Delta;
use crate::kernel;
use crate::source::ModelSource;
use crate::weights::ggml_cpu;
use crate::weights::quant::{self, GgmlType};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};

mod derived;
pub use derived::Derived;

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
    /// The stored weight, where ggml computes each output with one call of its dot product
    /// (types without a tiled kernel: Q4_1, Q5_1, the k-quants): the forward then calls that
    /// same dot product and equals llama.cpp's product bit for bit.
    pub stored: Option<StoredWeight>,
}

/// A weight's stored bytes, rows back to back ([`GgmlRounding::stored`]).
#[derive(Debug, Clone)]
pub struct StoredWeight {
    /// Its ggml type.
    pub ty: GgmlType,
    /// Bytes of one row.
    pub row_bytes: usize,
    /// Every row.
    pub bytes: std::sync::Arc<[u8]>,
    /// The first row of this (possibly split) weight.
    pub first_row: usize,
    /// Rows of this (possibly split) weight.
    pub rows: usize,
}

impl StoredWeight {
    /// `x Wᵀ` for each row of `x` as ggml computes it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, cols) = x.dims2()?;
        let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let w = &self.bytes
            [self.first_row * self.row_bytes..(self.first_row + self.rows) * self.row_bytes];
        let mut out = Vec::with_capacity(n * self.rows);
        for row in values.chunks_exact(cols) {
            out.extend(quant::matvec_like_ggml(self.ty, w, row)?);
        }
        Ok(Tensor::from_vec(out, (n, self.rows), x.device())?.to_dtype(x.dtype())?)
    }
}

impl Linear {
    /// Splits the output rows into consecutive parts of `sizes` rows (a fused q|k|v or
    /// gate|up stored as one matrix): each part computes exactly its rows of the whole.
    fn split_rows(&self, sizes: &[usize]) -> Result<Vec<Linear>> {
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &rows in sizes {
            let narrow =
                |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, rows)?.contiguous()?) };
            parts.push(Linear {
                w: narrow(&self.w)?,
                b: self.b.as_ref().map(narrow).transpose()?,
                rounding: match &self.rounding {
                    Some(r) => Some(GgmlRounding {
                        act: r.act,
                        block_min: r.block_min.as_ref().map(narrow).transpose()?,
                        stored: r.stored.as_ref().map(|w| StoredWeight {
                            first_row: w.first_row + start,
                            rows,
                            ..w.clone()
                        }),
                    }),
                    None => None,
                },
            });
            start += rows;
        }
        Ok(parts)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.rounding {
            // ggml's own arithmetic; gradients pass as through the exact product.
            Some(GgmlRounding {
                stored: Some(w), ..
            }) if x.rank() == 2 => straight_through(w.forward(x)?, &weight_matmul(x, &self.w)?)?,
            Some(r) => {
                let (xr, sum_fix) = round_like_ggml(x, r.act)?;
                let y = weight_matmul(&xr, &self.w)?;
                match (&r.block_min, sum_fix) {
                    (Some(m), Some(fix)) => (y + fix.matmul(&m.t()?)?.detach())?,
                    _ => y,
                }
            }
            None => weight_matmul(x, &self.w)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x Wᵀ` for a weight W (out, in). When W is a variable (or derived from one) this is candle's
/// matmul, whose backward also yields ∂L/∂W; otherwise a custom op whose backward yields only
/// ∂L/∂x = ∂L/∂y · W, so a backward pass allocates no weight-sized gradient. In f32 with at
/// most [`kernel::SMALL_M`] rows of x both products go through [`kernel`] (W read once, no
/// packing) whether x is tracked or not, so a forward gives the same values with or without a
/// backward pass after it.
pub fn weight_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        return Ok(x.matmul(&w.t()?)?);
    }
    if x.track_op() {
        return Ok(x.contiguous()?.apply_op1(InputOnlyMatmul(w.clone()))?);
    }
    if let (&[m, _], DType::F32) = (x.dims(), x.dtype()) {
        if m <= kernel::SMALL_M {
            let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
            if let Some(y) = small_x_wt(&values, m, w) {
                let (y, n) = y?;
                return Ok(Tensor::from_vec(y, (m, n), x.device())?);
            }
        }
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `f(values, n, k)` when W is a contiguous f32 (n, k) tensor in CPU memory.
fn with_f32_weight<R>(w: &Tensor, f: impl FnOnce(&[f32], usize, usize) -> R) -> Option<R> {
    if w.dtype() != DType::F32 {
        return None;
    }
    let (n, k) = w.dims2().ok()?;
    let (storage, layout) = w.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[start..end], n, k)),
        _ => None,
    }
}

/// [`kernel::x_wt`] of the m rows `x` and W, with n, when W can go through it.
fn small_x_wt(x: &[f32], m: usize, w: &Tensor) -> Option<Result<(Vec<f32>, usize)>> {
    with_f32_weight(w, |v, n, k| Ok((kernel::x_wt(x, m, v, n, k)?, n)))
}

/// `x Wᵀ` whose backward returns the input gradient only (see [`weight_matmul`]).
struct InputOnlyMatmul(Tensor);

/// A kernel error as candle's.
fn op_error(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for InputOnlyMatmul {
    fn name(&self) -> &'static str {
        "input-only-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("input-only matmul: strided input".into()))?;
        if let (CpuStorage::F32(v), &[m, _]) = (storage, layout.shape().dims()) {
            if m <= kernel::SMALL_M {
                if let Some(y) = small_x_wt(&v[start..end], m, &self.0) {
                    let (y, n) = y.map_err(op_error)?;
                    return Ok((CpuStorage::F32(y), Shape::from((m, n))));
                }
            }
        }
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            _ => candle_core::bail!("input-only matmul: f32 or f64 expected"),
        };
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        let values = match y.dtype() {
            DType::F64 => CpuStorage::F64(y.flatten_all()?.to_vec1()?),
            _ => CpuStorage::F32(y.flatten_all()?.to_vec1()?),
        };
        Ok((values, shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let (&[m, _], DType::F32) = (grad.dims(), grad.dtype()) {
            if m <= kernel::SMALL_M {
                let dy: Vec<f32> = grad.flatten_all()?.to_vec1()?;
                let dx = with_f32_weight(&self.0, |v, n, k| {
                    Ok::<_, Error>((kernel::dy_w(&dy, m, v, n, k)?, k))
                });
                if let Some(dx) = dx {
                    let (dx, k) = dx.map_err(op_error)?;
                    return Ok(Some(Tensor::from_vec(dx, (m, k), grad.device())?));
                }
            }
        }
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// `exact`'s values with `formula`'s gradient: exact + (formula − formula), the second term
/// zero in the forward (so the values are `exact`'s bit for bit) but not in the backward.
fn straight_through(exact: Tensor, formula: &Tensor) -> Result<Tensor> {
    Ok((exact.detach() + (formula - formula.detach())?)?)
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

/// LayerNorm (GPT-2) or RMSNorm (the others) over the last dimension.
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
    /// Under [`Numerics::LlamaCpp`]: RMSNorm in ggml's order of operations (a f64 sum of the
    /// f32 squares, one f32 reciprocal scale, then the weight).
    pub ggml: bool,
}

impl Norm {
    /// Normalizes each row of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_f(x)?;
        if !(self.ggml && self.rms) {
            return Ok(y);
        }
        // ggml's arithmetic; gradients pass as through the formula above.
        let cols = x.dim(D::Minus1)?;
        let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let w: Vec<f32> = self.w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let eps = self.eps as f32;
        let mut out = Vec::with_capacity(values.len());
        for row in values.chunks_exact(cols) {
            let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
            let mean = (sum / cols as f64) as f32;
            let scale = 1.0f32 / (mean + eps).sqrt();
            out.extend(row.iter().zip(&w).map(|(&v, &w)| v * scale * w));
        }
        let exact = Tensor::from_vec(out, x.shape(), x.device())?.to_dtype(x.dtype())?;
        straight_through(exact, &y)
    }

    fn forward_f(&self, x: &Tensor) -> Result<Tensor> {
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

/// Attention projections of one block (a fused q|k|v is split into its three parts on load),
/// rows of q and k in the RoPE order of the family's GGUF.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection (n_head · head width, n_embd).
    pub q: Linear,
    /// Key projection (n_head_kv · head width, n_embd).
    pub k: Linear,
    /// Value projection (n_head_kv · head width, n_embd).
    pub v: Linear,
    /// Per-head RMSNorm of the queries before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<Norm>,
    /// Per-head RMSNorm of the keys before RoPE.
    pub k_norm: Option<Norm>,
    /// Under [`Numerics::LlamaCpp`]: scores, softmax and the weighted sum of the values in
    /// ggml's arithmetic ([`ggml_cpu::attention`]).
    pub ggml: bool,
}

/// The nonlinearity of FF1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The tanh GELU.
    Gelu,
    /// SiLU.
    Silu,
}

/// The feed-forward block: FF1 (up, and a gate in the gated families) and FF2 (down).
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// FF1 up projection (GPT-2's only FF1 matrix; Phi-3's second half of `ffn_up`).
    pub up: Linear,
    /// The gate projection whose activation multiplies the up projection (Phi-3's first half
    /// of `ffn_up`).
    pub gate: Option<Linear>,
    /// Applied to the gate, or to the up projection without a gate.
    pub act: Activation,
    /// FF2, the down projection backlens edits: (n_embd, n_ff).
    pub down: Linear,
    /// Under [`Numerics::LlamaCpp`]: SwiGLU by ggml's kernel ([`ggml_cpu::swiglu`]).
    pub ggml: bool,
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
    /// Norm of the attention output before the residual add (Gemma 3).
    pub attn_post_norm: Option<Norm>,
    /// Norm before the feed-forward block (its output is FF1's input).
    pub ffn_norm: Norm,
    /// Feed-forward weights.
    pub ffn: FeedForward,
    /// Norm of FF2's output before the residual add (Gemma 3).
    pub ffn_post_norm: Option<Norm>,
    /// Whether the block attends through the sliding window.
    pub sliding: bool,
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
    /// Added to the gate projection (None without a gate).
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
            probes.ff1_gate.push(match hp.arch.family().ffn.gated() {
                true => Some(zeros(hp.n_ff)?),
                false => None,
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
    /// RoPE frequency factors (`rope_freqs.weight`, Llama 3.x): each pair's frequency is
    /// divided by its factor.
    pub rope_freqs: Option<Vec<f64>>,
    /// Values derived from the weights on first use (the lens's int16 unembedding).
    pub derived: Derived,
    /// The arithmetic of the forward.
    pub numerics: Numerics,
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
        let stored = match act == GgmlType::Q8_1 || act == GgmlType::Q8_K {
            true => Some(StoredWeight {
                ty: info.ggml_type,
                row_bytes: info
                    .ggml_type
                    .bytes_for(info.shape()[1] as u64)
                    .ok_or_else(|| Error::Invalid(format!("{name}: rows are not whole blocks")))?
                    as usize,
                bytes: g.tensor_bytes(info).into(),
                first_row: 0,
                rows: info.shape()[0],
            }),
            false => None,
        };
        Ok(Some(GgmlRounding {
            act,
            block_min,
            stored,
        }))
    }

    /// A block's weight `{role}.weight` with its bias `{role}.bias` when the file has one (the
    /// family's table says which biases must or may exist; the tensor check enforced it).
    fn linear(&self, layer: usize, role: &str) -> Result<Linear> {
        let name = block_tensor(layer, &format!("{role}.weight"));
        Ok(Linear {
            rounding: self.rounding(&name)?,
            w: self.req(&name)?,
            b: self.opt(&block_tensor(layer, &format!("{role}.bias")))?,
        })
    }

    /// One block, assembled as the family's table says.
    fn block(&self, l: usize, hp: &HParams) -> Result<Block> {
        let fam = hp.arch.family();
        let norm = |role: &str| self.norm(&block_tensor(l, role), hp);
        let split = |role: &str, sizes: &[usize]| self.linear(l, role)?.split_rows(sizes);
        let (q, k, v) = match fam.qkv {
            QkvLayout::Fused => {
                let kv = hp.dim(Dim::Kv);
                let mut parts = split("attn_qkv", &[hp.dim(Dim::Q), kv, kv])?.into_iter();
                let mut next = || {
                    parts
                        .next()
                        .ok_or_else(|| Error::Invalid("qkv split".into()))
                };
                (next()?, next()?, next()?)
            }
            QkvLayout::Split => (
                self.linear(l, "attn_q")?,
                self.linear(l, "attn_k")?,
                self.linear(l, "attn_v")?,
            ),
        };
        let head_norm = |role: &str| match fam.qk_norm {
            true => norm(role).map(Some),
            false => Ok(None),
        };
        let post_norm = |role: &str| match fam.sandwich_norms {
            true => norm(role).map(Some),
            false => Ok(None),
        };
        let (up, gate, act) = match fam.ffn {
            FfnKind::Gelu => (self.linear(l, "ffn_up")?, None, Activation::Gelu),
            FfnKind::SwiGlu => (
                self.linear(l, "ffn_up")?,
                Some(self.linear(l, "ffn_gate")?),
                Activation::Silu,
            ),
            FfnKind::SwiGluFused => {
                let mut parts = split("ffn_up", &[hp.n_ff, hp.n_ff])?.into_iter();
                let mut next = || {
                    parts
                        .next()
                        .ok_or_else(|| Error::Invalid("gate|up split".into()))
                };
                let gate = next()?;
                (next()?, Some(gate), Activation::Silu)
            }
            FfnKind::GeGlu => (
                self.linear(l, "ffn_up")?,
                Some(self.linear(l, "ffn_gate")?),
                Activation::Gelu,
            ),
        };
        Ok(Block {
            attn_norm: norm("attn_norm")?,
            attn: Attention {
                q,
                k,
                v,
                q_norm: head_norm("attn_q_norm")?,
                k_norm: head_norm("attn_k_norm")?,
                ggml: self.numerics == Numerics::LlamaCpp,
            },
            attn_out: self.linear(l, "attn_output")?,
            attn_post_norm: post_norm("post_attention_norm")?,
            ffn_norm: norm("ffn_norm")?,
            ffn: FeedForward {
                up,
                gate,
                act,
                down: self.linear(l, "ffn_down")?,
                ggml: self.numerics == Numerics::LlamaCpp,
            },
            ffn_post_norm: post_norm("post_ffw_norm")?,
            sliding: hp.is_swa(l),
        })
    }

    fn norm(&self, prefix: &str, hp: &HParams) -> Result<Norm> {
        let rms = hp.arch.family().norm == NormKind::Rms;
        Ok(Norm {
            w: self.req(&format!("{prefix}.weight"))?,
            b: match rms {
                true => None,
                false => Some(self.req(&format!("{prefix}.bias"))?),
            },
            eps: hp.norm_eps,
            rms,
            ggml: self.numerics == Numerics::LlamaCpp,
        })
    }

    /// The RoPE frequency factors, when the file has them: Llama 3's `rope_freqs`, or Phi-3's
    /// short LongRoPE factors (the context is cut to where they apply).
    fn rope_freqs(&self) -> Result<Option<Vec<f64>>> {
        let found = match self.src.tensor_f32("rope_freqs.weight")? {
            Some(t) => Some(t),
            None => self.src.tensor_f32(crate::arch::ROPE_FACTORS_SHORT)?,
        };
        Ok(found.map(|(v, _)| v.into_iter().map(f64::from).collect()))
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
        // Each tensor is dequantized where the others are not being: the blocks split over
        // the cores, the embedding (and an untied unembedding) on a thread of its own.
        let parts = kernel::threads().clamp(1, hp.n_layer.max(1));
        let per = hp.n_layer.div_ceil(parts).max(1);
        let (embeddings, blocks) = std::thread::scope(|scope| {
            let (ld, hp) = (&ld, &hp);
            let embeddings = scope.spawn(move || -> Result<_> {
                let tok_embd = ld.req("token_embd.weight")?;
                let output = match ld.opt("output.weight")? {
                    Some(o) => (o, ld.rounding("output.weight")?),
                    None => (tok_embd.clone(), ld.rounding("token_embd.weight")?),
                };
                Ok((tok_embd, output))
            });
            let blocks: Vec<_> = (0..hp.n_layer)
                .step_by(per)
                .map(|l0| {
                    scope.spawn(move || -> Result<Vec<Block>> {
                        (l0..(l0 + per).min(hp.n_layer))
                            .map(|l| ld.block(l, hp))
                            .collect()
                    })
                })
                .collect();
            let blocks: Result<Vec<Block>> =
                blocks.into_iter().try_fold(Vec::new(), |mut all, h| {
                    all.extend(h.join().expect("a loading thread panicked")?);
                    Ok(all)
                });
            (
                embeddings.join().expect("a loading thread panicked"),
                blocks,
            )
        });
        let blocks = blocks?;
        let (tok_embd, (output, output_rounding)) = embeddings?;
        Ok(Transformer {
            pos_embd: match hp.arch.family().positions {
                Positions::Learned => Some(ld.req("position_embd.weight")?),
                Positions::Rope(_) => None,
            },
            out_norm: ld.norm("output_norm", &hp)?,
            rope_freqs: ld.rope_freqs()?,
            hp,
            tok_embd,
            blocks,
            output,
            output_rounding,
            derived: Derived::default(),
            numerics,
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
            rope_freqs: None,
            derived: Derived::default(),
            numerics: Numerics::Exact,
        })
    }

    /// How RoPE's tables are computed for this forward.
    fn rope(&self) -> RopeSource<'_> {
        RopeSource {
            freqs: self.rope_freqs.as_deref(),
            ggml: self.numerics == Numerics::LlamaCpp,
        }
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
        let tables = PositionTables::packed(&self.hp, segments, self.dtype(), self.rope())?;
        let mut h = h.clone();
        for block in &self.blocks[start..] {
            h = block.step(&self.hp, &h, &tables, None, None)?.resid_out;
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let picked = h.index_select(&Tensor::new(idx.as_slice(), h.device())?, 0)?;
        self.unembed(&picked)
    }

    /// [`Self::trace_through`] over several token sequences packed one after another (lengths
    /// `segments`), each attending only within itself from position 0: the FF2 input of
    /// `layer` at every row, as each sequence alone would give it.
    pub fn ff2_in_packed(
        &self,
        tokens: &[u32],
        segments: &[usize],
        layer: usize,
    ) -> Result<Tensor> {
        let mut trace = self.resid_after_packed(tokens, segments, layer)?.1;
        Ok(trace.ff2_in.swap_remove(layer))
    }

    /// [`Self::resid_after`] over several token sequences packed one after another (lengths
    /// `segments`), each attending only within itself from position 0: the residual stream
    /// after block `layer` and the trace of blocks 0..=`layer`, every row as its sequence alone
    /// would give it, in one pass over the weights.
    pub fn resid_after_packed(
        &self,
        tokens: &[u32],
        segments: &[usize],
        layer: usize,
    ) -> Result<(Tensor, Trace)> {
        if layer >= self.blocks.len()
            || segments.iter().sum::<usize>() != tokens.len()
            || segments.iter().any(|&s| s == 0 || s > self.hp.n_ctx)
        {
            return Err(Error::Invalid(format!(
                "packed trace through layer {layer} of {} tokens in segments {segments:?}: the \
                 segments or the layer are out of range",
                tokens.len()
            )));
        }
        self.run_packed(tokens, segments, None, layer + 1)
    }

    /// Blocks `start..` over the first `past[i]` rows of each of several packed sequences (`h`:
    /// those rows, one sequence after another): their keys and values, which rows after them
    /// attend to in [`Self::forward_after`]. Nothing computed for later rows changes them.
    pub fn past_rows(&self, h: &Tensor, start: usize, past: &[usize]) -> Result<PastRows> {
        let n = h.dim(0)?;
        if past.iter().sum::<usize>() != n || start > self.blocks.len() {
            return Err(Error::Invalid(format!(
                "past rows from block {start}: {n} rows, not the sum of {past:?}"
            )));
        }
        if n == 0 {
            return Ok(PastRows {
                start,
                past: past.to_vec(),
                blocks: None,
            });
        }
        let layout: Vec<(usize, usize)> = past.iter().map(|&p| (0, p)).collect();
        let tables = PositionTables::split(&self.hp, &layout, self.dtype(), self.rope())?;
        let mut h = h.detach();
        let mut blocks = Vec::with_capacity(self.blocks.len() - start);
        for block in &self.blocks[start..] {
            let step = block.step(&self.hp, &h, &tables, None, None)?;
            h = step.resid_out;
            blocks.push(step.kv);
        }
        Ok(PastRows {
            start,
            past: past.to_vec(),
            blocks: Some(blocks),
        })
    }

    /// [`Self::forward_packed`] for the rows that follow `past` in each sequence (`h`: `counts[i]`
    /// rows of sequence i, one sequence after another): blocks `past.start..` attending over the
    /// past keys and values and the rows themselves, then the logits of `rows` (indices into
    /// `h`). Equals the full packed forward's logits at those rows. Differentiable in `h`.
    pub fn forward_after(
        &self,
        h: &Tensor,
        past: &PastRows,
        counts: &[usize],
        rows: &[usize],
    ) -> Result<Tensor> {
        let n = h.dim(0)?;
        if counts.len() != past.past.len()
            || counts.iter().sum::<usize>() != n
            || counts
                .iter()
                .zip(&past.past)
                .any(|(c, p)| c + p > self.hp.n_ctx)
            || rows.iter().any(|&r| r >= n)
        {
            return Err(Error::Invalid(format!(
                "forward after past rows {:?}: {n} rows in {counts:?}, rows {rows:?} out of range",
                past.past
            )));
        }
        let layout: Vec<(usize, usize)> = past
            .past
            .iter()
            .copied()
            .zip(counts.iter().copied())
            .collect();
        let tables = PositionTables::split(&self.hp, &layout, self.dtype(), self.rope())?;
        let mut h = h.clone();
        for (i, block) in self.blocks[past.start..].iter().enumerate() {
            let kv = past.blocks.as_ref().map(|b| &b[i]);
            h = block.step(&self.hp, &h, &tables, None, kv)?.resid_out;
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
        self.run_packed(tokens, &[tokens.len()], probes, n_blocks)
    }

    /// [`Self::run_blocks`] over sequences packed one after another (lengths `segments`).
    fn run_packed(
        &self,
        tokens: &[u32],
        segments: &[usize],
        probes: Option<&Probes>,
        n_blocks: usize,
    ) -> Result<(Tensor, Trace)> {
        let mut at = 0;
        for &s in segments {
            check_tokens(&self.hp, &tokens[at..(at + s).min(tokens.len())])?;
            at += s;
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let positions: Vec<u32> = segments.iter().flat_map(|&s| 0..s as u32).collect();
        let pos = self
            .pos_embd
            .as_ref()
            .map(|p| p.index_select(&Tensor::new(positions.as_slice(), &Device::Cpu)?, 0))
            .transpose()?;
        let mut h = embed(&self.hp, self.tok_embd.index_select(&ids, 0)?, pos)?;
        let tables = PositionTables::packed(&self.hp, segments, self.dtype(), self.rope())?;
        let mut trace = Trace::default();
        for (l, block) in self.blocks.iter().take(n_blocks).enumerate() {
            trace.resid_in.push(h.clone());
            let step = block.step(&self.hp, &h, &tables, probes.map(|p| (p, l)), None)?;
            h = step.resid_out;
            trace.ff1_in.push(step.ff1_in);
            trace.ff2_in.push(step.ff2_in);
            trace.ff2_out.push(step.ff2_out);
        }
        Ok((h, trace))
    }

    /// Final norm + unembedding of residual vectors (rows of `h`), softcapped where the family
    /// says.
    pub fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.out_norm.forward(h)?;
        let unembedding = Linear {
            w: self.output.clone(),
            b: None,
            rounding: self.output_rounding.clone(),
        };
        let logits = unembedding.forward(&x)?;
        match self.hp.logit_softcap {
            c if c > 0.0 => Ok(((logits / c)?.tanh()? * c)?),
            _ => Ok(logits),
        }
    }
}

/// Keys and values of the first rows of packed sequences at every block from `start`
/// ([`Transformer::past_rows`]).
#[derive(Debug, Clone)]
pub struct PastRows {
    start: usize,
    past: Vec<usize>,
    blocks: Option<Vec<KvRows>>,
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
    let mut h = streamed_embedding(src, &hp, tokens)?;
    let freqs = ld.rope_freqs()?;
    let tables = PositionTables::new(&hp, n, DType::F32, RopeSource::exact(freqs.as_deref()))?;
    let mut ff2_in = vec![Vec::new(); layers.len()];
    for l in 0..hp.n_layer {
        let mut block = ld.block(l, &hp)?;
        for d in deltas.iter().filter(|d| d.layer == l) {
            block.add_delta(d)?;
        }
        let step = block.step(&hp, &h, &tables, None, None)?;
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
    let cap = hp.logit_softcap as f32;
    src.for_row_chunks(unembedding, 4096, |_, values| {
        logits.extend(values.chunks_exact(hp.n_embd).map(|row| {
            let logit = row.iter().zip(&last).map(|(w, x)| w * x).sum::<f32>();
            match cap > 0.0 {
                true => cap * (logit / cap).tanh(),
                false => logit,
            }
        }));
        Ok(())
    })?;
    Ok(LastPosition { logits, ff2_in })
}

/// The embedding of `tokens` read row by row from `src` (learned positions added and the
/// family's embedding scale applied, as [`Transformer::forward`] does).
fn streamed_embedding(src: &ModelSource, hp: &HParams, tokens: &[u32]) -> Result<Tensor> {
    let rows = |name: &str, which: &[usize]| -> Result<Tensor> {
        let values: Vec<f32> = src.rows_f32(name, which)?.concat();
        Ok(Tensor::from_vec(
            values,
            (which.len(), hp.n_embd),
            &Device::Cpu,
        )?)
    };
    let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
    let pos = match hp.arch.family().positions {
        Positions::Learned => Some(rows(
            "position_embd.weight",
            &(0..tokens.len()).collect::<Vec<_>>(),
        )?),
        Positions::Rope(_) => None,
    };
    embed(hp, rows("token_embd.weight", &ids)?, pos)
}

/// The blocks of a model one at a time, dequantized (exact f32) from `src` on each call, for
/// a forward and backward pass whose f32 weights would not fit in memory: the caller keeps each
/// block's input and recomputes the block during the backward (checkpointing).
pub struct BlockStream<'a> {
    src: &'a ModelSource,
    hp: HParams,
    tables: PositionTables,
}

/// A block's vector-Jacobian product and the activations the lens reads, each (tokens, width).
#[derive(Debug)]
pub struct BlockVjp {
    /// ∂L/∂(block input), given ∂L/∂(block output).
    pub grad_in: Tensor,
    /// FF1 input (normed residual).
    pub ff1_in: Tensor,
    /// FF2 input.
    pub ff2_in: Tensor,
}

impl<'a> BlockStream<'a> {
    /// Checks `tokens` and returns the stream with the embedded input of block 0.
    pub fn new(src: &'a ModelSource, tokens: &[u32]) -> Result<(BlockStream<'a>, Tensor)> {
        let hp = src.hparams()?;
        check_tokens(&hp, tokens)?;
        let h = streamed_embedding(src, &hp, tokens)?;
        let ld = Loader {
            src,
            dtype: DType::F32,
            numerics: Numerics::Exact,
        };
        let freqs = ld.rope_freqs()?;
        let tables = PositionTables::new(
            &hp,
            tokens.len(),
            DType::F32,
            RopeSource::exact(freqs.as_deref()),
        )?;
        let stream = BlockStream { src, hp, tables };
        Ok((stream, h))
    }

    fn block(&self, layer: usize) -> Result<Block> {
        let ld = Loader {
            src: self.src,
            dtype: DType::F32,
            numerics: Numerics::Exact,
        };
        ld.block(layer, &self.hp)
    }

    /// Block `layer` applied to `h`: the residual stream after it.
    pub fn forward(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        let step = self
            .block(layer)?
            .step(&self.hp, h, &self.tables, None, None)?;
        Ok(step.resid_out)
    }

    /// Recomputes block `layer` on its input `h` and pulls `grad_out` = ∂L/∂(block output) back
    /// through it (the gradient of ⟨output, grad_out⟩; weight gradients are never formed).
    pub fn vjp(&self, layer: usize, h: &Tensor, grad_out: &Tensor) -> Result<BlockVjp> {
        let input = Var::from_tensor(h)?;
        let step =
            self.block(layer)?
                .step(&self.hp, input.as_tensor(), &self.tables, None, None)?;
        let grads = (step.resid_out * grad_out)?.sum_all()?.backward()?;
        let grad_in = grads
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no gradient reached block {layer}'s input")))?;
        Ok(BlockVjp {
            grad_in,
            ff1_in: step.ff1_in.detach(),
            ff2_in: step.ff2_in.detach(),
        })
    }
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
    /// Keys and values of the block's rows (for [`PastRows`]).
    kv: KvRows,
}

/// Keys and values of one block's attention over some rows, after the q/k norm and RoPE and
/// before grouped heads are repeated: each (n_head_kv, rows, head width).
#[derive(Debug, Clone)]
struct KvRows {
    k: Tensor,
    v: Tensor,
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
    /// the FF1/FF2 outputs; `past` are earlier rows' keys and values the rows also attend to
    /// (`tables` laid out for them).
    fn step(
        &self,
        hp: &HParams,
        h: &Tensor,
        tables: &PositionTables,
        probes: Option<(&Probes, usize)>,
        past: Option<&KvRows>,
    ) -> Result<BlockStep> {
        let x = self.attn_norm.forward(h)?;
        let (out, kv) = self.attention(hp, &x, tables, past)?;
        let mut attn = self.attn_out.forward(&out)?;
        if let Some(norm) = &self.attn_post_norm {
            attn = norm.forward(&attn)?;
        }
        let h = (h + attn)?;
        let x1 = self.ffn_norm.forward(&h)?;
        let (a, out) = self.ffn.forward(&x1, probes)?;
        let resid = match &self.ffn_post_norm {
            Some(norm) => norm.forward(&out)?,
            None => out.clone(),
        };
        Ok(BlockStep {
            resid_out: (h + resid)?,
            ff1_in: x1,
            ff2_in: a,
            ff2_out: out,
            kv,
        })
    }

    /// Multi-head attention of the normed residual `x` (tokens, n_embd) over `past` and its own
    /// rows, before the output projection: (tokens, n_head · head width), and the rows' keys
    /// and values.
    fn attention(
        &self,
        hp: &HParams,
        x: &Tensor,
        tables: &PositionTables,
        past: Option<&KvRows>,
    ) -> Result<(Tensor, KvRows)> {
        let (n, hd) = (x.dim(0)?, hp.head_dim());
        let heads = |t: Tensor, h: usize| -> Result<Tensor> {
            Ok(t.reshape((n, h, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let at = &self.attn;
        let mut q = heads(at.q.forward(x)?, hp.n_head)?;
        let mut k = heads(at.k.forward(x)?, hp.n_head_kv)?;
        let mut v = heads(at.v.forward(x)?, hp.n_head_kv)?;
        if let Some(norm) = &at.q_norm {
            q = norm.forward(&q)?;
        }
        if let Some(norm) = &at.k_norm {
            k = norm.forward(&k)?;
        }
        let (mask, rope) = tables.for_layer(self.sliding);
        if let Some(r) = rope {
            q = r.apply(&q)?;
            k = r.apply(&k)?;
        }
        let kv = KvRows {
            k: k.clone(),
            v: v.clone(),
        };
        if let Some(p) = past {
            k = Tensor::cat(&[&p.k, &k], 1)?;
            v = Tensor::cat(&[&p.v, &v], 1)?;
        }
        let rep = hp.n_head / hp.n_head_kv;
        let m = k.dim(1)?;
        if rep > 1 {
            let expand = |t: Tensor| -> Result<Tensor> {
                Ok(t.unsqueeze(1)?
                    .broadcast_as((hp.n_head_kv, rep, m, hd))?
                    .reshape((hp.n_head, m, hd))?)
            };
            k = expand(k)?;
            v = expand(v)?;
        }
        let scores = (q.matmul(&k.t()?)? * hp.attn_scale)?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((n, hp.n_head * hd))?;
        if !at.ggml {
            return Ok((out, kv));
        }
        // ggml's arithmetic; gradients pass as through the formula above.
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let (kt, vt) = match past {
            Some(p) => (
                Tensor::cat(&[&p.k, &kv.k], 1)?,
                Tensor::cat(&[&p.v, &kv.v], 1)?,
            ),
            None => (kv.k.clone(), kv.v.clone()),
        };
        let exact = ggml_cpu::attention(
            &flat(&q)?,
            &flat(&kt)?,
            &flat(&vt)?,
            &flat(mask)?,
            (hp.n_head, hp.n_head_kv, n, m, hd),
            hp.attn_scale as f32,
        )?;
        let exact =
            Tensor::from_vec(exact, (n, hp.n_head * hd), x.device())?.to_dtype(x.dtype())?;
        Ok((straight_through(exact, &out)?, kv))
    }
}

impl FeedForward {
    /// FF1 then FF2 on the normed residual `x1`, with this layer's probes added to the FF1 and
    /// FF2 outputs: (FF2 input, FF2 output).
    fn forward(&self, x1: &Tensor, probes: Option<(&Probes, usize)>) -> Result<(Tensor, Tensor)> {
        let act = |t: Tensor| -> Result<Tensor> {
            Ok(match self.act {
                Activation::Gelu => t.gelu()?,
                Activation::Silu => t.silu()?,
            })
        };
        let mut up = self.up.forward(x1)?;
        if let Some((p, l)) = probes {
            up = (up + p.ff1_up[l].as_tensor())?;
        }
        let a = match &self.gate {
            Some(gate) => {
                let mut g = gate.forward(x1)?;
                if let Some(pg) = probes.and_then(|(p, l)| p.ff1_gate[l].as_ref()) {
                    g = (g + pg.as_tensor())?;
                }
                let a = (act(g.clone())? * &up)?;
                match (self.ggml, self.act) {
                    (true, Activation::Silu) => {
                        // ggml's arithmetic; gradients pass as through the formula above.
                        let flat = |t: &Tensor| -> Result<Vec<f32>> {
                            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
                        };
                        let exact = ggml_cpu::swiglu(&flat(&g)?, &flat(&up)?)?;
                        let exact =
                            Tensor::from_vec(exact, a.shape(), a.device())?.to_dtype(a.dtype())?;
                        straight_through(exact, &a)?
                    }
                    _ => a,
                }
            }
            None => act(up)?,
        };
        let mut out = self.down.forward(&a)?;
        if let Some((p, l)) = probes {
            out = (out + p.ff2_out[l].as_tensor())?;
        }
        Ok((a, out))
    }
}

/// The embedding rows of the tokens, plus learned positions where the family has them, scaled
/// by √n_embd where it says (Gemma: llama.cpp scales by the f32 `sqrtf(n_embd)`).
fn embed(hp: &HParams, rows: Tensor, pos: Option<Tensor>) -> Result<Tensor> {
    let h = match pos {
        Some(p) => (rows + p)?,
        None => rows,
    };
    Ok(match hp.arch.family().embed_scale {
        true => (h * f64::from((hp.n_embd as f32).sqrt()))?,
        false => h,
    })
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

/// The masks and RoPE tables of a sequence of `n` positions: one pair for global layers and,
/// with a sliding window, one for the sliding layers (their own RoPE base, no position scale).
struct PositionTables {
    mask: Tensor,
    rope: Option<RopeTables>,
    swa: Option<(Tensor, Option<RopeTables>)>,
}

impl PositionTables {
    fn new(hp: &HParams, n: usize, dtype: DType, rs: RopeSource) -> Result<PositionTables> {
        Self::packed(hp, &[n], dtype, rs)
    }

    /// The tables of sequences of lengths `segments` packed one after another: each attends
    /// only within itself and its positions start at 0.
    fn packed(
        hp: &HParams,
        segments: &[usize],
        dtype: DType,
        rs: RopeSource,
    ) -> Result<PositionTables> {
        let layout: Vec<(usize, usize)> = segments.iter().map(|&s| (0, s)).collect();
        Self::split(hp, &layout, dtype, rs)
    }

    /// Tables for rows packed as `layout` = (past, rows) per sequence: each sequence's `rows`
    /// come after its `past` earlier positions, whose keys are held apart (all pasts first,
    /// then all rows, in the key order of [`Block::attention`] with a past).
    fn split(
        hp: &HParams,
        layout: &[(usize, usize)],
        dtype: DType,
        rs: RopeSource,
    ) -> Result<PositionTables> {
        let positions: Vec<usize> = layout.iter().flat_map(|&(p, r)| p..p + r).collect();
        let rope = |base: f64, scale: f64| -> Result<Option<RopeTables>> {
            match hp.arch.family().positions {
                Positions::Rope(style) => Some(RopeTables::at(
                    RopeParams {
                        style,
                        head_dim: hp.head_dim(),
                        base,
                        freq_scale: scale,
                        attn_factor: hp.rope_attn_factor,
                        freqs: rs.freqs,
                        ggml: rs.ggml,
                    },
                    &positions,
                    dtype,
                ))
                .transpose(),
                Positions::Learned => Ok(None),
            }
        };
        Ok(PositionTables {
            mask: split_mask(layout, None, dtype)?,
            rope: rope(hp.rope_base, hp.rope_freq_scale)?,
            swa: match hp.n_swa {
                0 => None,
                w => Some((
                    split_mask(layout, Some(w), dtype)?,
                    rope(hp.rope_base_swa, 1.0)?,
                )),
            },
        })
    }

    /// The mask and RoPE tables of a global or a sliding layer.
    fn for_layer(&self, sliding: bool) -> (&Tensor, Option<&RopeTables>) {
        match (&self.swa, sliding) {
            (Some((mask, rope)), true) => (mask, rope.as_ref()),
            _ => (&self.mask, self.rope.as_ref()),
        }
    }
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

/// The causal mask of sequences packed as `layout` = (past, rows) (columns: every past, then
/// every row): position i of a sequence sees its positions j ≤ i, and with a window w only
/// those with i − j < w (llama.cpp's standard sliding window).
fn split_mask(layout: &[(usize, usize)], window: Option<usize>, dtype: DType) -> Result<Tensor> {
    let w = window.unwrap_or(usize::MAX);
    let n_past: usize = layout.iter().map(|l| l.0).sum();
    let n: usize = layout.iter().map(|l| l.1).sum();
    let cols = n_past + n;
    let mut values = vec![f32::NEG_INFINITY; n * cols];
    let (mut past_at, mut at) = (0, 0);
    for &(p, r) in layout {
        for i in 0..r {
            let pos = p + i;
            let row = &mut values[(at + i) * cols..(at + i + 1) * cols];
            for j in pos.saturating_sub(w - 1)..=pos {
                let col = match j < p {
                    true => past_at + j,
                    false => n_past + at + j - p,
                };
                row[col] = 0.0;
            }
        }
        past_at += p;
        at += r;
    }
    Ok(Tensor::from_vec(values, (n, cols), &Device::Cpu)?.to_dtype(dtype)?)
}

/// The model-wide inputs of RoPE's tables.
#[derive(Clone, Copy)]
struct RopeSource<'a> {
    freqs: Option<&'a [f64]>,
    /// Angles, cosines and sines in f32 the way ggml's CPU RoPE computes them.
    ggml: bool,
}

impl<'a> RopeSource<'a> {
    fn exact(freqs: Option<&'a [f64]>) -> Self {
        RopeSource { freqs, ggml: false }
    }
}

/// What a RoPE table depends on (ggml's `rope_ext` without YaRN).
struct RopeParams<'a> {
    style: RopeStyle,
    head_dim: usize,
    base: f64,
    freq_scale: f64,
    attn_factor: f64,
    freqs: Option<&'a [f64]>,
    ggml: bool,
}

/// cos/sin tables of ggml's RoPE for one base: angle p · scale · base^(−2i/d) / factor_i, cos
/// and sin times the attention factor.
struct RopeTables {
    style: RopeStyle,
    cos: Tensor,
    sin: Tensor,
    /// Rotate in ggml's arithmetic (its compiler fuses the first product of each output).
    ggml: bool,
}

impl RopeTables {
    /// Tables for the given position of each row.
    fn at(rp: RopeParams, positions: &[usize], dtype: DType) -> Result<RopeTables> {
        let (half, n) = (rp.head_dim / 2, positions.len());
        if let Some(f) = rp.freqs {
            if f.len() != half || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::Invalid(format!(
                    "RoPE frequency factors: {} of them, not {half} positive numbers",
                    f.len()
                )));
            }
        }
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        // ggml: each angle from the one before times base^(−2/d), all in f32.
        let step = (rp.base as f32).powf(-2.0 / rp.head_dim as f32);
        for &p in positions.iter().filter(|_| rp.ggml) {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = rp.freqs.map_or(1.0, |f| f[i]) as f32;
                let angle = rp.freq_scale as f32 * (theta / factor);
                cos.push(f64::from(angle.cos() * rp.attn_factor as f32));
                sin.push(f64::from(angle.sin() * rp.attn_factor as f32));
                theta *= step;
            }
        }
        for &p in positions.iter().filter(|_| !rp.ggml) {
            for i in 0..half {
                let factor = rp.freqs.map_or(1.0, |f| f[i]);
                let theta = rp.base.powf(-2.0 * i as f64 / rp.head_dim as f64) / factor;
                let angle = p as f64 * rp.freq_scale * theta;
                cos.push(angle.cos() * rp.attn_factor);
                sin.push(angle.sin() * rp.attn_factor);
            }
        }
        let shape = match rp.style {
            RopeStyle::Pairs => (n, half, 1),
            RopeStyle::Halves => (1, n, half),
        };
        let table = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
        };
        Ok(RopeTables {
            style: rp.style,
            cos: table(cos)?,
            sin: table(sin)?,
            ggml: rp.ggml,
        })
    }

    /// Rotates each head's pairs (2i, 2i+1) or halves (i, i + d/2); `x` is (heads, tokens,
    /// head_dim).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.apply_f(x)?;
        if !self.ggml {
            return Ok(y);
        }
        // ggml: x0·cos − x1·sin and x0·sin + x1·cos, each with its first product fused into
        // the sum (one rounding); gradients pass as through the formula.
        let (_, n, hd) = x.dims3()?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let (values, cos, sin) = (flat(x)?, flat(&self.cos)?, flat(&self.sin)?);
        let half = hd / 2;
        let mut out = values.clone();
        for (r, row) in out.chunks_exact_mut(hd).enumerate() {
            let t = (r % n) * half;
            let src = &values[r * hd..(r + 1) * hd];
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Pairs => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (c, s) = (cos[t + i], sin[t + i]);
                row[a] = src[a].mul_add(c, -(src[b] * s));
                row[b] = src[a].mul_add(s, src[b] * c);
            }
        }
        let exact = Tensor::from_vec(out, x.shape(), x.device())?.to_dtype(x.dtype())?;
        straight_through(exact, &y)
    }

    fn apply_f(&self, x: &Tensor) -> Result<Tensor> {
        let (h, n, hd) = x.dims3()?;
        let rotate = |x0: &Tensor, x1: &Tensor| -> Result<(Tensor, Tensor)> {
            let r0 = (x0.broadcast_mul(&self.cos)? - x1.broadcast_mul(&self.sin)?)?;
            let r1 = (x0.broadcast_mul(&self.sin)? + x1.broadcast_mul(&self.cos)?)?;
            Ok((r0, r1))
        };
        match self.style {
            RopeStyle::Pairs => {
                let pairs = x.reshape((h, n, hd / 2, 2))?;
                let (r0, r1) = rotate(&pairs.narrow(3, 0, 1)?, &pairs.narrow(3, 1, 1)?)?;
                Ok(Tensor::cat(&[r0, r1], 3)?.reshape((h, n, hd))?)
            }
            RopeStyle::Halves => {
                let (r0, r1) = rotate(&x.narrow(2, 0, hd / 2)?, &x.narrow(2, hd / 2, hd / 2)?)?;
                Ok(Tensor::cat(&[r0, r1], 2)?)
            }
        }
    }
}
