//! Backward Lens: the rank-one gradient identity, finite differences, brute-force projections,
//! and the paper's shift claim on SmolLM2.

mod common;

use backlens::arch::Arch;
use backlens::lens::{self, backward_pass, LensOptions};
use backlens::model::{Numerics, Transformer};
use backlens::tokenizer::Tokenizer;
use candle_core::{DType, Tensor, Var};

const PROMPT: &str = "The Eiffel Tower is located in the city of";

fn load(arch: Arch, dtype: DType) -> (Transformer, Tokenizer) {
    let l = common::load_with(&common::tiny(arch).gguf, dtype, Numerics::Exact);
    (l.model, l.tok)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap()).sqrt()
}

#[test]
fn weight_gradients_are_sums_of_rank_one_outer_products() {
    for arch in Arch::ALL {
        let (mut model, tok) = load(arch, DType::F32);
        let layer = 1;
        let ffn = &mut model.blocks[layer].ffn;
        let down = Var::from_tensor(&ffn.down.w).unwrap();
        let up = Var::from_tensor(&ffn.up.w).unwrap();
        ffn.down.w = down.as_tensor().clone();
        ffn.up.w = up.as_tensor().clone();
        let gate = ffn.gate.as_mut().map(|g| {
            let v = Var::from_tensor(&g.w).unwrap();
            g.w = v.as_tensor().clone();
            v
        });
        let prompt = tok.encode_prompt(PROMPT).unwrap();
        let target = tok.encode_target("Paris").unwrap();
        let bp = backward_pass(&model, &prompt, &target, true).unwrap();
        let x1 = &bp.trace.ff1_in[layer];
        let a = &bp.trace.ff2_in[layer];
        let checks = [
            (
                "ffn_down",
                down.as_tensor(),
                bp.d2[layer].t().unwrap().matmul(a).unwrap(),
            ),
            (
                "ffn_up",
                up.as_tensor(),
                bp.d1_up[layer].t().unwrap().matmul(x1).unwrap(),
            ),
        ];
        for (name, w, outer_sum) in checks {
            let autograd = bp.grads.get(w).unwrap();
            let err = rel_err(&outer_sum, autograd);
            println!("{arch:?} {name}: ‖Σ δ xᵀ − ∂L/∂W‖ / ‖∂L/∂W‖ = {err:.2e}");
            assert!(err <= 1e-5, "{arch:?} {name}: {err}");
        }
        if let (Some(gate), Some(d1_gate)) = (gate, &bp.d1_gate[layer]) {
            let outer_sum = d1_gate.t().unwrap().matmul(x1).unwrap();
            let err = rel_err(&outer_sum, bp.grads.get(gate.as_tensor()).unwrap());
            assert!(err <= 1e-5, "{arch:?} ffn_gate: {err}");
        }
    }
}

#[test]
fn ff2_gradient_matches_finite_differences_in_f64() {
    for arch in Arch::ALL {
        let (mut model, tok) = load(arch, DType::F64);
        let layer = 2;
        let prompt = tok.encode_prompt(PROMPT).unwrap();
        let target = tok.encode_target("Paris").unwrap();
        let w0 = model.blocks[layer].ffn.down.w.clone();
        let var = Var::from_tensor(&w0).unwrap();
        model.blocks[layer].ffn.down.w = var.as_tensor().clone();
        let bp = backward_pass(&model, &prompt, &target, true).unwrap();
        let grad = bp.grads.get(var.as_tensor()).unwrap().clone();
        // A seeded direction: the directional derivative of a random direction can nearly
        // cancel, so the error is measured against the Cauchy–Schwarz scale ‖g‖·‖d‖.
        let mut rng = common::synth::Rng(0x2545_f491_4f6c_dd1d ^ arch as u64);
        let values: Vec<f64> = (0..w0.elem_count()).map(|_| rng.next() as f64).collect();
        let dir = Tensor::from_vec(values, w0.dims(), w0.device()).unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt()
        };
        let scale = norm(&grad) * norm(&dir);
        let analytic = (&grad * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let eps = 1e-4;
        let mut loss_at = |sign: f64| {
            model.blocks[layer].ffn.down.w = (&w0 + (&dir * (sign * eps)).unwrap()).unwrap();
            backward_pass(&model, &prompt, &target, true).unwrap().loss
        };
        let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * eps);
        let rel = (numeric - analytic).abs() / scale;
        println!(
            "{arch:?}: finite difference {numeric:.9}, autograd {analytic:.9}, \
             ‖g‖‖d‖ {scale:.6}, relative {rel:.2e}"
        );
        assert!(
            analytic.abs() > 1e-3 * scale,
            "{arch:?}: direction nearly orthogonal"
        );
        assert!(rel <= 1e-6, "{arch:?}: {rel}");
    }
}

/// The final norm and unembedding computed by hand in f64.
/// Final norm, unembedding and (Gemma) softcapping of `v`, one vocabulary row at a time.
fn brute_scores(model: &Transformer, v: &[f32]) -> Vec<f64> {
    let norm = &model.out_norm;
    let w: Vec<f32> = norm.w.to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = if norm.rms {
        0.0
    } else {
        v.iter().map(|&x| x as f64).sum::<f64>() / n
    };
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let b: Vec<f32> = norm
        .b
        .as_ref()
        .map_or(vec![0.0; v.len()], |b| b.to_vec1().unwrap());
    let normed: Vec<f64> = (0..v.len())
        .map(|i| (v[i] as f64 - mean) / (var + norm.eps).sqrt() * w[i] as f64 + b[i] as f64)
        .collect();
    let out: Vec<Vec<f32>> = model.output.to_vec2().unwrap();
    let cap = model.hp.logit_softcap;
    out.iter()
        .map(|row| row.iter().zip(&normed).map(|(a, b)| *a as f64 * b).sum())
        .map(|s: f64| if cap > 0.0 { cap * (s / cap).tanh() } else { s })
        .collect()
}

#[test]
fn projections_equal_a_token_by_token_computation() {
    for arch in Arch::ALL {
        let (model, tok) = load(arch, DType::F32);
        let opts = LensOptions {
            layers: 0..3,
            k: 5,
            all_positions: true,
            use_norm: true,
            full_target: false,
        };
        let report = lens::run(&model, &tok, PROMPT, "Paris", Some("Eiffel Tower"), &opts).unwrap();
        let prompt = tok.encode_prompt(PROMPT).unwrap();
        let target = tok.encode_target("Paris").unwrap();
        let bp = backward_pass(&model, &prompt, &target, false).unwrap();
        assert_eq!(report.layers.len(), 3);
        for l in &report.layers {
            assert_eq!(l.cells.len(), prompt.len());
            for c in &l.cells {
                let x1: Vec<f32> = bp.trace.ff1_in[l.layer]
                    .get(c.pos)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let d2: Vec<f32> = bp.d2[l.layer].get(c.pos).unwrap().to_vec1().unwrap();
                let neg: Vec<f32> = d2.iter().map(|v| -v).collect();
                for (vec, proj) in [(&x1, &c.x1), (&neg, &c.neg_d2)] {
                    let scores = brute_scores(&model, vec);
                    let mut order: Vec<usize> = (0..scores.len()).collect();
                    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
                    let top: Vec<u32> = proj.top.iter().map(|t| t.id).collect();
                    let expected: Vec<u32> = order.iter().take(5).map(|&i| i as u32).collect();
                    assert_eq!(top, expected, "{arch:?} layer {} pos {}", l.layer, c.pos);
                    let bottom: Vec<u32> = proj.bottom.iter().map(|t| t.id).collect();
                    let expected: Vec<u32> =
                        order.iter().rev().take(5).map(|&i| i as u32).collect();
                    assert_eq!(
                        bottom, expected,
                        "{arch:?} bottom layer {} pos {}",
                        l.layer, c.pos
                    );
                    let s = scores[target[0] as usize];
                    let rank = scores.iter().filter(|&&x| x > s).count();
                    assert_eq!(
                        proj.target_rank, rank,
                        "{arch:?} rank layer {} pos {}",
                        l.layer, c.pos
                    );
                    for t in &proj.top {
                        assert!(
                            (t.score as f64 - scores[t.id as usize]).abs()
                                < 1e-4 * s.abs().max(1.0)
                        );
                    }
                }
                let na: f32 = bp.trace.ff2_in[l.layer]
                    .get(c.pos)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!((c.grad_norm - c.norm_d2 * na).abs() <= 1e-5 * c.grad_norm.max(1e-12));
            }
        }
    }
}

#[test]
fn smollm2_messi_paris_shift_appears_in_late_layers() {
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let opts = LensOptions {
        layers: 0..30,
        k: 10,
        all_positions: true,
        use_norm: true,
        full_target: false,
    };
    let r = lens::run(
        model,
        tok,
        "Lionel Messi plays for",
        "Paris",
        Some("Lionel Messi"),
        &opts,
    )
    .unwrap();
    assert_eq!(r.layers.len(), 30);
    assert!(r.layers.iter().all(|l| l.cells.len() == r.tokens.len()));
    assert_eq!(r.claims.last_subject_pos, Some(4), "tokens {:?}", r.tokens);
    assert!(
        r.claims.shift_layers.iter().any(|&l| l >= 15),
        "shift layers {:?}",
        r.claims.shift_layers
    );
    let early_rank = r.layers[2].cells.last().unwrap().neg_d2.target_rank;
    assert!(
        early_rank > 1000,
        "early layers should not point at the target yet: {early_rank}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 30);
    println!("shift layers {:?}", r.claims.shift_layers);
}
