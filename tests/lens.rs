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
            unit: false,
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
                                < 1e-4 * s.abs().max(1.0),
                            "{arch:?} score layer {} pos {}: {} vs {}",
                            l.layer,
                            c.pos,
                            t.score,
                            scores[t.id as usize]
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
        unit: false,
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

/// Rows of `vectors` through the final norm (by hand, f64) and the unembedding (f64 matmul):
/// the brute force the fast projections must equal.
fn brute_rows(model: &Transformer, vectors: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let norm = &model.out_norm;
    let w: Vec<f32> = norm.w.to_vec1().unwrap();
    let b: Vec<f32> = norm
        .b
        .as_ref()
        .map_or(vec![0.0; w.len()], |b| b.to_vec1().unwrap());
    let d = w.len();
    let normed: Vec<f64> = vectors
        .iter()
        .flat_map(|v| {
            let n = d as f64;
            let mean = match norm.rms {
                true => 0.0,
                false => v.iter().map(|&x| x as f64).sum::<f64>() / n,
            };
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            (0..d)
                .map(|i| (v[i] as f64 - mean) / (var + norm.eps).sqrt() * w[i] as f64 + b[i] as f64)
                .collect::<Vec<_>>()
        })
        .collect();
    let x = Tensor::from_vec(normed, (vectors.len(), d), &candle_core::Device::Cpu).unwrap();
    let out = model.output.to_dtype(DType::F64).unwrap();
    x.matmul(&out.t().unwrap()).unwrap().to_vec2().unwrap()
}

/// Top-k ids (ties by lower id), bottom-k ids (ties by higher id) and the strict ranks of `ids`.
fn brute_pick(scores: &[f64], k: usize, ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<usize>) {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    let top = order[..k].to_vec();
    order.sort_by(|&a, &b| {
        scores[a as usize]
            .total_cmp(&scores[b as usize])
            .then(b.cmp(&a))
    });
    let ranks = ids
        .iter()
        .map(|&id| {
            let s = scores[id as usize];
            scores.iter().filter(|&&x| x > s).count()
        })
        .collect();
    (top, order[..k].to_vec(), ranks)
}

/// Relative score gap (to the row's largest |score|) below which f32 and f64 may order two
/// tokens differently.
const TIE: f64 = 1e-5;

/// Checks every cell of `report` (x1, −δ, +δ, and the normalised lens) against the f64 brute
/// force: the i-th top/bottom token has the brute force's i-th score (the same token unless two
/// scores tie within `TIE`), target and answer ranks equal up to the tokens tied with them,
/// scores within 1e-4. Returns (lists checked, lists identical id for id).
fn assert_report_equals_brute_force(
    model: &Transformer,
    tok: &Tokenizer,
    prompt: &str,
    k: usize,
) -> (usize, usize) {
    let opts = LensOptions {
        layers: 0..model.hp.n_layer,
        k,
        all_positions: true,
        use_norm: true,
        full_target: false,
        unit: true,
    };
    let report = lens::run(model, tok, prompt, "Paris", None, &opts).unwrap();
    let ids = tok.encode_prompt(prompt).unwrap();
    let target = tok.encode_target("Paris").unwrap();
    let bp = backward_pass(model, &ids, &target, false).unwrap();
    let unit = |v: &[f32]| -> Vec<f32> {
        // A zero vector stays zero (torch's `normalize` divides by max(‖v‖, ε)).
        let n = v
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        v.iter().map(|&x| (x as f64 / n) as f32).collect()
    };
    let (mut rows, mut views) = (Vec::new(), Vec::new());
    for l in &report.layers {
        assert_eq!(l.cells.len(), ids.len());
        for c in &l.cells {
            let x1: Vec<f32> = bp.trace.ff1_in[l.layer]
                .get(c.pos)
                .unwrap()
                .to_vec1()
                .unwrap();
            let d2: Vec<f32> = bp.d2[l.layer].get(c.pos).unwrap().to_vec1().unwrap();
            let neg: Vec<f32> = d2.iter().map(|v| -v).collect();
            let cases = [
                ("x1", x1.clone(), &c.x1),
                ("-d", neg.clone(), &c.neg_d2),
                ("+d", d2, &c.pos_d2),
                ("x1 unit", unit(&x1), c.x1_unit.as_ref().unwrap()),
                ("-d unit", unit(&neg), c.neg_d2_unit.as_ref().unwrap()),
            ];
            for (name, v, p) in cases {
                rows.push(v);
                views.push((name, l.layer, c.pos, p));
            }
        }
    }
    assert_eq!(views.len(), model.hp.n_layer * ids.len() * 5);
    let scores = brute_rows(model, &rows);
    let pair = [report.target_id, report.answer_id];
    let (mut lists, mut identical) = (0, 0);
    for ((name, layer, pos, p), s) in views.iter().zip(&scores) {
        let (top, bottom, ranks) = brute_pick(s, k, &pair);
        let scale = s.iter().fold(0f64, |m, x| m.max(x.abs()));
        let at = format!("{name} at layer {layer} pos {pos}");
        for (got, want, what) in [(&p.top, &top, "top"), (&p.bottom, &bottom, "bottom")] {
            let got: Vec<u32> = got.iter().map(|t| t.id).collect();
            assert_eq!(got.len(), want.len(), "{what} {at}");
            for (g, w) in got.iter().zip(want) {
                let gap = (s[*g as usize] - s[*w as usize]).abs();
                assert!(gap <= TIE * scale, "{what} {at}: {got:?} vs {want:?}");
            }
            lists += 1;
            identical += usize::from(&got == want);
        }
        for (rank, (&want, &id)) in [p.target_rank, p.answer_rank.unwrap()]
            .into_iter()
            .zip(ranks.iter().zip(&pair))
        {
            let t = s[id as usize];
            let band = s.iter().filter(|&&x| (x - t).abs() <= TIE * scale).count();
            assert!(
                rank.abs_diff(want) < band,
                "rank of {id} {at}: {rank} vs {want}"
            );
            lists += 1;
            identical += usize::from(rank == want);
        }
        for t in p.top.iter().chain(&p.bottom) {
            let err = (t.score as f64 - s[t.id as usize]).abs();
            assert!(err <= 1e-4 * scale, "score of {} {at}: {err}", t.id);
        }
    }
    println!(
        "{} projections ({} layers × {} positions × 5): {identical}/{lists} lists and ranks identical, the rest within f32 ties",
        views.len(),
        report.layers.len(),
        ids.len()
    );
    (lists, identical)
}

#[test]
fn every_projection_equals_the_brute_force_tiny_models() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (model, tok) = load(arch, DType::F32);
        let (lists, identical) = assert_report_equals_brute_force(&model, &tok, PROMPT, 5);
        assert!(
            identical * 100 >= lists * 99,
            "{arch:?}: {identical}/{lists}"
        );
    }
}

#[test]
fn every_projection_equals_the_brute_force_smollm2() {
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let (lists, identical) =
        assert_report_equals_brute_force(model, tok, "Lionel Messi plays for", 10);
    assert!(identical * 100 >= lists * 99, "{identical}/{lists}");
}

/// The int8 pre-screen on SmolLM2 and the Messi prompt: for x1 and −δ of every layer and
/// position, read with both signs (so +δ too), the top/bottom-10 and the ranks of the target and
/// the model's answer equal the brute force that scores every token exactly, id for id and bit for
/// bit; those exact scores are the f32 matmul's to rounding, and the screen decides most tokens.
#[test]
fn screened_projections_equal_the_exact_brute_force_smollm2() {
    use backlens::lens::{project, screen};
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let ids = tok.encode_prompt("Lionel Messi plays for").unwrap();
    let target = tok.encode_target("Paris").unwrap();
    let bp = backward_pass(model, &ids, &target, false).unwrap();
    let n = ids.len();
    let last: Vec<f32> = bp.logits.get(n - 1).unwrap().to_vec1().unwrap();
    let pair = [target[0], backlens::numeric::argmax(&last) as u32];
    let mut parts = Vec::new();
    for l in 0..model.hp.n_layer {
        parts.push(bp.trace.ff1_in[l].clone());
        parts.push(bp.d2[l].neg().unwrap());
    }
    let v = Tensor::cat(&parts, 0).unwrap();
    let signs = [1.0, -1.0];
    let (fast, rescored) = project::screen_and_pick(model, &v, true, &signs, 10, &pair).unwrap();
    let x = project::normed(model, &v, true).unwrap();
    let want = project::with_unembedding(model, |u| screen::brute_force(u, &x, &signs, 10, &pair))
        .unwrap();
    let rows = 2 * model.hp.n_layer * n;
    assert_eq!((fast.len(), want.len()), (rows, rows));
    for (i, (f, w)) in fast.iter().zip(&want).enumerate() {
        let what = if (i / n) % 2 == 0 { "x1" } else { "-d" };
        assert_eq!(f, w, "{what} at layer {} pos {}", i / (2 * n), i % n);
        assert_eq!(f[0].top.len(), 10);
    }
    let matmul = lens::project_rows(model, &v, true).unwrap();
    for (p, m) in fast.iter().zip(&matmul) {
        let scale = m.iter().fold(0f32, |a, x| a.max(x.abs()));
        for &(id, s) in p[0].top.iter().chain(&p[0].bottom) {
            assert!(
                (s - m[id as usize]).abs() <= 1e-5 * scale,
                "token {id}: {s} vs {}",
                m[id as usize]
            );
        }
    }
    let vocab = model.hp.n_vocab;
    println!(
        "{rows} rows: {rescored} exact scores of {} ({:.2}%)",
        rows * vocab,
        100.0 * rescored as f64 / (rows * vocab) as f64
    );
    assert!(rescored * 20 < rows * vocab, "{rescored} exact scores");
}

/// Lemma 4.1: each layer's FF2 gradient has rank = tokens with δ ≠ 0; the last layer's δ is
/// nonzero only at the scored positions.
#[test]
fn ff2_gradient_rank_is_the_number_of_tokens_with_nonzero_delta() {
    let (model, tok) = load(Arch::Llama, DType::F32);
    let common::Loaded {
        tok: stok,
        model: smol,
        ..
    } = common::smollm2_loaded();
    let cases = [
        (&model, &tok, PROMPT, "Paris", false, 1),
        (&model, &tok, PROMPT, "Paris city", true, 2),
        (smol, stok, "Lionel Messi plays for", "Paris", false, 1),
    ];
    for (model, tok, prompt, target, full, scored) in cases {
        let opts = LensOptions {
            layers: 0..model.hp.n_layer,
            k: 1,
            all_positions: false,
            use_norm: true,
            full_target: full,
            unit: false,
        };
        let tokens = tok.encode_prompt(prompt).unwrap().len()
            + usize::from(full) * (tok.encode_target(target).unwrap().len() - 1);
        let target_len = tok.encode_target(target).unwrap().len();
        assert_eq!(scored, if full { target_len } else { 1 }, "{target:?}");
        let r = lens::run(model, tok, prompt, target, None, &opts).unwrap();
        let last = r.layers.last().unwrap();
        for l in &r.layers[..r.layers.len() - 1] {
            let g = &l.grad_rank;
            assert_eq!(g.singular_values.len(), tokens);
            assert_eq!(g.nonzero_tokens, tokens, "layer {}", l.layer);
            assert_eq!(
                g.rank, g.nonzero_tokens,
                "layer {}: {:?}",
                l.layer, g.singular_values
            );
        }
        let g = &last.grad_rank;
        assert_eq!(
            (g.rank, g.nonzero_tokens),
            (scored, scored),
            "{:?}",
            g.singular_values
        );
        // The singular values' squares sum to ‖Σ δ aᵀ‖²_F.
        let sigma2: f64 = g.singular_values.iter().map(|s| s * s).sum();
        let c = last.cells.last().unwrap();
        if scored == 1 {
            let want = (c.norm_d2 as f64 * c.norm_a as f64).powi(2);
            assert!((sigma2 - want).abs() <= 1e-4 * want, "{sigma2} vs {want}");
        }
        println!(
            "{prompt:?} → {target:?}: {tokens} tokens, last layer σ {:?}, layer 0 σ_min/σ_max {:.2e}",
            g.singular_values,
            r.layers[0].grad_rank.singular_values[tokens - 1] / r.layers[0].grad_rank.singular_values[0]
        );
    }
}

/// The model's own answer in +δ (the paper's "− Barcelona") and the VJP cosines on SmolLM2.
#[test]
fn smollm2_answer_rank_in_plus_delta_and_vjp_cosines() {
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let opts = LensOptions {
        layers: 0..30,
        k: 5,
        all_positions: false,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    let prompt = "Lionel Messi plays for";
    let r = lens::run(model, tok, prompt, "Paris", None, &opts).unwrap();
    let ranks: Vec<usize> = r
        .layers
        .iter()
        .map(|l| l.cells[0].pos_d2.answer_rank.unwrap())
        .collect();
    println!("answer {:?}; its rank in +δ per layer {ranks:?}", r.answer);
    // At the last layer δ ∝ Eᵀ(p − e_target) through the norm: +δ points at what the model
    // would say, the token the gradient pushes away from.
    assert_eq!(r.answer, " the");
    assert_eq!(ranks[29], 0);
    assert!(ranks[..4].iter().all(|&r| r > 1000), "{ranks:?}");
    let ids = tok.encode_prompt(prompt).unwrap();
    let target = tok.encode_target("Paris").unwrap();
    let bp = backward_pass(model, &ids, &target, false).unwrap();
    let last: Vec<Vec<f32>> = (0..30)
        .map(|l| bp.d2[l].get(ids.len() - 1).unwrap().to_vec1().unwrap())
        .collect();
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    for i in 0..30 {
        for j in 0..30 {
            let want = cos(&last[i], &last[j]);
            assert!((r.vjp_cosine[i][j] as f64 - want).abs() < 1e-5, "{i} {j}");
        }
    }
    let adjacent: Vec<f32> = (1..30).map(|i| r.vjp_cosine[i][i - 1]).collect();
    println!("adjacent-layer VJP cosines {adjacent:?}");
}

/// The lean backward pass keeps no weight-sized gradient: everything left in its gradient store
/// (probes and small leaves) is far smaller than one FF2 matrix.
#[test]
fn backward_pass_allocates_no_weight_gradient() {
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let ids = tok.encode_prompt("Lionel Messi plays for").unwrap();
    let target = tok.encode_target("Paris").unwrap();
    let bp = backward_pass(model, &ids, &target, false).unwrap();
    let largest = bp
        .grads
        .get_ids()
        .map(|id| bp.grads.get_id(*id).unwrap().elem_count())
        .max()
        .unwrap();
    let ff2 = model.hp.n_embd * model.hp.n_ff;
    println!("largest gradient kept: {largest} elements; one FF2 weight: {ff2}");
    let activation = ids.len() * model.hp.n_vocab.max(model.hp.n_ff);
    assert!(largest <= activation && largest < ff2, "{largest}");
}

/// The streamed lens (one block at a time, recomputed in the backward) gives the in-memory
/// lens's numbers: same tokens and ranks everywhere, δ norms and loss to 1e-5.
#[test]
fn streamed_lens_equals_the_in_memory_lens() {
    let tiny = |arch| {
        let f = common::tiny(arch);
        let src = backlens::source::ModelSource::open(&f.gguf).unwrap();
        let (model, tok) = load(arch, DType::F32);
        (src, model, tok)
    };
    let smol_src = backlens::source::ModelSource::open(common::smollm2()).unwrap();
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let (g_src, g_model, g_tok) = tiny(Arch::Gpt2);
    let (l_src, l_model, l_tok) = tiny(Arch::Llama);
    let cases = [
        (&g_src, &g_model, &g_tok, PROMPT, 0..3, true),
        (&l_src, &l_model, &l_tok, PROMPT, 1..2, false),
        (
            &smol_src,
            model,
            tok,
            "Lionel Messi plays for",
            20..30,
            false,
        ),
    ];
    for (src, model, tok, prompt, layers, full_target) in cases {
        let opts = LensOptions {
            layers,
            k: 5,
            all_positions: true,
            use_norm: true,
            full_target,
            unit: false,
        };
        let unembedding = Transformer::load_unembedding(src).unwrap();
        let streamed =
            lens::run_streamed(src, &unembedding, tok, prompt, "Paris city", None, &opts).unwrap();
        let memory = lens::run(model, tok, prompt, "Paris city", None, &opts).unwrap();
        assert!((streamed.loss - memory.loss).abs() <= 1e-5 * memory.loss.abs());
        assert_eq!(streamed.answer_id, memory.answer_id);
        assert_eq!(streamed.layers.len(), memory.layers.len());
        let ids = |p: &lens::Projection| p.top.iter().map(|t| t.id).collect::<Vec<_>>();
        let mut worst = 0f32;
        for (s, m) in streamed.layers.iter().zip(&memory.layers) {
            assert_eq!(s.layer, m.layer);
            assert_eq!(s.grad_rank.rank, m.grad_rank.rank);
            for (a, b) in s.cells.iter().zip(&m.cells) {
                for (p, q) in [
                    (&a.x1, &b.x1),
                    (&a.neg_d2, &b.neg_d2),
                    (&a.pos_d2, &b.pos_d2),
                ] {
                    assert_eq!(ids(p), ids(q), "layer {} pos {}", s.layer, a.pos);
                    assert_eq!(p.target_rank, q.target_rank);
                }
                worst = worst.max((a.norm_d2 - b.norm_d2).abs() / b.norm_d2.max(1e-30));
            }
        }
        println!("{prompt:?}: streamed vs in memory, worst ‖δ‖ relative difference {worst:.2e}");
        assert!(worst <= 1e-5, "{worst}");
    }
}

/// `lens --requests`: every aggregate is the mean (or median) of the per-record values that the
/// ordinary lens report (all positions) gives, and the segments partition each prompt.
#[test]
fn aggregate_equals_the_mean_of_per_record_lens_values() {
    use backlens::lens::aggregate::{self, Query, Segment};
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let records =
        backlens::eval::load_records(&common::counterfact("counterfact-val.json"), 0, Some(4))
            .unwrap();
    let queries: Vec<Query> = records
        .iter()
        .map(|r| Query {
            case_id: r.case_id,
            prompt: &r.prompt,
            target: &r.target_new,
            subject: r.subject.as_deref(),
        })
        .collect();
    let agg = aggregate::run(model, tok, &queries, 0..30, |_| {}).unwrap();
    assert_eq!(agg.records, 4);
    let opts = LensOptions {
        layers: 0..30,
        k: 1,
        all_positions: true,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    let mut total_tokens = 0;
    // Per layer and segment, each record's mean ‖δ‖ from the plain lens report.
    let mut want = vec![vec![Vec::new(); 4]; 30];
    let mut ranks = vec![(Vec::new(), Vec::new()); 30];
    for (q, rec) in queries.iter().zip(&agg.per_record) {
        let r = lens::run(model, tok, q.prompt, q.target, q.subject, &opts).unwrap();
        let n = r.tokens.len();
        let ids = tok.encode_prompt(q.prompt).unwrap();
        let span = lens::subject_tokens(tok, q.prompt, &ids, q.subject.unwrap()).unwrap();
        let segs = aggregate::segments(n, span.clone());
        let c = &rec.segment_tokens;
        assert_eq!(
            c.prefix + c.subject + c.relation + c.last,
            n,
            "{:?}",
            q.prompt
        );
        assert_eq!(
            (c.last, c.subject),
            (1, span.len() - usize::from(span.end == n))
        );
        total_tokens += n;
        for (l, layer) in r.layers.iter().enumerate() {
            for (si, &s) in Segment::ALL.iter().enumerate() {
                let v: Vec<f64> = layer
                    .cells
                    .iter()
                    .filter(|cell| segs[cell.pos] == s)
                    .map(|cell| cell.norm_d2 as f64)
                    .collect();
                if !v.is_empty() {
                    want[l][si].push(v.iter().sum::<f64>() / v.len() as f64);
                }
            }
            let last = layer.cells.last().unwrap();
            ranks[l].0.push(last.x1.target_rank as f64);
            ranks[l].1.push(last.neg_d2.target_rank as f64);
        }
    }
    let c = &agg.segment_tokens;
    assert_eq!(c.prefix + c.subject + c.relation + c.last, total_tokens);
    assert!(c.subject >= 4 && c.relation > 0, "{c:?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (l, layer) in agg.layers.iter().enumerate() {
        for (si, &s) in Segment::ALL.iter().enumerate() {
            match layer.norm_d2.get(s) {
                Some(got) => {
                    let w = mean(&want[l][si]);
                    assert_eq!(got.n, want[l][si].len());
                    assert!(
                        (got.mean - w).abs() <= 1e-6 * w.abs(),
                        "L{l} {s:?}: {} vs {w}",
                        got.mean
                    );
                }
                None => assert!(want[l][si].is_empty()),
            }
        }
        assert_eq!(layer.rank_x1.mean, mean(&ranks[l].0), "L{l}");
        assert_eq!(layer.rank_neg_d2.mean, mean(&ranks[l].1), "L{l}");
        let mut sorted = ranks[l].1.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(
            layer.rank_neg_d2.median,
            0.5 * (sorted[1] + sorted[2]),
            "L{l}"
        );
    }
    // The last layer's δ is zero away from the last token (nothing after it reads them).
    assert_eq!(agg.layers[29].norm_d2.subject.as_ref().unwrap().mean, 0.0);
    assert!(agg.layers[29].norm_d2.last.as_ref().unwrap().mean > 0.0);
}

/// `lens --min-step`: at a few layers of SmolLM2, the step found for FPS and for one SGD step
/// makes the target llama.cpp's top-1 and 0.9× of it does not, checked with adapters that
/// carry the step themselves (scale 1), not the searched adapter at a scale.
#[test]
fn smollm2_min_step_succeeds_and_nine_tenths_does_not() {
    use backlens::edit::shift;
    use backlens::eval::min_step::{self, StepMethod};
    use backlens::runtime::LlamaRuntime;
    use backlens::write::{OutputClaim, OutputKind};
    let common::Loaded { tok, model, .. } = common::smollm2_loaded();
    let rec =
        &backlens::eval::load_records(&common::counterfact("counterfact-val.json"), 0, Some(1))
            .unwrap()[0];
    let dir = common::temp_dir("min-step");
    let gguf = common::smollm2();
    let r = min_step::min_steps(&gguf, model, tok, rec, 22..25, &dir, |_| {}).unwrap();
    println!("{}", serde_json::to_string(&r.layers).unwrap());
    let prompt = tok.encode_prompt(&rec.prompt).unwrap();
    let target = tok.encode_target(&rec.target_new).unwrap();
    let bp = backward_pass(model, &prompt, &target, false).unwrap();
    let e = shift::embedding(model, target[0]).unwrap();
    let mut rt = LlamaRuntime::load(&gguf).unwrap();
    let mut top1_with = |delta: &backlens::delta::Delta, tag: &str| -> bool {
        let path = dir.join(format!("{tag}.gguf"));
        let claim = OutputClaim::new(&path, OutputKind::File, &[], false).unwrap();
        let staged =
            backlens::patch::stage_adapter("llama", std::slice::from_ref(delta), claim).unwrap();
        let mut adapter = rt.load_lora(staged.path()).unwrap();
        let mut s = rt.session().unwrap();
        s.set_lora(&mut adapter, 1.0).unwrap();
        let logits = s.logits_last(&prompt).unwrap();
        backlens::numeric::argmax(&logits) as u32 == target[0]
    };
    assert_eq!(r.layers.len(), 3);
    for l in &r.layers {
        for (method, search) in [(StepMethod::Shift, &l.shift), (StepMethod::Grad, &l.grad)] {
            let step = search
                .step
                .unwrap_or_else(|| panic!("L{} {method:?}: no step", l.layer));
            let below = search.below.unwrap();
            assert!(below < step && step <= below * min_step::STEP_RATIO * (1.0 + 1e-12));
            assert!(search.margin.unwrap() > 0.0);
            let unit = min_step::unit_delta(&bp, &e, method, l.layer).unwrap();
            let scaled = |s: f64| {
                let mut d = unit.clone();
                d.out_vecs
                    .iter_mut()
                    .flatten()
                    .for_each(|v| *v = (*v as f64 * s) as f32);
                d
            };
            let tag = format!("{}-{method:?}", l.layer);
            assert!(
                top1_with(&scaled(step), &format!("{tag}-at")),
                "L{} {method:?} {step}",
                l.layer
            );
            assert!(
                !top1_with(&scaled(0.9 * step), &format!("{tag}-below")),
                "L{} {method:?} 0.9×{step}",
                l.layer
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// docs/errors.md row 42: `lens --requests` needs each record's subject inside its prompt.
#[test]
fn row42_aggregate_refuses_a_record_without_its_subject() {
    use backlens::lens::aggregate::{self, Query};
    let (model, tok) = load(Arch::Llama, DType::F32);
    let query = |subject| Query {
        case_id: None,
        prompt: "The city of",
        target: "Paris",
        subject,
    };
    let err = |q: Query| {
        aggregate::run(&model, &tok, &[q], 0..2, |_| {})
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(query(None)),
        "request #0 (\"The city of\") names no subject (the segments are read from it)"
    );
    assert_eq!(
        err(query(Some("Rome"))),
        "request #0: the subject \"Rome\" is not in the prompt \"The city of\""
    );
}
