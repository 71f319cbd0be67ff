//! `audit` on the real SmolLM2 model: a forward-pass-shifting edit written as a patched GGUF and
//! as a LoRA adapter must be recognised as one rank-1 change of FF2 at the edited layer, with the
//! expected singular value, " Paris" among the promoted tokens, and the edit prompt triggering it;
//! a byte copy of the base must show no difference. Adapters that break llama.cpp's rules must be
//! refused, naming the file, by `lora::validate`, by `LlamaRuntime::load_lora`, by `audit` and
//! by the CLI (exit code 2, never an abort inside llama.cpp).

mod common;

use backlens::arch::Arch;
use backlens::audit::{self, AuditOptions, AuditReport, LensScore, Orientation};
use backlens::edit::{self, Delta, EditRequest, EditSettings, Method};
use backlens::lora;
use backlens::runtime::LlamaRuntime;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::weights::quant::{self, GgmlType};
use backlens::write::gguf::{patch_plan, Ff2Type, GgufPlan, OutTensor};
use common::{smollm2 as model_path, temp_dir};
use std::process::Command;
use std::sync::OnceLock;

const PROMPT: &str = "Lionel Messi plays for";
const OTHER: &str = "The capital of Japan is";
const TENSOR: &str = "blk.22.ffn_down.weight";

struct Edit {
    delta: Delta,
    /// ‖lr·e‖·‖x‖, the only singular value of the rank-1 edit.
    sigma: f64,
    paris: u32,
}

/// The shift edit "Lionel Messi plays for" -> " Paris" at the default layer, computed once.
fn messi_edit() -> &'static Edit {
    static EDIT: OnceLock<Edit> = OnceLock::new();
    EDIT.get_or_init(|| {
        let common::Loaded { tok, mut model, .. } = common::load(model_path());
        let settings = EditSettings {
            method: Method::Shift,
            layer: EditSettings::default_layer(model.hp.n_layer),
            lr: 0.24,
        };
        assert_eq!(backlens::arch::ff2_weight(settings.layer), TENSOR);
        let req = EditRequest::new(PROMPT, "Paris", None).unwrap();
        let outcomes = edit::apply_sequence(&mut model, &tok, &[req], &settings).unwrap();
        let delta = outcomes[0].delta.clone().expect("the edit is not skipped");
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let sigma = norm(&delta.out_vecs[0]) * norm(&delta.in_vecs[0]);
        Edit {
            delta,
            sigma,
            paris: tok.encode_target("Paris").unwrap()[0],
        }
    })
}

fn options() -> AuditOptions {
    AuditOptions {
        k: 20,
        probes: vec![PROMPT.to_string(), OTHER.to_string()],
        score: LensScore::Cosine,
    }
}

/// The checks shared by the patched GGUF and the adapter.
fn check_rank_one(report: &AuditReport, e: &Edit) {
    assert_eq!(report.changed_names(), vec![TENSOR]);
    assert!(report.added_tensors.is_empty() && report.missing_tensors.is_empty());
    assert!(!report.identical);
    let c = report.change(TENSOR).unwrap();
    assert_eq!(c.layer, Some(22));
    assert_eq!(c.shape, [576, 1536]);
    assert_eq!(c.rank, 1, "singular values {:?}", c.singular_values);
    let rel = (c.singular_values[0] - e.sigma).abs() / e.sigma;
    assert!(
        rel < 1e-3,
        "σ₁ {} vs ‖lr·e‖·‖x‖ {} (relative {rel})",
        c.singular_values[0],
        e.sigma
    );
    assert!(c.energy_share > 0.9999, "energy share {}", c.energy_share);
    // u₁ is the target embedding's direction, v₁ the edited prompt's FF2 input.
    let lens = c.lens.as_ref().expect("ffn_down is projected");
    assert_eq!(c.orientation, Orientation::Lens);
    let top5: Vec<u32> = lens.promotes.iter().take(5).map(|t| t.id).collect();
    assert!(
        top5.contains(&e.paris),
        "\" Paris\" not in the top-5 promoted tokens: {:?}",
        lens.promotes
            .iter()
            .take(5)
            .map(|t| &t.token)
            .collect::<Vec<_>>()
    );
    assert_eq!(c.probes.len(), 2);
    let (hit, other) = (&c.probes[0], &c.probes[1]);
    assert!(hit.cosine > 0.999, "edited prompt cosine {}", hit.cosine);
    assert!(
        hit.relative_gain > 0.999,
        "edited prompt gain {}",
        hit.relative_gain
    );
    assert!(
        other.relative_gain < 0.5 * hit.relative_gain,
        "an unrelated prompt triggers the edit too strongly: {} vs {}",
        other.relative_gain,
        hit.relative_gain
    );
}

#[test]
fn f32_patched_gguf_is_one_rank_one_change() {
    let e = messi_edit();
    let base = model_path();
    let dir = temp_dir("gguf");
    let out = dir.join("messi.gguf");
    let g = backlens::weights::gguf::GgufFile::open(&base).unwrap();
    patch_plan(&g, std::slice::from_ref(&e.delta), Ff2Type::F32, &[])
        .unwrap()
        .write(&out)
        .unwrap();
    let report = audit::audit(&base, &out, &options()).unwrap();
    check_rank_one(&report, e);
    let c = report.change(TENSOR).unwrap();
    assert_eq!(c.base_type, "q4_1");
    assert_eq!(c.patch_type.as_deref(), Some("f32"));
    // No provenance was written: nothing is required.
    assert!(report.provenance.is_empty());
    assert_eq!(report.base_sha256_matches, None);
    assert_eq!(report.compared_tensors, g.tensors.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_adapter_is_one_rank_one_change() {
    let e = messi_edit();
    let base = model_path();
    let dir = temp_dir("lora");
    let out = dir.join("messi-lora.gguf");
    let edits = format!(
        r#"[{{"prompt":"{PROMPT}","target_new":"Paris","target_id":{},"skipped":false}}]"#,
        e.paris
    );
    let prov = vec![
        ("backlens.method".to_string(), Value::String("shift".into())),
        ("backlens.edits".to_string(), Value::String(edits)),
    ];
    lora::write_adapter(
        &out,
        Arch::Llama.name(),
        std::slice::from_ref(&e.delta),
        &prov,
    )
    .unwrap();
    let report = audit::audit(&base, &out, &options()).unwrap();
    check_rank_one(&report, e);
    let c = report.change(TENSOR).unwrap();
    let l = c.lora.as_ref().unwrap();
    assert_eq!((l.rank, l.scale), (1, 1.0));
    assert_eq!(report.provenance.len(), 2);
    let targets = &c.lens.as_ref().unwrap().targets;
    assert_eq!(targets.len(), 1);
    assert_eq!((targets[0].id, targets[0].rank), (e.paris, 0));
    // The plain logit lens favors tokens with long unembedding rows; " Paris" still ranks high.
    let logit = AuditOptions {
        k: 5,
        probes: Vec::new(),
        score: LensScore::Logit,
    };
    let report = audit::audit(&base, &out, &logit).unwrap();
    let lens = report.change(TENSOR).unwrap().lens.as_ref().unwrap();
    assert_eq!(lens.score, LensScore::Logit);
    assert!(
        lens.targets[0].rank < 50,
        "logit-lens rank {}",
        lens.targets[0].rank
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unchanged_copy_and_bad_input() {
    let base = model_path();
    let dir = temp_dir("copy");
    let copy = dir.join("copy.gguf");
    std::fs::copy(&base, &copy).unwrap();
    let report = audit::audit(&base, &copy, &AuditOptions::default()).unwrap();
    assert!(report.changed.is_empty(), "{:?}", report.changed_names());
    assert!(report.identical);
    assert!(report.metadata_changes.is_empty() && report.notes.is_empty());
    let text = dir.join("not-a-model.gguf");
    std::fs::write(&text, "hello, this is not a model").unwrap();
    let err = audit::audit(&base, &text, &options())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a GGUF"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// A rank-1 delta on `tensor` of the real model with constant factors (no edit computed).
fn constant_delta(tensor: &str, n_out: usize, n_in: usize) -> Delta {
    Delta {
        tensor: tensor.into(),
        layer: 22,
        out_vecs: vec![vec![0.01; n_out]],
        in_vecs: vec![vec![0.02; n_in]],
    }
}

/// A valid adapter on FF2 of layer 22, to break.
fn small_adapter() -> GgufPlan<'static> {
    lora::adapter_plan(
        Arch::Llama.name(),
        &[constant_delta(TENSOR, 576, 1536)],
        &[],
    )
}

/// Replaces one factor of [`small_adapter`] by an F32 tensor of the row-major `shape`.
fn replace_factor(plan: &mut GgufPlan<'static>, half: &str, shape: &[usize]) {
    let n = shape.iter().product();
    plan.replace(OutTensor::f32(
        &format!("{TENSOR}.{half}"),
        shape,
        &vec![0.01; n],
    ))
    .unwrap();
}

type Break = fn(&mut GgufPlan<'static>);

#[test]
fn adapters_that_break_llama_cpp_rules_are_refused_everywhere() {
    let base = model_path();
    let base_g = GgufFile::open(&base).unwrap();
    let dir = temp_dir("bad-lora");
    let mut rt = LlamaRuntime::load(&base).unwrap();
    let cases: Vec<(&str, Break, &str)> = vec![
        (
            "alpha-u32",
            |p| p.set("adapter.lora.alpha", Value::U32(1)),
            "adapter.lora.alpha must be an F32",
        ),
        (
            "alpha-string",
            |p| p.set("adapter.lora.alpha", Value::String("1.0".into())),
            "adapter.lora.alpha must be an F32",
        ),
        (
            "general-type-u32",
            |p| p.set("general.type", Value::U32(1)),
            "general.type must be a string",
        ),
        (
            "no-adapter-type",
            |p| p.metadata.retain(|(k, _)| k != "adapter.type"),
            "adapter.type is missing",
        ),
        (
            "general-type-model",
            |p| p.set("general.type", Value::String("model".into())),
            "not a LoRA adapter",
        ),
        (
            "architecture",
            |p| p.set("general.architecture", Value::String("gpt2".into())),
            "does not match",
        ),
        (
            "shape",
            |p| replace_factor(p, "lora_b", &[575, 1]),
            "do not fit",
        ),
        (
            "ranks",
            |p| replace_factor(p, "lora_a", &[2, 1536]),
            "ranks",
        ),
        (
            "lone-half",
            |p| p.tensors.retain(|t| !t.name.ends_with(".lora_b")),
            "only one of its two factors",
        ),
        (
            "unknown-base-tensor",
            |p| {
                *p = lora::adapter_plan(
                    Arch::Llama.name(),
                    &[constant_delta("blk.99.ffn_down.weight", 576, 1536)],
                    &[],
                )
            },
            "does not have",
        ),
        (
            // SmolLM2 ties its output projection to token_embd: llama.cpp would apply the pair
            // there unflipped and abort in ggml_mul_mat (checked with stock llama.cpp).
            "tied-embedding",
            |p| {
                *p = lora::adapter_plan(
                    Arch::Llama.name(),
                    &[constant_delta("token_embd.weight", 49152, 576)],
                    &[],
                )
            },
            "output.weight",
        ),
    ];
    for (name, damage, needle) in cases {
        let path = dir.join(format!("{name}.gguf"));
        let mut plan = small_adapter();
        damage(&mut plan);
        plan.write(&path).unwrap();
        let shown = path.to_str().unwrap();
        let check = |what: &str, e: String| {
            assert!(
                e.starts_with(&format!("{shown}: ")) && e.contains(needle),
                "{name} ({what}): {e:?} lacks the file or {needle:?}"
            );
        };
        let adapter_g = GgufFile::open(&path).unwrap();
        check(
            "validate",
            lora::validate(&base_g, &adapter_g).unwrap_err().to_string(),
        );
        match rt.load_lora(&path) {
            Ok(_) => panic!("{name}: load_lora accepted it"),
            Err(e) => check("load_lora", e.to_string()),
        }
        let report = audit::audit(&base, &path, &AuditOptions::default());
        check("audit", report.unwrap_err().to_string());
        let out = Command::new(BIN)
            .args([
                "generate",
                base.to_str().unwrap(),
                "--lora",
                shown,
                "x",
                "-n",
                "1",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{name}: {}", stderr.trim_end());
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr:?}");
        check(
            "generate",
            stderr.trim_end().trim_start_matches("error: ").into(),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What llama.cpp loads must load: a skipped `_norm.weight` tensor and F16 factors.
#[test]
fn adapters_llama_cpp_accepts_are_accepted() {
    let base = model_path();
    let base_g = GgufFile::open(&base).unwrap();
    let dir = temp_dir("good-lora");
    let mut rt = LlamaRuntime::load(&base).unwrap();
    let mut plan = small_adapter();
    plan.tensors.push(OutTensor::f32(
        "blk.0.attn_norm.weight",
        &[576],
        &[1.0; 576],
    ));
    for t in plan
        .tensors
        .iter_mut()
        .filter(|t| t.name.contains(".lora_"))
    {
        let values: Vec<f32> = t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        t.data = quant::quantize(GgmlType::F16, &values, t.dims[0] as usize, &t.name)
            .unwrap()
            .into();
        t.ggml_type = GgmlType::F16;
    }
    let path = dir.join("f16-with-norm.gguf");
    plan.write(&path).unwrap();
    let adapter = lora::validate(&base_g, &GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(adapter.ignored, ["blk.0.attn_norm.weight"]);
    assert_eq!(adapter.pairs.len(), 1);
    assert_eq!((adapter.pairs[0].rank, adapter.pairs[0].scale), (1, 1.0));
    rt.load_lora(&path).expect("llama.cpp loads it");
    let report = audit::audit(&base, &path, &AuditOptions::default()).unwrap();
    assert_eq!(report.changed_names(), vec![TENSOR]);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("blk.0.attn_norm.weight")),
        "{:?}",
        report.notes
    );
    let _ = std::fs::remove_dir_all(&dir);
}
