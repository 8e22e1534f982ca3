//! The `llmproxy` command: serve, check a config, run the simulator, the demo, or print usage
//! totals from the spool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmproxy::config::{self, Config, LogConfig};
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
    /// Options of the gateway when it runs without the `serve` subcommand.
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with --config FILE.
    Serve(ServeArgs),
    /// Validate --config FILE and report every error with its key path; exits 1 on errors.
    Check,
    /// Run the OpenAI-compatible simulator (vLLM-like wire format) used by tests, demo and benchmarks.
    MockLlm(Box<llmproxy::mock::MockOptions>),
    /// Start the simulator and the gateway together with a built-in config, and print what to try.
    Demo,
    /// Print token totals from the usage spool (records still within `usage_hook.retention`).
    Usage(UsageArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Once every worker listens, write `listen ADDRESS` (and `admin ADDRESS` when the admin API
    /// is on) to PATH, one line each: the bound addresses, so `listen: 127.0.0.1:0` is usable.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct UsageArgs {
    /// Records spooled within this long ago, e.g. 24h, 30m, 7d.
    #[arg(long, default_value = "24h")]
    since: String,
    /// One line per key name or per model.
    #[arg(long, value_enum)]
    by: Option<By>,
    /// The spool file; default: `usage_hook.spool_path` from --config, else ./data/usage.db.
    #[arg(long)]
    spool: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum By {
    Key,
    Model,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MockLlm(opts)) => {
            let _log = logging::init(&LogConfig::default());
            exit(llmproxy::mock::run(*opts).map_err(|e| format!("mock-llm: {e}")))
        }
        Some(Command::Check) => exit(check(cli.config.as_deref())),
        Some(Command::Demo) => exit(demo()),
        Some(Command::Usage(args)) => exit(usage(cli.config.as_deref(), args)),
        Some(Command::Serve(args)) => {
            let ready_file = args.ready_file.or(cli.serve.ready_file);
            exit(serve(cli.config.as_deref(), ready_file.as_deref()))
        }
        None => exit(serve(
            cli.config.as_deref(),
            cli.serve.ready_file.as_deref(),
        )),
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
    // The certificate files are part of what must work at start.
    if let Some(tls) = &cfg.tls {
        llmproxy::tls::server_config(tls)?;
    }
    println!(
        "{}: ok ({} backend(s), listen {}, {} worker(s))",
        path.map(|p| p.display().to_string()).unwrap_or_default(),
        cfg.backends.len(),
        cfg.listen,
        cfg.workers
    );
    Ok(())
}

fn serve(path: Option<&Path>, ready_file: Option<&Path>) -> Result<(), String> {
    let cfg = load(path)?;
    let (set_log_level, _flush) = logging::init(&cfg.log).map_err(|e| format!("llmproxy: {e}"))?;
    let reload = Reload {
        config_path: path.map(Path::to_path_buf),
        set_log_level,
    };
    llmproxy::server::run(cfg, reload, ready_file).map_err(|e| format!("llmproxy: {e}"))
}

fn usage(config: Option<&Path>, args: UsageArgs) -> Result<(), String> {
    use llmproxy::usage::spool::{self, GroupBy, Spool};
    let since = config::parse_duration(&args.since).map_err(|e| format!("--since: {e}"))?;
    let path = match (args.spool, config) {
        (Some(path), _) => path,
        (None, Some(_)) => load(config)?.usage_hook.spool_path,
        (None, None) => PathBuf::from("./data/usage.db"),
    };
    if !path.exists() {
        return Err(format!("no usage spool at {}", path.display()));
    }
    let spool = Spool::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let since_ms = spool::now_ms() - since.as_millis() as i64;
    let by = args.by.map(|b| match b {
        By::Key => GroupBy::Key,
        By::Model => GroupBy::Model,
    });
    let rows = spool
        .totals(since_ms, i64::MAX, by)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let label = match args.by {
        Some(By::Key) => "KEY",
        Some(By::Model) => "MODEL",
        None => "",
    };
    if rows.is_empty() {
        println!("no usage records spooled in the last {}", args.since);
        return Ok(());
    }
    println!(
        "{label:<32} {:>10} {:>14} {:>14} {:>14} {:>10}",
        "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "ESTIMATED"
    );
    let mut sum = [0u64; 5];
    for t in &rows {
        let group = if by.is_none() {
            "all"
        } else {
            t.group.as_str()
        };
        println!(
            "{group:<32} {:>10} {:>14} {:>14} {:>14} {:>10}",
            t.requests, t.prompt_tokens, t.completion_tokens, t.total_tokens, t.estimated
        );
        for (s, v) in sum.iter_mut().zip([
            t.requests,
            t.prompt_tokens,
            t.completion_tokens,
            t.total_tokens,
            t.estimated,
        ]) {
            *s += v;
        }
    }
    if by.is_some() {
        println!(
            "{:<32} {:>10} {:>14} {:>14} {:>14} {:>10}",
            "TOTAL", sum[0], sum[1], sum[2], sum[3], sum[4]
        );
    }
    Ok(())
}

fn demo() -> Result<(), String> {
    let cfg =
        config::parse(config::DEMO_CONFIG, config::Format::Yaml).map_err(|e| e.to_string())?;
    let (set_log_level, _flush) = logging::init(&cfg.log).map_err(|e| format!("llmproxy: {e}"))?;
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
    let result = llmproxy::server::run(cfg, reload, None).map_err(|e| format!("llmproxy: {e}"));
    let _ = sim.kill();
    let _ = sim.wait();
    result
}
