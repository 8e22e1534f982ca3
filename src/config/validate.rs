//! Validation of a whole config: checks the general sections, has each section file build its
//! own, and assembles [`Config`] once nothing was wrong. Every problem is recorded as an
//! [`Issue`]; validation never stops at the first.
//!
//! It must not resolve hostnames, open files or connect to anything, and it holds no defaults
//! (they live in the `Default` impls of the raw types).

use super::address::{parse_backend_url, parse_listen};
use super::types::{
    AdminConfig, Backend, Config, LogConfig, MetricsConfig, RawConfig, Secret, Timeouts,
    UpstreamConfig,
};
use super::{auth, limits, routing, scheduling, tls, usage, Issue, PipelineMode, ProviderConfig};

/// Validates `raw` and resolves what needs resolving; `None` once any issue is recorded.
pub(super) fn build(raw: RawConfig, issues: &mut Vec<Issue>) -> Option<Config> {
    let mut report = |at: &str, result: Result<(), String>| {
        if let Err(message) = result {
            issues.push(Issue::new(at, message));
        }
    };
    let listen = parse_listen(&raw.listen);
    report("listen", listen.as_ref().map(|_| ()).map_err(Clone::clone));
    let listener_tls = match raw.tls.map(tls::build_listener) {
        None => None,
        Some(Ok(t)) => t,
        Some(Err(problems)) => {
            for (at, message) in problems {
                report(at, Err(message));
            }
            None
        }
    };
    report("max_request_body", positive(raw.max_request_body.0));
    report("max_header_size", positive(raw.max_header_size.0));
    for (at, value) in [
        ("timeouts.connect", raw.timeouts.connect),
        ("timeouts.client_header", raw.timeouts.client_header),
        ("timeouts.client_body", raw.timeouts.client_body),
        ("timeouts.keepalive", raw.timeouts.keepalive),
        ("upstream.idle_timeout", raw.upstream.idle_timeout),
    ] {
        report(at, positive(value.0.as_nanos()));
    }
    report("log.level", check_log_level(&raw.log.level));
    report("log.flush_interval", positive(raw.log.flush_interval.0));
    report("log.buffer_size", check_log_buffer(raw.log.buffer_size.0));
    report("metrics.path", check_metrics_path(&raw.metrics.path));
    let admin_listen = parse_listen(&raw.admin.listen);
    report(
        "admin.listen",
        admin_listen.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    if raw.admin.enabled && raw.admin.token.chars().count() < 16 {
        report(
            "admin.token",
            Err("must be at least 16 characters when the admin API is enabled".into()),
        );
    }
    report(
        "admin.key_store",
        check_store_location(&raw.admin.key_store),
    );
    let id_header = raw.upstream.request_id_header.trim();
    if !id_header
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        report(
            "upstream.request_id_header",
            Err(format!("`{id_header}` is not a header name")),
        );
    }
    if raw.backends.is_empty() {
        report(
            "backends",
            Err("at least one backend is required, e.g. `- url: \"http://127.0.0.1:8001\"`".into()),
        );
    }
    if raw.backends.len() > 64 {
        report("backends", Err("at most 64 backends are supported".into()));
    }
    let mut backends = Vec::with_capacity(raw.backends.len());
    for (index, backend) in raw.backends.into_iter().enumerate() {
        if backend.weight == 0 {
            report(
                &format!("backends[{index}].weight"),
                Err("must be at least 1 (remove the backend to send it nothing)".into()),
            );
        }
        for (from, to) in &backend.model_map {
            // Written into the JSON string as they are: no escapes to get wrong.
            let plain = |s: &str| {
                !s.is_empty() && !s.contains(|c: char| c == '"' || c == '\\' || c.is_control())
            };
            if !plain(from) || !plain(to) {
                report(
                    &format!("backends[{index}].model_map"),
                    Err(format!("{from:?}: {to:?}: names must be non-empty, without quotes, backslashes or control characters")),
                );
            }
        }
        let target = parse_backend_url(&backend.url);
        let tls = match tls::build_backend(backend.tls, target.as_ref().is_ok_and(|t| t.https)) {
            Ok(tls) => tls,
            Err(problems) => {
                for (key, message) in problems {
                    let at = match key {
                        "" => format!("backends[{index}].tls"),
                        key => format!("backends[{index}].tls.{key}"),
                    };
                    report(&at, Err(message));
                }
                None
            }
        };
        match target {
            Ok(target) => backends.push(Backend {
                url: backend.url,
                weight: backend.weight,
                host: target.host,
                port: target.port,
                host_header: target.host_header,
                path_prefix: target.path_prefix,
                api_key: backend.api_key.filter(|k| !k.is_empty()).map(Secret),
                models: backend.models,
                headers: backend.headers.into_iter().collect(),
                max_in_flight: backend.max_in_flight.filter(|&n| n > 0),
                tls,
                tier: backend.tier,
                model_map: backend.model_map.into_iter().collect(),
                engine_priority: backend.engine_priority.build(),
            }),
            Err(message) => report(&format!("backends[{index}].url"), Err(message)),
        }
    }
    let usage_hook = usage::build(raw.usage_hook, &mut report);
    let routing = routing::routing(raw.load_balance, raw.routing, &mut report);
    let health_check = routing::health_check(raw.health_check);
    let retry = routing::retry(raw.retry, &mut report);
    let (mut auth, api_keys) = auth::build(raw.auth, raw.api_keys, issues);
    if let Some(Err(message)) = auth.as_ref().map(|a| check_store_location(&a.quota_path.0)) {
        issues.push(Issue::new("auth.quota_path", message));
    }
    let rate_limit = limits::build(raw.rate_limit, issues);
    let scheduling = scheduling::build(raw.scheduling, issues);
    if scheduling.is_none() {
        for (index, _) in backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.engine_priority.is_some())
        {
            issues.push(Issue::new(
                &format!("backends[{index}].engine_priority"),
                "needs `scheduling: {enabled: true}`: the priority sent is the request's place in the scheduling order",
            ));
        }
    }
    // Keys created through the admin API authenticate like any other provider's (in
    // `first_match` mode; with `all`, every provider must know a key, so the store stays out).
    if let Some(auth) = auth
        .as_mut()
        .filter(|a| raw.admin.enabled && a.mode == PipelineMode::FirstMatch)
    {
        auth.pipeline.push(ProviderConfig::KeyStore {
            location: Secret(raw.admin.key_store.clone()),
        });
    }
    if !issues.is_empty() {
        return None;
    }
    let workers = match raw.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    Some(Config {
        listen: listen.ok()?,
        tls: listener_tls,
        workers,
        io_driver: raw.io_driver,
        cpu_affinity: raw.cpu_affinity,
        busy_poll: raw.busy_poll.0,
        max_request_body: raw.max_request_body.0,
        max_header_size: raw.max_header_size.0,
        max_connections: match raw.max_connections {
            0 => default_max_connections(),
            n => n,
        },
        shutdown_timeout: raw.shutdown_timeout.0,
        timeouts: Timeouts {
            connect: raw.timeouts.connect.0,
            client_header: raw.timeouts.client_header.0,
            client_body: raw.timeouts.client_body.0,
            keepalive: raw.timeouts.keepalive.0,
            // 0 means no limit, so the example file can show these keys at their defaults.
            first_byte: raw
                .timeouts
                .first_byte
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            idle: raw.timeouts.idle.map(|d| d.0).filter(|d| !d.is_zero()),
            total: raw.timeouts.total.map(|d| d.0).filter(|d| !d.is_zero()),
        },
        upstream: UpstreamConfig {
            max_idle_per_backend: raw.upstream.max_idle_per_backend,
            idle_timeout: raw.upstream.idle_timeout.0,
            request_id_header: Some(raw.upstream.request_id_header.trim())
                .filter(|h| !h.is_empty())
                .map(str::to_owned),
        },
        backends,
        routing,
        health_check,
        retry,
        model_aliases: raw.model_aliases.into_iter().collect(),
        log: LogConfig::from(raw.log),
        metrics: MetricsConfig {
            enabled: raw.metrics.enabled,
            path: raw.metrics.path,
        },
        admin: AdminConfig {
            enabled: raw.admin.enabled,
            listen: admin_listen.ok()?,
            token: raw.admin.token,
            key_store: Secret(raw.admin.key_store),
        },
        usage_hook,
        auth,
        api_keys,
        rate_limit,
        scheduling,
    })
}

fn positive<T: Default + PartialEq>(value: T) -> Result<(), String> {
    if value == T::default() {
        Err("must be greater than 0".into())
    } else {
        Ok(())
    }
}

/// A worker's access log buffer: room for many lines, small next to the worker's memory.
fn check_log_buffer(size: usize) -> Result<(), String> {
    const RANGE: std::ops::RangeInclusive<usize> = (4 << 10)..=(64 << 20);
    if RANGE.contains(&size) {
        Ok(())
    } else {
        Err(format!("{size} bytes: must be between 4KiB and 64MiB"))
    }
}

/// The metrics path must not shadow the proxied API or the health check.
fn check_metrics_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err(format!(
            "invalid path {path:?}: expected an absolute path like \"/metrics\""
        ));
    }
    if path.starts_with("/v1/") || path == "/health" {
        return Err(format!("{path:?} is taken by the proxied API or /health"));
    }
    Ok(())
}

/// Catches typos like `inof`, which `tracing`'s filter syntax would silently read as a target
/// name (logging nothing). Accepts a level or comma-separated `target=level` directives.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let ok = !level.trim().is_empty()
        && level.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or_default().trim();
            LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid log level {level:?}: expected one of {LEVELS:?} or directives like \"info,llmproxy=debug\""
        ))
    }
}

/// Half the process's open-file limit, less a reserve for listeners, logs, the spool and
/// checkers: each proxied request may hold an upstream connection beside its client's.
fn default_max_connections() -> usize {
    // SAFETY: getrlimit writes into the struct it is given.
    let soft = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur
    };
    (usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(64)
        / 2)
    .max(16)
}

/// A `postgres://` or `mysql://` store (keys, quotas) must be a URL its client reads (the message
/// never repeats it: it may hold a password); anything else is a SQLite path.
fn check_store_location(location: &str) -> Result<(), String> {
    match crate::db::DbDriver::of(location) {
        crate::db::DbDriver::Sqlite if location.trim().is_empty() => {
            Err("must be a SQLite path, or a postgres:// or mysql:// URL".into())
        }
        crate::db::DbDriver::Sqlite => Ok(()),
        crate::db::DbDriver::Postgres => location
            .parse::<postgres::Config>()
            .map(|_| ())
            .map_err(|e| format!("cannot read the PostgreSQL URL: {e}")),
        crate::db::DbDriver::Mysql => mysql::Opts::from_url(location)
            .map(|_| ())
            .map_err(|e| format!("cannot read the MySQL URL: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_are_checked() {
        assert!(check_store_location("./data/keys.db").is_ok());
        assert!(check_store_location("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(check_store_location("mysql://root@127.0.0.1:3306/test").is_ok());
        let e = check_store_location("mysql://root:hunter2@127.0.0.1:x/test").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(check_store_location("").is_err());
    }

    #[test]
    fn log_level_is_checked() {
        assert!(check_log_level("INFO").is_ok());
        assert!(check_log_level("info,llmproxy=debug").is_ok());
        assert!(check_log_level("inof").is_err());
        assert!(check_log_level("").is_err());
    }

    #[test]
    fn log_buffer_size_is_bounded() {
        assert!(check_log_buffer(64 << 10).is_ok());
        assert!(check_log_buffer(4 << 10).is_ok());
        assert!(check_log_buffer(4095).is_err());
        assert!(check_log_buffer((64 << 20) + 1).is_err());
    }

    #[test]
    fn metrics_path_is_checked() {
        assert!(check_metrics_path("/metrics").is_ok());
        assert!(check_metrics_path("metrics").is_err());
        assert!(check_metrics_path("/v1/metrics").is_err());
        assert!(check_metrics_path("/health").is_err());
    }
}
