//! ROME on SmolLM2: the written adapter holds exactly ΔW = (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*)
//! recomputed here from scratch (k* from full forwards, C from the raw moments with a conjugate
//! gradient solve), the v* optimisation's loss goes down, and 10 val records flip in llama.cpp.

mod common;

use backlens::edit::hparams::MethodParams;
use backlens::edit::{EditRequest, EditSettings, Method};
use backlens::lora;
use backlens::patch::{self, Format, Forward, Job, WhitenSetup};
use backlens::weights::gguf::GgufFile;
use backlens::write::gguf::Ff2Type;
use backlens::write::{OutputClaim, OutputKind};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// C z = b by conjugate gradients (C symmetric positive definite, row-major n × n).
fn cg_solve(c: &[f64], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mul = |v: &[f64]| -> Vec<f64> {
        c.chunks_exact(n)
            .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = vec![0.0; n];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    let stop = 1e-24 * dot(b, b);
    for _ in 0..20 * n {
        if rr <= stop {
            break;
        }
        let cp = mul(&p);
        let alpha = rr / dot(&p, &cp);
        x.iter_mut().zip(&p).for_each(|(x, p)| *x += alpha * p);
        r.iter_mut().zip(&cp).for_each(|(r, c)| *r -= alpha * c);
        let next = dot(&r, &r);
        p = r.iter().zip(&p).map(|(r, p)| r + next / rr * p).collect();
        rr = next;
    }
    assert!(rr <= stop, "CG did not converge: ‖r‖² = {rr:.3e}");
    x
}

/// The subject's last token in `text`, as ROME finds it: the length of the tokenized text up to
/// the end of the subject, minus one.
fn subject_row(tok: &backlens::tokenizer::Tokenizer, text: &str, subject: &str) -> usize {
    let end = text.find(subject).unwrap() + subject.len();
    tok.encode_prompt(&text[..end]).unwrap().len() - 1
}

#[test]
fn rome_adapter_holds_the_rank_one_formula_and_its_loss_goes_down() {
    let path = common::smollm2();
    let common::Loaded {
        source, tok, model, ..
    } = common::smollm2_loaded();
    let params = MethodParams::for_arch(model.hp.arch).unwrap();
    let layer = Method::Rome.default_layer(&model.hp).unwrap();
    let records = EditRequest::load_file(&common::counterfact("counterfact-val.json")).unwrap();
    let req = records[0].clone();
    let dir = common::temp_dir("rome");
    let out = dir.join("rome-lora.gguf");
    let job = Job {
        requests: vec![req.clone()],
        settings: EditSettings {
            method: Method::Rome,
            layer,
            lr: 1.0,
        },
        whiten: WhitenSetup::cached(),
        format: Format::Lora,
        ff2_type: Ff2Type::F32,
        check: true,
        forward: Forward::Candle,
        threads: None,
    };
    let claim = OutputClaim::new(&out, OutputKind::File, &[&path], false).unwrap();
    let report = patch::run(source, tok, &job, claim).unwrap();
    let opt = report.edits[0]
        .optimisation
        .as_ref()
        .expect("rome reports its optimisation");
    let losses: Vec<f64> = opt.steps.iter().map(|s| s.loss).collect();
    println!("v* loss per step: {losses:.4?}");
    assert!(losses.len() >= 2, "{losses:?}");
    assert!(
        losses.last().unwrap() < &(0.5 * losses[0]),
        "the loss did not go down: {losses:?}"
    );

    // k*: the mean FF2 input at the subject's last token over the prompt and the prefixes, from
    // full forward passes.
    let subject = req.subject.as_deref().unwrap();
    let n_ff = model.hp.n_ff;
    let mut k = vec![0f64; n_ff];
    let texts: Vec<String> = std::iter::once(String::new())
        .chain(params.rome.context_prefixes.iter().cloned())
        .map(|p| format!("{p}{}", req.prompt))
        .collect();
    for text in &texts {
        let ids = tok.encode_prompt(text).unwrap();
        let (_, trace) = model.forward(&ids, None).unwrap();
        let row: Vec<f32> = trace.ff2_in[layer]
            .get(subject_row(tok, text, subject))
            .unwrap()
            .to_vec1()
            .unwrap();
        k.iter_mut()
            .zip(&row)
            .for_each(|(a, &b)| *a += b as f64 / texts.len() as f64);
    }
    // v* = W k* + δ; the numerator v* − W k* with W read from the model.
    let w: Vec<f32> = model.blocks[layer]
        .ffn
        .down
        .w
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let wk: Vec<f64> = w
        .chunks_exact(n_ff)
        .map(|row| row.iter().zip(&k).map(|(a, b)| *a as f64 * b).sum())
        .collect();
    let v: Vec<f64> = wk
        .iter()
        .zip(&opt.delta)
        .map(|(a, &d)| a + d as f64)
        .collect();
    // C = E[a aᵀ] + λ·I from the cached raw moments, solved by CG.
    let store = WhitenSetup::cached()
        .store(Method::Rome, model, tok, &path)
        .unwrap()
        .unwrap();
    let m = store.moments(layer).unwrap();
    let mut c = m.all.clone();
    let mean_diag = (0..n_ff).map(|i| c[i * n_ff + i]).sum::<f64>() / n_ff as f64;
    for i in 0..n_ff {
        c[i * n_ff + i] += params.rome.mom2_ridge * mean_diag;
    }
    let z = cg_solve(&c, &k);
    let kz: f64 = k.iter().zip(&z).map(|(a, b)| a * b).sum();
    let want: Vec<f64> = v
        .iter()
        .zip(&wk)
        .flat_map(|(vo, wo)| z.iter().map(move |zi| (vo - wo) * zi / kz))
        .collect();

    // ΔW read back from the adapter: scale · B·A.
    let base = GgufFile::open(&path).unwrap();
    let adapter = GgufFile::open(&out).unwrap();
    let pairs = lora::validate(&base, &adapter).unwrap();
    assert_eq!(pairs.pairs.len(), 1);
    assert_eq!(
        pairs.pairs[0].name(),
        format!("blk.{layer}.ffn_down.weight")
    );
    let f = pairs.pairs[0].factors(&adapter).unwrap();
    assert_eq!((f.m, f.n, f.r), (model.hp.n_embd, n_ff, 1));
    let got: Vec<f64> = (0..f.m)
        .flat_map(|o| {
            let f = &f;
            (0..f.n).map(move |i| {
                f.scale
                    * (0..f.r)
                        .map(|j| f.b[o * f.r + j] * f.a[j * f.n + i])
                        .sum::<f64>()
            })
        })
        .collect();
    let diff: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let scale: f64 = want.iter().map(|a| a * a).sum::<f64>().sqrt();
    println!(
        "‖ΔW_file − ΔW_formula‖/‖ΔW_formula‖ = {:.2e} (‖ΔW‖ = {scale:.4}, ‖δ‖ = {:.3})",
        diff / scale,
        opt.delta_norm
    );
    assert!(diff / scale <= 1e-4, "{:.3e}", diff / scale);
    let check = report.check.expect("checked through llama.cpp");
    assert_eq!(check.after[0].rank, 0, "{:?}", check.after[0]);
}

/// Cold, as CI starts: `--no-stats-cache` computes layer 6's statistics inside the run.
#[test]
fn rome_flips_at_least_9_of_10_val_records_in_llama_cpp() {
    let model = common::smollm2();
    let data = common::counterfact("counterfact-val.json");
    let start = std::time::Instant::now();
    let out = Command::new(BIN)
        .args([
            "eval",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--n", "10", "--method", "rome", "--no-fluency", "--json"])
        .arg("--no-stats-cache")
        .output()
        .unwrap();
    println!(
        "eval --method rome on 10 val records, statistics computed: {:.0} s wall",
        start.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &report["summary"]["efficacy"];
    let (mean, n) = (s["mean"].as_f64().unwrap(), s["n"].as_u64().unwrap());
    println!(
        "rome efficacy (P(new) > P(true) in llama.cpp) on 10 val records: {mean} (paraphrase {}, neighborhood {})",
        report["summary"]["paraphrase"]["mean"], report["summary"]["neighborhood"]["mean"]
    );
    assert_eq!(n, 10);
    assert!(mean >= 0.9, "{mean}");
}

// docs/errors.md row 41
#[test]
fn rome_without_a_subject_is_one_line_naming_the_request_and_writes_nothing() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("rome-subject");
    let out = dir.join("out.gguf");
    let run = Command::new(BIN)
        .args(["edit", fx.gguf.to_str().unwrap()])
        .args([
            "--prompt",
            "The city of",
            "--target",
            "Paris",
            "--method",
            "rome",
        ])
        .args(["--no-stats-cache", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: the request \"The city of\" names no subject (rome and memit key the edit on it; give --subject or a \"subject\" field)"
    );
    assert!(run.stdout.is_empty());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "left something in {}",
        dir.display()
    );
}

/// MEMIT over layers 0 and 1 of the tiny Llama (block 2 carries the subject row to the last), one request, no context prefixes and a
/// negligible w: the residual after the last layer at the subject's last token becomes exactly
/// the optimised z = h + δ, one rank-one change per layer.
#[test]
fn memit_writes_the_optimised_residual_across_its_layers_on_a_tiny_model() {
    use backlens::edit::whiten::{builtin_prompts, StatsStore, WhitenOptions};
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let common::Loaded { tok, model, .. } = common::load(&fx.gguf);
    let prompts: Vec<Vec<u32>> = builtin_prompts()
        .iter()
        .step_by(8)
        .map(|p| tok.encode_prompt(p).unwrap())
        .collect();
    let store = StatsStore::from_tokens(
        &model,
        prompts,
        &fx.gguf,
        "t",
        WhitenOptions::default(),
        None,
    )
    .unwrap();
    let mut p = MethodParams::for_arch(model.hp.arch).unwrap();
    p.rome.context_prefixes.clear();
    p.memit.layers = 2;
    p.memit.mom2_update_weight = 1e-9;
    let req = EditRequest::new("Lionel Messi plays for", "Paris", Some("Lionel Messi")).unwrap();
    let out =
        backlens::edit::memit::compute_all(&model, &tok, std::slice::from_ref(&req), 1, &p, &store)
            .unwrap();
    let o = &out[0];
    let deltas: Vec<_> = o.deltas().collect();
    assert_eq!(
        deltas
            .iter()
            .map(|d| (d.layer, d.out_vecs.len()))
            .collect::<Vec<_>>(),
        [(1, 1), (0, 1)]
    );
    let opt = o.optimisation.as_ref().unwrap();
    assert!(opt.converged(), "{:?}", opt.steps);
    let ids = tok.encode_prompt(&req.prompt).unwrap();
    let at = subject_row(&tok, &req.prompt, "Lionel Messi");
    let resid = |m: &backlens::model::Transformer| -> Vec<f32> {
        m.resid_after(&ids, 1)
            .unwrap()
            .0
            .get(at)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let h0 = resid(&model);
    let mut edited = model.clone();
    for d in &deltas {
        edited.apply_delta(d).unwrap();
    }
    let h1 = resid(&edited);
    let err: f64 = h1
        .iter()
        .zip(&h0)
        .zip(&opt.delta)
        .map(|((a, b), d)| ((a - b - d) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "‖h_after − (h + δ)‖ / ‖δ‖ = {:.2e} (‖δ‖ = {:.3})",
        err / opt.delta_norm,
        opt.delta_norm
    );
    assert!(err / opt.delta_norm <= 1e-3, "{}", err / opt.delta_norm);
}

/// The split forward of the value optimisation (the rows before each prompt's subject row
/// computed once, as keys and values the later rows attend to) gives the full packed forward's
/// logits, and the packed statistics trace gives each prompt's own FF2 inputs, on every
/// family's tiny model (Gemma 3's sliding window of 4 included).
#[test]
fn split_and_packed_forwards_equal_the_full_ones_on_every_family() {
    use backlens::arch::Arch;
    use candle_core::Tensor;
    let max_rel = |a: &Tensor, b: &Tensor| -> f64 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(scale > 0.0);
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max)
            / scale
    };
    for arch in Arch::ALL {
        let fx = common::tiny(arch);
        let common::Loaded { model, .. } = common::load(&fx.gguf);
        let seqs: Vec<Vec<u32>> = vec![(1..8).collect(), (3..14).collect(), (5..9).collect()];
        let past = [2usize, 5, 0];
        let segments: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let hs: Vec<Tensor> = seqs
            .iter()
            .map(|s| model.resid_after(s, 0).unwrap().0)
            .collect();
        let full = Tensor::cat(&hs, 0).unwrap();
        // Score the last two rows of every sequence.
        let mut rows_full = Vec::new();
        let mut rows_split = Vec::new();
        let (mut at, mut at_split) = (0, 0);
        for (&len, &p) in segments.iter().zip(&past) {
            rows_full.extend([at + len - 2, at + len - 1]);
            rows_split.extend([at_split + len - p - 2, at_split + len - p - 1]);
            at += len;
            at_split += len - p;
        }
        let want = model
            .forward_packed(&full, 1, &segments, &rows_full)
            .unwrap();
        let past_h: Vec<Tensor> = hs
            .iter()
            .zip(&past)
            .map(|(h, &p)| h.narrow(0, 0, p).unwrap())
            .collect();
        let later: Vec<Tensor> = hs
            .iter()
            .zip(&past)
            .map(|(h, &p)| h.narrow(0, p, h.dim(0).unwrap() - p).unwrap())
            .collect();
        let kv = model
            .past_rows(&Tensor::cat(&past_h, 0).unwrap(), 1, &past)
            .unwrap();
        let counts: Vec<usize> = segments.iter().zip(&past).map(|(l, p)| l - p).collect();
        let got = model
            .forward_after(&Tensor::cat(&later, 0).unwrap(), &kv, &counts, &rows_split)
            .unwrap();
        let e = max_rel(&got, &want);
        println!(
            "{}: split forward vs full, max |Δlogit| / max |logit| = {e:.2e}",
            arch.name()
        );
        assert!(e <= 1e-5, "{}: {e:.3e}", arch.name());

        let tokens: Vec<u32> = seqs.concat();
        let packed = model.ff2_in_packed(&tokens, &segments, 1).unwrap();
        let alone: Vec<Tensor> = seqs
            .iter()
            .map(|s| model.trace_through(s, 1).unwrap().ff2_in[1].clone())
            .collect();
        let e = max_rel(&packed, &Tensor::cat(&alone, 0).unwrap());
        println!(
            "{}: packed FF2 inputs vs one prompt at a time: {e:.2e}",
            arch.name()
        );
        assert!(e <= 1e-5, "{}: {e:.3e}", arch.name());
    }
}

/// `eval::table1::run` on the tiny Llama: one row per method in order, each row's records equal
/// an evaluation of that method alone (the rows share nothing), and the ROME row edits at its
/// default layer with statistics computed (no cache).
#[test]
fn table1_rows_equal_each_method_evaluated_alone_on_a_tiny_model() {
    use backlens::eval::{self, table1, EvalConfig, LayerChoice, LrChoice};
    let f = common::tiny(backlens::arch::Arch::Llama);
    let l = common::load(&f.gguf);
    let records =
        eval::load_records(&common::counterfact("counterfact-val.json"), 0, Some(4)).unwrap();
    let dir = common::temp_dir("table1");
    let config = table1::Table1Config {
        methods: vec![None, Some(Method::Shift), Some(Method::Rome)],
        layer: None,
        lr: LrChoice::Fixed(0.24),
        fluency: false,
        ff2_type: Ff2Type::F32,
        forward: Forward::Candle,
        whiten: WhitenSetup::default(),
        value: Default::default(),
    };
    let mut names = Vec::new();
    let rows = table1::run(&f.gguf, &l.model, &l.tok, &records, &config, &dir, |n| {
        names.push(n.to_string())
    })
    .unwrap();
    assert_eq!(names, ["none", "shift", "rome"]);
    let got: Vec<(&str, Option<usize>)> =
        rows.iter().map(|r| (r.method.as_str(), r.layer)).collect();
    let n_layer = l.model.hp.n_layer;
    let rome_layer = Method::Rome.default_layer(&l.model.hp).unwrap();
    assert_eq!(
        got,
        [
            ("none", None),
            ("shift", Some(EditSettings::default_layer(n_layer))),
            ("rome", Some(rome_layer))
        ]
    );
    for (row, method) in rows.iter().zip([None, Some(Method::Shift)]) {
        let alone = EvalConfig {
            method,
            layer: LayerChoice::Fixed(EditSettings::default_layer(n_layer)),
            lr: LrChoice::Fixed(0.24),
            sequential: false,
            fluency: false,
            ff2_type: Ff2Type::F32,
            forward: Forward::Candle,
        };
        let mut model = l.model.clone();
        let want =
            eval::evaluate(&f.gguf, &mut model, &l.tok, &records, &alone, &dir, |_| {}).unwrap();
        let key = |r: &eval::RecordScores| {
            (
                r.case_id,
                r.skipped,
                r.efficacy,
                r.paraphrase,
                r.neighborhood,
                r.efficacy_magnitude.to_bits(),
            )
        };
        let a: Vec<_> = row.report.records.iter().map(key).collect();
        let b: Vec<_> = want.records.iter().map(key).collect();
        assert_eq!(a, b, "{}", row.method);
    }
    let rome = &rows[2].report;
    let edited = rome.records.iter().filter(|r| !r.skipped).count();
    println!(
        "tiny Llama table1: rome edited {edited}/4, efficacy {:.2}",
        rome.summary.efficacy.mean
    );
    assert_eq!(rome.records.len(), 4);
    assert!(edited >= 1, "rome edited none of the 4 records");
}
