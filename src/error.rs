//! Gateway errors: decided where they happen (typed), turned into HTTP responses here and only here.
//!
//! Every error body is OpenAI's shape, `{"error":{"message","type","param","code"}}`, so SDKs
//! classify our failures the same way they classify OpenAI's.

use std::borrow::Cow;

use crate::http::{self, RequestError, UpstreamError};

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
        }
    }

    /// OpenAI's `type` field: client mistakes vs. server-side failures.
    pub fn kind(&self) -> &'static str {
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
}

/// Writes the complete HTTP response for `err` into `out`.
pub fn write_error(out: &mut Vec<u8>, err: &GatewayError, request_id: &[u8], keep_alive: bool) {
    let body = serde_json::json!({
        "error": {
            "message": err.message(),
            "type": err.kind(),
            "param": null,
            "code": err.code(),
        }
    })
    .to_string();
    let keep_alive = keep_alive && !err.closes_connection();
    let mut headers: [(&[u8], &[u8]); 1] = [(b"X-Request-Id", request_id)];
    let extra: &[(&[u8], &[u8])] = if request_id.is_empty() {
        &[]
    } else {
        &mut headers[..]
    };
    http::write_response(
        out,
        err.status(),
        b"application/json",
        extra,
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
}
