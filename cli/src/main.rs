//! sinew: the Sinew command-line tool (the library is `sinew_cli`).
use clap::Parser;

fn main() {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`sinew ... | head`) instead of panicking on EPIPE.
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = sinew_cli::Cli::parse();
    if let Err(e) = sinew_cli::main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
