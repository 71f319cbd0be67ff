//! Foundation: readers, candle forward vs llama.cpp, tokenizer vs llama.cpp, dequantization.

mod common;

use backlens::arch::{Arch, HParams};
use backlens::model::{log_softmax_last, Numerics, Transformer};
use backlens::numeric::{argmax, log_probs};
use backlens::runtime::LlamaRuntime;
use backlens::weights::quant::{self, GgmlType};
use backlens::write::gguf::{GgufPlan, OutTensor};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device};

const PROMPTS: [&str; 3] = [
    "The Eiffel Tower is located in the city of",
    "Lionel Messi plays for",
    "She speaks French and English in",
];

fn candle_logits(model: &Transformer, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (logits, _) = model.forward(tokens, None).unwrap();
    logits.to_vec2::<f32>().unwrap()
}

fn tiny_parity(arch: Arch) {
    let worst = tiny_gap(&common::tiny(arch).gguf, Numerics::Exact);
    println!("{arch:?}: worst max|Δlogit| / max|logit| = {worst:.2e}");
    assert!(
        worst <= 1e-3,
        "{arch:?}: max |Δlogit| / max |logit| = {worst}"
    );
}

#[test]
fn tiny_gpt2_candle_matches_llama_cpp() {
    tiny_parity(Arch::Gpt2);
}

#[test]
fn tiny_llama_candle_matches_llama_cpp() {
    tiny_parity(Arch::Llama);
}

/// Llama 3.x: `rope_freqs.weight` factors, linear RoPE scaling and attention factor, biases.
#[test]
fn tiny_llama3_candle_matches_llama_cpp() {
    let worst = tiny_gap(&common::tiny_llama3().gguf, Numerics::Exact);
    println!("Llama 3.x: worst max|Δlogit| / max|logit| = {worst:.2e}");
    assert!(worst <= 1e-3, "llama3: {worst}");
}

/// Phi-3.5: LongRoPE factors (the short ones apply) and a RoPE attention factor.
#[test]
fn tiny_phi3_longrope_candle_matches_llama_cpp() {
    let worst = tiny_gap(&common::tiny_phi3_longrope().gguf, Numerics::Exact);
    println!("Phi-3 LongRoPE: worst max|Δlogit| / max|logit| = {worst:.2e}");
    assert!(worst <= 1e-3, "phi3 longrope: {worst}");
}

#[test]
fn tiny_qwen2_candle_matches_llama_cpp() {
    tiny_parity(Arch::Qwen2);
}

#[test]
fn tiny_qwen3_candle_matches_llama_cpp() {
    tiny_parity(Arch::Qwen3);
}

#[test]
fn tiny_phi3_candle_matches_llama_cpp() {
    tiny_parity(Arch::Phi3);
}

#[test]
fn tiny_gemma3_candle_matches_llama_cpp() {
    tiny_parity(Arch::Gemma3);
}

#[test]
fn safetensors_and_gguf_give_the_same_logits() {
    for arch in Arch::ALL {
        let mut worst = 0f32;
        let fx = common::tiny(arch);
        let (a, b) = (common::load(&fx.gguf), common::load(&fx.hf));
        let (ha, hb) = (&a.hp, &b.hp);
        assert!((ha.norm_eps - hb.norm_eps).abs() < 1e-9, "{arch:?} eps");
        // Everything else equal (the GGUF stores the epsilon as f32).
        let same_eps = |h: &HParams| HParams {
            norm_eps: 0.0,
            ..h.clone()
        };
        assert_eq!(same_eps(ha), same_eps(hb), "{arch:?} hparams");
        let (ta, tb) = (&a.tok, &b.tok);
        let (ma, mb) = (&a.model, &b.model);
        for prompt in PROMPTS {
            let ids = ta.encode_prompt(prompt).unwrap();
            assert_eq!(ids, tb.encode_prompt(prompt).unwrap(), "{arch:?} tokens");
            let (la, lb) = (candle_logits(ma, &ids), candle_logits(mb, &ids));
            let diff = la
                .iter()
                .flatten()
                .zip(lb.iter().flatten())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5, "{arch:?} {prompt:?}: {diff}");
            worst = worst.max(diff);
        }
        println!("{arch:?}: GGUF vs safetensors max |Δlogit| = {worst:.2e}");
    }
}

/// Top-1 agreement, llama.cpp top-1 margins where the two disagree, and mean KL(llama.cpp ‖ candle)
/// over the first 200 val prompts.
struct Agreement {
    agree: usize,
    /// (prompt, llama.cpp's margin, candle's margin for its own choice over llama.cpp's).
    flips: Vec<(String, f64, f64)>,
    mean_kl: f64,
}

fn agreement_with_llama_cpp(numerics: Numerics) -> Agreement {
    let path = common::smollm2();
    let common::Loaded { tok, model, .. } = common::load_with(&path, DType::F32, numerics);
    let rt = LlamaRuntime::load(&path).unwrap();
    let mut session = rt.session().unwrap();
    let mut out = Agreement {
        agree: 0,
        flips: Vec::new(),
        mean_kl: 0.0,
    };
    for r in common::val_records().iter().take(200) {
        let ids = tok.encode_prompt(&r.prompt).unwrap();
        let theirs = log_probs(&session.logits_last(&ids).unwrap());
        let (logits, _) = model.forward(&ids, None).unwrap();
        let last = logits.narrow(0, ids.len() - 1, 1).unwrap();
        let ours: Vec<f64> = log_softmax_last(&last.to_dtype(DType::F64).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        out.mean_kl += theirs
            .iter()
            .zip(&ours)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>()
            / 200.0;
        let top = |v: &[f64]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        if top(&ours) == top(&theirs) {
            out.agree += 1;
        } else {
            let mut sorted = theirs.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let candle_margin = ours[top(&ours)] - ours[top(&theirs)];
            out.flips
                .push((r.prompt.clone(), sorted[0] - sorted[1], candle_margin));
        }
    }
    println!(
        "{numerics:?}: top-1 agreement {}/200, mean KL(llama.cpp || candle) = {:.3e}, flips (prompt, llama.cpp margin in nats): {:?}",
        out.agree, out.mean_kl, out.flips
    );
    out
}

/// Issue 3's criterion for the exact f32 forward (what the lens and edits use): ≥ 98% top-1
/// agreement; llama.cpp multiplies Q4_1 weights with 8-bit activations, so a flip is accepted
/// only where candle itself sees llama.cpp's choice as a near-tie (< 0.1 nats). The forward
/// that rounds activations like llama.cpp is measured beside it and must lower the KL.
#[test]
fn smollm2_candle_top1_agrees_with_llama_cpp() {
    let exact = agreement_with_llama_cpp(Numerics::Exact);
    assert!(
        exact.agree >= 196,
        "top-1 agreement {}/200 < 98%",
        exact.agree
    );
    let confident: Vec<_> = exact.flips.iter().filter(|f| f.2 > 0.1).collect();
    assert!(
        confident.is_empty(),
        "disagreements where candle leads by > 0.1 nats: {confident:?}"
    );
    let emulated = agreement_with_llama_cpp(Numerics::LlamaCpp);
    assert!(
        emulated.mean_kl < exact.mean_kl,
        "rounding like llama.cpp should lower the KL: {:.3e} vs {:.3e}",
        emulated.mean_kl,
        exact.mean_kl
    );
}

/// The tiny Llama with every matrix stored as `ty`.
fn tiny_llama_as(ty: GgmlType) -> std::path::PathBuf {
    let fx = common::tiny(Arch::Llama);
    let src = backlens::weights::gguf::GgufFile::open(&fx.gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    for info in &src.tensors {
        if info.dims.len() != 2 {
            continue;
        }
        let values = quant::dequantize(info.ggml_type, src.tensor_bytes(info), &info.name).unwrap();
        let data = quant::quantize(ty, &values, info.dims[0] as usize, &info.name).unwrap();
        plan.replace(OutTensor {
            name: info.name.clone(),
            dims: info.dims.clone(),
            ggml_type: ty,
            data: std::borrow::Cow::Owned(data),
        })
        .unwrap();
    }
    let path = common::temp_dir("tiny-quantized").join(format!("tiny-llama-{}.gguf", ty.name()));
    plan.write(&path).unwrap();
    path
}

/// Largest |candle − llama.cpp| logit over the test prompts, relative to the largest |logit|.
fn tiny_gap(path: &std::path::Path, numerics: Numerics) -> f32 {
    let common::Loaded { tok, model, .. } = common::load_with(path, DType::F32, numerics);
    let rt = LlamaRuntime::load(path).unwrap();
    let mut session = rt.session().unwrap();
    let mut worst = 0f32;
    for prompt in PROMPTS {
        let ids = tok.encode_prompt(prompt).unwrap();
        let ours = candle_logits(&model, &ids);
        let all: Vec<usize> = (0..ids.len()).collect();
        let theirs = session.logits_at(&ids, &all).unwrap();
        let max_logit = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / max_logit);
    }
    worst
}

/// With Q8_0 or Q4_1 weights, rounding each matmul input as ggml does (8-bit blocks, f16 block
/// sums) reproduces llama.cpp's logits to float noise, while the exact forward is off by the
/// activation rounding. (F16 weights are not emulated exactly: ggml's F16 path is not covered.)
#[test]
fn ggml_rounding_reproduces_llama_cpp_on_quantized_weights() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let path = tiny_llama_as(ty);
        let exact = tiny_gap(&path, Numerics::Exact);
        let emulated = tiny_gap(&path, Numerics::LlamaCpp);
        println!(
            "{}: max |Δlogit| / max |logit|: exact {exact:.2e}, ggml rounding {emulated:.2e}",
            ty.name()
        );
        assert!(
            emulated < 1e-5,
            "{}: emulated gap {emulated:.2e}",
            ty.name()
        );
        assert!(
            exact > 100.0 * emulated,
            "{}: exact gap {exact:.2e}",
            ty.name()
        );
    }
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let path = common::smollm2();
    let tok = &common::smollm2_loaded().tok;
    let rt = LlamaRuntime::load(&path).unwrap();
    let checked = common::assert_tokenizer_matches_llama_cpp(tok, &rt, "SmolLM2");
    assert_eq!(checked, 1919);
}

#[test]
fn smollm2_predicts_paris() {
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let ids = tok
        .encode_prompt("The Eiffel Tower is located in the city of")
        .unwrap();
    let logits = candle_logits(model, &ids);
    let top = argmax(logits.last().unwrap()) as u32;
    assert_eq!(tok.token_text(top), " Paris");
}

/// The same through the command line, in both engines.
#[test]
fn predict_names_paris_through_both_engines() {
    let model = common::smollm2();
    for runtime in ["candle", "llama"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backlens-patch"))
            .args([
                "predict",
                model.to_str().unwrap(),
                "The Eiffel Tower is located in the city of",
                "-k",
                "1",
                "--json",
                "--runtime",
                runtime,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["top"][0]["token"], " Paris", "{runtime}");
    }
}

fn candle_dtype(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        other => panic!("no candle type for {}", other.name()),
    }
}

#[test]
fn dequantization_matches_between_ggml_and_candle() {
    let (rows, cols) = (4usize, 512usize);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.37).sin() * 2.0) + 0.1)
        .collect();
    for ty in GgmlType::TESTED {
        let bytes = quant::quantize(ty, &values, cols, "test").unwrap();
        assert_eq!(
            bytes.len() as u64,
            ty.bytes_for((rows * cols) as u64).unwrap()
        );
        let ours = quant::dequantize(ty, &bytes, "test").unwrap();
        let q =
            qtensor_from_ggml(candle_dtype(ty), &bytes, vec![rows, cols], &Device::Cpu).unwrap();
        let theirs: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_rel = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(
            max_rel <= 1e-6,
            "{}: ggml vs candle max relative diff {max_rel}",
            ty.name()
        );
        // The quantization itself is lossy but must stay close to the input.
        let err = values
            .iter()
            .zip(&ours)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err < 0.2, "{}: quantization error {err}", ty.name());
    }
}

/// ggml's Q8_1 activation rounding, decoded: each block of 32 becomes q·d with d = amax/127
/// stored as f16 and q = round(x / d), so every value moves by at most half a step.
#[test]
fn activation_rounding_is_blockwise_8_bit() {
    let mut row: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
        .collect();
    let original = row.clone();
    quant::round_activations(GgmlType::Q4_1.activation_type().unwrap(), &mut row).unwrap();
    assert_eq!(GgmlType::Q4_1.activation_type(), Some(GgmlType::Q8_1));
    for (block, orig) in row.chunks(32).zip(original.chunks(32)) {
        let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = half::f16::from_f32(amax / 127.0).to_f32();
        for (r, o) in block.iter().zip(orig) {
            let q = (o / (amax / 127.0)).round();
            assert!((r - q * d).abs() <= 1e-6 * amax, "{r} vs {}", q * d);
        }
    }
    assert_ne!(row, original);
}
