//! The one value that says how a request ended. Every phase writes what it decided into it, and
//! the account phase reads nothing else: metrics, the access log and the usage event all see the
//! same status, error and relay progress. The status rule lives here once: what the client saw,
//! and 499 when it left before the backend answered.

use std::sync::Arc;
use std::time::Instant;

use crate::api::Api;
use crate::auth::KeyEntry;
use crate::error::GatewayError;
use crate::metrics::{Rejection, UpstreamErrorKind};
use crate::upstream::InFlight;
use crate::usage::{Outcome, CLIENT_CLOSED};

use super::relay::{Progress, Relayed};

pub struct RequestOutcome {
    /// The API the request was routed to; `None` for a path the gateway does not relay.
    pub api: Option<Api>,
    /// Request head parsed: the request's latency starts here.
    pub started: Instant,
    /// Request body read: the relay (TTFT, overhead) starts here.
    pub body_read: Option<Instant>,
    /// The authenticated key.
    pub key: Option<Arc<KeyEntry>>,
    /// The body named a model (decoded in the connection's `model`).
    pub has_model: bool,
    pub stream: bool,
    /// The status the client saw (0: none, the connection was cut).
    pub status: u16,
    /// Why the gateway answered itself, when it did.
    pub rejected: Option<Rejection>,
    pub upstream_error: Option<UpstreamErrorKind>,
    /// How the relayed exchange ended, as billed; `None` when nothing was relayed.
    pub ending: Option<Outcome>,
    /// What the relay observed on the last attempt.
    pub progress: Progress,
    /// Attempts after the first, on other backends or on a fresh connection.
    pub retries: u32,
    /// The backend of the last attempt, counted in flight until the request is accounted.
    pub in_flight: Option<InFlight>,
    /// With `scheduling`: what its key's fair-share counter was charged at dispatch.
    pub fair_share_charged: f64,
}

impl RequestOutcome {
    pub fn new(api: Option<Api>) -> Self {
        RequestOutcome {
            api,
            started: Instant::now(),
            body_read: None,
            key: None,
            has_model: false,
            stream: false,
            status: 0,
            rejected: None,
            upstream_error: None,
            ending: None,
            progress: Progress::default(),
            fair_share_charged: 0.0,
            retries: 0,
            in_flight: None,
        }
    }

    /// The request ends with the gateway's own error response.
    pub fn fail(&mut self, e: &GatewayError) {
        self.status = e.status();
        self.rejected = e.rejection();
        self.upstream_error = e.upstream_error();
    }

    /// The relay's ending of the last attempt, on `progress`.
    pub fn relayed(&mut self, relayed: &Relayed) {
        let answered = self.progress.status;
        match relayed {
            Relayed::Complete { .. } => {
                self.status = answered;
                self.ending = Some(Outcome::Completed);
            }
            Relayed::Broken { timed_out } => {
                self.status = answered;
                self.upstream_error = Some(if *timed_out {
                    UpstreamErrorKind::Timeout
                } else {
                    UpstreamErrorKind::MidResponse
                });
                self.ending = Some(Outcome::Failed);
            }
            Relayed::ClientGone => {
                self.status = if answered == 0 {
                    CLIENT_CLOSED
                } else {
                    answered
                };
                self.ending = Some(Outcome::Cancelled);
            }
        }
    }

    /// The backend of the last attempt, by index.
    pub fn backend(&self) -> Option<usize> {
        self.in_flight.as_ref().map(|f| f.index)
    }

    /// Whether a backend received the request (on the last attempt): each such request gets
    /// exactly one usage record, also when the backend then failed before answering (an
    /// `error` record that bills nothing, so records reconcile with the backends' own counts).
    /// A request no backend received (connect failed, no backend, the client left first) has
    /// none.
    pub fn reached_backend(&self) -> bool {
        self.in_flight.is_some() && self.progress.sent_upstream.is_some()
    }
}
