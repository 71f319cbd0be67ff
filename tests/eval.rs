//! A 10-record CounterFact eval through llama.cpp: every metric is present, the shift edit
//! beats the unedited model on efficacy, and two runs give identical results.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

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
    let es = |r: &serde_json::Value| r["summary"]["efficacy"]["mean"].as_f64().unwrap();
    println!("efficacy: none {:.2}, shift {:.2}", es(&none), es(&shift));
    assert!(es(&shift) > es(&none));
    let again = eval("shift");
    assert_eq!(again["records"], shift["records"], "two runs differ");
    assert_eq!(again["summary"], shift["summary"]);
}
