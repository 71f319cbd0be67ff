//! What a process must undo when it is interrupted: temporary outputs to remove and child
//! processes to end. SIGINT, SIGTERM and SIGHUP are taken by one thread ([`install`]), which
//! removes every registered path, signals every registered child, and exits with 128 + signal,
//! so that Ctrl-C during a write leaves nothing behind (SIGKILL leftovers are removed by the
//! next write to the same target; see `write::output`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread it starts later) and
/// starts the thread that handles them. Call once, first thing in `main`, before other threads.
pub fn install() {
    // SAFETY: plain libc signal-mask calls on a zero-initialized set owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set; sigwait writes the signal number into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let children = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
        remove_all();
        if children.is_empty() {
            std::process::exit(128 + sig);
        }
        for &pid in &children {
            // SAFETY: signals only processes this one started and registered.
            unsafe { libc::kill(pid, sig) };
        }
        // The thread that started the children reaps them and exits with their status (serve
        // ends as llama-server did); only if they outlive a few seconds does this one exit.
        std::thread::sleep(std::time::Duration::from_secs(5));
        std::process::exit(128 + sig);
    });
}

/// Unblocks the signals [`install`] blocks. For the child side of a fork before exec (a blocked
/// mask survives exec, and a child such as llama-server must see SIGINT/SIGTERM); only
/// async-signal-safe calls.
pub fn unblock_in_child() {
    // SAFETY: sigemptyset/sigaddset on a local set and pthread_sigmask are async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Removes every registered path (files, or folders this process created).
fn remove_all() {
    let paths = PATHS.lock().map(|p| p.clone()).unwrap_or_default();
    for p in paths.iter().rev() {
        match p.is_dir() {
            true => {
                let _ = std::fs::remove_dir_all(p);
            }
            false => {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Registers a temporary path this process created, to be removed on a signal.
pub fn register_path(path: &Path) {
    if let Ok(mut p) = PATHS.lock() {
        p.push(path.to_path_buf());
    }
}

/// Forgets a registered path (it was committed or removed).
pub fn forget_path(path: &Path) {
    if let Ok(mut p) = PATHS.lock() {
        p.retain(|q| q != path);
    }
}

/// Registers a child process to receive the same signal when this one is interrupted.
pub fn register_child(pid: libc::pid_t) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}
