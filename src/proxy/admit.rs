//! Phase 3, admit: runs for every relayed request before its body is read (refusing here costs no
//! upstream work and no body buffer). Decides who is calling (key, status, IP) and whether they
//! may start a request now (rates, concurrency); the [`Admission`] it returns holds the
//! concurrency slots until the request is accounted. Free when auth is off and no global limit is
//! set.

use std::sync::Arc;

use crate::auth::{Caller, KeyEntry};
use crate::error::GatewayError;
use crate::limits::{self, LimitSet, Permit};

use super::conn::ClientConn;
use super::{Context, Generation};

/// A request let in: who it is (when auth is on) and what it holds.
#[derive(Default)]
pub struct Admission {
    pub key: Option<Arc<KeyEntry>>,
    /// Concurrency slots, given back on drop.
    _permit: Permit,
    /// `x-ratelimit-*` lines for the response head.
    pub headers: String,
}

pub async fn admit(
    ctx: &Context,
    generation: &Generation,
    c: &ClientConn,
) -> Result<Admission, GatewayError> {
    let key = match &generation.auth {
        Some(auth) => {
            let caller = Caller {
                ip: c.peer,
                ip_text: &c.ip,
                method: c.head.method.of(&c.buf),
                path: c.head.path(&c.buf),
            };
            Some(
                auth.identify(auth.extract_key(&c.head, &c.buf), &caller)
                    .await?,
            )
        }
        None => None,
    };
    let key_limits = key.as_ref().and_then(|k| k.live.limits.as_ref());
    // At most two scopes (the key's, the global one): kept on the stack.
    let (both, one);
    let scopes: &[&Arc<LimitSet>] = match (key_limits, generation.global_limits.as_ref()) {
        (Some(k), Some(g)) => {
            both = [k, g];
            &both
        }
        (Some(s), None) | (None, Some(s)) => {
            one = [s];
            &one
        }
        (None, None) => &[],
    };
    if scopes.is_empty() {
        return Ok(Admission {
            key,
            ..Admission::default()
        });
    }
    let queue = generation.config.rate_limit.queue_timeout;
    let admitted = limits::acquire(scopes, queue, ctx.shared_rates.as_ref())
        .await
        .map_err(GatewayError::RateLimited)?;
    Ok(Admission {
        key,
        _permit: admitted.permit,
        headers: admitted.headers,
    })
}
