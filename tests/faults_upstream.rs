//! Faults between the gateway and a real upstream, injected on the wire: a TCP fault proxy
//! (tests/support/fault_proxy.rs) between the gateway and the simulator resets, half-closes,
//! stalls, trickles or garbles the response of the request that names the fault, and raw
//! listeners play the backends that never accept or never answer. Each row checks what the
//! client sees and the request's usage record: exactly one, with the status and tokens the row
//! documents in RELIABILITY.md (or none, where no backend received the request), counted after
//! a later request's record so that a late or duplicated one would be seen.

mod common;
#[path = "support/fault_proxy.rs"]
mod fault_proxy;
#[path = "support/usage.rs"]
mod usage;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    metric, post_json, raw_request, spawn_gateway, spawn_mock, sse_events, wait_until, Client,
    Proc, Response,
};
use fault_proxy::FaultProxy;
use llmproxy::usage::UsageRecord;
use serde_json::{json, Value};
use usage::{spool_records, temp_dir};

/// Tokens the simulator generates per request in these tests.
const TOKENS: usize = 12;

fn chat(stream: bool) -> Value {
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Tell me about faults on the wire"}],
        "stream": stream,
    })
}

/// The simulator, the fault proxy obeying `x-fault` in front of it, and a one-worker gateway
/// metering into its own spool (one worker: records reach the spool in request order).
struct Rig {
    _mock: Proc,
    proxy: FaultProxy,
    gw: Proc,
    dir: PathBuf,
    spool: PathBuf,
    mock_addr: SocketAddr,
}

/// Timeouts short enough for a test, long enough for a loaded machine.
const TIMEOUTS: &str = "timeouts: {connect: 2s, first_byte: 4s, idle: 4s}\n";

fn rig(name: &str, extra: &str) -> Rig {
    let tokens = TOKENS.to_string();
    let mock = spawn_mock(&["--tokens", &tokens, "--itl-ms", "5"]);
    let proxy = FaultProxy::obeying(mock.addr);
    let dir = temp_dir(name);
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_config(
        &format!("  - url: \"http://{}\"\n", proxy.addr),
        &spool,
        extra,
    ));
    Rig {
        mock_addr: mock.addr,
        _mock: mock,
        proxy,
        gw,
        dir,
        spool,
    }
}

fn gateway_config(backends: &str, spool: &Path, extra: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n{backends}{extra}\
         usage_hook:\n  enabled: true\n  spool_path: \"{}\"\n  reporters: []\n",
        spool.display()
    )
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Rig {
    fn send(&self, id: &str, stream: bool, fault: &str) -> Response {
        send(self.gw.addr, id, stream, fault)
    }

    /// The head length of the simulator's response to this request, asked directly.
    fn head_len(&self, stream: bool) -> usize {
        head_len(self.mock_addr, stream)
    }
}

fn send(gw: SocketAddr, id: &str, stream: bool, fault: &str) -> Response {
    let mut headers = vec![("X-Request-Id", id)];
    if !fault.is_empty() {
        headers.push(("x-fault", fault));
    }
    post_json(gw, "/v1/chat/completions", &chat(stream), &headers)
}

fn head_len(backend: SocketAddr, stream: bool) -> usize {
    let mut body = chat(stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let body = body.to_string();
    let mut s = TcpStream::connect(backend).unwrap();
    s.write_all(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("Connection", "close")],
    ))
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4
}

/// The records whose client request id is `id`, once there is at least one.
fn records(spool: &Path, id: &str) -> Vec<UsageRecord> {
    let mut found = Vec::new();
    let ok = wait_until(Duration::from_secs(15), || {
        found = of(spool, id);
        !found.is_empty()
    });
    assert!(ok, "no usage record for {id}");
    found
}

fn of(spool: &Path, id: &str) -> Vec<UsageRecord> {
    spool_records(spool)
        .into_iter()
        .filter(|r| r.client_request_id.as_deref() == Some(id))
        .collect()
}

/// Sends a healthy request and waits for its record: every record of a request sent earlier
/// on this one-worker gateway is spooled by then.
fn barrier(gw: SocketAddr, spool: &Path, id: &str) {
    let r = send(gw, id, false, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = records(spool, id);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].status, "ok");
}

/// Exactly one record for `id` (checked after a barrier request), returned.
fn one_record(gw: SocketAddr, spool: &Path, id: &str) -> UsageRecord {
    records(spool, id);
    barrier(gw, spool, &format!("{id}-barrier"));
    let mut all = of(spool, id);
    assert_eq!(all.len(), 1, "records for {id}: {all:?}");
    all.pop().unwrap()
}

/// No record for `id`, checked after a barrier request.
fn no_record(gw: SocketAddr, spool: &Path, id: &str) {
    barrier(gw, spool, &format!("{id}-barrier"));
    assert_eq!(of(spool, id), Vec::new(), "a record for {id}");
}

fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["code"], code, "{e}");
    assert_eq!(e["error"]["type"], "server_error", "{e}");
}

/// An `error` record for a request the backend received and never answered: the gateway's
/// status, nothing billed, and that is exact.
fn assert_unanswered(record: &UsageRecord, status: u16) {
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("error", status),
        "{record:?}"
    );
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens
        ),
        (0, 0, 0)
    );
    assert!(!record.usage_estimated, "{record:?}");
}

/// A stream the backend broke after it started: the client got a 200 head and a body whose
/// chunked framing never ends (no last chunk, no `[DONE]`), then the connection closed. The
/// record is an `error` that bills what was relayed, estimated. Returns the content events
/// the client received.
fn assert_broken_stream(r: &Response, record: &UsageRecord) -> usize {
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let (_, terminated) = r.chunks();
    assert!(
        !terminated,
        "a broken stream must not end with the last chunk"
    );
    let events = sse_events(&r.body);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let content = events
        .iter()
        .filter(|e| {
            serde_json::from_str::<Value>(e).is_ok_and(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
        })
        .count();
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("error", 200),
        "{record:?}"
    );
    assert!(record.usage_estimated, "{record:?}");
    assert_eq!(record.completion_tokens, content as u64, "{record:?}");
    assert_eq!(
        record.total_tokens,
        record.prompt_tokens + record.completion_tokens
    );
    content
}

#[test]
fn reset_before_the_response_head_is_retried_then_a_502() {
    let rig = rig("reset-head", TIMEOUTS);
    let r = rig.send("reset-0", false, "reset:0");
    assert_error(&r, 502, "upstream_closed");
    // Retried once on the only backend (the retry policy), reset again.
    assert_eq!(rig.proxy.faults(), 2);
    let record = one_record(rig.gw.addr, &rig.spool, "reset-0");
    assert_unanswered(&record, 502);
    assert_eq!(metric(rig.gw.addr, "llmproxy_retries_total"), 1.0);
}

#[test]
fn reset_before_the_head_goes_to_another_backend() {
    let mock = spawn_mock(&["--tokens", &TOKENS.to_string()]);
    let faulty = FaultProxy::obeying(mock.addr);
    let healthy = FaultProxy::start(mock.addr);
    let dir = temp_dir("reset-other");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_config(
        &format!(
            "  - url: \"http://{}\"\n  - url: \"http://{}\"\n",
            faulty.addr, healthy.addr
        ),
        &spool,
        "load_balance: round_robin\n",
    ));
    // Round robin: some of these go to the faulty backend first, and are retried on the other.
    for i in 0..4 {
        let id = format!("other-{i}");
        let r = send(gw.addr, &id, false, "reset:0");
        assert_eq!(r.status, 200, "{}", r.text());
        let record = one_record(gw.addr, &spool, &id);
        assert_eq!((record.status.as_str(), record.status_code), ("ok", 200));
        assert_eq!(record.completion_tokens, TOKENS as u64);
        assert!(!record.usage_estimated);
    }
    assert!(faulty.faults() >= 1, "no request met the fault");
    assert!(wait_until(Duration::from_secs(10), || metric(
        gw.addr,
        "llmproxy_retries_total"
    ) == faulty.faults()
        as f64));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reset_mid_head_is_a_502() {
    let rig = rig("reset-mid-head", TIMEOUTS);
    let r = rig.send("mid-head", false, "reset:10");
    assert_error(&r, 502, "bad_upstream_response");
    assert_unanswered(&one_record(rig.gw.addr, &rig.spool, "mid-head"), 502);
}

#[test]
fn a_garbage_head_is_a_502() {
    let rig = rig("garbage", TIMEOUTS);
    let r = rig.send("garbage", true, "garbage");
    assert_error(&r, 502, "bad_upstream_response");
    assert_eq!(rig.proxy.faults(), 2, "retried once");
    assert_unanswered(&one_record(rig.gw.addr, &rig.spool, "garbage"), 502);
}

#[test]
fn half_close_before_the_head_is_a_502() {
    let rig = rig("fin-head", TIMEOUTS);
    let r = rig.send("fin-0", false, "fin:0");
    assert_error(&r, 502, "upstream_closed");
    assert_unanswered(&one_record(rig.gw.addr, &rig.spool, "fin-0"), 502);
}

#[test]
fn reset_mid_body_cuts_the_client_short_of_its_length() {
    let rig = rig("reset-body", TIMEOUTS);
    let cut = rig.head_len(false) + 40;
    let r = rig.send("mid-body", false, &format!("reset:{cut}"));
    assert_eq!(r.status, 200);
    let length: usize = r.header("content-length").unwrap().parse().unwrap();
    assert!(
        r.body.len() < length,
        "{} of {length} bytes: the cut must show",
        r.body.len()
    );
    let record = one_record(rig.gw.addr, &rig.spool, "mid-body");
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("error", 200),
        "{record:?}"
    );
    // Nothing usable came back: the prompt is estimated, no output.
    assert!(record.usage_estimated);
    assert_eq!(record.completion_tokens, 0);
    assert!(record.prompt_tokens > 0);
}

#[test]
fn reset_mid_stream_ends_the_client_stream_broken() {
    let rig = rig("reset-stream", TIMEOUTS);
    let cut = rig.head_len(true) + 700;
    let r = rig.send("mid-stream", true, &format!("reset:{cut}"));
    let record = one_record(rig.gw.addr, &rig.spool, "mid-stream");
    let content = assert_broken_stream(&r, &record);
    assert!(content > 0 && content < TOKENS, "{content} events relayed");
}

#[test]
fn half_close_mid_stream_ends_the_client_stream_broken() {
    let rig = rig("fin-stream", TIMEOUTS);
    let cut = rig.head_len(true) + 500;
    let r = rig.send("fin-stream", true, &format!("fin:{cut}"));
    let record = one_record(rig.gw.addr, &rig.spool, "fin-stream");
    let content = assert_broken_stream(&r, &record);
    assert!(content < TOKENS, "{content} events relayed");
}

#[test]
fn a_stall_before_the_head_times_out_as_504() {
    let rig = rig("stall-head", TIMEOUTS);
    let r = rig.send("stall-0", false, "stall:0");
    assert_error(&r, 504, "upstream_timeout");
    // A timeout is not retried: the backend may still be generating.
    assert_eq!(rig.proxy.faults(), 1);
    assert_unanswered(&one_record(rig.gw.addr, &rig.spool, "stall-0"), 504);
    assert!(metric(rig.gw.addr, "llmproxy_upstream_errors_total") >= 1.0);
}

#[test]
fn a_stall_mid_stream_is_cut_after_the_idle_timeout() {
    let rig = rig("stall-stream", TIMEOUTS);
    let cut = rig.head_len(true) + 600;
    let r = rig.send("stall-mid", true, &format!("stall:{cut}"));
    let record = one_record(rig.gw.addr, &rig.spool, "stall-mid");
    let content = assert_broken_stream(&r, &record);
    assert!(content > 0 && content < TOKENS, "{content} events relayed");
}

#[test]
fn a_stream_longer_than_the_total_timeout_is_cut() {
    let mock = spawn_mock(&["--tokens", "200", "--itl-ms", "20"]);
    let dir = temp_dir("total");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_config(
        &format!("  - url: \"http://{}\"\n", mock.addr),
        &spool,
        "timeouts: {total: 2s}\n",
    ));
    let r = send(gw.addr, "total", true, "");
    // The barrier must not take the total's cut: it asks for a short answer.
    let record = {
        records(&spool, "total");
        let b = post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(false),
            &[("X-Request-Id", "total-barrier"), ("x-mock-tokens", "2")],
        );
        assert_eq!(b.status, 200);
        records(&spool, "total-barrier");
        let mut all = of(&spool, "total");
        assert_eq!(all.len(), 1, "{all:?}");
        all.pop().unwrap()
    };
    let content = assert_broken_stream(&r, &record);
    assert!(content > 0 && content < 200, "{content} events relayed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_one_byte_trickle_still_succeeds_exactly() {
    let rig = rig("trickle", TIMEOUTS);
    for (id, stream) in [("trickle-json", false), ("trickle-sse", true)] {
        let r = rig.send(id, stream, "trickle:1");
        assert_eq!(r.status, 200, "{}", r.text());
        let record = one_record(rig.gw.addr, &rig.spool, id);
        assert_eq!(
            (record.status.as_str(), record.status_code),
            ("ok", 200),
            "{record:?}"
        );
        assert!(!record.usage_estimated, "{record:?}");
        assert_eq!(record.completion_tokens, TOKENS as u64);
        if stream {
            let (_, terminated) = r.chunks();
            assert!(terminated);
            let events = sse_events(&r.body);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            // The usage-only event the gateway asked for is not relayed, even cut into bytes.
            assert!(!r.text().contains("\"usage\""), "{}", r.text());
        } else {
            let body = r.json();
            assert_eq!(body["usage"]["completion_tokens"], TOKENS);
            assert_eq!(body["usage"]["prompt_tokens"], record.prompt_tokens);
        }
    }
    assert_eq!(metric(rig.gw.addr, "llmproxy_retries_total"), 0.0);
}

/// A listener whose accept queue is full: connecting to it hangs (the kernel drops the SYNs).
/// The test holds the sockets for as long as it needs the hang.
fn unaccepting_listener() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    // Full once a connect does not complete.
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the accept queue did not fill"
    );
    (listener, fillers, addr)
}

/// Two backends: `dead` serves only the model `dead`, the simulator serves `mock-model` (the
/// barrier's), so one gateway shows the dead backend's row and its barrier.
fn dead_backend_gateway(dead: SocketAddr, spool: &Path, extra: &str) -> (Proc, Proc) {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&gateway_config(
        &format!(
            "  - url: \"http://{dead}\"\n    models: [dead]\n  - url: \"http://{}\"\n    models: [mock-model]\n",
            mock.addr
        ),
        spool,
        extra,
    ));
    (mock, gw)
}

fn dead_model_request(gw: SocketAddr, id: &str) -> Response {
    post_json(
        gw,
        "/v1/chat/completions",
        &json!({"model": "dead", "messages": [{"role": "user", "content": "hello"}]}),
        &[("X-Request-Id", id)],
    )
}

#[test]
fn a_connect_that_hangs_times_out_as_504_without_a_record() {
    let (_listener, _fillers, dead) = unaccepting_listener();
    let dir = temp_dir("connect-timeout");
    let spool = dir.join("usage.db");
    let (_mock, gw) =
        dead_backend_gateway(dead, &spool, "timeouts: {connect: 500ms, first_byte: 4s}\n");
    let r = dead_model_request(gw.addr, "connect");
    assert_error(&r, 504, "upstream_connect_timeout");
    // No backend received the request: nothing to account.
    no_record(gw.addr, &spool, "connect");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_backend_that_accepts_and_never_answers_times_out_as_504() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap();
    // Accepts, reads the request, never answers; keeps every connection open.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in silent.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            held.push(conn);
        }
    });
    let dir = temp_dir("silent");
    let spool = dir.join("usage.db");
    let (_mock, gw) = dead_backend_gateway(dead, &spool, "timeouts: {first_byte: 3s}\n");
    let r = dead_model_request(gw.addr, "silent");
    assert_error(&r, 504, "upstream_timeout");
    assert_unanswered(&one_record(gw.addr, &spool, "silent"), 504);
    let _ = std::fs::remove_dir_all(dir);
}

/// Makes the next close of `s` a reset.
fn reset_on_close(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

#[test]
fn a_client_reset_mid_stream_cancels_the_generation() {
    let mock = spawn_mock(&["--tokens", "400", "--itl-ms", "25"]);
    let dir = temp_dir("client-reset");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_config(
        &format!("  - url: \"http://{}\"\n", mock.addr),
        &spool,
        "",
    ));
    let body = chat(true).to_string();
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("X-Request-Id", "client-reset")],
    ));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let n = c.stream().read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    reset_on_close(c.stream());
    drop(c);
    // The backend stops generating long before its 10 s stream would end.
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            mock.addr,
            "vllm:num_requests_running"
        ) == 0.0),
        "the generation went on"
    );
    let record = one_record(gw.addr, &spool, "client-reset");
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("cancelled", 200),
        "{record:?}"
    );
    assert!(record.usage_estimated);
    assert!(
        record.completion_tokens >= 3 && record.completion_tokens < 400,
        "{record:?}"
    );
    assert!(metric(gw.addr, "llmproxy_client_cancels_total") >= 1.0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_reset_before_the_head_is_a_499_record() {
    let mock = spawn_mock(&[]);
    let dir = temp_dir("client-reset-head");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_config(
        &format!("  - url: \"http://{}\"\n", mock.addr),
        &spool,
        "",
    ));
    let body = chat(false).to_string();
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("X-Request-Id", "early-reset"), ("x-mock-ttft-ms", "5000")],
    ));
    assert!(wait_until(Duration::from_secs(5), || metric(
        mock.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    reset_on_close(c.stream());
    drop(c);
    assert!(
        wait_until(Duration::from_secs(3), || metric(
            mock.addr,
            "vllm:num_requests_running"
        ) == 0.0),
        "the request kept running upstream"
    );
    let record = one_record(gw.addr, &spool, "early-reset");
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("cancelled", 499),
        "{record:?}"
    );
    assert_eq!(record.completion_tokens, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_backend_that_never_reads_a_large_request_times_out_as_504() {
    let deaf = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = deaf.local_addr().unwrap();
    // Accepts and never reads: an 8 MiB request fills the socket buffers and stops.
    std::thread::spawn(move || {
        let held: Vec<TcpStream> = deaf.incoming().flatten().collect();
        drop(held);
    });
    let dir = temp_dir("deaf");
    let spool = dir.join("usage.db");
    let (_mock, gw) = dead_backend_gateway(dead, &spool, "timeouts: {first_byte: 3s}\n");
    let body = json!({
        "model": "dead",
        "messages": [{"role": "user", "content": "x".repeat(8 << 20)}],
    });
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("X-Request-Id", "deaf")],
    );
    assert_error(&r, 504, "upstream_timeout");
    // The backend never took the whole request: no record.
    no_record(gw.addr, &spool, "deaf");
    let _ = std::fs::remove_dir_all(dir);
}
