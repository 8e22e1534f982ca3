//! TLS records over a monoio TCP socket, as a read half and a write half that run concurrently:
//! the relay writes to a client while the client watch's read is in flight on the same
//! connection. Both halves share the rustls connection through an `Rc<RefCell>` that is never
//! borrowed across an await: the only awaits are socket reads and writes of ciphertext held in
//! buffers each half owns. The handshake runs on the connection's own task, so a slow or
//! malicious peer stalls nobody else on the worker.
//!
//! [`Reader`] and [`Writer`] are plain TCP or TLS: one branch per socket call for plain
//! connections, nothing else. The TLS arms box their futures (one allocation per TLS socket call,
//! next to the record's crypto), so the futures of every plain read and write, and of the request
//! phases holding them, stay the size they are without TLS: futures are moved by memcpy.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::mem;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
    OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

/// Ciphertext read per socket read: one full TLS record (16 KiB of plaintext plus overhead).
const RAW_READ: usize = 16 * 1024 + 512;

/// The read half of a TLS connection.
pub struct TlsReader<C> {
    tcp: OwnedReadHalf<TcpStream>,
    conn: Rc<RefCell<C>>,
    /// Ciphertext read from the socket; `raw[pos..]` is not yet handed to rustls.
    raw: Vec<u8>,
    pos: usize,
}

/// The write half of a TLS connection.
pub struct TlsWriter<C> {
    tcp: OwnedWriteHalf<TcpStream>,
    conn: Rc<RefCell<C>>,
    /// Ciphertext waiting for (or being given to) a socket write.
    raw: Vec<u8>,
}

/// A connection's read half: plain TCP or TLS.
pub enum Reader<C> {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(TlsReader<C>),
}

/// A connection's write half: plain TCP or TLS.
pub enum Writer<C> {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(TlsWriter<C>),
}

impl<C> Reader<C> {
    pub fn plain(tcp: TcpStream) -> (Reader<C>, Writer<C>) {
        let (rd, wr) = tcp.into_split();
        (Reader::Plain(rd), Writer::Plain(wr))
    }
}

/// A boxed read that outlives the call that started it (the client watch's).
pub type BoxedRead<'a> = Pin<Box<dyn Future<Output = BufResult<usize, Vec<u8>>> + 'a>>;

impl<C, SD> Reader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>> + 'static,
    SD: rustls::SideData,
{
    /// A cancelable read, boxed: on a plain connection the socket's own future, without the
    /// enum's async layer around it (the client watch polls it on every wake-up of a request).
    pub fn boxed_cancelable_read(&mut self, buf: Vec<u8>, c: CancelHandle) -> BoxedRead<'_> {
        match self {
            Reader::Plain(tcp) => Box::pin(tcp.cancelable_read(buf, c)),
            Reader::Tls(tls) => Box::pin(async move { tls.read_buf(buf, Some(&c)).await }),
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Completes the server side of a handshake on `tcp`.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<(TlsReader<ServerConnection>, TlsWriter<ServerConnection>)> {
    let conn = ServerConnection::new(config).map_err(invalid)?;
    establish(tcp, conn).await
}

/// Completes the client side of a handshake on `tcp`, verifying the server as `name`.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<(TlsReader<ClientConnection>, TlsWriter<ClientConnection>)> {
    let conn = ClientConnection::new(config, name).map_err(invalid)?;
    establish(tcp, conn).await
}

async fn establish<C, SD>(
    mut tcp: TcpStream,
    mut conn: C,
) -> io::Result<(TlsReader<C>, TlsWriter<C>)>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    let mut raw = Vec::with_capacity(RAW_READ);
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        if conn.wants_write() {
            out = flush(&mut tcp, &mut conn, out).await?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if pos == raw.len() {
            raw.clear();
            pos = 0;
            let (read, buf) = tcp.read(raw).await;
            raw = buf;
            if read? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
        while pos < raw.len() {
            pos += conn.read_tls(&mut &raw[pos..])?;
            if let Err(e) = conn.process_new_packets() {
                // The alert tells the peer why; the connection ends either way.
                let _ = flush(&mut tcp, &mut conn, out).await;
                return Err(invalid(e));
            }
        }
    }
    let conn = Rc::new(RefCell::new(conn));
    let (rd, wr) = tcp.into_split();
    // Bytes after the handshake (a request sent with the client's Finished) stay for the reader.
    out.clear();
    Ok((
        TlsReader {
            tcp: rd,
            conn: conn.clone(),
            raw,
            pos,
        },
        TlsWriter {
            tcp: wr,
            conn,
            raw: out,
        },
    ))
}

/// Writes out every record rustls has queued; returns the emptied buffer for reuse.
async fn flush<C, SD>(tcp: &mut TcpStream, conn: &mut C, mut out: Vec<u8>) -> io::Result<Vec<u8>>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    out.clear();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    let (sent, mut out) = tcp.write_all(out).await;
    sent?;
    out.clear();
    Ok(out)
}

impl<C, SD> TlsReader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    /// Reads plaintext into `dst`; 0 at the end of the stream (with or without close_notify:
    /// HTTP framing, not TLS, tells a complete message from a cut one).
    async fn read_plain(
        &mut self,
        dst: &mut [u8],
        cancel: Option<&CancelHandle>,
    ) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                loop {
                    match conn.reader().read(dst) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    if self.pos == self.raw.len() {
                        break;
                    }
                    self.pos += conn.read_tls(&mut &self.raw[self.pos..])?;
                    conn.process_new_packets().map_err(invalid)?;
                }
            }
            let mut raw = mem::take(&mut self.raw);
            raw.clear();
            // Empty only after a read was dropped midway (a timeout): the connection is closing,
            // but a read into no room would pass for the end of the stream.
            if raw.capacity() == 0 {
                raw.reserve(RAW_READ);
            }
            self.pos = 0;
            let (read, raw) = match cancel {
                Some(c) => self.tcp.cancelable_read(raw, c.clone()).await,
                None => self.tcp.read(raw).await,
            };
            self.raw = raw;
            if read? == 0 {
                self.raw.clear();
                return Ok(0);
            }
        }
    }

    async fn read_buf<T: IoBufMut>(
        &mut self,
        mut buf: T,
        cancel: Option<&CancelHandle>,
    ) -> BufResult<usize, T> {
        // SAFETY: `buf` owns `bytes_total()` writable bytes from `write_ptr()` and stays alive and
        // unmoved (we hold it) while the slice is used; only written bytes are marked init.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.write_ptr(), buf.bytes_total()) };
        let read = self.read_plain(dst, cancel).await;
        if let Ok(n) = read {
            unsafe { buf.set_init(n) };
        }
        (read, buf)
    }
}

impl<C, SD> TlsWriter<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    /// Encrypts what rustls accepts of `data` (all of it up to its 64 KiB send buffer) and
    /// writes the records out.
    async fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = {
            let mut conn = self.conn.borrow_mut();
            let n = conn.writer().write(data)?;
            self.raw.clear();
            while conn.wants_write() {
                conn.write_tls(&mut self.raw)?;
            }
            n
        };
        if !self.raw.is_empty() {
            let (sent, raw) = self.tcp.write_all(mem::take(&mut self.raw)).await;
            self.raw = raw;
            sent?;
        }
        Ok(n)
    }

    async fn close(&mut self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.write_plain(&[]).await?;
        self.tcp.shutdown().await
    }
}

impl<C, SD> AsyncReadRent for Reader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Reader::Plain(tcp) => tcp.read(buf).await,
            Reader::Tls(tls) => Box::pin(tls.read_buf(buf, None)).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        match self {
            Reader::Plain(tcp) => tcp.readv(buf).await,
            Reader::Tls(tls) => {
                // SAFETY: the first iovec of `buf`, which we hold for the whole read.
                let read = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
                    Some(raw) => Box::pin(tls.read_buf(raw, None)).await.0,
                    None => Ok(0),
                };
                if let Ok(n) = read {
                    unsafe { buf.set_init(n) };
                }
                (read, buf)
            }
        }
    }
}

impl<C, SD> AsyncWriteRent for Writer<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Writer::Plain(tcp) => tcp.write(buf).await,
            Writer::Tls(tls) => {
                // SAFETY: `buf` holds `bytes_init()` bytes from `read_ptr()`; we own it meanwhile.
                let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
                let sent = Box::pin(tls.write_plain(data)).await;
                (sent, buf)
            }
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Writer::Plain(tcp) => tcp.writev(buf).await,
            Writer::Tls(tls) => {
                // SAFETY: the first iovec of `buf`, which we hold for the whole write.
                let sent = match unsafe { RawBuf::new_from_iovec(&buf) } {
                    Some(raw) => {
                        let data =
                            unsafe { std::slice::from_raw_parts(raw.read_ptr(), raw.bytes_init()) };
                        Box::pin(tls.write_plain(data)).await
                    }
                    None => Ok(0),
                };
                (sent, buf)
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Writer::Plain(tcp) => tcp.flush().await,
            // Every write already sent its records.
            Writer::Tls(_) => Ok(()),
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Writer::Plain(tcp) => tcp.shutdown().await,
            Writer::Tls(tls) => Box::pin(tls.close()).await,
        }
    }
}

/// A whole connection (not split): plain TCP, or TLS as its two halves (boxed, so a plain
/// connection, moved in and out of its pool for every request, stays a TcpStream's size). For
/// upstream connections, which one task reads and writes in turn.
pub enum Duplex<C> {
    Plain(TcpStream),
    Tls(Box<(TlsReader<C>, TlsWriter<C>)>),
}

impl<C, SD> AsyncReadRent for Duplex<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Duplex::Plain(tcp) => tcp.read(buf).await,
            Duplex::Tls(tls) => Box::pin(tls.0.read_buf(buf, None)).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        match self {
            Duplex::Plain(tcp) => tcp.readv(buf).await,
            Duplex::Tls(tls) => {
                // SAFETY: the first iovec of `buf`, which we hold for the whole read.
                let read = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
                    Some(raw) => Box::pin(tls.0.read_buf(raw, None)).await.0,
                    None => Ok(0),
                };
                if let Ok(n) = read {
                    unsafe { buf.set_init(n) };
                }
                (read, buf)
            }
        }
    }
}

impl<C, SD> AsyncWriteRent for Duplex<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: rustls::SideData,
{
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Duplex::Plain(tcp) => tcp.write(buf).await,
            Duplex::Tls(tls) => {
                // SAFETY: `buf` holds `bytes_init()` bytes from `read_ptr()`; we own it meanwhile.
                let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
                let sent = Box::pin(tls.1.write_plain(data)).await;
                (sent, buf)
            }
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Duplex::Plain(tcp) => tcp.writev(buf).await,
            Duplex::Tls(tls) => {
                // SAFETY: the first iovec of `buf`, which we hold for the whole write.
                let sent = match unsafe { RawBuf::new_from_iovec(&buf) } {
                    Some(raw) => {
                        let data =
                            unsafe { std::slice::from_raw_parts(raw.read_ptr(), raw.bytes_init()) };
                        Box::pin(tls.1.write_plain(data)).await
                    }
                    None => Ok(0),
                };
                (sent, buf)
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Duplex::Plain(tcp) => tcp.flush().await,
            Duplex::Tls(..) => Ok(()),
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Duplex::Plain(tcp) => tcp.shutdown().await,
            Duplex::Tls(tls) => Box::pin(tls.1.close()).await,
        }
    }
}
