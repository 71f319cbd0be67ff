//! Build script: reads the llama.cpp pin in `vendor/llama-cpp.lock` (the stock llama-server that
//! `vendor/llama-server.sh` builds for end-to-end tests and `serve`) and hands it to the crate as
//! compile-time constants, so the binary reports and checks the same pin the build used.
//! No bindgen is needed here: `llama-cpp-sys-2` already exposes the ggml/gguf surface backlens
//! uses (type traits, `ggml_quantize_chunk`, the gguf API).

use std::fs;

fn main() {
    let lock = "vendor/llama-cpp.lock";
    println!("cargo:rerun-if-changed={lock}");
    let text = fs::read_to_string(lock).unwrap_or_else(|e| panic!("{lock}: {e}"));
    let field = |key: &str| -> String {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find_map(|l| {
                l.trim()
                    .strip_prefix(key)?
                    .strip_prefix('=')
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("{lock}: missing '{key}='"))
    };
    let (package, version, sha) = (field("package"), field("version"), field("sha256"));
    assert!(
        sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
        "{lock}: sha256 must be 64 hex digits"
    );
    println!("cargo:rustc-env=BACKLENS_LLAMA_CPP_PACKAGE={package}");
    println!("cargo:rustc-env=BACKLENS_LLAMA_CPP_VERSION={version}");
    println!("cargo:rustc-env=BACKLENS_LLAMA_CPP_SHA256={sha}");
}
