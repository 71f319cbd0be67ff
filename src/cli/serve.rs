//! `serve`: run the stock llama.cpp `llama-server` on a GGUF model and optional LoRA adapters,
//! bound to 127.0.0.1 only. Adapters start switched off (scale 0) and are switched on and off
//! with `POST /lora-adapters`.

use anyhow::{bail, Context, Result};
use backlens::lora;
use backlens::provenance::Provenance;
use backlens::weights::gguf::GgufFile;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Environment variable naming the llama-server binary.
const SERVER_ENV: &str = "BACKLENS_LLAMA_SERVER";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model (a base model or a patched GGUF written by `edit`).
    model: PathBuf,
    /// LoRA adapter GGUF (repeatable). Loaded switched off (scale 0); switch it on with POST /lora-adapters.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The llama-server binary [default: $BACKLENS_LLAMA_SERVER, else ~/.cache/backlens/llama-server/bin/llama-server].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Context size in tokens.
    #[arg(short = 'c', long, default_value_t = 2048)]
    ctx_size: u32,
    /// CPU threads.
    #[arg(short = 't', long, default_value_t = 2)]
    threads: u32,
}

/// The llama-server binary: `--server`, else `$BACKLENS_LLAMA_SERVER`, else the path that
/// `make llama-server` installs to.
fn find_server(flag: Option<&Path>) -> Result<PathBuf> {
    let (path, origin) = match (flag, std::env::var_os(SERVER_ENV)) {
        (Some(p), _) => (p.to_path_buf(), "--server"),
        (None, Some(p)) if !p.is_empty() => (PathBuf::from(p), SERVER_ENV),
        _ => {
            let home = std::env::var_os("HOME").context("HOME is not set; pass --server PATH")?;
            (
                Path::new(&home).join(".cache/backlens/llama-server/bin/llama-server"),
                "default path",
            )
        }
    };
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
        Ok(_) => bail!(
            "{} ({origin}) is not an executable file: run `make llama-server` to build llama-server, or pass --server PATH",
            path.display()
        ),
        Err(e) => bail!(
            "llama-server not found at {} ({origin}: {e}): run `make llama-server` to build it, or pass --server PATH",
            path.display()
        ),
    }
}

fn open_gguf(path: &Path) -> Result<GgufFile> {
    let shown = path.display().to_string();
    GgufFile::open(path).map_err(|e| match e.to_string() {
        msg if msg.contains(&shown) => anyhow::anyhow!(msg),
        msg => anyhow::anyhow!("{shown}: {msg}"),
    })
}

/// Checks that `model` is a GGUF model and every adapter a LoRA GGUF that llama.cpp will load
/// against it ([`lora::validate`]). Returns the first edited prompt recorded in their
/// provenance, for the curl example.
fn validate(model: &Path, adapters: &[PathBuf]) -> Result<Option<String>> {
    let m = open_gguf(model)?;
    if lora::looks_like_adapter(&m) {
        bail!(
            "{}: this is a LoRA adapter, not a model; serve the base model and pass the adapter with --lora",
            model.display()
        );
    }
    if m.get_str("general.architecture").is_err() {
        bail!(
            "{}: no general.architecture string: not a model GGUF",
            model.display()
        );
    }
    let mut prompt = edited_prompt(&m);
    for a in adapters {
        let g = open_gguf(a)?;
        lora::validate(&m, &g)?;
        prompt = prompt.or_else(|| edited_prompt(&g));
    }
    Ok(prompt)
}

/// The first prompt in the file's edit provenance, if any.
fn edited_prompt(g: &GgufFile) -> Option<String> {
    Provenance::edits_of(g).into_iter().next().map(|e| e.prompt)
}

/// Binds 127.0.0.1:`port` once to report a busy port clearly (0: pick a free port).
fn free_port(port: u16) -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).with_context(|| {
        format!("port {port} on 127.0.0.1 is not available; pick another with --port")
    })?;
    Ok(l.local_addr()?.port())
}

/// One HTTP/1.1 request to 127.0.0.1 with `Connection: close`; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// `text` quoted for a POSIX shell in single quotes.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Waits for /health, switches adapters off, then prints the URL and curl examples.
fn announce(port: u16, model: &Path, adapters: &[PathBuf], prompt: &str) {
    let url = format!("http://127.0.0.1:{port}");
    loop {
        match http(port, "GET", "/health", "") {
            Ok((200, _)) => break,
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    // llama-server applies every --lora adapter at its scale (1.0) even with
    // --lora-init-without-apply, so switch them off explicitly before announcing.
    if !adapters.is_empty() {
        let off: Vec<serde_json::Value> = (0..adapters.len())
            .map(|id| serde_json::json!({"id": id, "scale": 0.0}))
            .collect();
        let body = serde_json::Value::Array(off).to_string();
        match http(port, "POST", "/lora-adapters", &body) {
            Ok((200, _)) => {}
            other => eprintln!("warning: could not switch the adapters off: {other:?}"),
        }
    }
    let completion = format!(
        r#"{{"prompt": {}, "n_predict": 8, "n_probs": 5, "temperature": 0}}"#,
        serde_json::Value::from(prompt)
    );
    let mut out = format!(
        "\nllama-server ready at {url} (model {})\n\ncomplete a prompt:\n  curl -s {url}/completion -d {}\n",
        model.display(),
        shell_quote(&completion)
    );
    if !adapters.is_empty() {
        out.push_str("\nadapters (all switched off, scale 0):\n");
        for (id, a) in adapters.iter().enumerate() {
            out.push_str(&format!("  id {id}: {}\n", a.display()));
        }
        out.push_str(&format!(
            "\nswitch adapter 0 on / off:\n  curl -s {url}/lora-adapters -d '[{{\"id\": 0, \"scale\": 1.0}}]'\n  \
             curl -s {url}/lora-adapters -d '[{{\"id\": 0, \"scale\": 0.0}}]'\nlist adapters:\n  curl -s {url}/lora-adapters\n\
             after a switch, send \"cache_prompt\": false with a repeated prompt (llama-server would reuse its KV cache \
             computed at the old scale), or choose per request: \"lora\": [{{\"id\": 0, \"scale\": 1.0}}]\n"
        ));
    }
    out.push_str("\nCtrl-C stops the server.\n");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

pub fn run(args: Args) -> Result<()> {
    let server = find_server(args.server.as_deref())?;
    let prompt = validate(&args.model, &args.lora)?
        .unwrap_or_else(|| "The capital of France is".to_string());
    let port = free_port(args.port)?;
    let mut cmd = Command::new(&server);
    cmd.arg("-m")
        .arg(&args.model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", &args.ctx_size.to_string(), "-np", "1"])
        .args(["-t", &args.threads.to_string(), "--no-webui"]);
    for a in &args.lora {
        cmd.arg("--lora").arg(a).arg("--lora-init-without-apply");
    }
    // Own process group, so a terminal's Ctrl-C reaches llama-server once (forwarded by us),
    // and no stdin: the server never reads it.
    cmd.stdin(Stdio::null()).process_group(0);
    // SAFETY: only prctl(2) and pthread_sigmask(3), both async-signal-safe, run between fork and
    // exec.
    #[cfg(target_os = "linux")]
    unsafe {
        // If backlens-patch dies, the server goes with it.
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            backlens::cleanup::unblock_in_child();
            Ok(())
        });
    }
    eprintln!(
        "starting {} on http://127.0.0.1:{port} (waiting for the model to load)",
        server.display()
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    // Ctrl-C (and SIGTERM, SIGHUP) reach backlens's signal thread, which passes them on.
    backlens::cleanup::register_child(child.id() as libc::pid_t);
    let (model, adapters) = (args.model.clone(), args.lora.clone());
    std::thread::spawn(move || announce(port, &model, &adapters, &prompt));
    let status = child.wait().context("waiting for llama-server")?;
    let _ = std::io::stdout().flush();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => {
            eprintln!("llama-server exited with status {code}");
            std::process::exit(code)
        }
        (None, Some(sig)) => {
            eprintln!("llama-server was killed by signal {sig}");
            std::process::exit(128 + sig)
        }
        (None, None) => bail!("llama-server ended with {status}"),
    }
}
