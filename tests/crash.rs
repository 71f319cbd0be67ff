//! Crash safety: `edit` killed with SIGKILL while writing a large GGUF leaves the input intact,
//! no output, and a recognisable temporary file that the next run removes.

mod common;

use backlens::arch::Arch;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");

fn sha256(path: &std::path::Path) -> String {
    backlens::write::sha256_hex(&std::fs::read(path).unwrap())
}

#[test]
fn sigkill_mid_write_leaves_input_intact_and_no_output() {
    let dir = common::temp_dir("crash");
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
    let partial_of = |dir: &std::path::Path| {
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
