//! sinew-cni, the binary: environment and stdin in, one document out. The
//! work is in the library (`sinew_cni::execute`).
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let outcome = sinew_cni::execute(
        |k| std::env::var(k).ok(),
        || {
            // Read stdin unless a person runs us from a shell with nothing piped in.
            let mut stdin = Vec::new();
            if !std::io::stdin().is_terminal() {
                std::io::stdin().read_to_end(&mut stdin)?;
            }
            Ok(stdin)
        },
    );
    if let Some(doc) = outcome.stdout {
        // If stdout is gone there is nobody left to tell.
        let _ = writeln!(std::io::stdout().lock(), "{doc}");
    }
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
