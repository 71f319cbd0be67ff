//! Edits written to files: ΔW read back equals lr · e xᵀ, untouched tensors are byte-identical,
//! LoRA and patched GGUF agree in llama.cpp, efficacy on val records, determinism.

mod common;

use backlens::arch::{ff2_weight, hf, Arch};
use backlens::edit::{self, EditOutcome, EditRequest, EditSettings, Method};
use backlens::lora;
use backlens::model::Transformer;
use backlens::numeric::argmax;
use backlens::runtime::LlamaRuntime;
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::GgufFile;
use backlens::weights::quant;
use backlens::write::gguf::{patch_plan, Ff2Type};
use backlens::write::safetensors;
use std::path::Path;

const PROMPT: &str = "Lionel Messi plays for";

/// lr · e xᵀ computed here from the model's own forward trace and embedding matrix.
fn expected_delta(
    model: &Transformer,
    tok: &Tokenizer,
    layer: usize,
    lr: f32,
    target: &str,
) -> Vec<f32> {
    let ids = tok.encode_prompt(PROMPT).unwrap();
    let (_, trace) = model.forward(&ids, None).unwrap();
    let x: Vec<f32> = trace.ff2_in[layer]
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let t = tok.encode_target(target).unwrap()[0];
    let e: Vec<f32> = model.tok_embd.get(t as usize).unwrap().to_vec1().unwrap();
    e.iter()
        .flat_map(|&ei| x.iter().map(move |&xj| lr * ei * xj))
        .collect()
}

fn rel_frobenius(got: &[f32], want: &[f32]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn dequant(g: &GgufFile, name: &str) -> Vec<f32> {
    let t = g.tensor(name).unwrap();
    quant::dequantize(t.ggml_type, g.tensor_bytes(t), name).unwrap()
}

/// Writes a shift edit of `path` as an F32-patched GGUF and returns ΔW read back and expected.
fn gguf_delta_roundtrip(
    path: &Path,
    layer: usize,
    target: &str,
    out: &Path,
) -> (Vec<f32>, Vec<f32>) {
    let common::Loaded {
        source: src,
        tok,
        model,
        ..
    } = common::load(path);
    let settings = EditSettings {
        method: Method::Shift,
        layer,
        lr: 0.24,
    };
    let req = EditRequest::new(PROMPT, target, None).unwrap();
    let outcome = edit::compute(&model, &tok, &req, &settings).unwrap();
    let delta = outcome.delta.expect("target is not already top-1");
    let ModelSource::Gguf(g) = &src else {
        unreachable!()
    };
    patch_plan(g, &[delta], Ff2Type::F32, &[])
        .unwrap()
        .write(out)
        .unwrap();
    let patched = GgufFile::open(out).unwrap();
    let name = ff2_weight(layer);
    assert_eq!(
        patched.tensor(&name).unwrap().ggml_type,
        quant::GgmlType::F32
    );
    let got: Vec<f32> = dequant(&patched, &name)
        .iter()
        .zip(dequant(g, &name))
        .map(|(a, b)| a - b)
        .collect();
    let want = expected_delta(&model, &tok, layer, 0.24, target);
    assert_eq!(got.len(), want.len(), "{name}: element count");
    (got, want)
}

#[test]
fn written_delta_equals_lr_e_xt_on_tiny_models_of_every_family_and_smollm2() {
    let dir = common::temp_dir("delta");
    let mut cases: Vec<(std::path::PathBuf, usize, &str)> = Arch::ALL
        .iter()
        .map(|&a| (common::tiny(a).gguf.clone(), 2 - a as usize % 2, "Paris"))
        .collect();
    cases.push((common::tiny_llama3().gguf.clone(), 1, "Paris"));
    cases.push((common::smollm2(), 22, "Paris"));
    for (i, (path, layer, target)) in cases.iter().enumerate() {
        let (got, want) =
            gguf_delta_roundtrip(path, *layer, target, &dir.join(format!("{i}.gguf")));
        let err = rel_frobenius(&got, &want);
        println!(
            "{}: ‖ΔW_file − lr·e·xᵀ‖/‖lr·e·xᵀ‖ = {err:.2e}",
            path.display()
        );
        assert!(err <= 1e-5, "{}: {err}", path.display());
    }
}

/// For each family's tiny model: the shift edit (lr doubled from 0.24 until candle's edited
/// model predicts the target) written as an F32-patched GGUF and as a LoRA adapter makes
/// llama.cpp predict the target too, where it did not before.
#[test]
fn shift_edit_flips_the_target_in_llama_cpp_for_every_family() {
    let dir = common::temp_dir("flip");
    let mut fixtures: Vec<&common::Fixture> = Arch::ALL.iter().map(|&a| common::tiny(a)).collect();
    fixtures.push(common::tiny_llama3());
    for fx in fixtures {
        let name = fx.gguf.file_stem().unwrap().to_string_lossy().to_string();
        let common::Loaded {
            source: src,
            tok,
            model,
            hp,
        } = common::load(&fx.gguf);
        let ids = tok.encode_prompt(PROMPT).unwrap();
        let rt = LlamaRuntime::load(&fx.gguf).unwrap();
        let base_logits = rt.session().unwrap().logits_last(&ids).unwrap();
        let before = argmax(&base_logits);
        // The runner-up in llama.cpp's ranking that is a whole word the target encoder gives
        // back as its first token.
        let mut order: Vec<usize> = (0..base_logits.len()).collect();
        order.sort_by(|&a, &b| base_logits[b].total_cmp(&base_logits[a]));
        let (target, target_id) = order[1..]
            .iter()
            .find_map(|&id| {
                let text = tok.decode(&[id as u32]);
                let word = text.strip_prefix(' ')?.to_string();
                let ids = tok.encode_target(&word).ok()?;
                (ids.first() == Some(&(id as u32)) && !word.trim().is_empty()).then_some((word, id))
            })
            .unwrap();
        let target = target.as_str();
        // Gemma's post-FFN norm bounds what FF2 can write, so the shift may need the last layer.
        let (mut layer, mut lr) = (hp.n_layer - 2, 0.24);
        let delta = loop {
            let settings = EditSettings {
                method: Method::Shift,
                layer,
                lr,
            };
            let req = EditRequest::new(PROMPT, target, None).unwrap();
            let delta = edit::compute(&model, &tok, &req, &settings)
                .unwrap()
                .delta
                .expect("target is not top-1");
            let mut edited = model.clone();
            edited.apply_delta(&delta).unwrap();
            let (logits, _) = edited.forward(&ids, None).unwrap();
            let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
            if argmax(&last) == target_id || (lr > 100.0 && layer == hp.n_layer - 1) {
                break delta;
            }
            lr *= 2.0;
            if lr > 100.0 && layer < hp.n_layer - 1 {
                (layer, lr) = (layer + 1, 0.24);
            }
        };
        let ModelSource::Gguf(g) = &src else {
            unreachable!()
        };
        let patched = dir.join(format!("{name}-patched.gguf"));
        let adapter = dir.join(format!("{name}-lora.gguf"));
        patch_plan(g, std::slice::from_ref(&delta), Ff2Type::F32, &[])
            .unwrap()
            .write(&patched)
            .unwrap();
        lora::write_adapter(&adapter, hp.arch.name(), std::slice::from_ref(&delta), &[]).unwrap();
        let via_gguf = argmax(
            &LlamaRuntime::load(&patched)
                .unwrap()
                .session()
                .unwrap()
                .logits_last(&ids)
                .unwrap(),
        );
        let mut base = LlamaRuntime::load(&fx.gguf).unwrap();
        let mut a = base.load_lora(&adapter).unwrap();
        let mut s = base.session().unwrap();
        s.set_lora(&mut a, 1.0).unwrap();
        let via_lora = argmax(&s.logits_last(&ids).unwrap());
        println!(
            "{name}: layer {layer}, lr {lr}: llama.cpp top-1 {before} -> {via_gguf} (GGUF), {via_lora} (LoRA); target {target:?} = {target_id}"
        );
        assert_eq!(via_gguf, target_id, "{name}: patched GGUF");
        assert_eq!(via_lora, target_id, "{name}: LoRA");
    }
}

#[test]
fn safetensors_patch_respects_hf_layout() {
    let dir = common::temp_dir("st");
    for arch in Arch::ALL {
        let layer = 2 - arch as usize % 2;
        let common::Loaded {
            source: src,
            tok,
            model,
            ..
        } = common::load(&common::tiny(arch).hf);
        let settings = EditSettings {
            method: Method::Shift,
            layer,
            lr: 0.24,
        };
        let req = EditRequest::new(PROMPT, "Paris", None).unwrap();
        let delta = edit::compute(&model, &tok, &req, &settings)
            .unwrap()
            .delta
            .unwrap();
        let ModelSource::Hf(h) = &src else {
            unreachable!()
        };
        let out = dir.join(format!("{}-patched", arch.name()));
        safetensors::write_patched(h, &[delta], &out).unwrap();
        let patched = ModelSource::open(&out).unwrap();
        let name = ff2_weight(layer);
        let (after, _) = patched.require_f32(&name).unwrap();
        let (before, _) = src.require_f32(&name).unwrap();
        let got: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let want = expected_delta(&model, &tok, layer, 0.24, "Paris");
        assert_eq!((after.len(), before.len()), (want.len(), want.len()));
        let err = rel_frobenius(&got, &want);
        assert!(err <= 1e-5, "{arch:?}: {err}");
        // Every other tensor is unchanged, in the file's own (HF) layout.
        let ModelSource::Hf(p) = &patched else {
            unreachable!()
        };
        let (hf_name, _) = hf::hf_name(&h.hparams, &name, &h.ckpt.prefix).unwrap();
        for shard in &h.ckpt.shards {
            for (tname, info) in shard.metadata.tensors() {
                let (ps, pinfo) = p.ckpt.find(&tname).unwrap();
                assert_eq!(pinfo.shape, info.shape);
                if tname != hf_name {
                    assert_eq!(ps.bytes(pinfo), shard.bytes(info), "{tname}");
                }
            }
        }
        assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    }
}

fn messi_delta(model: &Transformer, tok: &Tokenizer) -> backlens::edit::Delta {
    let settings = EditSettings {
        method: Method::Shift,
        layer: 22,
        lr: 0.24,
    };
    let req = EditRequest::new(PROMPT, "Paris", None).unwrap();
    edit::compute(model, tok, &req, &settings)
        .unwrap()
        .delta
        .unwrap()
}

#[test]
fn patched_gguf_keeps_untouched_bytes_and_lora_agrees_with_it() {
    let dir = common::temp_dir("lora");
    let base_path = common::smollm2();
    let common::Loaded {
        source: src,
        tok,
        model,
        ..
    } = common::smollm2_loaded();
    let delta = messi_delta(model, tok);
    let ModelSource::Gguf(base) = &src else {
        unreachable!()
    };
    let patched_path = dir.join("patched.gguf");
    let f32_copy_path = dir.join("f32-copy.gguf");
    let adapter_path = dir.join("adapter.gguf");
    patch_plan(base, std::slice::from_ref(&delta), Ff2Type::F32, &[])
        .unwrap()
        .write(&patched_path)
        .unwrap();
    let mut zero = delta.clone();
    zero.out_vecs[0].iter_mut().for_each(|v| *v = 0.0);
    patch_plan(base, &[zero], Ff2Type::F32, &[])
        .unwrap()
        .write(&f32_copy_path)
        .unwrap();
    lora::write_adapter(&adapter_path, "llama", std::slice::from_ref(&delta), &[]).unwrap();

    let patched = GgufFile::open(&patched_path).unwrap();
    assert_eq!(patched.tensors.len(), base.tensors.len());
    for t in &base.tensors {
        if t.name != delta.tensor {
            let p = patched.tensor(&t.name).unwrap();
            assert_eq!(
                patched.tensor_bytes(p),
                base.tensor_bytes(t),
                "{} changed",
                t.name
            );
        }
    }
    assert_eq!(patched.metadata.len(), base.metadata.len());

    let prompts = [
        PROMPT,
        "The Eiffel Tower is located in the city of",
        "The mother tongue of Danielle Darrieux is",
        "Lionel Messi is a professional",
        "The capital of Japan is",
    ];
    let logits = |rt: &LlamaRuntime, adapter: Option<&mut llama_cpp_2::model::LlamaLoraAdapter>| {
        let mut s = rt.session().unwrap();
        if let Some(a) = adapter {
            s.set_lora(a, 1.0).unwrap();
        }
        prompts
            .iter()
            .map(|p| s.logits_last(&tok.encode_prompt(p).unwrap()).unwrap())
            .collect::<Vec<_>>()
    };
    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    let mut base_rt = LlamaRuntime::load(&base_path).unwrap();
    let mut adapter = base_rt.load_lora(&adapter_path).unwrap();
    let with_lora = logits(&base_rt, Some(&mut adapter));
    let plain = logits(&base_rt, None);
    let patched_logits = logits(&LlamaRuntime::load(&patched_path).unwrap(), None);
    let copy_logits = logits(&LlamaRuntime::load(&f32_copy_path).unwrap(), None);
    let noise = max_diff(&plain, &copy_logits);
    let lora_vs_patched = max_diff(&with_lora, &patched_logits);
    println!("max |Δlogit|: LoRA vs patched {lora_vs_patched:.4}, base vs F32-FF2 copy {noise:.4}");
    for (a, b) in with_lora.iter().zip(&patched_logits) {
        assert_eq!(argmax(a), argmax(b));
    }
    assert!(
        lora_vs_patched <= noise + 1e-4,
        "{lora_vs_patched} > {noise} + 1e-4"
    );
    let paris = tok.encode_target("Paris").unwrap()[0] as usize;
    assert!(
        with_lora[0][paris] > plain[0][paris],
        "the adapter raises the target's logit"
    );
}

#[test]
fn same_edit_twice_gives_identical_files() {
    let dir = common::temp_dir("twice");
    let mut files = Vec::new();
    for i in 0..2 {
        // A fresh load each time: the files must not depend on the process's state.
        let common::Loaded {
            source: src,
            tok,
            model,
            ..
        } = common::load(common::smollm2());
        let ModelSource::Gguf(base) = &src else {
            unreachable!()
        };
        let delta = messi_delta(&model, &tok);
        for (kind, ty) in [("f32", Ff2Type::F32), ("keep", Ff2Type::Keep)] {
            let p = dir.join(format!("{kind}-{i}.gguf"));
            patch_plan(base, std::slice::from_ref(&delta), ty, &[])
                .unwrap()
                .write(&p)
                .unwrap();
            files.push(std::fs::read(&p).unwrap());
        }
        let p = dir.join(format!("lora-{i}.gguf"));
        lora::write_adapter(&p, "llama", &[delta], &[]).unwrap();
        files.push(std::fs::read(&p).unwrap());
    }
    assert!(files[0] == files[3] && files[1] == files[4] && files[2] == files[5]);
}

/// A patched GGUF's untouched tensors are copied from the input file by the kernel
/// (`copy_file_range`); the file equals the layout built in memory, byte for byte, and so does
/// the file written through user space where the kernel refuses the copy (to another file
/// system: /dev/shm when present) and the one written from bytes held in memory.
#[test]
fn kernel_copied_gguf_equals_the_in_memory_layout() {
    let dir = common::temp_dir("kernel-copy");
    let base = GgufFile::open(common::smollm2()).unwrap();
    let info = base.tensor(&ff2_weight(22)).unwrap();
    let (n_in, n_out) = (info.dims[0] as usize, info.dims[1] as usize);
    let delta = backlens::delta::Delta {
        tensor: ff2_weight(22),
        layer: 22,
        out_vecs: vec![(0..n_out).map(|i| 0.01 * (i % 7) as f32).collect()],
        in_vecs: vec![(0..n_in).map(|j| 0.02 * (j % 5) as f32 - 0.04).collect()],
    };
    let in_memory =
        GgufFile::from_bytes("in-memory", std::fs::read(common::smollm2()).unwrap()).unwrap();
    let mut targets = vec![(&base, dir.join("patched.gguf"))];
    let shm = Path::new("/dev/shm");
    let shm_dir = shm
        .is_dir()
        .then(|| common::temp_dir_in(shm, "kernel-copy"));
    targets.extend(shm_dir.iter().map(|d| (&base, d.join("patched.gguf"))));
    targets.push((&in_memory, dir.join("from-memory.gguf")));
    let keys = [(
        "backlens.test".to_string(),
        backlens::weights::gguf::Value::String("kernel copy".into()),
    )];
    let want = patch_plan(&base, std::slice::from_ref(&delta), Ff2Type::F32, &keys)
        .unwrap()
        .to_bytes()
        .unwrap();
    for (src, path) in &targets {
        patch_plan(src, std::slice::from_ref(&delta), Ff2Type::F32, &keys)
            .unwrap()
            .write(path)
            .unwrap();
        let got = std::fs::read(path).unwrap();
        assert_eq!(got.len(), want.len(), "{}", path.display());
        assert!(
            got == want,
            "{} differs from the in-memory layout",
            path.display()
        );
    }
    assert!(
        want.len() > base.file_len() as usize,
        "the F32 FF2 is larger than its Q4_1"
    );
    if let Some(d) = shm_dir {
        std::fs::remove_dir_all(d).unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[derive(serde::Deserialize)]
struct Record {
    prompt: String,
    target_new: String,
    ground_truth: String,
}

#[test]
fn default_shift_flips_most_of_20_val_records_in_llama_cpp() {
    let dir = common::temp_dir("efficacy");
    let common::Loaded {
        source: src,
        tok,
        model,
        ..
    } = common::smollm2_loaded();
    let ModelSource::Gguf(base) = src else {
        unreachable!()
    };
    let text = std::fs::read_to_string(common::counterfact("counterfact-val.json")).unwrap();
    let records: Vec<Record> = serde_json::from_str(&text).unwrap();
    let settings = EditSettings {
        method: Method::Shift,
        layer: EditSettings::default_layer(30),
        lr: 0.24,
    };
    assert_eq!(settings.layer, 22);
    let mut wins = 0;
    for (i, r) in records.iter().take(20).enumerate() {
        let req = EditRequest::new(&r.prompt, &r.target_new, None).unwrap();
        let outcome = edit::compute(model, tok, &req, &settings).unwrap();
        // A new path each time: outputs are never silently replaced.
        let out = dir.join(format!("edited-{i}.gguf"));
        let deltas: Vec<_> = outcome.delta.into_iter().collect();
        patch_plan(base, &deltas, Ff2Type::F32, &[])
            .unwrap()
            .write(&out)
            .unwrap();
        let rt = LlamaRuntime::load(&out).unwrap();
        let mut s = rt.session().unwrap();
        let prompt = tok.encode_prompt(&r.prompt).unwrap();
        let p_new = s
            .sequence_logprob(&prompt, &tok.encode_target(&r.target_new).unwrap())
            .unwrap();
        let p_true = s
            .sequence_logprob(&prompt, &tok.encode_target(&r.ground_truth).unwrap())
            .unwrap();
        wins += usize::from(p_new > p_true);
        std::fs::remove_file(&out).unwrap();
    }
    println!("efficacy (P(new) > P(true)) on 20 val records, layer 22, lr 0.24: {wins}/20");
    assert!(wins >= 16, "{wins}/20");
}

/// The streamed FPS edit (one block in memory at a time, what `edit` runs for shift on GGUF)
/// computes the same deltas and skip decisions as the in-memory one, also for a sequence of
/// edits where the second is computed on the model carrying the first.
#[test]
fn streamed_shift_matches_in_memory() {
    let cases: Vec<(std::path::PathBuf, usize)> = vec![
        (common::tiny(Arch::Llama).gguf.clone(), 1),
        (common::tiny(Arch::Gpt2).gguf.clone(), 2),
        (common::smollm2(), 22),
    ];
    for (path, layer) in cases {
        let common::Loaded {
            source: src,
            tok,
            mut model,
            ..
        } = common::load(&path);
        let settings = EditSettings {
            method: Method::Shift,
            layer,
            lr: 0.5,
        };
        let reqs = vec![
            EditRequest::new(PROMPT, "Paris", None).unwrap(),
            EditRequest::new("The Eiffel Tower is located in", "Rome", None).unwrap(),
        ];
        let in_memory = edit::apply_sequence(&mut model, &tok, &reqs, &settings).unwrap();
        let streamed = edit::apply_sequence_streamed(&src, &tok, &reqs, &settings).unwrap();
        // Neither target is top-1 before its edit in these models: both requests are edited.
        compare_outcomes(&path, reqs.len(), 2, &in_memory, &streamed);
    }
}

/// Checks that the streamed outcomes equal the in-memory ones: one outcome per request on both
/// sides, the same top-1 and skip decisions, at least `min_edited` requests edited (not
/// skipped), and for those x that agree to 1e-5 of their scale and identical e.
fn compare_outcomes(
    path: &Path,
    n_requests: usize,
    min_edited: usize,
    in_memory: &[EditOutcome],
    streamed: &[EditOutcome],
) {
    let p = path.display();
    assert_eq!(in_memory.len(), n_requests, "{p}: in-memory outcomes");
    assert_eq!(streamed.len(), n_requests, "{p}: streamed outcomes");
    // NaN until the first comparison (`max` drops it), so comparing nothing fails the bound.
    let (mut worst, mut compared) = (f32::NAN, 0);
    for (a, b) in in_memory.iter().zip(streamed) {
        assert_eq!(a.top1_before, b.top1_before, "{p}");
        assert_eq!(a.delta.is_some(), b.delta.is_some(), "{p}");
        if let (Some(da), Some(db)) = (&a.delta, &b.delta) {
            assert_eq!(da.in_vecs[0].len(), db.in_vecs[0].len(), "{p}");
            assert!(!da.in_vecs[0].is_empty(), "{p}: empty x");
            let scale = da.in_vecs[0].iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in da.in_vecs[0].iter().zip(&db.in_vecs[0]) {
                worst = worst.max((x - y).abs() / scale);
            }
            assert_eq!(da.out_vecs, db.out_vecs);
            compared += 1;
        }
    }
    println!(
        "{p}: {compared}/{n_requests} edited; streamed vs in-memory x, max rel diff {worst:.2e}"
    );
    assert!(
        compared >= min_edited,
        "{p}: {compared} requests edited and compared, expected at least {min_edited}"
    );
    assert!(worst < 1e-5, "{p}: {worst}");
}
