//! Server: one OS thread per worker, each with its own monoio runtime (io_uring, or epoll where
//! io_uring is refused), its own `SO_REUSEPORT` listener and its own [`proxy::Context`]. The kernel
//! spreads connections across the listeners; workers share nothing mutable on the request path.
//!
//! Also owns process lifecycle: signals, graceful drain, exit, SIGHUP reload, and telling systemd
//! about it ([`notify`]). It must not handle requests itself.

mod admin;
mod notify;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use monoio::net::{ListenerOpts, TcpListener};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::auth::{ledger::Ledger, Auth};
use crate::config::{self, Config, IoDriver};
use crate::limits::{LimitSet, RedisRates};
use crate::live::{Live, Snapshot};
use crate::logging::{access as access_log, SetLogLevel};
use crate::metrics::Registry;
use crate::proxy::{self, Context};
use crate::upstream::{self, Backends};
use crate::usage::{self, Reporter};

/// Submission queue size per worker: enough for thousands of concurrent streams per core.
const URING_ENTRIES: u32 = 8192;
/// How long a draining worker waits for connections accepted just before the drain to send
/// their first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);
/// How often an accepting worker looks at the shutdown flag and sweeps its pools.
const TICK: Duration = Duration::from_millis(50);

/// How the running process reloads its configuration.
pub struct Reload {
    /// The file SIGHUP re-reads; `None` (a built-in config) makes SIGHUP only log.
    pub config_path: Option<PathBuf>,
    /// Applies a new `log.level`; the caller owns the log subscriber.
    pub set_log_level: SetLogLevel,
}

/// State the control threads (signals, watchdog, admin API) share with the workers.
struct Control {
    shutdown: Arc<AtomicBool>,
    live: Arc<Live>,
    /// Bumped by each worker's housekeeping tick: proof of life for the systemd watchdog.
    heartbeats: Box<[AtomicU64]>,
    /// Held for the whole of a reload, so SIGHUP and the admin API never interleave.
    reload: Mutex<Reload>,
    /// The running usage reporter; a reload that changes `usage_hook` (or turns auth on or off)
    /// starts a new one and retires this one.
    reporter: Mutex<Option<Reporter>>,
    registry: Arc<Registry>,
    /// Shared token accounting (`rate_limit.storage: redis`), made once at start: its unsent
    /// charges outlive reloads.
    ledger: Option<Arc<Ledger>>,
}

/// Runs the gateway until SIGTERM/SIGINT, then drains and returns. SIGHUP reloads the config.
/// With `ready_file`, writes the bound addresses there once every worker listens
/// ([`write_ready_file`]).
pub fn run(config: Config, reload: Reload, ready_file: Option<&Path>) -> io::Result<()> {
    if let Some(path) = ready_file {
        // A file left by an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(path);
    }
    let config = Arc::new(config);
    let ledger = config
        .rate_limit
        .redis
        .as_ref()
        .map(Ledger::start)
        .transpose()?;
    let (auth, global_limits) =
        keys_and_limits(&config, ledger.as_ref()).map_err(io::Error::other)?;
    let tls = listener_tls(&config).map_err(io::Error::other)?;
    let registry = Registry::new(config.workers);
    registry.attach_ledger(ledger.as_ref().map(|l| l.stats.clone()));
    // Started before the workers so that no request goes unmetered; on its own threads. Its
    // token charges look up the current keys in `live`, which exists only once it is built.
    let live_cell = Arc::new(OnceLock::new());
    let reporter = start_reporter(&config, auth.is_some(), live_cell.clone())?;
    registry.attach_usage(reporter.as_ref().map(|r| r.stats().clone()));
    let control = Arc::new(Control {
        shutdown: Arc::new(AtomicBool::new(false)),
        live: Live::new(Snapshot {
            config: config.clone(),
            backends: start_backends(&config).map_err(io::Error::other)?,
            auth: auth.clone(),
            global_limits,
            usage: reporter.as_ref().map(Reporter::sender),
            tls,
        }),
        heartbeats: (0..config.workers).map(|_| AtomicU64::new(0)).collect(),
        reload: Mutex::new(reload),
        reporter: Mutex::new(reporter),
        registry: registry.clone(),
        ledger: ledger.clone(),
    });
    let _ = live_cell.set(control.live.clone());
    // Built once from the start-up config: the Redis connection behind shared rates.
    let shared_rates = match &config.rate_limit.redis {
        Some(r) => Some(Arc::new(RedisRates::start(&r.url.0, &r.prefix, 4)?)),
        None => None,
    };
    let shutdown = control.shutdown.clone();
    install_signal_handler(control.clone())?;
    let admin = config
        .admin
        .enabled
        .then(|| admin::start(control.clone(), registry.clone()))
        .transpose()?;
    // Workers bind one after another: the first resolves port 0 and the others bind the port it
    // got, so that all of them share one address.
    let mut listen = config.listen;
    let mut driver = "";
    let mut threads = Vec::with_capacity(config.workers);
    for worker in 0..config.workers {
        let (ready, ready_rx) = mpsc::channel();
        let bind = Bind {
            addr: listen,
            ready,
        };
        let (config, control, registry) = (config.clone(), control.clone(), registry.clone());
        let shared = Shared {
            shared_rates: shared_rates.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("llmproxy-w{worker}"))
            .spawn(move || {
                if config.cpu_affinity {
                    pin_to_cpu(worker);
                }
                let result = run_on_driver(config.io_driver, |driver| {
                    worker_main(worker, driver, bind, config, control, registry, shared)
                });
                if let Err(e) = result {
                    tracing::error!(worker, "worker runtime failed: {e}");
                }
            })?;
        threads.push(handle);
        let failure = match ready_rx.recv() {
            Ok(Ok((d, bound))) => {
                (driver, listen) = (d, bound);
                continue;
            }
            Ok(Err(e)) => io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")),
            Err(_) => io::Error::other("a worker exited during start-up"),
        };
        return Err(stop_workers(&shutdown, threads, failure));
    }
    registry.set_io_driver(driver);
    tracing::info!(listen = %listen, workers = config.workers, io_driver = driver, backends = config.backends.len(), "llmproxy ready");
    if let Some(path) = ready_file {
        let mut listeners = vec![("listen", listen)];
        listeners.extend(admin.map(|a| ("admin", a)));
        if let Err(e) = write_ready_file(path, &listeners) {
            let e = io::Error::new(e.kind(), format!("ready file {}: {e}", path.display()));
            return Err(stop_workers(&shutdown, threads, e));
        }
    }
    notify::notify("READY=1");
    if let Some(interval) = notify::watchdog_interval() {
        start_watchdog(control.clone(), interval)?;
    }

    for t in threads {
        let _ = t.join();
    }
    // The workers' senders are gone; the running snapshot holds the last one. Dropping it closes
    // the channel, so the reporter puts what is still in it into the spool and stops.
    let (_, last) = control.live.snapshot();
    control.live.publish(Snapshot {
        config: last.config.clone(),
        backends: last.backends.clone(),
        auth: last.auth.clone(),
        global_limits: last.global_limits.clone(),
        usage: None,
        tls: last.tls.clone(),
    });
    drop(last);
    let reporter = control
        .reporter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(reporter) = reporter {
        reporter.shutdown();
    }
    // After the reporter's last charges: they go to Redis in one last round.
    if let Some(ledger) = &ledger {
        ledger.shutdown();
    }
    tracing::info!("llmproxy stopped");
    Ok(())
}

/// Stops the workers started so far and returns `error`, the reason start-up failed.
fn stop_workers(
    shutdown: &AtomicBool,
    threads: Vec<std::thread::JoinHandle<()>>,
    error: io::Error,
) -> io::Error {
    shutdown.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    error
}

/// Writes one `NAME ADDRESS` line per listener (`listen 127.0.0.1:40123`, then `admin ...` when
/// the admin API is on) to `path`. The file appears complete or not at all: it is written beside
/// `path` and renamed, so whoever waits for it never reads half an address.
pub fn write_ready_file(path: &Path, listeners: &[(&str, SocketAddr)]) -> io::Result<()> {
    let text: String = listeners
        .iter()
        .map(|(name, addr)| format!("{name} {addr}\n"))
        .collect();
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
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
        // Completions are run when the worker asks for them (it is the ring's only user), not
        // by interrupting it: the socket that becomes readable costs its sender no IPI, and a
        // busy worker takes its completions in batches. Kernels before 6.1 refuse the flags.
        let mut deferred = io_uring::IoUring::builder();
        deferred.setup_single_issuer().setup_defer_taskrun();
        let build = |urb| {
            RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(urb)
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build()
        };
        match build(deferred).or_else(|_| build(io_uring::IoUring::builder())) {
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
    shared_rates: Option<Arc<RedisRates>>,
}

/// Where a worker listens, and whom it tells its I/O driver and bound address once it does.
struct Bind {
    addr: SocketAddr,
    ready: mpsc::Sender<io::Result<(&'static str, SocketAddr)>>,
}

async fn worker_main(
    worker: usize,
    driver: &'static str,
    bind: Bind,
    config: Arc<Config>,
    control: Arc<Control>,
    registry: Arc<Registry>,
    shared: Shared,
) {
    let shutdown = &control.shutdown;
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    let Bind { addr, ready } = bind;
    let bound = TcpListener::bind_with_config(addr, &opts)
        .and_then(|l| l.local_addr().map(|addr| (l, addr)));
    let listener = match bound {
        Ok((l, addr)) => {
            tracing::debug!(worker, driver, %addr, "worker listening");
            let _ = ready.send(Ok((driver, addr)));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut ctx = Context::new(control.live.clone(), registry, shutdown.clone(), worker);
    ctx.shared_rates = shared.shared_rates;
    let ctx = Rc::new(ctx);
    monoio::spawn(access_log::flush_every_interval());
    if !config.busy_poll.is_zero() {
        if driver == "io_uring" {
            monoio::spawn(crate::busy_poll::poller(config.busy_poll));
        } else if worker == 0 {
            tracing::warn!("busy_poll needs io_uring; the epoll driver sleeps as usual");
        }
    }

    // The accept is cancelled, never dropped: a connection the kernel accepted just as the drain
    // began is still handed over and served, not closed unanswered.
    let canceller = monoio::io::Canceller::new();
    let stop_accepting = canceller.handle();
    let accept = async {
        let mut accept_errors = Throttle::default();
        let mut refusals = Throttle::default();
        loop {
            match listener.cancelable_accept(stop_accepting.clone()).await {
                Ok((stream, peer)) => {
                    let cap = ctx.current().config.max_connections as u64;
                    if ctx.open_connections() >= cap {
                        // Closed at once: past the cap, a connection would only hold a
                        // descriptor the admitted ones need.
                        ctx.metrics().connections_refused.inc();
                        drop(stream);
                        if let Some(also) = refusals.due() {
                            tracing::warn!(
                                worker,
                                max_connections = cap,
                                refused_since_last = also,
                                "connection refused: max_connections open"
                            );
                        }
                        continue;
                    }
                    monoio::spawn(proxy::serve_connection(ctx.clone(), stream, peer));
                }
                Err(_) if shutdown.load(Ordering::Relaxed) => {}
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    if let Some(also) = accept_errors.due() {
                        tracing::warn!(worker, failed_since_last = also, "accept failed: {e}");
                    }
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if shutdown.load(Ordering::Relaxed) {
                break;
            }
        }
    };
    let housekeeping = async {
        let mut ticks = 0u32;
        while !shutdown.load(Ordering::Relaxed) {
            monoio::time::sleep(TICK).await;
            ticks = ticks.wrapping_add(1);
            control.heartbeats[worker].store(u64::from(ticks), Ordering::Relaxed);
            // Also picks up a reload on an idle worker, releasing the old generation's pools.
            let gen = ctx.current();
            if ticks % 20 == 0 {
                gen.upstreams.sweep_idle();
            }
        }
        canceller.cancel();
    };
    monoio::join!(accept, housekeeping);
    drop(listener);

    // Drain: running requests and streams finish. A connection accepted just before the drain
    // gets a moment to send its first request; idle keep-alive connections close when the
    // runtime drops them.
    let started = Instant::now();
    let deadline = started + ctx.current().config.shutdown_timeout;
    let grace = started + FIRST_REQUEST_GRACE;
    while (ctx.active_requests() > 0 || (ctx.opening_connections() > 0 && Instant::now() < grace))
        && Instant::now() < deadline
    {
        monoio::time::sleep(proxy::DRAIN_POLL).await;
    }
    if ctx.active_requests() > 0 {
        tracing::warn!(
            worker,
            cut = ctx.active_requests(),
            "shutdown_timeout reached; closing running requests"
        );
    }
    access_log::flush_on_exit();
}

/// First SIGTERM/SIGINT starts the drain; another one a second or more later exits at once.
/// (Tools like `timeout` signal the process and then its whole group: one intent, two signals.)
/// SIGHUP reopens the access log file and reloads the config.
fn install_signal_handler(control: Arc<Control>) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("llmproxy-signals".into())
        .spawn(move || {
            let mut first: Option<Instant> = None;
            for sig in signals.forever() {
                if sig == SIGHUP {
                    crate::logging::reopen_access_log();
                    // The outcome is logged by reload_config.
                    let _ = reload_config(&control);
                    continue;
                }
                match first {
                    None => {
                        first = Some(Instant::now());
                        control.shutdown.store(true, Ordering::SeqCst);
                        notify::notify("STOPPING=1");
                        tracing::info!(
                            signal = sig,
                            "shutting down: no new connections, draining running requests"
                        );
                    }
                    Some(t) if t.elapsed() >= Duration::from_secs(1) => {
                        tracing::warn!(signal = sig, "second signal: exiting without draining");
                        std::process::exit(1);
                    }
                    Some(_) => {}
                }
            }
        })?;
    Ok(())
}

/// The shared backend state of one config generation, with its checker threads (health checks,
/// load scraping, merged model list) when the config asks for them.
/// The backends of `config` with their checker threads; fails when an https backend's
/// certificate files do not load.
fn start_backends(config: &Config) -> Result<Arc<Backends>, String> {
    let backends = Backends::new(config)?;
    upstream::spawn_checker(backends.clone(), config);
    Ok(backends)
}

/// A config generation's keys (with their providers and quota store) and global limits.
type KeysAndLimits = (Option<Arc<Auth>>, Option<Arc<LimitSet>>);

/// Starts the usage reporter when metering is needed. Keys' token rates and quotas accrue from
/// usage records, so authentication needs metering even when usage reporting itself is off
/// (records then only charge keys; nothing is spooled). Charges go to whichever generation's keys
/// are current, so a reload keeps counting.
fn start_reporter(
    config: &Config,
    auth_on: bool,
    live: Arc<OnceLock<Arc<Live>>>,
) -> io::Result<Option<Reporter>> {
    if !config.usage_hook.enabled && !auth_on {
        return Ok(None);
    }
    let hook = &config.usage_hook;
    let charge = auth_on.then(|| -> usage::QuotaHook {
        Box::new(move |key, tokens, charged| {
            if let Some(auth) = live.get().and_then(|l| l.snapshot().1.auth.clone()) {
                auth.charge_usage(key, tokens, charged);
            }
        })
    });
    Reporter::start(hook, config.workers, charge).map(Some)
}

/// Keys (with their providers and quota store) and global limits for one config generation.
/// A Lua policy is compiled here once so that a broken script refuses the config instead of
/// failing requests on the workers.
fn keys_and_limits(config: &Config, ledger: Option<&Arc<Ledger>>) -> Result<KeysAndLimits, String> {
    let auth = Auth::new(config, ledger.cloned()).map_err(|e| format!("auth: {e}"))?;
    if let Some(Err(e)) = auth.as_ref().and_then(|a| a.lua_policy()) {
        return Err(format!("lua policy: {e}"));
    }
    let global = LimitSet::new(&config.rate_limit.global, "global".into());
    Ok((auth, (!global.is_empty()).then(|| Arc::new(global))))
}

/// The listener's TLS config, its certificate and key files read now: at start, and on every
/// reload so that renewed certificates take effect for new connections.
fn listener_tls(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    config
        .tls
        .as_ref()
        .map(crate::tls::server_config)
        .transpose()
}

/// Re-reads and validates the config file, then publishes it for new requests; returns the new
/// generation. A file that does not load is refused as a whole and the running config stays.
fn reload_config(control: &Control) -> Result<u64, String> {
    let reload = control.reload.lock().unwrap_or_else(|e| e.into_inner());
    let Some(path) = &reload.config_path else {
        let why = "the running config is built in, not read from a file";
        tracing::warn!("reload ignored: {why}");
        return Err(why.into());
    };
    notify::reloading();
    let result = match config::load(path) {
        Err(e) => {
            tracing::error!("reload refused, running config kept:\n{e}");
            Err(e.to_string())
        }
        Ok(next) => {
            // Everything that can fail on the new config (certificate files included) comes
            // before anything running is replaced.
            let prepared = keys_and_limits(&next, control.ledger.as_ref()).and_then(|k| {
                let tls = listener_tls(&next)?;
                let running = control.live.snapshot().1;
                Ok((k, tls, Backends::after(&next, Some(&running.backends))?))
            });
            match prepared {
                Err(e) => {
                    tracing::error!("reload refused, running config kept:\n{e}");
                    Err(e)
                }
                Ok(((auth, global_limits), tls, backends)) => {
                    let live = &control.live;
                    let (_, running) = live.snapshot();
                    warn_restart_only(&running.config, &next);
                    let mut reporter = control.reporter.lock().unwrap_or_else(|e| e.into_inner());
                    let usage = if running.config.usage_hook == next.usage_hook
                        && running.auth.is_some() == auth.is_some()
                    {
                        running.usage.clone()
                    } else {
                        let live_cell = Arc::new(OnceLock::from(live.clone()));
                        match start_reporter(&next, auth.is_some(), live_cell) {
                            Err(e) => {
                                let why = format!("usage reporter: {e}");
                                tracing::error!("reload refused, running config kept: {why}");
                                backends.retire();
                                notify::notify("READY=1");
                                return Err(why);
                            }
                            Ok(new) => {
                                control
                                    .registry
                                    .attach_usage(new.as_ref().map(|r| r.stats().clone()));
                                let sender = new.as_ref().map(Reporter::sender);
                                if let Some(old) = std::mem::replace(&mut *reporter, new) {
                                    // Its delivery stops now; its ingest finishes once the
                                    // requests still holding its channel are done.
                                    let _ = std::thread::Builder::new()
                                        .name("llmproxy-retire".into())
                                        .spawn(move || old.retire());
                                }
                                sender
                            }
                        }
                    };
                    if let Err(e) = (reload.set_log_level)(&next.log.level) {
                        tracing::warn!("log level not changed: {e}");
                    }
                    let next = Arc::new(next);
                    upstream::spawn_checker(backends.clone(), &next);
                    let count = next.backends.len();
                    // Its background threads stop; requests still running keep using it, and
                    // the slots they free are handed over under the new set's limits.
                    running.backends.retire();
                    if let (Some(queue), Some(s)) = (&backends.scheduler, &next.scheduling) {
                        queue.set_max_queue(s.max_queue);
                    }
                    // Room the new limits make (a higher `max_in_flight`) goes to those
                    // waiting, in their order, before any newcomer sees it.
                    for i in 0..backends.list.len() {
                        while Backends::offer(&backends, i) {}
                    }
                    let generation = live.publish(Snapshot {
                        config: next,
                        backends,
                        auth,
                        global_limits,
                        usage,
                        tls,
                    });
                    tracing::info!(generation, backends = count, file = %path.display(), "config reloaded");
                    Ok(generation)
                }
            }
        }
    };
    notify::notify("READY=1");
    result
}

/// Settings fixed at start: a reload keeps running with the old values until a restart.
fn warn_restart_only(running: &Config, next: &Config) {
    let changed = [
        ("listen", running.listen != next.listen),
        ("workers", running.workers != next.workers),
        ("io_driver", running.io_driver != next.io_driver),
        ("cpu_affinity", running.cpu_affinity != next.cpu_affinity),
        ("busy_poll", running.busy_poll != next.busy_poll),
        ("log.format", running.log.format != next.log.format),
        (
            "log.access_path",
            running.log.access_path != next.log.access_path,
        ),
        (
            "log.buffer_size",
            running.log.buffer_size != next.log.buffer_size,
        ),
        (
            "log.flush_interval",
            running.log.flush_interval != next.log.flush_interval,
        ),
        ("admin.enabled", running.admin.enabled != next.admin.enabled),
        ("admin.listen", running.admin.listen != next.admin.listen),
        // The Redis connection behind shared rates is made once.
        (
            "rate_limit.storage",
            running.rate_limit.redis != next.rate_limit.redis,
        ),
    ];
    for (key, _) in changed.iter().filter(|(_, c)| *c) {
        tracing::warn!(
            key,
            "changed in the file but takes effect only after a restart"
        );
    }
}

/// Pings systemd's watchdog at half its interval while every worker's tick keeps advancing; a
/// stuck worker stops the pings so systemd restarts the service. Draining always pings.
fn start_watchdog(control: Arc<Control>, interval: Duration) -> io::Result<()> {
    std::thread::Builder::new()
        .name("llmproxy-watchdog".into())
        .spawn(move || {
            let read = |c: &Control| -> Vec<u64> {
                c.heartbeats
                    .iter()
                    .map(|h| h.load(Ordering::Relaxed))
                    .collect()
            };
            let mut last = read(&control);
            loop {
                std::thread::sleep(interval / 2);
                let now = read(&control);
                let alive = now.iter().zip(&last).all(|(n, l)| n != l);
                if alive || control.shutdown.load(Ordering::Relaxed) {
                    notify::notify("WATCHDOG=1");
                } else {
                    tracing::error!(
                        "a worker stopped ticking; withholding the systemd watchdog ping"
                    );
                }
                last = now;
            }
        })?;
    Ok(())
}

fn pin_to_cpu(worker: usize) {
    let allowed = allowed_cpus();
    let Some(&cpu) = allowed.get(worker % allowed.len().max(1)) else {
        return;
    };
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                worker,
                cpu,
                "CPU pinning failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The CPUs this thread may run on (the process's mask, as `taskset`, cgroup cpusets and
/// systemd's `CPUAffinity=` set it): workers are pinned among these, never to CPUs outside them.
/// Read on the worker before it pins itself, so it sees the mask it inherited.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// One warning per [`Throttle::EVERY`] for an event that can repeat thousands of times a second
/// (accept errors at EMFILE, refused connections), with how many it stands for.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(events since the last warning)` when a warning is due now.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        if self.last.is_some_and(|at| now - at < Self::EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}
