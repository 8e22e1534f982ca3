//! A bounded LIFO pool of idle keep-alive connections to one backend, owned by one worker.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

/// Read buffer per upstream connection: an SSE event (a few hundred bytes) or a small JSON body
/// fits in one read; kept small because every open stream holds one.
const READ_BUF: usize = 8 * 1024;

#[derive(Debug)]
pub enum ConnectError {
    Unresolved,
    Timeout,
    Io(io::Error),
}

pub struct UpstreamConn {
    pub stream: TcpStream,
    /// Reused across responses on this connection.
    pub buf: Vec<u8>,
    /// True when this connection already carried a request: a failure before any response byte
    /// may then be the backend having closed it while idle, and is worth one retry.
    pub reused: bool,
    idle_since: Instant,
}

impl UpstreamConn {
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<UpstreamConn, ConnectError> {
        let stream = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        // Without it, small writes wait on delayed ACKs (40 ms stalls on keep-alive requests).
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
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
