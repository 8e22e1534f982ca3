//! `probe soak`: many concurrent SSE streams at once, each verified event by event, and the TTFT
//! of new requests while they are all open.
//!
//! The streams run on one thread: an epoll loop (level-triggered, via `libc`) over N non-blocking
//! sockets. The earlier client used one OS thread per stream; at 10,000 streams on a 2-core box the
//! client's own thread creation and per-event wake-ups (load average ~78) dominated the TTFTs it
//! measured and even tripped its read timeouts. Here a stream costs a socket, a few hundred bytes of
//! state and one `read()` per event, all read into one shared buffer: every byte is consumed as it
//! arrives (the chunked decoder and the SSE check are incremental), only an incomplete response head
//! is kept per stream.
//!
//! Stream `i` starts (non-blocking connect) at `i * ramp / N`; with streams longer than the ramp all
//! N are open at the same time. A stream counts as ok only if: the status is 200, the body is chunked,
//! has a length or ends at the close, every `data:` event before `data: [DONE]` parses as far as we
//! look, the number of events with non-empty `delta.content` equals `--tokens`, with `--check words`
//! the k-th such content equals the simulator's word `k` (mirrors `WORDS` in src/mock/openai.rs),
//! `[DONE]` arrives and nothing follows it. Ramp TTFT: request write to the `read()` that delivered
//! the first `data:` line; the loop takes that time when `read()` returns, so it includes waiting
//! behind other sockets ready in the same wake-up. "Open" streams: response head received and
//! `[DONE]` not yet read.
//!
//! Steady state: once every stream has started and has its response head (the plateau), a second
//! thread sends `--steady-requests` sequential streaming requests with `max_tokens` 1 on one
//! keep-alive connection to the same address (`probe stream`'s client) and records their TTFT: what
//! a new request pays while the N streams are held, free of the ramp's connection burst. No stream
//! opens after the plateau, so the open count when the steady requests end is its minimum.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{die, find, pct, run_thread, us, usage, Chunked, Framing, ThreadResult};

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

/// A connect that has not completed by then fails the stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often connect and read timeouts are checked (their resolution).
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Steady requests sent first and not recorded: the first one opens the client connection (and,
/// through a gateway, possibly its upstream connection), which is not what a steady request pays.
const STEADY_WARMUP: usize = 10;
/// The read buffer all streams share; an SSE event is a few hundred bytes.
const READ_BUF: usize = 64 * 1024;
/// Readiness events taken per `epoll_pwait2`.
const MAX_EVENTS: usize = 1024;

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
    steady_requests: usize,
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
        steady_requests: 500,
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
            "--steady-requests" => o.steady_requests = num() as usize,
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

/// The streaming chat request, asking for `max_tokens` tokens.
fn request(o: &Opts, max_tokens: u64) -> Vec<u8> {
    let body = format!(
        "{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true,\"max_tokens\":{}}}",
        o.model, max_tokens
    );
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: Bearer {}\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n{}",
        o.path,
        o.addr,
        o.auth,
        body.len(),
        body
    )
    .into_bytes()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User and system CPU seconds of this process so far (all threads).
fn cpu_s() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

pub fn soak(args: &[String]) {
    let o = parse(args);
    let idle_rss = o.rss_pid.and_then(rss_kib);
    if o.rss_pid.is_some() && idle_rss.is_none() {
        die("cannot read VmRSS of --rss-pid");
    }
    let r = run(&o).unwrap_or_else(|e| die(&format!("epoll: {e}")));
    let (cpu_user, cpu_sys) = cpu_s();

    let mut ttft = r.ttft;
    ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let failed: u64 = r.errors.values().sum();
    let mut errs: Vec<(String, u64)> = r.errors.into_iter().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(e.1));
    let errs_json: Vec<String> = errs
        .iter()
        .take(5)
        .map(|(e, n)| format!("{{\"error\":{},\"count\":{n}}}", json_str(e)))
        .collect();
    // Peak over the samples taken while streams were open (the allocator may keep memory after).
    let samples = &r.samples;
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
    let steady_errors = r.steady.as_ref().map_or(0, |s| s.result.errors);
    let steady_json = match r.steady {
        Some(s) => {
            let mut t: Vec<f64> = s.result.samples.iter().map(|x| x.ttft_us).collect();
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            format!(
                "\"steady\":{{\"requests\":{},\"warmup\":{STEADY_WARMUP},\"ok\":{},\"errors\":{},\"first_error\":{},\
                 \"at_ms\":{},\"wall_s\":{:.3},\"open_at_start\":{},\"open_at_end\":{}}},\"steady_ttft_us\":{},",
                o.steady_requests,
                t.len(),
                s.result.errors,
                s.result.first_error.as_deref().map_or("null".into(), json_str),
                s.at_ms,
                s.wall_s,
                s.open_at_start,
                s.open_at_end,
                summary(&t)
            )
        }
        None => String::new(),
    };
    println!(
        "{{\"label\":\"{}\",\"addr\":\"{}\",\"streams\":{},\"ok\":{},\"failed\":{},\"tokens\":{},\"check\":\"{}\",\
         \"ramp_ms\":{},\"max_open\":{},{}\"ttft_us\":{},{}\
         \"client_cpu_s\":{{\"user\":{:.3},\"sys\":{:.3},\"total\":{:.3}}},\"ramp_s\":{:.3},\"wall_s\":{:.3},\"errors\":[{}]}}",
        o.label,
        o.addr,
        o.streams,
        ttft.len(),
        failed,
        o.tokens,
        if o.check == Check::Words { "words" } else { "count" },
        o.ramp_ms,
        r.max_open,
        rss_json,
        summary(&ttft),
        steady_json,
        cpu_user,
        cpu_sys,
        cpu_user + cpu_sys,
        r.ramp_s,
        r.wall_s,
        errs_json.join(",")
    );
    if failed > 0 || steady_errors > 0 {
        std::process::exit(3);
    }
}

/// `{"p50":..,"p90":..,"p99":..,"mean":..,"max":..}` of sorted µs values.
fn summary(sorted: &[f64]) -> String {
    let mean = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().sum::<f64>() / sorted.len() as f64
    };
    format!(
        "{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"mean\":{:.1},\"max\":{:.1}}}",
        pct(sorted, 50.0),
        pct(sorted, 90.0),
        pct(sorted, 99.0),
        mean,
        sorted.last().copied().unwrap_or(0.0)
    )
}

fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "'"))
}

/// What a soak produced.
struct Outcome {
    /// TTFT in µs of every stream that passed.
    ttft: Vec<f64>,
    /// Failed streams by error.
    errors: HashMap<String, u64>,
    max_open: usize,
    /// (ms since start, open streams, VmRSS KiB).
    samples: Vec<(u64, usize, u64)>,
    steady: Option<Steady>,
    /// When the last stream was started, and when everything had ended, in s since start.
    ramp_s: f64,
    wall_s: f64,
}

/// The steady-state requests' results and the open streams around them.
struct Steady {
    result: ThreadResult,
    at_ms: u64,
    wall_s: f64,
    open_at_start: usize,
    open_at_end: usize,
}

/// Ramps the streams up, drives them to their end, and runs the steady requests at the plateau.
fn run(o: &Opts) -> io::Result<Outcome> {
    let start = Instant::now();
    let mut s = Streams::new(o)?;
    let mut samples = Vec::new();
    let sample_every = Duration::from_millis(o.rss_interval_ms);
    let mut next_sample = start;
    let mut next_sweep = start + SWEEP_EVERY;
    let mut steady: Option<JoinHandle<Steady>> = None;
    let mut ramp_s = 0.0;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut buf = vec![0u8; READ_BUF];
    let starts_at =
        |i: usize| start + Duration::from_micros(o.ramp_ms * 1000 * i as u64 / o.streams as u64);
    loop {
        let now = Instant::now();
        while s.started < o.streams && starts_at(s.started) <= now {
            s.start(now);
            if s.started == o.streams {
                ramp_s = start.elapsed().as_secs_f64();
            }
        }
        if steady.is_none() && o.steady_requests > 0 && s.at_plateau() {
            steady = Some(spawn_steady(o, s.open.clone(), start));
        }
        if let Some(pid) = o.rss_pid.filter(|_| now >= next_sample) {
            if let Some(r) = rss_kib(pid) {
                samples.push((
                    start.elapsed().as_millis() as u64,
                    s.open.load(Ordering::Relaxed),
                    r,
                ));
            }
            next_sample += sample_every;
        }
        if now >= next_sweep {
            s.sweep(now);
            next_sweep = now + SWEEP_EVERY;
        }
        if s.started == o.streams && s.active() == 0 {
            break;
        }
        let mut wake = next_sweep;
        if s.started < o.streams {
            wake = wake.min(starts_at(s.started));
        }
        if o.rss_pid.is_some() {
            wake = wake.min(next_sample);
        }
        let n = s
            .epoll
            .wait(&mut events, wake.saturating_duration_since(Instant::now()))?;
        for ev in &events[..n] {
            s.ready(ev.u64 as usize, &mut buf);
        }
    }
    let steady = steady.map(|h| h.join().expect("steady-state thread panicked"));
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(r) = o.rss_pid.and_then(rss_kib) {
        samples.push((start.elapsed().as_millis() as u64, 0, r));
    }
    Ok(Outcome {
        ttft: s.ttft,
        errors: s.errors,
        max_open: s.max_open,
        samples,
        steady,
        ramp_s,
        wall_s,
    })
}

/// Sends the steady-state requests on a thread of their own, so that their timestamps do not wait
/// for the loop's other sockets.
fn spawn_steady(o: &Opts, open: Arc<AtomicUsize>, start: Instant) -> JoinHandle<Steady> {
    let (addr, req, n) = (o.addr.to_string(), request(o, 1), o.steady_requests);
    std::thread::spawn(move || {
        let t = Instant::now();
        let open_at_start = open.load(Ordering::Relaxed);
        let result = run_thread(&addr, &req, STEADY_WARMUP, n);
        Steady {
            result,
            at_ms: (t - start).as_millis() as u64,
            wall_s: t.elapsed().as_secs_f64(),
            open_at_start,
            open_at_end: open.load(Ordering::Relaxed),
        }
    })
}

/// The N streams and their tallies; stream `i` is `conns[i]` and epoll token `i`.
struct Streams<'a> {
    o: &'a Opts,
    epoll: Epoll,
    request: Vec<u8>,
    conns: Vec<Option<Stream>>,
    started: usize,
    finished: usize,
    /// Streams in their body; shared with the steady-state thread, written only here.
    open: Arc<AtomicUsize>,
    max_open: usize,
    ttft: Vec<f64>,
    errors: HashMap<String, u64>,
}

impl<'a> Streams<'a> {
    fn new(o: &'a Opts) -> io::Result<Self> {
        Ok(Streams {
            o,
            epoll: Epoll::new()?,
            request: request(o, o.tokens),
            conns: (0..o.streams).map(|_| None).collect(),
            started: 0,
            finished: 0,
            open: Arc::new(AtomicUsize::new(0)),
            max_open: 0,
            ttft: Vec::with_capacity(o.streams),
            errors: HashMap::new(),
        })
    }

    fn active(&self) -> usize {
        self.started - self.finished
    }

    /// Every stream started, and every live one past its response head.
    fn at_plateau(&self) -> bool {
        self.started == self.o.streams && self.active() == self.open.load(Ordering::Relaxed)
    }

    /// Starts stream number `started`: a non-blocking connect, completion reported as EPOLLOUT.
    fn start(&mut self, now: Instant) {
        let i = self.started;
        self.started += 1;
        let sock = connect_nonblocking(self.o.addr).and_then(|sock| {
            self.epoll.ctl(
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                libc::EPOLLOUT as u32,
                i,
            )?;
            Ok(sock)
        });
        match sock {
            Ok(sock) => {
                let response = Response::new(self.o.tokens, self.o.check);
                self.conns[i] = Some(Stream {
                    sock,
                    phase: Phase::Connecting,
                    response,
                    t0: now,
                    last_io: now,
                });
            }
            Err(e) => self.tally(Err(format!("connect: {e}"))),
        }
    }

    /// Handles readiness of stream `i`.
    fn ready(&mut self, i: usize, buf: &mut [u8]) {
        let Some(st) = self.conns[i].as_mut() else {
            return;
        };
        let was_open = st.is_open();
        let r = match st.phase {
            Phase::Connecting | Phase::Sending(_) => st.writable(&self.request).and_then(|sent| {
                if sent {
                    self.epoll
                        .ctl(
                            libc::EPOLL_CTL_MOD,
                            st.sock.as_raw_fd(),
                            libc::EPOLLIN as u32,
                            i,
                        )
                        .map_err(|e| format!("epoll: {e}"))?;
                }
                Ok(None)
            }),
            Phase::Receiving => st.readable(buf),
        };
        if !was_open && st.is_open() {
            let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
            self.max_open = self.max_open.max(now);
        }
        // A socket error or hang-up needs no flag check: it is what the connect check, the write
        // or the read returns.
        match r {
            Ok(None) => {}
            Ok(Some(ttft)) => self.finish(i, Ok(ttft)),
            Err(e) => self.finish(i, Err(e)),
        }
    }

    /// Fails the streams whose connect or last read/write is too long ago.
    fn sweep(&mut self, now: Instant) {
        let read_timeout = Duration::from_millis(self.o.timeout_ms);
        for i in 0..self.started {
            if let Some(e) = self.conns[i]
                .as_ref()
                .and_then(|st| st.timed_out(now, read_timeout))
            {
                self.finish(i, Err(e));
            }
        }
    }

    /// Ends stream `i` (closing its socket takes it out of the epoll set) and counts its result.
    fn finish(&mut self, i: usize, r: Result<f64, String>) {
        if let Some(st) = self.conns[i].take() {
            if st.is_open() {
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
            self.tally(r);
        }
    }

    fn tally(&mut self, r: Result<f64, String>) {
        self.finished += 1;
        match r {
            Ok(t) => self.ttft.push(t),
            Err(e) => *self.errors.entry(e).or_default() += 1,
        }
    }
}

enum Phase {
    /// Non-blocking connect under way.
    Connecting,
    /// Writing the request; this many bytes are out.
    Sending(usize),
    /// Request written; reading the response.
    Receiving,
}

/// One stream's socket and where it is.
struct Stream {
    sock: TcpStream,
    phase: Phase,
    response: Response,
    /// When the request write began (TTFT starts here); until then when the connect began.
    t0: Instant,
    /// Last progress (connect done, bytes written or read): the timeouts count from here.
    last_io: Instant,
}

impl Stream {
    fn is_open(&self) -> bool {
        self.response.body.is_some()
    }

    /// Completes the connect and writes the request; true once it is all written.
    fn writable(&mut self, req: &[u8]) -> Result<bool, String> {
        if let Phase::Connecting = self.phase {
            match self.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return Err(format!("connect: {e}")),
            }
            self.t0 = Instant::now();
            self.last_io = self.t0;
            self.phase = Phase::Sending(0);
        }
        let Phase::Sending(mut sent) = self.phase else {
            unreachable!("writable while receiving")
        };
        while sent < req.len() {
            match self.sock.write(&req[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        if sent > 0 {
            self.last_io = Instant::now();
        }
        self.phase = if sent == req.len() {
            Phase::Receiving
        } else {
            Phase::Sending(sent)
        };
        Ok(sent == req.len())
    }

    /// One `read()` into `buf`, fed to the response check; Some(TTFT µs) when the stream is done.
    fn readable(&mut self, buf: &mut [u8]) -> Result<Option<f64>, String> {
        let n = match self.sock.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(format!("read: {}", e.kind())),
        };
        let t = Instant::now();
        self.last_io = t;
        self.response.feed(&buf[..n], t, self.t0, n == 0)
    }

    fn timed_out(&self, now: Instant, read_timeout: Duration) -> Option<String> {
        let (limit, what) = match self.phase {
            Phase::Connecting => (CONNECT_TIMEOUT, "connect"),
            Phase::Sending(_) => (read_timeout, "write"),
            Phase::Receiving => (read_timeout, "read"),
        };
        (now - self.last_io > limit).then(|| format!("{what}: timed out"))
    }
}

/// One response, checked as its bytes arrive.
struct Response {
    tokens: u64,
    check: Check,
    /// The head so far, until it is complete.
    head: Vec<u8>,
    /// Set once the head said 200: the stream is open.
    body: Option<Body>,
}

struct Body {
    framing: Framing,
    chunked: Chunked,
    ev: Events,
}

impl Response {
    fn new(tokens: u64, check: Check) -> Self {
        Response {
            tokens,
            check,
            head: Vec::new(),
            body: None,
        }
    }

    /// Feeds bytes read at `t` (`eof`: the read returned 0). Some(TTFT µs) once the response is
    /// complete and correct; an error as soon as it cannot be.
    fn feed(
        &mut self,
        mut data: &[u8],
        t: Instant,
        t0: Instant,
        eof: bool,
    ) -> Result<Option<f64>, String> {
        let body = match &mut self.body {
            Some(b) => b,
            None => {
                let before = self.head.len();
                self.head.extend_from_slice(data);
                let Some(p) = find(&self.head, b"\r\n\r\n") else {
                    return if eof {
                        Err("closed before response head".into())
                    } else {
                        Ok(None)
                    };
                };
                let framing = parse_head(&self.head[..p + 4])?;
                // The terminator was not complete before these bytes, so it ends inside them.
                data = &data[p + 4 - before..];
                self.head = Vec::new();
                self.body.insert(Body {
                    framing,
                    chunked: Chunked::new(),
                    ev: Events::new(self.check),
                })
            }
        };
        let ev = &mut body.ev;
        let complete = match &mut body.framing {
            Framing::Chunked => {
                body.chunked.feed(data, |d| ev.feed(d, t, t0))?;
                body.chunked.done()
            }
            Framing::Length(remaining) => {
                let k = data.len().min(*remaining);
                ev.feed(&data[..k], t, t0);
                *remaining -= k;
                *remaining == 0
            }
            Framing::Close => {
                ev.feed(data, t, t0);
                eof
            }
        };
        if let Some(b) = ev.bad.take() {
            return Err(b);
        }
        if !complete {
            return match (eof, ev.done) {
                (false, _) => Ok(None),
                (true, true) => Err("closed before end of body".into()),
                (true, false) => Err("closed before [DONE]".into()),
            };
        }
        if !ev.done {
            return Err("no data: [DONE]".into());
        }
        if ev.content != self.tokens {
            return Err(format!(
                "{} content events, expected {}",
                ev.content, self.tokens
            ));
        }
        ev.ttft.map(Some).ok_or_else(|| "no data event".into())
    }
}

/// Status must be 200; chunked wins over a length, neither means the body ends at the close.
fn parse_head(head: &[u8]) -> Result<Framing, String> {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let (mut chunked, mut length) = (false, None);
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
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    })
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
    fn new(check: Check) -> Self {
        Events {
            check,
            line: Vec::new(),
            ttft: None,
            content: 0,
            done: false,
            bad: None,
        }
    }

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

/// The epoll instance of the stream loop.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative result is a new descriptor that we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: token as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Waits up to `timeout` for readiness. epoll_pwait2 takes a timespec: at 10,000 streams over
    /// 3 s the ramp starts one every 300 µs, finer than epoll_wait's milliseconds.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        // SAFETY: the kernel writes at most `events.len()` entries into `events`.
        let n = unsafe {
            libc::epoll_pwait2(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        match cvt(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A TCP socket connecting to `addr` without blocking (std's connect blocks, and a dropped SYN
/// would stall every stream of the loop for a second). Its completion is reported as writable.
fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any socket address.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: no pointers; a non-negative result is a new descriptor, owned by the TcpStream.
    let sock =
        unsafe { TcpStream::from_raw_fd(cvt(libc::socket(ss.ss_family as libc::c_int, ty, 0))?) };
    // SAFETY: `ss` holds a socket address of `len` bytes.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if let Err(e) = cvt(r) {
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    sock.set_nodelay(true)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_in_order() {
        let mut ev = Events::new(Check::Words);
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

        let mut ev = Events::new(Check::Words);
        ev.feed(b"data: {\"delta\":{\"content\":\"world \"}}\n\n", t, t);
        assert!(ev.bad.is_some());
        let mut ev = Events::new(Check::Count);
        ev.feed(
            b"data: [DONE]\n\ndata: {\"delta\":{\"content\":\"x\"}}\n\n",
            t,
            t,
        );
        assert!(ev.bad.is_some());
    }

    const SSE: &[u8] = b"data: {\"delta\":{\"content\":\"hello \"}}\n\ndata: {\"delta\":{\"content\":\"world \"}}\n\n\
        data: [DONE]\n\n";

    /// Feeds `wire` in `piece`-byte reads, then an EOF if the response wants more.
    fn respond(wire: &[u8], piece: usize) -> Result<Option<f64>, String> {
        let mut r = Response::new(2, Check::Words);
        let t = Instant::now();
        for p in wire.chunks(piece) {
            if let Some(ttft) = r.feed(p, t, t, false)? {
                return Ok(Some(ttft));
            }
        }
        r.feed(&[], t, t, true)
    }

    #[test]
    fn response_framings() {
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in SSE.chunks(9) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut length =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", SSE.len()).into_bytes();
        length.extend_from_slice(SSE);
        let mut close = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        close.extend_from_slice(SSE);
        for wire in [&chunked, &length, &close] {
            for piece in [1, 7, wire.len()] {
                assert!(
                    matches!(respond(wire, piece), Ok(Some(_))),
                    "{piece}-byte reads"
                );
            }
        }
        // Cut short, wrong status, one token too few.
        assert_eq!(
            respond(&chunked[..chunked.len() - 5], 64),
            Err("closed before end of body".into())
        );
        assert_eq!(
            respond(&length[..length.len() - 20], 64),
            Err("closed before [DONE]".into())
        );
        assert_eq!(
            respond(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", 64),
            Err("HTTP status 503".into())
        );
        assert_eq!(
            respond(b"HTTP/1.1 200 OK\r\n", 64),
            Err("closed before response head".into())
        );
        let mut short = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        short.extend_from_slice(b"data: {\"delta\":{\"content\":\"hello \"}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            respond(&short, 64),
            Err("1 content events, expected 2".into())
        );
    }
}
