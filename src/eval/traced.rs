//! `eval --forward llama`: the whole evaluation on one llama.cpp model and context, a
//! [`Tracer`]. Each record's key and skip rule come from a traced decode of its prompt (packed
//! with the other prompts of its chunk; a sequential run's earlier edits applied as an
//! adapter), its edit is applied to the same context as an adapter, and the same context scores
//! it. No candle model is loaded, so this runs on every
//! architecture llama.cpp loads that has a dense `ffn_down` (shift, fixed layer and step).

use super::{
    encode, locality_top1, retention, score, EvalConfig, EvalReport, LayerChoice, LrChoice,
    RecordEdit, CHUNK,
};
use crate::edit::{self, Delta, EditRequest};
use crate::runtime::decode_threads;
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;
use crate::trace::Tracer;
use crate::write::gguf::stored_deltas;
use crate::{Error, Result};
use std::path::Path;

/// Evaluates `records` on the GGUF at `gguf` through llama.cpp alone (`config.forward` is
/// llama; its method is none or shift with a fixed layer and step).
pub fn evaluate(
    gguf: &Path,
    tok: &Tokenizer,
    records: &[EditRequest],
    config: &EvalConfig,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    if records.is_empty() {
        return Err(Error::Invalid("no records to evaluate".into()));
    }
    config.check_forward()?;
    let start = std::time::Instant::now();
    let src = ModelSource::open(gguf)?;
    let ModelSource::Gguf(file) = &src else {
        return Err(Error::Invalid(format!(
            "{}: --forward llama needs a GGUF file",
            gguf.display()
        )));
    };
    let mut tracer = Tracer::load(gguf)?;
    if let (Some(_), LayerChoice::Fixed(l)) = (config.method, config.layer) {
        tracer.shape().ff2_width(l).map_err(|e| e.in_file(gguf))?;
    }
    let encoded = records
        .iter()
        .map(|r| encode(tok, r))
        .collect::<Result<Vec<_>>>()?;
    let base_top1 = locality_top1(&mut tracer, &encoded)?;
    let mut all_deltas: Vec<Delta> = Vec::new();
    let mut scores = Vec::with_capacity(records.len());
    // Independent records take their keys from the unedited model, a chunk of prompts per
    // traced decode; a sequential run traces each record on top of the edits before it.
    let chunk = if config.sequential { 1 } else { CHUNK };
    for (start, recs) in (0..).step_by(chunk).zip(records.chunks(chunk)) {
        let edits = edit_records(&mut tracer, &src, tok, recs, config, &all_deltas)?;
        let mut active = Vec::with_capacity(edits.len());
        for edit in &edits {
            let deltas: Vec<Delta> = match config.sequential {
                true => {
                    all_deltas.extend(edit.deltas.iter().cloned());
                    all_deltas.clone()
                }
                false => edit.deltas.clone(),
            };
            active.push(stored_deltas(file, &deltas, config.ff2_type)?);
        }
        // The chunk's records are scored side by side on the tracer's contexts, each from an
        // empty cache with its own edit applied: the same decodes as one after another.
        let scored = tracer.score_edited(decode_threads() as usize, &active, |i, lane| {
            let index = start + i;
            score(lane, tok, &encoded[index], base_top1[index], config.fluency)
        })?;
        for (index, ((r, edit), mut record)) in (start..).zip(recs.iter().zip(edits).zip(scored)) {
            edit.stamp(&mut record, r.case_id);
            scores.push(record);
            progress(index + 1);
        }
    }
    let retained = match (config.sequential, all_deltas.is_empty()) {
        (true, false) => {
            tracer.apply_deltas(&stored_deltas(file, &all_deltas, config.ff2_type)?)?;
            Some(retention(&mut tracer, &encoded)?)
        }
        _ => None,
    };
    Ok(EvalReport::of(config, start, scores, retained))
}

/// The shift edits of `recs` from traced decodes of their prompts (packed into one where they
/// fit), with the `prior` deltas (earlier records of a sequential run) applied to the tracer;
/// no edits for the unedited baseline. Each record is charged an equal share of the time.
fn edit_records(
    tracer: &mut Tracer,
    src: &ModelSource,
    tok: &Tokenizer,
    recs: &[EditRequest],
    config: &EvalConfig,
    prior: &[Delta],
) -> Result<Vec<RecordEdit>> {
    let (Some(_), LayerChoice::Fixed(layer), LrChoice::Fixed(lr)) =
        (config.method, config.layer, config.lr)
    else {
        let none = || RecordEdit {
            layer: None,
            lr: None,
            deltas: Vec::new(),
            skipped: false,
            seconds: 0.0,
        };
        return Ok(recs.iter().map(|_| none()).collect());
    };
    let prior = match config.sequential {
        true => prior,
        false => &[],
    };
    let start = std::time::Instant::now();
    let outcomes = edit::shift::compute_traced_many(tracer, src, tok, recs, layer, lr, prior)?;
    let seconds = start.elapsed().as_secs_f64() / recs.len() as f64;
    Ok(outcomes
        .into_iter()
        .map(|outcome| RecordEdit {
            layer: Some(layer),
            lr: outcome.delta.as_ref().map(|_| lr),
            skipped: outcome.delta.is_none(),
            deltas: outcome.delta.into_iter().collect(),
            seconds,
        })
        .collect())
}
