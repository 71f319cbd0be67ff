//! End to end through the stock llama.cpp `llama-server` (built by `make llama-server`): patched
//! GGUFs and LoRA adapters written by `backlens-patch edit` load in it, and its HTTP API shows the
//! edit (top-1 of /completion), locality, and adapter hot-swap via /lora-adapters. Also
//! `backlens-patch serve` itself. Servers listen on 127.0.0.1 only, on ports picked free, each
//! start waits at most 60 s for /health, and every server is killed by a drop guard.

mod common;

use backlens::arch::Arch;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_backlens-patch");
const PROMPT: &str = "Lionel Messi plays for";
const LOCALITY: &str = "The capital of Japan is";
/// Step size at which the shift edit makes " Paris" top-1 in SmolLM2 (checked via `check.after`).
const LR: &str = "0.5";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The llama-server binary, found like `backlens-patch serve` finds it (without `--server`).
fn server_binary() -> PathBuf {
    let path = match std::env::var_os("BACKLENS_LLAMA_SERVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(&std::env::var_os("HOME").expect("HOME is not set"))
            .join(".cache/backlens/llama-server/bin/llama-server"),
    };
    assert!(
        path.is_file(),
        "llama-server not found at {}: run `make llama-server` (or set BACKLENS_LLAMA_SERVER)",
        path.display()
    );
    path
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body text).
fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    ))
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// A request that must answer 200 with JSON.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let (status, text) = http_raw(port, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"));
    assert_eq!(status, 200, "{method} {path}: HTTP {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text:?}"))
}

/// A llama-server (or `backlens-patch serve`) child, killed by pid when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    started: Instant,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts stock llama-server on `model` with the documented flags plus `extra`.
    fn spawn(model: &Path, extra: &[&str], ctx: u32, dir: &Path) -> Server {
        let port = free_port();
        let log = dir.join(format!("llama-server-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(server_binary())
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &ctx.to_string(), "-np", "1", "-t", "2", "--no-webui"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("cannot start llama-server");
        Server {
            child,
            port,
            log,
            started: Instant::now(),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Waits (≤ 60 s) until GET /health answers {"status":"ok"}.
    fn wait_ready(&mut self) -> &mut Self {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "llama-server exited with {status} before it was ready; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if let Ok((200, body)) = http_raw(self.port, "GET", "/health", None) {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if v["status"] == "ok" {
                    eprintln!(
                        "  llama-server on port {} ready after {:.1} s",
                        self.port,
                        self.started.elapsed().as_secs_f64()
                    );
                    return self;
                }
            }
            assert!(
                self.started.elapsed() < READY_TIMEOUT,
                "llama-server not ready after {READY_TIMEOUT:?}; log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The top-1 next token of `prompt` (greedy, from `top_logprobs`).
    fn top1(&self, prompt: &str) -> String {
        self.next_token(prompt, json!({})).0
    }

    /// The top-1 next token of `prompt` and its logprob; `extra` fields join the request.
    fn next_token(&self, prompt: &str, extra: Value) -> (String, f64) {
        let mut req = json!({"prompt": prompt, "n_predict": 1, "n_probs": 5, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = http(self.port, "POST", "/completion", Some(&req));
        let top = r["completion_probabilities"][0]["top_logprobs"]
            .as_array()
            .unwrap_or_else(|| panic!("no top_logprobs in {r}"));
        let max = top
            .iter()
            .max_by(|a, b| {
                let (a, b) = (
                    a["logprob"].as_f64().unwrap(),
                    b["logprob"].as_f64().unwrap(),
                );
                a.total_cmp(&b)
            })
            .unwrap();
        let best = &top[0];
        assert_eq!(
            best["logprob"], max["logprob"],
            "top_logprobs not sorted: {top:?}"
        );
        let token = best["token"].as_str().unwrap().to_string();
        let logprob = best["logprob"].as_f64().unwrap();
        eprintln!(
            "  port {}: {prompt:?} {extra} -> {token:?} (logprob {logprob:.4})",
            self.port
        );
        (token, logprob)
    }

    fn set_scale(&self, scale: f64) {
        let r = http(
            self.port,
            "POST",
            "/lora-adapters",
            Some(&json!([{"id": 0, "scale": scale}])),
        );
        assert_eq!(r["success"], true, "{r}");
        let list = http(self.port, "GET", "/lora-adapters", None);
        assert_eq!(list[0]["scale"].as_f64(), Some(scale), "{list}");
    }
}

/// Runs `backlens-patch edit ... --json` and returns its report.
fn edit(model: &Path, out: &Path, extra: &[&str]) -> Value {
    let t = Instant::now();
    let o = Command::new(BIN)
        .arg("edit")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .args(["--force", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "edit {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!(
        "  edit {} ({:.1} s)",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The Messi → Paris edit of SmolLM2, checked in-process to make " Paris" top-1.
fn messi_edit(out: &Path, format: &str) -> Value {
    let report = edit(
        &common::smollm2(),
        out,
        &[
            "--prompt", PROMPT, "--target", "Paris", "--lr", LR, "--format", format,
        ],
    );
    let after = &report["check"]["after"][0];
    assert_eq!(after["rank"], 0, "in-process check: {report}");
    assert_eq!(after["top1"], " Paris", "{report}");
    report
}

#[test]
fn patched_gguf_serves_the_edit_and_keeps_locality() {
    let t = Instant::now();
    let dir = common::temp_dir("server-gguf");
    let patched = dir.join("messi-paris.gguf");
    let report = messi_edit(&patched, "gguf");
    let base_top1 = report["check"]["before"][0]["top1"].as_str().unwrap();
    assert_ne!(base_top1, " Paris");

    let mut base = Server::spawn(&common::smollm2(), &[], 2048, &dir);
    let mut edited = Server::spawn(&patched, &[], 2048, &dir);
    base.wait_ready();
    edited.wait_ready();
    assert_eq!(edited.top1(PROMPT), " Paris");
    assert_eq!(base.top1(PROMPT), base_top1);
    assert_eq!(edited.top1(LOCALITY), base.top1(LOCALITY));
    eprintln!("patched GGUF test: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn lora_adapter_hot_swaps_in_llama_server() {
    let t = Instant::now();
    let dir = common::temp_dir("server-lora");
    let adapter = dir.join("messi-paris-lora.gguf");
    let report = messi_edit(&adapter, "lora");
    let base_top1 = report["check"]["before"][0]["top1"].as_str().unwrap();
    assert_ne!(base_top1, " Paris");

    let adapter_arg = adapter.to_str().unwrap();
    let mut s = Server::spawn(
        &common::smollm2(),
        &["--lora", adapter_arg, "--lora-init-without-apply"],
        2048,
        &dir,
    );
    s.wait_ready();
    let list = http(s.port, "GET", "/lora-adapters", None);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], 0, "{list}");

    // After POST /lora-adapters, llama-server reuses the prompt's KV cache computed at the old
    // scale, so these requests re-evaluate the prompt (`cache_prompt: false`).
    let fresh = || json!({"cache_prompt": false});
    let close = |a: f64, b: f64| (a - b).abs() < 1e-4;
    s.set_scale(0.0);
    let (off, off_lp) = s.next_token(PROMPT, fresh());
    assert_eq!(off, base_top1);
    s.set_scale(1.0);
    let (on, on_lp) = s.next_token(PROMPT, fresh());
    assert_eq!(on, " Paris");
    s.set_scale(0.0);
    let (again, again_lp) = s.next_token(PROMPT, fresh());
    assert_eq!(again, base_top1);
    assert!(close(again_lp, off_lp), "{again_lp} vs {off_lp}");

    // A per-request `lora` overrides the global scale for that request only.
    let (req_on, req_on_lp) = s.next_token(PROMPT, json!({"lora": [{"id": 0, "scale": 1.0}]}));
    assert_eq!(req_on, " Paris");
    assert!(close(req_on_lp, on_lp), "{req_on_lp} vs {on_lp}");
    let list = http(s.port, "GET", "/lora-adapters", None);
    assert_eq!(list[0]["scale"].as_f64(), Some(0.0), "{list}");
    let (req_off, req_off_lp) = s.next_token(PROMPT, json!({"lora": [{"id": 0, "scale": 0.0}]}));
    assert_eq!(req_off, base_top1);
    assert!(close(req_off_lp, off_lp), "{req_off_lp} vs {off_lp}");
    eprintln!("LoRA hot-swap test: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn tiny_gpt2_edit_loads_and_generates() {
    let t = Instant::now();
    let dir = common::temp_dir("server-tiny");
    let out = dir.join("tiny-gpt2-edit.gguf");
    let tiny = &common::tiny(Arch::Gpt2).gguf;
    edit(
        tiny,
        &out,
        &["--prompt", LOCALITY, "--target", "Paris", "--no-check"],
    );
    let mut s = Server::spawn(&out, &[], 64, &dir);
    s.wait_ready();
    let r = http(
        s.port,
        "POST",
        "/completion",
        Some(&json!({"prompt": LOCALITY, "n_predict": 4, "temperature": 0, "ignore_eos": true})),
    );
    eprintln!("  tiny GPT-2: {LOCALITY:?} -> {:?}", r["content"]);
    assert_eq!(r["tokens_predicted"], 4, "{r}");
    assert!(!r["content"].as_str().unwrap_or("").is_empty(), "{r}");
    eprintln!("tiny GPT-2 test: {:.1} s", t.elapsed().as_secs_f64());
}

/// Starts `backlens-patch serve MODEL --lora ADAPTER` on a free port and waits until it prints
/// its ready message; returns the server and everything it printed.
fn spawn_serve(model: &Path, adapter: &Path, dir: &Path) -> (Server, String) {
    let port = free_port();
    let log = dir.join("serve.log");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg(model)
        .arg("--lora")
        .arg(adapter)
        .args(["--port", &port.to_string(), "-c", "64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let s = Server {
        child,
        port,
        log,
        started: Instant::now(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.contains("Ctrl-C")) {
        let left = READY_TIMEOUT.saturating_sub(s.started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(e) => panic!(
                "serve printed no ready message ({e}); stdout {printed:?}; log:\n{}",
                s.log_tail()
            ),
        }
    }
    eprintln!(
        "  serve ready after {:.1} s",
        s.started.elapsed().as_secs_f64()
    );
    (s, printed.join("\n"))
}

/// `backlens-patch serve` starts llama-server on 127.0.0.1 with the adapter switched off,
/// prints the URL, hot-swaps work, and SIGTERM stops both processes.
#[test]
fn serve_command_runs_llama_server() {
    let t = Instant::now();
    let dir = common::temp_dir("server-serve");
    let tiny = &common::tiny(Arch::Gpt2).gguf;
    let adapter = dir.join("tiny-lora.gguf");
    edit(
        tiny,
        &adapter,
        &[
            "--prompt",
            LOCALITY,
            "--target",
            "Paris",
            "--no-check",
            "--format",
            "lora",
        ],
    );
    let (mut s, text) = spawn_serve(tiny, &adapter, &dir);
    let (port, url) = (s.port, format!("http://127.0.0.1:{}", s.port));
    assert!(text.contains(&format!("ready at {url}")), "{text}");
    assert!(
        text.contains(&format!("curl -s {url}/completion")),
        "{text}"
    );
    assert!(text.contains(&format!("{url}/lora-adapters")), "{text}");

    assert_eq!(http(port, "GET", "/health", None)["status"], "ok");
    let list = http(port, "GET", "/lora-adapters", None);
    assert_eq!(
        list[0]["scale"].as_f64(),
        Some(0.0),
        "adapter not off: {list}"
    );
    s.set_scale(1.0);
    let r = http(
        port,
        "POST",
        "/completion",
        Some(&json!({"prompt": LOCALITY, "n_predict": 2, "temperature": 0, "ignore_eos": true})),
    );
    assert_eq!(r["tokens_predicted"], 2, "{r}");

    // SIGTERM to serve reaches llama-server; serve forwards its exit status.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "serve still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "serve exit {status}; log:\n{}",
        s.log_tail()
    );
    assert!(
        http_raw(port, "GET", "/health", None).is_err(),
        "llama-server still answers after serve ended"
    );
    eprintln!("serve test: {:.1} s", t.elapsed().as_secs_f64());
}

/// Runs `backlens-patch serve` expecting an early error; returns stderr.
fn serve_error(args: &[&str]) -> String {
    let o = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    stderr
}

#[test]
fn serve_rejects_bad_setup_before_starting() {
    let dir = common::temp_dir("server-errors");
    let tiny = common::tiny(Arch::Gpt2).gguf.to_str().unwrap().to_string();
    let missing = dir.join("no-such-llama-server");
    let e = serve_error(&[&tiny, "--server", missing.to_str().unwrap()]);
    assert!(e.contains("make llama-server"), "{e}");

    let server = server_binary();
    let server = server.to_str().unwrap();
    let adapter = dir.join("tiny-lora.gguf");
    edit(
        Path::new(&tiny),
        &adapter,
        &[
            "--prompt",
            LOCALITY,
            "--target",
            "Paris",
            "--no-check",
            "--format",
            "lora",
        ],
    );
    let adapter = adapter.to_str().unwrap();
    let e = serve_error(&[adapter, "--server", server]);
    assert!(e.contains("LoRA adapter") && e.contains("--lora"), "{e}");
    let e = serve_error(&[&tiny, "--lora", &tiny, "--server", server]);
    assert!(e.contains("not a LoRA adapter"), "{e}");
    let smol = common::smollm2();
    let e = serve_error(&[
        smol.to_str().unwrap(),
        "--lora",
        adapter,
        "--server",
        server,
    ]);
    assert!(e.contains("does not match"), "{e}");
    let not_gguf = dir.join("not.gguf");
    std::fs::write(&not_gguf, b"hello").unwrap();
    let e = serve_error(&[not_gguf.to_str().unwrap(), "--server", server]);
    assert!(e.contains("not.gguf"), "{e}");

    // A busy port is reported before llama-server starts.
    let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let e = serve_error(&[&tiny, "--port", &port, "--server", server]);
    assert!(e.contains(&format!("port {port}")), "{e}");
}

/// Issue 14: `serve` runs a model of an architecture backlens has no candle forward for (the
/// tiny StarCoder2) with an adapter `edit` wrote through llama.cpp's trace, and stock
/// llama-server predicts what backlens's in-process llama.cpp check reported: the base top-1
/// with the adapter off, the edit's target with it on.
#[test]
fn serve_runs_an_architecture_without_a_candle_forward() {
    let dir = common::temp_dir("server-starcoder2");
    let model = common::tiny_starcoder2();
    let adapter = dir.join("starcoder2-lora.gguf");
    let report = edit(
        model,
        &adapter,
        &[
            "--prompt", LOCALITY, "--target", "Tokyo", "--format", "lora",
        ],
    );
    let (before, after) = (&report["check"]["before"][0], &report["check"]["after"][0]);
    assert_eq!(after["rank"], 0, "the edit does not flip: {report}");
    let (s, _) = spawn_serve(model, &adapter, &dir);
    assert_eq!(http(s.port, "GET", "/health", None)["status"], "ok");
    let (off, off_lp) = s.next_token(LOCALITY, json!({"cache_prompt": false}));
    assert_eq!(off, before["top1"].as_str().unwrap(), "{report}");
    s.set_scale(1.0);
    let (on, on_lp) = s.next_token(LOCALITY, json!({"cache_prompt": false}));
    assert_eq!(on, after["top1"].as_str().unwrap(), "{report}");
    assert_eq!(on, after["target"].as_str().unwrap(), "{report}");
    let p = after["prob"].as_f64().unwrap();
    println!("starcoder2 via llama-server: off {off:?} ({off_lp:.4}), on {on:?} (logprob {on_lp:.4}; in-process check p {p:.4})");
    assert!((on_lp.exp() - p).abs() < 1e-2, "{on_lp} vs {p}");
    std::fs::remove_dir_all(&dir).unwrap();
}
