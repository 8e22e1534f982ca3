//! The key schema: which keys the gateway acts on, which it knows but does not support yet,
//! and everything else (typos). Checked on the generic tree before typed deserialization so
//! every key problem in the file is reported at once, with its full path.

use serde_json::{Map, Value};

use super::Issue;

/// The shape of a config value, as far as key checking cares.
pub(super) enum Shape {
    /// A scalar (or anything whose type serde checks later).
    Leaf,
    /// A mapping with exactly these keys.
    Map(&'static [(&'static str, Shape)]),
    /// A list whose items all have this shape.
    List(&'static Shape),
}

use Shape::{Leaf, List, Map as Fields};

/// Keys the gateway acts on. Must match the `Raw*` structs of the section files
/// (they deny unknown fields, so a key listed here but missing there fails loudly).
pub(super) const ROOT: Shape = Fields(&[
    ("listen", Leaf),
    (
        "tls",
        Fields(&[("cert", Leaf), ("key", Leaf), ("client_ca", Leaf)]),
    ),
    ("workers", Leaf),
    ("io_driver", Leaf),
    ("cpu_affinity", Leaf),
    ("busy_poll", Leaf),
    ("max_request_body", Leaf),
    ("max_header_size", Leaf),
    ("max_connections", Leaf),
    ("shutdown_timeout", Leaf),
    (
        "timeouts",
        Fields(&[
            ("connect", Leaf),
            ("client_header", Leaf),
            ("client_body", Leaf),
            ("keepalive", Leaf),
            ("first_byte", Leaf),
            ("idle", Leaf),
            ("total", Leaf),
        ]),
    ),
    (
        "upstream",
        Fields(&[
            ("max_idle_per_backend", Leaf),
            ("idle_timeout", Leaf),
            ("request_id_header", Leaf),
        ]),
    ),
    (
        "backends",
        List(&Fields(&[
            ("url", Leaf),
            ("weight", Leaf),
            ("api_key", Leaf),
            ("models", Leaf),
            ("headers", Leaf),
            ("max_in_flight", Leaf),
            ("tier", Leaf),
            ("model_map", Leaf),
            ("engine_priority", Leaf),
            (
                "tls",
                Fields(&[
                    ("ca", Leaf),
                    ("cert", Leaf),
                    ("key", Leaf),
                    ("server_name", Leaf),
                    ("insecure_skip_verify", Leaf),
                ]),
            ),
        ])),
    ),
    ("load_balance", Leaf),
    (
        "routing",
        Fields(&[
            ("load_balance", Leaf),
            ("affinity", Fields(&[("header", Leaf), ("field", Leaf)])),
            (
                "least_load",
                Fields(&[("interval", Leaf), ("path", Leaf), ("saturation", Leaf)]),
            ),
            (
                "cache_aware",
                Fields(&[
                    ("block_bytes", Leaf),
                    ("index_blocks", Leaf),
                    ("threshold", Leaf),
                    ("balance_abs", Leaf),
                    ("balance_rel", Leaf),
                ]),
            ),
        ]),
    ),
    (
        "health_check",
        Fields(&[
            ("enabled", Leaf),
            ("interval", Leaf),
            ("path", Leaf),
            ("timeout", Leaf),
            ("expected_status", Leaf),
            ("healthy_threshold", Leaf),
            ("unhealthy_threshold", Leaf),
            ("headers", Leaf),
            ("max_failures", Leaf),
            ("ejection_time", Leaf),
        ]),
    ),
    (
        "retry",
        Fields(&[
            ("max_attempts", Leaf),
            ("initial_backoff", Leaf),
            ("max_backoff", Leaf),
            ("on_status", Leaf),
            ("budget_percent", Leaf),
        ]),
    ),
    ("model_aliases", Leaf),
    (
        "log",
        Fields(&[
            ("level", Leaf),
            ("format", Leaf),
            ("access", Leaf),
            ("access_path", Leaf),
            ("buffer_size", Leaf),
            ("flush_interval", Leaf),
        ]),
    ),
    ("metrics", Fields(&[("enabled", Leaf), ("path", Leaf)])),
    (
        "admin",
        Fields(&[
            ("enabled", Leaf),
            ("listen", Leaf),
            ("token", Leaf),
            ("key_store", Leaf),
        ]),
    ),
    (
        "usage_hook",
        Fields(&[
            ("enabled", Leaf),
            ("inject_stream_usage", Leaf),
            ("include_raw_key", Leaf),
            ("spool_path", Leaf),
            ("retention", Leaf),
            ("channel_capacity", Leaf),
            ("durability", Leaf),
            (
                "reporters",
                List(&Fields(&[
                    ("name", Leaf),
                    ("type", Leaf),
                    ("enabled", Leaf),
                    ("url", Leaf),
                    ("timeout", Leaf),
                    ("retry", Leaf),
                    ("headers", Leaf),
                    ("batch_size", Leaf),
                    ("batch_timeout", Leaf),
                    ("secret", Leaf),
                    (
                        "database",
                        Fields(&[("driver", Leaf), ("dsn", Leaf), ("table", Leaf)]),
                    ),
                ])),
            ),
        ]),
    ),
    (
        "auth",
        Fields(&[
            ("enabled", Leaf),
            ("storage", Leaf),
            ("header_names", Leaf),
            (
                "status_codes",
                Fields(&[
                    ("missing_key", DENIAL),
                    ("invalid_key", DENIAL),
                    ("disabled", DENIAL),
                    ("expired", DENIAL),
                    ("quota_exceeded", DENIAL),
                    ("ip_not_allowed", DENIAL),
                    ("model_not_allowed", DENIAL),
                    ("policy", DENIAL),
                ]),
            ),
            ("quota_path", Leaf),
            ("quota_period", Leaf),
            ("mode", Leaf),
            (
                "pipeline",
                List(&Fields(&[
                    ("type", Leaf),
                    ("name", Leaf),
                    ("enabled", Leaf),
                    ("url", Leaf),
                    ("key_pattern", Leaf),
                    ("driver", Leaf),
                    ("dsn", Leaf),
                    ("table", Leaf),
                    ("columns", Leaf),
                    ("timeout", Leaf),
                    ("script", Leaf),
                    ("file", Leaf),
                    ("max_instructions", Leaf),
                    ("max_memory", Leaf),
                ])),
            ),
            (
                "cache",
                Fields(&[
                    ("ttl", Leaf),
                    ("negative_ttl", Leaf),
                    ("stale_if_error", Leaf),
                ]),
            ),
            ("lookup_threads", Leaf),
        ]),
    ),
    (
        "api_keys",
        List(&Fields(&[
            ("key", Leaf),
            ("name", Leaf),
            ("user_id", Leaf),
            ("status", Leaf),
            ("total_quota", Leaf),
            ("allowed_ips", Leaf),
            ("allowed_models", Leaf),
            ("expires_at", Leaf),
            ("priority", Leaf),
            ("max_priority", Leaf),
            ("rate_limit", LIMITS),
        ])),
    ),
    (
        "scheduling",
        Fields(&[
            ("enabled", Leaf),
            ("queue_timeout", Leaf),
            ("max_queue", Leaf),
            ("completion_weight", Leaf),
            (
                "saturation",
                Fields(&[("waiting_requests", Leaf), ("kv_cache", Leaf)]),
            ),
            ("priority_header", Leaf),
        ]),
    ),
    (
        "rate_limit",
        Fields(&[
            ("enabled", Leaf),
            ("per_key", LIMITS),
            ("global", LIMITS),
            ("queue_timeout", Leaf),
            ("storage", Leaf),
            ("sync_interval", Leaf),
            ("redis", Fields(&[("url", Leaf), ("prefix", Leaf)])),
        ]),
    ),
]);

/// One `auth.status_codes` entry.
const DENIAL: Shape = Fields(&[("status", Leaf), ("message", Leaf)]);

/// A `rate_limit` scope.
const LIMITS: Shape = Fields(&[
    ("requests_per_minute", Leaf),
    ("tokens_per_minute", Leaf),
    ("max_concurrent", Leaf),
]);

/// Checks every key of `root` against [`ROOT`], pushing one issue per problem. Removes the keys it
/// reported or accepted without meaning (`null`, disabled unsupported blocks) so typed
/// deserialization sees only keys it knows, and `key:` left empty falls back to its default.
pub(super) fn check(root: &mut Map<String, Value>, issues: &mut Vec<Issue>) {
    let Fields(fields) = ROOT else {
        unreachable!("ROOT is a mapping")
    };
    check_map(fields, root, "", "", issues);
}

/// `path` is the real location (`backends[1]`), `pattern` the same with indices erased
/// (`backends[]`).
fn check_map(
    fields: &[(&str, Shape)],
    map: &mut Map<String, Value>,
    path: &str,
    pattern: &str,
    issues: &mut Vec<Issue>,
) {
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let at = join(path, &key);
        let key_pattern = join(pattern, &key);
        let value = map.get_mut(&key).expect("key taken from this map");
        if value.is_null() {
            map.remove(&key);
            continue;
        }
        if let Some((_, shape)) = fields.iter().find(|(name, _)| *name == key) {
            check_value(shape, value, &at, &key_pattern, issues);
            continue;
        }
        let message = match suggest(&key, fields) {
            Some(known) => format!("unknown key; did you mean `{known}`?"),
            None => "unknown key".to_string(),
        };
        issues.push(Issue::new(&at, message));
        map.remove(&key);
    }
}

fn check_value(shape: &Shape, value: &mut Value, at: &str, pattern: &str, issues: &mut Vec<Issue>) {
    match (shape, value) {
        (Fields(fields), Value::Object(map)) => check_map(fields, map, at, pattern, issues),
        (List(item), Value::Array(items)) => {
            let item_pattern = format!("{pattern}[]");
            for (index, item_value) in items.iter_mut().enumerate() {
                check_value(
                    item,
                    item_value,
                    &format!("{at}[{index}]"),
                    &item_pattern,
                    issues,
                );
            }
        }
        // Wrong types are left for serde, which names the expected type.
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The known key at this level closest to `key`, if it is a likely typo.
fn suggest<'a>(key: &str, fields: &'a [(&'a str, Shape)]) -> Option<&'a str> {
    fields
        .iter()
        .map(|(name, _)| *name)
        .map(|name| (edit_distance(&key.to_ascii_lowercase(), name), name))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

/// Optimal string alignment distance: Levenshtein plus adjacent transpositions (`listne`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    rows[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// Every key path [`ROOT`] accepts, with `[]` for list items; lets tests prove the example
/// configs document every key.
#[cfg(test)]
pub(super) fn known_paths() -> Vec<String> {
    fn collect(shape: &Shape, path: &str, out: &mut Vec<String>) {
        match shape {
            Leaf => out.push(path.to_string()),
            Fields(fields) => {
                for (key, shape) in *fields {
                    collect(shape, &join(path, key), out);
                }
            }
            List(item) => collect(item, &format!("{path}[]"), out),
        }
    }
    let mut out = Vec::new();
    collect(&ROOT, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("listne", "listen"), 1);
        assert_eq!(edit_distance("wieght", "weight"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("backend", "backends"), 1);
        assert_eq!(edit_distance("zzz", "log"), 3);
    }
}
