//! Test fixtures: tiny random GPT-2 and Llama models with a small byte-level BPE vocabulary
//! learned from a built-in text, written both as GGUF and as an HF safetensors folder.
#![allow(dead_code)]

use backlens::arch::{hf, Arch, HParams};
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::{GgufFile, Value, ValueType};
use backlens::write::gguf::{GgufPlan, OutTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Path of the real default model (fetched by `make model`).
pub fn smollm2() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `make model`", p.display());
    p
}

/// The shared CounterFact data folder beside the checkout.
pub fn counterfact(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/counterfact")
        .join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A fresh empty folder under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("backlens-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CORPUS: &str = "The Eiffel Tower is located in the city of Paris. Lionel Messi plays for \
Paris and for Barcelona. The mother tongue of Danielle Darrieux is French. The capital of Japan \
is Tokyo, and the capital of France is Paris. Football players play football in the city. \
The tower is tall; the city is old. She speaks French and English in the city of London.";

/// GPT-2's reversible map from bytes to printable characters.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let code = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(code).unwrap()
        })
        .collect()
}

/// A small byte-level BPE: (tokens, merges). Token 0 is the special `<|endoftext|>`.
pub fn tiny_bpe(n_merges: usize) -> (Vec<String>, Vec<String>) {
    let chars = byte_chars();
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, w) in CORPUS.split(' ').enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let symbols: Vec<String> = text
            .bytes()
            .map(|b| chars[b as usize].to_string())
            .collect();
        *words.entry(symbols).or_default() += 1;
    }
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    let mut merges = Vec::new();
    for _ in 0..n_merges {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += n;
            }
        }
        let Some(best) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(p, _)| p)
        else {
            break;
        };
        let joined = format!("{}{}", best.0, best.1);
        words = words
            .into_iter()
            .map(|(w, n)| {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                (out, n)
            })
            .collect();
        merges.push(format!("{} {}", best.0, best.1));
        tokens.push(joined);
    }
    (tokens, merges)
}

/// Deterministic pseudo-random numbers in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

/// Paths of one generated fixture.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// GGUF file (F32 weights).
    pub gguf: PathBuf,
    /// HF checkpoint folder holding the same weights.
    pub hf: PathBuf,
    /// Hyperparameters.
    pub hp: HParams,
}

/// Hyperparameters of the tiny fixtures.
pub fn tiny_hparams(arch: Arch, n_vocab: usize) -> HParams {
    HParams {
        arch,
        n_layer: 3,
        n_embd: 64,
        n_ff: 128,
        n_head: 4,
        n_head_kv: if arch == Arch::Llama { 2 } else { 4 },
        n_vocab,
        n_ctx: 64,
        norm_eps: 1e-5,
        rope_base: if arch == Arch::Llama { 10_000.0 } else { 0.0 },
        tied_embeddings: true,
    }
}

/// The tiny fixture of `arch`, generated once per test process.
pub fn tiny(arch: Arch) -> &'static Fixture {
    static GPT2: OnceLock<Fixture> = OnceLock::new();
    static LLAMA: OnceLock<Fixture> = OnceLock::new();
    let cell = if arch == Arch::Gpt2 { &GPT2 } else { &LLAMA };
    cell.get_or_init(|| write_fixture(arch, &temp_dir(arch.name())))
}

fn strings(items: &[String]) -> Value {
    Value::Array(
        ValueType::String,
        items.iter().map(|s| Value::String(s.clone())).collect(),
    )
}

/// Generates random weights for `arch` and writes the GGUF and HF forms into `dir`.
pub fn write_fixture(arch: Arch, dir: &Path) -> Fixture {
    let (gguf, hp) = write_gguf_fixture(arch, dir, 0);
    let hf_dir = dir.join(format!("tiny-{}-hf", arch.name()));
    write_hf(&gguf, &hf_dir, &hp);
    Fixture {
        gguf,
        hf: hf_dir,
        hp,
    }
}

/// Writes the tiny GGUF of `arch` with `n_pad` extra (unreachable) vocabulary entries, which make
/// the embedding as large as a test needs.
pub fn write_gguf_fixture(arch: Arch, dir: &Path, n_pad: usize) -> (PathBuf, HParams) {
    let (mut tokens, merges) = tiny_bpe(200);
    tokens.extend((0..n_pad).map(|i| format!("<|pad{i}|>")));
    let hp = tiny_hparams(arch, tokens.len());
    let a = arch.name();
    let mut plan = GgufPlan::default();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("tiny-{a}"))),
        (format!("{a}.block_count"), Value::U32(hp.n_layer as u32)),
        (format!("{a}.context_length"), Value::U32(hp.n_ctx as u32)),
        (
            format!("{a}.embedding_length"),
            Value::U32(hp.n_embd as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(hp.n_ff as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(hp.n_head as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(hp.n_head_kv as u32),
        ),
        match arch {
            Arch::Gpt2 => (
                format!("{a}.attention.layer_norm_epsilon"),
                Value::F32(1e-5),
            ),
            Arch::Llama => (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
        },
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(hp.head_dim() as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                ValueType::I32,
                (0..tokens.len())
                    .map(|i| Value::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    for (k, v) in md {
        plan.set(&k, v);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ arch as u64);
    let mut add = |plan: &mut GgufPlan, name: &str, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        plan.tensors
            .push(OutTensor::f32(name, &shape, &rng.vec(n, scale, offset)));
    };
    let (d, v) = (hp.n_embd, hp.n_vocab);
    add(&mut plan, "token_embd.weight", vec![v, d], 0.5, 0.0);
    if arch == Arch::Gpt2 {
        add(
            &mut plan,
            "position_embd.weight",
            vec![hp.n_ctx, d],
            0.2,
            0.0,
        );
    }
    for (name, shape) in backlens::arch::required_tensors(&hp) {
        if name.starts_with("token_embd") || name.starts_with("position_embd") {
            continue;
        }
        let is_norm = name.contains("norm");
        let is_bias = name.ends_with(".bias");
        let fan_in = *shape.last().unwrap() as f32;
        let (scale, offset) = match (is_norm, is_bias) {
            (true, false) => (0.2, 1.0),
            (_, true) => (0.1, 0.0),
            _ => (1.7 / fan_in.sqrt(), 0.0),
        };
        add(&mut plan, &name, shape, scale, offset);
    }
    let gguf = dir.join(format!("tiny-{a}.gguf"));
    plan.write(&gguf).unwrap();
    (gguf, hp)
}

/// Writes an HF folder (config.json, model.safetensors, tokenizer.json) from a fixture GGUF.
fn write_hf(gguf: &Path, dir: &Path, hp: &HParams) {
    std::fs::create_dir_all(dir).unwrap();
    let g = GgufFile::open(gguf).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let config = match hp.arch {
        Arch::Gpt2 => serde_json::json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": hp.n_layer, "n_embd": hp.n_embd, "n_head": hp.n_head,
            "n_inner": hp.n_ff, "vocab_size": hp.n_vocab, "n_positions": hp.n_ctx,
            "layer_norm_epsilon": hp.norm_eps,
        }),
        Arch::Llama => serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": hp.n_layer, "hidden_size": hp.n_embd,
            "intermediate_size": hp.n_ff, "num_attention_heads": hp.n_head,
            "num_key_value_heads": hp.n_head_kv, "vocab_size": hp.n_vocab,
            "max_position_embeddings": hp.n_ctx, "rms_norm_eps": hp.norm_eps,
            "rope_theta": hp.rope_base, "tie_word_embeddings": true,
        }),
    };
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let prefix = if hp.arch == Arch::Gpt2 {
        "transformer."
    } else {
        ""
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &g.tensors {
        let (name, layout) = hf::hf_name(hp, &t.name, prefix).unwrap();
        let values: Vec<f32> = g
            .tensor_bytes(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let hf_values = hf::to_hf(&values, &t.shape(), layout);
        let mut shape = t.shape();
        if layout == hf::Layout::Transposed {
            shape.reverse();
        }
        tensors.push((
            name,
            shape,
            hf_values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}
