//! The access log on the workers: one line per request, formatted straight into a buffer the
//! worker thread owns, and handed to the log thread whole, when it holds `log.buffer_size`
//! bytes or at the latest after `log.flush_interval` (nginx's `access_log ... buffer= flush=`).
//! The log thread writes each buffer with one `write(2)` (see the parent module).
//!
//! Why a request costs nothing measurable: the line is a few hundred bytes appended to memory
//! the worker already owns (a thread-local, so no lock and no shared cache line; the capacity is
//! kept, so no allocation); digits, escapes and the timestamp are written by hand (the date part
//! is formatted once a second), so no `fmt` machinery and no `tracing` event. Reading the clock
//! (vDSO) is the only call out. There is no syscall,
//! no channel send and no wake-up of another thread per line: those happen once per buffer
//! (hundreds of lines at the default 64 KiB) or once per interval, and the hand-over is a
//! `try_send` that drops the buffer's lines (counted) instead of waiting when the log thread is
//! behind. Emptied buffers come back through a pool, so steady state allocates nothing.
//!
//! This module must not write to a file or stderr itself, nor block a worker except in
//! [`flush_on_exit`], when the worker is done serving.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};

use super::count_dropped;
use crate::config::{LogConfig, LogFormat};
use crate::time::Rfc3339;

/// Buffers on their way to the log thread (and emptied ones on their way back): with the
/// default 64 KiB, at most 2 MiB waits to be written before lines are dropped.
const QUEUED_BUFFERS: usize = 32;
/// Room past `buffer_size` so the line that fills a buffer does not reallocate it.
const LINE_SLACK: usize = 4 << 10;
/// How long a worker that has stopped serving waits to hand over its last buffer.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// A worker's buffer of whole lines, handed to the log thread.
pub(super) struct Batch {
    pub(super) lines: u64,
    pub(super) bytes: Vec<u8>,
}

/// The log thread's ends: filled buffers to write, and the pool emptied ones go back to.
pub(super) struct Buffers {
    pub(super) filled: Receiver<Batch>,
    spare: Sender<Vec<u8>>,
    capacity: usize,
}

impl Buffers {
    /// Puts an emptied buffer back for a worker to reuse; a buffer grown by an unusually long
    /// line, or one the full pool has no room for, is freed instead.
    pub(super) fn recycle(&self, mut bytes: Vec<u8>) {
        if bytes.capacity() <= self.capacity {
            bytes.clear();
            let _ = self.spare.try_send(bytes);
        }
    }
}

/// The workers' ends, set once by [`install`].
struct Sink {
    filled: Sender<Batch>,
    spare: Receiver<Vec<u8>>,
    format: LogFormat,
    buffer_size: usize,
    flush_interval: Duration,
}

impl Sink {
    fn fresh_buffer(&self) -> Vec<u8> {
        self.spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.buffer_size + LINE_SLACK))
    }
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sets up the queues between the workers and the log thread; returns the log thread's ends.
pub(super) fn install(log: &LogConfig) -> Buffers {
    let (filled_tx, filled) = crossbeam_channel::bounded(QUEUED_BUFFERS);
    let (spare, spare_rx) = crossbeam_channel::bounded(QUEUED_BUFFERS);
    let _ = SINK.set(Sink {
        filled: filled_tx,
        spare: spare_rx,
        format: log.format,
        buffer_size: log.buffer_size,
        flush_interval: log.flush_interval,
    });
    Buffers {
        filled,
        spare,
        capacity: log.buffer_size + LINE_SLACK,
    }
}

/// What one access line says about a request; `"-"` where there is nothing to say.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    /// The key's configured name, never the key.
    pub key: &'a str,
    pub model: &'a str,
    pub path: &'a str,
    pub stream: bool,
    pub status: u16,
    /// Response bytes sent to the client.
    pub bytes: u64,
    /// Body read to first response byte; `None` when nothing came back.
    pub ttft: Option<Duration>,
    pub total: Duration,
    pub backend: &'a str,
    pub retries: u32,
}

/// The calling worker's lines not yet handed over.
struct WorkerBuffer {
    sink: &'static Sink,
    bytes: Vec<u8>,
    lines: u64,
    clock: Clock,
}

thread_local! {
    static BUFFER: RefCell<Option<WorkerBuffer>> = const { RefCell::new(None) };
}

impl WorkerBuffer {
    /// Hands the lines to the log thread and continues in a recycled buffer. When the log
    /// thread is behind, the lines are dropped (and counted) and the buffer is reused.
    fn hand_over(&mut self) {
        let sink = self.sink;
        let batch = Batch {
            lines: std::mem::take(&mut self.lines),
            bytes: std::mem::take(&mut self.bytes),
        };
        match sink.filled.try_send(batch) {
            Ok(()) => self.bytes = sink.fresh_buffer(),
            Err(e) => {
                let batch = e.into_inner();
                count_dropped(batch.lines);
                self.bytes = batch.bytes;
                self.bytes.clear();
            }
        }
    }
}

/// Appends `line` to the calling worker's buffer; hands the buffer over once it is full.
/// Nothing when the log filter turns the `access` target off (`log.level: "info,access=off"`),
/// a check `tracing` answers from its callsite cache.
pub fn write(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    BUFFER.with_borrow_mut(|buffer| {
        if buffer.is_none() {
            let Some(sink) = SINK.get() else {
                return;
            };
            *buffer = Some(WorkerBuffer {
                sink,
                bytes: sink.fresh_buffer(),
                lines: 0,
                clock: Clock::new(),
            });
        }
        let Some(buffer) = buffer else {
            return;
        };
        append(
            &mut buffer.bytes,
            &mut buffer.clock,
            buffer.sink.format,
            line,
            SystemTime::now(),
        );
        buffer.lines += 1;
        if buffer.bytes.len() >= buffer.sink.buffer_size {
            buffer.hand_over();
        }
    });
}

/// Runs on each worker: hands over whatever the worker buffered every `log.flush_interval`,
/// so a line waits at most that long. One timer per worker per interval, not per line.
pub async fn flush_every_interval() {
    let Some(sink) = SINK.get() else {
        return;
    };
    loop {
        monoio::time::sleep(sink.flush_interval).await;
        BUFFER.with_borrow_mut(|buffer| {
            if let Some(buffer) = buffer.as_mut().filter(|b| b.lines > 0) {
                buffer.hand_over();
            }
        });
    }
}

/// Hands over the calling worker's last lines, waiting for room if the log thread is behind:
/// called once the worker has drained, so SIGTERM loses no line.
pub fn flush_on_exit() {
    let Some(buffer) = BUFFER.take().filter(|b| b.lines > 0) else {
        return;
    };
    let batch = Batch {
        lines: buffer.lines,
        bytes: buffer.bytes,
    };
    if let Err(e) = buffer.sink.filled.send_timeout(batch, EXIT_WAIT) {
        count_dropped(e.into_inner().lines);
    }
}

/// The timestamp's date and time to the second, formatted once per second: lines add the
/// microseconds.
struct Clock {
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS.`
    prefix: [u8; 32],
    len: usize,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            second: u64::MAX,
            prefix: [0; 32],
            len: 0,
        }
    }

    /// RFC 3339 UTC with microseconds, as `tracing` wrote it.
    fn stamp(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        if since.as_secs() != self.second {
            let full = Rfc3339::new(now);
            let text = full.as_str().as_bytes();
            let len = text
                .iter()
                .rposition(|&b| b == b'.')
                .map_or(0, |dot| dot + 1);
            self.prefix[..len].copy_from_slice(&text[..len]);
            self.len = len;
            self.second = since.as_secs();
        }
        out.extend_from_slice(&self.prefix[..self.len]);
        push_padded(out, since.subsec_micros().into(), 6);
        out.push(b'Z');
    }
}

/// One line, in the shape `tracing-subscriber` gave it (so existing parsers keep working):
/// JSON `{"timestamp":..,"level":"INFO","fields":{"message":"request",..},"target":"access"}`,
/// or text `<time>  INFO access: request request_id="..." ... retries=0`.
fn append(
    out: &mut Vec<u8>,
    clock: &mut Clock,
    format: LogFormat,
    line: &AccessLine<'_>,
    now: SystemTime,
) {
    let json = format == LogFormat::Json;
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        clock.stamp(out, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
    } else {
        clock.stamp(out, now);
        out.extend_from_slice(b"  INFO access: request");
    }
    // JSON: `,"name":`; text: ` name=`.
    let name = |out: &mut Vec<u8>, name: &str| {
        if json {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        } else {
            out.push(b' ');
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
        }
    };
    name(out, "request_id");
    push_quoted(out, line.request_id);
    name(out, "key");
    push_quoted(out, line.key);
    name(out, "model");
    push_quoted(out, line.model);
    name(out, "path");
    push_quoted(out, line.path);
    name(out, "stream");
    out.extend_from_slice(if line.stream { b"true" } else { b"false" });
    name(out, "status");
    push_u64(out, line.status.into());
    name(out, "bytes");
    push_u64(out, line.bytes);
    name(out, "ttft_ms");
    match line.ttft {
        Some(ttft) => push_ms(out, ttft),
        None => out.extend_from_slice(b"-1.0"),
    }
    name(out, "total_ms");
    push_ms(out, line.total);
    name(out, "backend");
    push_quoted(out, line.backend);
    name(out, "retries");
    push_u64(out, line.retries.into());
    if json {
        out.extend_from_slice(b"},\"target\":\"access\"}\n");
    } else {
        out.push(b'\n');
    }
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `n` in exactly `width` digits, zero-padded (`n` must fit).
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for at in (start..start + width).rev() {
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Milliseconds with microsecond precision: `12.345`.
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    out.push(b'.');
    push_padded(out, micros % 1000, 3);
}

/// `s` as a JSON string: quotes, backslashes and control characters escaped, so a model name
/// or request id can neither break the JSON nor start a new line. The text format uses the same.
fn push_quoted(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    for (at, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..at]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(short);
        }
        plain = at + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(model: &str, ttft: Option<Duration>) -> AccessLine<'_> {
        AccessLine {
            request_id: "req-1",
            key: "team-a",
            model,
            path: "/v1/chat/completions",
            stream: true,
            status: 200,
            bytes: 1234,
            ttft,
            total: Duration::from_micros(12_045),
            backend: "http://10.0.0.1:8000",
            retries: 1,
        }
    }

    /// 2026-12-03T20:17:24.000042Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_796_329_044, 42_000)
    }

    #[test]
    fn text_lines_read_as_tracing_wrote_them() {
        let mut out = Vec::new();
        let ttft = Some(Duration::from_micros(587));
        append(
            &mut out,
            &mut Clock::new(),
            LogFormat::Text,
            &line("m", ttft),
            at(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-03T20:17:24.000042Z  INFO access: request request_id=\"req-1\" \
             key=\"team-a\" model=\"m\" path=\"/v1/chat/completions\" stream=true status=200 \
             bytes=1234 ttft_ms=0.587 total_ms=12.045 backend=\"http://10.0.0.1:8000\" \
             retries=1\n"
        );
    }

    #[test]
    fn json_lines_are_valid_json_whatever_the_model_name() {
        let model = "a\"b\\c\nd\u{1}é";
        let mut out = Vec::new();
        let mut clock = Clock::new();
        append(
            &mut out,
            &mut clock,
            LogFormat::Json,
            &line(model, None),
            at(),
        );
        let later = at() + Duration::from_secs(61);
        append(
            &mut out,
            &mut clock,
            LogFormat::Json,
            &line("m", None),
            later,
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let v = &lines[0];
        assert_eq!(v["timestamp"], "2026-12-03T20:17:24.000042Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["model"], model);
        assert_eq!(f["key"], "team-a");
        assert_eq!(f["stream"], true);
        assert_eq!(f["status"], 200);
        assert_eq!(f["bytes"], 1234);
        assert_eq!(f["ttft_ms"], -1.0);
        assert_eq!(f["total_ms"], 12.045);
        assert_eq!(f["retries"], 1);
        assert_eq!(lines[1]["timestamp"], "2026-12-03T20:18:25.000042Z");
    }

    #[test]
    fn numbers_are_written_in_full() {
        let mut out = Vec::new();
        push_u64(&mut out, 0);
        out.push(b' ');
        push_u64(&mut out, u64::MAX);
        out.push(b' ');
        push_ms(&mut out, Duration::from_micros(5));
        assert_eq!(out, b"0 18446744073709551615 0.005");
    }
}
