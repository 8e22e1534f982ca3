//! Phase 4, body: runs after admission for every relayed request. Reads the whole request body
//! into `c.body` (chunked bodies are decoded: the gateway always sends a known length upstream,
//! and needs the whole body to route and meter it), bounded by `max_request_body`, then inspects
//! it once: the [`RequestInfo`] it returns and the model decoded into `c.model` are what every
//! later phase reads.

use std::mem;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use super::conn::{ClientConn, ClientReader, ClientWriter};
use super::inspect::{self, RequestInfo};
use super::Generation;
use crate::api::Api;
use crate::error::GatewayError;
use crate::http::{ChunkedDecoder, Framing, RequestError};

/// Reads the body into `c.body`, removing its bytes from `c.buf` (the head stays until the
/// request is done; what follows the body stays for the next request).
pub async fn read(
    generation: &Generation,
    rd: &mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut ClientConn,
) -> Result<(), GatewayError> {
    let limit = generation.config.max_request_body;
    let framing = c.head.framing();
    if let Framing::Length(n) = framing {
        if n > limit as u64 {
            return Err(RequestError::BodyTooLarge.into());
        }
    }
    if c.head.expect_continue && framing != Framing::Empty {
        let (sent, _) = wr.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await;
        sent.map_err(|_| RequestError::Malformed("client closed"))?;
    }
    let head_len = c.head.head_len;
    c.body.clear();
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            let n = n as usize;
            let in_buf = (c.buf.len() - head_len).min(n);
            c.body.reserve_exact(n);
            c.body
                .extend_from_slice(&c.buf[head_len..head_len + in_buf]);
            while c.body.len() < n {
                let body = mem::take(&mut c.body);
                let len = body.len();
                let read = rd.read(body.slice_mut(len..n));
                let (res, slice) =
                    monoio::time::timeout(generation.config.timeouts.client_body, read)
                        .await
                        .map_err(|_| RequestError::Timeout)?;
                c.body = slice.into_inner();
                match res {
                    Ok(k) if k > 0 => {}
                    _ => return Err(RequestError::Malformed("body ended early").into()),
                }
            }
            c.buf.drain(head_len..head_len + in_buf);
        }
        Framing::Chunked => read_chunked(generation, rd, c, head_len, limit).await?,
    }
    Ok(())
}

/// Decodes a chunked body that starts at `c.buf[head_len..]` into `c.body`, dropping its framing
/// from `c.buf` so that the head and any bytes after the body remain.
async fn read_chunked(
    generation: &Generation,
    rd: &mut ClientReader,
    c: &mut ClientConn,
    head_len: usize,
    limit: usize,
) -> Result<(), GatewayError> {
    let mut decoder = ChunkedDecoder::default();
    let mut too_large = false;
    let pos = head_len;
    loop {
        let body = &mut c.body;
        let used = decoder
            .feed(&c.buf[pos..], |d| {
                too_large |= body.len() + d.len() > limit;
                if !too_large {
                    body.extend_from_slice(d);
                }
            })
            .map_err(|_| RequestError::Malformed("invalid chunked body"))?;
        if too_large {
            return Err(RequestError::BodyTooLarge.into());
        }
        c.buf.drain(pos..pos + used);
        if decoder.is_done() {
            return Ok(());
        }
        let mut buf = mem::take(&mut c.buf);
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = monoio::time::timeout(
            generation.config.timeouts.client_body,
            rd.read(buf.slice_mut(len..cap)),
        )
        .await
        .map_err(|_| RequestError::Timeout)?;
        c.buf = slice.into_inner();
        match res {
            Ok(k) if k > 0 => {}
            _ => return Err(RequestError::Malformed("body ended early").into()),
        }
    }
}

/// Inspects the body read into `c.body`, once, and decodes its model into `c.model`: a JSON
/// object, or for audio a multipart form. A body that is neither has no facts (the backend will
/// judge it).
pub fn inspect(api: Api, c: &mut ClientConn) -> RequestInfo {
    let info = match (api, c.head.header(&c.buf, b"content-type")) {
        (Api::Audio, Some(content_type)) => inspect::inspect_form(&c.body, content_type),
        _ => inspect::inspect(&c.body),
    };
    let mut info = info.unwrap_or_default();
    if !info.decode_model(&c.body, &mut c.model) {
        info.model = None;
    }
    info
}
