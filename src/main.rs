//! The `llmproxy` command: serve, check a config, run the simulator, or the demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmproxy::config::{self, Config, LogFormat};
use llmproxy::logging;
use llmproxy::server::Reload;

#[derive(Parser)]
#[command(
    name = "llmproxy",
    version,
    about = "Thread-per-core gateway for OpenAI-compatible inference servers",
    after_help = "Without a subcommand, `llmproxy --config FILE` runs the gateway (same as `serve`)."
)]
struct Cli {
    /// Config file, YAML (.yaml/.yml) or TOML (.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with --config FILE.
    Serve,
    /// Validate --config FILE and report every error with its key path; exits 1 on errors.
    Check,
    /// Run the OpenAI-compatible simulator (vLLM-like wire format) used by tests, demo and benchmarks.
    MockLlm(llmproxy::mock::MockOptions),
    /// Start the simulator and the gateway together with a built-in config, and print what to try.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MockLlm(opts)) => {
            let _log = logging::init("info", LogFormat::Text);
            exit(llmproxy::mock::run(opts).map_err(|e| format!("mock-llm: {e}")))
        }
        Some(Command::Check) => exit(check(cli.config.as_deref())),
        Some(Command::Demo) => exit(demo()),
        Some(Command::Serve) | None => exit(serve(cli.config.as_deref())),
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    let path = path.ok_or("missing --config FILE (see `llmproxy --help`)")?;
    config::load(path).map_err(|e| e.to_string())
}

fn check(path: Option<&Path>) -> Result<(), String> {
    let cfg = load(path)?;
    println!(
        "{}: ok ({} backend(s), listen {}, {} worker(s))",
        path.map(|p| p.display().to_string()).unwrap_or_default(),
        cfg.backends.len(),
        cfg.listen,
        cfg.workers
    );
    Ok(())
}

fn serve(path: Option<&Path>) -> Result<(), String> {
    let cfg = load(path)?;
    let (set_log_level, _flush) = logging::init(&cfg.log.level, cfg.log.format);
    let reload = Reload {
        config_path: path.map(Path::to_path_buf),
        set_log_level,
    };
    llmproxy::server::run(cfg, reload).map_err(|e| format!("llmproxy: {e}"))
}

fn demo() -> Result<(), String> {
    let cfg =
        config::parse(config::DEMO_CONFIG, config::Format::Yaml).map_err(|e| e.to_string())?;
    let (set_log_level, _flush) = logging::init(&cfg.log.level, cfg.log.format);
    let backend = cfg.backends[0].host_header.clone();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut sim = std::process::Command::new(exe)
        .args([
            "mock-llm",
            "--listen",
            &backend,
            "--ttft-ms",
            "150",
            "--itl-ms",
            "40",
            "--tokens",
            "24",
        ])
        .spawn()
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let base = format!("http://{}", cfg.listen);
    println!(
        "\nllmproxy demo: gateway on {base}, simulator on http://{backend} (Ctrl-C stops both)\n\n\
         Try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
         -d '{{\"model\":\"mock-model\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true}}'\n\n  \
         python3 -c \"from openai import OpenAI; c=OpenAI(base_url='{base}/v1', api_key='demo'); \
         print(c.chat.completions.create(model='mock-model', messages=[{{'role':'user','content':'Hello'}}]).choices[0].message.content)\"\n"
    );
    let reload = Reload {
        config_path: None,
        set_log_level,
    };
    let result = llmproxy::server::run(cfg, reload).map_err(|e| format!("llmproxy: {e}"));
    let _ = sim.kill();
    let _ = sim.wait();
    result
}
