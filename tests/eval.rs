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
    let again = eval("shift");
    assert_eq!(
        without_times(&again["records"]),
        without_times(&shift["records"]),
        "two runs differ"
    );
    assert_eq!(
        without_times(&again["summary"]),
        without_times(&shift["summary"])
    );
}

/// `v` without its wall-clock fields (`*_seconds`), which differ between runs.
fn without_times(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(k, _)| !k.ends_with("_seconds"))
            .map(|(k, x)| (k.clone(), without_times(x)))
            .collect(),
        serde_json::Value::Array(a) => a.iter().map(without_times).collect(),
        x => x.clone(),
    }
}

/// Random token ids below `n_vocab`, `len` of them, from `seed` (a small LCG).
fn token_run(seed: u64, len: usize, n_vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % n_vocab as u64) as u32
        })
        .collect()
}

/// Scoring a prompt once for all its continuations, several prompts packed into one decode as
/// sequences of their own, gives the same log-probabilities and next-token logits as scoring
/// each continuation in a decode of its own (tiny Llama, F32 weights: exact arithmetic, so only
/// summation order differs).
#[test]
fn shared_prompt_scoring_matches_separate_decodes() {
    use backlens::runtime::{LlamaRuntime, PromptQuery};
    let fixture = common::tiny(backlens::arch::Arch::Llama);
    let n_vocab = fixture.hp.n_vocab;
    let rt = LlamaRuntime::load(&fixture.gguf).unwrap();
    let mut session = rt.session().unwrap();
    // Prompts of 3 to 14 tokens, each with a one-token and two longer continuations.
    let encoded: Vec<[Vec<u32>; 4]> = (0..8u64)
        .map(|i| {
            [
                token_run(i, 3 + (5 * i as usize) % 12, n_vocab),
                token_run(100 + i, 1, n_vocab),
                token_run(200 + i, 2 + i as usize % 3, n_vocab),
                token_run(300 + i, 4, n_vocab),
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
    assert_eq!(compared, 8 * 3, "continuations compared");
    assert!(worst < 1e-5, "shared-prompt scoring differs by {worst}");
}

/// One packed decode of `seqs` on `d`, each sequence's first KV cell a multiple of `align`
/// (filler tokens of a sequence of their own in between), against each sequence decoded alone
/// from an empty cache: the largest |difference| of any logits row, and the rows compared.
fn packed_vs_alone(
    d: &mut impl backlens::runtime::Decoder,
    seqs: &[Vec<u32>],
    align: usize,
) -> (f64, usize) {
    use backlens::runtime::{Entry, Seqs, SESSION_SEQS};
    let entry = |token, pos, logits, seqs| Entry {
        token,
        pos,
        logits,
        seqs,
    };
    let filler = Seqs::one(SESSION_SEQS - 1);
    let (mut batch, mut starts, mut filled) = (Vec::new(), Vec::new(), 0);
    for (id, s) in (0..).zip(seqs) {
        while batch.len() % align != 0 {
            batch.push(entry(s[0], filled, false, filler));
            filled += 1;
        }
        starts.push(batch.len());
        batch.extend((0..s.len()).map(|pos| entry(s[pos], pos, true, Seqs::one(id))));
    }
    d.clear();
    d.decode(&batch).unwrap();
    let mut packed = Vec::new();
    for (s, &start) in seqs.iter().zip(&starts) {
        packed.push(
            (start..start + s.len())
                .map(|i| d.row(i).unwrap())
                .collect::<Vec<_>>(),
        );
    }
    let (mut worst, mut compared) = (f64::NAN, 0);
    for (s, rows) in seqs.iter().zip(&packed) {
        d.clear();
        let alone: Vec<Entry> = (0..s.len())
            .map(|pos| entry(s[pos], pos, true, Seqs::FIRST))
            .collect();
        d.decode(&alone).unwrap();
        for (i, row) in rows.iter().enumerate() {
            for (x, y) in d.row(i).unwrap().iter().zip(row) {
                worst = worst.max((x - y).abs() as f64);
            }
            compared += 1;
        }
    }
    (worst, compared)
}

/// Eighteen sequences of 4 to 21 tokens packed into one decode (distinct sequence ids, a
/// unified KV cache) give every logits row of each sequence decoded alone, on a llama.cpp
/// session and on the tracer's context: on F32 weights to within summation order wherever the
/// sequences start; on SmolLM2 Q4_1 bitwise when each sequence's first KV cell is a multiple of
/// 8 (ggml's 8-float chunks then sum the same values in the same order; elsewhere a last-bit
/// change flips an activation's 8-bit rounding, which the quantized layers amplify).
#[test]
fn packed_decode_rows_match_one_sequence_decodes() {
    use backlens::runtime::LlamaRuntime;
    use backlens::trace::Tracer;
    let fixture = common::tiny(backlens::arch::Arch::Llama);
    let q41 = common::smollm2();
    for (path, n_vocab, align, bound) in [
        (&fixture.gguf, fixture.hp.n_vocab, 1, 1e-5),
        (&q41, 49152, 8, 0.0),
    ] {
        let seqs: Vec<Vec<u32>> = (0..18u64)
            .map(|i| token_run(i, 4 + (7 * i as usize) % 18, n_vocab))
            .collect();
        let rt = LlamaRuntime::load(path).unwrap();
        let mut tracer = Tracer::load(path).unwrap();
        for (engine, (worst, compared)) in [
            (
                "session",
                packed_vs_alone(&mut rt.session().unwrap(), &seqs, align),
            ),
            ("tracer", packed_vs_alone(&mut tracer, &seqs, align)),
        ] {
            println!(
                "{} {engine}, starts aligned to {align}: {compared} rows, max |difference| {worst:.2e}",
                path.display()
            );
            assert!(compared > 150, "only {compared} rows compared");
            assert!(worst <= bound, "{engine}: packed rows differ by {worst}");
        }
    }
}
