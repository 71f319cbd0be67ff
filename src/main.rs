//! `backlens-patch`: the command-line face of the backlens library.
//! Exit codes: 0 success, 2 any error (printed as one line on stderr).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A file-size limit (`ulimit -f`) must surface as a write error, so that the partial output is
    // removed and one error line is printed, instead of killing the process with SIGXFSZ.
    // Output piped into `head` ends the process quietly, as for other Unix tools.
    // SAFETY: setting signal dispositions before any threads start.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Ctrl-C or SIGTERM during a write removes the partial output (and ends a served child).
    backlens::cleanup::install();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("error: {e:#}");
            line.retain(|c| c != '\n');
            eprintln!("{line}");
            ExitCode::from(2)
        }
    }
}
