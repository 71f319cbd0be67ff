//! `audit` on the real SmolLM2 model: a forward-pass-shifting edit written as a patched GGUF and
//! as a LoRA adapter must be recognised as one rank-1 change of FF2 at the edited layer, with the
//! expected singular value, " Paris" among the promoted tokens, and the edit prompt triggering it;
//! a byte copy of the base must show no difference.

mod common;

use backlens::arch::Arch;
use backlens::audit::{self, AuditOptions, AuditReport, LensScore, Orientation};
use backlens::edit::{self, Delta, EditRequest, EditSettings, Method};
use backlens::weights::gguf::Value;
use backlens::write::gguf::{patch_plan, Ff2Type};
use backlens::write::lora;
use common::{smollm2 as model_path, temp_dir};
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
    lora::write_adapter(&out, Arch::Llama, std::slice::from_ref(&e.delta), &prov).unwrap();
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
