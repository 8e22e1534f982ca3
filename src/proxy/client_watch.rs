//! Watching the client while a response is produced.
//!
//! An HTTP/1.1 client sends nothing between the end of its request and the end of our response, so
//! a read armed on its socket completes only when it leaves (EOF or reset) or pipelines the next
//! request. Keeping that one read in flight for the whole exchange is what lets the gateway abort
//! the backend the moment a client disconnects, without a syscall per relayed chunk. The read is
//! cancelled (not dropped) at the end so that bytes of a pipelined request are never lost.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use monoio::io::Canceller;
use monoio::BufResult;

enum State {
    Armed,
    /// The client sent the start of its next request; it is still there.
    Pipelined(Vec<u8>, usize),
    Gone,
}

/// How the watch ended, and the read buffer handed back.
pub enum WatchEnd {
    Quiet(Vec<u8>),
    Pipelined(Vec<u8>, usize),
    Gone,
}

pub struct ClientWatch<'a, R> {
    read: Pin<&'a mut R>,
    canceller: Option<Canceller>,
    state: State,
}

impl<'a, R> ClientWatch<'a, R>
where
    R: Future<Output = BufResult<usize, Vec<u8>>>,
{
    /// `read` must be a cancelable read on the client socket tied to `canceller`.
    pub fn new(read: Pin<&'a mut R>, canceller: Canceller) -> Self {
        ClientWatch {
            read,
            canceller: Some(canceller),
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
    pub async fn finish(mut self) -> WatchEnd {
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Gone => WatchEnd::Gone,
            State::Pipelined(buf, n) => WatchEnd::Pipelined(buf, n),
            State::Armed => {
                if let Some(c) = self.canceller.take() {
                    c.cancel();
                }
                match self.read.await {
                    (Ok(0), _) => WatchEnd::Gone,
                    (Ok(n), buf) => WatchEnd::Pipelined(buf, n),
                    (Err(e), buf) if e.raw_os_error() == Some(libc::ECANCELED) => {
                        WatchEnd::Quiet(buf)
                    }
                    (Err(_), _) => WatchEnd::Gone,
                }
            }
        }
    }
}
