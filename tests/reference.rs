//! Cross-framework check against independent PyTorch (f32) values for 20 val records:
//! unedited top-1, Backward Lens ranks of the target in −δ at the last token, ‖δ‖ per layer,
//! and the forward-pass-shift vectors x (FF2 input) and d (input embedding).

mod common;

use backlens::edit::{self, EditRequest, EditSettings, Method};
use backlens::lens::{backward_pass, project_rows};
use backlens::numeric::argmax;
use backlens::numeric::rank_of;

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    target: String,
    target_id: u32,
    top1_id: u32,
    lens_rank_neg_d2: Vec<usize>,
    d2_norm: Vec<f32>,
    fps_layer: usize,
    fps_lr: f64,
    fps_x: Vec<f32>,
    fps_d: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn smollm2_matches_pytorch_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/reference/smollm2-val20.json");
    let refs: Vec<Reference> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(refs.len(), 20, "reference records");
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    // The worst-case folds start at NaN, which `min`/`max` drop at the first real value, so a
    // run that compares nothing fails their thresholds; the counts must match as well.
    let (mut rank_checked, mut rank_equal, mut worst_norm) = (0, 0, f32::NAN);
    let (mut fps_compared, mut worst_cos) = (0, f64::NAN);
    for r in &refs {
        let prompt = tok.encode_prompt(&r.prompt).unwrap();
        let target = tok.encode_target(&r.target).unwrap();
        assert_eq!(target[0], r.target_id, "{:?}", r.target);
        let bp = backward_pass(model, &prompt, &target, false).unwrap();
        let last = prompt.len() - 1;
        let logits: Vec<f32> = bp
            .logits
            .narrow(0, last, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(argmax(&logits) as u32, r.top1_id, "top-1 of {:?}", r.prompt);
        assert_eq!(r.d2_norm.len(), model.hp.n_layer, "{:?}", r.prompt);
        assert_eq!(r.lens_rank_neg_d2.len(), model.hp.n_layer, "{:?}", r.prompt);
        for l in 0..model.hp.n_layer {
            let d2 = bp.d2[l].narrow(0, last, 1).unwrap();
            let norm = d2
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rel = (norm - r.d2_norm[l]).abs() / r.d2_norm[l];
            worst_norm = worst_norm.max(rel);
            let scores = &project_rows(model, &d2.neg().unwrap(), true).unwrap()[0];
            let rank = rank_of(scores, r.target_id);
            // Ranks must agree up to the tokens whose scores tie with the target's within 1e-3
            // of the score scale (f32 noise between frameworks reorders those).
            let s = scores[r.target_id as usize];
            let scale = scores.iter().fold(0f32, |m, x| m.max(x.abs()));
            let band = scores
                .iter()
                .filter(|&&x| (x - s).abs() <= 1e-3 * scale)
                .count();
            let diff = rank.abs_diff(r.lens_rank_neg_d2[l]);
            rank_checked += 1;
            rank_equal += usize::from(diff <= band);
            if diff > band {
                println!(
                    "rank mismatch {:?} layer {l}: ours {rank}, reference {}, tie band {band}",
                    r.prompt, r.lens_rank_neg_d2[l]
                );
            }
            if r.lens_rank_neg_d2[l] == 0 {
                assert_eq!(
                    rank, 0,
                    "{:?} layer {l}: reference has the target top-1",
                    r.prompt
                );
            }
        }
        let req = EditRequest::new(&r.prompt, &r.target, None).unwrap();
        let settings = EditSettings {
            method: Method::Shift,
            layer: r.fps_layer,
            lr: r.fps_lr,
        };
        let outcome = edit::compute(model, tok, &req, &settings).unwrap();
        // Every reference record has its x and d: a skipped edit is a failure, not a pass.
        let delta = outcome
            .delta
            .unwrap_or_else(|| panic!("{:?}: edit skipped", r.prompt));
        assert_eq!(delta.in_vecs[0].len(), r.fps_x.len(), "{:?}", r.prompt);
        assert_eq!(delta.out_vecs[0].len(), r.fps_d.len(), "{:?}", r.prompt);
        fps_compared += 1;
        worst_cos = worst_cos.min(cosine(&delta.in_vecs[0], &r.fps_x));
        let d: Vec<f32> = delta.out_vecs[0]
            .iter()
            .map(|v| v / r.fps_lr as f32)
            .collect();
        assert!(cosine(&d, &r.fps_d) > 0.999_999, "fps d of {:?}", r.prompt);
    }
    println!(
        "reference: ‖δ‖ worst relative error {worst_norm:.2e}; lens ranks within the tie band {rank_equal}/{rank_checked}; fps x worst cosine {worst_cos:.6}"
    );
    assert_eq!(
        rank_checked,
        refs.len() * model.hp.n_layer,
        "layers compared"
    );
    assert_eq!(fps_compared, refs.len(), "fps vectors compared");
    assert!(worst_norm < 2e-3, "‖δ‖ relative error {worst_norm}");
    assert!(worst_cos > 0.9999, "fps x cosine {worst_cos}");
    assert_eq!(rank_equal, rank_checked, "ranks outside the tie band");
}
