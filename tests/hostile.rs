//! Hostile input (docs/errors.md, "what backlens will never do"): one test per case found by
//! trying backlens as a hostile user would. Each asserts the safe behaviour: files outside the
//! tool's own output untouched (hashes), no C abort, exit 2 with one line naming the file or
//! argument, and no output (nor temporary or lock file) left behind.

mod common;

use backlens::arch::Arch;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::write::gguf::{GgufPlan, OutTensor};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// Runs the binary in `cwd` (None: the test's own) and returns (exit code, stderr).
fn run_in(cwd: Option<&Path>, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts exit 2, one stderr line without a panic or an abort, containing every needle.
fn expect_error_in(cwd: Option<&Path>, args: &[&str], needles: &[&str]) -> String {
    let (code, stderr) = run_in(cwd, args);
    println!("exit {code}: {}", stderr.trim_end());
    assert_eq!(code, 2, "{args:?}: exit {code}, stderr {stderr:?}");
    let line = stderr.trim_end();
    assert_eq!(
        line.lines().count(),
        1,
        "{args:?}: not one line: {stderr:?}"
    );
    assert!(line.starts_with("error: "), "{args:?}: {line}");
    assert!(!line.contains("panicked") && !line.contains("GGML_ASSERT"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: {line:?} lacks {n:?}");
    }
    line.to_string()
}

fn expect_error(args: &[&str], needles: &[&str]) -> String {
    expect_error_in(None, args, needles)
}

/// Every entry of a folder (recursively) with the sha256 of each file: what must not change.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            out.insert(p.clone(), "dir".into());
            out.extend(snapshot(&p));
        } else if ft.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            out.insert(p, backlens::write::sha256_hex(&bytes));
        } else {
            out.insert(p, format!("{:?}", ft));
        }
    }
    out
}

/// No temporary or lock file of backlens's in `dir`.
fn assert_no_leftovers(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".backlens-partial-") && !name.contains(".backlens-lock"),
            "left behind: {name}"
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the tiny Llama fixture with `edit` applied to its plan, written to `dir/name`.
fn variant(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufPlan)) -> PathBuf {
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    edit(&mut plan);
    let path = dir.join(name);
    plan.write(&path).unwrap();
    path
}

/// Arguments of a small shift edit of the tiny Llama fixture into `out`.
fn tiny_edit<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "edit",
        model,
        "-o",
        out,
        "--prompt",
        "The city of",
        "--target",
        "Paris",
        "--layer",
        "1",
    ]
}

/// Case 1: `--format safetensors -o DIR --force` removed DIR recursively, whatever it held.
#[test]
fn case01_safetensors_force_never_deletes_a_folder_backlens_did_not_write() {
    let dir = common::temp_dir("hostile-01");
    let ckpt = dir.join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for e in std::fs::read_dir(&common::tiny(Arch::Llama).hf)
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "my own file").unwrap();
    let before = snapshot(&dir);
    let args = |out: &str| {
        vec![
            "edit".to_string(),
            s(&ckpt).into(),
            "--format".into(),
            "safetensors".into(),
            "-o".into(),
            out.into(),
            "--force".into(),
            "--prompt".into(),
            "The city of".into(),
            "--target".into(),
            "Paris".into(),
            "--layer".into(),
            "1".into(),
        ]
    };
    for out in [s(&dir).to_string(), ".".to_string(), s(&ckpt).to_string()] {
        let a = args(&out);
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        expect_error_in(Some(&dir), &argv, &[]);
        assert_eq!(snapshot(&dir), before, "-o {out} changed files");
    }
    // A folder backlens wrote itself may be replaced with --force.
    let own = dir.join("patched");
    for _ in 0..2 {
        let a = args(s(&own));
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, err) = run_in(None, &argv);
        assert_eq!(code, 0, "{err}");
    }
    assert!(own.join("model.safetensors").is_file());
    // ... but not once it holds a file of the user's.
    std::fs::write(own.join("mine.txt"), "x").unwrap();
    let a = args(s(&own));
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    expect_error(&argv, &["did not write"]);
    assert!(own.join("mine.txt").is_file());
    assert_no_leftovers(&dir);
}

/// Case 2: adapters with a UINT32 or string alpha, or a non-string `general.type`, made
/// llama.cpp abort with GGML_ASSERT in `generate --lora` while `audit` took them as full
/// patches.
#[test]
fn case02_adapters_llama_cpp_would_abort_on_are_refused_first() {
    let dir = common::temp_dir("hostile-02");
    let fx = common::tiny(Arch::Llama);
    let good = dir.join("good.gguf");
    let (code, err) = run_in(
        None,
        &[
            "edit",
            s(&fx.gguf),
            "-o",
            s(&good),
            "--format",
            "lora",
            "--prompt",
            "The city of",
            "--target",
            "Paris",
            "--layer",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let bad = |name: &str, key: &str, value: Value| {
        let src = GgufFile::open(&good).unwrap();
        let mut plan = GgufPlan::copy_of(&src);
        plan.set(key, value);
        let p = dir.join(name);
        plan.write(&p).unwrap();
        p
    };
    let cases = [
        bad("alpha-u32.gguf", "adapter.lora.alpha", Value::U32(1)),
        bad(
            "alpha-str.gguf",
            "adapter.lora.alpha",
            Value::String("1".into()),
        ),
        bad("type-u32.gguf", "general.type", Value::U32(7)),
    ];
    for adapter in &cases {
        let name = adapter.file_name().unwrap().to_str().unwrap();
        expect_error(
            &[
                "generate",
                s(&fx.gguf),
                "--lora",
                s(adapter),
                "The city of",
                "-n",
                "2",
            ],
            &[name],
        );
        expect_error(&["audit", s(&fx.gguf), s(adapter)], &[name]);
    }
}

/// Case 3: `-o` a device node or FIFO with --force replaced it by a regular file; a dangling
/// symlink at `-o` was replaced even without --force.
#[test]
fn case03_devices_fifos_and_links_are_never_outputs() {
    let dir = common::temp_dir("hostile-03");
    let fx = common::tiny(Arch::Llama);
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo on a fresh path in the test's own folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dangling = dir.join("dangling.gguf");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    let target = dir.join("real.gguf");
    std::fs::write(&target, "user data").unwrap();
    let link = dir.join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut outs = vec![fifo.clone(), dangling.clone(), link.clone()];
    // A character device of our own when the sandbox allows mknod (root), else /dev/null is
    // only ever read by this test's assertion below.
    let dev = dir.join("null-dev");
    let cd = std::ffi::CString::new(s(&dev)).unwrap();
    // SAFETY: mknod of a character device node (1,3 = null) in the test's own folder.
    if unsafe { libc::mknod(cd.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } == 0 {
        outs.push(dev.clone());
    }
    let before = snapshot(&dir);
    for out in &outs {
        for force in [false, true] {
            let mut args = tiny_edit(s(&fx.gguf), s(out));
            if force {
                args.push("--force");
            }
            expect_error(&args, &[s(out)]);
        }
    }
    assert_eq!(snapshot(&dir), before);
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "user data");
    assert_no_leftovers(&dir);
}

/// Case 4: the llama.cpp check ran after the output was committed, so a failing check left
/// (or, with --force, replaced) the output.
#[test]
fn case04_a_failed_check_leaves_no_output_and_keeps_the_old_one() {
    let dir = common::temp_dir("hostile-04");
    let smol = common::smollm2();
    let out = dir.join("out.gguf");
    // 606 tokens: more than a llama.cpp check session takes (512); refused before any work.
    let long = vec!["city"; 606].join(" ");
    let start = Instant::now();
    expect_error(
        &[
            "edit",
            s(&smol),
            "-o",
            s(&out),
            "--prompt",
            &long,
            "--target",
            "Paris",
        ],
        &["512", "--no-check"],
    );
    assert!(start.elapsed() < Duration::from_secs(20), "refused late");
    assert!(!out.exists());
    // An empty locality prompt in a request file.
    let req = dir.join("req.json");
    std::fs::write(
        &req,
        r#"[{"prompt": "The city of", "target_new": "Paris", "locality_prompt": " "}]"#,
    )
    .unwrap();
    expect_error(
        &["edit", s(&smol), "-o", s(&out), "--requests", s(&req)],
        &["locality_prompt"],
    );
    assert!(!out.exists());
    // A model that backlens reads but llama.cpp will not load (a mixture-of-experts count
    // without expert tensors): the check fails, an existing output keeps its bytes.
    let moe = variant(&dir, "moe.gguf", |p| {
        p.set("llama.expert_count", Value::U32(4));
        p.set("llama.expert_used_count", Value::U32(2));
    });
    std::fs::write(&out, "previous output").unwrap();
    let mut args = tiny_edit(s(&moe), s(&out));
    args.push("--force");
    expect_error(&args, &["moe.gguf"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous output");
    assert_no_leftovers(&dir);
}

/// Case 5: `block_count` = 10⁹ (or `num_hidden_layers` in config.json) made `inspect` allocate
/// per claimed layer before checking any tensor.
#[test]
fn case05_a_huge_layer_count_is_refused_before_allocating() {
    let dir = common::temp_dir("hostile-05");
    let gguf = variant(&dir, "layers.gguf", |p| {
        p.set("llama.block_count", Value::U32(1_000_000_000))
    });
    let hf = dir.join("hf");
    std::fs::create_dir(&hf).unwrap();
    for e in std::fs::read_dir(&common::tiny(Arch::Llama).hf)
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), hf.join(e.file_name())).unwrap();
    }
    let cfg = hf.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["num_hidden_layers"] = 1_000_000_000u64.into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    for path in [&gguf, &hf] {
        // 512 MB of address space is far more than inspect needs and far less than 10⁹ layers.
        let out = unsafe {
            Command::new(BIN)
                .args(["inspect", s(path)])
                .pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 1 << 29,
                        rlim_max: 1 << 29,
                    };
                    libc::setrlimit(libc::RLIMIT_AS, &lim);
                    Ok(())
                })
                .output()
                .unwrap()
        };
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{err}");
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("1000000000 layers claimed"), "{err}");
    }
}

/// Case 6: two `edit` runs with the same `-o` deleted each other's temporary files and could
/// both "succeed", the later silently clobbering.
#[test]
fn case06_concurrent_writers_of_one_output_serialize_or_fail_clearly() {
    let dir = common::temp_dir("hostile-06");
    let fx = common::tiny(Arch::Llama);
    let out = dir.join("out.gguf");
    // A held lock (another run writing) makes the edit fail at once, naming the output.
    let lock = dir.join(".out.gguf.backlens-lock");
    let held = std::fs::File::create(&lock).unwrap();
    // SAFETY: flock on a file this test owns.
    assert_eq!(
        unsafe {
            libc::flock(
                std::os::unix::io::AsRawFd::as_raw_fd(&held),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        },
        0
    );
    expect_error(
        &tiny_edit(s(&fx.gguf), s(&out)),
        &["another backlens run", "out.gguf"],
    );
    assert!(!out.exists());
    drop(held);
    std::fs::remove_file(&lock).unwrap();
    // Four runs at once without --force: exactly one writes, the others fail cleanly.
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(BIN)
                .args(tiny_edit(s(&fx.gguf), s(&out)))
                .arg("--no-check")
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let results: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = results.iter().filter(|r| r.status.success()).count();
    assert_eq!(ok, 1, "exactly one run may write a new output");
    for r in results.iter().filter(|r| !r.status.success()) {
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(
            err.contains("exists") || err.contains("another backlens run"),
            "{err}"
        );
    }
    GgufFile::open(&out).expect("the one output is a valid GGUF");
    assert_no_leftovers(&dir);
}

/// Case 7: a statistics cache with zeroed data under an intact header broke `shift-whitened`
/// for good; a cache that is a symlink to /dev/zero was read until memory ran out.
#[test]
fn case07_a_corrupt_statistics_cache_is_rebuilt_not_trusted() {
    let dir = common::temp_dir("hostile-07");
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let fx = common::tiny(Arch::Llama);
    let edit = |out: &Path| {
        let mut args = tiny_edit(s(&fx.gguf), s(out));
        args.extend(["--method", "shift-whitened", "--no-check"]);
        let o = Command::new(BIN)
            .args(&args)
            .env("HOME", &home)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{err}");
        std::fs::read(out).unwrap()
    };
    let reference = edit(&dir.join("fresh.gguf"));
    let caches = || -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![home.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(e.path());
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    found.push(e.path());
                }
            }
        }
        found
    };
    let files = caches();
    assert!(
        !files.is_empty(),
        "no statistics cache written under {}",
        home.display()
    );
    // Zeroed data under the header.
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        let keep = 64.min(bytes.len());
        bytes[keep..].iter_mut().for_each(|b| *b = 0);
        std::fs::write(f, bytes).unwrap();
    }
    assert_eq!(edit(&dir.join("zeroed.gguf")), reference);
    // One flipped byte (finite bit-rot).
    for f in &caches() {
        let mut bytes = std::fs::read(f).unwrap();
        let i = bytes.len() - 5;
        bytes[i] ^= 0x10;
        std::fs::write(f, bytes).unwrap();
    }
    assert_eq!(edit(&dir.join("flipped.gguf")), reference);
    // A symlink to /dev/zero in place of the cache.
    for f in &caches() {
        std::fs::remove_file(f).unwrap();
        std::os::unix::fs::symlink("/dev/zero", f).unwrap();
    }
    assert_eq!(edit(&dir.join("devzero.gguf")), reference);
}

/// Case 8: `--lr 1e30` or non-finite weights wrote a destroyed model with exit 0, the check
/// counted NaN logits as rank 0, eval scored a destroyed model, and `--lr 1e-45` wrote a
/// no-op patch.
#[test]
fn case08_destroyed_or_no_op_edits_and_non_finite_numbers_are_errors() {
    let dir = common::temp_dir("hostile-08");
    let fx = common::tiny(Arch::Llama);
    let out = dir.join("out.gguf");
    for lr in ["1e30", "1e-45"] {
        let mut args = tiny_edit(s(&fx.gguf), s(&out));
        args.extend(["--lr", lr]);
        expect_error(&args, &[]);
        assert!(!out.exists(), "--lr {lr} wrote an output");
    }
    let nan = variant(&dir, "nan.gguf", |p| {
        let t = p
            .tensors
            .iter()
            .position(|t| t.name == "output_norm.weight")
            .unwrap();
        let n = p.tensors[t].dims.iter().product::<u64>() as usize;
        p.tensors[t] = OutTensor::f32("output_norm.weight", &[n], &vec![f32::NAN; n]);
    });
    expect_error(&tiny_edit(s(&nan), s(&out)), &["NaN"]);
    assert!(!out.exists());
    let data = dir.join("records.json");
    std::fs::write(
        &data,
        r#"[{"prompt": "The city of", "target_new": "Paris", "ground_truth": "London",
             "locality_prompt": "The tower is", "locality_ground_truth": "tall"}]"#,
    )
    .unwrap();
    expect_error(
        &[
            "eval",
            s(&nan),
            "--data",
            s(&data),
            "--no-fluency",
            "--layer",
            "1",
        ],
        &["non-finite"],
    );
    assert_no_leftovers(&dir);
}

/// Case 9: SIGINT (Ctrl-C) or SIGTERM during a write left the partial file.
#[test]
fn case09_sigint_and_sigterm_during_a_write_remove_the_partial_file() {
    let dir = common::temp_dir("hostile-09");
    let (model, _) = common::write_gguf_fixture(Arch::Llama, &dir, 2_100_000);
    let before = backlens::write::sha256_hex(&std::fs::read(&model).unwrap());
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let out = dir.join("out.gguf");
        let mut child = Command::new(BIN)
            .args(tiny_edit(s(&model), s(&out)))
            .arg("--no-check")
            .spawn()
            .unwrap();
        let start = Instant::now();
        let partial = loop {
            let found = std::fs::read_dir(&dir).unwrap().flatten().find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".out.gguf.backlens-partial-")
            });
            if let Some(e) = found {
                if e.metadata().map(|m| m.len()).unwrap_or(0) > 20_000_000 {
                    break e.path();
                }
            }
            assert!(child.try_wait().unwrap().is_none(), "finished too soon");
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no partial output"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // SAFETY: signals the child this test started.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig), "exit after signal {sig}");
        assert!(!partial.exists(), "signal {sig} left {}", partial.display());
        assert!(!out.exists());
        assert_no_leftovers(&dir);
    }
    let after = backlens::write::sha256_hex(&std::fs::read(&model).unwrap());
    assert_eq!(after, before, "the input changed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Case 10: unclear messages (llama.cpp's "null result", candle internals, a late report of a
/// bad output folder, temporary names in errors, NaN tables, truncated ids, silent edits
/// toward a bare space, NaN predictions from bad hyperparameters).
#[test]
fn case10_every_bad_input_gets_one_clear_line() {
    let dir = common::temp_dir("hostile-10");
    let fx = common::tiny(Arch::Llama);
    let m = s(&fx.gguf);
    let out = dir.join("out.gguf");
    // A missing --lora file names the file.
    let absent = dir.join("absent-lora.gguf");
    expect_error(
        &["generate", m, "--lora", s(&absent), "x", "-n", "1"],
        &["absent-lora.gguf"],
    );
    // An invalid -o folder is reported first (before the model is even read).
    let nowhere = dir.join("no-such-folder/out.gguf");
    expect_error(
        &[
            "edit",
            "/nonexistent-model.gguf",
            "-o",
            s(&nowhere),
            "--prompt",
            "a",
            "--target",
            "b",
        ],
        &["no-such-folder"],
    );
    // A 245-character output name: refused up front, naming the output, not a temporary file.
    let long = dir.join(format!("{}.gguf", "x".repeat(240)));
    let line = expect_error(&tiny_edit(m, s(&long)), &["too long"]);
    assert!(!line.contains("backlens-partial"));
    // eval --n 0.
    let data = common::counterfact("counterfact-val.json");
    expect_error(
        &["eval", m, "--data", s(&data), "--n", "0"],
        &["no records"],
    );
    // A target with no visible character.
    expect_error(
        &[
            "edit",
            m,
            "-o",
            s(&out),
            "--prompt",
            "The city of",
            "--target",
            "\u{1}",
        ],
        &["no visible character"],
    );
    // Token ids past the embedding (a vocabulary longer than token_embd).
    let short_embd = variant(&dir, "short-embd.gguf", |p| {
        let t = p
            .tensors
            .iter()
            .position(|t| t.name == "token_embd.weight")
            .unwrap();
        let d = p.tensors[t].dims[0] as usize;
        p.tensors[t] = OutTensor::f32("token_embd.weight", &[8, d], &vec![0.1; 8 * d]);
    });
    expect_error(
        &["predict", s(&short_embd), "The city of"],
        &["short-embd.gguf", "token_embd.weight"],
    );
    // A prompt longer than the training context of a model with learned positions: llama.cpp
    // would abort (ggml's bounds assert); backlens refuses it first.
    let gpt2 = s(&common::tiny(Arch::Gpt2).gguf);
    let long_prompt = vec!["city"; 100].join(" ");
    expect_error(
        &["predict", gpt2, &long_prompt, "--runtime", "llama"],
        &["tiny-gpt2.gguf", "take 1 to 64"],
    );
    // Hyperparameters that would predict NaN, or that llama.cpp refuses.
    let bad: [(&str, &str, Value, &str); 4] = [
        (
            "bos.gguf",
            "tokenizer.ggml.bos_token_id",
            Value::U64((1 << 32) + 1),
            "bos_token_id",
        ),
        (
            "eps.gguf",
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1.0),
            "epsilon",
        ),
        (
            "theta.gguf",
            "llama.rope.freq_base",
            Value::F32(0.0),
            "RoPE base",
        ),
        (
            "rot.gguf",
            "llama.rope.dimension_count",
            Value::U32(32),
            "rope.dimension_count",
        ),
    ];
    for (name, key, value, needle) in bad {
        let p = variant(&dir, name, |plan| {
            plan.set(key, value);
            if name == "bos.gguf" {
                plan.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
            }
        });
        expect_error(&["predict", s(&p), "The city of"], &[name, needle]);
    }
    assert!(!out.exists());
    assert_no_leftovers(&dir);
}

/// A copy of the tiny StarCoder2 fixture with `edit` applied to its plan, written to `dir/name`.
fn starcoder2_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufPlan)) -> PathBuf {
    let src = GgufFile::open(common::tiny_starcoder2()).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    edit(&mut plan);
    let path = dir.join(name);
    plan.write(&path).unwrap();
    path
}

/// Case 11: forward-only commands on models llama.cpp cannot run (issue 14). An architecture
/// the pinned llama.cpp does not know, a `block_count` past llama.cpp's limit (its loader
/// aborts with GGML_ASSERT), a model without `ffn_down` and a layer past the last are each
/// refused by backlens before llama.cpp reads the file: one line naming the file or the
/// layer, exit 2, no output and no temporary file.
#[test]
fn case11_models_llama_cpp_cannot_run_are_refused_before_it_reads_them() {
    let dir = common::temp_dir("hostile-forward");
    let good = common::tiny_starcoder2();
    let nosuch = starcoder2_variant(&dir, "nosuch.gguf", |p| {
        p.set("general.architecture", Value::String("nosucharch".into()));
        for (k, v) in std::mem::take(&mut p.metadata) {
            let k = k.replacen("starcoder2.", "nosucharch.", 1);
            p.set(&k, v);
        }
    });
    let layers = starcoder2_variant(&dir, "layers.gguf", |p| {
        p.set("starcoder2.block_count", Value::U32(600));
    });
    let no_down = starcoder2_variant(&dir, "no-down.gguf", |p| {
        for t in &mut p.tensors {
            t.name = t.name.replace("ffn_down.weight", "ffn_out.weight");
        }
    });
    let out = dir.join("out.gguf");
    let (nosuch, layers, no_down, good, o) =
        (s(&nosuch), s(&layers), s(&no_down), s(good), s(&out));
    let edit = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "edit",
            model,
            "--prompt",
            "The city of",
            "--target",
            "Paris",
            "-o",
            o,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    };
    let owned = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    let check = |args: Vec<String>, needles: &[&str]| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&refs, needles);
    };
    let unknown = "architecture 'nosucharch' is not one the pinned llama.cpp loads";
    for args in [
        owned(&["predict", nosuch, "The city of", "--runtime", "llama"]),
        owned(&["generate", nosuch, "The city of"]),
        edit(nosuch, &[]),
        edit(nosuch, &["--format", "lora", "--forward", "llama"]),
        owned(&["audit", nosuch, good]),
    ] {
        check(args, &[nosuch, unknown]);
    }
    let too_many = "starcoder2.block_count is 600, but llama.cpp takes 1 to 512 layers";
    for args in [
        owned(&["predict", layers, "The city of", "--runtime", "llama"]),
        edit(layers, &[]),
    ] {
        check(args, &[layers, too_many]);
    }
    check(
        edit(no_down, &[]),
        &[
            no_down,
            "layer 2 has no down projection (blk.2.ffn_down.weight)",
        ],
    );
    check(
        edit(good, &["--layer", "3", "--format", "lora"]),
        &["layer 3 out of range: the model has layers 0 to 2"],
    );
    assert!(!out.exists());
    assert_no_leftovers(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}
