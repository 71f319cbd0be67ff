//! The shape of a family's table: what one architecture is, as data. Each family file
//! (`gpt2.rs`, `llama.rs`, …) holds one [`Family`]; the hyperparameter reader, the tensor check,
//! the synthetic-model generator and the candle forward all read it.

/// One transformer family, as llama.cpp's `src/models/<arch>.cpp` builds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Family {
    /// Normalization of every norm in the family.
    pub norm: NormKind,
    /// GGUF key (after `{arch}.`) of the norm epsilon.
    pub eps_key: &'static str,
    /// How positions enter: learned rows or rotary embeddings.
    pub positions: Positions,
    /// How q, k and v are stored.
    pub qkv: QkvLayout,
    /// The feed-forward block.
    pub ffn: FfnKind,
    /// Per-head RMSNorm of q and k before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Norms after attention and after the feed-forward block, before each residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub sandwich_norms: bool,
    /// Token embeddings multiplied by √n_embd.
    pub embed_scale: bool,
    /// Reads the sliding-window keys (`attention.sliding_window`, its pattern, the local RoPE
    /// base).
    pub sliding_window: bool,
    /// Reads `final_logit_softcapping`.
    pub logit_softcap: bool,
    /// Tensors outside the blocks.
    pub globals: &'static [Spec],
    /// Tensors of every block, named `blk.{i}.{name}`.
    pub block: &'static [Spec],
}

/// Which normalization a family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// Mean-centred LayerNorm with weight and bias.
    Layer,
    /// RMSNorm with weight only.
    Rms,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Learned rows (`position_embd.weight`) added to the embeddings.
    Learned,
    /// Rotary embeddings applied to q and k.
    Rope(RopeStyle),
}

/// Which dimensions of a head RoPE rotates together (ggml's rope modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// `LLAMA_ROPE_TYPE_NORM`: adjacent pairs (2i, 2i+1).
    Pairs,
    /// `LLAMA_ROPE_TYPE_NEOX`: halves (i, i + d/2).
    Halves,
}

/// How the attention projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// One `attn_qkv` matrix whose rows are q, then k, then v.
    Fused,
    /// `attn_q`, `attn_k`, `attn_v`.
    Split,
}

/// The feed-forward block between FF1's input and FF2 (`ffn_down`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    /// GELU(up · x).
    Gelu,
    /// SiLU(gate · x) ⊙ (up · x), separate `ffn_gate` and `ffn_up`.
    SwiGlu,
    /// SwiGLU with gate and up stacked in one `ffn_up` (gate rows first), split on load.
    SwiGluFused,
    /// GELU(gate · x) ⊙ (up · x) with the tanh GELU.
    GeGlu,
}

impl FfnKind {
    /// Whether FF1 has a gate beside its up projection.
    pub fn gated(self) -> bool {
        self != FfnKind::Gelu
    }
}

/// One tensor of the table: name, shape in terms of the hyperparameters, and whether a file
/// must hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// GGUF name (a block tensor's name after `blk.{i}.`).
    pub name: &'static str,
    /// Row-major shape (GGUF layout: linear weights are [out, in]).
    pub shape: &'static [Dim],
    /// When a file must hold it.
    pub need: Need,
}

/// A dimension of a tensor, resolved against [`super::HParams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// n_embd.
    Embd,
    /// n_ff.
    Ff,
    /// 2 · n_ff (gate and up stacked).
    Ff2,
    /// n_vocab.
    Vocab,
    /// n_ctx (learned positions).
    Ctx,
    /// Width of one head (`attention.key_length`).
    Head,
    /// Half a head: the RoPE frequency factors.
    HalfHead,
    /// n_head · head width.
    Q,
    /// n_head_kv · head width.
    Kv,
    /// Q + 2 Kv (fused q|k|v).
    Qkv,
}

/// When a file must hold a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Always.
    Required,
    /// Used when present (checked against its shape then).
    Optional,
    /// Required unless the unembedding is tied to the token embedding.
    Untied,
}

impl Need {
    /// Whether a file must hold the tensor, given whether its unembedding is tied.
    pub fn required(self, tied: bool) -> bool {
        match self {
            Need::Required => true,
            Need::Optional => false,
            Need::Untied => !tied,
        }
    }
}

/// Shorthand for table rows.
pub const fn spec(name: &'static str, shape: &'static [Dim], need: Need) -> Spec {
    Spec { name, shape, need }
}
