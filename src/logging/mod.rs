//! Logging: installs the global `tracing` subscriber (text or JSON, a reloadable level filter)
//! and owns the `llmproxy-log` thread, the only thread that writes log output.
//!
//! Two kinds of output reach that thread. Diagnostic lines (`tracing` events: start, reloads,
//! warnings; a few a minute) are formatted by the subscriber where they happen and queued one by
//! one. Access lines (one per request) are formatted and buffered on each worker by [`access`]
//! and arrive as whole buffers, written to `log.access_path` or, by default, to stderr.
//!
//! A worker never takes the stderr lock, never waits in `write(2)` behind a slow journald or a
//! full disk, and never waits for this thread: when a queue is full or a write fails the lines
//! are dropped and counted ([`lines_dropped`], the metric `llmproxy_log_lines_dropped_total`).
//! This module must not log through `tracing` from the log thread itself (it would queue to
//! itself); the thread reports its own trouble straight to stderr.

pub mod access;

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// Diagnostic lines queued between the threads that log and the log thread.
const QUEUE: usize = 64 * 1024;

/// Log lines (diagnostic or access) dropped since start: queue full or write failed.
static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// The log thread's command queue, for [`reopen_access_log`] from the signal thread.
static COMMANDS: OnceLock<Sender<Command>> = OnceLock::new();

/// Log lines dropped since start, because a queue to the log thread was full or the write
/// failed (a full disk, a closed stderr).
pub fn lines_dropped() -> u64 {
    LINES_DROPPED.load(Ordering::Relaxed)
}

fn count_dropped(lines: u64) {
    LINES_DROPPED.fetch_add(lines, Ordering::Relaxed);
}

/// Changes the log filter of the running process.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

enum Command {
    /// One formatted diagnostic line.
    Line(Vec<u8>),
    /// Answered once everything queued before it, access buffers included, is written: lets
    /// [`Flush`] wait for the queues to drain.
    Flush(Sender<()>),
    /// Opens `log.access_path` again (SIGHUP, after logrotate moved the file away).
    Reopen,
}

/// Asks the log thread to reopen the access log file; nothing when access lines go to stderr.
/// Lines still buffered on the workers go to the new file.
pub fn reopen_access_log() {
    if let Some(commands) = COMMANDS.get() {
        let _ = commands.try_send(Command::Reopen);
    }
}

/// Writes what is still queued when dropped (at the end of `main`, after the workers handed
/// over their last access lines).
pub struct Flush {
    commands: Sender<Command>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.commands.send(Command::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[derive(Clone)]
struct QueueWriter {
    commands: Sender<Command>,
}

/// One formatted event: `fmt` writes it with a single `write_all`, sent as one line.
struct Event<'a>(&'a QueueWriter);

impl Write for Event<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.commands.try_send(Command::Line(buf.to_vec())) {
            Err(TrySendError::Full(_)) => count_dropped(1),
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

/// Largest run of diagnostic lines the log thread gathers before one `write(2)`.
const BATCH: usize = 64 * 1024;

/// The access log file, with the path it is reopened from.
struct AccessFile {
    path: PathBuf,
    file: File,
}

fn open_access_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// The log thread's state: where access lines go and what it last failed at.
struct LogThread {
    commands: Receiver<Command>,
    buffers: access::Buffers,
    /// `None`: access lines go to stderr.
    access_file: Option<AccessFile>,
    /// The last write error, reported with the drop count.
    failure: Option<io::Error>,
    reported: u64,
    last_report: Instant,
}

impl LogThread {
    fn run(mut self) {
        let mut lines = Vec::with_capacity(BATCH);
        let mut flushes = Vec::new();
        loop {
            crossbeam_channel::select! {
                recv(self.commands) -> first => {
                    let Ok(first) = first else { break };
                    // Under load, many lines wait: one write for all of them instead of one each.
                    let (mut count, mut reopen) = (0, false);
                    let mut next = Some(first);
                    while let Some(command) = next {
                        match command {
                            Command::Line(text) => {
                                lines.extend_from_slice(&text);
                                count += 1;
                            }
                            Command::Flush(done) => flushes.push(done),
                            Command::Reopen => reopen = true,
                        }
                        next = if lines.len() < BATCH {
                            self.commands.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    if let Err(e) = io::stderr().write_all(&lines) {
                        count_dropped(count);
                        self.failure = Some(e);
                    }
                    lines.clear();
                    if reopen {
                        self.reopen();
                    }
                    if !flushes.is_empty() {
                        while let Ok(batch) = self.buffers.filled.try_recv() {
                            self.write_access(batch);
                        }
                        for done in flushes.drain(..) {
                            let _ = done.send(());
                        }
                    }
                }
                recv(self.buffers.filled) -> batch => {
                    let Ok(batch) = batch else { break };
                    self.write_access(batch);
                }
            }
            self.report_drops();
        }
    }

    /// One `write(2)` (or a few, when short) for a worker's whole buffer. A failed write drops
    /// the buffer's lines; the worker never knows.
    fn write_access(&mut self, batch: access::Batch) {
        let written = match &mut self.access_file {
            Some(f) => f.file.write_all(&batch.bytes),
            None => io::stderr().write_all(&batch.bytes),
        };
        if let Err(e) = written {
            count_dropped(batch.lines);
            self.failure = Some(e);
        }
        self.buffers.recycle(batch.bytes);
    }

    fn reopen(&mut self) {
        let Some(current) = &mut self.access_file else {
            return;
        };
        match open_access_file(&current.path) {
            Ok(file) => current.file = file,
            Err(e) => {
                let _ = writeln!(
                    io::stderr(),
                    "llmproxy: cannot reopen the access log {}: {e}; still writing to the old file",
                    current.path.display()
                );
            }
        }
    }

    /// Drops are reported at most once a second, not once per lost line.
    fn report_drops(&mut self) {
        let now = lines_dropped();
        if now == self.reported || self.last_report.elapsed() < Duration::from_secs(1) {
            return;
        }
        let lost = now - self.reported;
        let why = match self.failure.take() {
            Some(e) => format!("last write failed: {e}"),
            None => "log queue full".into(),
        };
        let _ = writeln!(io::stderr(), "llmproxy: {lost} log line(s) dropped ({why})");
        self.reported = now;
        self.last_report = Instant::now();
    }
}

/// Installs the global subscriber with `log.level` (a `tracing` filter), unless `RUST_LOG` is
/// set, which then wins at start and on reload; opens `log.access_path` and starts the log
/// thread. Returns the level setter for reloads and the guard that flushes queued lines when
/// `main` ends. Fails when the access log file cannot be opened.
pub fn init(log: &LogConfig) -> io::Result<(SetLogLevel, Flush)> {
    let access_file = match &log.access_path {
        Some(path) => Some(AccessFile {
            file: open_access_file(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open log.access_path {}: {e}", path.display()),
                )
            })?,
            path: path.clone(),
        }),
        None => None,
    };
    let (commands, commands_rx) = crossbeam_channel::bounded(QUEUE);
    let buffers = access::install(log);
    std::thread::Builder::new()
        .name("llmproxy-log".into())
        .spawn(move || {
            LogThread {
                commands: commands_rx,
                buffers,
                access_file,
                failure: None,
                reported: 0,
                last_report: Instant::now(),
            }
            .run()
        })?;
    let _ = COMMANDS.set(commands.clone());

    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = if from_env {
        EnvFilter::from_default_env()
    } else {
        EnvFilter::new(&log.level)
    };
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let writer = QueueWriter {
        commands: commands.clone(),
    };
    let layer = fmt::layer()
        .with_writer(writer)
        .with_ansi(io::stderr().is_terminal());
    let _ = match log.format {
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
    Ok((set_level, Flush { commands }))
}
