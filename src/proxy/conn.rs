//! A client connection's buffers, allocated once and reused by every request on it, and the two
//! ways bytes reach the client outside the relay: a finished response ([`write_out`]) and an
//! error ([`respond_error`], the one place a [`GatewayError`] becomes a response).

use std::mem;
use std::net::{IpAddr, SocketAddr};

use monoio::io::AsyncWriteRentExt;
use rustls::ServerConnection;

use crate::api::Api;
use crate::error::{write_error, GatewayError};
use crate::http::RequestHead;

/// The client connection's halves: plain TCP, or TLS when the listener has `tls`.
pub type ClientReader = crate::tls::Reader<ServerConnection>;
pub type ClientWriter = crate::tls::Writer<ServerConnection>;

/// Initial client read buffer; grows up to `max_header_size` for large heads.
const CLIENT_BUF: usize = 4096;
/// The watch read only ever sees the start of a pipelined request.
const WATCH_BUF: usize = 512;
/// Request buffers larger than this are released after the request instead of kept for the next.
const KEEP_BUF: usize = 64 * 1024;

/// What to do with the connection after a request.
pub enum Next {
    KeepAlive,
    Close,
}

/// Per-connection buffers, allocated once and reused by every request on the connection.
pub struct ClientConn {
    /// Bytes read from the client and not yet consumed: the current head (until the request
    /// ends), body bytes not yet read into `body`, the start of a pipelined request.
    pub buf: Vec<u8>,
    pub head: RequestHead,
    /// The request body, decoded.
    pub body: Vec<u8>,
    /// The request's model, decoded once (after any alias rewrite: the name the backend reads).
    pub model: String,
    /// The upstream request, or an error response.
    pub out: Vec<u8>,
    pub resp_head: Vec<u8>,
    pub watch_buf: Vec<u8>,
    pub peer: IpAddr,
    pub ip: String,
}

impl ClientConn {
    pub fn new(peer: SocketAddr) -> Self {
        let peer = peer.ip().to_canonical();
        ClientConn {
            buf: Vec::with_capacity(CLIENT_BUF),
            head: RequestHead::default(),
            body: Vec::new(),
            model: String::new(),
            out: Vec::new(),
            resp_head: Vec::with_capacity(1024),
            watch_buf: Vec::with_capacity(WATCH_BUF),
            peer,
            ip: peer.to_string(),
        }
    }

    /// Drops the finished request's head from `buf`: what follows it is the next request. Body
    /// bytes were already taken by the body phase; an unread body means the connection closes.
    pub fn consume_head(&mut self) {
        let consumed = self.head.head_len.min(self.buf.len());
        self.buf.drain(..consumed);
    }

    /// After a request: one large body does not stay allocated for the connection's life.
    pub fn release_large_buffers(&mut self) {
        if self.out.capacity() > KEEP_BUF {
            self.out = Vec::new();
        }
        if self.body.capacity() > KEEP_BUF {
            self.body = Vec::new();
        }
    }
}

/// The one place where a [`GatewayError`] becomes bytes on the wire, in the shape of the
/// client's API (`None`: OpenAI's).
pub async fn respond_error(
    wr: &mut ClientWriter,
    out: &mut Vec<u8>,
    err: &GatewayError,
    api: Option<Api>,
    request_id: &[u8],
    keep_alive: bool,
) -> Next {
    if err.status() >= 500 {
        tracing::warn!(request_id = %String::from_utf8_lossy(request_id), status = err.status(), code = err.code(), "request failed");
    } else {
        tracing::debug!(status = err.status(), code = err.code(), "request refused");
    }
    write_error(out, err, api, request_id, keep_alive);
    write_out(wr, out, keep_alive && !err.closes_connection()).await
}

pub async fn write_out(wr: &mut ClientWriter, out: &mut Vec<u8>, keep_alive: bool) -> Next {
    let (sent, buf) = wr.write_all(mem::take(out)).await;
    *out = buf;
    if sent.is_ok() && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}
