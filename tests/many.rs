//! Many edits in one model: `shift-protected` keeps earlier edits while later ones arrive,
//! `eval --edits/--curve` scores every record on the one edited model, and the bad inputs of
//! docs/errors.md rows 38–40 and 43–45 fail with one line, exit 2, nothing left behind.

mod common;

use backlens::edit::batch::JointOptions;
use backlens::edit::minimal::ValueRule;
use backlens::edit::{EditContext, EditRequest, EditSettings, Method};
use backlens::eval::many::{self, ManyConfig};
use backlens::model::Transformer;
use backlens::patch::{self, Format, Forward, Job, WhitenSetup};
use backlens::runtime::LlamaRuntime;
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::weights::gguf::GgufFile;
use backlens::write::gguf::Ff2Type;
use backlens::write::{OutputClaim, OutputKind};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

fn val(n: usize) -> Vec<EditRequest> {
    let all = EditRequest::load_file(&common::counterfact("counterfact-val.json")).unwrap();
    all.into_iter().take(n).collect()
}

/// P(new) > P(true) on each record's prompt, on the model with `adapter` applied.
fn efficacy(
    rt: &mut LlamaRuntime,
    tok: &Tokenizer,
    adapter: &Path,
    records: &[EditRequest],
) -> usize {
    let mut a = rt.load_lora(adapter).unwrap();
    let mut s = rt.session().unwrap();
    s.set_lora(&mut a, 1.0).unwrap();
    records
        .iter()
        .filter(|r| {
            let prompt = tok.encode_prompt(&r.prompt).unwrap();
            let new = tok.encode_target(&r.target_new).unwrap();
            let truth = tok
                .encode_target(r.ground_truth.as_deref().unwrap())
                .unwrap();
            s.sequence_logprob(&prompt, &new).unwrap()
                > s.sequence_logprob(&prompt, &truth).unwrap()
        })
        .count()
}

#[test]
fn fifty_protected_sequential_edits_keep_the_earlier_ones_through_llama_cpp() {
    let dir = common::temp_dir("protected50");
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let records = val(50);
    let run = |method: Method, name: &str| {
        let job = Job {
            requests: records.clone(),
            settings: EditSettings {
                method,
                layer: 22,
                lr: 0.24,
            },
            whiten: WhitenSetup::cached(),
            format: Format::Lora,
            ff2_type: Ff2Type::F32,
            check: false,
            forward: Forward::Candle,
            threads: None,
        };
        let out = dir.join(name);
        let claim = OutputClaim::new(&out, OutputKind::File, &[&path], false).unwrap();
        let report = patch::run(&src, &tok, &job, claim).unwrap();
        (out, report.edits.iter().filter(|e| !e.skipped).count())
    };
    let (protected, edited) = run(Method::ShiftProtected, "protected.gguf");
    let g = GgufFile::open(&protected).unwrap();
    let lora_a = g.tensor("blk.22.ffn_down.weight.lora_a").unwrap();
    assert_eq!(
        lora_a.dims[1] as usize, edited,
        "one rank per edited record"
    );
    let mut rt = LlamaRuntime::load(&path).unwrap();
    let kept = efficacy(&mut rt, &tok, &protected, &records);
    let (plain, _) = run(Method::Shift, "shift.gguf");
    let plain_kept = efficacy(&mut rt, &tok, &plain, &records);
    println!(
        "50 sequential val edits, efficacy at the end: shift-protected {kept}/50 ({edited} edited), shift {plain_kept}/50"
    );
    assert!(kept >= 45, "{kept}/50");
}

#[test]
fn eval_edits_scores_every_record_on_one_model() {
    let l = common::smollm2_loaded();
    let path = common::smollm2();
    let records = val(8);
    let store = WhitenSetup::cached()
        .store(Method::Batch, &l.model, &l.tok, &path)
        .unwrap();
    let ctx = EditContext {
        stats: store.as_ref(),
        ..EditContext::default()
    };
    let config = ManyConfig {
        methods: vec![Method::Shift, Method::Batch],
        layer: 22,
        lr: 0.24,
        sizes: vec![4, 8],
        ppl_tokens: 256,
        ff2_type: Ff2Type::F32,
        value: ValueRule::default(),
        joint: JointOptions::default(),
    };
    let model: &Transformer = &l.model;
    let report = many::evaluate_many(
        &path,
        model,
        &l.tok,
        &records,
        &config,
        &ctx,
        &std::env::temp_dir(),
        |_| {},
    )
    .unwrap();
    let base = report.baseline.perplexity;
    assert_eq!(base.tokens, 255);
    assert!(base.perplexity.is_finite() && base.perplexity > 1.0);
    assert_eq!(report.points.len(), 4);
    for p in &report.points {
        println!(
            "{} n={} edited={} ES {:.3} PS {:.3} NS-top1 {:.3} ppl × {:.4} fluency {:.3}",
            p.method,
            p.n,
            p.edited,
            p.summary.efficacy.mean,
            p.summary.paraphrase.mean,
            p.summary.neighborhood_top1.mean,
            p.perplexity_ratio,
            p.fluency.mean
        );
        assert_eq!(p.summary.efficacy.n, p.n, "every record scored");
        assert!(p.edited <= p.n && p.edited > 0);
        assert!(p.perplexity_ratio.is_finite() && p.perplexity_ratio > 0.5);
        assert!(p.fluency.mean.is_finite());
    }
    let (shift8, batch8) = (&report.points[1], &report.points[3]);
    // The joint solve protects general text far better than plain sequential FPS.
    assert!(
        batch8.perplexity_ratio < shift8.perplexity_ratio,
        "{} vs {}",
        batch8.perplexity_ratio,
        shift8.perplexity_ratio
    );
    assert_eq!((batch8.method, batch8.n), (Method::Batch, 8));
    assert!(
        batch8.summary.efficacy.mean >= 7.0 / 8.0,
        "{}",
        batch8.summary.efficacy.mean
    );
    // Sequential methods are computed once: the timing is at the largest N only.
    assert!(
        report.points[0].compute_seconds.is_none() && report.points[1].compute_seconds.is_some()
    );
    let svg = many::curve_svg(&report);
    assert_eq!(
        svg.matches("<polyline").count(),
        5 * 2,
        "5 panels × 2 methods"
    );
}

/// Runs the binary and checks the documented one-line failure, exit 2, nothing new in `dir`.
fn expect_error(args: &[&str], message: &str, dir: &Path) {
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let out = Command::new(BIN).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("exit {:?}: {}", out.status.code(), stderr.trim_end());
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end(), format!("error: {message}"));
    assert!(out.stdout.is_empty());
    let mut after: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    after.sort();
    let mut before = before;
    before.sort();
    assert_eq!(after, before, "left something behind");
}

fn record(prompt: &str, new: &str, truth: &str) -> serde_json::Value {
    serde_json::json!({
        "case_id": 0, "prompt": prompt, "subject": "Danielle Darrieux",
        "target_new": new, "ground_truth": truth,
        "rephrase_prompt": prompt, "locality_prompt": "The capital of Japan is",
        "locality_ground_truth": "Tokyo"
    })
}

// docs/errors.md row 38
#[test]
fn row38_one_prompt_with_two_targets_is_refused_for_every_method() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row34");
    let p = "The mother tongue of Danielle Darrieux is";
    let reqs = serde_json::json!([
        record(p, "English", "French"),
        record(p, "German", "French")
    ]);
    let req = dir.join("conflict.json");
    std::fs::write(&req, reqs.to_string()).unwrap();
    let (m, r) = (fx.gguf.to_str().unwrap(), req.to_str().unwrap());
    let out = dir.join("out.gguf");
    let message = format!(
        "requests #0 and #1 edit the prompt {p:?} toward different targets (\"English\", \"German\")"
    );
    for method in ["shift", "shift-protected", "batch"] {
        let args = [
            "edit",
            m,
            "--requests",
            r,
            "--method",
            method,
            "--no-check",
            "-o",
        ];
        let mut args = args.to_vec();
        args.push(out.to_str().unwrap());
        expect_error(&args, &message, &dir);
    }
    expect_error(
        &["eval", m, "--data", r, "--edits", "2", "--method", "shift"],
        &message,
        &dir,
    );
}

// docs/errors.md row 39
#[test]
fn row39_a_record_longer_than_the_session_is_refused_before_any_edit() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row35");
    let long = "The city of Paris is old. ".repeat(20) + "Danielle Darrieux lives in";
    let reqs = serde_json::json!([
        record("Danielle Darrieux lives in", "Paris", "London"),
        record(&long, "Paris", "London")
    ]);
    let data = dir.join("long.json");
    std::fs::write(&data, reqs.to_string()).unwrap();
    let plot = dir.join("curve.svg");
    let (m, d, o) = (
        fx.gguf.to_str().unwrap(),
        data.to_str().unwrap(),
        plot.to_str().unwrap(),
    );
    let out = Command::new(BIN)
        .args([
            "eval", m, "--data", d, "--curve", "1,2", "--method", "shift", "--layer", "1",
            "--plot", o,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.starts_with("error: record #1 (case_id 0): a prompt with its target takes "),
        "{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("more than the 64 a llama.cpp session holds"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1);
    assert!(!plot.exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "only the data file"
    );
}

// docs/errors.md row 40
#[test]
fn row40_more_edits_than_records_is_refused() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row36");
    let reqs = serde_json::json!([
        record("Danielle Darrieux lives in", "Paris", "London"),
        record("Danielle Darrieux is", "old", "young")
    ]);
    let data = dir.join("two.json");
    std::fs::write(&data, reqs.to_string()).unwrap();
    let (m, d) = (fx.gguf.to_str().unwrap(), data.to_str().unwrap());
    let plot = dir.join("curve.svg");
    expect_error(
        &[
            "eval",
            m,
            "--data",
            d,
            "--curve",
            "1,5",
            "--method",
            "shift",
            "--plot",
            plot.to_str().unwrap(),
        ],
        &format!("{d}: --edits/--curve asks for 5 records, it has 2 (after --offset)"),
        &dir,
    );
    expect_error(
        &[
            "eval", m, "--data", d, "--edits", "3", "--offset", "1", "--method", "shift",
        ],
        &format!("{d}: --edits/--curve asks for 3 records, it has 1 (after --offset)"),
        &dir,
    );
}

// docs/errors.md row 43
#[test]
fn row43_a_negative_or_non_finite_margin_is_refused() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row43");
    let reqs = serde_json::json!([record("Danielle Darrieux lives in", "Paris", "London")]);
    let data = dir.join("one.json");
    std::fs::write(&data, reqs.to_string()).unwrap();
    let (m, d) = (fx.gguf.to_str().unwrap(), data.to_str().unwrap());
    for (margin, shown) in [("-1", "-1"), ("nan", "NaN")] {
        let arg = format!("--margin={margin}");
        expect_error(
            &[
                "eval", m, "--data", d, "--edits", "1", "--method", "batch", &arg,
            ],
            &format!("--margin must be a finite number ≥ 0, got {shown}"),
            &dir,
        );
    }
}

// docs/errors.md row 44
#[test]
fn row44_a_negative_or_non_finite_ridge_is_refused() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row44");
    let reqs = serde_json::json!([record("Danielle Darrieux lives in", "Paris", "London")]);
    let data = dir.join("one.json");
    std::fs::write(&data, reqs.to_string()).unwrap();
    let (m, d) = (fx.gguf.to_str().unwrap(), data.to_str().unwrap());
    for (ridge, shown) in [("-1", "-1"), ("nan", "NaN")] {
        let arg = format!("--ridge={ridge}");
        expect_error(
            &[
                "eval", m, "--data", d, "--edits", "1", "--method", "batch", &arg,
            ],
            &format!("the ridge (--ridge) must be a finite number ≥ 0, got {shown}"),
            &dir,
        );
    }
}

// docs/errors.md row 45
#[test]
fn row45_a_spread_past_the_first_layer_or_for_a_one_layer_method_is_refused() {
    let fx = common::tiny(backlens::arch::Arch::Llama);
    let dir = common::temp_dir("row45");
    let reqs = serde_json::json!([record("Danielle Darrieux lives in", "Paris", "London")]);
    let data = dir.join("one.json");
    std::fs::write(&data, reqs.to_string()).unwrap();
    let (m, d) = (fx.gguf.to_str().unwrap(), data.to_str().unwrap());
    let eval = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["eval", m, "--data", d, "--edits", "1", "--layer", "1"];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    };
    let cases: [(&[&str], &str); 3] = [
        (
            &["--method", "batch", "--spread", "40"],
            "--spread 40 layers ending at layer 1: give 1 to 2 layers",
        ),
        (
            &["--method", "shift-protected", "--spread", "2"],
            "--spread 2 is for batch; shift-protected edits one layer",
        ),
        (
            &["--method", "batch", "--key", "subject", "--value", "fps"],
            "FPS's value (--value fps) is keyed at the prompt's last token: use --key last",
        ),
    ];
    for (extra, message) in cases {
        let args = eval(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, message, &dir);
    }
}
