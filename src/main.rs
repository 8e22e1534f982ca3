//! The `llmproxy` command: serve, check a config, run the simulator, or the demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llmproxy", version, about = "Thread-per-core gateway for OpenAI-compatible inference servers")]
struct Cli {
    /// Config file (YAML or TOML, by extension); runs the gateway when no subcommand is given.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Validate a config file and report every error with its key path.
    Check,
    /// Run the OpenAI-compatible simulator used by tests, the demo and benchmarks.
    MockLlm(llmproxy::mock::MockOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MockLlm(opts)) => match llmproxy::mock::run(opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mock-llm: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            let _ = cli.config;
            ExitCode::FAILURE
        }
    }
}
