//! Operations over real sockets and signals: SIGHUP reload under a running stream, refusal of an
//! invalid file, systemd notifications, and the access log.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// A gateway started by the test itself: with extra environment and its stderr captured.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    ready_file: PathBuf,
    log: mpsc::Receiver<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.ready_file);
    }
}

impl Gateway {
    fn start(name: &str, yaml: &str, env: &[(&str, &str)]) -> Gateway {
        let config = unique_path(&format!("llmproxy-ops-{name}")).with_extension("yaml");
        std::fs::write(&config, yaml.replace("{listen}", "127.0.0.1:0")).unwrap();
        let ready_file = unique_path(&format!("llmproxy-ops-{name}-ready"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .arg("--ready-file")
            .arg(&ready_file)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = forward_lines(child.stderr.take().unwrap());
        let addr = wait_ready(&mut child, &ready_file).listen;
        Gateway {
            child,
            addr,
            config,
            ready_file,
            log,
        }
    }

    /// Replaces the config file; `{listen}` stays port 0, as the running config has it.
    fn rewrite(&self, yaml: &str) {
        std::fs::write(&self.config, yaml.replace("{listen}", "127.0.0.1:0")).unwrap();
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// SIGTERM, then everything the gateway logged until it exited (the drain writes every
    /// buffered access line): a line missing here was never logged.
    fn stop(mut self) -> Vec<String> {
        self.signal(libc::SIGTERM);
        assert!(
            wait_until(Duration::from_secs(15), || self
                .child
                .try_wait()
                .unwrap()
                .is_some()),
            "the gateway did not exit after SIGTERM"
        );
        std::mem::replace(&mut self.log, mpsc::channel().1)
            .iter()
            .collect()
    }

    /// Waits for a log line containing `needle`; returns it.
    fn expect_log(&self, needle: &str) -> String {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no log line containing {needle:?}");
    }
}

fn forward_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn config(backends: &[SocketAddr], extra: &str) -> String {
    let mut y = String::from("listen: \"{listen}\"\nworkers: 2\nbackends:\n");
    for b in backends {
        y.push_str(&format!("  - url: \"http://{b}\"\n"));
    }
    y.push_str(extra);
    y
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

fn requests_to(gw: SocketAddr, backend: SocketAddr) -> f64 {
    let text = get(gw, "/metrics").text();
    let label = format!("backend=\"http://{backend}\"");
    text.lines()
        .filter(|l| l.starts_with("llmproxy_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn sighup_reload_keeps_the_running_stream_refuses_bad_files_and_adds_backends() {
    let slow = spawn_mock(&["--tokens", "20", "--itl-ms", "50"]);
    let second = spawn_mock(&[]);
    let gw = Gateway::start("reload", &config(&[slow.addr], ""), &[]);

    // A stream of ~1 s is running while the config changes twice.
    let body = chat(true).to_string();
    let mut streaming = Client::connect(gw.addr);
    streaming.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[],
    ));
    // The stream has started (its head is here) before the config changes.
    streaming.stream().peek(&mut [0u8; 1]).unwrap();
    let stream = std::thread::spawn(move || streaming.read_response());

    // Invalid: refused, the running config stays.
    gw.rewrite("listen: \"{listen}\"\nbackends: []\nbogus_key: 1\n");
    gw.signal(libc::SIGHUP);
    let refused = gw.expect_log("reload refused");
    assert!(refused.contains("running config kept"), "{refused}");
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(requests_to(gw.addr, second.addr), 0.0);

    // Valid: only the second backend from now on.
    gw.rewrite(&config(&[second.addr], ""));
    gw.signal(libc::SIGHUP);
    gw.expect_log("config reloaded");
    for _ in 0..4 {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
        assert_eq!(r.status, 200);
    }
    // Counted just after each response's last byte, possibly on the other worker.
    assert!(wait_until(Duration::from_secs(5), || requests_to(
        gw.addr,
        second.addr
    ) == 4.0));

    let r = stream.join().unwrap();
    assert_eq!(r.status, 200);
    let (_, complete) = r.chunks();
    assert!(complete, "the stream lost its last chunk");
    let events = sse_events(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() >= 20, "{} events", events.len());
    // The stream finished on the backend it started on.
    assert!(wait_until(Duration::from_secs(5), || requests_to(
        gw.addr, slow.addr
    ) == 2.0));
}

#[test]
fn sd_notify_ready_reloading_and_stopping() {
    let mock = spawn_mock(&[]);
    let dir = std::env::temp_dir().join(format!("llmproxy-ops-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let sock = UnixDatagram::bind(&dir).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let gw = Gateway::start(
        "notify",
        &config(&[mock.addr], ""),
        &[
            ("NOTIFY_SOCKET", dir.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let skip_watchdog = || loop {
        let m = next();
        if m != "WATCHDOG=1" {
            return m;
        }
    };
    assert_eq!(skip_watchdog(), "READY=1");
    // The watchdog pings at half the interval while workers tick.
    assert_eq!(next(), "WATCHDOG=1");
    gw.signal(libc::SIGHUP);
    assert!(skip_watchdog().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(skip_watchdog(), "READY=1");
    gw.signal(libc::SIGTERM);
    assert_eq!(skip_watchdog(), "STOPPING=1");
    drop(gw);
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn access_log_is_one_json_line_per_request_without_prompt() {
    let mock = spawn_mock(&[]);
    let gw = Gateway::start(
        "access",
        &config(&[mock.addr], "log:\n  format: json\n"),
        &[],
    );
    let secret_prompt = "my secret prompt";
    let body =
        json!({"model": "mock-model", "messages": [{"role": "user", "content": secret_prompt}]});
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[
            ("X-Request-Id", "trace-123"),
            ("Authorization", "Bearer sk-raw-key"),
        ],
    );
    assert_eq!(r.status, 200);
    let line = gw.expect_log("trace-123");
    assert!(!line.contains(secret_prompt) && !line.contains("sk-raw-key"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "access");
    assert_eq!(v["level"], "INFO");
    let f = &v["fields"];
    assert_eq!(f["request_id"], "trace-123");
    assert_eq!(f["model"], "mock-model");
    assert_eq!(f["status"], 200);
    assert_eq!(f["backend"], format!("http://{}", mock.addr));
    assert_eq!(f["retries"], 0);
    assert!(f["key"].is_string());
    assert!(f["bytes"].as_u64().unwrap() > 100);
    assert!(f["ttft_ms"].as_f64().unwrap() >= 0.0);
    assert!(f["total_ms"].as_f64().unwrap() >= f["ttft_ms"].as_f64().unwrap());

    let quiet = Gateway::start(
        "access-off",
        &config(&[mock.addr], "log:\n  format: json\n  access: false\n"),
        &[],
    );
    let r = post_json(
        quiet.addr,
        "/v1/chat/completions",
        &chat(false),
        &[("X-Request-Id", "quiet-1")],
    );
    assert_eq!(r.status, 200);
    assert!(quiet.stop().iter().all(|l| !l.contains("quiet-1")));
}

#[test]
fn sighup_applies_a_new_log_level() {
    let mock = spawn_mock(&[]);
    let gw = Gateway::start("loglevel", &config(&[mock.addr], ""), &[]);
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false),
        &[("X-Request-Id", "before-1")],
    );
    assert_eq!(r.status, 200);
    gw.expect_log("before-1");

    gw.rewrite(&config(
        &[mock.addr],
        "log:\n  level: \"info,access=off\"\n",
    ));
    gw.signal(libc::SIGHUP);
    gw.expect_log("config reloaded");
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false),
        &[("X-Request-Id", "after-1")],
    );
    assert_eq!(r.status, 200);
    assert!(gw.stop().iter().all(|l| !l.contains("after-1")));
}

/// Threads of `pid` whose name starts with `prefix` (names are cut to 15 bytes by the kernel).
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[test]
fn reload_replaces_the_health_checkers_instead_of_adding_some() {
    let one = spawn_mock(&[]);
    let two = spawn_mock(&[]);
    let checks = "health_check:\n  enabled: true\n  interval: 100ms\n";
    let gw = Gateway::start("checker", &config(&[one.addr], checks), &[]);
    let pid = gw.child.id();
    // One checker per backend, and a model-list merger when there are several.
    let checkers = || {
        (
            threads_named(pid, "llmproxy-chk-"),
            threads_named(pid, "llmproxy-models"),
        )
    };
    assert!(wait_until(Duration::from_secs(5), || checkers() == (1, 0)));
    for backends in [&[one.addr, two.addr][..], &[two.addr], &[one.addr]] {
        gw.rewrite(&config(backends, checks));
        gw.signal(libc::SIGHUP);
        gw.expect_log("config reloaded");
        if backends.len() == 2 {
            assert!(wait_until(Duration::from_secs(5), || checkers() == (2, 1)));
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || checkers() == (1, 0)),
        "checker threads (per backend, model merger): {:?}",
        checkers()
    );
    let body = chat(false);
    assert_eq!(
        post_json(gw.addr, "/v1/chat/completions", &body, &[]).status,
        200
    );
    // Counted just after the response is written: wait for it rather than race it.
    assert!(
        wait_until(Duration::from_secs(10), || requests_to(gw.addr, one.addr)
            == 1.0),
        "requests counted to the remaining backend: {}",
        requests_to(gw.addr, one.addr)
    );
}
