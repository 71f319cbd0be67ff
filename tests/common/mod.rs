//! Test fixtures: tiny random GPT-2 and Llama models with a small byte-level BPE vocabulary
//! learned from a built-in text, written both as GGUF (by `synth`, the generator the scale
//! example shares) and as an HF safetensors folder; paths of the real model and data; and
//! [`load`], the one way tests open a model.
#![allow(dead_code)]

pub mod synth;

use backlens::arch::{hf, Arch, HParams};
use backlens::model::{Numerics, Transformer};
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::{GgufFile, Value, ValueType};
use backlens::weights::quant::GgmlType;
use candle_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use synth::Synth;

/// FF2 input at the last token of `prompt` (the FPS key), from candle's forward.
pub fn ff2_in_last(model: &Transformer, tok: &Tokenizer, prompt: &str, layer: usize) -> Vec<f32> {
    let ids = tok.encode_prompt(prompt).unwrap();
    let (_, trace) = model.forward(&ids, None).unwrap();
    trace.ff2_in[layer]
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A CounterFact val record: the fields the parity tests read.
#[derive(serde::Deserialize)]
pub struct ValRecord {
    pub prompt: String,
    pub target_new: String,
    pub ground_truth: String,
}

/// The 1919 records of `counterfact-val.json`.
pub fn val_records() -> Vec<ValRecord> {
    let text = std::fs::read_to_string(counterfact("counterfact-val.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts that `tok` gives llama.cpp's ids (`rt`) for every val prompt and for " " + each
/// target; returns the number of records checked.
pub fn assert_tokenizer_matches_llama_cpp(
    tok: &Tokenizer,
    rt: &backlens::runtime::LlamaRuntime,
    name: &str,
) -> usize {
    let mut checked = 0;
    for r in val_records() {
        assert_eq!(
            tok.encode_prompt(&r.prompt).unwrap(),
            rt.tokenize(&r.prompt, true),
            "{name}: {:?}",
            r.prompt
        );
        for t in [&r.target_new, &r.ground_truth] {
            let spaced = format!(" {t}");
            assert_eq!(
                tok.encode_target(t).unwrap(),
                rt.tokenize(&spaced, false),
                "{name}: {spaced:?}"
            );
        }
        checked += 1;
    }
    checked
}

/// Path of the real default model (fetched by `make model`).
pub fn smollm2() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `make model`", p.display());
    p
}

/// A model opened the way the tool opens it: source, hyperparameters, tokenizer, and the
/// dequantized transformer.
pub struct Loaded {
    pub source: ModelSource,
    pub hp: HParams,
    pub tok: Tokenizer,
    pub model: Transformer,
}

/// Opens `path` and loads it in f32 with exact arithmetic.
pub fn load(path: impl AsRef<Path>) -> Loaded {
    load_with(path, DType::F32, Numerics::Exact)
}

/// Opens `path` and loads it in `dtype` with the chosen arithmetic.
pub fn load_with(path: impl AsRef<Path>, dtype: DType, numerics: Numerics) -> Loaded {
    let path = path.as_ref();
    let source = ModelSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let hp = source.hparams().unwrap();
    let tok = Tokenizer::from_source(&source).unwrap();
    let model = Transformer::load_with(&source, dtype, numerics).unwrap();
    Loaded {
        source,
        hp,
        tok,
        model,
    }
}

/// The real default model, loaded once per test process (clone `model` to edit it).
pub fn smollm2_loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| load(smollm2()))
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
    temp_dir_in(&std::env::temp_dir(), tag)
}

/// A fresh empty folder for one test under `parent`.
pub fn temp_dir_in(parent: &Path, tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = parent.join(format!("backlens-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CORPUS: &str = "The Eiffel Tower is located in the city of Paris. Lionel Messi plays for \
Paris and for Barcelona. The mother tongue of Danielle Darrieux is French. The capital of Japan \
is Tokyo, and the capital of France is Paris. Football players play football in the city. \
The tower is tall; the city is old. She speaks French and English in the city of London.";

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_chars() -> Vec<char> {
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

/// Hyperparameters of the tiny fixtures: 3 layers of width 64, 4 heads; grouped-query
/// attention (2 kv heads) beyond GPT-2; Qwen3 and Gemma 3 with heads of 32 (n_head · head ≠
/// n_embd); Gemma 3 with a 4-position window on layers 0 and 2, its own RoPE bases, linear
/// RoPE scaling 8 on the global layer and softcapping at 15.
pub fn tiny_hparams(arch: Arch, n_vocab: usize) -> HParams {
    let mut hp = HParams {
        n_layer: 3,
        n_ff: 128,
        n_head_kv: if arch == Arch::Gpt2 { 4 } else { 2 },
        n_vocab,
        n_ctx: 64,
        norm_eps: 1e-5,
        ..HParams::plain(arch, 64, 4)
    };
    if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
        hp.n_embd_head = 32;
        hp.attn_scale = 1.0 / 32f64.sqrt();
    }
    if arch == Arch::Gemma3 {
        hp.rope_base = 1_000_000.0;
        hp.rope_freq_scale = 0.125;
        hp.n_swa = 4;
        hp.swa_layers = vec![true, false, true];
        hp.logit_softcap = 15.0;
    }
    hp
}

/// The tiny fixture of `arch`, generated once per test process.
pub fn tiny(arch: Arch) -> &'static Fixture {
    static CELLS: [OnceLock<Fixture>; 6] = [const { OnceLock::new() }; 6];
    CELLS[arch as usize].get_or_init(|| write_fixture(arch, &temp_dir(arch.name())))
}

/// A tiny Phi-3.5-style file: LongRoPE short and long factors and a RoPE attention factor, with
/// an original context (4096) above llama.cpp's session context (512), so that llama.cpp uses
/// the short factors, as it does on Phi-3.5 itself.
pub fn tiny_phi3_longrope() -> &'static Fixture {
    static CELL: OnceLock<Fixture> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = temp_dir("phi3-longrope");
        let mut synth = fixture_synth(Arch::Phi3, 0);
        synth.name = "tiny-phi-three-longrope".into();
        synth.seed ^= 0x5;
        synth.hp.rope_attn_factor = 1.19;
        synth.optional = vec!["rope_factors_long.weight", "rope_factors_short.weight"];
        synth.extra_metadata = vec![(
            "phi3.rope.scaling.original_context_length".into(),
            Value::U32(4096),
        )];
        let gguf = dir.join("tiny-phi3-longrope.gguf");
        synth.write(&gguf).unwrap();
        Fixture {
            gguf,
            hf: dir.join("no-hf-layout"),
            hp: synth.hp,
        }
    })
}

/// A tiny Llama 3.x-style file: `rope_freqs.weight` factors, RoPE base 500000, linear RoPE
/// scaling 2, a RoPE attention factor, and the optional q/k/v and output biases.
pub fn tiny_llama3() -> &'static Fixture {
    static CELL: OnceLock<Fixture> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = temp_dir("llama3");
        let mut synth = fixture_synth(Arch::Llama, 0);
        synth.name = "tiny-llama3".into();
        synth.seed ^= 0x3;
        synth.hp.rope_base = 500_000.0;
        synth.hp.rope_freq_scale = 0.5;
        synth.hp.rope_attn_factor = 1.1;
        synth.optional = vec![
            "rope_freqs.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_output.bias",
        ];
        let gguf = dir.join("tiny-llama3.gguf");
        synth.write(&gguf).unwrap();
        Fixture {
            gguf,
            hf: dir.join("no-hf-layout"),
            hp: synth.hp,
        }
    })
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

/// The `tokenizer.*` metadata of the tiny fixtures (the BPE of [`tiny_bpe`] with `n_pad` extra
/// unreachable entries) and its token count.
pub fn tiny_tokenizer(n_pad: usize) -> (Vec<(String, Value)>, usize) {
    let (mut tokens, merges) = tiny_bpe(200);
    tokens.extend((0..n_pad).map(|i| format!("<|pad{i}|>")));
    let n_tokens = tokens.len();
    let tokenizer: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                ValueType::I32,
                (0..n_tokens)
                    .map(|i| Value::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    (tokenizer, n_tokens)
}

/// A tiny random StarCoder2 GGUF (an architecture backlens has no candle forward for; llama.cpp
/// runs it), generated once per test process.
pub fn tiny_starcoder2() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let (tokenizer, n_vocab) = tiny_tokenizer(0);
        let shape = synth::ForeignShape {
            n_layer: 3,
            n_ctx: 64,
            n_embd: 64,
            n_ff: 128,
            n_head: 4,
            n_head_kv: 2,
            n_vocab,
        };
        let path = temp_dir("starcoder2").join("tiny-starcoder2.gguf");
        synth::write_foreign(&synth::STARCODER2, &shape, &tokenizer, 0x5c02, &path).unwrap();
        path
    })
}

/// Writes the tiny GGUF of `arch` with `n_pad` extra (unreachable) vocabulary entries, which make
/// the embedding as large as a test needs.
pub fn write_gguf_fixture(arch: Arch, dir: &Path, n_pad: usize) -> (PathBuf, HParams) {
    let synth = fixture_synth(arch, n_pad);
    let gguf = dir.join(format!("tiny-{}.gguf", arch.name()));
    synth.write(&gguf).unwrap();
    (gguf, synth.hp)
}

/// The generator of the tiny fixture of `arch` (byte-level BPE vocabulary plus `n_pad`
/// unreachable entries).
pub fn fixture_synth(arch: Arch, n_pad: usize) -> Synth {
    let (tokenizer, n_tokens) = tiny_tokenizer(n_pad);
    Synth {
        hp: tiny_hparams(arch, n_tokens),
        // Not "phi3": llama.cpp's vocabulary loader looks up `</s>` in any file whose
        // general.name contains it, and the byte-level fixture vocabulary has no such token.
        name: format!("tiny-{}", arch.name()).replace("phi3", "phi-three"),
        tokenizer,
        matrix_type: GgmlType::F32,
        seed: 0x9e37_79b9_7f4a_7c15 ^ arch as u64,
        optional: Vec::new(),
        extra_metadata: Vec::new(),
    }
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
        arch => {
            let model_type = match arch {
                Arch::Gemma3 => "gemma3_text",
                other => other.name(),
            };
            let mut c = serde_json::json!({
                "model_type": model_type,
                "num_hidden_layers": hp.n_layer, "hidden_size": hp.n_embd,
                "intermediate_size": hp.n_ff, "num_attention_heads": hp.n_head,
                "num_key_value_heads": hp.n_head_kv, "head_dim": hp.n_embd_head,
                "vocab_size": hp.n_vocab,
                "max_position_embeddings": hp.n_ctx, "rms_norm_eps": hp.norm_eps,
                "rope_theta": hp.rope_base, "tie_word_embeddings": true,
            });
            if hp.rope_freq_scale != 1.0 {
                c["rope_scaling"] =
                    serde_json::json!({"rope_type": "linear", "factor": 1.0 / hp.rope_freq_scale});
            }
            if hp.n_swa > 0 {
                c["sliding_window"] = hp.n_swa.into();
                c["rope_local_base_freq"] = hp.rope_base_swa.into();
                c["layer_types"] = hp
                    .swa_layers
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect::<Vec<_>>()
                    .into();
            }
            if hp.logit_softcap > 0.0 {
                c["final_logit_softcapping"] = hp.logit_softcap.into();
            }
            c
        }
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
