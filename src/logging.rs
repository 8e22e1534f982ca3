//! Logging: installs the global `tracing` subscriber (text or JSON, a reloadable level filter)
//! and moves the writing of log lines off the workers.
//!
//! Workers format a line (the access log writes one per request) and hand it to a bounded
//! channel; one `llmproxy-log` thread writes to stderr. A worker never takes the stderr lock or
//! blocks in `write(2)` behind a slow journald; when the channel is full the line is dropped and
//! counted instead. This module must not be used to log from the log thread itself.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Lines buffered between the workers and the log thread.
const QUEUE: usize = 64 * 1024;

/// Changes the log filter of the running process.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

enum Line {
    Text(Vec<u8>),
    /// Written once everything before it is: lets [`Flush`] wait for the queue to drain.
    Flush(Sender<()>),
}

/// Writes what is still queued when dropped (at the end of `main`).
pub struct Flush {
    tx: Sender<Line>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.tx.send(Line::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[derive(Clone)]
struct QueueWriter {
    tx: Sender<Line>,
    dropped: Arc<AtomicU64>,
}

/// One formatted event: `fmt` writes it with a single `write_all`, sent as one line.
struct Event<'a>(&'a QueueWriter);

impl Write for Event<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.tx.try_send(Line::Text(buf.to_vec())) {
            Err(TrySendError::Full(_)) => {
                self.0.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                let _ = io::stderr().write_all(buf);
            }
            Ok(()) => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = Event<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Event(self)
    }
}

/// Largest batch the log thread gathers before one `write(2)`.
const BATCH: usize = 64 * 1024;

fn write_lines(rx: Receiver<Line>, dropped: Arc<AtomicU64>) {
    let mut reported = 0;
    let mut last_report = Instant::now();
    let mut err = io::stderr();
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    while let Ok(first) = rx.recv() {
        // Under load, many lines wait: one write for all of them instead of one each.
        let mut next = Some(first);
        while let Some(line) = next {
            match line {
                Line::Text(text) => batch.extend_from_slice(&text),
                Line::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let _ = err.write_all(&batch);
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        // Drops are reported at most once a second, not once per lost line.
        let now = dropped.load(Ordering::Relaxed);
        if now != reported && last_report.elapsed() >= Duration::from_secs(1) {
            let lost = now - reported;
            let _ = writeln!(err, "llmproxy: log queue full; {lost} line(s) dropped");
            reported = now;
            last_report = Instant::now();
        }
    }
}

/// Installs the global subscriber with `level` (a `tracing` filter), unless `RUST_LOG` is set,
/// which then wins at start and on reload. Returns the level setter for reloads and the guard
/// that flushes queued lines when `main` ends.
pub fn init(level: &str, format: LogFormat) -> (SetLogLevel, Option<Flush>) {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = if from_env {
        EnvFilter::from_default_env()
    } else {
        EnvFilter::new(level)
    };
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = QueueWriter {
        tx: tx.clone(),
        dropped: dropped.clone(),
    };
    let started = std::thread::Builder::new()
        .name("llmproxy-log".into())
        .spawn(move || write_lines(rx, dropped));
    let flush = started.is_ok().then_some(Flush { tx });
    let layer = fmt::layer()
        .with_writer(writer)
        .with_ansi(io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(layer.json())
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init(),
    };
    let set_level: SetLogLevel = Box::new(move |level: &str| {
        if from_env {
            return Ok(());
        }
        handle
            .reload(EnvFilter::new(level))
            .map_err(|e| e.to_string())
    });
    (set_level, flush)
}
