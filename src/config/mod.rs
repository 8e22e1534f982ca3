//! Configuration: owns loading the config file (YAML or TOML), `${ENV}` substitution, key
//! checking (unknown and not-yet-supported keys), typed parsing, validation and defaults.
//! The result, [`Config`], is plain data that the rest of the gateway reads and never re-checks.
//!
//! It must not do I/O beyond reading the one file, nor networking: backend hostnames are
//! parsed, never resolved (that is the upstream module's job, at connect time); only
//! `localhost` in `listen` is mapped, to 127.0.0.1, without asking a resolver.
//!
//! Pipeline: env substitution on raw text -> generic tree -> [`schema`] key check (all problems
//! collected) -> serde into `Raw*` structs (type errors carry the key path) -> validation.
//!
//! This file owns that pipeline and [`ConfigError`]; it holds no section's types or rules.
//! [`types`] holds [`Config`], the general sections and every default of theirs; [`validate`]
//! checks them and assembles the result; [`address`] parses listen addresses, backend URLs and
//! IP blocks; the sections with rules of their own have a file each: [`routing`] (balancing,
//! health checks, retries), [`auth`] (`auth`, `api_keys`), [`limits`] (`rate_limit`),
//! [`scheduling`] (`scheduling`), [`usage`] (`usage_hook`) and [`tls`] (`tls`, `backends[].tls`).
//! [`units`] reads durations and sizes, [`env`] substitutes `${VAR}`, [`schema`] knows every key.

mod address;
mod auth;
mod env;
mod limits;
mod routing;
mod scheduling;
mod schema;
mod tls;
mod types;
mod units;
mod usage;
mod validate;

pub use address::parse_net;
pub use auth::{
    ApiKeyConfig, AuthConfig, CacheConfig, Denial, DenialResponse, KeyStatus, LuaConfig,
    PipelineMode, ProviderConfig, QuotaPeriod,
};
pub use limits::{LimitSpec, RateLimitConfig, SharedLimits};
pub use routing::{Affinity, CacheAware, HealthCheck, Retry, Routing, Strategy};
pub use scheduling::{EnginePriority, Scheduling};
pub use tls::{BackendTls, ListenerTls};
pub use types::{
    AdminConfig, Backend, Config, IoDriver, LogConfig, LogFormat, MetricsConfig, Secret, Timeouts,
    UpstreamConfig,
};
pub use units::parse_duration;
pub use usage::{Database, Durability, Reporter, ReporterKind, UsageHook, Webhook};

pub use crate::db::DbDriver;

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use types::RawConfig;

/// The built-in demo config: one local backend on 127.0.0.1:8001.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// Syntax of a config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Toml,
}

/// Why a config could not be loaded: every problem found, one per line, each as
/// `<file>: <key.path>: <message>`. Key problems come first (sorted by key within each
/// mapping), then a type error if any (serde stops at the first), then validation errors.
#[derive(Debug, Clone)]
pub struct ConfigError {
    file: Option<String>,
    issues: Vec<Issue>,
}

/// One problem at a location: a key path (`backends[1].weight`), `line N`, or nothing.
#[derive(Debug, Clone)]
struct Issue {
    at: String,
    message: String,
}

impl Issue {
    fn new(at: &str, message: impl Into<String>) -> Self {
        Issue {
            at: at.to_string(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    fn single(at: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            issues: vec![Issue::new(at, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, issue) in self.issues.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            if let Some(file) = &self.file {
                write!(f, "{file}: ")?;
            }
            if !issue.at.is_empty() {
                write!(f, "{}: ", issue.at)?;
            }
            f.write_str(&issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses the config file; `.yaml`/`.yml` is YAML, `.toml` is TOML.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let in_file = |mut error: ConfigError| {
        error.file = Some(path.display().to_string());
        error
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match extension.as_deref() {
        Some("yaml" | "yml") => Format::Yaml,
        Some("toml") => Format::Toml,
        _ => {
            return Err(in_file(ConfigError::single(
                "",
                "unknown config format: the file name must end in .yaml, .yml or .toml",
            )))
        }
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| in_file(ConfigError::single("", format!("cannot read: {e}"))))?;
    parse(&text, format).map_err(in_file)
}

/// Parses config text, substituting `${VAR}` from the process environment.
pub fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
    parse_with_env(text, format, |name| std::env::var(name).ok())
}

fn parse_with_env(
    text: &str,
    format: Format,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let text = env::substitute(text, lookup).map_err(|errors| ConfigError {
        file: None,
        issues: errors
            .into_iter()
            .map(|e| Issue::new(&format!("line {}", e.line), e.message))
            .collect(),
    })?;
    let tree: Value = match format {
        Format::Yaml => serde_norway::from_str(&text)
            .map_err(|e| ConfigError::single("", format!("invalid YAML: {e}")))?,
        Format::Toml => toml::from_str(&text)
            .map_err(|e| ConfigError::single("", format!("invalid TOML: {e}")))?,
    };
    let mut root = match tree {
        Value::Object(map) => map,
        // An empty YAML file; validation then says what is missing.
        Value::Null => Map::new(),
        _ => {
            return Err(ConfigError::single(
                "",
                "expected a mapping of keys at the top level",
            ))
        }
    };

    let mut issues = Vec::new();
    schema::check(&mut root, &mut issues);
    let config = match serde_path_to_error::deserialize::<_, RawConfig>(Value::Object(root)) {
        Ok(raw) => validate::build(raw, &mut issues),
        Err(error) => {
            let path = error.path().to_string();
            let at = if path == "." { "" } else { path.as_str() };
            issues.push(Issue::new(at, error.inner().to_string()));
            None
        }
    };
    match config {
        Some(config) if issues.is_empty() => Ok(config),
        _ => Err(ConfigError { file: None, issues }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    const SEED_TOML: &str = r#"
listen = ":8000"

[[backends]]
url = "http://vllm:8000"
weight = 5

[[backends]]
url = "http://tgi:8081"
weight = 3
"#;

    fn yaml(text: &str) -> Result<Config, ConfigError> {
        parse_with_env(text, Format::Yaml, |name| match name {
            "BACKEND" => Some("http://10.0.0.7:9000".into()),
            "WEIGHT" => Some("7".into()),
            _ => None,
        })
    }

    fn yaml_err(text: &str) -> String {
        yaml(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn shared_accounting_syncs_every_100ms_unless_told() {
        let base = "backends: [{url: 'http://b'}]\nrate_limit: {storage: redis";
        let shared = |c: Config| c.rate_limit.redis.expect("storage: redis");
        assert_eq!(
            shared(yaml(&format!("{base}}}")).unwrap()).sync_interval,
            Duration::from_millis(100)
        );
        assert_eq!(
            shared(yaml(&format!("{base}, sync_interval: 250ms}}")).unwrap()).sync_interval,
            Duration::from_millis(250)
        );
        let error = yaml_err(&format!("{base}, sync_interval: 1ms}}"));
        assert!(
            error.contains("rate_limit.sync_interval") && error.contains("between 10ms and 10s"),
            "{error}"
        );
    }

    #[test]
    fn listener_tls_needs_a_cert_and_a_key() {
        let backends = "backends: [{url: 'http://b'}]\n";
        let error = yaml_err(&format!("tls: {{cert: /c.pem}}\n{backends}"));
        assert!(error.contains("tls.key: required"), "{error}");
        let error = yaml_err(&format!("tls: {{client_ca: /ca.pem}}\n{backends}"));
        assert!(error.contains("tls.cert: required") && error.contains("tls.key: required"));
        let config = yaml(&format!("tls: {{cert: /c.pem, key: /k.pem}}\n{backends}")).unwrap();
        let tls = config.tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.client_ca), (Some("/c.pem"), None));
        assert_eq!(
            yaml(&format!("tls: {{cert: '', key: ''}}\n{backends}"))
                .unwrap()
                .tls,
            None
        );
    }

    #[test]
    fn backend_tls_applies_to_https_urls_only() {
        let error = yaml_err("backends: [{url: 'http://b', tls: {ca: /ca.pem}}]");
        assert_eq!(
            error,
            "backends[0].tls: only applies to https:// backend URLs"
        );
        let error = yaml_err("backends: [{url: 'https://b', tls: {cert: /c.pem}}]");
        assert_eq!(error, "backends[0].tls.key: required with `cert`");
        let error = yaml_err("backends: [{url: 'https://b', tls: {server_name: 'a b'}}]");
        assert!(error.starts_with("backends[0].tls.server_name:"), "{error}");
        let config =
            yaml("backends: [{url: 'https://b'}, {url: 'http://c', tls: {ca: ''}}]").unwrap();
        assert_eq!(config.backends[0].port, 443);
        assert_eq!(config.backends[0].tls, Some(BackendTls::default()));
        assert_eq!(config.backends[1].tls, None);
    }

    #[test]
    fn engine_priority_names_an_engine_and_needs_scheduling() {
        let config = yaml(
            "scheduling: {enabled: true}\nbackends: [{url: 'http://a', engine_priority: sglang}, {url: 'http://b', engine_priority: vllm}, {url: 'http://c'}]",
        )
        .unwrap();
        let engines: Vec<_> = config.backends.iter().map(|b| b.engine_priority).collect();
        assert_eq!(
            engines,
            [
                Some(EnginePriority::Sglang),
                Some(EnginePriority::Vllm),
                None
            ]
        );
        let error =
            yaml_err("backends: [{url: 'http://a'}, {url: 'http://b', engine_priority: vllm}]");
        assert!(
            error.starts_with("backends[1].engine_priority: needs `scheduling"),
            "{error}"
        );
        let error = yaml_err(
            "scheduling: {enabled: true}\nbackends: [{url: 'http://a', engine_priority: tgi}]",
        );
        assert!(
            error.starts_with("backends[0].engine_priority: "),
            "{error}"
        );
    }

    #[test]
    fn tiers_and_model_maps_are_checked() {
        let config =
            yaml("backends: [{url: 'http://a'}, {url: 'http://b', tier: 2, model_map: {m: n}}]")
                .unwrap();
        assert_eq!((config.backends[0].tier, config.backends[1].tier), (0, 2));
        assert_eq!(
            config.backends[1].model_map,
            [("m".to_string(), "n".to_string())]
        );
        let error = yaml_err("backends: [{url: 'http://a', model_map: {m: 'a\"b'}}]");
        assert!(error.starts_with("backends[0].model_map: "), "{error}");
        let error =
            yaml_err("routing: {least_load: {saturation: -1}}\nbackends: [{url: 'http://a'}]");
        assert!(
            error.starts_with("routing.least_load.saturation: "),
            "{error}"
        );
    }

    #[test]
    fn the_upstream_request_id_header_is_named_or_off() {
        let backends = "backends: [{url: 'http://b'}]\n";
        let header =
            |extra: &str| yaml(&format!("{backends}{extra}")).map(|c| c.upstream.request_id_header);
        assert_eq!(header("").unwrap().as_deref(), Some("X-Request-Id"));
        assert_eq!(
            header("upstream: {request_id_header: X-Trace}")
                .unwrap()
                .as_deref(),
            Some("X-Trace")
        );
        assert_eq!(header("upstream: {request_id_header: ''}").unwrap(), None);
        let error = yaml_err(&format!("{backends}upstream: {{request_id_header: 'a b'}}"));
        assert!(error.contains("upstream.request_id_header"), "{error}");
    }

    fn example(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    /// Key paths in a tree, list indices written `[]`, as [`schema::known_paths`] does.
    fn tree_paths(value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            // Header names are the user's, not config keys.
            Value::Object(_) if path.ends_with(".headers") => out.push(path.to_string()),
            Value::Object(map) if !map.is_empty() => {
                for (key, value) in map {
                    let at = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    tree_paths(value, &at, out);
                }
            }
            // Empty containers and lists of scalars are values of one key.
            Value::Object(map) if map.is_empty() => out.push(path.to_string()),
            Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
                out.push(path.to_string())
            }
            Value::Array(items) => {
                for item in items {
                    tree_paths(item, &format!("{path}[]"), out);
                }
            }
            _ => out.push(path.to_string()),
        }
    }

    fn assert_seed_backends(config: &Config) {
        let got: Vec<_> = config
            .backends
            .iter()
            .map(|b| {
                (
                    b.url.as_str(),
                    b.weight,
                    b.host.as_str(),
                    b.port,
                    b.host_header.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("http://vllm:8000", 5, "vllm", 8000, "vllm:8000"),
                ("http://tgi:8081", 3, "tgi", 8081, "tgi:8081"),
            ]
        );
    }

    #[test]
    fn seed_listen_and_backends_load_as_written() {
        let from_yaml = yaml(&example("seed-minimal.yaml")).unwrap();
        assert_eq!(from_yaml.listen, "0.0.0.0:8000".parse().unwrap());
        assert_seed_backends(&from_yaml);
        let from_toml = parse_with_env(SEED_TOML, Format::Toml, |_| None).unwrap();
        assert_eq!(from_toml, from_yaml);
    }

    #[test]
    fn toml_gets_the_same_checks() {
        let toml = |text: &str| parse_with_env(text, Format::Toml, |_| None);
        assert!(toml(&format!("{SEED_TOML}\n[rate_limit]\nenabled = false\n")).is_ok());
        let error = toml(&format!("{SEED_TOML}\n[rate_limit]\nenabld = true\n"));
        let error = error.unwrap_err().to_string();
        assert!(
            error.starts_with("rate_limit.enabld: unknown key; did you mean `enabled`?"),
            "{error}"
        );
        let error = toml("[[backends]]\nurl = \"http://b\"\nweight = \"x\"\n");
        assert_eq!(
            error.unwrap_err().to_string(),
            "backends[0].weight: invalid type: string \"x\", expected u32"
        );
        let error = toml("listen = ").unwrap_err().to_string();
        assert!(error.starts_with("invalid TOML"), "{error}");
    }

    #[test]
    fn defaults() {
        let config = yaml("backends: [{url: 'http://b'}]").unwrap();
        assert_eq!(config.listen, "0.0.0.0:8000".parse().unwrap());
        assert!(config.workers >= 1);
        assert_eq!(config.io_driver, IoDriver::Auto);
        assert!(!config.cpu_affinity);
        assert_eq!(config.busy_poll, Duration::ZERO);
        assert_eq!(config.max_request_body, 32 << 20);
        assert_eq!(config.max_header_size, 64 << 10);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        let secs = Duration::from_secs;
        assert_eq!(
            config.timeouts,
            Timeouts {
                connect: secs(5),
                client_header: secs(10),
                client_body: secs(60),
                keepalive: secs(75),
                first_byte: None,
                idle: None,
                total: None,
            }
        );
        assert_eq!(config.upstream.max_idle_per_backend, 256);
        assert_eq!(config.upstream.idle_timeout, secs(4));
        assert_eq!(config.backends[0].weight, 1);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn example_files_parse_and_document_every_key() {
        let mut full_yaml = yaml(&example("llmproxy.yaml")).unwrap();
        let mut full_toml =
            parse_with_env(&example("llmproxy.toml"), Format::Toml, |_| None).unwrap();
        assert_eq!(full_yaml, full_toml);
        // The sample key documents its fields; no key list is the default.
        assert_eq!(full_yaml.api_keys.len(), 1);
        full_yaml.api_keys.clear();
        full_toml.api_keys.clear();
        // "set to its default": same as a config naming only the backend.
        // Except the example reporters, which are disabled (left out).
        assert_eq!(
            full_yaml,
            yaml("backends: [{url: 'http://127.0.0.1:8001'}]").unwrap()
        );

        let mut known = schema::known_paths();
        known.sort();
        let yaml_tree: Value = serde_norway::from_str(&example("llmproxy.yaml")).unwrap();
        let toml_tree: Value = toml::from_str(&example("llmproxy.toml")).unwrap();
        for tree in [yaml_tree, toml_tree] {
            let mut paths = Vec::new();
            tree_paths(&tree, "", &mut paths);
            paths.sort();
            // Items of one list (usage_hook.reporters, auth.pipeline) share keys.
            paths.dedup();
            assert_eq!(paths, known);
        }

        let demo = parse(DEMO_CONFIG, Format::Yaml).unwrap();
        assert_eq!(demo.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(demo.workers, 2);
        assert_eq!(demo.backends[0].port, 8001);
    }

    #[test]
    fn load_picks_format_by_extension() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        assert!(load(&dir.join("llmproxy.toml")).is_ok());
        assert!(load(&dir.join("seed-minimal.yaml")).is_ok());
        let error = load(&dir.join("nope.json")).unwrap_err().to_string();
        assert!(
            error.contains("nope.json: unknown config format"),
            "{error}"
        );
        let error = load(&dir.join("missing.yml")).unwrap_err().to_string();
        assert!(error.contains("missing.yml: cannot read"), "{error}");
    }

    #[test]
    fn listen_errors_carry_the_key() {
        let error = yaml_err("listen: 'x'\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("listen: invalid address \"x\""),
            "{error}"
        );
    }

    #[test]
    fn durations_and_sizes_in_config() {
        let config = yaml(
            "max_request_body: 1MB\nmax_header_size: 10k\nshutdown_timeout: 1.5\nbusy_poll: 50us\n\
             timeouts: {connect: 500ms, client_header: 1m30s, client_body: 3, keepalive: 250us}\n\
             upstream: {idle_timeout: 1h}\nbackends: [{url: 'http://b'}]",
        )
        .unwrap();
        assert_eq!(config.max_request_body, 1_000_000);
        assert_eq!(config.max_header_size, 10 * 1024);
        assert_eq!(config.shutdown_timeout, Duration::from_millis(1500));
        assert_eq!(config.busy_poll, Duration::from_micros(50));
        assert_eq!(config.timeouts.connect, Duration::from_millis(500));
        assert_eq!(config.timeouts.client_header, Duration::from_secs(90));
        assert_eq!(config.timeouts.client_body, Duration::from_secs(3));
        assert_eq!(config.timeouts.keepalive, Duration::from_micros(250));
        assert_eq!(config.upstream.idle_timeout, Duration::from_secs(3600));

        let error = yaml_err("timeouts: {connect: fast}\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("timeouts.connect: invalid duration \"fast\""),
            "{error}"
        );
        let error = yaml_err("timeouts: {connect: 0s}\nbackends: [{url: 'http://b'}]");
        assert_eq!(error, "timeouts.connect: must be greater than 0");
    }

    #[test]
    fn env_substitution() {
        let config = yaml(
            "listen: ${LISTEN:-127.0.0.1:7000}\nbackends:\n  - url: ${BACKEND}\n    weight: ${WEIGHT}\n",
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.backends[0].host, "10.0.0.7");
        assert_eq!(config.backends[0].weight, 7);

        let error = yaml_err("# ${IGNORED}\nbackends:\n  - url: ${UPSTREAM_URL}\n");
        assert!(
            error.starts_with("line 3: environment variable `UPSTREAM_URL` is not set"),
            "{error}"
        );
    }

    /// The seed README's "Configuration" block, verbatim.
    const SEED_README_CONFIG: &str = r#"
# Listen address
listen: ":8000"

# Backend server list
backends:
  - url: "http://vllm:8000"
    weight: 5
  - url: "http://tgi:8081"
    weight: 3

# Usage reporting (supports multiple reporters)
usage_hook:
  enabled: true
  reporters:
    - name: "billing"
      type: "webhook"
      enabled: true
      url: "https://your-billing.com/llm-usage"
      timeout: 3s
    - name: "database"
      type: "database"
      enabled: true
      database:
        driver: "mysql"
        dsn: "user:pass@tcp(localhost:3306)/llmproxy"

# Health check configuration
health_check:
  interval: 10s
  path: /health
"#;

    #[test]
    fn seed_readme_config_loads_as_written() {
        let config = yaml(SEED_README_CONFIG).unwrap();
        assert_seed_backends(&config);
        let hook = &config.usage_hook;
        assert!(hook.enabled && hook.inject_stream_usage && !hook.include_raw_key);
        assert_eq!(hook.reporters.len(), 2);
        let ReporterKind::Webhook(webhook) = &hook.reporters[0].kind else {
            panic!("{:?}", hook.reporters[0])
        };
        assert_eq!(hook.reporters[0].name, "billing");
        assert_eq!(webhook.url, "https://your-billing.com/llm-usage");
        assert_eq!(webhook.timeout, Duration::from_secs(3));
        let ReporterKind::Database(db) = &hook.reporters[1].kind else {
            panic!("{:?}", hook.reporters[1])
        };
        assert_eq!(db.driver, DbDriver::Mysql);
        assert_eq!(db.dsn, "mysql://user:pass@localhost:3306/llmproxy");
        assert_eq!(db.table, "usage_records");
    }

    #[test]
    fn usage_hook_defaults_and_checks() {
        let hook = yaml("backends: [{url: 'http://b'}]").unwrap().usage_hook;
        assert!(!hook.enabled && hook.inject_stream_usage && !hook.include_raw_key);
        assert_eq!(hook.spool_path, PathBuf::from("./data/usage.db"));
        assert_eq!(hook.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(hook.channel_capacity, 262_144);
        assert_eq!(hook.durability, super::Durability::Async);
        let hook = yaml("backends: [{url: 'http://b'}]\nusage_hook: {durability: sync}")
            .unwrap()
            .usage_hook;
        assert_eq!(hook.durability, super::Durability::Sync);
        let error = yaml("backends: [{url: 'http://b'}]\nusage_hook: {durability: fsync}")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown variant `fsync`, expected `sync` or `async`"),
            "{error}"
        );

        let config = yaml(
            "backends: [{url: 'http://b'}]\nusage_hook:\n  enabled: true\n  retention: 2h\n  reporters:\n    \
             - {name: a, type: webhook, url: 'http://h/x', retry: 2, batch_size: 10, secret: s, headers: {X-A: b}}\n    \
             - {name: b, type: database, enabled: false, database: {driver: sqlite, dsn: x.db}}\n    \
             - {name: c, type: database, database: {driver: postgres, dsn: 'host=127.0.0.1 user=postgres', table: t1}}\n",
        )
        .unwrap();
        let hook = config.usage_hook;
        assert_eq!(hook.retention, Duration::from_secs(7200));
        let names: Vec<_> = hook.reporters.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(hook.reporters[0].batch_size, 10);
        let ReporterKind::Webhook(w) = &hook.reporters[0].kind else {
            panic!()
        };
        assert_eq!((w.retry, w.secret.as_deref()), (2, Some("s")));
        assert_eq!(w.headers.get("X-A").map(String::as_str), Some("b"));

        let error = yaml_err(
            "backends: [{url: 'http://b'}]\nusage_hook:\n  reporters:\n    \
             - {name: a, type: webhok}\n    - {name: a, type: database, database: {driver: mysql, dsn: 'x', table: 'a;b'}}\n    \
             - {name: c, type: webhook}\n",
        );
        assert!(
            error.contains("usage_hook.reporters[0].type: unknown reporter type"),
            "{error}"
        );
        assert!(
            error.contains("usage_hook.reporters[1].database: table"),
            "{error}"
        );
        assert!(
            error.contains("usage_hook.reporters[2].url: required"),
            "{error}"
        );
    }

    #[test]
    fn disabled_unsupported_block_is_accepted() {
        let config = yaml(
            "backends: [{url: 'http://b'}]\nusage_hook: {enabled: false}\n\
             health_check: {enabled: false, interval: 10s}",
        );
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn unknown_key_suggests_the_known_one() {
        let error = yaml_err("listne: ':8000'\nbackends: [{url: 'http://b'}]");
        assert_eq!(error, "listne: unknown key; did you mean `listen`?");
        let error = yaml_err("backends: [{url: 'http://b', wieght: 2}]\ntimeouts: {zzz: 1}");
        assert_eq!(
            error,
            "backends[0].wieght: unknown key; did you mean `weight`?\ntimeouts.zzz: unknown key"
        );
    }

    #[test]
    fn every_problem_is_reported_together() {
        let error = yaml(
            "listne: 1\nusage_hook: {enabld: true}\nlisten: 'nowhere'\nbackends:\n  \
             - url: 'ftp://a'\n  - url: 'http://b'\n    weight: 0\n",
        )
        .unwrap_err();
        let lines: Vec<_> = error.to_string().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let starts = [
            "listne: unknown key",
            "usage_hook.enabld: unknown key",
            "listen: invalid address",
        ];
        for start in starts {
            assert!(
                lines.iter().any(|l| l.starts_with(start)),
                "{start} in {lines:#?}"
            );
        }
        assert!(lines.contains(
            &"backends[1].weight: must be at least 1 (remove the backend to send it nothing)"
                .to_string()
        ));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("backends[0].url: unsupported scheme")));

        let mut in_file = error;
        in_file.file = Some("gw.yaml".into());
        assert!(in_file
            .to_string()
            .lines()
            .all(|l| l.starts_with("gw.yaml: ")));
    }

    #[test]
    fn type_errors_carry_the_key_path() {
        let error = yaml_err("backends: [{url: 'http://b', weight: x}]");
        assert_eq!(
            error,
            "backends[0].weight: invalid type: string \"x\", expected u32"
        );
        let error = yaml_err("io_driver: uring\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("io_driver: unknown variant `uring`"),
            "{error}"
        );
        assert_eq!(
            yaml_err("listen: ':1'"),
            "backends: at least one backend is required, e.g. `- url: \"http://127.0.0.1:8001\"`"
        );
        assert!(yaml_err("- a").contains("expected a mapping"));
        assert!(yaml_err("a: [").starts_with("invalid YAML"));
    }

    #[test]
    fn log_level_errors_carry_the_key() {
        let error = yaml_err("log: {level: verbose}\nbackends: [{url: 'http://b'}]");
        assert!(error.starts_with("log.level: invalid log level"), "{error}");
    }

    #[test]
    fn scheduling_is_off_by_default_and_checked_when_on() {
        let b = "backends: [{url: 'http://b'}]";
        assert_eq!(yaml(b).unwrap().scheduling, None);
        let on = yaml(&format!("scheduling: {{enabled: true}}\n{b}")).unwrap();
        let s = on.scheduling.expect("enabled");
        assert_eq!(s.queue_timeout, Duration::from_secs(30));
        assert_eq!((s.max_waiting, s.max_kv_cache), (Some(5), Some(0.8)));
        assert_eq!(s.priority_header.as_deref(), Some("x-llmproxy-priority"));
        let off = yaml(&format!(
            "scheduling: {{enabled: true, saturation: {{waiting_requests: 0, kv_cache: 0}}, priority_header: ''}}\n{b}"
        ))
        .unwrap()
        .scheduling
        .unwrap();
        assert_eq!((off.max_waiting, off.max_kv_cache), (None, None));
        assert_eq!(off.priority_header, None);
        let error = yaml_err(&format!(
            "scheduling: {{enabled: true, queue_timeout: 0s, max_queue: 0, completion_weight: -1, saturation: {{kv_cache: 1.5}}}}\n{b}"
        ));
        for at in [
            "scheduling.queue_timeout",
            "scheduling.max_queue",
            "scheduling.completion_weight",
            "scheduling.saturation.kv_cache",
        ] {
            assert!(error.contains(at), "{at} missing from {error}");
        }
        // A key's max_priority is at least its priority.
        let keys = yaml(&format!(
            "auth: {{}}\napi_keys: [{{key: a, priority: 2}}, {{key: b, priority: -1, max_priority: 3}}]\n{b}"
        ))
        .unwrap()
        .api_keys;
        assert_eq!((keys[0].priority, keys[0].max_priority), (2, 2));
        assert_eq!((keys[1].priority, keys[1].max_priority), (-1, 3));
    }
}
