//! Phase 1, read: runs when a connection is new or its previous request is done, and reads until
//! `c.buf` starts with a complete, valid request head (parsed into `c.head`). It returns whether a
//! request is there; a connection that closes or idles past the keep-alive timeout ends quietly,
//! a malformed or too slow head is an error.

use std::mem;
use std::time::Instant;

use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

use super::client_watch::Armed;
use super::conn::{ClientConn, ClientReader};
use super::Context;
use crate::error::GatewayError;
use crate::http::{self, RequestError};

/// Reads until `c.buf` starts with a complete request head. `Ok(false)`: the connection ended
/// quietly (closed, or idle past the keep-alive timeout).
pub async fn request_head(
    ctx: &Context,
    rd: &mut ClientReader,
    c: &mut ClientConn,
) -> Result<bool, GatewayError> {
    // Copied out so an idle keep-alive connection does not pin an old generation's pools.
    let (max_head, header_timeout, keepalive) = {
        let generation = ctx.current();
        let t = &generation.config.timeouts;
        (
            generation.config.max_header_size,
            t.client_header,
            t.keepalive,
        )
    };
    let mut deadline: Option<Instant> = None;
    loop {
        if !c.buf.is_empty() {
            if http::parse_request(&c.buf, max_head, &mut c.head)? {
                return Ok(true);
            }
            deadline.get_or_insert_with(|| Instant::now() + header_timeout);
        }
        let mut buf = mem::take(&mut c.buf);
        let len = buf.len();
        if len == buf.capacity() {
            buf.reserve(len.min(max_head));
        }
        let cap = buf.capacity();
        let wait = match deadline {
            None => keepalive,
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        let Ok((read, slice)) = monoio::time::timeout(wait, rd.read(buf.slice_mut(len..cap))).await
        else {
            return if deadline.is_some() {
                Err(RequestError::Timeout.into())
            } else {
                Ok(false)
            };
        };
        c.buf = slice.into_inner();
        match read {
            Ok(n) if n > 0 => crate::busy_poll::mark_activity(),
            _ => return Ok(false),
        }
    }
}

/// Before the next head, when the previous request's watch left its read in flight: appends
/// what it brings of the next request to `c.buf`, waiting up to the keep-alive timeout unless a
/// pipelined request is already there. False when the connection ended.
pub async fn next_bytes(ctx: &Context, armed: Armed<'_>, c: &mut ClientConn) -> bool {
    let got = if c.buf.is_empty() {
        let keepalive = ctx.current().config.timeouts.keepalive;
        armed.next_bytes(keepalive).await
    } else {
        armed.stop().await
    };
    let Some((buf, n)) = got else {
        return false;
    };
    if n > 0 {
        crate::busy_poll::mark_activity();
    }
    c.buf.extend_from_slice(&buf[..n]);
    c.watch_buf = buf;
    true
}
