//! The Prometheus text exposition format (version 0.0.4), written by hand: merging a few fixed
//! arrays needs no client library, and the output is easy to test byte for byte.

use std::fmt::Write;

use super::{
    Histogram, Registry, Rejection, UpstreamErrorKind, WorkerMetrics, BANDS, PATHS, STATUSES,
    STATUS_SLOTS,
};
use crate::api::Api;
use crate::auth::Auth;
use crate::upstream::{Backends, PrefixReason};

pub const CONTENT_TYPE: &[u8] = b"text/plain; version=0.0.4; charset=utf-8";

/// Keys named in `llmproxy_key_tokens_total`: the label stays bounded however many keys exist.
const TOP_KEYS: usize = 10;

impl Registry {
    /// Renders every metric, merging all workers' blocks. `backends` is the scraping worker's
    /// current backend set, for the health gauge; `keys` its keys, for the tokens served to the
    /// top ones when scheduling is on.
    pub fn render(&self, backends: &Backends, keys: Option<&Auth>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| {
            self.workers
                .iter()
                .fold(0u64, |acc, w| acc.wrapping_add(f(w)))
        };

        header(
            &mut out,
            "llmproxy_requests_total",
            "counter",
            "Requests answered, by endpoint, streaming, backend and status.",
        );
        for (p, path) in PATHS.iter().enumerate() {
            for stream in [false, true] {
                for (b, backend) in slots.iter().enumerate() {
                    for s in 0..STATUS_SLOTS {
                        let slot = super::request_slot(p, stream, b, s);
                        let v = sum(&|w| w.requests(slot).get());
                        if v == 0 {
                            continue;
                        }
                        let _ = writeln!(
                            out,
                            "llmproxy_requests_total{{path=\"{path}\",stream=\"{stream}\",backend=\"{}\",status=\"{}\"}} {v}",
                            escape(backend),
                            status_label(s)
                        );
                    }
                }
            }
        }

        histogram(
            &mut out,
            "llmproxy_latency_ms",
            "Time from request head received to response end (or error), in ms.",
            &self.workers,
            &|w| &w.latency,
        );
        histogram(
            &mut out,
            "llmproxy_ttft_ms",
            "Time from request body received to the first response body byte sent, in ms.",
            &self.workers,
            &|w| &w.ttft,
        );
        histogram(
            &mut out,
            "llmproxy_upstream_latency_ms",
            "Time from request sent upstream to response end read from the backend, in ms.",
            &self.workers,
            &|w| &w.upstream_latency,
        );
        histogram(
            &mut out,
            "llmproxy_inter_token_ms",
            "Time between consecutive body writes of an event stream, in ms.",
            &self.workers,
            &|w| &w.inter_token,
        );
        histogram(
            &mut out,
            "llmproxy_gateway_overhead_us",
            "Time spent in the gateway, not waiting on client or backend, in us (approximate).",
            &self.workers,
            &|w| &w.overhead,
        );

        gauge_header(
            &mut out,
            "llmproxy_in_flight_requests",
            "Requests being handled now.",
        );
        let _ = writeln!(
            out,
            "llmproxy_in_flight_requests {}",
            sum(&|w| w.in_flight.get()) as i64
        );

        gauge_header(
            &mut out,
            "llmproxy_backend_in_flight",
            "Requests being relayed to each backend now (all workers).",
        );
        for b in &backends.list {
            let _ = writeln!(
                out,
                "llmproxy_backend_in_flight{{backend=\"{}\"}} {}",
                escape(&b.url),
                b.in_flight()
            );
        }

        gauge_header(
            &mut out,
            "llmproxy_backend_up",
            "1 when the backend takes traffic (resolved, healthy, not ejected), else 0.",
        );
        for b in &backends.list {
            let up = u8::from(b.addr().is_some() && b.is_healthy() && !b.is_ejected());
            let _ = writeln!(
                out,
                "llmproxy_backend_up{{backend=\"{}\"}} {up}",
                escape(&b.url)
            );
        }

        gauge_header(
            &mut out,
            "llmproxy_backend_tier",
            "The backend's spillover tier (backends[].tier): lower tiers take requests first.",
        );
        for b in &backends.list {
            let _ = writeln!(
                out,
                "llmproxy_backend_tier{{backend=\"{}\"}} {}",
                escape(&b.url),
                b.tier
            );
        }

        if let Some(scheduler) = &backends.scheduler {
            header(
                &mut out,
                "llmproxy_queue_depth",
                "gauge",
                "Requests waiting in the gateway for a saturated backend, by priority band.",
            );
            let mut depth = [0usize; BANDS.len()];
            for (priority, n) in scheduler.depth_by_priority() {
                depth[super::band(priority)] += n;
            }
            for (b, name) in BANDS.iter().enumerate() {
                let _ = writeln!(out, "llmproxy_queue_depth{{band=\"{name}\"}} {}", depth[b]);
            }
            header(
                &mut out,
                "llmproxy_queue_wait_ms",
                "histogram",
                "Time requests waited for a saturated backend, by priority band, in ms.",
            );
            for (b, name) in BANDS.iter().enumerate() {
                histogram_series(
                    &mut out,
                    "llmproxy_queue_wait_ms",
                    &format!("band=\"{name}\","),
                    &self.workers,
                    &|w| &w.queue_wait[b],
                );
            }
            header(
                &mut out,
                "llmproxy_queue_refused_total",
                "counter",
                "Requests that waited in vain or found no room (429/503), by priority band.",
            );
            for (b, name) in BANDS.iter().enumerate() {
                let v = sum(&|w| w.queue_refused[b].get());
                let _ = writeln!(out, "llmproxy_queue_refused_total{{band=\"{name}\"}} {v}");
            }
            header(
                &mut out,
                "llmproxy_preemptive_dispatches_total",
                "counter",
                "Requests sent past a saturated backend's max_in_flight because its engine (engine_priority: sglang) preempts a less urgent request for them, by priority band.",
            );
            for (b, name) in BANDS.iter().enumerate() {
                let v = sum(&|w| w.past_limit[b].get());
                let _ = writeln!(
                    out,
                    "llmproxy_preemptive_dispatches_total{{band=\"{name}\"}} {v}"
                );
            }
            if let Some(keys) = keys {
                header(
                    &mut out,
                    "llmproxy_key_tokens_total",
                    "counter",
                    "Tokens served (prompt + completion, from usage records) to the keys served most, by key name; at most 10 keys.",
                );
                for (name, tokens) in keys.top_served(TOP_KEYS) {
                    let _ = writeln!(
                        out,
                        "llmproxy_key_tokens_total{{key=\"{}\"}} {tokens}",
                        escape(&name)
                    );
                }
            }
        }

        header(
            &mut out,
            "llmproxy_rejections_total",
            "counter",
            "Requests the gateway answered itself, by reason.",
        );
        for r in Rejection::ALL {
            let v = sum(&|w| w.rejections[r as usize].get());
            let _ = writeln!(
                out,
                "llmproxy_rejections_total{{reason=\"{}\"}} {v}",
                r.as_str()
            );
        }

        header(
            &mut out,
            "llmproxy_upstream_errors_total",
            "counter",
            "Failed exchanges with a backend, by kind.",
        );
        for k in UpstreamErrorKind::ALL {
            let v = sum(&|w| w.upstream_errors[k as usize].get());
            let _ = writeln!(
                out,
                "llmproxy_upstream_errors_total{{kind=\"{}\"}} {v}",
                k.as_str()
            );
        }

        header(
            &mut out,
            "llmproxy_connections_open",
            "gauge",
            "Client connections open.",
        );
        let _ = writeln!(out, "llmproxy_connections_open {}", self.open_connections());
        header(
            &mut out,
            "llmproxy_connections_refused_total",
            "counter",
            "Client connections closed at accept: the process had max_connections open.",
        );
        let _ = writeln!(
            out,
            "llmproxy_connections_refused_total {}",
            sum(&|w| w.connections_refused.get())
        );
        header(
            &mut out,
            "llmproxy_tls_handshake_failures_total",
            "counter",
            "Client TLS handshakes that failed (bad certificate, no shared protocol) or timed out.",
        );
        let _ = writeln!(
            out,
            "llmproxy_tls_handshake_failures_total {}",
            sum(&|w| w.tls_handshake_failures.get())
        );
        header(
            &mut out,
            "llmproxy_client_cancels_total",
            "counter",
            "Requests whose client left before the response ended.",
        );
        let _ = writeln!(
            out,
            "llmproxy_client_cancels_total {}",
            sum(&|w| w.client_cancels.get())
        );

        header(
            &mut out,
            "llmproxy_retries_total",
            "counter",
            "Attempts sent again: on another backend (retry policy) or on a fresh connection after a stale pooled one failed.",
        );
        let _ = writeln!(out, "llmproxy_retries_total {}", sum(&|w| w.retries.get()));

        header(
            &mut out,
            "llmproxy_cache_aware_routes_total",
            "counter",
            "Backends cache_aware chose, by reason: the longest prefix match, the load guard, or no match (least loaded).",
        );
        for r in PrefixReason::ALL {
            let v = sum(&|w| w.prefix_routes[r as usize].get());
            let _ = writeln!(
                out,
                "llmproxy_cache_aware_routes_total{{reason=\"{}\"}} {v}",
                r.as_str()
            );
        }
        header(
            &mut out,
            "llmproxy_cache_aware_matched_share",
            "summary",
            "Share of a prompt's blocks the backend cache_aware chose already held (prompts of at least one block).",
        );
        let share = sum(&|w| w.prefix_share_milli.get());
        let _ = writeln!(
            out,
            "llmproxy_cache_aware_matched_share_sum {}\nllmproxy_cache_aware_matched_share_count {}",
            share as f64 / 1000.0,
            sum(&|w| w.prefix_share_count.get())
        );

        self.render_usage(&mut out);
        self.render_ledger(&mut out);

        header(
            &mut out,
            "llmproxy_log_lines_dropped_total",
            "counter",
            "Log lines (access and diagnostic) dropped instead of blocking a worker: the log thread was behind or a write failed (a full disk).",
        );
        let _ = writeln!(
            out,
            "llmproxy_log_lines_dropped_total {}",
            crate::logging::lines_dropped()
        );

        gauge_header(&mut out, "llmproxy_info", "Build and runtime information.");
        let driver = *self.io_driver.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "llmproxy_info{{version=\"{}\",io_driver=\"{driver}\"}} 1",
            self.version
        );
        out
    }
}

impl Registry {
    /// Shared token accounting, only when it runs (`rate_limit.storage: redis`).
    fn render_ledger(&self, out: &mut String) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(stats) = self
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        gauge_header(
            out,
            "llmproxy_shared_accounting_up",
            "1 while token rates and quotas are shared through Redis; 0: limited per instance.",
        );
        let _ = writeln!(
            out,
            "llmproxy_shared_accounting_up {}",
            u8::from(stats.up.load(Relaxed))
        );
        header(
            out,
            "llmproxy_shared_accounting_failures_total",
            "counter",
            "Shared accounting rounds that could not reach Redis.",
        );
        let _ = writeln!(
            out,
            "llmproxy_shared_accounting_failures_total {}",
            stats.failures.load(Relaxed)
        );
        gauge_header(
            out,
            "llmproxy_shared_accounting_unsent_tokens",
            "Tokens metered here and not yet added to the shared totals.",
        );
        let _ = writeln!(
            out,
            "llmproxy_shared_accounting_unsent_tokens {}",
            stats.unsent.load(Relaxed)
        );
    }

    /// The seed's usage series, plus per-reporter delivery and backlog. Zero when usage
    /// reporting is off, so dashboards and alerts always find the series.
    fn render_usage(&self, out: &mut String) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.usage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stats = stats.as_ref();
        let reporters = stats.map_or(&[][..], |s| &s.reporters[..]);
        let webhooks = |f: &dyn Fn(&crate::usage::ReporterStats) -> u64| {
            reporters
                .iter()
                .filter(|r| r.kind == "webhook")
                .map(f)
                .sum::<u64>()
        };
        header(
            out,
            "llmproxy_webhook_success_total",
            "counter",
            "Usage records delivered to webhooks.",
        );
        let _ = writeln!(
            out,
            "llmproxy_webhook_success_total {}",
            webhooks(&|r| r.delivered.load(Relaxed))
        );
        header(
            out,
            "llmproxy_webhook_failure_total",
            "counter",
            "Failed usage webhook deliveries (each retried later).",
        );
        let _ = writeln!(
            out,
            "llmproxy_webhook_failure_total {}",
            webhooks(&|r| r.failed.load(Relaxed))
        );
        header(
            out,
            "llmproxy_usage_tokens_total",
            "counter",
            "Tokens used, by type.",
        );
        for (t, v) in [
            ("prompt", stats.map_or(0, |s| s.prompt_tokens.load(Relaxed))),
            (
                "completion",
                stats.map_or(0, |s| s.completion_tokens.load(Relaxed)),
            ),
        ] {
            let _ = writeln!(out, "llmproxy_usage_tokens_total{{type=\"{t}\"}} {v}");
        }
        header(
            out,
            "llmproxy_usage_records_total",
            "counter",
            "Usage records made (spooled when usage_hook is on), and how many had estimated tokens.",
        );
        let _ = writeln!(
            out,
            "llmproxy_usage_records_total{{estimated=\"false\"}} {}",
            stats.map_or(0, |s| s.records.load(Relaxed)
                - s.estimated.load(Relaxed).min(s.records.load(Relaxed)))
        );
        let _ = writeln!(
            out,
            "llmproxy_usage_records_total{{estimated=\"true\"}} {}",
            stats.map_or(0, |s| s.estimated.load(Relaxed))
        );
        header(
            out,
            "llmproxy_usage_tokens_by_api_total",
            "counter",
            "Tokens used, by API and type.",
        );
        for api in Api::ALL {
            let usage = stats.map(|s| &s.by_api[api.index()]);
            for (t, v) in [
                ("prompt", usage.map_or(0, |u| u.prompt_tokens.load(Relaxed))),
                (
                    "completion",
                    usage.map_or(0, |u| u.completion_tokens.load(Relaxed)),
                ),
            ] {
                let _ = writeln!(
                    out,
                    "llmproxy_usage_tokens_by_api_total{{api=\"{}\",type=\"{t}\"}} {v}",
                    api.as_str()
                );
            }
        }
        header(
            out,
            "llmproxy_usage_records_by_api_total",
            "counter",
            "Usage records made, by API and whether their tokens were estimated.",
        );
        for api in Api::ALL {
            let usage = stats.map(|s| &s.by_api[api.index()]);
            let records = usage.map_or(0, |u| u.records.load(Relaxed));
            let estimated = usage.map_or(0, |u| u.estimated.load(Relaxed)).min(records);
            for (e, v) in [("false", records - estimated), ("true", estimated)] {
                let _ = writeln!(
                    out,
                    "llmproxy_usage_records_by_api_total{{api=\"{}\",estimated=\"{e}\"}} {v}",
                    api.as_str()
                );
            }
        }
        header(
            out,
            "llmproxy_usage_events_dropped_total",
            "counter",
            "Usage events dropped because the reporter channel was full.",
        );
        let _ = writeln!(
            out,
            "llmproxy_usage_events_dropped_total {}",
            stats.map_or(0, |s| s.dropped.load(Relaxed))
        );
        header(
            out,
            "llmproxy_usage_spool_errors_total",
            "counter",
            "Failed spool writes (a full disk, an unwritable file); each batch is retried until it is written.",
        );
        let _ = writeln!(
            out,
            "llmproxy_usage_spool_errors_total {}",
            stats.map_or(0, |s| s.spool_errors.load(Relaxed))
        );
        header(
            out,
            "llmproxy_usage_delivered_total",
            "counter",
            "Usage records delivered, per reporter.",
        );
        for r in reporters {
            let _ = writeln!(
                out,
                "llmproxy_usage_delivered_total{{reporter=\"{}\",type=\"{}\"}} {}",
                escape(&r.name),
                r.kind,
                r.delivered.load(Relaxed)
            );
        }
        header(
            out,
            "llmproxy_usage_delivery_failures_total",
            "counter",
            "Failed delivery attempts, per reporter.",
        );
        for r in reporters {
            let _ = writeln!(
                out,
                "llmproxy_usage_delivery_failures_total{{reporter=\"{}\",type=\"{}\"}} {}",
                escape(&r.name),
                r.kind,
                r.failed.load(Relaxed)
            );
        }
        gauge_header(
            out,
            "llmproxy_usage_spool_backlog",
            "Spooled usage records a reporter has not delivered yet.",
        );
        for r in reporters {
            let _ = writeln!(
                out,
                "llmproxy_usage_spool_backlog{{reporter=\"{}\"}} {}",
                escape(&r.name),
                r.backlog.load(Relaxed)
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge_header(out: &mut String, name: &str, help: &str) {
    header(out, name, "gauge", help);
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    workers: &[WorkerMetrics],
    f: &dyn Fn(&WorkerMetrics) -> &Histogram<N>,
) {
    header(out, name, "histogram", help);
    histogram_series(out, name, "", workers, f);
}

/// One histogram's series; `labels` is empty or `name="value",` (trailing comma).
fn histogram_series<const N: usize>(
    out: &mut String,
    name: &str,
    labels: &str,
    workers: &[WorkerMetrics],
    f: &dyn Fn(&WorkerMetrics) -> &Histogram<N>,
) {
    let first = f(&workers[0]);
    let mut cumulative = 0u64;
    for (i, bound) in first.bounds.iter().enumerate() {
        cumulative += workers.iter().map(|w| f(w).buckets[i].get()).sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
    }
    cumulative += workers.iter().map(|w| f(w).inf.get()).sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
    let sum_us: u64 = workers.iter().map(|w| f(w).sum_us.get()).sum();
    let braced = labels.trim_end_matches(',');
    let braced = if braced.is_empty() {
        String::new()
    } else {
        format!("{{{braced}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braced} {}",
        sum_us as f64 / first.unit_us as f64
    );
    let _ = writeln!(out, "{name}_count{braced} {cumulative}");
}

fn status_label(slot: usize) -> String {
    match STATUSES.get(slot) {
        Some(code) => code.to_string(),
        None => format!("{}xx", slot - STATUSES.len() + 1),
    }
}

/// Label values are backend URLs from the config: escape what the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_merged_counters_and_cumulative_buckets() {
        let r = Registry::new(2);
        let a = r.backend_slot("http://a:1");
        r.worker(0).request(0, true, Some(a), 200);
        r.worker(1).request(0, true, Some(a), 200);
        r.worker(1).request(PATHS.len() - 1, false, None, 404);
        r.worker(0).ttft.observe(Duration::from_millis(7));
        r.worker(1).ttft.observe(Duration::from_millis(400_000));
        for (matched, reason) in [(3, PrefixReason::PrefixMatch), (0, PrefixReason::NoMatch)] {
            r.worker(1).prefix_route(crate::upstream::PrefixRoute {
                reason,
                blocks: 4,
                matched,
            });
        }
        let config = crate::config::parse(
            "backends: [{url: 'http://127.0.0.1:1'}]",
            crate::config::Format::Yaml,
        )
        .unwrap();
        let text = r.render(&Backends::new(&config).unwrap(), None);
        assert!(text.contains("llmproxy_backend_up{backend=\"http://127.0.0.1:1\"} 1\n"));
        assert!(text.contains("llmproxy_requests_total{path=\"/v1/chat/completions\",stream=\"true\",backend=\"http://a:1\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("llmproxy_requests_total{path=\"other\",stream=\"false\",backend=\"none\",status=\"404\"} 1\n"));
        assert!(text.contains("llmproxy_ttft_ms_bucket{le=\"5\"} 0\n"));
        assert!(text.contains("llmproxy_ttft_ms_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("llmproxy_ttft_ms_bucket{le=\"300000\"} 1\n"));
        assert!(text.contains("llmproxy_ttft_ms_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("llmproxy_ttft_ms_count 2\n"));
        assert!(text.contains("llmproxy_ttft_ms_sum 400007\n"));
        assert!(text.contains("llmproxy_cache_aware_routes_total{reason=\"prefix_match\"} 1\n"));
        assert!(text.contains("llmproxy_cache_aware_routes_total{reason=\"load_guard\"} 0\n"));
        assert!(text.contains("llmproxy_cache_aware_matched_share_sum 0.75\n"));
        assert!(text.contains("llmproxy_cache_aware_matched_share_count 2\n"));
        assert!(text.contains("llmproxy_info{version=\""));
    }
}
