//! Tokenizer parity with llama.cpp: for a fixture of each tokenizer kind (SentencePiece with byte
//! fallback, with and without the space prefix; byte-level BPE with the gpt-2, smollm,
//! llama-bpe, qwen2 and default pre-tokenizers), a tiny Llama GGUF carrying that vocabulary is
//! tokenized by backlens and by llama.cpp (`llama_tokenize` with special tokens added) on every
//! val prompt and prompt + " " + target. The vocabularies are learned from the val prompts
//! themselves, deterministically.

mod common;

use backlens::arch::Arch;
use backlens::runtime::LlamaRuntime;
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::{GgufFile, Value, ValueType};
use backlens::weights::quant::GgmlType;
use common::synth::Synth;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Record {
    prompt: String,
    target_new: String,
}

fn val_records() -> Vec<Record> {
    let text = std::fs::read_to_string(common::counterfact("counterfact-val.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Strings beyond the val set: digits, runs of spaces, newlines and tabs, contractions, accents,
/// other scripts, an emoji, and text around the user-defined token.
const EXTRA: [&str; 12] = [
    "In 1234567 the year 2024 had 365 days",
    "two  spaces,   three and a trailing one ",
    "line one\nline two\n\n\tindented",
    "It's, they're, I'LL, we've, she'd, I'M",
    "naïve café, Zürich, Ångström, façade",
    "Москва — столица России",
    "東京は日本の首都です",
    "emoji 🙂 and ♥ signs",
    " leading space",
    "New York, New York",
    "York",
    "",
];

/// Words of the val texts by spaces (each but the first of a text with its space in front).
fn words(texts: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in texts {
        for (i, w) in t.split(' ').enumerate() {
            out.push(if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            });
        }
    }
    out
}

/// Learns `n` merges over words given as symbol sequences: the most frequent adjacent pair each
/// time (ties by the smaller pair), as (left, right).
fn learn_merges(words: Vec<Vec<String>>, n: usize) -> Vec<(String, String)> {
    let mut counts: HashMap<Vec<String>, usize> = HashMap::new();
    for w in words.into_iter().filter(|w| w.len() > 1) {
        *counts.entry(w).or_default() += 1;
    }
    let mut merges = Vec::new();
    for _ in 0..n {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, c) in &counts {
            for p in w.windows(2) {
                *pairs.entry((&p[0], &p[1])).or_default() += c;
            }
        }
        let Some(((a, b), _)) = pairs
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0)))
        else {
            break;
        };
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        counts = counts
            .into_iter()
            .map(|(w, c)| {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                (out, c)
            })
            .collect();
        merges.push((a, b));
    }
    merges
}

fn strings(items: &[String]) -> Value {
    Value::Array(
        ValueType::String,
        items.iter().map(|s| Value::String(s.clone())).collect(),
    )
}

fn types(items: &[i32]) -> Value {
    Value::Array(
        ValueType::I32,
        items.iter().map(|&t| Value::I32(t)).collect(),
    )
}

/// llama.cpp token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, the characters of
/// the texts except non-ASCII ones (but `é`) and `q`, `Q`, `X` (which fall back to bytes), 400
/// learned pieces scored by rank in groups of 50 equal scores (so ties are broken by position),
/// and the user-defined `York`.
fn spm_vocab(texts: &[String]) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut kinds = vec![UNKNOWN, CONTROL, CONTROL];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    kinds.extend([BYTE; 256]);
    let escaped: Vec<Vec<String>> = words(texts)
        .iter()
        .map(|w| {
            w.replace(' ', "\u{2581}")
                .chars()
                .map(String::from)
                .collect()
        })
        .collect();
    let mut chars: Vec<String> = escaped.iter().flatten().cloned().collect();
    chars.sort();
    chars.dedup();
    chars.retain(|c| {
        (c.is_ascii() || c == "é" || c == "\u{2581}") && !["q", "Q", "X"].contains(&c.as_str())
    });
    let mut scores = vec![0.0; tokens.len()];
    for c in chars {
        tokens.push(c);
        kinds.push(NORMAL);
        scores.push(-1000.0);
    }
    for (i, (a, b)) in learn_merges(escaped, 400).into_iter().enumerate() {
        let piece = format!("{a}{b}");
        if !tokens.contains(&piece) {
            tokens.push(piece);
            kinds.push(NORMAL);
            scores.push(-((i / 50) as f32));
        }
    }
    tokens.push("York".into());
    kinds.push(USER_DEFINED);
    scores.push(0.0);
    (tokens, scores, kinds)
}

/// A byte-level BPE vocabulary: `<|endoftext|>`, the 256 byte characters, 400 merges learned on
/// the texts, 20 frequent words that the merges do not make whole (tokens only `ignore_merges`
/// reaches), and the user-defined `York`.
fn bpe_vocab(texts: &[String]) -> (Vec<String>, Vec<String>, Vec<i32>) {
    let chars = common::byte_chars();
    let encode =
        |w: &str| -> Vec<String> { w.bytes().map(|b| chars[b as usize].to_string()).collect() };
    let symbolized: Vec<Vec<String>> = words(texts).iter().map(|w| encode(w)).collect();
    let merges = learn_merges(symbolized, 400);
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
    }
    let mut freq: HashMap<String, usize> = HashMap::new();
    for w in words(texts) {
        *freq.entry(encode(&w).concat()).or_default() += 1;
    }
    let mut frequent: Vec<(String, usize)> = freq
        .into_iter()
        .filter(|(w, _)| w.chars().count() > 3 && !tokens.contains(w))
        .collect();
    frequent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    tokens.extend(frequent.into_iter().take(20).map(|(w, _)| w));
    tokens.push("York".into());
    let mut kinds = vec![NORMAL; tokens.len()];
    kinds[0] = CONTROL;
    *kinds.last_mut().unwrap() = USER_DEFINED;
    let merges = merges
        .into_iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    (tokens, merges, kinds)
}

/// One fixture: a name and its `tokenizer.*` metadata.
struct Kind {
    name: &'static str,
    metadata: Vec<(String, Value)>,
}

fn kinds(texts: &[String]) -> Vec<Kind> {
    let (spm_tokens, scores, spm_types) = spm_vocab(texts);
    let spm = |prefix: Option<bool>| {
        let mut md = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&spm_tokens)),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(
                    ValueType::F32,
                    scores.iter().map(|&s| Value::F32(s)).collect(),
                ),
            ),
            ("tokenizer.ggml.token_type".into(), types(&spm_types)),
        ];
        if let Some(p) = prefix {
            // Gemma's convention: no space prefix, BOS and its id named.
            md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(p)));
            md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
        }
        md
    };
    let (bpe_tokens, merges, bpe_types) = bpe_vocab(texts);
    let bpe = |pre: Option<&str>, add_bos: Option<bool>| {
        let mut md = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&bpe_tokens)),
            ("tokenizer.ggml.token_type".into(), types(&bpe_types)),
            ("tokenizer.ggml.merges".into(), strings(&merges)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ];
        if let Some(p) = pre {
            md.push(("tokenizer.ggml.pre".into(), Value::String(p.into())));
        }
        if let Some(b) = add_bos {
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
        md
    };
    vec![
        Kind {
            name: "spm-llama2",
            metadata: spm(None),
        },
        Kind {
            name: "spm-gemma",
            metadata: spm(Some(false)),
        },
        Kind {
            name: "bpe-gpt2",
            metadata: bpe(Some("gpt-2"), None),
        },
        Kind {
            name: "bpe-smollm",
            metadata: bpe(Some("smollm"), Some(false)),
        },
        Kind {
            name: "bpe-llama3",
            metadata: bpe(Some("llama-bpe"), None),
        },
        Kind {
            name: "bpe-qwen2",
            metadata: bpe(Some("qwen2"), Some(false)),
        },
        Kind {
            name: "bpe-default",
            metadata: bpe(None, None),
        },
    ]
}

/// Writes a tiny Llama carrying `metadata` as its tokenizer.
fn write_model(dir: &Path, kind: &Kind) -> PathBuf {
    let n_vocab = kind
        .metadata
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .unwrap()
        .len();
    let synth = Synth {
        hp: common::tiny_hparams(Arch::Llama, n_vocab),
        name: kind.name.into(),
        tokenizer: kind.metadata.clone(),
        matrix_type: GgmlType::F32,
        seed: 7,
        optional: Vec::new(),
        extra_metadata: Vec::new(),
    };
    let path = dir.join(format!("{}.gguf", kind.name));
    synth.write(&path).unwrap();
    path
}

#[test]
fn token_ids_equal_llama_cpp_for_every_tokenizer_kind() {
    let records = val_records();
    let val: Vec<String> = records
        .iter()
        .flat_map(|r| [r.prompt.clone(), format!("{} {}", r.prompt, r.target_new)])
        .collect();
    let dir = common::temp_dir("tokenizer-kinds");
    for kind in kinds(&val) {
        let path = write_model(&dir, &kind);
        let g = GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        let rt = LlamaRuntime::load(&path).unwrap();
        let spm = kind.name.starts_with("spm");
        let (mut compared, mut byte_tokens) = (0, 0);
        for text in val.iter().map(String::as_str).chain(EXTRA) {
            let ours = tok.encode_prompt(text).unwrap();
            let theirs = rt.tokenize(text, true);
            assert_eq!(ours, theirs, "{}: {text:?}", kind.name);
            byte_tokens += ours
                .iter()
                .filter(|&&t| spm && (3..259).contains(&t))
                .count();
            compared += 1;
        }
        assert_eq!(compared, 2 * 1919 + EXTRA.len(), "{}", kind.name);
        // What the lens and the edits use: prompt ids then target ids are the ids of the whole.
        let joined = records
            .iter()
            .filter(|r| {
                let mut ids = tok.encode_prompt(&r.prompt).unwrap();
                ids.extend(tok.encode_target(&r.target_new).unwrap());
                ids == tok
                    .encode_prompt(&format!("{} {}", r.prompt, r.target_new))
                    .unwrap()
            })
            .count();
        println!(
            "{}: {} tokens, {compared} strings identical to llama.cpp, {byte_tokens} byte-fallback ids, prompt + target = whole in {joined} of {}",
            kind.name,
            tok.vocab_size(),
            records.len()
        );
        assert_eq!(joined, records.len(), "{}", kind.name);
        for r in &records {
            let ids = tok.encode_target(&r.target_new).unwrap();
            assert_eq!(
                tok.decode(&ids),
                format!(" {}", r.target_new),
                "{}",
                kind.name
            );
        }
        if spm {
            assert!(
                byte_tokens > 100,
                "{}: byte fallback not exercised",
                kind.name
            );
        }
    }
}

/// An HF folder's prompts get the BOS its `tokenizer.json` post-processor adds (as Llama's and
/// Gemma's do); targets do not.
#[test]
fn hf_tokenizer_json_post_processor_adds_bos_to_prompts_only() {
    let fixture = common::tiny(Arch::Llama);
    let dir = common::temp_dir("hf-bos");
    for entry in std::fs::read_dir(&fixture.hf).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let json_path = dir.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let bos = "<|endoftext|>";
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}},
    });
    std::fs::write(&json_path, json.to_string()).unwrap();
    let hf = Tokenizer::from_source(&backlens::source::ModelSource::open(&dir).unwrap()).unwrap();
    let gguf = Tokenizer::from_gguf(&GgufFile::open(&fixture.gguf).unwrap()).unwrap();
    let records = val_records();
    for r in &records {
        let mut expected = vec![0];
        expected.extend(gguf.encode_prompt(&r.prompt).unwrap());
        assert_eq!(
            hf.encode_prompt(&r.prompt).unwrap(),
            expected,
            "{:?}",
            r.prompt
        );
        assert_eq!(
            hf.encode_target(&r.target_new).unwrap(),
            gguf.encode_target(&r.target_new).unwrap(),
            "{:?}",
            r.target_new
        );
    }
    assert_eq!(records.len(), 1919);
}
