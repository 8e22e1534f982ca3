//! Phase 7a, pick: runs before each attempt and chooses the backend for it among those that serve
//! the request's model and have not been tried yet ([`crate::upstream`] holds the strategies).
//! The [`InFlight`] it returns counts the request on that backend until it is dropped; its error
//! is what the client gets when no backend can take the request. A `cache_aware` decision is
//! counted in the worker's metrics.

use crate::config::Affinity;
use crate::error::GatewayError;
use crate::metrics::WorkerMetrics;
use crate::upstream::{InFlight, PickError, PickRequest};

use super::inspect::{RequestInfo, PROMPT_FIELDS};
use super::Generation;
use crate::http::RequestHead;

/// The routing key of `routing.affinity` for this request, if it has one.
pub fn affinity_key<'a>(
    generation: &Generation,
    buf: &'a [u8],
    head: &RequestHead,
    body: &'a [u8],
    info: &RequestInfo,
) -> Option<&'a [u8]> {
    match generation.upstreams.affinity()? {
        Affinity::Header(name) => head.header(buf, name.as_bytes()),
        Affinity::User => info.user.clone().map(|r| &body[r]),
    }
}

/// The raw JSON values of the request's prompt, in [`PROMPT_FIELDS`] order (empty when absent).
pub fn prompt<'a>(body: &'a [u8], info: &RequestInfo) -> [&'a [u8]; PROMPT_FIELDS.len()] {
    std::array::from_fn(|i| &body[info.prompt[i].clone()])
}

/// A backend for the request's model not in its `tried` (a bit per backend index, modulo 64).
pub fn pick(
    generation: &Generation,
    metrics: &WorkerMetrics,
    request: &PickRequest<'_>,
) -> Result<InFlight, GatewayError> {
    let picked = generation.upstreams.pick(request).map_err(|e| match e {
        PickError::UnknownModel => GatewayError::UnknownModel {
            model: request.model.unwrap_or_default().to_owned(),
        },
        PickError::NoneAvailable => GatewayError::NoBackend,
    })?;
    if let Some(route) = picked.route {
        metrics.prefix_route(route);
    }
    Ok(picked)
}
