//! The webhook reporter: POSTs records as JSON (one object, or an array when `batch_size` > 1)
//! with `Idempotency-Key` (the request_id; for a batch, its first record's) and, when a `secret`
//! is set, `X-LLMProxy-Signature: sha256=<hex HMAC-SHA256 of the body>`. Any 2xx is delivered.
//!
//! Blocking (ureq) by design: it runs on its reporter's own delivery thread, never on a worker.
//! It must not log record contents (they carry the key, masked or not) nor the secret.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use serde::Deserialize;

use super::batch::{self, Span};
use crate::config::Webhook;

/// The one field a delivery reads from a spooled record.
#[derive(Deserialize)]
struct RequestId {
    request_id: String,
}

pub struct WebhookSink {
    agent: ureq::Agent,
    config: Webhook,
    batch: bool,
}

/// Pause before immediate re-attempt `n` (1-based): short, to ride out a blip; longer outages
/// are the spool schedule's job.
fn pause(n: u32) -> Duration {
    Duration::from_millis(100 * u64::from(n))
}

pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    pub fn new(config: Webhook, batch_size: usize) -> WebhookSink {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        WebhookSink {
            agent,
            config,
            batch: batch_size > 1,
        }
    }

    /// One delivery: 1 + `retry` attempts of the same POST. The body is the records' spooled
    /// JSON as stored, joined into an array for a batch: nothing is parsed or re-serialised.
    pub fn deliver(&mut self, spans: &[Span]) -> Result<(), String> {
        let mut rows = batch::rows(spans);
        let Some(first) = rows.next() else {
            return Ok(());
        };
        let idempotency_key = match &first.record {
            Some(r) => r.request_id.to_owned(),
            None => {
                serde_json::from_str::<RequestId>(first.json)
                    .map_err(|e| format!("spooled record {}: {e}", first.id))?
                    .request_id
            }
        };
        let body = if self.batch {
            let mut body = Vec::with_capacity(
                spans
                    .iter()
                    .map(|s| s.batch.rows.json_len(s.start..s.end) + s.end - s.start)
                    .sum::<usize>()
                    + 2,
            );
            body.push(b'[');
            body.extend_from_slice(first.json.as_bytes());
            for row in rows {
                body.push(b',');
                body.extend_from_slice(row.json.as_bytes());
            }
            body.push(b']');
            body
        } else {
            debug_assert_eq!(batch::count(spans), 1);
            first.json.as_bytes().to_vec()
        };
        let signature = self.config.secret.as_deref().map(|s| sign(s, &body));
        let mut last_error = String::new();
        for attempt in 0..=self.config.retry {
            if attempt > 0 {
                std::thread::sleep(pause(attempt));
            }
            let mut request = self
                .agent
                .post(&self.config.url)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", &idempotency_key);
            if let Some(sig) = &signature {
                request = request.header("X-LLMProxy-Signature", sig);
            }
            for (name, value) in &self.config.headers {
                request = request.header(name, value);
            }
            match request.send(&body[..]) {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => last_error = format!("HTTP {}", response.status().as_u16()),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(last_error)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
