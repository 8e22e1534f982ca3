//! The admin API: its own listener (`admin.listen`), off by default, every request authenticated
//! with `Authorization: Bearer <admin.token>` compared in constant time.
//!
//! `GET /admin/backends` (the running backends, whether they take traffic, requests in flight),
//! `POST /admin/reload` (the same reload as SIGHUP, answering with its result), `GET /admin/metrics`
//! (the Prometheus text, for setups that keep it off the client listener), the key store
//! (`POST /admin/keys` creates a key and shows it once, `GET /admin/keys`, `DELETE
//! /admin/keys/NAME`), and `GET /admin/usage?since=24h&until=0s&by=key|model` (token totals from
//! the usage spool).
//!
//! Runs on one plain thread with blocking sockets, one request per connection: it is for
//! operators, must never run on or slow down a worker, and needs no throughput.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::Control;
use crate::auth::store;
use crate::metrics::Registry;
use crate::usage::spool::GroupBy;

/// Largest admin request head, and body (a key's JSON).
const MAX_REQUEST: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the admin listener and serves it on a new thread; returns the bound address (port 0 in
/// `admin.listen` becomes the port the kernel chose).
pub fn start(control: Arc<Control>, registry: Arc<Registry>) -> io::Result<SocketAddr> {
    let addr = control.live.snapshot().1.config.admin.listen;
    let listener = TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("admin.listen {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "admin API listening");
    std::thread::Builder::new()
        .name("llmproxy-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, &control, &registry) {
                            tracing::debug!("admin connection: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("admin accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(bound)
}

fn serve(mut stream: TcpStream, control: &Control, registry: &Registry) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path, auth, head_len, body_len) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value.to_vec())
                };
                let body_len = header("content-length")
                    .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                    header("authorization"),
                    head_len,
                    body_len,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {}
            _ => return respond(&mut stream, 400, &error("invalid request")),
        }
    };

    if body_len > MAX_REQUEST {
        return respond(&mut stream, 400, &error("request body too large"));
    }
    while buf.len() < head_len + body_len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_len..head_len + body_len];

    let (_, snapshot) = control.live.snapshot();
    let token = snapshot.config.admin.token.as_bytes();
    let presented = auth.as_deref().and_then(|v| v.strip_prefix(b"Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p, token)) {
        return respond(&mut stream, 401, &error("missing or wrong admin token"));
    }

    let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    let key_store = || store::open(&snapshot.config.admin.key_store.0);
    match (method.as_str(), route) {
        ("POST", "/admin/keys") => {
            let created = serde_json::from_slice::<serde_json::Value>(body)
                .map_err(|e| format!("invalid JSON: {e}"))
                .and_then(|spec| {
                    let mut conn = key_store()?;
                    store::create(&mut conn, &spec).map(|key| (key, spec))
                });
            match created {
                Ok((key, spec)) => {
                    // The only time the key is shown; the store keeps its hash.
                    let body = json!({"key": key, "name": spec["name"]});
                    respond(&mut stream, 201, &body.to_string())
                }
                Err(e) => respond(&mut stream, 422, &error(&e)),
            }
        }
        ("GET", "/admin/keys") => match key_store().and_then(|mut c| store::list(&mut c)) {
            Ok(keys) => respond(&mut stream, 200, &json!({ "keys": keys }).to_string()),
            Err(e) => respond(&mut stream, 500, &error(&e)),
        },
        ("DELETE", name) if name.starts_with("/admin/keys/") => {
            let name = &name["/admin/keys/".len()..];
            match key_store().and_then(|mut c| store::delete(&mut c, name)) {
                Ok(true) => {
                    if let Some(auth) = &snapshot.auth {
                        auth.forget_cached();
                    }
                    respond(&mut stream, 200, &json!({"deleted": name}).to_string())
                }
                Ok(false) => respond(&mut stream, 404, &error("no such key")),
                Err(e) => respond(&mut stream, 500, &error(&e)),
            }
        }
        ("GET", "/admin/usage") => match usage_totals(&snapshot.config, query) {
            Ok(body) => respond(&mut stream, 200, &body),
            Err(e) => respond(&mut stream, 400, &error(&e)),
        },
        ("GET", "/admin/backends") => {
            let backends: Vec<_> = snapshot
                .backends
                .list
                .iter()
                .map(|b| {
                    json!({
                        "url": b.url,
                        "weight": b.weight,
                        "up": b.addr().is_some() && b.is_healthy() && !b.is_ejected(),
                        "resolved": b.addr().is_some(),
                        "healthy": b.is_healthy(),
                        "ejected": b.is_ejected(),
                        "address": b.addr().map(|a| a.to_string()),
                        "in_flight": b.in_flight(),
                    })
                })
                .collect();
            let (generation, _) = control.live.snapshot();
            let body = json!({"generation": generation, "backends": backends});
            respond(&mut stream, 200, &body.to_string())
        }
        ("POST", "/admin/reload") => match super::reload_config(control) {
            Ok(generation) => {
                let body = json!({"status": "reloaded", "generation": generation});
                respond(&mut stream, 200, &body.to_string())
            }
            Err(e) => respond(&mut stream, 422, &error(&e)),
        },
        ("GET", "/admin/metrics") => {
            let text = registry.render(&snapshot.backends, snapshot.auth.as_deref());
            respond_with(&mut stream, 200, "text/plain; version=0.0.4", &text)
        }
        _ => respond(&mut stream, 404, &error("unknown admin endpoint")),
    }
}

/// `since` and `until` are durations back from now (`24h`, `30m`; `until` defaults to now),
/// `by` is `key` or `model` (absent: one grand total).
fn usage_totals(config: &crate::config::Config, query: &str) -> Result<String, String> {
    let mut since = Duration::from_secs(24 * 3600);
    let mut until = Duration::ZERO;
    let mut by = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => since = crate::config::parse_duration(v)?,
            "until" => until = crate::config::parse_duration(v)?,
            "by" => {
                by = Some(match v {
                    "key" => GroupBy::Key,
                    "model" => GroupBy::Model,
                    _ => return Err("by must be key or model".into()),
                })
            }
            _ => return Err(format!("unknown parameter {k:?}")),
        }
    }
    let now = crate::usage::spool::now_ms();
    let ms = |d: Duration| now - d.as_millis() as i64;
    let spool =
        crate::usage::Spool::open(&config.usage_hook.spool_path).map_err(|e| e.to_string())?;
    let totals = spool
        .totals(ms(since), ms(until), by)
        .map_err(|e| e.to_string())?;
    let rows: Vec<_> = totals
        .iter()
        .map(|t| {
            json!({
                "group": t.group, "requests": t.requests, "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens, "total_tokens": t.total_tokens,
                "estimated": t.estimated,
            })
        })
        .collect();
    Ok(json!({"since_ms": ms(since), "until_ms": ms(until), "totals": rows}).to_string())
}

fn error(message: &str) -> String {
    json!({"error": {"message": message, "type": "admin_error"}}).to_string()
}

fn respond(stream: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    respond_with(stream, status, "application/json", body)
}

fn respond_with(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unprocessable Entity",
    };
    let auth = if status == 401 {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Compares without an early exit, so timing does not reveal how much of the token matched.
/// The length is not secret (it is in the config's validation rules anyway).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimizer from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b""));
    }
}
