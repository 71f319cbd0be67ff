//! Whitened FPS (`shift-whitened`): ΔW·x = lr·‖x‖²·e at the edit prompt, less interference than
//! plain FPS on unrelated prompts at equal effect, statistics cache round trip.

mod common;

use backlens::arch::Arch;
use backlens::edit::whiten::{builtin_prompts, StatsStore, WhitenOptions};
use backlens::edit::{self, EditContext, EditRequest, EditSettings, Method};
use backlens::model::Transformer;
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use candle_core::DType;
use std::path::Path;

const LAYER: usize = 22;
const LR: f64 = 0.24;

/// FF2 input at the last token of `prompt`.
fn ff2_in_last(model: &Transformer, tok: &Tokenizer, prompt: &str, layer: usize) -> Vec<f32> {
    let ids = tok.encode_prompt(prompt).unwrap();
    let (_, trace) = model.forward(&ids, None).unwrap();
    trace.ff2_in[layer]
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// ΔW·v in f64 from the dense delta (out, in).
fn apply_dense(dense: &[f32], v: &[f32]) -> Vec<f64> {
    dense
        .chunks_exact(v.len())
        .map(|row| row.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// Every 8th built-in prompt: ~100 prompts, enough for the test and quick to run.
fn test_prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    builtin_prompts()
        .iter()
        .step_by(8)
        .map(|p| tok.encode_prompt(p).unwrap())
        .collect()
}

fn settings(method: Method) -> EditSettings {
    EditSettings {
        method,
        layer: LAYER,
        lr: LR,
    }
}

#[test]
fn whitened_edit_is_exact_at_x_and_quieter_elsewhere_on_smollm2() {
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let store = StatsStore::from_tokens(
        &model,
        test_prompts(&tok),
        &path,
        "test",
        WhitenOptions::default(),
        None,
    )
    .unwrap();
    let ctx = EditContext {
        stats: Some(&store),
    };
    let records = EditRequest::load_file(&common::counterfact("counterfact-val.json")).unwrap();
    let (mut plain_loc, mut white_loc) = (0.0, 0.0);
    let mut edited = 0;
    for r in records.iter().take(6) {
        let white =
            edit::compute_with(&model, &tok, r, &settings(Method::ShiftWhitened), &ctx).unwrap();
        let plain = edit::compute(&model, &tok, r, &settings(Method::Shift)).unwrap();
        let (Some(dw), Some(dp)) = (white.delta, plain.delta) else {
            continue;
        };
        edited += 1;
        let x = ff2_in_last(&model, &tok, &r.prompt, LAYER);
        let xx: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let e: Vec<f32> = model
            .tok_embd
            .get(white.target_id as usize)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f64> = e.iter().map(|&v| LR * xx * v as f64).collect();
        let (dense_w, dense_p) = (dw.dense(), dp.dense());
        for (name, dense) in [("whitened", &dense_w), ("plain", &dense_p)] {
            let got = apply_dense(dense, &x);
            let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let err = norm(&diff) / norm(&want);
            assert!(
                err <= 1e-4,
                "{name} {:?}: ‖ΔW·x − s·e‖/‖s·e‖ = {err:.2e}",
                r.case_id
            );
        }
        let loc = ff2_in_last(&model, &tok, r.locality_prompt.as_deref().unwrap(), LAYER);
        let (w, p) = (
            norm(&apply_dense(&dense_w, &loc)),
            norm(&apply_dense(&dense_p, &loc)),
        );
        println!("{:?}: ‖ΔW·x'‖ whitened {w:.3}, plain {p:.3}", r.case_id);
        white_loc += w;
        plain_loc += p;
    }
    assert!(edited >= 4, "only {edited} of 6 records edited");
    println!("locality ‖ΔW·x'‖ summed: whitened {white_loc:.3}, plain {plain_loc:.3}");
    assert!(
        white_loc < 0.6 * plain_loc,
        "whitened {white_loc} vs plain {plain_loc}"
    );
}

#[test]
fn whitened_needs_stats_and_cache_round_trips() {
    let fx = common::tiny(Arch::Llama);
    let src = ModelSource::open(&fx.gguf).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let req = EditRequest::new("Lionel Messi plays for", "Paris", None).unwrap();
    let s = EditSettings {
        method: Method::ShiftWhitened,
        layer: 2,
        lr: 0.24,
    };
    let err = edit::compute(&model, &tok, &req, &s)
        .unwrap_err()
        .to_string();
    assert!(err.contains("statistics"), "{err}");

    let cache = common::temp_dir("stats");
    let prompts = test_prompts(&tok);
    let make = || {
        StatsStore::from_tokens(
            &model,
            prompts.clone(),
            &fx.gguf,
            "t",
            WhitenOptions::default(),
            Some(cache.clone()),
        )
        .unwrap()
    };
    let first = make();
    let key_of = |store: &StatsStore| {
        let ctx = EditContext { stats: Some(store) };
        edit::compute_with(&model, &tok, &req, &s, &ctx)
            .unwrap()
            .delta
            .expect("edited")
    };
    let d1 = key_of(&first);
    let file = first.cache_path(2).unwrap();
    assert!(file.is_file(), "{} not written", file.display());
    let stats1 = first.get(2).unwrap();
    let second = make();
    let stats2 = second.get(2).unwrap();
    assert_eq!(stats1.count, stats2.count);
    let d2 = key_of(&second);
    let rel = d1.in_vecs[0]
        .iter()
        .zip(&d2.in_vecs[0])
        .map(|(a, b)| ((a - b) as f64).abs())
        .fold(0.0, f64::max)
        / d1.in_vecs[0]
            .iter()
            .map(|a| a.abs() as f64)
            .fold(0.0, f64::max);
    assert!(rel < 1e-4, "cached statistics give another key: {rel:.2e}");
    assert_eq!(d1.out_vecs, d2.out_vecs);
    // A corrupt cache file is ignored and recomputed.
    std::fs::write(&file, b"BLSTATS1garbage").unwrap();
    let third = make();
    assert_eq!(third.get(2).unwrap().count, stats1.count);
    assert!(Path::new(&file).is_file());
}
