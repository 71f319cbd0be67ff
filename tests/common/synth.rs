//! The one synthetic-GGUF generator, shared by the test fixtures (`tests/common/mod.rs`: tiny
//! F32 models of every family) and the scale benchmark (`examples/scale.rs`: a 7B-shaped Q4_0
//! Llama): llama.cpp metadata for given hyperparameters (the keys the family's table reads),
//! every tensor the table requires (and chosen optional ones), and seeded pseudo-random
//! weights, written to disk one tensor at a time (so a 4 GB model never sits in memory).
#![allow(dead_code)]

use backlens::arch::family::{Need, Positions};
use backlens::arch::{self, HParams};
use backlens::weights::gguf::{Value, ValueType};
use backlens::weights::quant::GgmlType;
use backlens::write::gguf::{write_generated, GeneratedTensor};
use std::path::Path;

/// A synthetic model to write.
#[derive(Debug, Clone)]
pub struct Synth {
    /// Shape (`n_vocab` must equal the tokenizer's token count).
    pub hp: HParams,
    /// `general.name`.
    pub name: String,
    /// The `tokenizer.*` metadata entries.
    pub tokenizer: Vec<(String, Value)>,
    /// Storage type of the matrices and embeddings: F32 or Q4_0 (norms and biases stay F32).
    pub matrix_type: GgmlType,
    /// Seed of the weights.
    pub seed: u64,
    /// Optional tensors of the table to write too (names as in the table, e.g.
    /// `rope_freqs.weight` or `attn_q.bias` for every block).
    pub optional: Vec<&'static str>,
    /// Metadata entries written after the hyperparameters, before the tokenizer.
    pub extra_metadata: Vec<(String, Value)>,
}

/// Deterministic pseudo-random numbers (xorshift64).
pub struct Rng(pub u64);

impl Rng {
    /// The next raw 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Uniform weights `offset + scale · u`, u in [-1, 1), by the tensor's role: embeddings 0.5
/// (position 0.2), norm weights 1 ± 0.2, biases 0.1, matrices 1.7/√fan_in.
fn spread(name: &str, fan_in: u64) -> (f32, f32) {
    match name {
        "token_embd.weight" | "output.weight" => (0.5, 0.0),
        "position_embd.weight" => (0.2, 0.0),
        // RoPE frequency factors in [1, 3), as Llama 3's run from 1 to 8 (and LongRoPE's).
        _ if name.starts_with("rope_") => (1.0, 2.0),
        _ if name.ends_with(".bias") => (0.1, 0.0),
        _ if name.contains("norm") => (0.2, 1.0),
        _ => (1.7 / (fan_in as f32).sqrt(), 0.0),
    }
}

impl Synth {
    /// Metadata in file order: architecture, name, hyperparameters, then the tokenizer.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let hp = &self.hp;
        let a = hp.arch.name();
        let u = |v: usize| Value::U32(v as u32);
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.into())),
            ("general.name".into(), Value::String(self.name.clone())),
            (format!("{a}.block_count"), u(hp.n_layer)),
            (format!("{a}.context_length"), u(hp.n_ctx)),
            (format!("{a}.embedding_length"), u(hp.n_embd)),
            (format!("{a}.feed_forward_length"), u(hp.n_ff)),
            (format!("{a}.attention.head_count"), u(hp.n_head)),
            (format!("{a}.attention.head_count_kv"), u(hp.n_head_kv)),
        ];
        let fam = hp.arch.family();
        let f = |v: f64| Value::F32(v as f32);
        md.push((format!("{a}.{}", fam.eps_key), f(hp.norm_eps)));
        if hp.n_head * hp.n_embd_head != hp.n_embd {
            md.push((format!("{a}.attention.key_length"), u(hp.n_embd_head)));
            md.push((format!("{a}.attention.value_length"), u(hp.n_embd_head)));
        }
        if let Positions::Rope(_) = fam.positions {
            md.push((format!("{a}.rope.freq_base"), f(hp.rope_base)));
            md.push((format!("{a}.rope.dimension_count"), u(hp.head_dim())));
            if hp.rope_freq_scale != 1.0 {
                md.push((
                    format!("{a}.rope.scaling.type"),
                    Value::String("linear".into()),
                ));
                md.push((
                    format!("{a}.rope.scaling.factor"),
                    f(1.0 / hp.rope_freq_scale),
                ));
            }
            if hp.rope_attn_factor != 1.0 {
                md.push((
                    format!("{a}.rope.scaling.attn_factor"),
                    f(hp.rope_attn_factor),
                ));
            }
        }
        if hp.n_swa > 0 {
            md.push((format!("{a}.attention.sliding_window"), u(hp.n_swa)));
            md.push((
                format!("{a}.attention.sliding_window_pattern"),
                Value::Array(
                    ValueType::Bool,
                    hp.swa_layers.iter().map(|&b| Value::Bool(b)).collect(),
                ),
            ));
            md.push((format!("{a}.rope.freq_base_swa"), f(hp.rope_base_swa)));
        }
        if hp.logit_softcap > 0.0 {
            md.push((format!("{a}.final_logit_softcapping"), f(hp.logit_softcap)));
        }
        md.extend(self.extra_metadata.iter().cloned());
        md.extend(self.tokenizer.iter().cloned());
        md
    }

    /// The tensors the table requires and the chosen optional ones, in its order; 1-D ones
    /// (norms, biases, factors) are F32.
    pub fn tensors(&self) -> Vec<GeneratedTensor> {
        let wanted = |name: &str| {
            let role = name
                .splitn(3, '.')
                .nth(2)
                .filter(|_| name.starts_with("blk."));
            self.optional.contains(&role.unwrap_or(name))
        };
        arch::tensor_specs(&self.hp)
            .into_iter()
            .filter(|(name, _, need)| {
                need.required(self.hp.tied_embeddings) || (*need == Need::Optional && wanted(name))
            })
            .map(|(name, shape, _)| GeneratedTensor {
                ggml_type: if shape.len() == 1 {
                    GgmlType::F32
                } else {
                    self.matrix_type
                },
                dims: shape.iter().rev().map(|&d| d as u64).collect(),
                name,
            })
            .collect()
    }

    /// Writes the model to `path` (atomically, streamed one tensor at a time).
    pub fn write(&self, path: &Path) -> backlens::Result<()> {
        let tensors = self.tensors();
        let mut rng = Rng(self.seed);
        write_generated(path, &self.metadata(), &tensors, |i, buf| {
            let t = &tensors[i];
            let (mut scale, offset) = spread(&t.name, t.dims[0]);
            // Gemma multiplies the embedding rows by √n_embd; trained Gemma embeddings are
            // that much smaller, which keeps the residual stream at the scale of the rest.
            if t.name == "token_embd.weight" && self.hp.arch.family().embed_scale {
                scale /= (self.hp.n_embd as f32).sqrt();
            }
            match t.ggml_type {
                GgmlType::F32 => {
                    for c in buf.chunks_exact_mut(4) {
                        c.copy_from_slice(&(offset + scale * rng.next()).to_le_bytes());
                    }
                }
                GgmlType::Q4_0 => {
                    // Blocks of an f16 scale d and 32 random 4-bit q: values d·(q − 8) have a
                    // standard deviation of 4.61·d, set to that of the uniform F32 weights.
                    let d = half::f16::from_f32(scale / 3f32.sqrt() / 4.61).to_le_bytes();
                    for c in buf.chunks_mut(8) {
                        c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
                    }
                    for block in buf.chunks_exact_mut(18) {
                        block[..2].copy_from_slice(&d);
                    }
                }
                other => {
                    return Err(backlens::Error::Invalid(format!(
                        "synthetic weights of type {} are not supported",
                        other.name()
                    )))
                }
            }
            Ok(())
        })
    }
}

/// A size in a [`ForeignArch`] table, resolved against a [`ForeignShape`].
#[derive(Debug, Clone, Copy)]
pub enum Size {
    Layers,
    Ctx,
    Embd,
    /// Width of the keys and values: n_head_kv · head width.
    EmbdKv,
    Ff,
    Heads,
    HeadsKv,
    HeadDim,
    Vocab,
}

/// A metadata value in a [`ForeignArch`] table (the key is prefixed with the architecture).
#[derive(Debug, Clone, Copy)]
pub enum KeyValue {
    U32(Size),
    F32(f32),
}

/// A llama.cpp architecture backlens has no candle forward for, as data: its `{arch}.*` keys and
/// its tensors (row-major shapes; block tensors are `blk.{i}.{role}`), as the pinned llama.cpp's
/// `src/models/{arch}.cpp` loads them.
#[derive(Debug)]
pub struct ForeignArch {
    pub name: &'static str,
    pub keys: &'static [(&'static str, KeyValue)],
    pub global: &'static [(&'static str, &'static [Size])],
    pub block: &'static [(&'static str, &'static [Size])],
}

/// StarCoder2: LayerNorm with biases, separate Q/K/V with biases, RoPE (NEOX order), a
/// non-gated GELU FFN `ffn_up` → `ffn_down` with biases, the output tied to `token_embd`.
pub const STARCODER2: ForeignArch = ForeignArch {
    name: "starcoder2",
    keys: &[
        ("block_count", KeyValue::U32(Size::Layers)),
        ("context_length", KeyValue::U32(Size::Ctx)),
        ("embedding_length", KeyValue::U32(Size::Embd)),
        ("feed_forward_length", KeyValue::U32(Size::Ff)),
        ("attention.head_count", KeyValue::U32(Size::Heads)),
        ("attention.head_count_kv", KeyValue::U32(Size::HeadsKv)),
        ("attention.layer_norm_epsilon", KeyValue::F32(1e-5)),
        ("rope.freq_base", KeyValue::F32(10_000.0)),
        ("rope.dimension_count", KeyValue::U32(Size::HeadDim)),
    ],
    global: &[
        ("token_embd.weight", &[Size::Vocab, Size::Embd]),
        ("output_norm.weight", &[Size::Embd]),
        ("output_norm.bias", &[Size::Embd]),
    ],
    block: &[
        ("attn_norm.weight", &[Size::Embd]),
        ("attn_norm.bias", &[Size::Embd]),
        ("attn_q.weight", &[Size::Embd, Size::Embd]),
        ("attn_q.bias", &[Size::Embd]),
        ("attn_k.weight", &[Size::EmbdKv, Size::Embd]),
        ("attn_k.bias", &[Size::EmbdKv]),
        ("attn_v.weight", &[Size::EmbdKv, Size::Embd]),
        ("attn_v.bias", &[Size::EmbdKv]),
        ("attn_output.weight", &[Size::Embd, Size::Embd]),
        ("attn_output.bias", &[Size::Embd]),
        ("ffn_norm.weight", &[Size::Embd]),
        ("ffn_norm.bias", &[Size::Embd]),
        ("ffn_up.weight", &[Size::Ff, Size::Embd]),
        ("ffn_up.bias", &[Size::Ff]),
        ("ffn_down.weight", &[Size::Embd, Size::Ff]),
        ("ffn_down.bias", &[Size::Embd]),
    ],
};

/// The sizes of a synthetic model of a [`ForeignArch`].
#[derive(Debug, Clone, Copy)]
pub struct ForeignShape {
    pub n_layer: usize,
    pub n_ctx: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
}

impl ForeignShape {
    fn get(&self, s: Size) -> usize {
        let head_dim = self.n_embd / self.n_head;
        match s {
            Size::Layers => self.n_layer,
            Size::Ctx => self.n_ctx,
            Size::Embd => self.n_embd,
            Size::EmbdKv => self.n_head_kv * head_dim,
            Size::Ff => self.n_ff,
            Size::Heads => self.n_head,
            Size::HeadsKv => self.n_head_kv,
            Size::HeadDim => head_dim,
            Size::Vocab => self.n_vocab,
        }
    }
}

/// Writes a seeded random F32 model of `arch` with `shape` and the `tokenizer.*` entries to
/// `path` (weights spread by role as for [`Synth`]).
pub fn write_foreign(
    arch: &ForeignArch,
    shape: &ForeignShape,
    tokenizer: &[(String, Value)],
    seed: u64,
    path: &Path,
) -> backlens::Result<()> {
    let mut md: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(arch.name.into()),
        ),
        (
            "general.name".into(),
            Value::String(format!("tiny-{}", arch.name)),
        ),
    ];
    md.extend(arch.keys.iter().map(|(k, v)| {
        let value = match *v {
            KeyValue::U32(s) => Value::U32(shape.get(s) as u32),
            KeyValue::F32(x) => Value::F32(x),
        };
        (format!("{}.{k}", arch.name), value)
    }));
    md.extend(tokenizer.iter().cloned());
    let tensor = |name: String, dims: &[Size]| GeneratedTensor {
        name,
        dims: dims.iter().rev().map(|&s| shape.get(s) as u64).collect(),
        ggml_type: GgmlType::F32,
    };
    let mut tensors: Vec<GeneratedTensor> = arch
        .global
        .iter()
        .map(|(n, d)| tensor(n.to_string(), d))
        .collect();
    for l in 0..shape.n_layer {
        tensors.extend(
            arch.block
                .iter()
                .map(|(role, d)| tensor(arch::block_tensor(l, role), d)),
        );
    }
    let mut rng = Rng(seed);
    write_generated(path, &md, &tensors, |i, buf| {
        let t = &tensors[i];
        let (scale, offset) = spread(&t.name, t.dims[0]);
        for c in buf.chunks_exact_mut(4) {
            c.copy_from_slice(&(offset + scale * rng.next()).to_le_bytes());
        }
        Ok(())
    })
}
