//! Watching the client while a response is produced.
//!
//! An HTTP/1.1 client sends nothing between the end of its request and the end of our response, so
//! a read armed on its socket completes only when it leaves (EOF or reset) or pipelines the next
//! request. Keeping that one read in flight for the whole exchange is what lets the gateway abort
//! the backend the moment a client disconnects, without a syscall per relayed chunk.
//!
//! When the response is done and the client sent nothing, the read stays in flight ([`Armed`]): it
//! becomes the read of the next request's head on the keep-alive connection, so a request costs no
//! cancel and no second read. Only when the next request is already buffered (pipelining) is it
//! cancelled, and what it brought meanwhile is kept. Dropping it (the connection closes) cancels it.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use std::time::Duration;

use monoio::io::Canceller;
use monoio::BufResult;

/// The watch's read on the client socket, boxed so that it can outlive the request that armed it.
pub type WatchRead<'r> = Pin<Box<dyn Future<Output = BufResult<usize, Vec<u8>>> + 'r>>;

enum State {
    Armed,
    /// The client sent the start of its next request; it is still there.
    Pipelined(Vec<u8>, usize),
    Gone,
}

/// How the watch ended.
pub enum WatchEnd<'r> {
    /// The client sent nothing; the read is still in flight, for the next request's head.
    Quiet(Armed<'r>),
    /// The read completed with the first `n` bytes of the client's next request.
    Pipelined(Vec<u8>, usize),
    Gone,
}

pub struct ClientWatch<'r> {
    read: WatchRead<'r>,
    canceller: Canceller,
    state: State,
}

impl<'r> ClientWatch<'r> {
    /// `read` must be a cancelable read on the client socket tied to `canceller`.
    pub fn new(read: WatchRead<'r>, canceller: Canceller) -> Self {
        ClientWatch {
            read,
            canceller,
            state: State::Armed,
        }
    }

    /// Runs `work` until it finishes (`Some`) or the client leaves first (`None`). `work` is
    /// polled first so a finished step is never reported as lost.
    pub async fn race<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            match self.state {
                State::Gone => return Poll::Ready(None),
                State::Pipelined(..) => {}
                State::Armed => {
                    if let Poll::Ready((res, buf)) = self.read.as_mut().poll(cx) {
                        match res {
                            Ok(n) if n > 0 => self.state = State::Pipelined(buf, n),
                            _ => {
                                self.state = State::Gone;
                                return Poll::Ready(None);
                            }
                        }
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Stops watching and reports what the client did meanwhile.
    pub fn finish(self) -> WatchEnd<'r> {
        match self.state {
            State::Gone => WatchEnd::Gone,
            State::Pipelined(buf, n) => WatchEnd::Pipelined(buf, n),
            State::Armed => WatchEnd::Quiet(Armed {
                read: self.read,
                canceller: self.canceller,
            }),
        }
    }
}

/// A watch's read still in flight after its request ended.
pub struct Armed<'r> {
    read: WatchRead<'r>,
    canceller: Canceller,
}

impl Armed<'_> {
    /// Waits up to `timeout` for the client's next bytes: the buffer and how many it holds.
    /// `None` when the client closed or stayed idle that long.
    pub async fn next_bytes(self, timeout: Duration) -> Option<(Vec<u8>, usize)> {
        match monoio::time::timeout(timeout, self.read).await {
            Ok((Ok(n), buf)) if n > 0 => Some((buf, n)),
            _ => None,
        }
    }

    /// Ends the read now, for a next request that is already buffered: the buffer and how many
    /// bytes it brought meanwhile (often none). `None` when the client has left.
    pub async fn stop(self) -> Option<(Vec<u8>, usize)> {
        self.canceller.cancel();
        match self.read.await {
            (Ok(0), _) => None,
            (Ok(n), buf) => Some((buf, n)),
            (Err(e), buf) if e.raw_os_error() == Some(libc::ECANCELED) => Some((buf, 0)),
            (Err(_), _) => None,
        }
    }
}
