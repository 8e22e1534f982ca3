//! `probe soak`: many concurrent SSE streams at once, each verified event by event.
//!
//! One thread per stream with a 64 KiB stack (`std::thread::Builder::stack_size`): std has no
//! readiness API, and a blocked thread costs the client little memory. Stream `i` starts at
//! `i * ramp / N`; with streams longer than the ramp all N are open at the same time.
//!
//! A stream counts as ok only if: the status is 200, the body is chunked or has a length, every
//! `data:` event before `data: [DONE]` parses as far as we look, the number of events with
//! non-empty `delta.content` equals `--tokens`, with `--check words` the k-th such content equals
//! the simulator's word `k` (mirrors `WORDS` in src/mock/openai.rs), `[DONE]` arrives and nothing
//! follows it. TTFT: request write to the `read()` that delivered the first `data:` line.
//! "Open" streams: response head received and `[DONE]` not yet read.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{die, find, pct, us, usage, Chunked};

/// The simulator's deterministic output: token `i` is `WORDS[i % 16]` (src/mock/openai.rs).
const WORDS: [&str; 16] = [
    "hello ",
    "world ",
    "this ",
    "is ",
    "a ",
    "simulated ",
    "response ",
    "from ",
    "the ",
    "mock ",
    "language ",
    "model ",
    "running ",
    "behind ",
    "llmproxy ",
    "today ",
];

#[derive(Clone, Copy, PartialEq)]
enum Check {
    Words,
    Count,
}

struct Opts {
    addr: SocketAddr,
    streams: usize,
    ramp_ms: u64,
    tokens: u64,
    check: Check,
    rss_pid: Option<u32>,
    rss_interval_ms: u64,
    timeout_ms: u64,
    label: String,
    model: String,
    path: String,
    auth: String,
}

fn parse(args: &[String]) -> Opts {
    let mut addr = None;
    let mut o = Opts {
        addr: "127.0.0.1:1".parse().unwrap(),
        streams: 1000,
        ramp_ms: 1000,
        tokens: 50,
        check: Check::Words,
        rss_pid: None,
        rss_interval_ms: 500,
        timeout_ms: 60_000,
        label: String::new(),
        model: "mock-model".into(),
        path: "/v1/chat/completions".into(),
        auth: "x".into(),
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let num = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| die(&format!("bad number for {k}: {v}")))
        };
        match k.as_str() {
            "--addr" => addr = Some(v.clone()),
            "--streams" => o.streams = num().max(1) as usize,
            "--ramp-ms" => o.ramp_ms = num(),
            "--tokens" => o.tokens = num(),
            "--check" => {
                o.check = match v.as_str() {
                    "words" => Check::Words,
                    "count" => Check::Count,
                    _ => die("--check is words or count"),
                }
            }
            "--rss-pid" => o.rss_pid = Some(num() as u32),
            "--rss-interval-ms" => o.rss_interval_ms = num().max(10),
            "--timeout-ms" => o.timeout_ms = num().max(1),
            "--label" => o.label = v.clone(),
            "--model" => o.model = v.clone(),
            "--path" => o.path = v.clone(),
            "--auth" => o.auth = v.clone(),
            _ => usage(),
        }
    }
    let addr = addr.unwrap_or_else(|| usage());
    o.addr = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| die(&format!("bad --addr {addr}")));
    o
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Shared {
    open: AtomicUsize,
    max_open: AtomicUsize,
}

pub fn soak(args: &[String]) {
    let o = parse(args);
    let body = format!(
        "{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true,\"max_tokens\":{}}}",
        o.model, o.tokens
    );
    let request: Arc<[u8]> = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: Bearer {}\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n{}",
        o.path,
        o.addr,
        o.auth,
        body.len(),
        body
    )
    .into_bytes()
    .into();
    let shared = Arc::new(Shared {
        open: AtomicUsize::new(0),
        max_open: AtomicUsize::new(0),
    });

    // RSS sampler: (ms since start, open streams, VmRSS KiB).
    let stop = Arc::new(AtomicBool::new(false));
    let idle_rss = o.rss_pid.and_then(rss_kib);
    if o.rss_pid.is_some() && idle_rss.is_none() {
        die("cannot read VmRSS of --rss-pid");
    }
    let start = Instant::now();
    let sampler = o.rss_pid.map(|pid| {
        let (stop, shared, every) = (stop.clone(), shared.clone(), o.rss_interval_ms);
        std::thread::spawn(move || {
            let mut samples: Vec<(u64, usize, u64)> = Vec::new();
            loop {
                let done = stop.load(Ordering::Acquire);
                if let Some(r) = rss_kib(pid) {
                    samples.push((
                        start.elapsed().as_millis() as u64,
                        shared.open.load(Ordering::Relaxed),
                        r,
                    ));
                }
                if done {
                    return samples;
                }
                std::thread::sleep(Duration::from_millis(every));
            }
        })
    });

    let results: Arc<Mutex<Vec<Result<f64, String>>>> =
        Arc::new(Mutex::new(Vec::with_capacity(o.streams)));
    let mut handles = Vec::with_capacity(o.streams);
    let mut spawn_errors = Vec::new();
    for i in 0..o.streams {
        let at = start + Duration::from_micros(o.ramp_ms * 1000 * i as u64 / o.streams as u64);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let (req, shared, results) = (request.clone(), shared.clone(), results.clone());
        let (addr, tokens, check, timeout) = (
            o.addr,
            o.tokens,
            o.check,
            Duration::from_millis(o.timeout_ms),
        );
        let h = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let r = one_stream(addr, &req, tokens, check, timeout, &shared);
                results.lock().unwrap().push(r);
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => spawn_errors.push(format!("thread spawn: {e}")),
        }
    }
    let ramp_done_s = start.elapsed().as_secs_f64();
    for h in handles {
        let _ = h.join();
    }
    let wall_s = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let samples = sampler.map(|s| s.join().unwrap()).unwrap_or_default();

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut ttft: Vec<f64> = Vec::with_capacity(results.len());
    let mut errs: HashMap<String, u64> = HashMap::new();
    for e in spawn_errors {
        *errs.entry(e).or_default() += 1;
    }
    for r in results {
        match r {
            Ok(t) => ttft.push(t),
            Err(e) => *errs.entry(e).or_default() += 1,
        }
    }
    ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let failed: u64 = errs.values().sum();
    let mut errs: Vec<(String, u64)> = errs.into_iter().collect();
    errs.sort_by(|a, b| b.1.cmp(&a.1));
    let errs_json: Vec<String> = errs
        .iter()
        .take(5)
        .map(|(e, n)| {
            format!(
                "{{\"error\":\"{}\",\"count\":{n}}}",
                e.replace('\\', "\\\\").replace('"', "'")
            )
        })
        .collect();
    let n = ttft.len();
    let mean = if n > 0 {
        ttft.iter().sum::<f64>() / n as f64
    } else {
        0.0
    };
    // Peak over the samples taken while streams were open (the allocator may keep memory after).
    let peak = samples
        .iter()
        .filter(|s| s.1 > 0)
        .max_by_key(|s| s.2)
        .copied();
    let rss_end = samples.last().map(|s| s.2).unwrap_or(0);
    let rss_json = match (idle_rss, peak) {
        (Some(idle), Some((t, open, rss))) => format!(
            "\"rss_idle_kib\":{idle},\"rss_peak_kib\":{rss},\"rss_end_kib\":{rss_end},\"rss_peak_at_ms\":{t},\"open_at_peak\":{open},\
             \"rss_per_stream_kib\":{:.2},\"rss_samples\":[{}],",
            (rss as f64 - idle as f64) / o.streams as f64,
            samples.iter().map(|s| format!("[{},{},{}]", s.0, s.1, s.2)).collect::<Vec<_>>().join(",")
        ),
        _ => String::new(),
    };
    println!(
        "{{\"label\":\"{}\",\"addr\":\"{}\",\"streams\":{},\"ok\":{},\"failed\":{},\"tokens\":{},\"check\":\"{}\",\
         \"ramp_ms\":{},\"max_open\":{},{}\"ttft_us\":{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"mean\":{:.1},\"max\":{:.1}}},\
         \"ramp_s\":{:.3},\"wall_s\":{:.3},\"errors\":[{}]}}",
        o.label,
        o.addr,
        o.streams,
        n,
        failed,
        o.tokens,
        if o.check == Check::Words { "words" } else { "count" },
        o.ramp_ms,
        shared.max_open.load(Ordering::Relaxed),
        rss_json,
        pct(&ttft, 50.0),
        pct(&ttft, 90.0),
        pct(&ttft, 99.0),
        mean,
        ttft.last().copied().unwrap_or(0.0),
        ramp_done_s,
        wall_s,
        errs_json.join(",")
    );
    if failed > 0 {
        std::process::exit(3);
    }
}

/// Decrements the open-stream count when a stream that was counted as open ends, however it ends.
struct OpenGuard<'a>(&'a Shared, bool);

impl OpenGuard<'_> {
    fn open(&mut self) {
        if !self.1 {
            self.1 = true;
            let now = self.0.open.fetch_add(1, Ordering::Relaxed) + 1;
            self.0.max_open.fetch_max(now, Ordering::Relaxed);
        }
    }
    fn close(&mut self) {
        if self.1 {
            self.1 = false;
            self.0.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// One verified stream; returns its TTFT in µs.
fn one_stream(
    addr: SocketAddr,
    req: &[u8],
    tokens: u64,
    check: Check,
    timeout: Duration,
    shared: &Shared,
) -> Result<f64, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("timeout: {e}"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut guard = OpenGuard(shared, false);
    let mut buf = vec![0u8; 4096];
    let (mut lo, mut hi) = (0usize, 0usize);
    let t0 = Instant::now();
    s.write_all(req).map_err(|e| format!("write: {e}"))?;

    let read = |s: &mut TcpStream,
                buf: &mut Vec<u8>,
                lo: &mut usize,
                hi: &mut usize|
     -> Result<(Instant, bool), String> {
        if *lo == *hi {
            *lo = 0;
            *hi = 0;
        } else if *hi == buf.len() {
            buf.copy_within(*lo..*hi, 0);
            *hi -= *lo;
            *lo = 0;
            if *hi == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
        }
        let n = s
            .read(&mut buf[*hi..])
            .map_err(|e| format!("read: {}", e.kind()))?;
        *hi += n;
        Ok((Instant::now(), n == 0))
    };

    // Head.
    let mut t_read;
    let head_end = loop {
        let (t, eof) = read(&mut s, &mut buf, &mut lo, &mut hi)?;
        t_read = t;
        if let Some(p) = find(&buf[lo..hi], b"\r\n\r\n") {
            break lo + p + 4;
        }
        if eof {
            return Err("closed before response head".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[lo..head_end]).to_ascii_lowercase();
    lo = head_end;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let (mut chunked, mut length) = (false, None::<usize>);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim() {
                "transfer-encoding" if v.contains("chunked") => chunked = true,
                "content-length" => length = v.trim().parse().ok(),
                _ => {}
            }
        }
    }
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    guard.open();

    let mut ev = Events {
        check,
        line: Vec::new(),
        ttft: None,
        content: 0,
        done: false,
        bad: None,
    };
    let mut dec = Chunked::new();
    let mut remaining = length.unwrap_or(usize::MAX);
    let mut eof = false;
    loop {
        let avail = &buf[lo..hi];
        let used = if chunked {
            dec.feed(avail, |d| ev.feed(d, t_read, t0))?
        } else {
            let k = avail.len().min(remaining);
            ev.feed(&avail[..k], t_read, t0);
            remaining -= k;
            k
        };
        lo += used;
        if let Some(b) = ev.bad.take() {
            return Err(b);
        }
        if (chunked && dec.done()) || (!chunked && remaining == 0) {
            break;
        }
        if eof {
            if !chunked && length.is_none() {
                break;
            }
            return Err(if ev.done {
                "closed before end of body".into()
            } else {
                "closed before [DONE]".into()
            });
        }
        let (t, e) = read(&mut s, &mut buf, &mut lo, &mut hi)?;
        t_read = t;
        eof = e;
    }
    guard.close();
    if !ev.done {
        return Err("no data: [DONE]".into());
    }
    if ev.content != tokens {
        return Err(format!("{} content events, expected {tokens}", ev.content));
    }
    ev.ttft.ok_or_else(|| "no data event".into())
}

/// Line-wise SSE check of the decoded body.
struct Events {
    check: Check,
    line: Vec<u8>,
    ttft: Option<f64>,
    content: u64,
    done: bool,
    bad: Option<String>,
}

impl Events {
    fn feed(&mut self, bytes: &[u8], t: Instant, t0: Instant) {
        for &b in bytes {
            if b != b'\n' {
                if self.line.is_empty() && b == b'd' && self.ttft.is_none() {
                    self.ttft = Some(us(t - t0));
                }
                self.line.push(b);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            self.event_line(&line);
            self.line = line;
            self.line.clear();
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = payload.trim_ascii();
        if self.done {
            self.fail("data event after [DONE]".into());
            return;
        }
        if payload == b"[DONE]" {
            self.done = true;
            return;
        }
        const KEY: &[u8] = b"\"content\":\"";
        let Some(p) = find(payload, KEY) else { return };
        let rest = &payload[p + KEY.len()..];
        let Some(end) = rest.iter().position(|&c| c == b'"') else {
            self.fail("unterminated content".into());
            return;
        };
        let content = &rest[..end];
        if content.is_empty() {
            return;
        }
        if self.check == Check::Words {
            let want = WORDS[(self.content % WORDS.len() as u64) as usize].as_bytes();
            if content != want {
                self.fail(format!(
                    "content event {} is '{}', expected '{}'",
                    self.content,
                    String::from_utf8_lossy(content),
                    String::from_utf8_lossy(want)
                ));
            }
        }
        self.content += 1;
    }

    fn fail(&mut self, e: String) {
        if self.bad.is_none() {
            self.bad = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_in_order() {
        let mut ev = Events {
            check: Check::Words,
            line: Vec::new(),
            ttft: None,
            content: 0,
            done: false,
            bad: None,
        };
        let t = Instant::now();
        let body =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"hello \"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"world \"}}]}\n\ndata: [DONE]\n\n";
        for piece in body.chunks(5) {
            ev.feed(piece, t, t);
        }
        assert!(ev.bad.is_none());
        assert_eq!(ev.content, 2);
        assert!(ev.done && ev.ttft.is_some());

        let mut ev = Events {
            check: Check::Words,
            line: Vec::new(),
            ttft: None,
            content: 0,
            done: false,
            bad: None,
        };
        ev.feed(b"data: {\"delta\":{\"content\":\"world \"}}\n\n", t, t);
        assert!(ev.bad.is_some());
        let mut ev = Events {
            check: Check::Count,
            line: Vec::new(),
            ttft: None,
            content: 0,
            done: false,
            bad: None,
        };
        ev.feed(
            b"data: [DONE]\n\ndata: {\"delta\":{\"content\":\"x\"}}\n\n",
            t,
            t,
        );
        assert!(ev.bad.is_some());
    }
}
