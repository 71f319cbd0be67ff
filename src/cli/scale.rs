//! `bench --scale DIR`: a synthetic 7B-shaped Llama GGUF (Q4_0, random weights, the tokenizer
//! of the given model) goes through `inspect`, `audit` against a copy and a shift `edit` to a
//! LoRA adapter and to a patched GGUF, each run as a child process so that its wall time and
//! peak resident memory can be measured on its own.

use super::print_json;
use anyhow::{bail, Context, Result};
use backlens::weights::gguf::{GgufFile, Value};
use backlens::weights::quant::GgmlType;
use backlens::write::gguf::{write_generated, GeneratedTensor};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Llama-2-7B's shape.
const N_LAYER: u64 = 32;
const N_EMBD: u64 = 4096;
const N_FF: u64 = 11008;
const N_HEAD: u32 = 32;
/// Scale of the random Q4_0 blocks: weights d·(q − 8) with q uniform in 0..16 have a standard
/// deviation of about 0.02, as in trained 7B models.
const BLOCK_SCALE: f32 = 0.0043;

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

/// Runs the scale benchmark in `dir`, taking the tokenizer from `tokenizer_model`.
pub fn run(tokenizer_model: &Path, dir: &Path, json: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let synthetic = dir.join("synthetic-7b-q4_0.gguf");
    let mut steps = Vec::new();
    if GgufFile::open(&synthetic).is_err() {
        let start = Instant::now();
        write_synthetic(tokenizer_model, &synthetic)?;
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
    let edit = |format: &str, output: String| -> Vec<String> {
        [
            "edit",
            s,
            "--prompt",
            "Lionel Messi plays for",
            "--target",
            "Paris",
            "--format",
            format,
            "--no-check",
            "--force",
            "-o",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([output])
        .collect()
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
            edit("lora", out("edit-lora.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "edit to GGUF",
            edit("gguf", out("edit.gguf")),
            Some(size_mb + 2000.0),
        ),
        (
            "audit vs edited GGUF",
            vec!["audit".into(), s.into(), out("edit.gguf")],
            None,
        ),
    ];
    for (name, argv, goal) in runs {
        let (seconds, peak_rss_mb, error) = measure(&argv)?;
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
    if json {
        return print_json(&steps);
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

/// Runs this executable with `argv` (output discarded); wall seconds, peak RSS in MB, and the
/// failure (exit status and stderr), if any.
fn measure(argv: &[String]) -> Result<(f64, f64, Option<String>)> {
    let exe = std::env::current_exe()?;
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

/// Writes the synthetic model: Llama-2-7B's shape, random Q4_0 weights, unit norms, and the
/// tokenizer (and so the vocabulary size) of `tokenizer_model`.
fn write_synthetic(tokenizer_model: &Path, path: &Path) -> Result<()> {
    let tok = GgufFile::open(tokenizer_model)?;
    let n_vocab = tok
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(<[Value]>::len)
        .context("the tokenizer model has no tokenizer.ggml.tokens")? as u64;
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("backlens synthetic 7B".into()),
        ),
        ("general.file_type".into(), Value::U32(2)),
        ("llama.block_count".into(), Value::U32(N_LAYER as u32)),
        ("llama.context_length".into(), Value::U32(4096)),
        ("llama.embedding_length".into(), Value::U32(N_EMBD as u32)),
        ("llama.feed_forward_length".into(), Value::U32(N_FF as u32)),
        ("llama.attention.head_count".into(), Value::U32(N_HEAD)),
        ("llama.attention.head_count_kv".into(), Value::U32(N_HEAD)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
    ];
    metadata.extend(
        tok.metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned(),
    );
    let q4 = GgmlType::Q4_0;
    let tensor = |name: String, dims: Vec<u64>, ggml_type| GeneratedTensor {
        name,
        dims,
        ggml_type,
    };
    let mut tensors = vec![tensor(
        "token_embd.weight".into(),
        vec![N_EMBD, n_vocab],
        q4,
    )];
    for l in 0..N_LAYER {
        let b = |role: &str| format!("blk.{l}.{role}.weight");
        tensors.extend([
            tensor(b("attn_norm"), vec![N_EMBD], GgmlType::F32),
            tensor(b("attn_q"), vec![N_EMBD, N_EMBD], q4),
            tensor(b("attn_k"), vec![N_EMBD, N_EMBD], q4),
            tensor(b("attn_v"), vec![N_EMBD, N_EMBD], q4),
            tensor(b("attn_output"), vec![N_EMBD, N_EMBD], q4),
            tensor(b("ffn_norm"), vec![N_EMBD], GgmlType::F32),
            tensor(b("ffn_gate"), vec![N_EMBD, N_FF], q4),
            tensor(b("ffn_up"), vec![N_EMBD, N_FF], q4),
            tensor(b("ffn_down"), vec![N_FF, N_EMBD], q4),
        ]);
    }
    tensors.push(tensor(
        "output_norm.weight".into(),
        vec![N_EMBD],
        GgmlType::F32,
    ));
    tensors.push(tensor("output.weight".into(), vec![N_EMBD, n_vocab], q4));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let scale = half::f16::from_f32(BLOCK_SCALE).to_le_bytes();
    write_generated(path, &metadata, &tensors, |i, buf| {
        if tensors[i].ggml_type == GgmlType::F32 {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&1f32.to_le_bytes());
            }
            return Ok(());
        }
        for c in buf.chunks_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            c.copy_from_slice(&rng.to_le_bytes()[..c.len()]);
        }
        for block in buf.chunks_exact_mut(18) {
            block[..2].copy_from_slice(&scale);
        }
        Ok(())
    })?;
    Ok(())
}
