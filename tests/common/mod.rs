//! Helpers shared by the integration tests: spawn the binary (simulator or gateway) on a free port
//! and talk raw HTTP/1.1 to it with blocking std sockets.
//!
//! Std-only on purpose: the tests must see the bytes exactly as they are on the wire, which an HTTP
//! client library would hide (chunk framing, a missing last chunk).

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any single read may block before a test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A spawned `llmproxy` process; dropping it kills and reaps it.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Config file written for a gateway, removed with the process.
    pub config: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn spawn(args: &[&str], addr: SocketAddr, config: Option<PathBuf>) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn llmproxy");
    let mut p = Proc {
        child,
        addr,
        config,
    };
    let healthy = wait_until(Duration::from_secs(10), || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("llmproxy {args:?} exited early: {status}");
        }
        try_get(addr, "/health").is_some_and(|r| r.status == 200)
    });
    assert!(
        healthy,
        "llmproxy {args:?} did not answer GET /health on {addr} within 10 s"
    );
    p
}

/// Starts `cmd` (a server that will listen on `addr`) and waits until `addr` accepts connections.
/// For servers without `/health`, or ones a test starts on a port of its choosing.
pub fn spawn_listening(mut cmd: Command, addr: SocketAddr) -> Proc {
    let child = cmd.stdin(Stdio::null()).spawn().expect("spawn server");
    let p = Proc {
        child,
        addr,
        config: None,
    };
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
        "nothing listens on {addr}"
    );
    p
}

/// Runs `llmproxy mock-llm --listen 127.0.0.1:<free port> <args>` and waits until it is healthy.
pub fn spawn_mock(args: &[&str]) -> Proc {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = addr.to_string();
    let mut full = vec!["mock-llm", "--listen", &listen];
    full.extend_from_slice(args);
    spawn(&full, addr, None)
}

/// Runs `llmproxy serve --config FILE` with `config_yaml` written to FILE, `{listen}` replaced by
/// `127.0.0.1:<free port>`, and waits until the gateway answers GET /health there.
pub fn spawn_gateway(config_yaml: &str) -> Proc {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    assert!(
        config_yaml.contains("{listen}"),
        "the gateway config needs a {{listen}} placeholder"
    );
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let path = std::env::temp_dir().join(format!(
        "llmproxy-test-{}-{}.yaml",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, config_yaml.replace("{listen}", &addr.to_string()))
        .expect("write config");
    let file = path.to_str().expect("utf-8 temp path").to_string();
    spawn(&["serve", "--config", &file], addr, Some(path))
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body with chunked framing removed.
    pub body: Vec<u8>,
    /// The bytes after the head exactly as received.
    pub raw_body: Vec<u8>,
}

impl Response {
    /// First header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Chunk payloads in order, from `raw_body`, and whether the terminating chunk arrived.
    pub fn chunks(&self) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        let mut rest = &self.raw_body[..];
        loop {
            let Some(eol) = find(rest, b"\r\n") else {
                return (out, false);
            };
            let size = std::str::from_utf8(&rest[..eol]).ok().and_then(|s| {
                usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
            });
            let Some(size) = size else {
                return (out, false);
            };
            rest = &rest[eol + 2..];
            if size == 0 {
                return (out, true);
            }
            if rest.len() < size + 2 {
                return (out, false);
            }
            out.push(rest[..size].to_vec());
            rest = &rest[size + 2..];
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One connection that can carry several requests (keep-alive).
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Continues on a connection the test has already written to by hand.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("send request");
    }

    /// Reads one final response (1xx interim responses are skipped). Panics when the connection
    /// ends before a complete head; a body cut short is returned as far as it came.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .expect("connection closed before a response head")
    }

    fn try_read_response(&mut self) -> Option<Response> {
        loop {
            let mut status_line = String::new();
            if self.reader.read_line(&mut status_line).ok()? == 0 {
                return None;
            }
            let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    break;
                }
                let (n, v) = line.split_once(':')?;
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let mut r = Response {
                status,
                headers,
                body: Vec::new(),
                raw_body: Vec::new(),
            };
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            let length = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            if chunked {
                self.read_chunked(&mut r);
            } else if let Some(n) = length {
                let mut body = vec![0; n];
                let mut got = 0;
                while got < n {
                    match self.reader.read(&mut body[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
                body.truncate(got);
                r.raw_body = body.clone();
                r.body = body;
            } else if status != 204 && status != 304 {
                let _ = self.reader.read_to_end(&mut r.raw_body);
                r.body = r.raw_body.clone();
            }
            return Some(r);
        }
    }

    fn read_chunked(&mut self, r: &mut Response) {
        loop {
            let mut line = Vec::new();
            if self.reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            r.raw_body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let Ok(size) = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return;
            };
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut t = Vec::new();
                    if self.reader.read_until(b'\n', &mut t).unwrap_or(0) == 0 {
                        return;
                    }
                    r.raw_body.extend_from_slice(&t);
                    if t == b"\r\n" {
                        return;
                    }
                }
            }
            let mut data = vec![0; size + 2];
            let mut got = 0;
            while got < data.len() {
                match self.reader.read(&mut data[got..]) {
                    Ok(0) | Err(_) => {
                        r.raw_body.extend_from_slice(&data[..got]);
                        r.body.extend_from_slice(&data[..got.min(size)]);
                        return;
                    }
                    Ok(k) => got += k,
                }
            }
            r.raw_body.extend_from_slice(&data);
            r.body.extend_from_slice(&data[..size]);
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// New connection, sends `raw`, reads one full response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.read_response()
}

/// Builds a request with `Host`, `Content-Length` and `extra_headers`.
pub fn raw_request(
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (n, v) in extra_headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut raw = r.into_bytes();
    raw.extend_from_slice(body);
    raw
}

pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    extra_headers: &[(&str, &str)],
) -> Response {
    request(
        addr,
        &raw_request("POST", path, body.to_string().as_bytes(), extra_headers),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, &raw_request("GET", path, b"", &[]))
}

/// Like [`get`], but `None` while nothing listens or the connection fails.
fn try_get(addr: SocketAddr, path: &str) -> Option<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut c = Client {
        reader: BufReader::new(stream),
    };
    c.reader
        .get_mut()
        .write_all(&raw_request("GET", path, b"", &[]))
        .ok()?;
    c.try_read_response()
}

/// Scrapes `/metrics` and sums the samples named exactly `name` (any labels).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics");
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &[u8]) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in String::from_utf8_lossy(body).split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            events.extend(data.take());
        } else if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(acc) => {
                    acc.push('\n');
                    acc.push_str(d);
                }
                None => data = Some(d.to_string()),
            }
        }
    }
    events.extend(data);
    events
}

/// Polls `f` every 10 ms until it returns true (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
