//! A 10-record CounterFact eval through llama.cpp: every metric is present, the shift edit
//! beats the unedited model on efficacy, and two runs give identical results.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// Of the first 10 val records, at least this many are edited by the shift (not skipped): all
/// of them, since none of their targets is the unedited model's top-1.
const MIN_EDITED: usize = 10;

fn eval(method: &str) -> serde_json::Value {
    let model = common::smollm2();
    let data = common::counterfact("counterfact-val.json");
    let out = Command::new(BIN)
        .args([
            "eval",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--n", "10", "--method", method, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn ten_record_eval_reports_every_metric_and_is_reproducible() {
    let none = eval("none");
    let shift = eval("shift");
    for report in [&none, &shift] {
        let s = &report["summary"];
        for metric in [
            "efficacy",
            "paraphrase",
            "neighborhood",
            "neighborhood_top1",
            "efficacy_magnitude",
            "fluency",
        ] {
            let m = &s[metric];
            assert_eq!(m["n"], 10, "{metric}: {m}");
            assert!(
                m["mean"].as_f64().is_some_and(f64::is_finite),
                "{metric}: {m}"
            );
        }
        assert_eq!(report["records"].as_array().unwrap().len(), 10);
    }
    // The shift run really edits: a run where every record is skipped (target already top-1)
    // or left unedited must not pass.
    let edited = |r: &serde_json::Value| {
        r["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["skipped"] == false && x["layer"].is_u64())
            .count()
    };
    let (n_none, n_shift) = (edited(&none), edited(&shift));
    println!("edited: none {n_none}, shift {n_shift} of 10");
    assert_eq!(n_none, 0, "method none edited records");
    assert!(n_shift >= MIN_EDITED, "shift edited only {n_shift} of 10");
    let es = |r: &serde_json::Value| r["summary"]["efficacy"]["mean"].as_f64().unwrap();
    println!("efficacy: none {:.2}, shift {:.2}", es(&none), es(&shift));
    assert!(es(&shift) > es(&none));
    // Everything but the measured times repeats exactly.
    let untimed = |r: &serde_json::Value| {
        let mut r = r.clone();
        for rec in r["records"].as_array_mut().unwrap() {
            rec.as_object_mut().unwrap().remove("edit_seconds");
        }
        r["summary"].as_object_mut().unwrap().remove("edit_seconds");
        r.as_object_mut().unwrap().remove("records_per_second");
        r
    };
    let (again, shift) = (untimed(&eval("shift")), untimed(&shift));
    assert_eq!(again["records"], shift["records"], "two runs differ");
    assert_eq!(again["summary"], shift["summary"]);
}

/// Scoring a prompt once for all its continuations gives the same log-probabilities and
/// next-token logits as scoring each continuation in a decode of its own.
#[test]
fn shared_prompt_scoring_matches_separate_decodes() {
    use backlens::edit::EditRequest;
    use backlens::runtime::{LlamaRuntime, PromptQuery};
    let path = common::smollm2();
    let tok = &common::smollm2_loaded().tok;
    let records = EditRequest::load_file(&common::counterfact("counterfact-val.json")).unwrap();
    let rt = LlamaRuntime::load(&path).unwrap();
    let mut session = rt.session().unwrap();
    let encoded: Vec<[Vec<u32>; 4]> = records[..6]
        .iter()
        .map(|r| {
            [
                tok.encode_prompt(r.rephrase_prompt.as_deref().unwrap_or(&r.prompt))
                    .unwrap(),
                tok.encode_target(&r.target_new).unwrap(),
                tok.encode_target(r.ground_truth.as_deref().unwrap())
                    .unwrap(),
                tok.encode_target(&format!("{} and more", r.target_new))
                    .unwrap(),
            ]
        })
        .collect();
    let queries: Vec<PromptQuery> = encoded
        .iter()
        .map(|[p, a, b, c]| PromptQuery {
            prompt: p,
            continuations: vec![a, b, c],
        })
        .collect();
    let scored = session.score(&queries).unwrap();
    assert_eq!(scored.len(), queries.len(), "one score per prompt");
    let n_vocab = common::smollm2_loaded().hp.n_vocab;
    // NaN until the first comparison (`max` drops it), so comparing nothing fails the bound.
    let (mut worst, mut compared) = (f64::NAN, 0);
    for (q, s) in queries.iter().zip(&scored) {
        let alone = session.logits_last(q.prompt).unwrap();
        assert_eq!((alone.len(), s.next_logits.len()), (n_vocab, n_vocab));
        for (x, y) in alone.iter().zip(&s.next_logits) {
            worst = worst.max((x - y).abs() as f64);
        }
        assert_eq!(s.logprobs.len(), q.continuations.len());
        for (c, lp) in q.continuations.iter().zip(&s.logprobs) {
            worst = worst.max((session.sequence_logprob(q.prompt, c).unwrap() - lp).abs());
            compared += 1;
        }
    }
    println!("shared-prompt vs separate scoring: max difference {worst:.2e}");
    assert_eq!(compared, 6 * 3, "continuations compared");
    assert!(worst < 1e-4, "shared-prompt scoring differs by {worst}");
}
