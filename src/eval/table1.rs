//! The paper's Table 1 on one model: every method on the same records through llama.cpp
//! ([`super::evaluate_with`] once per method, each on a fresh copy of the model), both metric
//! families and the time per edit, and its Markdown.

use super::{EvalConfig, EvalReport, LayerChoice, LrChoice, Stat};
use crate::edit::{EditContext, EditRequest, EditSettings, Method};
use crate::model::Transformer;
use crate::patch::{Forward, WhitenSetup};
use crate::tokenizer::Tokenizer;
use crate::write::gguf::Ff2Type;
use crate::Result;
use serde::Serialize;
use std::path::Path;

/// The methods of the table unless others are named: `none` is the unedited model.
pub const METHODS: [&str; 7] = [
    "none",
    "grad",
    "ft",
    "shift",
    "shift-whitened",
    "rome",
    "memit",
];

/// What every row shares.
#[derive(Debug, Clone)]
pub struct Table1Config {
    /// The rows' methods in order (None: the unedited model).
    pub methods: Vec<Option<Method>>,
    /// The layer of every row; None: each method's default layer.
    pub layer: Option<LayerChoice>,
    /// The step of the methods that take one.
    pub lr: LrChoice,
    /// Compute the generation-entropy fluency score.
    pub fluency: bool,
    /// How the edited FF2 is stored.
    pub ff2_type: Ff2Type,
    /// Engine of the shift keys.
    pub forward: Forward,
    /// The statistics of `shift-whitened`, `rome` and `memit`.
    pub whiten: WhitenSetup,
    /// The value rule of `batch` and `shift-protected` rows.
    pub value: crate::edit::minimal::ValueRule,
}

/// One row: a method and its evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Method name ("none" for the unedited model).
    pub method: String,
    /// Layer edited (None for the unedited model or a per-record layer).
    pub layer: Option<usize>,
    /// The evaluation.
    pub report: EvalReport,
}

/// The whole table with the command that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// The command line.
    pub command: String,
    /// Records evaluated per method.
    pub records: usize,
    /// One row per method.
    pub rows: Vec<Row>,
}

/// Evaluates every method of `config` on `records` of the GGUF `gguf` (loaded as `model`);
/// `progress` is told each method's name before its row. Statistics are computed (or read
/// from their cache) inside a row, so its time per edit includes them.
#[allow(clippy::too_many_arguments)]
pub fn run(
    gguf: &Path,
    model: &Transformer,
    tok: &Tokenizer,
    records: &[EditRequest],
    config: &Table1Config,
    scratch: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>> {
    let mut rows = Vec::with_capacity(config.methods.len());
    for &method in &config.methods {
        let layer = match (config.layer, method) {
            (Some(l), _) => l,
            (None, Some(m)) => LayerChoice::Fixed(m.default_layer(&model.hp)?),
            (None, None) => LayerChoice::Fixed(EditSettings::default_layer(model.hp.n_layer)),
        };
        let name = method.map_or("none", Method::name);
        progress(name);
        let store = match method {
            Some(m) => config.whiten.store(m, model, tok, gguf)?,
            None => None,
        };
        let ctx = EditContext {
            stats: store.as_ref(),
            value: config.value,
            ..EditContext::default()
        };
        let eval = EvalConfig {
            method,
            layer,
            lr: config.lr,
            sequential: false,
            fluency: config.fluency,
            ff2_type: config.ff2_type,
            forward: config.forward,
        };
        let mut fresh = model.clone();
        let report =
            super::evaluate_with(gguf, &mut fresh, tok, records, &eval, &ctx, scratch, |_| {})?;
        rows.push(Row {
            method: name.to_string(),
            layer: match (method, layer) {
                (Some(_), LayerChoice::Fixed(l)) => Some(l),
                _ => None,
            },
            report,
        });
    }
    Ok(rows)
}

fn pct(s: &Stat) -> String {
    match s.n {
        0 => "–".into(),
        _ => format!("{:.1}", 100.0 * s.mean),
    }
}

/// The Markdown table, its legend below it.
pub fn markdown(t: &Table) -> String {
    let mut out = format!(
        "Records: {} · command: `{}`\n\n\
         | method | layer | Eff. acc | Para. acc | Neigh. acc | ES | PS | NS | n-gram entropy ×100 | s / edit |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        t.records, t.command
    );
    for r in &t.rows {
        let s = &r.report.summary;
        let p = &s.paper;
        let entropy = match p.ngram_entropy_x100.n {
            0 => "–".into(),
            _ => format!("{:.2}", p.ngram_entropy_x100.mean),
        };
        let secs = match s.edit_seconds.n {
            0 => "–".into(),
            _ => format!("{:.2}", s.edit_seconds.mean),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.method,
            r.layer.map_or("–".into(), |l| l.to_string()),
            pct(&p.efficacy_acc),
            pct(&p.paraphrase_acc),
            pct(&p.neighborhood_acc),
            pct(&s.efficacy),
            pct(&s.paraphrase),
            pct(&s.neighborhood),
            entropy,
            secs
        ));
    }
    out.push_str(
        "\nEff./Para./Neigh. acc: top-1 accuracy of the new target's first token (neighborhood: \
         the true target's) after the prompt, its paraphrase and the neighborhood prompt, as in \
         the Backward Lens paper's Table 1. ES/PS/NS: ROME's P(new) > P(true) (NS: P(true) > \
         P(new)). Percentages of records.\n",
    );
    out
}
