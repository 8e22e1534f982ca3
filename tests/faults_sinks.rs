//! Sinks and stores failing for real while traffic flows: the webhook receiver killed and
//! started again, PostgreSQL (the usage database sink) and Redis (shared rate limits) cut off by
//! a TCP fault proxy in front of the shared servers (which keep running), and the spool on a
//! disk that fills up. Requests keep being answered throughout; afterwards every record is in
//! its sink exactly once, and the gateway never counted a record delivered that was not.

mod common;
#[path = "support/fault_proxy.rs"]
mod fault_proxy;
#[path = "support/usage.rs"]
mod usage;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{
    closed_port, metric, raw_request, service_up, spawn_gateway, spawn_gateway_logging, spawn_mock,
    unique_name, wait_until, Client, Service, MARIADB, POSTGRES, REDIS, REQUIRE_SERVICES,
};
use fault_proxy::FaultProxy;
use serde_json::{json, Value};
use usage::{gateway_yaml, spool_records, temp_dir, unique_table, Receiver};

/// Requests sent by [`Load`] threads, each with the gateway's request id (the billing key).
struct Load {
    stop: AtomicBool,
    sent: AtomicUsize,
    ids: Mutex<Vec<String>>,
}

impl Load {
    fn new() -> Load {
        Load {
            stop: AtomicBool::new(false),
            sent: AtomicUsize::new(0),
            ids: Mutex::new(Vec::new()),
        }
    }

    /// One client on a keep-alive connection until [`Load::stop`]: every request must be answered
    /// 200, whatever the sinks do. Paced (a pause of 1 ms between requests) so that a phase's
    /// record count stays bounded however fast or slow the machine is.
    fn run(&self, gw: SocketAddr) {
        let body = json!({
            "model": "mock-model",
            "messages": [{"role": "user", "content": "count me once"}],
        })
        .to_string();
        let raw = raw_request("POST", "/v1/chat/completions", body.as_bytes(), &[]);
        let mut c = Client::connect(gw);
        while !self.stop.load(Ordering::Relaxed) {
            c.send(&raw);
            let r = c.read_response();
            assert_eq!(r.status, 200, "{}", r.text());
            let id = r
                .header("x-request-id")
                .expect("an X-Request-Id")
                .to_string();
            self.ids.lock().unwrap().push(id);
            self.sent.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests were answered (the traffic goes on through a phase).
    fn wait_for(&self, more: usize) {
        let target = self.sent() + more;
        assert!(
            wait_until(Duration::from_secs(30), || self.sent() >= target),
            "requests stopped being answered at {}",
            self.sent()
        );
    }

    fn ids(&self) -> HashSet<String> {
        let ids = self.ids.lock().unwrap();
        let set: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(set.len(), ids.len(), "the gateway reused a request id");
        set
    }
}

fn reporter(name: &str, kind: &str, body: &str) -> String {
    format!(
        "\n    - name: {name}\n      type: {kind}\n      batch_size: 20\n      batch_timeout: 50ms\n{body}"
    )
}

/// Accepted (2xx) deliveries per record id, and the Idempotency-Key of each POST that carried
/// each id.
fn webhook_deliveries(
    posts: &[Value],
) -> (HashMap<String, usize>, HashMap<String, HashSet<String>>) {
    let mut counts = HashMap::new();
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for p in posts.iter().filter(|p| p["status"] == 200) {
        let records = match &p["body"] {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        };
        let key = p["headers"]["idempotency-key"]
            .as_str()
            .unwrap()
            .to_string();
        for r in records {
            let id = r["request_id"].as_str().unwrap().to_string();
            *counts.entry(id.clone()).or_insert(0) += 1;
            keys.entry(id).or_default().insert(key.clone());
        }
    }
    (counts, keys)
}

/// Every post the receiver read under one `Idempotency-Key` carries the same records: a batch
/// sent again after a failure is the same batch, so deduplicating on the key loses nothing.
fn assert_keys_name_one_batch(posts: &[Value]) {
    let mut batches: HashMap<String, Vec<String>> = HashMap::new();
    for p in posts {
        let Some(key) = p["headers"]["idempotency-key"].as_str() else {
            continue;
        };
        let ids: Vec<String> = match &p["body"] {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        }
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect();
        let first = batches
            .entry(key.to_string())
            .or_insert_with(|| ids.clone());
        assert_eq!(*first, ids, "{key} named two different batches");
    }
}

#[test]
fn webhook_receiver_killed_under_load_then_restarted() {
    webhook_outage(false);
}

#[test]
fn webhook_receiver_frozen_under_load_then_thawed() {
    webhook_outage(true);
}

/// The webhook receiver is killed (`freeze` false: connections refused) or frozen with SIGSTOP
/// (`freeze`: connections accepted by the kernel, never answered) while traffic flows, then
/// started again or thawed.
fn webhook_outage(freeze: bool) {
    let mock = spawn_mock(&["--tokens", "3"]);
    let dir = temp_dir("sink-webhook");
    let port = closed_port();
    let posts = dir.join("posts.jsonl");
    let mut receiver = Some(Receiver::start_on(port.addr.port(), &posts, 0));
    let url = receiver.as_ref().unwrap().url();
    let hook = reporter(
        "hook",
        "webhook",
        &format!("      url: \"{url}\"\n      timeout: 1s\n      retry: 1\n"),
    );
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &hook));
    let delivered = || metric(gw.addr, "llmproxy_usage_delivered_total");
    let signal = |receiver: &Option<Receiver>, sig| {
        let pid = receiver.as_ref().unwrap().pid() as libc::pid_t;
        // SAFETY: a signal to the receiver process this test started and still owns.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    };
    let load = Load::new();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| load.run(gw.addr));
        }
        assert!(wait_until(Duration::from_secs(20), || delivered() >= 20.0));
        // While batches are being posted; requests go on being answered.
        if freeze {
            signal(&receiver, libc::SIGSTOP);
        } else {
            drop(receiver.take());
        }
        assert!(
            wait_until(Duration::from_secs(20), || metric(
                gw.addr,
                "llmproxy_usage_delivery_failures_total"
            ) >= 2.0),
            "the outage was not noticed"
        );
        load.wait_for(60);
        assert!(metric(gw.addr, "llmproxy_usage_spool_backlog") > 0.0);
        if freeze {
            signal(&receiver, libc::SIGCONT);
        } else {
            receiver = Some(Receiver::start_on(port.addr.port(), &posts, 0));
        }
        load.wait_for(30);
        load.stop.store(true, Ordering::Relaxed);
    });
    let ids = load.ids();
    // Backoff after a few failures is a few seconds.
    let all = wait_until(Duration::from_secs(40), || {
        webhook_deliveries(&usage::read_posts(&posts)).0.len() >= ids.len()
    });
    let (accepted, keys) = webhook_deliveries(&usage::read_posts(&posts));
    assert!(all, "{} of {} records delivered", accepted.len(), ids.len());
    assert_keys_name_one_batch(&usage::read_posts(&posts));
    assert_eq!(accepted.keys().cloned().collect::<HashSet<_>>(), ids);
    // A record the receiver took more than once is one whose answer never reached the gateway
    // (killed before answering, or answered after the gateway's timeout): re-sent, always with
    // the same Idempotency-Key.
    for (id, n) in &accepted {
        if *n > 1 {
            assert_eq!(keys[id].len(), 1, "{id} re-sent under another key");
        }
    }
    // Counted delivered once each, only on the receiver's answer: never more than it took.
    assert!(wait_until(Duration::from_secs(5), || delivered() >= ids.len() as f64));
    assert_eq!(delivered(), ids.len() as f64);
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

/// Rows per request id in `table`, read from the database directly (not through the proxy).
fn pg_rows(table: &str) -> HashMap<String, i64> {
    let mut pg =
        postgres::Client::connect(&pg_dsn(POSTGRES.port), postgres::NoTls).expect("PostgreSQL");
    let rows = match pg.query(
        &format!("SELECT request_id, count(*) FROM {table} GROUP BY request_id"),
        &[],
    ) {
        Ok(rows) => rows,
        // Not created yet.
        Err(_) => return HashMap::new(),
    };
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

fn pg_dsn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=test connect_timeout=2")
}

/// Over TCP only: the client otherwise moves to the server's Unix socket once it has asked
/// for its path, past the fault proxy.
fn mysql_url(port: u16) -> String {
    format!("mysql://root@127.0.0.1:{port}/test?prefer_socket=false")
}

fn mysql_rows(table: &str) -> HashMap<String, i64> {
    use mysql::prelude::Queryable;
    let opts = mysql::Opts::from_url(&mysql_url(MARIADB.port)).unwrap();
    let mut my = mysql::Conn::new(opts).expect("MariaDB");
    my.query::<(String, i64), _>(format!(
        "SELECT request_id, count(*) FROM {table} GROUP BY request_id"
    ))
    .map(|rows| rows.into_iter().collect())
    .unwrap_or_default()
}

/// The usage database sink's PostgreSQL becomes unreachable (every connection reset, new ones
/// too) while traffic flows, then comes back.
#[test]
fn postgres_sink_cut_off_under_load_then_back() {
    if !service_up(&POSTGRES) {
        return;
    }
    let table = unique_table("faults_pg");
    sql_sink_cut_off(
        &POSTGRES,
        &table,
        |port| ("postgres", pg_dsn(port)),
        pg_rows,
    );
    let mut pg =
        postgres::Client::connect(&pg_dsn(POSTGRES.port), postgres::NoTls).expect("PostgreSQL");
    let _ = pg.batch_execute(&format!("DROP TABLE IF EXISTS {table}"));
}

/// The same with MariaDB.
#[test]
fn mariadb_sink_cut_off_under_load_then_back() {
    if !service_up(&MARIADB) {
        return;
    }
    let table = unique_table("faults_my");
    sql_sink_cut_off(
        &MARIADB,
        &table,
        |port| ("mysql", mysql_url(port)),
        mysql_rows,
    );
    use mysql::prelude::Queryable;
    let opts = mysql::Opts::from_url(&mysql_url(MARIADB.port)).unwrap();
    let mut my = mysql::Conn::new(opts).expect("MariaDB");
    let _ = my.query_drop(format!("DROP TABLE IF EXISTS {table}"));
}

/// A database usage sink behind the fault proxy, cut off while traffic flows, then back: every
/// record stored exactly once, and never counted delivered before it was stored.
fn sql_sink_cut_off(
    service: &Service,
    table: &str,
    dsn: impl Fn(u16) -> (&'static str, String),
    rows: impl Fn(&str) -> HashMap<String, i64>,
) {
    let proxy = FaultProxy::start(service.addr().parse().unwrap());
    let mock = spawn_mock(&["--tokens", "3"]);
    let dir = temp_dir("sink-sql");
    let (driver, dsn) = dsn(proxy.addr.port());
    let sink = reporter(
        "db",
        "database",
        &format!("      database: {{driver: {driver}, dsn: \"{dsn}\", table: {table}}}\n"),
    );
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &sink));
    let delivered = || metric(gw.addr, "llmproxy_usage_delivered_total");
    let load = Load::new();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| load.run(gw.addr));
        }
        assert!(wait_until(Duration::from_secs(20), || delivered() >= 20.0));
        proxy.cut();
        assert!(
            wait_until(Duration::from_secs(20), || metric(
                gw.addr,
                "llmproxy_usage_delivery_failures_total"
            ) >= 2.0),
            "the outage was not noticed"
        );
        load.wait_for(60);
        // Counted delivered only once committed: the table holds at least that many rows.
        let claimed = delivered();
        let stored: i64 = rows(table).values().sum();
        assert!(
            claimed <= stored as f64,
            "{claimed} claimed, {stored} stored"
        );
        assert!(metric(gw.addr, "llmproxy_usage_spool_backlog") > 0.0);
        proxy.restore();
        load.wait_for(30);
        load.stop.store(true, Ordering::Relaxed);
    });
    let ids = load.ids();
    let all = wait_until(Duration::from_secs(40), || rows(table).len() >= ids.len());
    let stored = rows(table);
    assert!(all, "{} of {} records stored", stored.len(), ids.len());
    assert_eq!(stored.keys().cloned().collect::<HashSet<_>>(), ids);
    assert!(stored.values().all(|n| *n == 1), "a record stored twice");
    assert!(wait_until(Duration::from_secs(5), || delivered() == ids.len() as f64));
    let _ = std::fs::remove_dir_all(dir);
}

/// The newest GCRA state in Redis under `prefix`: the largest theoretical arrival time any key
/// holds. It only moves forward when a limiter script runs (a key that expires is never read
/// as newer), so a larger value means an instance used Redis.
fn redis_tat(prefix: &str) -> f64 {
    let client = redis::Client::open(format!("redis://{}/", REDIS.addr())).unwrap();
    let mut c = client.get_connection().expect("Redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap();
    keys.iter()
        .filter_map(|k| {
            let v: Option<String> = redis::cmd("GET").arg(k).query(&mut c).ok()?;
            v?.parse::<f64>().ok()
        })
        .fold(0.0, f64::max)
}

/// Shared rate limits with Redis cut off (connections reset), then black-holed (accepted,
/// never answered): every request is answered by the local limits, none queues behind Redis,
/// and once Redis is back the shared state moves again.
#[test]
fn redis_rate_limits_cut_off_and_black_holed_then_back() {
    if !service_up(&REDIS) {
        return;
    }
    let proxy = FaultProxy::start(REDIS.addr().parse().unwrap());
    let mock = spawn_mock(&[]);
    let prefix = format!("{}:", unique_name("llmproxy-faults"));
    let config = format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends: [{{url: \"http://{}\"}}]\n\
         rate_limit:\n  global: {{requests_per_minute: 600}}\n  storage: redis\n  \
         redis: {{url: \"redis://{}/\", prefix: \"{prefix}\"}}\n",
        mock.addr, proxy.addr
    );
    let gw = spawn_gateway(&config);
    let body = json!({"model": "mock-model", "messages": []}).to_string();
    let raw = raw_request("POST", "/v1/chat/completions", body.as_bytes(), &[]);
    // `n` concurrent requests on 8 connections, all answered 200.
    let burst = |n: usize| {
        let left = AtomicUsize::new(n);
        std::thread::scope(|s| {
            for _ in 0..n.min(8) {
                s.spawn(|| {
                    let mut c = Client::connect(gw.addr);
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                        .is_ok()
                    {
                        c.send(&raw);
                        let r = c.read_response();
                        assert_eq!(r.status, 200, "{}", r.text());
                    }
                });
            }
        });
    };
    burst(4);
    let mut tat = redis_tat(&prefix);
    assert!(tat > 0.0, "no shared state in Redis");
    for fault in ["hang", "cut"] {
        match fault {
            "cut" => proxy.cut(),
            _ => proxy.hang(),
        }
        let tried = proxy.accepted();
        burst(64);
        // After a failure the limiter answers locally and probes Redis about once a second.
        // Without that, each request waited for its own 1 s timeout, 4 at a time, and
        // reconnected: this burst took 32.8 s and 61 connections while Redis hung.
        let attempts = proxy.accepted() - tried;
        assert!(
            attempts <= 16,
            "{attempts} Redis connections during the {fault}"
        );
        assert!(redis_tat(&prefix) <= tat, "Redis moved during the {fault}");
        proxy.restore();
        let used = (0..100).any(|_| {
            burst(1);
            std::thread::sleep(Duration::from_millis(200));
            redis_tat(&prefix) > tat
        });
        assert!(used, "Redis was not used again after the {fault}");
        tat = redis_tat(&prefix);
    }
}

/// A tmpfs mount of `size` for the spool, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// `None` (skipped loudly, or a failure with LLMPROXY_REQUIRE_SERVICES=1) when this process
    /// cannot mount (not root, no tmpfs).
    fn mount(size: &str) -> Option<SmallDisk> {
        let path = common::unique_path("llmproxy-small-disk");
        std::fs::create_dir_all(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match mounted {
            Ok(o) if o.status.success() => Some(SmallDisk { path }),
            other => {
                let _ = std::fs::remove_dir(&path);
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
                assert!(
                    !required,
                    "cannot mount a tmpfs ({why}) and {REQUIRE_SERVICES}=1"
                );
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED full-disk test: cannot mount a tmpfs ({why}); run as root"
                );
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Fills `dir`'s file system: one file as large as it gets.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    // Down to the last bytes.
    while f.write_all(&block[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_spool_disk_is_a_metric_and_a_log_line_not_a_stall() {
    let Some(disk) = SmallDisk::mount("4m") else {
        return;
    };
    let mock = spawn_mock(&["--tokens", "3"]);
    let dir = temp_dir("sink-full");
    let log = dir.join("gateway.log");
    let spool = disk.path.join("usage.db");
    let posts = dir.join("posts.jsonl");
    let receiver = Receiver::start(&posts, 0);
    let hook = reporter(
        "hook",
        "webhook",
        &format!("      url: \"{}\"\n      timeout: 1s\n", receiver.url()),
    );
    let gw = spawn_gateway_logging(&gateway_yaml(mock.addr, &spool, &hook), &log);
    let load = Load::new();
    std::thread::scope(|s| {
        s.spawn(|| load.run(gw.addr));
        load.wait_for(20);
        let filler = fill(&disk.path);
        // The spool cannot grow; requests keep being answered meanwhile.
        assert!(
            wait_until(Duration::from_secs(20), || metric(
                gw.addr,
                "llmproxy_usage_spool_errors_total"
            ) >= 1.0),
            "no spool error counted on a full disk"
        );
        load.wait_for(50);
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            logged.contains("usage spool write failed") && logged.contains("full"),
            "no log line for the full disk"
        );
        // One line per failing batch, not one per retry (every 500 ms).
        let lines = logged.matches("usage spool write failed").count();
        assert!((1..=2).contains(&lines), "{lines} lines");
        std::fs::remove_file(filler).unwrap();
        load.wait_for(20);
        load.stop.store(true, Ordering::Relaxed);
    });
    let ids = load.ids();
    // Every record made it to the spool once room came back, and to the webhook once.
    let all = wait_until(Duration::from_secs(30), || {
        webhook_deliveries(&receiver.posts()).0.len() >= ids.len()
    });
    let (accepted, _) = webhook_deliveries(&receiver.posts());
    assert!(all, "{} of {} records delivered", accepted.len(), ids.len());
    assert_eq!(accepted.keys().cloned().collect::<HashSet<_>>(), ids);
    assert!(
        accepted.values().all(|n| *n == 1),
        "a record delivered twice"
    );
    let spooled = spool_records(&spool);
    assert_eq!(spooled.len(), ids.len());
    assert_eq!(metric(gw.addr, "llmproxy_usage_events_dropped_total"), 0.0);
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}
