//! A bounded LIFO pool of idle keep-alive connections to one backend, owned by one worker.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use rustls::ClientConnection;

use crate::tls::stream::Duplex;

/// Read buffer per upstream connection: an SSE event (a few hundred bytes) or a small JSON body
/// fits in one read; kept small because every open stream holds one.
const READ_BUF: usize = 8 * 1024;

#[derive(Debug)]
pub enum ConnectError {
    Unresolved,
    Timeout,
    Io(io::Error),
    /// The TCP connection was made; the TLS handshake failed (certificate, protocol).
    Tls(io::Error),
}

pub struct UpstreamConn {
    /// Plain TCP, or TLS for an https backend.
    pub stream: Duplex<ClientConnection>,
    /// Reused across responses on this connection.
    pub buf: Vec<u8>,
    /// True when this connection already carried a request: a failure before any response byte
    /// may then be the backend having closed it while idle, and is worth one retry.
    pub reused: bool,
    idle_since: Instant,
}

impl UpstreamConn {
    /// Connects to `addr`, with the TLS handshake of an https backend, both within `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&crate::tls::Upstream>,
    ) -> Result<UpstreamConn, ConnectError> {
        let connect = async {
            let tcp = TcpStream::connect_addr(addr)
                .await
                .map_err(ConnectError::Io)?;
            // Without it, small writes wait on delayed ACKs (40 ms stalls on keep-alive requests).
            tcp.set_nodelay(true).map_err(ConnectError::Io)?;
            match tls {
                None => Ok(Duplex::Plain(tcp)),
                // Boxed: inline, the handshake's state would enlarge this future, which every
                // request builds (and moves) even when the pool has a connection.
                Some(tls) => Box::pin(crate::tls::stream::connect(
                    tcp,
                    tls.config.clone(),
                    tls.name.clone(),
                ))
                .await
                .map(|(rd, wr)| Duplex::Tls(Box::new((rd, wr))))
                .map_err(ConnectError::Tls),
            }
        };
        let stream = match monoio::time::timeout(timeout, connect).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(result) => result?,
        };
        Ok(UpstreamConn {
            stream,
            buf: Vec::with_capacity(READ_BUF),
            reused: false,
            idle_since: Instant::now(),
        })
    }
}

pub struct Pool {
    idle: RefCell<Vec<UpstreamConn>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: RefCell::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    pub fn take(&self) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        while let Some(mut c) = idle.pop() {
            if c.idle_since.elapsed() < self.idle_timeout {
                c.reused = true;
                return Some(c);
            }
        }
        None
    }

    pub fn put(&self, mut conn: UpstreamConn) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.max_idle {
            conn.buf.clear();
            conn.idle_since = Instant::now();
            idle.push(conn);
        }
    }

    pub fn sweep(&self) {
        let timeout = self.idle_timeout;
        self.idle
            .borrow_mut()
            .retain(|c| c.idle_since.elapsed() < timeout);
    }
}
