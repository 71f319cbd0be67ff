//! `inspect` reads every well-formed GGUF whatever its architecture, lists all its tensors, and
//! says what backlens can do with it; commands that need a forward refuse clearly.

mod common;

use backlens::arch::Arch;
use backlens::numeric::{argmax, log_probs};
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::trace::Tracer;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::weights::quant;
use backlens::write::gguf::{GgufPlan, OutTensor};
use std::path::Path;
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
    assert_eq!(report["edit_methods"], serde_json::json!(["shift"]));
    assert!(report["tokenizer"]["vocab_size"].as_u64().unwrap() > 100);

    // The terminal view says the same in one line.
    let text = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("backlens: lens no, edit shift, audit yes"),
        "{text}"
    );

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
    assert_eq!(
        methods,
        [
            "shift",
            "shift-whitened",
            "grad",
            "batch",
            "shift-protected",
            "rome",
            "ft",
            "memit"
        ]
    );
}

/// Runs the binary; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The ΔW of `blk.{layer}.ffn_down.weight` written to `out` (patched minus base, or B·A).
fn written_delta(base: &GgufFile, out: &Path, layer: usize) -> Vec<f32> {
    let name = format!("blk.{layer}.ffn_down.weight");
    let g = GgufFile::open(out).unwrap();
    let read = |g: &GgufFile, n: &str| {
        let t = g.tensor(n).unwrap_or_else(|| panic!("{n}"));
        let v = quant::dequantize(t.ggml_type, g.tensor_bytes(t), n).unwrap();
        (v, t.shape())
    };
    match g.tensor(&name) {
        Some(_) => {
            let (patched, (orig, _)) = (read(&g, &name).0, read(base, &name));
            patched.iter().zip(&orig).map(|(a, b)| a - b).collect()
        }
        None => {
            let (a, sa) = read(&g, &format!("{name}.lora_a"));
            let (b, sb) = read(&g, &format!("{name}.lora_b"));
            let (r, n_in, n_out) = (sa[0], sa[1], sb[0]);
            (0..n_out * n_in)
                .map(|k| {
                    (0..r)
                        .map(|i| b[k / n_in * r + i] * a[i * n_in + k % n_in])
                        .sum()
                })
                .collect()
        }
    }
}

/// Acceptance 2 of issue 14: a tiny random StarCoder2 (LayerNorm with biases, a non-gated GELU
/// FFN; no candle forward) runs every forward-only command through llama.cpp's own graph:
/// `inspect`, `predict --runtime llama`, `generate`, `edit --method shift` to a GGUF and to a
/// LoRA adapter (ΔW = lr·e·xᵀ exactly, with x from llama.cpp's trace; the target flips in
/// llama.cpp), and `audit` (rank 1, σ₁ = lr·‖e‖·‖x‖, the edit prompt's probe at cosine 1).
#[test]
fn an_architecture_without_a_candle_forward_edits_through_llama_cpp() {
    let path = common::tiny_starcoder2();
    let p = path.to_str().unwrap();
    let dir = common::temp_dir("starcoder2-cli");
    let base = GgufFile::open(path).unwrap();

    let report = json_of(&["inspect", p, "--json"]);
    assert_eq!(report["architecture"], "starcoder2");
    assert_eq!(report["tensors"].as_array().unwrap().len(), 3 + 3 * 16);
    assert_eq!(report["lens"], false);

    // predict: llama.cpp's logits, as the tracer reads them.
    let prompt = "The capital of Japan is";
    let source = ModelSource::open(path).unwrap();
    let tok = Tokenizer::from_source(&source).unwrap();
    let ids = tok.encode_prompt(prompt).unwrap();
    let mut tracer = Tracer::load(path).unwrap();
    let layer = 2; // round(0.73 · 3), the default
    let traced = tracer.last_position(&ids, &[layer]).unwrap();
    let logp = log_probs(&traced.logits);
    let top = argmax(&traced.logits);
    let pred = json_of(&[
        "predict",
        p,
        prompt,
        "--runtime",
        "llama",
        "--json",
        "-k",
        "3",
    ]);
    assert_eq!(pred["top"][0]["id"], top as u64);
    let prob = pred["top"][0]["prob"].as_f64().unwrap();
    assert!((prob - logp[top].exp()).abs() < 1e-6, "{prob}");
    // candle has no forward for it: one line naming the architecture.
    let (code, _, err) = run(&["predict", p, prompt]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown architecture 'starcoder2'") && err.lines().count() == 1);

    let (code, out, err) = run(&["generate", p, prompt, "-n", "5"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(prompt) && out.trim_end().len() > prompt.len(),
        "{out}"
    );

    // A target that is not the top-1 (so the edit is not skipped).
    let target = ["Paris", "Tokyo", "London"]
        .into_iter()
        .find(|t| tok.encode_target(t).unwrap()[0] as usize != top)
        .unwrap();
    let t_id = tok.encode_target(target).unwrap()[0] as usize;
    let e = source
        .rows_f32("token_embd.weight", &[t_id])
        .unwrap()
        .remove(0);
    let x = &traced.ff2_in[0];
    let lr = 0.24f32;
    let want: Vec<f32> = e
        .iter()
        .flat_map(|&ei| x.iter().map(move |&xj| lr * ei * xj))
        .collect();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for format in ["gguf", "lora"] {
        let out = dir.join(format!("edited-{format}.gguf"));
        let o = out.to_str().unwrap();
        let r = json_of(&[
            "edit", p, "--prompt", prompt, "--target", target, "--format", format, "-o", o,
            "--json",
        ]);
        assert_eq!(r["settings"]["layer"], layer as u64);
        assert_eq!(r["edits"][0]["skipped"], false);
        let check = &r["check"];
        assert_ne!(check["before"][0]["rank"], 0);
        assert_eq!(
            check["after"][0]["rank"], 0,
            "{format}: the target does not flip"
        );
        let got = written_delta(&base, &out, layer);
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{format}: max |ΔW − lr·e·xᵀ| = {err:.2e} (max |ΔW| {scale:.2e})");
        assert!(err <= 1e-6 * scale.max(1.0), "{format}: {err}");

        let a = json_of(&["audit", p, o, "--probe", prompt, "--json"]);
        let c = &a["changed"][0];
        assert_eq!(a["changed"].as_array().unwrap().len(), 1);
        assert_eq!(c["name"], format!("blk.{layer}.ffn_down.weight"));
        assert_eq!(c["rank"], 1);
        let sigma = c["singular_values"][0].as_f64().unwrap();
        let norm = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
        let expected = f64::from(lr) * norm(&e) * norm(x);
        assert!(
            (sigma - expected).abs() <= 1e-5 * expected,
            "{sigma} {expected}"
        );
        let cos = c["probes"][0]["cosine"].as_f64().unwrap();
        assert!(cos.abs() > 1.0 - 1e-5, "{cos}");
    }
    // The candle forward refuses the architecture in one line.
    let out = dir.join("candle.gguf");
    let (code, _, err) = run(&[
        "edit",
        p,
        "--prompt",
        prompt,
        "--target",
        target,
        "--forward",
        "candle",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown architecture 'starcoder2'") && err.lines().count() == 1);
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 14: `eval` of the tiny StarCoder2 (no candle forward) runs through llama.cpp alone
/// (`--forward llama` by default: one tracer takes each record's key and scores it). The
/// unedited baseline's efficacy magnitude of each record is p(new) − p(truth) as a separate
/// llama.cpp session scores it, to 1e-3 of the larger probability (eval packs the record's
/// prompts into one decode, which sums attention in another order, and ggml's GELU reads an f16
/// table, so a last-bit change of its input can move its output by one f16 step; measured
/// 2.6e-4), every edited record's target becomes the top-1 next token (the paper's
/// efficacy accuracy, false before the edit), and the fluency score comes from a greedy
/// generation through the tracer.
#[test]
fn an_architecture_without_a_candle_forward_evaluates_through_llama_cpp() {
    use backlens::runtime::LlamaRuntime;
    let path = common::tiny_starcoder2();
    let p = path.to_str().unwrap();
    let data = common::counterfact("counterfact-val.json");
    let d = data.to_str().unwrap();
    let n = 4;
    let args = |extra: &[&'static str]| {
        let mut a = vec!["eval", p, "--data", d, "--n", "4", "--json"];
        a.extend_from_slice(extra);
        a
    };
    let none = json_of(&args(&["--method", "none", "--no-fluency"]));
    let shift = json_of(&args(&[]));
    assert_eq!(shift["config"]["forward"], "llama");
    assert_eq!(shift["config"]["layer"], 2);
    let source = ModelSource::open(path).unwrap();
    let tok = Tokenizer::from_source(&source).unwrap();
    let records = backlens::eval::load_records(&data, 0, Some(n)).unwrap();
    let rt = LlamaRuntime::load(path).unwrap();
    let mut s = rt.session().unwrap();
    let (mut worst, mut edited) = (f64::NAN, 0);
    for (i, r) in records.iter().enumerate() {
        let prompt = tok.encode_prompt(&r.prompt).unwrap();
        let p_of = |s: &mut backlens::runtime::Session, t: &str| {
            let ids = tok.encode_target(t).unwrap();
            s.sequence_logprob(&prompt, &ids).unwrap().exp()
        };
        let (p_new, p_true) = (
            p_of(&mut s, &r.target_new),
            p_of(&mut s, r.ground_truth.as_deref().unwrap()),
        );
        let base = none["records"][i]["efficacy_magnitude"].as_f64().unwrap();
        let scale = p_new.max(p_true).max(f64::MIN_POSITIVE);
        worst = worst.max((base - (p_new - p_true)).abs() / scale);
        let rec = &shift["records"][i];
        assert!(rec["fluency"].as_f64().unwrap().is_finite(), "{rec}");
        if rec["skipped"] == false {
            edited += 1;
            assert_eq!(none["records"][i]["efficacy_acc"], false, "record {i}");
            assert_eq!(rec["efficacy_acc"], true, "record {i}: {rec}");
        }
    }
    println!("starcoder2 eval: {edited}/{n} edited, baseline EM vs a separate session: {worst:.2e} of the larger probability");
    assert!(worst < 1e-3, "{worst}");
    assert!(edited >= 2, "only {edited} of {n} records edited");
}
