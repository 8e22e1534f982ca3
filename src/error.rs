//! Gateway errors: decided where they happen (typed), turned into HTTP responses here and only here,
//! and mapped here to what they mean for metrics (rejection, upstream error kind) and for the
//! backend's passive health.
//!
//! An error body takes the shape of the client's API, so its SDK classifies our failures the
//! way it classifies the provider's: OpenAI's `{"error":{"message","type","param","code"}}`, or
//! on Anthropic's Messages API `{"type":"error","error":{"type","message"}}`.

use std::borrow::Cow;
use std::time::Duration;

use crate::api::Api;
use crate::config::Denial;
use crate::http::{self, RequestError, UpstreamError};
use crate::limits::{LimitKind, Limited};
use crate::metrics::{Rejection, UpstreamErrorKind};
use crate::upstream::Passive;

#[derive(Debug)]
pub enum GatewayError {
    Request(RequestError),
    /// Path outside the proxied and built-in routes.
    NotFound {
        method: String,
        path: String,
    },
    /// No backend can take the request now (unresolved, unhealthy, ejected or full).
    NoBackend,
    /// No backend serves the requested model.
    UnknownModel {
        model: String,
    },
    UpstreamConnect,
    UpstreamConnectTimeout,
    /// No response head within `timeouts.first_byte` / `timeouts.total`.
    UpstreamTimeout,
    /// A retryable status (`retry.on_status`) the relay handed back instead of relaying; only
    /// reaches the client if every attempt got one.
    UpstreamStatus(u16),
    /// The backend closed or reset before sending a response head.
    UpstreamClosed,
    UpstreamProtocol(UpstreamError),
    /// The client's key is missing, unknown or may not make this request (`auth.status_codes`).
    Denied {
        denial: Denial,
        status: u16,
        message: String,
    },
    /// An auth provider could not answer and nothing usable was cached: not the client's fault.
    AuthUnavailable,
    /// The Lua policy failed (error, instruction budget, memory cap): refused, server's fault.
    PolicyFailed,
    /// A rate or concurrency limit (`rate_limit`) refused the request.
    RateLimited(Limited),
    /// `scheduling`: every backend for the request stayed saturated; it waited in vain, or the
    /// queue had no room for it. A priority below 0 is sheddable and gets 503, others 429.
    Overloaded {
        why: Overload,
        sheddable: bool,
        retry_after: Duration,
    },
}

/// How a request waiting for a saturated backend ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// `scheduling.queue_timeout` passed.
    TimedOut,
    /// `scheduling.max_queue` requests waited, none of lower priority.
    QueueFull,
    /// A request of higher priority took its place in the full queue.
    Shed,
}

impl From<RequestError> for GatewayError {
    fn from(e: RequestError) -> Self {
        GatewayError::Request(e)
    }
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Request(e) => match e {
                RequestError::Malformed(_) | RequestError::AmbiguousFraming(_) => 400,
                RequestError::HeaderTooLarge => 431,
                RequestError::BodyTooLarge => 413,
                RequestError::Timeout => 408,
            },
            GatewayError::NotFound { .. } | GatewayError::UnknownModel { .. } => 404,
            GatewayError::NoBackend => 503,
            GatewayError::UpstreamConnectTimeout | GatewayError::UpstreamTimeout => 504,
            GatewayError::UpstreamStatus(s) => *s,
            GatewayError::UpstreamConnect
            | GatewayError::UpstreamClosed
            | GatewayError::UpstreamProtocol(_) => 502,
            GatewayError::Denied { status, .. } => *status,
            GatewayError::RateLimited(_) => 429,
            GatewayError::Overloaded { sheddable, .. } => {
                if *sheddable {
                    503
                } else {
                    429
                }
            }
            GatewayError::AuthUnavailable => 503,
            GatewayError::PolicyFailed => 500,
        }
    }

    /// OpenAI's `type` field: client mistakes vs. server-side failures; limits use OpenAI's own.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::Denied {
                denial: Denial::QuotaExceeded,
                ..
            } => return "insufficient_quota",
            GatewayError::RateLimited(l) => {
                return match l.kind {
                    LimitKind::Tokens => "tokens",
                    LimitKind::Requests | LimitKind::Concurrency => "requests",
                }
            }
            GatewayError::Overloaded {
                sheddable: false, ..
            } => return "requests",
            _ => {}
        }
        if self.status() < 500 {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::Request(e) => match e {
                RequestError::Malformed(_) => "bad_request",
                RequestError::AmbiguousFraming(_) => "ambiguous_request_framing",
                RequestError::HeaderTooLarge => "request_header_too_large",
                RequestError::BodyTooLarge => "request_too_large",
                RequestError::Timeout => "request_timeout",
            },
            GatewayError::NotFound { .. } => "unknown_url",
            GatewayError::NoBackend => "no_healthy_backend",
            GatewayError::UnknownModel { .. } => "model_not_found",
            GatewayError::UpstreamConnect => "upstream_connect_failed",
            GatewayError::UpstreamConnectTimeout => "upstream_connect_timeout",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamStatus(_) => "upstream_error",
            GatewayError::UpstreamClosed => "upstream_closed",
            GatewayError::UpstreamProtocol(_) => "bad_upstream_response",
            // The codes OpenAI's SDKs and clients classify.
            GatewayError::Denied { denial, .. } => match denial {
                Denial::MissingKey | Denial::InvalidKey | Denial::Expired => "invalid_api_key",
                Denial::Disabled => "api_key_disabled",
                Denial::QuotaExceeded => "insufficient_quota",
                Denial::IpNotAllowed => "ip_not_allowed",
                Denial::ModelNotAllowed => "model_not_allowed",
                Denial::Policy => "access_denied",
            },
            GatewayError::RateLimited(_) => "rate_limit_exceeded",
            GatewayError::Overloaded { why, .. } => match why {
                Overload::TimedOut => "queue_timeout",
                Overload::QueueFull => "queue_full",
                Overload::Shed => "shed",
            },
            GatewayError::AuthUnavailable => "auth_unavailable",
            GatewayError::PolicyFailed => "auth_policy_error",
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        match self {
            GatewayError::Request(e) => match e {
                RequestError::Malformed(why) => Cow::Owned(format!("Malformed request: {why}.")),
                RequestError::AmbiguousFraming(why) => {
                    Cow::Owned(format!("Refused ambiguous request framing: {why}."))
                }
                RequestError::HeaderTooLarge => "Request line and headers are too large.".into(),
                RequestError::BodyTooLarge => {
                    "Request body exceeds the gateway's max_request_body.".into()
                }
                RequestError::Timeout => "The request was not received in time.".into(),
            },
            GatewayError::NotFound { method, path } => {
                Cow::Owned(format!("Invalid URL ({method} {path})"))
            }
            GatewayError::NoBackend => "No healthy backend is available.".into(),
            GatewayError::UnknownModel { model } => {
                Cow::Owned(format!("The model `{model}` does not exist."))
            }
            GatewayError::UpstreamTimeout => "The backend did not respond in time.".into(),
            GatewayError::UpstreamStatus(s) => {
                Cow::Owned(format!("The backend answered {s} on every attempt."))
            }
            GatewayError::UpstreamConnect => "Could not connect to the backend.".into(),
            GatewayError::UpstreamConnectTimeout => "Timed out connecting to the backend.".into(),
            GatewayError::UpstreamClosed => {
                "The backend closed the connection without a response.".into()
            }
            GatewayError::UpstreamProtocol(e) => {
                Cow::Owned(format!("The backend sent an invalid response ({e:?})."))
            }
            GatewayError::Denied { message, .. } => Cow::Owned(message.clone()),
            GatewayError::PolicyFailed => {
                "The gateway's access policy failed on this request.".into()
            }
            GatewayError::AuthUnavailable => {
                "The API key could not be checked right now; please retry.".into()
            }
            GatewayError::Overloaded { why, .. } => match why {
                Overload::TimedOut => {
                    "Every backend stayed busy for as long as the request could wait. Please retry."
                }
                Overload::QueueFull => "Every backend is busy and the queue is full. Please retry.",
                Overload::Shed => {
                    "Every backend is busy and more urgent requests took this one's place. Please retry."
                }
            }
            .into(),
            GatewayError::RateLimited(l) => Cow::Owned(format!(
                "Rate limit reached ({}). Please try again in {}ms.",
                match l.kind {
                    LimitKind::Requests => "requests per minute",
                    LimitKind::Tokens => "tokens per minute",
                    LimitKind::Concurrency => "concurrent requests",
                },
                l.retry_after.as_millis().max(1)
            )),
        }
    }

    /// Worth another attempt on another backend: nothing reached the client and the backend
    /// failed rather than judged the request.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamConnect
                | GatewayError::UpstreamConnectTimeout
                | GatewayError::UpstreamClosed
                | GatewayError::UpstreamProtocol(_)
                | GatewayError::UpstreamStatus(_)
        )
    }

    /// Errors about the request's framing leave the connection unusable: the rest of the bytes
    /// cannot be trusted to start a new request.
    pub fn closes_connection(&self) -> bool {
        matches!(self, GatewayError::Request(_))
    }

    /// Why the gateway answered itself, for the rejection metric; `None` for a backend's failure.
    pub fn rejection(&self) -> Option<Rejection> {
        Some(match self {
            GatewayError::Request(r) => match r {
                RequestError::Malformed(_) | RequestError::AmbiguousFraming(_) => {
                    Rejection::BadRequest
                }
                RequestError::HeaderTooLarge => Rejection::HeaderSize,
                RequestError::BodyTooLarge => Rejection::BodySize,
                RequestError::Timeout => Rejection::Timeout,
            },
            GatewayError::NotFound { .. } | GatewayError::UnknownModel { .. } => {
                Rejection::NotFound
            }
            GatewayError::NoBackend => Rejection::NoBackend,
            GatewayError::Denied {
                denial: Denial::QuotaExceeded,
                ..
            } => Rejection::Quota,
            GatewayError::Denied { .. }
            | GatewayError::AuthUnavailable
            | GatewayError::PolicyFailed => Rejection::Auth,
            GatewayError::RateLimited(l) => match l.kind {
                LimitKind::Concurrency => Rejection::Concurrency,
                LimitKind::Requests | LimitKind::Tokens => Rejection::Rate,
            },
            GatewayError::Overloaded { .. } => Rejection::Overloaded,
            _ => return None,
        })
    }

    /// The kind of backend failure, for the upstream error metric; `None` when the gateway
    /// decided on its own.
    pub fn upstream_error(&self) -> Option<UpstreamErrorKind> {
        Some(match self {
            GatewayError::UpstreamConnect => UpstreamErrorKind::Connect,
            GatewayError::UpstreamConnectTimeout => UpstreamErrorKind::ConnectTimeout,
            GatewayError::UpstreamClosed => UpstreamErrorKind::Closed,
            GatewayError::UpstreamProtocol(_) => UpstreamErrorKind::Protocol,
            GatewayError::UpstreamTimeout => UpstreamErrorKind::Timeout,
            GatewayError::UpstreamStatus(_) => UpstreamErrorKind::Status,
            _ => return None,
        })
    }

    /// What an attempt that ended in this error says about its backend's health.
    pub fn passive(&self) -> Passive {
        match self {
            GatewayError::UpstreamConnect | GatewayError::UpstreamConnectTimeout => {
                Passive::Unreachable
            }
            e if e.is_retryable() || matches!(e, GatewayError::UpstreamTimeout) => Passive::Failed,
            _ => Passive::Ok,
        }
    }

    /// Anthropic's error `type` for this status: what its SDK and clients classify.
    fn anthropic_kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }
}

/// Writes the complete HTTP response for `err` into `out`, in the shape of the client's API
/// (`None`: a path the gateway does not relay, answered in OpenAI's shape).
pub fn write_error(
    out: &mut Vec<u8>,
    err: &GatewayError,
    api: Option<Api>,
    request_id: &[u8],
    keep_alive: bool,
) {
    let body = if api.is_some_and(Api::anthropic_errors) {
        serde_json::json!({
            "type": "error",
            "error": {
                "type": err.anthropic_kind(),
                "message": err.message(),
            }
        })
    } else {
        serde_json::json!({
            "error": {
                "message": err.message(),
                "type": err.kind(),
                "param": null,
                "code": err.code(),
            }
        })
    }
    .to_string();
    let keep_alive = keep_alive && !err.closes_connection();
    let mut extra: Vec<(&[u8], &[u8])> = Vec::new();
    if !request_id.is_empty() {
        extra.push((b"X-Request-Id", request_id));
    }
    let retry_after;
    if let GatewayError::Overloaded {
        retry_after: after, ..
    } = err
    {
        retry_after = after.as_millis().div_ceil(1000).max(1).to_string();
        extra.push((b"Retry-After", retry_after.as_bytes()));
    } else if let GatewayError::RateLimited(l) = err {
        // Whole seconds, rounded up: a client that waits exactly this long gets in.
        retry_after = l.retry_after.as_millis().div_ceil(1000).max(1).to_string();
        extra.push((b"Retry-After", retry_after.as_bytes()));
        extra.extend(
            l.headers
                .split("\r\n")
                .filter_map(|line| line.split_once(": "))
                .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
    }
    http::write_response(
        out,
        err.status(),
        b"application/json",
        &extra,
        body.as_bytes(),
        keep_alive,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let mut out = Vec::new();
        write_error(
            &mut out,
            &GatewayError::Request(RequestError::BodyTooLarge),
            Some(Api::ChatCompletions),
            b"req_1",
            true,
        );
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 413 Payload Too Large\r\n"));
        assert!(head.contains("X-Request-Id: req_1"));
        assert!(head.contains("Connection: close"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn error_body_has_anthropic_shape_on_messages() {
        let cases = [
            (GatewayError::NoBackend, 503, "overloaded_error"),
            (
                GatewayError::UnknownModel { model: "m".into() },
                404,
                "not_found_error",
            ),
            (
                GatewayError::Request(RequestError::BodyTooLarge),
                413,
                "request_too_large",
            ),
            (GatewayError::PolicyFailed, 500, "api_error"),
            (GatewayError::UpstreamConnect, 502, "api_error"),
        ];
        for (err, status, kind) in cases {
            let mut out = Vec::new();
            write_error(&mut out, &err, Some(Api::Messages), b"", true);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind, "{err:?}");
            assert!(v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn upstream_failures_are_not_rejections_and_refusals_are_not_upstream_errors() {
        let upstream = [
            GatewayError::UpstreamConnect,
            GatewayError::UpstreamConnectTimeout,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamStatus(503),
            GatewayError::UpstreamClosed,
        ];
        for e in &upstream {
            assert!(
                e.rejection().is_none() && e.upstream_error().is_some(),
                "{e:?}"
            );
            assert_ne!(e.passive(), Passive::Ok, "{e:?}");
        }
        assert_eq!(
            GatewayError::UpstreamConnect.passive(),
            Passive::Unreachable
        );
        let refusals = [
            GatewayError::NoBackend,
            GatewayError::AuthUnavailable,
            GatewayError::Request(RequestError::Timeout),
            GatewayError::UnknownModel { model: "m".into() },
        ];
        for e in &refusals {
            assert!(
                e.rejection().is_some() && e.upstream_error().is_none(),
                "{e:?}"
            );
            assert_eq!(e.passive(), Passive::Ok, "{e:?}");
        }
    }
}
