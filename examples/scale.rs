//! The scale benchmark: a synthetic 7B-shaped Llama GGUF (Q4_0, random weights, the tokenizer
//! of the given model; about 4 GB, written once into DIR) goes through `inspect`, `audit`
//! against a copy, a shift `edit` to a LoRA adapter and to a patched GGUF (with either forward:
//! candle streamed one block at a time, or llama.cpp's own graph), and the streamed `lens` (all
//! layers, then 20..32), each run as a
//! `backlens-patch` child process so that its wall time and peak resident memory are measured
//! on their own.
//!
//! `make scale`, or: `cargo build --release && cargo run --release --example scale -- MODEL DIR
//! [--json] [--only STEP]…` (`--only "edit to"` runs the four edit steps alone). The binary is
//! the `backlens-patch` beside this example's target folder
//! (`target/release/backlens-patch`), or the one named by `BACKLENS_PATCH`.

#[path = "../tests/common/synth.rs"]
mod synth;

use anyhow::{bail, Context, Result};
use backlens::arch::{Arch, HParams};
use backlens::weights::gguf::{GgufFile, Value};
use backlens::weights::quant::GgmlType;
use clap::Parser;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(
    about = "inspect, audit and edit a synthetic 7B-shaped Q4_0 GGUF: wall time and peak RSS"
)]
struct Args {
    /// GGUF model whose tokenizer (and vocabulary size) the synthetic model takes.
    model: PathBuf,
    /// Folder for the synthetic model (written once, reused) and the step outputs.
    dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Run only the steps whose name contains one of these (repeatable; default: every step).
    #[arg(long)]
    only: Vec<String>,
}

/// The `backlens-patch` binary: `BACKLENS_PATCH`, or beside this example's folder.
fn backlens_patch() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BACKLENS_PATCH") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("backlens-patch"))
        .context("no folder above this executable")?;
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --release` first (or set BACKLENS_PATCH)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Llama-2-7B's shape.
const N_LAYER: usize = 32;
const N_EMBD: usize = 4096;
const N_FF: usize = 11008;
const N_HEAD: usize = 32;

/// One measured step.
#[derive(Debug, Serialize)]
struct Step {
    name: String,
    seconds: f64,
    peak_rss_mb: f64,
    /// The goal for peak RSS, in MB (None: no goal).
    rss_goal_mb: Option<f64>,
    /// Why the step failed, if it did.
    error: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let exe = backlens_patch()?;
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let synthetic = dir.join("synthetic-7b-q4_0.gguf");
    let mut steps = Vec::new();
    if GgufFile::open(&synthetic).is_err() {
        // Absent, or an unreadable leftover: (re)write it.
        let _ = std::fs::remove_file(&synthetic);
        let start = Instant::now();
        write_synthetic(&args.model, &synthetic)?;
        steps.push(Step {
            name: "write synthetic model (not backlens work)".into(),
            seconds: start.elapsed().as_secs_f64(),
            peak_rss_mb: 0.0,
            rss_goal_mb: None,
            error: None,
        });
    }
    let size_mb = std::fs::metadata(&synthetic)?.len() as f64 / 1e6;
    let copy = dir.join("synthetic-7b-copy.gguf");
    let start = Instant::now();
    std::fs::copy(&synthetic, &copy).with_context(|| copy.display().to_string())?;
    steps.push(Step {
        name: "copy the file (cp)".into(),
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_mb: 0.0,
        rss_goal_mb: None,
        error: None,
    });
    let s = synthetic.to_str().context("non-UTF-8 path")?;
    let out = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let edit = |format: &str, forward: &str, output: String| -> Vec<String> {
        [
            "edit",
            s,
            "--prompt",
            "Lionel Messi plays for",
            "--target",
            "Paris",
            "--format",
            format,
            "--forward",
            forward,
            "--no-check",
            "--force",
            "-o",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([output])
        .collect()
    };
    // The lens streams the blocks (the f32 weights, 27 GB, do not fit in 24 GB).
    let lens = |layers: Option<&str>| -> Vec<String> {
        let prompt = "The Eiffel Tower is located in the city of";
        let mut argv: Vec<String> = [
            "lens", s, "--prompt", prompt, "--target", "Paris", "--stream",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Some(l) = layers {
            argv.extend(["--layers".to_string(), l.to_string()]);
        }
        argv
    };
    let c = copy.to_string_lossy().into_owned();
    // Peak-RSS goals of issue 8 (none for auditing a real change, which holds the dense ΔW).
    let runs: Vec<(&str, Vec<String>, Option<f64>)> = vec![
        ("inspect", vec!["inspect".into(), s.into()], Some(300.0)),
        (
            "audit vs copy",
            vec!["audit".into(), s.into(), c],
            Some(300.0),
        ),
        (
            "edit to LoRA",
            edit("lora", "candle", out("edit-lora.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "edit to LoRA, llama.cpp forward",
            edit("lora", "llama", out("edit-lora.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "edit to GGUF, llama.cpp forward",
            edit("gguf", "llama", out("edit.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "edit to GGUF",
            edit("gguf", "candle", out("edit.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "audit vs edited GGUF",
            vec!["audit".into(), s.into(), out("edit.gguf")],
            None,
        ),
        (
            "lens --stream, 10 tokens, all layers",
            lens(None),
            Some(size_mb + 2000.0),
        ),
        (
            "lens --stream --layers 20..32",
            lens(Some("20..32")),
            Some(size_mb + 2000.0),
        ),
    ];
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| name.contains(o));
    for (name, argv, goal) in runs.into_iter().filter(|r| wanted(r.0)) {
        let (seconds, peak_rss_mb, error) = measure(&exe, &argv)?;
        steps.push(Step {
            name: name.into(),
            seconds,
            peak_rss_mb,
            rss_goal_mb: goal,
            error,
        });
    }
    for f in [copy, dir.join("edit.gguf"), dir.join("edit-lora.gguf")] {
        let _ = std::fs::remove_file(f);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&steps)?);
        return Ok(());
    }
    println!("{} ({size_mb:.0} MB)", synthetic.display());
    for st in &steps {
        let goal = st
            .rss_goal_mb
            .map(|g| {
                let verdict = if st.peak_rss_mb <= g { "ok" } else { "over" };
                format!("goal ≤ {g:.0} MB: {verdict}")
            })
            .unwrap_or_default();
        println!(
            "  {:<42} {:>8.2} s  peak RSS {:>8.1} MB  {goal}",
            st.name, st.seconds, st.peak_rss_mb
        );
        if let Some(e) = &st.error {
            println!("    failed: {e}");
        }
    }
    Ok(())
}

/// Runs `exe` with `argv` (output discarded); wall seconds, peak RSS in MB, and the failure
/// (exit status and stderr), if any.
fn measure(exe: &Path, argv: &[String]) -> Result<(f64, f64, Option<String>)> {
    let start = Instant::now();
    let child = std::process::Command::new(exe)
        .args(argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let stderr = child.stderr;
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; `usage` is a zeroed out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    if waited != pid {
        bail!("waiting for {} failed", argv.join(" "));
    }
    let error = match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => None,
        (exited, code) => {
            let mut message = String::new();
            if let Some(mut e) = stderr {
                use std::io::Read;
                let _ = e.read_to_string(&mut message);
            }
            Some(match exited {
                true => format!("exit code {code}: {}", message.trim()),
                false => format!("killed by signal {}", libc::WTERMSIG(status)),
            })
        }
    };
    // ru_maxrss is in kilobytes on Linux.
    Ok((seconds, usage.ru_maxrss as f64 / 1024.0, error))
}

/// Writes the synthetic model: Llama-2-7B's shape, random Q4_0 matrices (weights with a standard
/// deviation of about 0.015, as in trained 7B models), and the tokenizer (and so the vocabulary
/// size) of `tokenizer_model`.
fn write_synthetic(tokenizer_model: &Path, path: &Path) -> Result<()> {
    let tok = GgufFile::open(tokenizer_model)?;
    let n_vocab = tok
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(<[Value]>::len)
        .context("the tokenizer model has no tokenizer.ggml.tokens")?;
    let model = synth::Synth {
        hp: HParams {
            arch: Arch::Llama,
            n_layer: N_LAYER,
            n_embd: N_EMBD,
            n_ff: N_FF,
            n_head: N_HEAD,
            n_head_kv: N_HEAD,
            n_vocab,
            n_ctx: 4096,
            norm_eps: 1e-5,
            tied_embeddings: false,
            ..HParams::plain(Arch::Llama, N_EMBD, N_HEAD)
        },
        name: "backlens synthetic 7B".into(),
        tokenizer: tok
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect(),
        matrix_type: GgmlType::Q4_0,
        seed: 0x9E37_79B9_7F4A_7C15,
        optional: Vec::new(),
        extra_metadata: Vec::new(),
    };
    model.write(path)?;
    Ok(())
}
