//! OpenAI-compatible LLM simulator (`llmproxy mock-llm`): the backend for tests, the demo and
//! load benchmarks.
//!
//! Owns: its listeners and worker runtimes, vLLM's wire format for chat, completions, embeddings,
//! Anthropic Messages (and its token counting), OpenAI Responses, models, health and metrics, and
//! the fault knobs (flags, overridden per request by `x-mock-*` headers), and, when asked for, an
//! engine model for routing measurements (`scheduler`: admission by arrival or priority,
//! preemption, a prefix-caching KV cache in `kv_cache`, prefill time). It must behave like vLLM
//! on the wire and stay cheap enough to be the "direct" baseline in benchmarks, so it must not
//! allocate per token, block a worker (delays are monoio timers), or parse HTTP itself (the codec
//! in `crate::http` does).

mod anthropic;
mod conn;
mod kv_cache;
mod metrics;
mod openai;
mod responses;
mod scheduler;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Simulator options (CLI flags of `llmproxy mock-llm`).
#[derive(clap::Args, Debug, Clone)]
pub struct MockOptions {
    /// Address to listen on; port 0 lets the kernel choose (see --ready-file).
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: String,
    /// Once every worker listens, write `listen ADDRESS` (the bound address) to PATH.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Worker threads, each with its own runtime and SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Served model name; repeat for several. Requests for other models get vLLM's 404.
    #[arg(long = "model", value_name = "NAME", default_value = "mock-model")]
    pub models: Vec<String>,
    /// Delay before the first token event (header `x-mock-ttft-ms`).
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Delay between token events (header `x-mock-itl-ms`).
    #[arg(long, default_value_t = 0)]
    pub itl_ms: u64,
    /// Tokens the model wants to generate; `max_tokens` below this caps it with finish "length"
    /// (header `x-mock-tokens`).
    #[arg(long, default_value_t = 16)]
    pub tokens: u64,
    /// Answer inference requests with this status and an OpenAI-shaped error (header `x-mock-status`).
    #[arg(long, value_name = "CODE")]
    pub fail_status: Option<u16>,
    /// Only the first N inference requests (process-wide) fail, with `--fail-status` (500 if unset).
    #[arg(long, value_name = "N")]
    pub fail_first: Option<u64>,
    /// Delay before the response head (header `x-mock-delay-ms`).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Stream N content tokens then close the socket without the terminating chunk; non-streaming
    /// responses send the head and half the body (header `x-mock-cut-after`).
    #[arg(long, value_name = "N")]
    pub cut_after: Option<u64>,
    /// Accept and immediately close every connection.
    #[arg(long)]
    pub refuse: bool,
    /// Length of embedding vectors.
    #[arg(long, default_value_t = 8)]
    pub embedding_dim: usize,
    /// Added to `vllm:num_requests_waiting` (which otherwise counts requests queued for
    /// `--max-running` or KV-cache room).
    #[arg(long, default_value_t = 0)]
    pub waiting: u64,
    /// Value reported as `vllm:kv_cache_usage_perc` and `vllm:gpu_cache_usage_perc` (0.0-1.0)
    /// unless `--kv-blocks` is given (then the cache's real usage).
    #[arg(long, default_value_t = 0.0)]
    pub kv_cache_usage: f64,
    /// KV-cache blocks of this instance: turns on the prefix cache (LRU, chained block hashes,
    /// `vllm:prefix_cache_queries`/`_hits`). Prompts are approximated as 4 bytes per token.
    #[arg(long, value_name = "N")]
    pub kv_blocks: Option<usize>,
    /// Tokens per KV-cache block (vLLM's `--block-size`, 16 by default on GPUs).
    #[arg(long, default_value_t = 16)]
    pub block_tokens: usize,
    /// Prefill cost of each uncached prompt token, in microseconds, paid one prompt after another;
    /// 100 (an 8B model on one GPU) when --kv-blocks or --max-running is given, else none.
    #[arg(long, value_name = "US")]
    pub prefill_us_per_token: Option<u64>,
    /// Serve https with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this PEM file (with --tls-cert).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Generations running at once; the rest wait, first come first served unless a priority
    /// flag is given (vLLM's `--max-num-seqs`). Unlimited by default.
    #[arg(long, value_name = "N")]
    pub max_running: Option<usize>,
    /// vLLM's policy: `priority` orders waiting generations by their request's `priority`,
    /// lower first, then arrival, and never preempts on arrival (vLLM V1). With `fcfs` a
    /// request with a `priority` other than 0 gets vLLM's 400.
    #[arg(long, value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// SGLang's priority scheduling: waiting generations by `priority`, higher first (see
    /// --schedule-low-priority-values-first), then arrival; a head of the queue held back by
    /// --max-running preempts the worst running generation it beats by more than
    /// --priority-scheduling-preemption-threshold (recomputed when readmitted).
    #[arg(long, conflicts_with = "scheduling_policy")]
    pub enable_priority_scheduling: bool,
    /// With --enable-priority-scheduling: lower `priority` values are more urgent.
    #[arg(long, requires = "enable_priority_scheduling")]
    pub schedule_low_priority_values_first: bool,
    /// With --enable-priority-scheduling: how much more urgent than a running generation an
    /// arriving one must be to preempt it.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        requires = "enable_priority_scheduling"
    )]
    pub priority_scheduling_preemption_threshold: i64,
}

/// `--scheduling-policy` values, vLLM's names.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulingPolicy {
    Fcfs,
    Priority,
}

impl MockOptions {
    /// Whether requests may carry a `priority` other than 0.
    fn priority_scheduling(&self) -> bool {
        self.enable_priority_scheduling || self.scheduling_policy == SchedulingPolicy::Priority
    }
}

/// State every worker reads; counters are process-wide atomics because workers share them.
struct Shared {
    opts: MockOptions,
    /// Set by `--tls-cert`: every connection starts with a TLS handshake.
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Unix seconds at start, the `created` of every model.
    started: u64,
    /// Generations past admission per model, indexed like `opts.models`.
    running: Vec<AtomicI64>,
    /// Admission, KV cache and prefill timing; None unless a scheduling flag is given.
    scheduler: Option<scheduler::Scheduler>,
    /// Inference requests still to fail under `--fail-first`.
    fail_left: AtomicU64,
    ids: AtomicU64,
    id_seed: u64,
    connections: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    streams_completed: AtomicU64,
}

impl Shared {
    fn new(opts: MockOptions, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Shared {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Shared {
            tls,
            started: now.as_secs(),
            running: opts.models.iter().map(|_| AtomicI64::new(0)).collect(),
            scheduler: scheduler::Scheduler::new(&opts),
            fail_left: AtomicU64::new(opts.fail_first.unwrap_or(0)),
            ids: AtomicU64::new(0),
            id_seed: now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32,
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            opts,
        }
    }

    /// 32 hex digits, unique per process like vLLM's `random_uuid()`.
    fn hex_id(&self) -> [u8; 32] {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let a = splitmix64(self.id_seed.wrapping_add(n));
        let b = splitmix64(a ^ n);
        let mut out = [0u8; 32];
        let bytes = (u128::from(a) << 64 | u128::from(b)).to_be_bytes();
        hex::encode_to_slice(bytes, &mut out).expect("32 digits for 16 bytes");
        out
    }

    /// The status this inference request must fail with, if any; consumes one `--fail-first` slot.
    fn forced_failure(&self, header: Option<u16>) -> Option<u16> {
        if let Some(s) = header {
            return Some(s);
        }
        match self.opts.fail_first {
            Some(_) => self
                .fail_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .ok()
                .map(|_| self.opts.fail_status.unwrap_or(500)),
            None => self.opts.fail_status,
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn run(opts: MockOptions) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let mut addr: SocketAddr =
        opts.listen.to_socket_addrs()?.next().ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "--listen resolves to no address")
        })?;
    if opts.models.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "at least one --model is needed",
        ));
    }
    if opts.block_tokens == 0 || opts.kv_blocks == Some(0) || opts.max_running == Some(0) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--block-tokens, --kv-blocks and --max-running must be positive",
        ));
    }
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => {
            let files = crate::config::ListenerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: opts.tls_client_ca.clone(),
            };
            Some(
                crate::tls::server_config(&files)
                    .map_err(|e| Error::new(ErrorKind::InvalidInput, e))?,
            )
        }
        _ => None,
    };
    let workers = opts.workers.max(1);
    let ready_file = opts.ready_file.clone();
    if let Some(path) = &ready_file {
        // A file left by an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(path);
    }
    // Workers run until the process exits, so leaking gives every connection task a plain
    // `&'static` instead of an atomic reference count per connection.
    let shared: &'static Shared = Box::leak(Box::new(Shared::new(opts, tls)));

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(0);
        }
    });

    // Workers bind one after another so that port 0 resolves once and the rest share that port.
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::Builder::new()
            .name(format!("mock-worker-{i}"))
            .spawn(move || conn::worker(addr, shared, tx))?;
        threads.push(t);
        addr = rx
            .recv()
            .map_err(|_| Error::other("worker failed to start"))??;
    }
    eprintln!("mock-llm listening on {addr}");
    if let Some(path) = &ready_file {
        crate::server::write_ready_file(path, &[("listen", addr)])
            .map_err(|e| Error::new(e.kind(), format!("ready file {}: {e}", path.display())))?;
    }
    for t in threads {
        let _ = t.join();
    }
    Err(Error::other("all workers stopped"))
}
