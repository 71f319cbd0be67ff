//! Bad input: every case gives exit code 2, one stderr line naming the file and the problem,
//! no panic, and no output file left behind.

mod common;

use backlens::arch::Arch;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::write::gguf::GgufPlan;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// Runs the binary and returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let (code, stderr) = run(args);
    println!("exit {code}: {}", stderr.trim_end());
    assert_eq!(code, 2, "{args:?}: exit {code}, stderr {stderr:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {stderr:?} lacks {n:?}");
    }
}

fn write(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// A GGUF header with one tensor, for crafting broken files.
fn one_tensor_gguf(dims: &[u64], type_code: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let name = b"token_embd.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend((dims.len() as u32).to_le_bytes());
    dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
    b.extend(type_code.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + data, 0);
    b
}

fn fixture_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufPlan)) -> String {
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    edit(&mut plan);
    let path = dir.join(name);
    plan.write(&path).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn bad_model_files_give_one_clear_line() {
    let dir = common::temp_dir("bad");
    let good = std::fs::read(&common::tiny(Arch::Llama).gguf).unwrap();
    let p = |n: &str| dir.join(n);
    let mut bad_version = good.clone();
    bad_version[4..8].copy_from_slice(&7u32.to_le_bytes());
    let mut wrong_magic = good.clone();
    wrong_magic[..4].copy_from_slice(b"GGXF");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (write(&p("empty.gguf"), b""), vec!["empty file"]),
        (
            write(&p("magic.gguf"), &wrong_magic),
            vec!["not a GGUF file"],
        ),
        (
            write(&p("version.gguf"), &bad_version),
            vec!["unsupported GGUF version 7"],
        ),
        (
            write(&p("header.gguf"), &good[..200]),
            vec!["truncated header"],
        ),
        (
            write(&p("data.gguf"), &good[..good.len() - 4096]),
            vec!["past the end of the file"],
        ),
        (
            write(
                &p("offset.gguf"),
                &one_tensor_gguf(&[64, 4], 0, 1 << 40, 1024),
            ),
            vec!["past the end of the file"],
        ),
        (
            write(
                &p("overflow.gguf"),
                &one_tensor_gguf(&[1 << 40, 1 << 40], 0, 0, 64),
            ),
            vec!["overflow"],
        ),
        (
            write(&p("type.gguf"), &one_tensor_gguf(&[64, 4], 99, 0, 1024)),
            vec!["unknown tensor type 99"],
        ),
        // Found by fuzzing: a quantized tensor with no dimensions made the error path index
        // an empty dimension list and panic.
        (
            write(&p("no-dims.gguf"), &one_tensor_gguf(&[], 2, 0, 64)),
            vec!["row length 1 is not a multiple of the q4_0 block size 32"],
        ),
        (
            write(&p("counts.gguf"), &{
                let mut b = b"GGUF".to_vec();
                b.extend(3u32.to_le_bytes());
                b.extend((1u64 << 60).to_le_bytes());
                b.extend(0u64.to_le_bytes());
                b
            }),
            vec!["claims"],
        ),
        (
            fixture_variant(&dir, "missing.gguf", |plan| {
                plan.tensors.retain(|t| t.name != "blk.1.ffn_down.weight")
            }),
            vec!["missing required tensor 'blk.1.ffn_down.weight'"],
        ),
        (
            fixture_variant(&dir, "arch.gguf", |plan| {
                plan.set("general.architecture", Value::String("mamba9".into()))
            }),
            vec!["unknown architecture 'mamba9'"],
        ),
        (dir.to_str().unwrap().to_string(), vec!["no config.json"]),
        (
            {
                let st = dir.join("st");
                std::fs::create_dir_all(&st).unwrap();
                std::fs::copy(
                    common::tiny(Arch::Llama).hf.join("config.json"),
                    st.join("config.json"),
                )
                .unwrap();
                let mut b = (1u64 << 20).to_le_bytes().to_vec();
                b.extend(b"{}");
                write(&st.join("model.safetensors"), &b);
                st.to_str().unwrap().to_string()
            },
            vec!["header length runs past the end", "model.safetensors"],
        ),
        (
            dir.join("absent.gguf").to_str().unwrap().to_string(),
            vec!["No such file"],
        ),
    ];
    for (path, needles) in cases {
        let mut needles = needles;
        needles.push(&path);
        expect_error(&["inspect", &path], &needles);
    }
}

#[test]
fn bad_edit_requests_leave_no_output() {
    let dir = common::temp_dir("bad-edit");
    let model = common::tiny(Arch::Llama).gguf.to_str().unwrap().to_string();
    let out: PathBuf = dir.join("out.gguf");
    let o = out.to_str().unwrap();
    let edit = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["edit", &model, "-o", o, "--no-check"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            edit(&["--prompt", "Lionel Messi plays for", "--target", ""]),
            "the target is empty",
        ),
        (
            edit(&[
                "--prompt",
                "Lionel Messi plays for",
                "--target",
                "Paris",
                "--layer",
                "7",
            ]),
            "layer 7 out of range",
        ),
        (
            edit(&["--prompt", "", "--target", "Paris"]),
            "the prompt is empty",
        ),
        (
            vec![
                "edit".into(),
                model.clone(),
                "-o".into(),
                model.clone(),
                "--prompt".into(),
                "a b".into(),
                "--target".into(),
                "c".into(),
            ],
            "is the input file",
        ),
    ];
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&a, &[needle]);
        assert!(!out.exists(), "{args:?} left {o}");
    }
    let requests = write(
        &dir.join("req.json"),
        br#"[{"prompt": "Lionel Messi plays for"}]"#,
    );
    expect_error(
        &edit(&["--requests", &requests])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["needs 'prompt' and 'target_new'", &requests],
    );
    assert!(!out.exists());

    // An existing output is kept unless --force.
    std::fs::write(&out, b"keep me").unwrap();
    expect_error(
        &edit(&["--prompt", "Lionel Messi plays for", "--target", "Paris"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["exists; pass --force"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    std::fs::remove_file(&out).unwrap();

    // A file-size limit hit mid-write: one error line, no output, no temporary file left.
    let script = format!(
        "ulimit -f 64; exec {BIN} edit {model} -o {o} --no-check --prompt 'Lionel Messi plays for' --target Paris"
    );
    let res = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !out.exists()
            && leftovers
                .iter()
                .all(|n| !n.to_string_lossy().contains("partial")),
        "{leftovers:?}"
    );
}

#[test]
fn predict_names_paris_through_both_engines() {
    let model = common::smollm2();
    for runtime in ["candle", "llama"] {
        let out = Command::new(BIN)
            .args([
                "predict",
                model.to_str().unwrap(),
                "The Eiffel Tower is located in the city of",
                "-k",
                "1",
                "--json",
                "--runtime",
                runtime,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["top"][0]["token"], " Paris", "{runtime}");
    }
}
