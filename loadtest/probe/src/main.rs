//! Streaming latency probe for the loadtest scripts (std, plus `libc` for `probe soak`'s epoll loop).
//!
//! `probe stream --addr HOST:PORT [--requests N] [--concurrency C] [--warmup W] [--max-tokens T] [--label L]
//!               [--auth TOKEN]` (TOKEN is sent as `Authorization: Bearer TOKEN`)
//!
//! Each of C threads opens one keep-alive connection (TCP_NODELAY) and sends its share of N
//! sequential streaming chat requests. Per request it measures, with a monotonic clock:
//! - TTFT: from just before writing the request to the read() that delivered the first byte
//!   of the first SSE `data:` event;
//! - the gap between successive `data:` events (excluding `data: [DONE]`), as seen by the
//!   client (events delivered by the same read() count as a gap of 0).
//!
//! Prints one JSON line: TTFT p50/p90/p99/mean/max, mean inter-event gap, all in microseconds.
//!
//! `probe soak --addr HOST:PORT --streams N [--ramp-ms R] [--tokens T] [--check words|count]
//!            [--rss-pid PID] [--rss-interval-ms MS] [--timeout-ms MS] [--steady-requests M] [--label L]`
//!
//! Opens N concurrent streaming chat requests (one connection each, all on one epoll loop),
//! started evenly over R ms, so that all N are open at once when a stream lasts longer than R.
//! Verifies every stream (status 200, T content events, each the simulator's word for its
//! position with `--check words`, `data: [DONE]` last), records TTFT per stream, and samples
//! VmRSS of PID every MS while it runs. Once all N are open it sends M sequential short streaming
//! requests on another connection and records their TTFT (steady state; default 500, 0: none).
//! Prints one JSON line (see `soak`), including the probe's own CPU time.
//!
//! `probe conversations --addr HOST:PORT [--tenants T] [--users U] [--turns K] [--system-tokens S]
//!            [--question-tokens Q] [--answer-tokens A] [--max-tokens M] [--concurrency C]
//!            [--hot-share P] [--header NAME] [--label L]`
//!
//! A multi-tenant, multi-turn chat workload with long shared system prompts (see `conversations`);
//! prints one JSON line with TTFT percentiles and requests/s.
//!
//! `probe free-ports N`      prints N distinct currently free TCP ports on 127.0.0.1.
//! `probe wait HOST:PORT MS` waits until HOST:PORT accepts a TCP connection (exit 1 on timeout).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::exit;
use std::time::{Duration, Instant};

mod conversations;
mod soak;

fn usage() -> ! {
    eprintln!(
        "usage: probe stream --addr HOST:PORT [--requests N] [--concurrency C] [--warmup W] \
         [--max-tokens T] [--label L] [--auth TOKEN]\n       probe soak --addr HOST:PORT --streams N [--ramp-ms R] [--tokens T] \
         [--check words|count] [--rss-pid PID] [--rss-interval-ms MS] [--timeout-ms MS] [--steady-requests M] \
         [--label L] [--auth TOKEN]\n       \
         probe conversations --addr HOST:PORT [--tenants T] [--users U] [--turns K] [--system-tokens S] \
         [--question-tokens Q] [--answer-tokens A] [--max-tokens M] [--concurrency C] [--hot-share P] \
         [--header NAME] [--label L]\n       \
         probe free-ports N\n       probe wait HOST:PORT TIMEOUT_MS"
    );
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("free-ports") => free_ports(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1)),
        Some("wait") => {
            let (Some(addr), Some(ms)) =
                (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
            else {
                usage()
            };
            wait(addr, ms)
        }
        Some("stream") => stream(&args[1..]),
        Some("soak") => soak::soak(&args[1..]),
        Some("conversations") => conversations::conversations(&args[1..]),
        _ => usage(),
    }
}

fn free_ports(n: usize) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| die(&format!("bind: {e}"))))
        .collect();
    let ports: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    println!("{}", ports.join(" "));
}

fn wait(addr: &str, ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("probe: {addr} did not accept connections within {ms} ms");
    exit(1)
}

fn die(msg: &str) -> ! {
    eprintln!("probe: {msg}");
    exit(1)
}

struct Opts {
    addr: String,
    requests: usize,
    concurrency: usize,
    warmup: usize,
    max_tokens: u32,
    label: String,
    auth: String,
}

fn parse_opts(args: &[String]) -> Opts {
    let mut o = Opts {
        addr: String::new(),
        requests: 2000,
        concurrency: 1,
        warmup: 100,
        max_tokens: 8,
        label: String::new(),
        auth: String::new(),
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let num = || {
            v.parse::<usize>()
                .unwrap_or_else(|_| die(&format!("bad number for {k}: {v}")))
        };
        match k.as_str() {
            "--addr" => o.addr = v.clone(),
            "--requests" => o.requests = num(),
            "--concurrency" => o.concurrency = num().max(1),
            "--warmup" => o.warmup = num(),
            "--max-tokens" => o.max_tokens = num() as u32,
            "--label" => o.label = v.clone(),
            "--auth" => o.auth = v.clone(),
            _ => usage(),
        }
    }
    if o.addr.is_empty() {
        usage()
    }
    o
}

/// What one request produced.
#[derive(Default)]
struct Sample {
    ttft_us: f64,
    gap_sum_us: f64,
    gaps: u64,
    events: u64,
}

#[derive(Default)]
struct ThreadResult {
    samples: Vec<Sample>,
    errors: u64,
    first_error: Option<String>,
}

fn stream(args: &[String]) {
    let o = parse_opts(args);
    let body = format!(
        "{{\"model\":\"mock-model\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true,\"max_tokens\":{}}}",
        o.max_tokens
    );
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{}\
         Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n{}",
        o.addr,
        if o.auth.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {}\r\n", o.auth)
        },
        body.len(),
        body
    )
    .into_bytes();

    let c = o.concurrency;
    let wall = Instant::now();
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..c)
            .map(|i| {
                let share = o.requests / c + usize::from(i < o.requests % c);
                let warm = o.warmup / c + usize::from(i < o.warmup % c);
                let (addr, req) = (&o.addr, &request);
                s.spawn(move || run_thread(addr, req, warm, share))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect()
    });
    let wall_s = wall.elapsed().as_secs_f64();

    let mut ttft: Vec<f64> = Vec::new();
    let (mut gap_sum, mut gaps, mut events, mut errors) = (0.0, 0u64, 0u64, 0u64);
    let mut first_error = None;
    for r in results {
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        for smp in r.samples {
            ttft.push(smp.ttft_us);
            gap_sum += smp.gap_sum_us;
            gaps += smp.gaps;
            events += smp.events;
        }
    }
    ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = ttft.len();
    let mean = if n > 0 {
        ttft.iter().sum::<f64>() / n as f64
    } else {
        0.0
    };
    let gap_mean = if gaps > 0 { gap_sum / gaps as f64 } else { 0.0 };
    let events_mean = if n > 0 { events as f64 / n as f64 } else { 0.0 };
    println!(
        "{{\"label\":\"{}\",\"addr\":\"{}\",\"concurrency\":{},\"requests\":{},\"errors\":{},\
         \"ttft_us\":{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"mean\":{:.1},\"max\":{:.1}}},\
         \"gap_us_mean\":{:.1},\"events_per_request\":{:.2},\"wall_s\":{:.3},\"first_error\":{}}}",
        o.label,
        o.addr,
        c,
        n,
        errors,
        pct(&ttft, 50.0),
        pct(&ttft, 90.0),
        pct(&ttft, 99.0),
        mean,
        ttft.last().copied().unwrap_or(0.0),
        gap_mean,
        events_mean,
        wall_s,
        match first_error {
            Some(e) => format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "'")),
            None => "null".into(),
        }
    );
    if n == 0 {
        exit(1);
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn run_thread(addr: &str, req: &[u8], warmup: usize, count: usize) -> ThreadResult {
    let mut res = ThreadResult {
        samples: Vec::with_capacity(count),
        ..Default::default()
    };
    let mut conn: Option<Conn> = None;
    let mut done = 0;
    let mut attempts = 0;
    while done < warmup + count {
        attempts += 1;
        if attempts > 2 * (warmup + count) + 10 {
            break; // everything fails: give up rather than spin
        }
        if conn.is_none() {
            match connect(addr) {
                Ok(s) => conn = Some(Conn::new(s)),
                Err(e) => {
                    note_error(&mut res, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        match c.one(req) {
            Ok((sample, keep)) => {
                if done >= warmup {
                    res.samples.push(sample);
                }
                done += 1;
                if !keep {
                    conn = None;
                }
            }
            Err(e) => {
                if done >= warmup {
                    note_error(&mut res, e);
                }
                done += 1;
                conn = None;
            }
        }
    }
    res
}

fn note_error(res: &mut ThreadResult, e: String) {
    res.errors += 1;
    if res.first_error.is_none() {
        res.first_error = Some(e);
    }
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

impl Conn {
    fn new(s: TcpStream) -> Conn {
        Conn {
            s,
            buf: vec![0; 64 * 1024],
            lo: 0,
            hi: 0,
        }
    }

    /// Reads more bytes into the buffer; returns the instant the read returned.
    fn fill(&mut self) -> Result<Instant, String> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi == self.buf.len() {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
            if self.hi == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self
            .s
            .read(&mut self.buf[self.hi..])
            .map_err(|e| format!("read: {e}"))?;
        let t = Instant::now();
        if n == 0 {
            return Err("connection closed by peer".into());
        }
        self.hi += n;
        Ok(t)
    }

    /// One request/response. Returns the sample and whether the connection can be reused.
    fn one(&mut self, req: &[u8]) -> Result<(Sample, bool), String> {
        if self.lo != self.hi {
            return Err("unexpected bytes before response".into());
        }
        let t0 = Instant::now();
        self.s.write_all(req).map_err(|e| format!("write: {e}"))?;

        // Response head.
        let mut t_read;
        let head_end = loop {
            t_read = self.fill()?;
            if let Some(p) = find(&self.buf[self.lo..self.hi], b"\r\n\r\n") {
                break self.lo + p + 4;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[self.lo..head_end]).to_ascii_lowercase();
        self.lo = head_end;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("bad status line")?;
        let mut framing = Framing::Close;
        let mut keep = true;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                match k.trim() {
                    "content-length" if !matches!(framing, Framing::Chunked) => {
                        framing = Framing::Length(v.parse().map_err(|_| "bad content-length")?);
                    }
                    "transfer-encoding" if v.contains("chunked") => framing = Framing::Chunked,
                    "connection" if v.contains("close") => keep = false,
                    _ => {}
                }
            }
        }
        if matches!(framing, Framing::Close) {
            keep = false;
        }

        // Body: decode framing, feed decoded bytes with their arrival time to the SSE scanner.
        let mut sse = Sse::new();
        let mut chunk = Chunked::new();
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => usize::MAX,
        };
        loop {
            let avail = &self.buf[self.lo..self.hi];
            let consumed = match framing {
                Framing::Length(_) => {
                    let k = avail.len().min(remaining);
                    sse.feed(&avail[..k], t_read);
                    remaining -= k;
                    k
                }
                Framing::Chunked => chunk.feed(avail, |d| sse.feed(d, t_read))?,
                Framing::Close => {
                    sse.feed(avail, t_read);
                    avail.len()
                }
            };
            self.lo += consumed;
            let finished = match framing {
                Framing::Length(_) => remaining == 0,
                Framing::Chunked => chunk.done(),
                Framing::Close => false,
            };
            if finished {
                break;
            }
            match self.fill() {
                Ok(t) => t_read = t,
                Err(_) if matches!(framing, Framing::Close) => break,
                Err(e) => return Err(e),
            }
        }

        if status != 200 {
            return Err(format!("HTTP status {status}"));
        }
        let Some(first) = sse.first else {
            return Err("no SSE data event in response".into());
        };
        if !sse.done {
            return Err("stream ended without data: [DONE]".into());
        }
        let mut smp = Sample {
            ttft_us: us(first - t0),
            events: sse.events.len() as u64,
            ..Default::default()
        };
        if sse.events.len() >= 2 {
            smp.gap_sum_us = us(*sse.events.last().unwrap() - sse.events[0]);
            smp.gaps = sse.events.len() as u64 - 1;
        }
        Ok((smp, keep))
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Finds `data:` lines at line starts; remembers when each event's first byte arrived.
struct Sse {
    at_line_start: bool,
    matched: usize,
    match_time: Option<Instant>,
    in_data: bool,
    line: Vec<u8>,
    first: Option<Instant>,
    events: Vec<Instant>,
    done: bool,
}

impl Sse {
    fn new() -> Self {
        Sse {
            at_line_start: true,
            matched: 0,
            match_time: None,
            in_data: false,
            line: Vec::new(),
            first: None,
            events: Vec::new(),
            done: false,
        }
    }

    fn feed(&mut self, bytes: &[u8], t: Instant) {
        const PREFIX: &[u8] = b"data:";
        for &b in bytes {
            if self.in_data {
                if b == b'\n' {
                    let payload = String::from_utf8_lossy(&self.line);
                    if payload.trim() == "[DONE]" {
                        self.done = true;
                    } else {
                        self.events.push(self.match_time.unwrap());
                    }
                    self.in_data = false;
                    self.line.clear();
                    self.at_line_start = true;
                } else if self.line.len() < 32 {
                    self.line.push(b);
                }
                continue;
            }
            if self.at_line_start || self.matched > 0 {
                if b == PREFIX[self.matched] {
                    if self.matched == 0 {
                        self.match_time = Some(t);
                    }
                    self.matched += 1;
                    self.at_line_start = false;
                    if self.matched == PREFIX.len() {
                        self.matched = 0;
                        self.in_data = true;
                        if self.first.is_none() {
                            self.first = self.match_time;
                        }
                    }
                    continue;
                }
                self.matched = 0;
            }
            self.at_line_start = b == b'\n';
        }
    }
}

/// Incremental HTTP/1.1 chunked-body decoder (extensions and trailers skipped).
struct Chunked {
    state: CState,
    size: usize,
}

#[derive(PartialEq)]
enum CState {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerEndLf,
    Done,
}

impl Chunked {
    fn new() -> Self {
        Chunked {
            state: CState::Size,
            size: 0,
        }
    }

    fn done(&self) -> bool {
        self.state == CState::Done
    }

    /// Consumes from `input`, passing body data to `out`; returns bytes consumed.
    fn feed(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() && self.state != CState::Done {
            let b = input[i];
            match self.state {
                CState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.size = self.size.checked_mul(16).ok_or("chunk size overflow")?
                            + (b as char).to_digit(16).unwrap() as usize;
                    }
                    b';' | b' ' | b'\t' => self.state = CState::Ext,
                    b'\r' => self.state = CState::SizeLf,
                    _ => return Err(format!("bad chunk size byte {b:#x}")),
                },
                CState::Ext => {
                    if b == b'\r' {
                        self.state = CState::SizeLf
                    }
                }
                CState::SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk size line".into());
                    }
                    self.state = if self.size == 0 {
                        CState::TrailerStart
                    } else {
                        CState::Data
                    };
                }
                CState::Data => {
                    let k = (input.len() - i).min(self.size);
                    out(&input[i..i + k]);
                    self.size -= k;
                    i += k;
                    if self.size == 0 {
                        self.state = CState::DataCr;
                    }
                    continue;
                }
                CState::DataCr => {
                    if b != b'\r' {
                        return Err("missing CRLF after chunk".into());
                    }
                    self.state = CState::DataLf;
                }
                CState::DataLf => {
                    if b != b'\n' {
                        return Err("missing CRLF after chunk".into());
                    }
                    self.state = CState::Size;
                }
                CState::TrailerStart => {
                    self.state = if b == b'\r' {
                        CState::TrailerEndLf
                    } else {
                        CState::TrailerLine
                    }
                }
                CState::TrailerLine => {
                    if b == b'\n' {
                        self.state = CState::TrailerStart
                    }
                }
                CState::TrailerEndLf => {
                    if b != b'\n' {
                        return Err("bad chunked trailer".into());
                    }
                    self.state = CState::Done;
                }
                CState::Done => unreachable!(),
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_sse() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        let mut wire = Vec::new();
        for part in body.chunks(7) {
            wire.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
            wire.extend_from_slice(part);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\nNEXT");
        let mut c = Chunked::new();
        let mut sse = Sse::new();
        let t = Instant::now();
        let mut used = 0;
        for piece in wire.chunks(3) {
            if c.done() {
                break;
            }
            used += c.feed(piece, |d| sse.feed(d, t)).unwrap();
        }
        assert!(c.done());
        assert_eq!(&wire[used..], b"NEXT");
        assert_eq!(sse.events.len(), 2);
        assert!(sse.done);
        assert!(sse.first.is_some());
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 50.0), 50.0);
        assert_eq!(pct(&v, 99.0), 99.0);
        assert_eq!(pct(&[7.0], 99.0), 7.0);
    }
}
