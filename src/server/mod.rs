//! Server: one OS thread per worker, each with its own monoio runtime (io_uring, or epoll where
//! io_uring is refused), its own `SO_REUSEPORT` listener and its own [`proxy::Context`]. The kernel
//! spreads connections across the listeners; workers share nothing mutable on the request path.
//!
//! Also owns process lifecycle: signals, graceful drain, exit. It must not handle requests itself.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use monoio::net::{ListenerOpts, TcpListener};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::auth::Auth;
use crate::config::{Config, IoDriver};
use crate::limits::{LimitSet, RedisRates};
use crate::proxy::{self, Context};
use crate::upstream::{Backends, WorkerUpstreams};

/// Submission queue size per worker: enough for thousands of concurrent streams per core.
const URING_ENTRIES: u32 = 8192;
/// How often an accepting worker looks at the shutdown flag and sweeps its pools.
const TICK: Duration = Duration::from_millis(50);

/// Runs the gateway until SIGTERM/SIGINT, then drains and returns.
pub fn run(config: Config) -> io::Result<()> {
    let config = Arc::new(config);
    let shutdown = Arc::new(AtomicBool::new(false));
    install_signal_handler(shutdown.clone())?;
    let backends = Backends::new(&config);
    let auth = Auth::new(&config)?;
    let global = LimitSet::new(&config.rate_limit.global, "global".into());
    let global_limits = (!global.is_empty()).then(|| Arc::new(global));
    let shared_rates = match &config.rate_limit.redis {
        Some(r) => Some(Arc::new(RedisRates::start(&r.url.0, &r.prefix, 4)?)),
        None => None,
    };

    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<&'static str>>();
    let mut threads = Vec::with_capacity(config.workers);
    for worker in 0..config.workers {
        let (config, shutdown, backends, ready) = (
            config.clone(),
            shutdown.clone(),
            backends.clone(),
            ready_tx.clone(),
        );
        let shared = Shared {
            auth: auth.clone(),
            global_limits: global_limits.clone(),
            shared_rates: shared_rates.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("llmproxy-w{worker}"))
            .spawn(move || {
                if config.cpu_affinity {
                    pin_to_cpu(worker);
                }
                let result = run_on_driver(config.io_driver, |driver| {
                    worker_main(worker, driver, config, shutdown, backends, shared, ready)
                });
                if let Err(e) = result {
                    tracing::error!(worker, "worker runtime failed: {e}");
                }
            })?;
        threads.push(handle);
    }
    drop(ready_tx);

    let mut driver = "";
    for _ in 0..config.workers {
        match ready_rx.recv() {
            Ok(Ok(d)) => driver = d,
            Ok(Err(e)) => {
                shutdown.store(true, Ordering::SeqCst);
                for t in threads {
                    let _ = t.join();
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", config.listen),
                ));
            }
            Err(_) => return Err(io::Error::other("a worker exited during start-up")),
        }
    }
    tracing::info!(listen = %config.listen, workers = config.workers, io_driver = driver, backends = config.backends.len(), "llmproxy ready");

    for t in threads {
        let _ = t.join();
    }
    tracing::info!("llmproxy stopped");
    Ok(())
}

/// Builds the runtime for the configured driver and runs `main` on it. `auto` uses io_uring when
/// the kernel (and any seccomp profile) allows it, else epoll; container runtimes often deny it.
fn run_on_driver<M, F>(choice: IoDriver, main: M) -> io::Result<()>
where
    M: FnOnce(&'static str) -> F,
    F: Future<Output = ()>,
{
    let uring = match choice {
        IoDriver::IoUring => true,
        IoDriver::Epoll => false,
        IoDriver::Auto => monoio::utils::detect_uring(),
    };
    if uring {
        match RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => {
                rt.block_on(main("io_uring"));
                return Ok(());
            }
            Err(e) if choice == IoDriver::IoUring => return Err(e),
            Err(e) => tracing::warn!("io_uring unavailable ({e}); using epoll"),
        }
    }
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(main("epoll"));
    Ok(())
}

/// State built once and shared by every worker (auth keys, quota, global limits).
struct Shared {
    auth: Option<Arc<Auth>>,
    global_limits: Option<Arc<LimitSet>>,
    shared_rates: Option<Arc<RedisRates>>,
}

async fn worker_main(
    worker: usize,
    driver: &'static str,
    config: Arc<Config>,
    shutdown: Arc<AtomicBool>,
    backends: Arc<Backends>,
    shared: Shared,
    ready: mpsc::Sender<io::Result<&'static str>>,
) {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    let listener = match TcpListener::bind_with_config(config.listen, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let lua = match shared
        .auth
        .as_ref()
        .and_then(|a| a.lua_policy())
        .transpose()
    {
        Ok(lua) => lua,
        Err(e) => {
            let _ = ready.send(Err(io::Error::other(format!("lua policy: {e}"))));
            return;
        }
    };
    tracing::debug!(worker, driver, "worker listening");
    let _ = ready.send(Ok(driver));
    let upstreams = WorkerUpstreams::new(backends, &config);
    let mut ctx = Context::new(config.clone(), upstreams, shutdown.clone(), worker);
    ctx.auth = shared.auth;
    ctx.lua = lua;
    ctx.global_limits = shared.global_limits;
    ctx.shared_rates = shared.shared_rates;
    let ctx = Rc::new(ctx);

    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    monoio::spawn(proxy::serve_connection(ctx.clone(), stream, peer));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(worker, "accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };
    let housekeeping = async {
        let mut ticks = 0u32;
        while !shutdown.load(Ordering::Relaxed) {
            monoio::time::sleep(TICK).await;
            ticks = ticks.wrapping_add(1);
            if ticks % 20 == 0 {
                ctx.upstreams.sweep_idle();
            }
        }
    };
    monoio::select! {
        _ = accept => {},
        _ = housekeeping => {},
    }
    drop(listener);

    // Drain: running requests and streams finish; idle keep-alive connections close when the
    // runtime drops them.
    let deadline = Instant::now() + config.shutdown_timeout;
    while ctx.active_requests() > 0 && Instant::now() < deadline {
        monoio::time::sleep(proxy::DRAIN_POLL).await;
    }
    if ctx.active_requests() > 0 {
        tracing::warn!(
            worker,
            cut = ctx.active_requests(),
            "shutdown_timeout reached; closing running requests"
        );
    }
}

/// First SIGTERM/SIGINT starts the drain; a second one exits at once.
fn install_signal_handler(shutdown: Arc<AtomicBool>) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("llmproxy-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if shutdown.swap(true, Ordering::SeqCst) {
                    tracing::warn!(signal = sig, "second signal: exiting without draining");
                    std::process::exit(1);
                }
                tracing::info!(
                    signal = sig,
                    "shutting down: no new connections, draining running requests"
                );
            }
        })?;
    Ok(())
}

fn pin_to_cpu(worker: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(worker % cpus, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(worker, "CPU pinning failed: {}", io::Error::last_os_error());
        }
    }
}
