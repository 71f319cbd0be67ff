//! One test per bad input found so far, each named after what broke and tied to its row of
//! `docs/errors.md`. Every error row asserts exit code 2, exactly the documented message as the
//! one line on stderr (naming the file or argument at fault), nothing on stdout, and the folder
//! the command reads from or writes to unchanged: no output, no temporary file left behind.

mod common;

use backlens::arch::Arch;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::write::gguf::GgufPlan;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

/// Name, length and modification time of every entry under `dir`, recursively.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((e.path(), meta.len(), meta.modified().unwrap()));
        if meta.is_dir() {
            out.extend(snapshot(&e.path()));
        }
    }
    out.sort();
    out
}

/// Runs `args` (through `bash -c` after `shell_prefix`, if given) and checks one row's failure:
/// exit code 2, stderr exactly `error: {message}` on one line, empty stdout, and `watched`
/// (the folder holding what the command reads and writes) unchanged.
fn expect_error_in(shell_prefix: Option<&str>, args: &[&str], message: &str, watched: &Path) {
    let before = snapshot(watched);
    let out = match shell_prefix {
        None => Command::new(BIN).args(args).output().unwrap(),
        Some(prefix) => {
            let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            Command::new("bash")
                .arg("-c")
                .arg(format!("{prefix}; exec {BIN} {}", quoted.join(" ")))
                .output()
                .unwrap()
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("exit {:?}: {}", out.status.code(), stderr.trim_end());
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {stderr:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {stderr:?}"
    );
    assert_eq!(stderr.trim_end(), format!("error: {message}"), "{args:?}");
    assert!(out.stdout.is_empty(), "{args:?}: wrote to stdout");
    assert_eq!(
        snapshot(watched),
        before,
        "{args:?}: left something behind in {}",
        watched.display()
    );
}

fn expect_error(args: &[&str], message: &str, watched: &Path) {
    expect_error_in(None, args, message, watched)
}

/// Writes `bytes` to `dir/name` and returns the path as a string.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// `inspect` of `dir/name` holding `bytes` fails with `error: PATH: {message}`.
fn inspect_fails(tag: &str, name: &str, bytes: &[u8], message: &str) {
    let dir = common::temp_dir(tag);
    let path = write(&dir, name, bytes);
    expect_error(&["inspect", &path], &format!("{path}: {message}"), &dir);
}

/// The tiny Llama fixture's bytes.
fn good() -> Vec<u8> {
    std::fs::read(&common::tiny(Arch::Llama).gguf).unwrap()
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

/// `inspect` of a copy of the tiny Llama changed by `edit` fails with `error: PATH: {message}`.
fn fixture_variant_fails(tag: &str, edit: impl FnOnce(&mut GgufPlan), message: &str) {
    let dir = common::temp_dir(tag);
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    edit(&mut plan);
    let path = dir.join(format!("{tag}.gguf"));
    plan.write(&path).unwrap();
    let p = path.to_str().unwrap();
    expect_error(&["inspect", p], &format!("{p}: {message}"), &dir);
}

/// A folder with a copy of the tiny Llama (`model.gguf`) for `edit` to read and write in.
struct EditCase {
    dir: PathBuf,
    model: String,
    out: String,
}

impl EditCase {
    fn new(tag: &str) -> EditCase {
        let dir = common::temp_dir(tag);
        let model = dir.join("model.gguf");
        std::fs::copy(&common::tiny(Arch::Llama).gguf, &model).unwrap();
        EditCase {
            model: model.to_str().unwrap().into(),
            out: dir.join("out.gguf").to_str().unwrap().into(),
            dir,
        }
    }

    /// `edit MODEL -o OUT --no-check` followed by `extra`.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["edit", &self.model, "-o", &self.out, "--no-check"];
        v.extend_from_slice(extra);
        v
    }

    fn fails(&self, extra: &[&str], message: &str) {
        expect_error(&self.args(extra), message, &self.dir);
        assert!(!Path::new(&self.out).exists());
    }
}

const MESSI: [&str; 4] = ["--prompt", "Lionel Messi plays for", "--target", "Paris"];

// docs/errors.md row 1
#[test]
fn empty_file_is_not_a_gguf_model() {
    inspect_fails("r1", "empty.gguf", b"", "empty file, not a GGUF model");
}

// docs/errors.md row 2
#[test]
fn wrong_magic_is_named_with_the_expected_one() {
    let mut bytes = good();
    bytes[..4].copy_from_slice(b"GGXF");
    inspect_fails(
        "r2",
        "magic.gguf",
        &bytes,
        r#"not a GGUF file (magic "GGXF", expected "GGUF")"#,
    );
}

// docs/errors.md row 3
#[test]
fn unsupported_gguf_version_lists_the_supported_ones() {
    let mut bytes = good();
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    inspect_fails(
        "r3",
        "version.gguf",
        &bytes,
        "unsupported GGUF version 7 (supported: 2, 3)",
    );
}

// docs/errors.md row 4
#[test]
fn truncated_header_is_an_error_not_a_short_read() {
    inspect_fails(
        "r4",
        "header.gguf",
        &good()[..200],
        "truncated header: it claims 19 metadata entries but the file has only 176 bytes left",
    );
}

// docs/errors.md row 5
#[test]
fn truncated_tensor_data_names_the_tensor_and_the_sizes() {
    let bytes = good();
    inspect_fails(
        "r5",
        "data.gguf",
        &bytes[..bytes.len() - 4096],
        "tensor 'blk.2.ffn_down.weight' data (offset 523936, 32768 bytes) runs past the end of \
         the file (552608 bytes): truncated or corrupt",
    );
}

// docs/errors.md row 6
#[test]
fn tensor_offset_past_end_of_file_is_an_error() {
    inspect_fails(
        "r6",
        "offset.gguf",
        &one_tensor_gguf(&[64, 4], 0, 1 << 40, 1024),
        "tensor 'token_embd.weight' data (offset 1099511627872, 1024 bytes) runs past the end \
         of the file (1120 bytes): truncated or corrupt",
    );
}

// docs/errors.md row 7
#[test]
fn dimensions_whose_product_overflows_are_an_error_not_a_wrap() {
    inspect_fails(
        "r7",
        "overflow.gguf",
        &one_tensor_gguf(&[1 << 40, 1 << 40], 0, 0, 64),
        "tensor 'token_embd.weight': dimensions [1099511627776, 1099511627776] overflow the \
         element count",
    );
}

// docs/errors.md row 8
#[test]
fn unknown_tensor_type_is_named() {
    inspect_fails(
        "r8",
        "type.gguf",
        &one_tensor_gguf(&[64, 4], 99, 0, 1024),
        "tensor 'token_embd.weight' has unknown tensor type 99",
    );
}

// docs/errors.md row 9
#[test]
fn huge_tensor_count_is_rejected_before_allocating() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend((1u64 << 60).to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    inspect_fails(
        "r9",
        "counts.gguf",
        &bytes,
        "truncated header: it claims 1152921504606846976 tensors but the file has only 0 bytes \
         left",
    );
}

// docs/errors.md row 37
#[test]
fn family_features_the_forward_lacks_are_named() {
    for (tag, key, value, message) in [
        (
            "yarn",
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "llama.rope.scaling.type is 'yarn': backlens implements RoPE scaling none, linear, longrope",
        ),
        (
            "vlen",
            "llama.attention.value_length",
            Value::U32(8),
            "invalid hyperparameters: llama.attention.value_length is 8, but the key width is 16 (different key and value widths are not supported)",
        ),
    ] {
        let dir = common::temp_dir(tag);
        let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
        let mut plan = GgufPlan::copy_of(&src);
        plan.set(key, value);
        let path = dir.join(format!("{tag}.gguf"));
        plan.write(&path).unwrap();
        let p = path.to_str().unwrap();
        expect_error(
            &["predict", p, "The city of"],
            &format!("{p}: {message}"),
            &dir,
        );
    }
}

// docs/errors.md row 10
#[test]
fn missing_required_tensor_is_named() {
    fixture_variant_fails(
        "missing",
        |plan| plan.tensors.retain(|t| t.name != "blk.1.ffn_down.weight"),
        "missing required tensor 'blk.1.ffn_down.weight'",
    );
}

// docs/errors.md row 11 (inspect reads such a file: tests/inspect.rs)
#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = common::temp_dir("arch");
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut plan = GgufPlan::copy_of(&src);
    plan.set("general.architecture", Value::String("mamba9".into()));
    let path = dir.join("arch.gguf");
    plan.write(&path).unwrap();
    let p = path.to_str().unwrap();
    expect_error(
        &["predict", p, "The city of"],
        &format!("{p}: unknown architecture 'mamba9' (supported: gpt2, llama, qwen2, qwen3, phi3, gemma3)"),
        &dir,
    );
}

// docs/errors.md row 35
#[test]
fn unknown_tokenizer_names_the_key_the_value_and_the_supported_ones() {
    let dir = common::temp_dir("pre");
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let supported_pre = "default, gpt-2, phi-2, jina-es, jina-de, gigachat, jina-v2-es, \
jina-v2-de, a.x-4.0, mellum, modern-bert, mpt, olmo, jais, trillion, granite-docling, smollm, \
starcoder, refact, command-r, codeshell, exaone, minerva-7b, mellum2, llama-bpe, llama3, \
llama-v3, falcon3, falcon-h1, pixtral, midm-2.0, lfm2, jina-v5-nano, dbrx, smaug-bpe, qwen2, \
deepseek-r1-qwen, kormo, f2llmv2, megrez, stablelm2, hunyuan, solar-open";
    for (name, key, value, supported) in [
        ("pre", "tokenizer.ggml.pre", "tekken", supported_pre),
        ("model", "tokenizer.ggml.model", "bert", "gpt2, llama"),
    ] {
        let mut plan = GgufPlan::copy_of(&src);
        plan.set(key, Value::String(value.into()));
        let path = dir.join(format!("{name}.gguf"));
        plan.write(&path).unwrap();
        let p = path.to_str().unwrap();
        expect_error(
            &["predict", p, "The city of"],
            &format!("{p}: {key} = '{value}' is not supported (supported: {supported})"),
            &dir,
        );
    }
}

// docs/errors.md row 36
#[test]
fn repeated_token_is_refused_before_llama_cpp_asserts() {
    let dir = common::temp_dir("dup");
    let src = GgufFile::open(&common::tiny(Arch::Llama).gguf).unwrap();
    let mut tokens = src.get("tokenizer.ggml.tokens").unwrap().clone();
    let Value::Array(_, items) = &mut tokens else {
        panic!("tokens are not an array")
    };
    items[5] = items[4].clone();
    let mut plan = GgufPlan::copy_of(&src);
    plan.set("tokenizer.ggml.tokens", tokens);
    let path = dir.join("dup.gguf");
    plan.write(&path).unwrap();
    let p = path.to_str().unwrap();
    expect_error(
        &["predict", p, "The city of", "--runtime", "llama"],
        &format!(
            "{p}: missing or invalid metadata key 'tokenizer.ggml.tokens (token 5 repeats token 4, \"ă\")'"
        ),
        &dir,
    );
}

// docs/errors.md row 12
#[test]
fn folder_without_config_json_is_not_an_hf_checkpoint() {
    let dir = common::temp_dir("r12");
    let d = dir.to_str().unwrap();
    expect_error(
        &["inspect", d],
        &format!("{d}: folder has no config.json, not an HF checkpoint"),
        &dir,
    );
}

// docs/errors.md row 13
#[test]
fn safetensors_header_length_past_end_of_file_names_the_shard() {
    let dir = common::temp_dir("r13");
    let st = dir.join("st");
    std::fs::create_dir_all(&st).unwrap();
    std::fs::copy(
        common::tiny(Arch::Llama).hf.join("config.json"),
        st.join("config.json"),
    )
    .unwrap();
    let mut bytes = (1u64 << 20).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let shard = write(&st, "model.safetensors", &bytes);
    expect_error(
        &["inspect", st.to_str().unwrap()],
        &format!("{shard}: safetensors header length runs past the end of the file (10 bytes)"),
        &dir,
    );
}

// docs/errors.md row 14
#[test]
fn missing_file_is_named_with_the_os_error() {
    let dir = common::temp_dir("r14");
    let path = dir.join("absent.gguf");
    let p = path.to_str().unwrap();
    expect_error(
        &["inspect", p],
        &format!("{p}: No such file or directory (os error 2)"),
        &dir,
    );
}

// docs/errors.md row 15
#[test]
fn empty_target_is_rejected_before_writing() {
    let c = EditCase::new("r15");
    c.fails(
        &["--prompt", "Lionel Messi plays for", "--target", ""],
        "the target is empty",
    );
}

// docs/errors.md row 16
#[test]
fn layer_out_of_range_names_the_valid_layers() {
    let c = EditCase::new("r16");
    let mut extra = MESSI.to_vec();
    extra.extend(["--layer", "7"]);
    c.fails(&extra, "layer 7 out of range: the model has layers 0 to 2");
}

// docs/errors.md row 17
#[test]
fn prompt_that_tokenizes_to_nothing_is_rejected() {
    let c = EditCase::new("r17");
    c.fails(
        &["--prompt", "", "--target", "Paris"],
        "the prompt is empty",
    );
}

// docs/errors.md row 18
#[test]
fn output_equal_to_input_is_refused_also_through_symlinks() {
    let c = EditCase::new("r18");
    let link = c.dir.join("link.gguf");
    std::os::unix::fs::symlink(&c.model, &link).unwrap();
    let before = std::fs::read(&c.model).unwrap();
    for out in [c.model.as_str(), link.to_str().unwrap()] {
        let mut args = vec!["edit", c.model.as_str(), "-o", out, "--no-check"];
        args.extend(MESSI);
        expect_error(
            &args,
            &format!("{out}: is an input of this run; choose another path"),
            &c.dir,
        );
    }
    assert_eq!(
        std::fs::read(&c.model).unwrap(),
        before,
        "the input changed"
    );
}

// docs/errors.md row 19
#[test]
fn existing_output_is_kept_without_force() {
    let c = EditCase::new("r19");
    std::fs::write(&c.out, b"keep me").unwrap();
    expect_error(
        &c.args(&MESSI),
        &format!("{}: exists; pass --force to replace it", c.out),
        &c.dir,
    );
    assert_eq!(std::fs::read(&c.out).unwrap(), b"keep me");
}

// docs/errors.md row 20
#[test]
fn request_json_missing_fields_names_the_file_and_the_request() {
    let c = EditCase::new("r20");
    let requests = write(
        &c.dir,
        "req.json",
        br#"[{"prompt": "Lionel Messi plays for"}]"#,
    );
    c.fails(
        &["--requests", &requests],
        &format!(
            r#"{requests}: request #0: needs 'prompt' and 'target_new' (a string, or {{"str": ...}} with 'subject')"#
        ),
    );
}

// docs/errors.md row 21
#[test]
fn file_size_limit_mid_write_leaves_no_output_or_temporary_file() {
    let c = EditCase::new("r21");
    expect_error_in(
        Some("ulimit -f 64"),
        &c.args(&MESSI),
        &format!("{}: File too large (os error 27)", c.out),
        &c.dir,
    );
    assert!(!Path::new(&c.out).exists());
}

// docs/errors.md row 22 (no exit code: the process is killed; what must hold is on disk).
#[test]
fn sigkill_mid_write_leaves_input_intact_and_no_output() {
    let sha256 = |p: &Path| backlens::write::sha256_hex(&std::fs::read(p).unwrap());
    let dir = common::temp_dir("r22");
    // 2.1M vocabulary rows × 64 floats ≈ 540 MB of embedding.
    let (model, _) = common::write_gguf_fixture(Arch::Llama, &dir, 2_100_000);
    let size = std::fs::metadata(&model).unwrap().len();
    assert!(size >= 500_000_000, "synthetic model is only {size} bytes");
    let before = sha256(&model);
    let out = dir.join("out.gguf");
    let args = [
        "edit",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-check",
        "--prompt",
        "Lionel Messi plays for",
        "--target",
        "Paris",
        "--layer",
        "1",
    ];
    let mut child = Command::new(BIN).args(args).spawn().unwrap();
    let partial_of = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".out.gguf.backlens-partial-")
            })
    };
    let start = Instant::now();
    let partial = loop {
        if let Some(p) = partial_of(&dir) {
            if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) > 50_000_000 {
                break p;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "edit finished before it could be killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no partial output appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed edit left {}", out.display());
    assert!(
        partial.exists(),
        "the temporary file is recognisable by its name"
    );
    assert_eq!(sha256(&model), before, "the input changed");

    let status = Command::new(BIN).args(args).status().unwrap();
    assert!(status.success());
    assert!(
        out.exists() && partial_of(&dir).is_none(),
        "the next run cleans up and succeeds"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// docs/errors.md row 23 (found by fuzzing: the error path indexed an empty dimension list).
#[test]
fn quantized_tensor_without_dimensions_is_an_error_not_a_panic() {
    inspect_fails(
        "r23",
        "no-dims.gguf",
        &one_tensor_gguf(&[], 2, 0, 64),
        "tensor 'token_embd.weight': row length 1 is not a multiple of the q4_0 block size 32",
    );
}
