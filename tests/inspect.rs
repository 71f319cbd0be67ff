//! `inspect` reads every well-formed GGUF whatever its architecture, lists all its tensors, and
//! says what backlens can do with it; commands that need a forward refuse clearly.

mod common;

use backlens::arch::Arch;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::write::gguf::{GgufPlan, OutTensor};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

#[test]
fn inspect_lists_every_tensor_of_an_architecture_backlens_does_not_implement() {
    let dir = common::temp_dir("inspect-arch");
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    // A starcoder2-shaped file: its own key prefix, LayerNorm biases, a non-gated FFN.
    plan.set("general.architecture", Value::String("starcoder2".into()));
    for (k, v) in src.metadata.iter().filter(|(k, _)| k.starts_with("llama.")) {
        plan.set(&k.replacen("llama.", "starcoder2.", 1), v.clone());
    }
    plan.metadata.retain(|(k, _)| !k.starts_with("llama."));
    plan.tensors.retain(|t| !t.name.contains("ffn_gate"));
    for l in 0..3 {
        plan.tensors.push(OutTensor::f32(
            &format!("blk.{l}.attn_norm.bias"),
            &[64],
            &[0.0; 64],
        ));
    }
    let path = dir.join("starcoder2.gguf");
    plan.write(&path).unwrap();
    let n_tensors = plan.tensors.len();

    let out = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["architecture"], "starcoder2");
    assert_eq!(report["tensors"].as_array().unwrap().len(), n_tensors);
    assert_eq!(report["lens"], false);
    assert!(report["hparams"].is_null());
    assert!(report["why_not"].as_str().unwrap().contains("starcoder2"));
    assert!(report["tokenizer"]["vocab_size"].as_u64().unwrap() > 100);

    // The terminal view says the same in one line.
    let text = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("backlens: lens no, edit no"), "{text}");

    // A command that needs backlens's forward refuses in one line naming the architecture.
    let out = Command::new(BIN)
        .args([
            "lens",
            path.to_str().unwrap(),
            "--prompt",
            "a b",
            "--target",
            "c",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown architecture 'starcoder2'"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}

#[test]
fn inspect_reports_capabilities_of_a_supported_model() {
    let path = &common::tiny(Arch::Llama).gguf;
    let out = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["format"], "GGUF");
    assert_eq!(report["hparams"]["arch"], "llama");
    assert_eq!(report["hparams"]["n_layer"], 3);
    assert_eq!(report["lens"], true);
    let methods: Vec<&str> = report["edit_methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(methods, ["shift", "shift-whitened", "grad", "batch"]);
}
