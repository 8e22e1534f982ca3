//! Phase 7a, pick: runs before each attempt and chooses the backend for it among those that serve
//! the request's model and have not been tried yet ([`crate::upstream`] holds the strategies).
//! The [`InFlight`] it returns counts the request on that backend until it is dropped; its error
//! is what the client gets when no backend can take the request.

use crate::config::Affinity;
use crate::error::GatewayError;
use crate::upstream::{InFlight, PickError, PickRequest};

use super::inspect::RequestInfo;
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

/// A backend for `model` not in `tried` (a bit per backend index, modulo 64).
pub fn pick(
    generation: &Generation,
    model: Option<&str>,
    affinity_key: Option<&[u8]>,
    tried: u64,
) -> Result<InFlight, GatewayError> {
    let request = PickRequest {
        model,
        affinity_key,
        tried,
    };
    generation.upstreams.pick(&request).map_err(|e| match e {
        PickError::UnknownModel => GatewayError::UnknownModel {
            model: model.unwrap_or_default().to_owned(),
        },
        PickError::NoneAvailable => GatewayError::NoBackend,
    })
}
