//! Foundation: readers, candle forward vs llama.cpp, tokenizer vs llama.cpp, dequantization.

mod common;

use backlens::arch::Arch;
use backlens::model::{log_softmax_last, Transformer};
use backlens::runtime::{argmax, log_probs, LlamaRuntime};
use backlens::tokenizer::Tokenizer;
use backlens::weights::quant::{self, GgmlType};
use backlens::weights::ModelSource;
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
    let fx = common::tiny(arch);
    let src = ModelSource::open(&fx.gguf).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let rt = LlamaRuntime::load(&fx.gguf).unwrap();
    let mut session = rt.session().unwrap();
    let mut worst = 0f32;
    for prompt in PROMPTS {
        let ids = tok.encode_prompt(prompt).unwrap();
        let ours = candle_logits(&model, &ids);
        let all: Vec<usize> = (0..ids.len()).collect();
        let theirs = session.logits_at(&ids, &all).unwrap();
        let max_logit = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(max_diff / max_logit);
        assert!(
            max_diff <= 1e-3 * max_logit,
            "{arch:?} {prompt:?}: max |Δlogit| {max_diff} > 1e-3 × {max_logit}"
        );
    }
    println!("{arch:?}: worst max|Δlogit| / max|logit| = {worst:.2e}");
}

#[test]
fn tiny_gpt2_candle_matches_llama_cpp() {
    tiny_parity(Arch::Gpt2);
}

#[test]
fn tiny_llama_candle_matches_llama_cpp() {
    tiny_parity(Arch::Llama);
}

#[test]
fn safetensors_and_gguf_give_the_same_logits() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let fx = common::tiny(arch);
        let a = ModelSource::open(&fx.gguf).unwrap();
        let b = ModelSource::open(&fx.hf).unwrap();
        let (ha, hb) = (a.hparams().unwrap(), b.hparams().unwrap());
        assert!((ha.norm_eps - hb.norm_eps).abs() < 1e-9, "{arch:?} eps");
        assert_eq!(
            (
                ha.n_layer,
                ha.n_embd,
                ha.n_ff,
                ha.n_head,
                ha.n_head_kv,
                ha.n_vocab,
                ha.n_ctx
            ),
            (
                hb.n_layer,
                hb.n_embd,
                hb.n_ff,
                hb.n_head,
                hb.n_head_kv,
                hb.n_vocab,
                hb.n_ctx
            ),
            "{arch:?} hparams"
        );
        let (ta, tb) = (
            Tokenizer::from_source(&a).unwrap(),
            Tokenizer::from_source(&b).unwrap(),
        );
        let (ma, mb) = (
            Transformer::load(&a, DType::F32).unwrap(),
            Transformer::load(&b, DType::F32).unwrap(),
        );
        for prompt in PROMPTS {
            let ids = ta.encode_prompt(prompt).unwrap();
            assert_eq!(ids, tb.encode_prompt(prompt).unwrap(), "{arch:?} tokens");
            let (la, lb) = (candle_logits(&ma, &ids), candle_logits(&mb, &ids));
            let diff = la
                .iter()
                .flatten()
                .zip(lb.iter().flatten())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5, "{arch:?} {prompt:?}: {diff}");
        }
    }
}

#[derive(serde::Deserialize)]
struct Record {
    prompt: String,
    target_new: String,
    ground_truth: String,
}

fn val_records() -> Vec<Record> {
    let text = std::fs::read_to_string(common::counterfact("counterfact-val.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn smollm2_candle_top1_agrees_with_llama_cpp() {
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let rt = LlamaRuntime::load(&path).unwrap();
    let mut session = rt.session().unwrap();
    let records = val_records();
    let (mut agree, mut kl_sum) = (0, 0f64);
    let mut confident_misses = Vec::new();
    for r in records.iter().take(200) {
        let ids = tok.encode_prompt(&r.prompt).unwrap();
        let theirs = log_probs(&session.logits_last(&ids).unwrap());
        let (logits, _) = model.forward(&ids, None).unwrap();
        let ours: Vec<f64> = log_softmax_last(
            &logits
                .narrow(0, ids.len() - 1, 1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let our_top = ours
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        let mut sorted = theirs.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let their_top = theirs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        kl_sum += theirs
            .iter()
            .zip(&ours)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
        if our_top == their_top {
            agree += 1;
        } else {
            // llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so a flip is
            // only acceptable where candle itself sees llama.cpp's choice as a near-tie.
            let candle_margin = ours[our_top] - ours[their_top];
            println!(
                "disagreement on {:?}: llama.cpp margin {:.3} nats, candle margin {:.3} nats",
                r.prompt,
                sorted[0] - sorted[1],
                candle_margin
            );
            if candle_margin > 0.1 {
                confident_misses.push(r.prompt.clone());
            }
        }
    }
    println!(
        "SmolLM2 top-1 agreement {agree}/200, mean KL(llama.cpp || candle) = {:.3e}",
        kl_sum / 200.0
    );
    assert!(agree >= 196, "top-1 agreement {agree}/200 < 98%");
    assert!(
        confident_misses.is_empty(),
        "disagreements where candle leads by > 0.1 nats: {confident_misses:?}"
    );
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let rt = LlamaRuntime::load(&path).unwrap();
    let mut checked = 0;
    for r in val_records() {
        assert_eq!(
            tok.encode_prompt(&r.prompt).unwrap(),
            rt.tokenize(&r.prompt, true),
            "{:?}",
            r.prompt
        );
        for t in [&r.target_new, &r.ground_truth] {
            let spaced = format!(" {t}");
            assert_eq!(
                tok.encode_target(t).unwrap(),
                rt.tokenize(&spaced, false),
                "{spaced:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 1919);
}

#[test]
fn smollm2_predicts_paris() {
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let ids = tok
        .encode_prompt("The Eiffel Tower is located in the city of")
        .unwrap();
    let logits = candle_logits(&model, &ids);
    let top = argmax(logits.last().unwrap()) as u32;
    assert_eq!(tok.token_text(top), " Paris");
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
