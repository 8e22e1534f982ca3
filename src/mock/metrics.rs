//! `/metrics` in Prometheus text format: vLLM's scheduler gauges under their vLLM names (what a
//! gateway's load-aware routing scrapes), vLLM's prefix-cache counters when the KV cache is
//! simulated, plus the simulator's own counters (what tests assert on).

use std::sync::atomic::Ordering;

use super::Shared;

pub(super) fn render(sh: &Shared, out: &mut Vec<u8>) {
    use std::fmt::Write;
    let mut s = String::with_capacity(1024);
    let (cache_usage, scheduled) = match &sh.scheduler {
        Some(sched) => sched.stats(),
        None => (None, Vec::new()),
    };
    let prioritized = sh.scheduler.as_ref().is_some_and(|s| s.prioritizes());
    let waiting = |m: usize| sh.opts.waiting + scheduled.get(m).map_or(0, |st| st.waiting);
    let kv_usage = cache_usage.unwrap_or(sh.opts.kv_cache_usage);
    let gauges: [(&str, &str); 4] = [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.",
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        ),
    ];
    for (i, (name, help)) in gauges.iter().enumerate() {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (m, model) in sh.opts.models.iter().enumerate() {
            let label = escape_label(model);
            let _ = match i {
                0 => writeln!(
                    s,
                    "{name}{{model_name=\"{label}\"}} {}",
                    sh.running[m].load(Ordering::Relaxed)
                ),
                1 => writeln!(s, "{name}{{model_name=\"{label}\"}} {}", waiting(m)),
                _ => writeln!(s, "{name}{{model_name=\"{label}\"}} {kv_usage}"),
            };
        }
    }
    // vLLM declares these as prometheus_client Counters named `vllm:prefix_cache_queries` and
    // `vllm:prefix_cache_hits` (vllm/v1/metrics/loggers.py); the client exposes counters with a
    // `_total` suffix.
    if cache_usage.is_some() {
        let counters = [
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                false,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                true,
            ),
        ];
        for (name, help, hits) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (m, model) in sh.opts.models.iter().enumerate() {
                let label = escape_label(model);
                let _ = writeln!(
                    s,
                    "{name}{{model_name=\"{label}\"}} {}",
                    if hits {
                        scheduled[m].hits
                    } else {
                        scheduled[m].queries
                    }
                );
            }
        }
    }
    // vLLM's `vllm:num_preemptions` Counter; reported only under a priority policy, so the
    // output without one stays as it was.
    if prioritized {
        let name = "vllm:num_preemptions_total";
        let _ = writeln!(
            s,
            "# HELP {name} Cumulative number of preemption from the engine.\n# TYPE {name} counter"
        );
        for (m, model) in sh.opts.models.iter().enumerate() {
            let label = escape_label(model);
            let _ = writeln!(
                s,
                "{name}{{model_name=\"{label}\"}} {}",
                scheduled[m].preemptions
            );
        }
    }
    let counters = [
        (
            "mock_connections_total",
            "TCP connections accepted.",
            &sh.connections,
        ),
        (
            "mock_requests_total",
            "HTTP requests received, except GET /health, /metrics and /v1/models.",
            &sh.requests,
        ),
        (
            "mock_requests_cancelled_total",
            "Responses the client abandoned before they ended.",
            &sh.cancelled,
        ),
        (
            "mock_streams_completed_total",
            "Streams sent through data: [DONE].",
            &sh.streams_completed,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out.extend_from_slice(s.as_bytes());
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
