//! `backlens-patch`: the command-line face of the backlens library.
//! Exit codes: 0 success, 2 any error (printed as one line on stderr).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
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
