//! `audit`: explain a patched GGUF or LoRA adapter against its base, from the files alone.

use super::print_json;
use anyhow::Result;
use backlens::audit::{self, AuditOptions, AuditReport, LensScore, PatchKind, TensorChange};
use backlens::lens::TokenScore;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The base model (GGUF) the patch was made from.
    base: PathBuf,
    /// A patched GGUF or a LoRA adapter GGUF (`general.type` = "adapter").
    patch: PathBuf,
    /// Tokens per promotes/suppresses list.
    #[arg(short, default_value_t = 20)]
    k: usize,
    /// A prompt to test against each changed FF2: cosine of its FF2 input (last token) with the
    /// change's input direction, and ‖ΔW·x‖/‖x‖. Repeatable.
    #[arg(long = "probe", value_name = "PROMPT")]
    probes: Vec<String>,
    /// How u₁ is scored against the vocabulary after the final norm: cosine with each
    /// unembedding row, logit (the logit lens: dot product, favors long rows), or raw (dot
    /// product without the final norm) [possible values: cosine, logit, raw].
    #[arg(long, default_value = "cosine")]
    score: LensScore,
    /// Print the JSON report (schema in the `backlens::audit` docs).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let opts = AuditOptions {
        k: args.k.max(1),
        probes: args.probes,
        score: args.score,
    };
    let report = audit::audit(&args.base, &args.patch, &opts)?;
    if args.json {
        return print_json(&report);
    }
    print_report(&report, opts.k);
    Ok(())
}

fn print_report(r: &AuditReport, k: usize) {
    let kind = match r.kind {
        PatchKind::Full => "patched GGUF",
        PatchKind::Adapter => "LoRA adapter",
    };
    println!(
        "{} ({kind}) against {} ({})",
        r.patch.display(),
        r.base.display(),
        r.architecture
    );
    if !r.provenance.is_empty() {
        println!("\nprovenance:");
        for p in &r.provenance {
            let value = match &p.value {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            println!("  {} = {value}", p.key);
        }
        match r.base_sha256_matches {
            Some(true) => println!("  (backlens.base_sha256 matches the base file)"),
            Some(false) => println!(
                "  (backlens.base_sha256 does NOT match the base file: made from another base)"
            ),
            None => {}
        }
    }
    let noun = match r.kind {
        PatchKind::Full => "tensors",
        PatchKind::Adapter => "LoRA pairs",
    };
    println!(
        "\n{} {noun} compared: {} changed, {} added, {} missing, {} other metadata keys differ",
        r.compared_tensors,
        r.changed.len(),
        r.added_tensors.len(),
        r.missing_tensors.len(),
        r.metadata_changes.len()
    );
    if r.identical {
        println!("no difference: the patch changes nothing.");
    }
    for m in &r.metadata_changes {
        println!(
            "  metadata {:?} {}: {} -> {}",
            m.key,
            serde_json::to_string(&m.change)
                .unwrap_or_default()
                .trim_matches('"'),
            m.base.as_deref().unwrap_or("-"),
            m.patch.as_deref().unwrap_or("-")
        );
    }
    for t in &r.added_tensors {
        println!("  added tensor {} {} {:?}", t.name, t.ggml_type, t.shape);
    }
    for t in &r.missing_tensors {
        println!("  missing tensor {} {} {:?}", t.name, t.ggml_type, t.shape);
    }
    for c in &r.changed {
        print_change(c, k);
    }
    if !r.notes.is_empty() {
        println!("\nnotes:");
        for n in &r.notes {
            println!("  {n}");
        }
    }
}

fn print_change(c: &TensorChange, k: usize) {
    let storage = match (&c.patch_type, &c.lora) {
        (Some(p), _) if *p == c.base_type => p.clone(),
        (Some(p), _) => format!("{} -> {p}", c.base_type),
        (None, Some(l)) => format!(
            "LoRA r = {}, alpha = {}, scale {}",
            l.rank,
            l.alpha.map_or("-".to_string(), |a| format!("{a}")),
            l.scale
        ),
        (None, None) => c.base_type.clone(),
    };
    println!("\n{}  [{} × {}]  {storage}", c.name, c.shape[0], c.shape[1]);
    let mut line = format!("  ‖ΔW‖_F {:.6}", c.frobenius);
    if let Some(m) = c.max_abs {
        line += &format!(", max |ΔW| {m:.3e}");
    }
    if let Some(n) = c.changed_elements {
        let total = (c.shape[0] * c.shape[1]) as f64;
        line += &format!(", {n} elements changed ({:.1}%)", 100.0 * n as f64 / total);
    }
    println!("{line}");
    let sv: Vec<String> = c
        .singular_values
        .iter()
        .map(|s| format!("{s:.4e}"))
        .collect();
    println!(
        "  rank {} (σ > {:.2e});  σ₁²/Σσ² = {:.4}",
        c.rank, c.rank_tolerance, c.energy_share
    );
    println!("  σ: {}", sv.join(", "));
    if let Some(lens) = &c.lens {
        let how = match lens.score {
            LensScore::Logit => "the base model's logit lens",
            LensScore::Raw => "the base unembedding (no final norm)",
            LensScore::Cosine => "cosine with the base unembedding rows",
        };
        println!("  u₁ through {how} (top {k}):");
        println!("    promotes:   {}", tokens(&lens.promotes));
        println!("    suppresses: {}", tokens(&lens.suppresses));
        for t in &lens.targets {
            println!(
                "    edit target {:?} (id {}): rank {} among promoted tokens, score {:.4}",
                t.token, t.id, t.rank, t.score
            );
        }
    }
    if !c.probes.is_empty() {
        println!("  probes (FF2 input x at the last prompt token, base model):");
        for p in &c.probes {
            println!(
                "    {:?} [{:?}]: cos(x, v₁) {:+.4}, ‖ΔW·x‖/‖x‖ {:.4e} ({:.1}% of σ₁)",
                p.prompt,
                p.last_token,
                p.cosine,
                p.gain,
                100.0 * p.relative_gain
            );
        }
    }
}

fn tokens(list: &[TokenScore]) -> String {
    list.iter()
        .map(|t| format!("{:?} {:.2}", t.token, t.score))
        .collect::<Vec<_>>()
        .join(", ")
}
