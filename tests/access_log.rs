//! The access log as an operator sees it in `log.access_path`: one line per request in either
//! format, handed over by size or by `log.flush_interval`, none lost at SIGTERM, the file
//! reopened on SIGHUP (logrotate), and a failing disk costing lines (counted), not requests.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;

/// A fresh path for an access log file, removed first if a previous run left it.
fn log_path(name: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("llmproxy-access-{}-{name}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn gateway(backend: SocketAddr, log: &Path, settings: &str) -> Proc {
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{backend}\"\n\
         log:\n  access_path: \"{}\"\n{settings}",
        log.display()
    ))
}

fn chat(addr: SocketAddr, id: &str, stream: bool) {
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
    let r = post_json(addr, "/v1/chat/completions", &body, &[("X-Request-Id", id)]);
    assert_eq!(r.status, 200);
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn signal(gw: &Proc, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(gw.child.id() as libc::pid_t, sig) }, 0);
}

/// SIGTERM, then waits until the process has drained and exited.
fn stop(gw: &mut Proc) {
    signal(gw, libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .child
            .try_wait()
            .unwrap()
            .is_some()),
        "the gateway did not exit after SIGTERM"
    );
}

#[test]
fn every_request_has_its_line_in_either_format_and_sigterm_loses_none() {
    const N: usize = 60;
    let mock = spawn_mock(&[]);
    for format in ["json", "text"] {
        let path = log_path(format);
        // Nothing is handed over by time or size while running: every line reaches the file
        // through the drain at SIGTERM.
        let settings = format!("  format: {format}\n  flush_interval: 1h\n  buffer_size: 64MiB\n");
        let mut gw = gateway(mock.addr, &path, &settings);
        for i in 0..N {
            chat(gw.addr, &format!("{format}-{i}"), i % 2 == 0);
        }
        assert!(
            lines(&path).is_empty(),
            "lines were written before the drain"
        );
        stop(&mut gw);
        let written = lines(&path);
        assert_eq!(written.len(), N, "{format}: {written:?}");
        for i in 0..N {
            let id = format!("{format}-{i}");
            let line = written
                .iter()
                .find(|l| l.contains(&format!("\"{id}\"")))
                .unwrap_or_else(|| panic!("no line for {id}"));
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["target"], "access");
                let f = &v["fields"];
                assert_eq!(f["request_id"], id.as_str());
                assert_eq!(f["model"], "mock-model");
                assert_eq!(f["path"], "/v1/chat/completions");
                assert_eq!(f["stream"], i % 2 == 0);
                assert_eq!(f["status"], 200);
                assert_eq!(f["backend"], format!("http://{}", mock.addr));
                assert!(f["ttft_ms"].as_f64().unwrap() >= 0.0);
            } else {
                assert!(
                    line.contains(&format!(" INFO access: request request_id=\"{id}\" key=\"-\" model=\"mock-model\" path=\"/v1/chat/completions\" stream={} status=200 bytes=", i % 2 == 0)),
                    "{line}"
                );
                assert!(line.ends_with(" retries=0"), "{line}");
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn lines_are_handed_over_when_the_buffer_fills_or_the_interval_ends() {
    let mock = spawn_mock(&[]);
    // By size: a 4 KiB buffer holds about twenty lines; the interval never ends.
    let path = log_path("by-size");
    let gw = gateway(
        mock.addr,
        &path,
        "  buffer_size: 4KiB\n  flush_interval: 1h\n",
    );
    let mut sent = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            chat(gw.addr, &format!("size-{sent}"), false);
            sent += 1;
            !lines(&path).is_empty()
        }),
        "a full buffer was not written"
    );
    assert!(
        sent > 5,
        "written after {sent} request(s), before the buffer filled"
    );
    drop(gw);
    let _ = std::fs::remove_file(&path);

    // By time: one line, written within the interval.
    let path = log_path("by-time");
    let gw = gateway(mock.addr, &path, "  flush_interval: 50ms\n");
    chat(gw.addr, "timed-1", true);
    assert!(wait_until(Duration::from_secs(5), || lines(&path)
        .iter()
        .any(|l| l.contains("\"timed-1\""))));
    drop(gw);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn sighup_reopens_the_file_after_logrotate_moved_it() {
    let mock = spawn_mock(&[]);
    let path = log_path("rotate");
    let rotated = path.with_extension("log.1");
    let _ = std::fs::remove_file(&rotated);
    let gw = gateway(mock.addr, &path, "  flush_interval: 20ms\n");
    let has = |p: &Path, id: &str| lines(p).iter().any(|l| l.contains(&format!("\"{id}\"")));

    chat(gw.addr, "before-rotate", false);
    assert!(wait_until(Duration::from_secs(5), || has(
        &path,
        "before-rotate"
    )));
    std::fs::rename(&path, &rotated).unwrap();
    signal(&gw, libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || path.exists()),
        "SIGHUP did not reopen the access log"
    );
    chat(gw.addr, "after-rotate", false);
    assert!(wait_until(Duration::from_secs(5), || has(
        &path,
        "after-rotate"
    )));
    assert!(!has(&path, "before-rotate"));
    assert!(!has(&rotated, "after-rotate"));
    drop(gw);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&rotated);
}

#[test]
fn a_failing_write_drops_lines_with_a_count_and_requests_still_succeed() {
    const N: usize = 10;
    let mock = spawn_mock(&[]);
    let gw = gateway(
        mock.addr,
        Path::new("/dev/full"),
        "  flush_interval: 20ms\n",
    );
    for i in 0..N {
        chat(gw.addr, &format!("full-{i}"), i % 2 == 0);
    }
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            gw.addr,
            "llmproxy_log_lines_dropped_total"
        ) >= N as f64),
        "dropped lines were not counted"
    );
    chat(gw.addr, "still-served", false);
}
