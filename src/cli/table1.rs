//! `eval --table1 OUT.md`: the paper's Table 1 on this model — every method on the same records
//! through llama.cpp, both metric families and the time per edit, as Markdown (OUT.md) and JSON
//! (OUT.json).

use anyhow::Result;
use backlens::eval::{EvalReport, Stat};
use serde::Serialize;

/// One row: a method and its report.
#[derive(Serialize)]
pub struct Row<'a> {
    /// Method name ("none" for the unedited model).
    pub method: String,
    /// Layer edited (None for the unedited model).
    pub layer: Option<usize>,
    /// The evaluation.
    pub report: &'a EvalReport,
}

/// The whole table with the command that produced it.
#[derive(Serialize)]
pub struct Table<'a> {
    /// The command line.
    pub command: String,
    /// Records evaluated per method.
    pub records: usize,
    /// One row per method.
    pub rows: Vec<Row<'a>>,
}

fn pct(s: &Stat) -> String {
    match s.n {
        0 => "–".into(),
        _ => format!("{:.1}", 100.0 * s.mean),
    }
}

/// The Markdown table.
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

/// Writes `OUT.md` and `OUT.json` through their claims.
pub fn write(
    t: &Table,
    md: backlens::write::OutputClaim,
    json: backlens::write::OutputClaim,
) -> Result<()> {
    let mut f = md.stage_file()?;
    f.write_all(markdown(t).as_bytes())?;
    let mut j = json.stage_file()?;
    j.write_all(serde_json::to_string_pretty(t)?.as_bytes())?;
    j.write_all(b"\n")?;
    f.commit()?;
    j.commit()?;
    Ok(())
}
