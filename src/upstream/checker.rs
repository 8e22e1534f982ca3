//! The checker thread: one per process, off the worker cores. Each round it
//! - runs active health checks (`health_check`) and publishes each backend's verdict,
//! - scrapes vLLM's `/metrics` for `least_load` (waiting and running requests, KV-cache use),
//! - merges the backends' `/v1/models` lists into the gateway's own answer.
//!
//! Workers only read what it publishes (atomics, one RwLock read per `/v1/models`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Backend, Backends};
use crate::config::{Config, Strategy};

/// Starts the checker when the config asks for anything it does.
pub fn spawn_checker(backends: Arc<Backends>, config: &Config) {
    let health = config.health_check.clone();
    let least_load = config.routing.strategy == Strategy::LeastLoad;
    let merge_models = backends.list.len() > 1 || !backends.aliases.is_empty();
    if !health.active && !least_load && !merge_models {
        return;
    }
    let mut period = if health.active {
        health.interval
    } else {
        Duration::from_secs(10)
    };
    if least_load {
        period = period.min(config.routing.load_interval);
    }
    let load_path = config.routing.load_path.clone();
    let spawned = std::thread::Builder::new()
        .name("llmproxy-checker".into())
        .spawn(move || {
            let n = backends.list.len();
            let (mut ok_streak, mut fail_streak) = (vec![0u32; n], vec![0u32; n]);
            let mut next_health = Instant::now();
            let mut next_models = Instant::now();
            while !backends.is_retired() {
                let now = Instant::now();
                if health.active && now >= next_health {
                    next_health = now + health.interval;
                    for (i, b) in backends.list.iter().enumerate() {
                        let ok = get(b, &health.path, &health.headers, health.timeout)
                            .is_some_and(|(status, _)| status == health.expected_status);
                        let (ok_n, fail_n) = (&mut ok_streak[i], &mut fail_streak[i]);
                        if ok {
                            *ok_n += 1;
                            *fail_n = 0;
                        } else {
                            *fail_n += 1;
                            *ok_n = 0;
                        }
                        publish_health(b, ok, *ok_n, *fail_n, &health);
                    }
                }
                if least_load {
                    for b in &backends.list {
                        if let Some((200, body)) = get(b, &load_path, &[], health.timeout) {
                            b.load.store(load_score(&body).to_bits(), Ordering::Relaxed);
                        }
                    }
                }
                if merge_models && now >= next_models {
                    next_models = now + Duration::from_secs(10);
                    backends.set_models_json(merged_models(&backends, health.timeout));
                }
                std::thread::sleep(period);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the health checker thread: {e}");
    }
}

fn publish_health(
    b: &Backend,
    ok: bool,
    ok_streak: u32,
    fail_streak: u32,
    policy: &crate::config::HealthCheck,
) {
    let was = b.healthy.load(Ordering::Relaxed);
    if ok && !was && ok_streak >= policy.healthy_threshold {
        b.healthy.store(true, Ordering::Relaxed);
        // A backend that answers its health check again is given traffic at once.
        b.failures.store(0, Ordering::Relaxed);
        b.ejected_until.store(0, Ordering::Relaxed);
        tracing::info!(backend = %b.url, "backend healthy");
    } else if !ok && was && fail_streak >= policy.unhealthy_threshold {
        b.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(backend = %b.url, "backend unhealthy: removed from rotation");
    }
}

/// vLLM's load signals folded into one number: queued requests weigh most (they wait for a
/// slot), then running ones, then KV-cache pressure (0..1, scaled to a few requests' worth).
fn load_score(metrics: &[u8]) -> f64 {
    let text = String::from_utf8_lossy(metrics);
    let mut waiting = 0.0;
    let mut running = 0.0;
    let mut kv: f64 = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match name {
            "vllm:num_requests_waiting" => waiting += value,
            "vllm:num_requests_running" => running += value,
            "vllm:gpu_cache_usage_perc" | "vllm:kv_cache_usage_perc" => kv = kv.max(value),
            _ => {}
        }
    }
    waiting * 4.0 + running + kv * 4.0
}

/// The union of the backends' models (configured lists, else what `/v1/models` reports) plus
/// the aliases, as an OpenAI list.
fn merged_models(backends: &Backends, timeout: Duration) -> Vec<u8> {
    let mut ids: Vec<String> = Vec::new();
    for b in &backends.list {
        if !b.models.is_empty() {
            ids.extend(b.models.iter().cloned());
            continue;
        }
        let Some((200, body)) = get(b, "/v1/models", &[], timeout) else {
            continue;
        };
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            for m in v["data"].as_array().into_iter().flatten() {
                if let Some(id) = m["id"].as_str() {
                    ids.push(id.to_string());
                }
            }
        }
    }
    ids.extend(backends.aliases.iter().map(|(public, _)| public.clone()));
    ids.sort();
    ids.dedup();
    let data: Vec<_> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

/// A blocking HTTP/1.0 GET (so the body is close-delimited, never chunked). Runs only here.
fn get(
    b: &Backend,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Option<(u16, Vec<u8>)> {
    let addr = b.addr()?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    let mut req = format!(
        "GET {}{} HTTP/1.0\r\nHost: {}\r\n",
        b.path_prefix, path, b.host_header
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = Vec::new();
    s.take(4 << 20).read_to_end(&mut resp).ok()?;
    let status = std::str::from_utf8(resp.get(9..12)?).ok()?.parse().ok()?;
    let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, resp.split_off(body_at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_score_reads_vllm_metrics() {
        let text = b"# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3.0\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(load_score(text), 2.0 * 4.0 + 3.0 + 2.0);
        assert_eq!(load_score(b""), 0.0);
    }
}
