//! The tracing forward through llama.cpp ([`backlens::trace`]): FF2's input read off
//! llama.cpp's graph equals candle's, earlier edits reach it as an adapter, `edit --forward
//! llama` writes the same edit as `--forward candle`, and bad requests get one clear error.

mod common;

use backlens::arch::{ff2_weight, Arch};
use backlens::edit::{self, EditRequest, EditSettings, Method};
use backlens::model::{Numerics, Transformer};
use backlens::numeric::argmax;
use backlens::patch::{self, Format, Forward, Job, PatchReport, WhitenSetup};
use backlens::runtime::{Decoder, PromptQuery};
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::trace::Tracer;
use backlens::weights::gguf::GgufFile;
use backlens::weights::quant;
use backlens::write::gguf::{Ff2Type, GgufPlan, OutTensor};
use backlens::write::{OutputClaim, OutputKind};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

const PROMPT: &str = "Lionel Messi plays for";

/// Cosine similarity and ‖a − b‖ / ‖b‖, in f64.
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut ab, mut aa, mut bb, mut dd) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        dd += (x - y) * (x - y);
    }
    (ab / (aa.sqrt() * bb.sqrt()), (dd / bb).sqrt())
}

fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn open(path: &Path) -> (ModelSource, Tokenizer) {
    let src = ModelSource::open(path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    (src, tok)
}

/// ggml's CPU GELU (tanh form) as llama.cpp computes it: through a table of f16 results over
/// f16 inputs (`GGML_GELU_FP16`), exact outside (-10, 10).
fn ggml_gelu(h: f32) -> f32 {
    use half::f16;
    if h <= -10.0 {
        return 0.0;
    }
    if h >= 10.0 {
        return h;
    }
    let x = f16::from_f32(h).to_f32();
    let g = 0.5 * x * (1.0 + (0.797_884_6_f32 * x * (1.0 + 0.044_715 * x * x)).tanh());
    f16::from_f32(g).to_f32()
}

/// GPT-2's FF2 input at one position recomputed from candle's FF1 input with ggml's GELU:
/// what llama.cpp's x should equal when the trace reads the right tensor.
fn gpt2_x_with_ggml_gelu(src: &ModelSource, layer: usize, ff1_in: &[f32]) -> Vec<f32> {
    let (w, shape) = src
        .tensor_f32(&format!("blk.{layer}.ffn_up.weight"))
        .unwrap()
        .unwrap();
    let (b, _) = src
        .tensor_f32(&format!("blk.{layer}.ffn_up.bias"))
        .unwrap()
        .unwrap();
    let n_in = shape[1];
    w.chunks_exact(n_in)
        .zip(&b)
        .map(|(r, &bias)| {
            let h: f64 = r
                .iter()
                .zip(ff1_in)
                .map(|(&a, &x)| a as f64 * x as f64)
                .sum();
            ggml_gelu((h + bias as f64) as f32)
        })
        .collect()
}

/// (a) On the tiny F32 fixtures, llama.cpp's FF2 inputs equal candle's at every layer, at the
/// last position and at earlier ones (the last layer of llama.cpp's graph keeps only the output
/// rows), and the last position's logits agree. GPT-2's GELU runs in ggml through an f16 table
/// (relative rounding up to 2⁻¹¹) and that rounding carries into the later layers, so there x
/// is held to the f16 rounding (1e-3) against candle's exact GELU, and at layer 0 (where both
/// see the same FF1 input) to 1e-6 against candle's FF1 output put through ggml's table.
#[test]
fn tiny_f32_trace_equals_candle_at_every_layer() {
    for arch in [Arch::Llama, Arch::Gpt2] {
        let f = common::tiny(arch);
        let (src, tok) = open(&f.gguf);
        let model = Transformer::load(&src, DType::F32).unwrap();
        let ids = tok.encode_prompt(PROMPT).unwrap();
        let (logits, trace) = model.forward(&ids, None).unwrap();
        let last = ids.len() - 1;
        let layers: Vec<usize> = (0..f.hp.n_layer).collect();
        let mut tracer = Tracer::load(&f.gguf).unwrap();
        let got = tracer.last_position(&ids, &layers).unwrap();
        let exact_rel = if arch == Arch::Gpt2 { 1e-3 } else { 1e-4 };
        let (mut worst_cos, mut worst_rel, mut worst_gelu_rel) = (1f64, 0f64, 0f64);
        for &l in &layers {
            let (cos, rel) = compare(&got.ff2_in[l], &row(&trace.ff2_in[l], last));
            let mut line = format!(
                "{}: layer {l}: cosine {cos:.8}, rel err {rel:.2e}",
                arch.name()
            );
            if arch == Arch::Gpt2 && l == 0 {
                let want = gpt2_x_with_ggml_gelu(&src, l, &row(&trace.ff1_in[l], last));
                let (_, gelu_rel) = compare(&got.ff2_in[l], &want);
                line += &format!("; against ggml's f16 GELU: rel err {gelu_rel:.2e}");
                worst_gelu_rel = worst_gelu_rel.max(gelu_rel);
            }
            println!("{line}");
            worst_cos = worst_cos.min(cos);
            worst_rel = worst_rel.max(rel);
        }
        let want_logits = row(&logits, last);
        let (cos, rel) = compare(&got.logits, &want_logits);
        println!(
            "{}: last-position logits: cosine {cos:.8}, rel err {rel:.2e}",
            arch.name()
        );
        assert!(
            worst_cos >= 0.99999 && worst_rel <= exact_rel,
            "{}",
            arch.name()
        );
        assert!(worst_gelu_rel <= 1e-6, "{}: {worst_gelu_rel}", arch.name());
        assert!(cos >= 0.99999 && rel <= exact_rel, "{}", arch.name());
        assert_eq!(argmax(&got.logits), argmax(&want_logits));

        // Several positions, given unsorted and with a repeat, come back in the order asked.
        let positions = [last, 0, last / 2, 0];
        let rows = tracer.trace(&ids, &layers, &positions).unwrap();
        for &l in &layers {
            for (k, &p) in positions.iter().enumerate() {
                let (cos, rel) = compare(&rows.ff2_in[l][k], &row(&trace.ff2_in[l], p));
                assert!(
                    cos >= 0.99999 && rel <= exact_rel,
                    "{}: layer {l} position {p}: {cos} {rel}",
                    arch.name()
                );
            }
        }
        // More output rows change how the last layer's products are tiled, not their values.
        let (cos, rel) = compare(&rows.logits, &got.logits);
        assert!(
            cos >= 0.99999 && rel <= 1e-5,
            "{}: {cos} {rel}",
            arch.name()
        );
    }
}

/// An edit applied to the tracer (as an adapter) changes the trace exactly as applying it to
/// candle's model does, and the adapter's own matrix products on the traced weight are not taken
/// for the base one.
#[test]
fn applied_deltas_reach_the_trace() {
    let f = common::tiny(Arch::Llama);
    let (src, tok) = open(&f.gguf);
    let mut model = Transformer::load(&src, DType::F32).unwrap();
    let settings = EditSettings {
        method: Method::Shift,
        layer: 1,
        lr: 2.0,
    };
    let req = EditRequest::new(PROMPT, "Paris", None).unwrap();
    let delta = edit::compute(&model, &tok, &req, &settings)
        .unwrap()
        .delta
        .expect("not already top-1");
    model.apply_delta(&delta).unwrap();
    let ids = tok.encode_prompt("The Eiffel Tower is located in").unwrap();
    let (logits, trace) = model.forward(&ids, None).unwrap();
    let last = ids.len() - 1;
    let mut tracer = Tracer::load(&f.gguf).unwrap();
    let before = tracer.last_position(&ids, &[0, 1, 2]).unwrap();
    tracer.apply_deltas(&[delta]).unwrap();
    let after = tracer.last_position(&ids, &[0, 1, 2]).unwrap();
    for l in 0..3 {
        let (cos, rel) = compare(&after.ff2_in[l], &row(&trace.ff2_in[l], last));
        println!("edited: layer {l}: cosine {cos:.8}, rel err {rel:.2e}");
        assert!(cos >= 0.99999 && rel <= 1e-4, "layer {l}");
    }
    // Layers up to the edited one see the same input; the one after does not.
    assert_eq!(after.ff2_in[0], before.ff2_in[0]);
    assert_ne!(after.ff2_in[2], before.ff2_in[2]);
    let (cos, rel) = compare(&after.logits, &row(&logits, last));
    assert!(cos >= 0.99999 && rel <= 1e-4, "logits {cos} {rel}");
    tracer.apply_deltas(&[]).unwrap();
    let cleared = tracer.last_position(&ids, &[0, 1, 2]).unwrap();
    assert_eq!(cleared.ff2_in, before.ff2_in);
    assert_eq!(cleared.logits, before.logits);
}

/// `Tracer::score_edited` scores each record with its own adapter, and on two or three
/// one-thread contexts at once exactly as on the tracer's one context (every logit bit for bit):
/// eval's per-record scores do not depend on the lanes.
#[test]
fn records_scored_side_by_side_equal_one_context() {
    let f = common::tiny(Arch::Llama);
    let (src, tok) = open(&f.gguf);
    let model = Transformer::load(&src, DType::F32).unwrap();
    let deltas: Vec<_> = [("Paris", 1, 2.0), ("Rome", 2, 1.5)]
        .iter()
        .map(|&(target, layer, lr)| {
            let settings = EditSettings {
                method: Method::Shift,
                layer,
                lr,
            };
            let req = EditRequest::new(PROMPT, target, None).unwrap();
            edit::compute(&model, &tok, &req, &settings)
                .unwrap()
                .delta
                .expect("not already top-1")
        })
        .collect();
    let edits = vec![
        vec![deltas[0].clone()],
        vec![],
        vec![deltas[1].clone()],
        vec![deltas[0].clone(), deltas[1].clone()],
        vec![],
    ];
    let prompt = tok.encode_prompt("The Eiffel Tower is located in").unwrap();
    let cont = tok.encode_target("the city of Paris").unwrap();
    let score = |d: &mut dyn Decoder| -> backlens::Result<(Vec<f32>, f64)> {
        let q = PromptQuery {
            prompt: &prompt,
            continuations: vec![&cont],
        };
        let s = backlens::runtime::score(d, &[q])?.remove(0);
        Ok((s.next_logits, s.logprobs[0]))
    };
    let mut tracer = Tracer::load(&f.gguf).unwrap();
    let one: Vec<_> = edits
        .iter()
        .map(|e| {
            tracer.apply_deltas(e).unwrap();
            score(&mut tracer).unwrap()
        })
        .collect();
    assert_ne!(one[0].0, one[1].0, "the edit changes the logits");
    assert_ne!(one[0].0, one[2].0, "each record has its own edit");
    assert_eq!(one[1].0, one[4].0);
    for threads in [1, 2, 3] {
        let lanes = tracer
            .score_edited(threads, &edits, |_, lane| score(lane))
            .unwrap();
        for (i, (a, b)) in one.iter().zip(&lanes).enumerate() {
            assert_eq!(a.0, b.0, "{threads} threads, record {i}: logits");
            assert_eq!(
                a.1.to_bits(),
                b.1.to_bits(),
                "{threads} threads, record {i}"
            );
        }
    }
    // The tracer traces as before afterwards (no adapter left applied).
    tracer.apply_deltas(&[]).unwrap();
    assert_eq!(score(&mut tracer).unwrap().0, one[1].0);
}

#[derive(serde::Deserialize)]
struct Record {
    prompt: String,
}

/// SmolLM2 with every tensor dequantized to F32, written to `out` (same values, so llama.cpp
/// then does exact f32 arithmetic like candle).
fn f32_copy(path: &Path, out: &Path) {
    let g = GgufFile::open(path).unwrap();
    let mut plan = GgufPlan::copy_of(&g);
    for t in &g.tensors {
        if t.ggml_type != quant::GgmlType::F32 {
            let v = quant::dequantize(t.ggml_type, g.tensor_bytes(t), &t.name).unwrap();
            plan.replace(OutTensor::f32(&t.name, &t.shape(), &v))
                .unwrap();
        }
    }
    plan.write(out).unwrap();
}

/// (b) SmolLM2 on 20 val records. With its weights dequantized to F32, llama.cpp's x equals
/// candle's at every one of the 30 layers. On the Q4_1 file itself llama.cpp rounds each
/// matmul input to 8-bit blocks (Q8_1) with an F32 KV cache and flash attention off, and that
/// rounding makes its forward chaotic: a last-bit change (the same prompt decoded after 1 to 7
/// cells of another sequence, so ggml's 8-float chunks sum the attention in another order)
/// flips some roundings, which later layers amplify. candle with ggml's arithmetic
/// (`Numerics::LlamaCpp`: Q8_1 inputs and ggml's own dot products, RMSNorm's f64 sum, RoPE's
/// f32 angles and fused rotation, softmax and SwiGLU by ggml's kernels, V·P in its 8-lane
/// tiles) equals llama.cpp's x bit for bit at every layer; candle's exact f32 forward is off by
/// the activation rounding (layer 22: cosine min 0.99351, mean 0.99877).
#[test]
fn smollm2_trace_matches_candle_on_20_records() {
    let path = common::smollm2();
    let (src, tok) = open(&path);
    let model = Transformer::load(&src, DType::F32).unwrap();
    let dir = common::temp_dir("trace-f32");
    let f32_path = dir.join("smollm2-f32.gguf");
    f32_copy(&path, &f32_path);
    let text = std::fs::read_to_string(common::counterfact("counterfact-val.json")).unwrap();
    let records: Vec<Record> = serde_json::from_str(&text).unwrap();
    let emulated = Transformer::load_with(&src, DType::F32, Numerics::LlamaCpp).unwrap();
    let mut quantized = Tracer::load(&path).unwrap();
    let mut exact = Tracer::load(&f32_path).unwrap();
    let layers: Vec<usize> = (0..30).collect();
    let (mut min, mut sum, mut max_rel, mut top1_same) = (1f64, 0f64, 0f64, 0);
    let (mut f32_min, mut f32_rel, mut f32_logit_rel) = (1f64, 0f64, 0f64);
    let (mut emu_differing, mut self_min) = (0usize, 1f64);
    println!("record | tokens | cos(trace, candle exact) | cos(trace, shifted trace) min | x values differing from candle-ggml (30 layers)");
    for (i, r) in records.iter().take(20).enumerate() {
        let ids = tok.encode_prompt(&r.prompt).unwrap();
        let (_, emu) = emulated.forward(&ids, None).unwrap();
        let (logits, trace) = model.forward(&ids, None).unwrap();
        let last = ids.len() - 1;
        let want_logits = row(&logits, last);
        let f = exact.last_position(&ids, &layers).unwrap();
        for &l in &layers {
            let (cos, rel) = compare(&f.ff2_in[l], &row(&trace.ff2_in[l], last));
            f32_min = f32_min.min(cos);
            f32_rel = f32_rel.max(rel);
        }
        f32_logit_rel = f32_logit_rel.max(compare(&f.logits, &want_logits).1);
        let q = quantized.last_position(&ids, &layers).unwrap();
        let differing: usize = layers
            .iter()
            .map(|&l| {
                let e = row(&emu.ff2_in[l], last);
                e.iter().zip(&q.ff2_in[l]).filter(|(a, b)| a != b).count()
            })
            .sum();
        emu_differing += differing;
        let mut shifted_min = 1f64;
        for shift in 1..8 {
            let other: Vec<u32> = ids.iter().cycle().take(shift).copied().collect();
            let shifted = quantized.last_positions(&[&other, &ids], &[22]).unwrap();
            shifted_min = shifted_min.min(compare(&q.ff2_in[22], &shifted[1].ff2_in[0]).0);
        }
        self_min = self_min.min(shifted_min);
        let (cos, rel) = compare(&q.ff2_in[22], &row(&trace.ff2_in[22], last));
        min = min.min(cos);
        sum += cos;
        max_rel = max_rel.max(rel);
        top1_same += usize::from(argmax(&q.logits) == argmax(&want_logits));
        println!(
            "{i} | {} | {cos:.6} | {shifted_min:.6} | {differing}",
            ids.len()
        );
    }
    println!(
        "SmolLM2 F32 copy, 30 layers x 20 val records: x cosine min {f32_min:.8}, worst rel err {f32_rel:.2e}; logits worst rel err {f32_logit_rel:.2e}"
    );
    println!(
        "SmolLM2 Q4_1 layer 22, 20 val records: x cosine vs exact f32 candle min {min:.6}, mean {:.6}; worst rel err {max_rel:.2e}; same top-1 as candle {top1_same}/20",
        sum / 20.0
    );
    println!(
        "  vs candle with ggml's arithmetic: {emu_differing} values differ over 30 layers x 20 records; llama.cpp vs itself at shifted KV cells: min {self_min:.6}"
    );
    drop(exact);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(f32_min >= 0.99999 && f32_rel <= 1e-4 && f32_logit_rel <= 1e-4);
    assert!(min >= 0.99 && sum / 20.0 >= 0.998, "{min} {}", sum / 20.0);
    assert!(self_min >= 0.999, "llama.cpp against itself: {self_min}");
    assert_eq!(
        emu_differing, 0,
        "candle with ggml's arithmetic against llama.cpp's trace"
    );
}

/// The dense ΔW of the edited FF2 in a written output: patched minus base for a GGUF, B·A for a
/// LoRA adapter.
fn written_delta(base: &GgufFile, out: &Path, format: Format, layer: usize) -> Vec<f32> {
    let name = ff2_weight(layer);
    let g = GgufFile::open(out).unwrap();
    let read = |g: &GgufFile, n: &str| {
        let t = g
            .tensor(n)
            .unwrap_or_else(|| panic!("{n} in {}", out.display()));
        (
            quant::dequantize(t.ggml_type, g.tensor_bytes(t), n).unwrap(),
            t.shape(),
        )
    };
    match format {
        Format::Gguf => {
            let (patched, _) = read(&g, &name);
            let (orig, _) = read(base, &name);
            patched.iter().zip(&orig).map(|(a, b)| a - b).collect()
        }
        _ => {
            // lora_a: rows vᵢ [r, n_in]; lora_b: [n_out, r].
            let (a, sa) = read(&g, &format!("{name}.lora_a"));
            let (b, sb) = read(&g, &format!("{name}.lora_b"));
            let (r, n_in, n_out) = (sa[0], sa[1], sb[0]);
            let mut w = vec![0f32; n_out * n_in];
            for o in 0..n_out {
                for i in 0..r {
                    let bo = b[o * r + i];
                    for j in 0..n_in {
                        w[o * n_in + j] += bo * a[i * n_in + j];
                    }
                }
            }
            w
        }
    }
}

fn run_edit(
    path: &Path,
    reqs: &[EditRequest],
    layer: usize,
    format: Format,
    forward: Forward,
    check: bool,
    out: &Path,
) -> PatchReport {
    let (src, tok) = open(path);
    let job = Job {
        requests: reqs.to_vec(),
        settings: EditSettings {
            method: Method::Shift,
            layer,
            lr: 0.24,
        },
        whiten: WhitenSetup::default(),
        format,
        ff2_type: Ff2Type::F32,
        check,
        forward,
        threads: None,
    };
    let claim = OutputClaim::new(out, OutputKind::File, &[path], false).unwrap();
    patch::run(&src, &tok, &job, claim).unwrap()
}

/// (c) `patch::run` writes the same ΔW with either forward, as a GGUF and as a LoRA adapter, for
/// a sequence of two edits (the second computed with the first applied); on SmolLM2 the edits
/// flip their targets through llama.cpp.
#[test]
fn edits_from_either_forward_agree_and_flip_the_target() {
    let dir = common::temp_dir("trace-edit");
    let reqs = vec![
        EditRequest::new(PROMPT, "Paris", None).unwrap(),
        EditRequest::new("The Eiffel Tower is located in", "Rome", None).unwrap(),
    ];
    let cases: [(PathBuf, usize, f64, f64, bool); 3] = [
        (
            common::tiny(Arch::Llama).gguf.clone(),
            1,
            0.99999,
            1e-4,
            false,
        ),
        // ggml's f16 GELU table (see the first test).
        (
            common::tiny(Arch::Gpt2).gguf.clone(),
            1,
            0.99999,
            1e-3,
            false,
        ),
        // Q4_1: the two forwards' x differ by llama.cpp's 8-bit rounding of matmul inputs.
        (common::smollm2(), 22, 0.995, 0.1, true),
    ];
    for (n, (path, layer, min_cos, max_rel, check)) in cases.iter().enumerate() {
        let base = GgufFile::open(path).unwrap();
        for format in [Format::Gguf, Format::Lora] {
            let mut written = Vec::new();
            let mut reports = Vec::new();
            for forward in [Forward::Llama, Forward::Candle] {
                let out = dir.join(format!("{n}-{}-{forward}.gguf", format.name()));
                let report = run_edit(path, &reqs, *layer, format, forward, *check, &out);
                written.push(written_delta(&base, &out, format, *layer));
                reports.push(report);
            }
            let (cos, rel) = compare(&written[0], &written[1]);
            println!(
                "{} {format}: ΔW llama vs candle: cosine {cos:.8}, rel err {rel:.2e}",
                path.display()
            );
            assert!(cos >= *min_cos && rel <= *max_rel, "{cos} {rel}");
            let skipped = |r: &PatchReport| -> Vec<(bool, String)> {
                r.edits
                    .iter()
                    .map(|e| (e.skipped, e.top1_before.clone()))
                    .collect()
            };
            assert_eq!(skipped(&reports[0]), skipped(&reports[1]));
            if *check {
                // The base's probes: on the tracer the edit ran on (llama.cpp forward) and on a
                // fresh llama.cpp load of the base (candle forward) alike.
                let [a, b] = [0, 1].map(|k| &reports[k].check.as_ref().unwrap().before);
                for (a, b) in a.iter().zip(b) {
                    assert_eq!((a.rank, &a.top1), (b.rank, &b.top1), "{:?}", a.prompt);
                    assert!((a.prob - b.prob).abs() <= 1e-6, "{} {}", a.prob, b.prob);
                }
                for r in &reports {
                    let c = r.check.as_ref().unwrap();
                    for (i, req) in reqs.iter().enumerate() {
                        println!(
                            "  {:?}: top-1 {:?} -> {:?} (p {:.4} -> {:.4})",
                            req.prompt,
                            c.before[i].top1,
                            c.after[i].top1,
                            c.before[i].prob,
                            c.after[i].prob
                        );
                        assert_eq!(c.after[i].rank, 0, "{:?}", req.prompt);
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn expect_err<T: std::fmt::Debug>(r: backlens::Result<T>, needles: &[&str]) -> String {
    let msg = r.expect_err("should fail").to_string();
    println!("{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
    msg
}

/// A copy of the tiny Llama fixture with each layer's `ffn_down.weight` renamed by `rename`.
fn renamed_down(dir: &Path, name: &str, rename: &str) -> PathBuf {
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    for t in &mut plan.tensors {
        if t.name.ends_with(".ffn_down.weight") {
            t.name = t.name.replace("ffn_down.weight", rename);
        }
    }
    let path = dir.join(name);
    plan.write(&path).unwrap();
    path
}

/// (d) A layer past the last, a mixture-of-experts FFN and a model without a down projection
/// each get one clear error naming the file and the layer.
#[test]
fn bad_layers_and_models_get_one_clear_error() {
    let f = common::tiny(Arch::Llama);
    let (src, tok) = open(&f.gguf);
    let ids = tok.encode_prompt(PROMPT).unwrap();
    let mut tracer = Tracer::load(&f.gguf).unwrap();
    let file = f.gguf.to_str().unwrap();
    expect_err(
        tracer.last_position(&ids, &[3]),
        &[file, "layer 3", "0 to 2"],
    );
    expect_err(tracer.last_position(&ids, &[1, 1]), &[file, "layer 1"]);
    expect_err(tracer.trace(&ids, &[1], &[ids.len()]), &[file, "position"]);
    expect_err(tracer.last_position(&[], &[1]), &[file, "nothing"]);
    expect_err(tracer.last_position(&[1_000_000], &[1]), &[file, "1000000"]);
    // The tracer still works after refusing.
    assert_eq!(
        tracer.last_position(&ids, &[2]).unwrap().ff2_in[0].len(),
        128
    );

    let settings = EditSettings {
        method: Method::Shift,
        layer: 7,
        lr: 0.24,
    };
    let reqs = [EditRequest::new(PROMPT, "Paris", None).unwrap()];
    let ws = WhitenSetup::default();
    expect_err(
        patch::compute(&src, &tok, &reqs, &settings, &ws, Forward::Llama, None),
        &["layer 7"],
    );
    let grad = EditSettings {
        method: Method::Grad,
        layer: 1,
        lr: 0.24,
    };
    expect_err(
        patch::compute(&src, &tok, &reqs, &grad, &ws, Forward::Llama, None),
        &["--forward llama", "grad"],
    );

    let dir = common::temp_dir("trace-bad");
    let moe = renamed_down(&dir, "moe.gguf", "ffn_down_exps.weight");
    expect_err(
        Tracer::load(&moe),
        &[
            moe.to_str().unwrap(),
            "layer 0",
            "mixture-of-experts",
            "ffn_down_exps",
        ],
    );
    let none = renamed_down(&dir, "none.gguf", "ffn_out.weight");
    expect_err(
        Tracer::load(&none),
        &[none.to_str().unwrap(), "layer 0", "blk.0.ffn_down.weight"],
    );
}

/// (e) `eval --forward llama` takes each record's key and skip rule from llama.cpp's trace: on
/// the tiny F32 Llama (where both forwards agree to 1e-6) every record's outcome equals the
/// candle key's and the efficacy magnitudes agree to 1e-4, one edit at a time and sequentially
/// (earlier edits reach the trace as an adapter). Rules that need candle are refused.
#[test]
fn eval_keys_from_llama_cpp_score_like_candle_keys() {
    use backlens::eval::{self, EvalConfig, LayerChoice, LrChoice};
    let f = common::tiny(Arch::Llama);
    let l = common::load(&f.gguf);
    let records =
        eval::load_records(&common::counterfact("counterfact-val.json"), 0, Some(6)).unwrap();
    let dir = common::temp_dir("trace-eval");
    let config = |sequential, forward, lr| EvalConfig {
        method: Some(Method::Shift),
        layer: LayerChoice::Fixed(1),
        lr,
        sequential,
        fluency: false,
        ff2_type: Ff2Type::F32,
        forward,
    };
    for sequential in [false, true] {
        let [candle, llama] = [Forward::Candle, Forward::Llama].map(|forward| {
            let mut model = l.model.clone();
            let c = config(sequential, forward, LrChoice::Fixed(0.24));
            eval::evaluate(&f.gguf, &mut model, &l.tok, &records, &c, &dir, |_| {}).unwrap()
        });
        let edited = candle.records.iter().filter(|r| !r.skipped).count();
        assert!(edited >= 3, "only {edited} of 6 records edited");
        let mut worst = 0f64;
        for (a, b) in candle.records.iter().zip(&llama.records) {
            assert_eq!(
                (
                    a.skipped,
                    a.efficacy,
                    a.paraphrase,
                    a.neighborhood,
                    a.neighborhood_top1
                ),
                (
                    b.skipped,
                    b.efficacy,
                    b.paraphrase,
                    b.neighborhood,
                    b.neighborhood_top1
                ),
                "record {:?}",
                a.case_id
            );
            worst = worst.max((a.efficacy_magnitude - b.efficacy_magnitude).abs());
        }
        println!("sequential {sequential}: {edited}/6 edited, worst |ΔEM| {worst:.2e}");
        assert!(worst <= 1e-4, "{worst}");
    }
    let mut model = l.model.clone();
    let auto = config(false, Forward::Llama, LrChoice::Auto);
    let err = eval::evaluate(&f.gguf, &mut model, &l.tok, &records, &auto, &dir, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--forward llama runs shift with a fixed"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
