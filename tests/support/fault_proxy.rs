//! A TCP fault proxy for the fault-injection tests: std threads, two per connection, between a
//! client (the gateway, or a usage sink's client) and a real server (the simulator, PostgreSQL,
//! Redis). It forwards bytes unchanged until told to break something:
//!
//! - per request, by a header the request carries (`x-fault: KIND`, only when built with
//!   [`FaultProxy::obeying`]): the response to that request is cut, stalled, trickled or
//!   replaced, counted in response bytes from that request on, so a pooled connection's earlier
//!   responses do not count;
//! - for everything, with [`FaultProxy::cut`]: every open connection is reset and new ones are
//!   reset as soon as they are accepted, until [`FaultProxy::restore`]; or with
//!   [`FaultProxy::hang`], a black hole: open connections forward nothing more, ever, and new
//!   ones are accepted and never answered, until restored. The server itself keeps running:
//!   shared services (PostgreSQL, Redis) are made unreachable without being stopped.
//!
//! Kinds: `reset:N` (forward N response bytes, then reset both sides), `fin:N` (forward N
//! bytes, then half-close toward the client: a FIN, the proxy still reads), `stall:N` (forward
//! N bytes, then nothing until the client gives up), `trickle:MS` (one byte per write, MS
//! milliseconds apart), `garbage` (answer with bytes that are not HTTP).

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// What the proxy does to the response of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Reset(usize),
    Fin(usize),
    Stall(usize),
    Trickle(u64),
    Garbage,
}

impl Fault {
    fn parse(v: &str) -> Fault {
        let (kind, n) = v.split_once(':').unwrap_or((v, "0"));
        let n: usize = n.trim().parse().expect("x-fault: a number after the colon");
        match kind.trim() {
            "reset" => Fault::Reset(n),
            "fin" => Fault::Fin(n),
            "stall" => Fault::Stall(n),
            "trickle" => Fault::Trickle(n as u64),
            "garbage" => Fault::Garbage,
            other => panic!("unknown x-fault kind {other:?}"),
        }
    }

    /// Response bytes forwarded before the fault strikes.
    fn after(self) -> Option<usize> {
        match self {
            Fault::Reset(n) | Fault::Fin(n) | Fault::Stall(n) => Some(n),
            Fault::Trickle(_) | Fault::Garbage => None,
        }
    }
}

/// Not an HTTP response: what a backend port taken by another protocol sends.
pub const GARBAGE: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 not http at all\r\n\r\n";

struct Shared {
    target: SocketAddr,
    obey: bool,
    cut: AtomicBool,
    hanging: AtomicBool,
    /// [`FaultProxy::hang`] calls so far: a connection opened before the latest is a black hole.
    hangs: AtomicU64,
    /// Both sockets of every connection still open, to reset them on [`FaultProxy::cut`].
    open: Mutex<Vec<(Weak<TcpStream>, Weak<TcpStream>)>>,
    accepted: AtomicU64,
    faults: AtomicU64,
}

/// The running proxy; its threads live as long as the test process (they hold nothing once
/// their connections close).
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Forwards to `target`, never injecting a per-request fault.
    pub fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::spawn(target, false)
    }

    /// Forwards to `target` and obeys `x-fault` in the requests.
    pub fn obeying(target: SocketAddr) -> FaultProxy {
        FaultProxy::spawn(target, true)
    }

    fn spawn(target: SocketAddr, obey: bool) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            obey,
            cut: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            hangs: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                if s.cut.load(Ordering::SeqCst) {
                    reset(&conn);
                    continue;
                }
                if s.hanging.load(Ordering::SeqCst) {
                    std::thread::spawn(move || swallow(&conn));
                    continue;
                }
                let s = s.clone();
                std::thread::spawn(move || relay(s, conn));
            }
        });
        FaultProxy { addr, shared }
    }

    /// Resets every open connection and every new one until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let open = std::mem::take(&mut *self.shared.open.lock().unwrap());
        for (client, server) in open {
            for s in [client, server].iter().filter_map(Weak::upgrade) {
                reset(&s);
            }
        }
    }

    /// Makes every open connection a black hole and holds new ones unanswered, until
    /// [`FaultProxy::restore`] (the connections opened before stay black holes).
    pub fn hang(&self) {
        self.shared.hanging.store(true, Ordering::SeqCst);
        self.shared.hangs.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.hanging.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Per-request faults injected so far.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }
}

/// Makes the last close of `s` a reset (linger 0) and wakes its readers (shut for reading).
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Read);
}

/// Reads and drops whatever `conn` sends until it closes; answers nothing.
fn swallow(mut conn: &TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// The fault armed on one connection and the response bytes forwarded since it was armed.
#[derive(Default)]
struct Armed {
    fault: Option<Fault>,
    sent: usize,
    /// The client closed its side (or the connection was reset).
    client_gone: bool,
}

fn relay(shared: Arc<Shared>, client: TcpStream) {
    let Ok(server) = TcpStream::connect(shared.target) else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client, server) = (Arc::new(client), Arc::new(server));
    shared
        .open
        .lock()
        .unwrap()
        .push((Arc::downgrade(&client), Arc::downgrade(&server)));
    // Cut while it was connecting: [`FaultProxy::cut`] may have emptied `open` before it was in.
    if shared.cut.load(Ordering::SeqCst) {
        reset(&client);
        reset(&server);
        return;
    }
    let armed = Arc::new(Mutex::new(Armed::default()));
    let born = shared.hangs.load(Ordering::SeqCst);
    {
        let (client, server, armed, shared) = (
            client.clone(),
            server.clone(),
            armed.clone(),
            shared.clone(),
        );
        std::thread::spawn(move || upstream(&shared, &client, &server, &armed, born));
    }
    downstream(&shared, &client, &server, &armed, born);
}

/// Client to server: arms the fault a request names before the request reaches the server.
fn upstream(
    shared: &Shared,
    client: &TcpStream,
    server: &TcpStream,
    armed: &Mutex<Armed>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&*client).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.hangs.load(Ordering::SeqCst) > born {
            continue;
        }
        // Read just before a cut: it must not reach the server after it (a reset stops reads,
        // not this write).
        if shared.cut.load(Ordering::SeqCst) {
            break;
        }
        // A new request (the gateway sends one only after the last response ended) arms the
        // fault it names, or disarms the last one.
        if shared.obey && starts_request(&buf[..n]) {
            *armed.lock().unwrap() = Armed {
                fault: fault_in(&buf[..n]),
                sent: 0,
                client_gone: false,
            };
        }
        if (&*server).write_all(&buf[..n]).is_err() {
            break;
        }
    }
    armed.lock().unwrap().client_gone = true;
    let _ = server.shutdown(Shutdown::Write);
}

/// Server to client, applying the armed fault.
fn downstream(
    shared: &Shared,
    client: &TcpStream,
    server: &TcpStream,
    armed: &Mutex<Armed>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&*server).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.hangs.load(Ordering::SeqCst) > born {
            continue;
        }
        let mut a = armed.lock().unwrap();
        let Some(fault) = a.fault else {
            drop(a);
            if (&*client).write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        };
        match fault {
            Fault::Garbage => {
                shared.faults.fetch_add(1, Ordering::Relaxed);
                a.fault = None;
                drop(a);
                let _ = (&*client).write_all(GARBAGE);
                // The server's real answer is never forwarded: close both.
                reset(server);
                let _ = client.shutdown(Shutdown::Write);
                return;
            }
            Fault::Trickle(ms) => {
                drop(a);
                for b in &buf[..n] {
                    if (&*client).write_all(std::slice::from_ref(b)).is_err() {
                        reset(server);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(ms));
                }
                continue;
            }
            Fault::Reset(_) | Fault::Fin(_) | Fault::Stall(_) => {}
        }
        let limit = fault.after().unwrap();
        let pass = limit.saturating_sub(a.sent).min(n);
        a.sent += pass;
        let strike = a.sent >= limit;
        if strike {
            a.fault = None;
        }
        drop(a);
        if pass > 0 && (&*client).write_all(&buf[..pass]).is_err() {
            break;
        }
        if !strike {
            continue;
        }
        shared.faults.fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::Reset(_) => {
                reset(client);
                reset(server);
            }
            Fault::Fin(_) => {
                // Half-closed: the client reads the end, the server is told nothing more
                // will be read (it sees its client go, as vLLM would).
                let _ = client.shutdown(Shutdown::Write);
                reset(server);
                wait_client_gone(armed);
            }
            Fault::Stall(_) => {
                // Nothing more for the client, ever; the server's output is read and dropped
                // so it never blocks, until the client gives up.
                let _ = server.set_read_timeout(Some(Duration::from_millis(50)));
                loop {
                    match (&*server).read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                    if armed.lock().unwrap().client_gone {
                        break;
                    }
                }
                reset(server);
            }
            Fault::Trickle(_) | Fault::Garbage => unreachable!(),
        }
        return;
    }
    if shared.hangs.load(Ordering::SeqCst) > born {
        // A black hole does not pass the server's close on either.
        wait_client_gone(armed);
        return;
    }
    let _ = client.shutdown(Shutdown::Write);
}

/// Waits (bounded) until the client closes, so the fault is what it sees, not our close.
fn wait_client_gone(armed: &Mutex<Armed>) {
    for _ in 0..600 {
        if armed.lock().unwrap().client_gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `bytes` open a request line (`METHOD /path HTTP/1.1`).
fn starts_request(bytes: &[u8]) -> bool {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or(b"");
    let upper = bytes.first().is_some_and(u8::is_ascii_uppercase);
    upper && line.ends_with(b" HTTP/1.1\r")
}

/// The `x-fault` header's value in a request's bytes, if any.
fn fault_in(bytes: &[u8]) -> Option<Fault> {
    let text = String::from_utf8_lossy(bytes);
    let lower = text.to_ascii_lowercase();
    let at = lower.find("\r\nx-fault:")?;
    let value = &text[at + "\r\nx-fault:".len()..];
    let end = value.find("\r\n")?;
    Some(Fault::parse(&value[..end]))
}
