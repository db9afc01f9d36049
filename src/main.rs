//! `uring-ckpt`: benchmark, tune, save, inspect, verify and load checkpoints from the shell.

mod cli;

use std::error::Error as _;

use clap::Parser;

fn main() {
    // Usage errors exit with 2, --help and --version with 0 (clap's convention).
    let args = cli::Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("URING_CKPT_LOG", "warn"))
        .format_timestamp(None)
        .init();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err}");
        let mut shown = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // Library errors often print their source inline already; do not repeat it.
            if !shown.contains(&text) {
                eprintln!("  caused by: {text}");
                shown.push_str(&text);
            }
            source = cause.source();
        }
        std::process::exit(1);
    }
}
