//! Helpers shared by the usage tests: temp dirs, the gateway config with metering on, reading
//! the spool, and the Python webhook receiver process.

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use llmproxy::usage::{Spool, UsageRecord};

/// A fresh directory under the system temp dir, unique per test.
pub fn temp_dir(name: &str) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "llmproxy-usage-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A table name no other test (or earlier run) uses.
pub fn unique_table(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Gateway config with metering on: `{listen}` stays for `spawn_gateway`; `reporters` is the
/// YAML list under `usage_hook.reporters` (indented by 4), or "[]".
pub fn gateway_yaml(backend: SocketAddr, spool: &Path, reporters: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\nworkers: 2\nshutdown_timeout: 5s\nbackends:\n  - url: \"http://{backend}\"\n\
         usage_hook:\n  enabled: true\n  spool_path: \"{}\"\n  reporters:{reporters}\n",
        spool.display()
    )
}

/// Every record in the spool, oldest first (read through a cursor no reporter uses).
pub fn spool_records(spool: &Path) -> Vec<UsageRecord> {
    if !spool.exists() {
        return Vec::new();
    }
    Spool::open(spool)
        .and_then(|s| s.pending("test-reader", 1_000_000))
        .map(|rows| rows.iter().filter_map(|r| r.record().ok()).collect())
        .unwrap_or_default()
}

/// `tests/support/webhook_receiver.py`; dropping it kills it.
pub struct Receiver {
    child: Child,
    pub addr: SocketAddr,
    pub out: PathBuf,
}

impl Receiver {
    /// On a port the kernel chooses.
    pub fn start(out: &Path, fail_first: u32) -> Receiver {
        Receiver::start_on(0, out, fail_first)
    }

    /// On `port`, which the test may hold closed until now (`common::closed_port`).
    pub fn start_on(port: u16, out: &Path, fail_first: u32) -> Receiver {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--out"])
            .arg(out)
            .args(["--fail-first", &fail_first.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3 webhook receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("receiver output");
        let addr = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("webhook receiver did not start: {line:?}"));
        Receiver {
            child,
            addr,
            out: out.to_path_buf(),
        }
    }

    /// The receiver's process id, for a test that signals it (SIGSTOP, SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}/usage", self.addr)
    }

    /// Every POST received: `{"headers": {...}, "body": ..., "status": N}`.
    pub fn posts(&self) -> Vec<serde_json::Value> {
        read_posts(&self.out)
    }
}

/// Complete lines only: the receiver may be writing the last one as the test reads.
pub fn read_posts(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("receiver line is JSON"))
        .collect()
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
