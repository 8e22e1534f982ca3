//! Several gateway instances sharing token accounting through Redis (`rate_limit.storage:
//! redis`): two real gateway processes, the simulator upstream, requests spread across both.
//! A key's `total_quota` and `tokens_per_minute` hold across the two within the documented bound
//! (tokens in flight plus what is metered during one staleness window), and a Redis outage turns
//! the limits local, then shared again, with every token charged exactly once.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const KEY: &str = "sk-instances-test-0001";
/// `rate_limit.sync_interval` in these tests.
const SYNC_MS: u64 = 100;
/// The rest of the staleness window: the usage reporter's 20 ms ingest tick, the Redis round
/// trip, and scheduling delays of a loaded 2-core test machine.
const SLACK_MS: u64 = 400;
/// Client threads, spread over the two instances: at most this many requests in flight.
const CLIENTS: usize = 4;

fn gateway(sim: &Proc, redis_url: &str, prefix: &str, key_extra: &str, limits: &str) -> Proc {
    let dir = unique_path("llmproxy-instances");
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n\
         auth:\n  enabled: true\n  storage: \"file\"\n  quota_path: \"{}/quota.db\"\n\
         api_keys:\n  - key: \"{KEY}\"\n    name: \"shared\"\n{key_extra}\
         rate_limit:\n  storage: redis\n  sync_interval: {SYNC_MS}ms\n  \
         redis: {{url: \"{redis_url}\", prefix: \"{prefix}\"}}\n{limits}",
        sim.addr,
        dir.display()
    ))
}

fn chat() -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hello"}]})
}

/// What the clients saw: each admitted request's completion time and tokens (from its usage).
#[derive(Default)]
struct Seen {
    done: Vec<(Instant, u64)>,
    refused: u64,
}

/// `CLIENTS` threads in closed loops, alternating instances, until `until` says stop.
fn drive(gws: &[&Proc], until: impl Fn(&Seen, Instant) -> bool + Sync) -> Seen {
    let seen = Mutex::new(Seen::default());
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let (seen, until, addr) = (&seen, &until, gws[c % gws.len()].addr);
            s.spawn(move || {
                let auth = format!("Bearer {KEY}");
                let mut client = Client::connect(addr);
                let raw = raw_request(
                    "POST",
                    "/v1/chat/completions",
                    chat().to_string().as_bytes(),
                    &[("Authorization", &auth)],
                );
                loop {
                    if until(&seen.lock().unwrap(), started) {
                        return;
                    }
                    client.send(&raw);
                    let r = client.read_response();
                    let mut seen = seen.lock().unwrap();
                    match r.status {
                        200 => {
                            let tokens = r.json()["usage"]["total_tokens"].as_u64().unwrap();
                            seen.done.push((Instant::now(), tokens));
                        }
                        429 => {
                            seen.refused += 1;
                            drop(seen);
                            // A refused client pauses a little, as a real one would.
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        other => panic!("unexpected {other}: {}", r.text()),
                    }
                }
            });
        }
    });
    seen.into_inner().unwrap()
}

impl Seen {
    fn tokens(&self) -> u64 {
        self.done.iter().map(|(_, t)| t).sum()
    }

    fn largest(&self) -> u64 {
        self.done.iter().map(|(_, t)| *t).max().unwrap_or(0)
    }

    /// The most tokens completed within any `window`: the metered rate over one staleness
    /// window, as measured.
    fn most_in(&self, window: Duration) -> u64 {
        let mut done = self.done.clone();
        done.sort_by_key(|(at, _)| *at);
        let (mut best, mut sum, mut first) = (0, 0, 0);
        for &(at, tokens) in &done {
            sum += tokens;
            while at.duration_since(done[first].0) > window {
                sum -= done[first].1;
                first += 1;
            }
            best = best.max(sum);
        }
        best
    }

    /// The documented overshoot bound, measured: every client's request in flight plus the
    /// tokens metered during one staleness window.
    fn bound(&self) -> u64 {
        CLIENTS as u64 * self.largest() + self.most_in(Duration::from_millis(SYNC_MS + SLACK_MS))
    }
}

/// Waits until the instances metered `tokens` between them and Redis holds them all as the key's
/// shared total; panics with both figures when it does not.
fn settled(gws: &[&Proc], redis_url: &str, prefix: &str, tokens: u64) {
    let metered = wait_until(Duration::from_secs(20), || usage_tokens(gws) == tokens);
    assert!(metered, "metered {} of {tokens}", usage_tokens(gws));
    let sent = wait_until(Duration::from_secs(20), || {
        gws.iter().all(|g| {
            metric(g.addr, "llmproxy_shared_accounting_up") == 1.0
                && metric(g.addr, "llmproxy_shared_accounting_unsent_tokens") == 0.0
        }) && redis_get(redis_url, &quota_key(prefix)) == tokens
    });
    assert_eq!(
        redis_get(redis_url, &quota_key(prefix)),
        tokens,
        "the shared total is every usage record's tokens, each once (sent: {sent})"
    );
}

fn usage_tokens(gws: &[&Proc]) -> u64 {
    gws.iter()
        .map(|g| metric(g.addr, "llmproxy_usage_tokens_total") as u64)
        .sum()
}

fn redis_get(url: &str, key: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("GET")
        .arg(key)
        .query::<Option<u64>>(&mut conn)
        .unwrap()
        .unwrap_or(0)
}

/// Deletes a test's keys from the shared Redis (the "forever" quota total never expires).
fn forget(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL").arg(keys).query::<()>(&mut conn).unwrap();
    }
}

/// The key's quota total in Redis for the "forever" period.
fn quota_key(prefix: &str) -> String {
    // FNV-1a 64 of the key, as the gateway names it.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in KEY.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}quota:{h:016x}:0")
}

#[test]
fn total_quota_holds_across_two_instances_within_the_bound() {
    if !service_up(&REDIS) {
        return;
    }
    let sim = spawn_mock(&["--tokens", "20", "--delay-ms", "40"]);
    let url = format!("redis://{}/", REDIS.addr());
    let prefix = format!("{}:", unique_name("llmproxy-inst-quota"));
    const QUOTA: u64 = 6000;
    let extra = format!("    total_quota: {QUOTA}\n");
    let (a, b) = (
        gateway(&sim, &url, &prefix, &extra, ""),
        gateway(&sim, &url, &prefix, &extra, ""),
    );
    // Until both instances refuse: the quota is spent for every instance.
    let seen = drive(&[&a, &b], |seen, started| {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the quota was never spent"
        );
        seen.refused >= 2 * CLIENTS as u64
    });
    let used = seen.tokens();
    settled(&[&a, &b], &url, &prefix, used);
    let (overshoot, bound) = (used.saturating_sub(QUOTA), seen.bound());
    eprintln!(
        "total_quota {QUOTA}: consumed {used} over two instances, overshoot {overshoot}, bound {bound} \
         ({CLIENTS} x {} in flight + {} metered in {} ms)",
        seen.largest(),
        seen.most_in(Duration::from_millis(SYNC_MS + SLACK_MS)),
        SYNC_MS + SLACK_MS
    );
    assert!(overshoot <= bound, "overshoot {overshoot} > bound {bound}");
    // Each instance alone would have let the key spend its whole quota.
    assert!(
        used < 2 * QUOTA,
        "consumed {used}: the quota was not shared"
    );
    for gw in [&a, &b] {
        let r = post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(),
            &[("Authorization", &format!("Bearer {KEY}"))],
        );
        assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    }
    drop((a, b));
    forget(&url, &prefix);
}

#[test]
fn tokens_per_minute_holds_across_two_instances_within_the_bound() {
    if !service_up(&REDIS) {
        return;
    }
    let sim = spawn_mock(&["--tokens", "20", "--delay-ms", "40"]);
    let url = format!("redis://{}/", REDIS.addr());
    let prefix = format!("{}:", unique_name("llmproxy-inst-tpm"));
    const TPM: u64 = 3000;
    let limits = format!("  per_key: {{tokens_per_minute: {TPM}}}\n");
    let (a, b) = (
        gateway(&sim, &url, &prefix, "", &limits),
        gateway(&sim, &url, &prefix, "", &limits),
    );
    // At least 5 s, and until the rate refused (a slow machine takes longer to spend it).
    let started = Instant::now();
    let seen = drive(&[&a, &b], |seen, started| {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the rate never refused"
        );
        started.elapsed() >= Duration::from_secs(5) && seen.refused > 0
    });
    let elapsed = started.elapsed().as_secs_f64();
    let used = seen.tokens();
    // GCRA: the whole minute's allowance at once, then a steady refill.
    let allowance = TPM + (TPM as f64 * (elapsed + 1.0) / 60.0) as u64;
    let bound = seen.bound();
    eprintln!(
        "tokens_per_minute {TPM}: {used} tokens in {elapsed:.1} s over two instances, allowance {allowance} + bound {bound}"
    );
    assert!(
        used <= allowance + bound,
        "consumed {used} > {allowance} + {bound}"
    );
    assert!(used < 2 * TPM, "consumed {used}: the rate was not shared");
    drop((a, b));
    forget(&url, &prefix);
}

/// A private `redis-server` on a unix socket in a temp dir: stopped and started again by the
/// test without touching the shared one.
struct PrivateRedis {
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(dir: PathBuf) -> PrivateRedis {
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = PrivateRedis { dir, child: None };
        redis.restart();
        redis
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Starts it again on its data: what it held when stopped is back.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let url = self.url();
        assert!(
            wait_until(Duration::from_secs(10), || redis::Client::open(
                url.as_str()
            )
            .and_then(|c| c.get_connection())
            .is_ok()),
            "the private redis-server never listened"
        );
    }

    /// Saves its data and stops (`SHUTDOWN SAVE`), then reaps it.
    fn stop(&mut self) {
        let client = redis::Client::open(self.url().as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut conn);
        let mut child = self.child.take().unwrap();
        let _ = child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_server_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "redis-server is not installed and {REQUIRE_SERVICES}=1"
        );
        eprintln!("SKIPPED: redis-server is not installed");
    }
    found
}

#[test]
fn redis_outage_goes_local_then_reconciles_every_token_once() {
    if !redis_server_available() {
        return;
    }
    let mut redis = PrivateRedis::start(unique_path("llmproxy-inst-redis"));
    let sim = spawn_mock(&["--tokens", "20"]);
    let url = redis.url();
    let prefix = "llmproxy:rl:";
    let extra = "    total_quota: 100000000\n";
    let (a, b) = (
        gateway(&sim, &url, prefix, extra, ""),
        gateway(&sim, &url, prefix, extra, ""),
    );
    let gws = [&a, &b];
    let requests = |n: usize| drive(&gws, |seen, _| seen.done.len() >= n);
    assert!(
        wait_until(Duration::from_secs(20), || gws
            .iter()
            .all(|g| metric(g.addr, "llmproxy_shared_accounting_up") == 1.0)),
        "an idle instance does not say it reaches Redis"
    );

    let before = requests(20);
    settled(&gws, &url, prefix, before.tokens());

    redis.stop();
    let during = requests(20);
    assert!(
        wait_until(Duration::from_secs(20), || gws.iter().all(|g| {
            metric(g.addr, "llmproxy_shared_accounting_up") == 0.0
                && metric(g.addr, "llmproxy_shared_accounting_failures_total") > 0.0
        })),
        "the instances never noticed the outage"
    );
    let unsent = || -> u64 {
        gws.iter()
            .map(|g| metric(g.addr, "llmproxy_shared_accounting_unsent_tokens") as u64)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(20), || unsent() == during.tokens()),
        "the outage's charges wait locally: {} unsent of {}",
        unsent(),
        during.tokens()
    );

    redis.restart();
    let after = requests(20);
    settled(
        &gws,
        &url,
        prefix,
        before.tokens() + during.tokens() + after.tokens(),
    );
}
