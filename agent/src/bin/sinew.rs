//! sinew: the Sinew command-line tool.
use clap::Parser;

fn main() {
    let cli = sinew_agent::cli::Cli::parse();
    if let Err(e) = sinew_agent::cli::main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
