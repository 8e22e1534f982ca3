//! Auth: owns who is calling. Extracts the client's key from the configured headers, looks it up
//! in the static key list (`api_keys`), decides whether it may make this request (status,
//! expiry, client IP, model, quota) and keeps each key's quota consumption.
//!
//! It must not block a worker: keys are in memory, and quota consumption is persisted by its own
//! thread ([`quota`]). It must not render responses (that is `error`) nor count rates (`limits`).

mod quota;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::config::{ApiKeyConfig, Config, Denial, DenialResponse, KeyStatus, LimitSpec};
use crate::error::GatewayError;
use crate::http::RequestHead;
use crate::limits::LimitSet;
use crate::usage::KeyRef;
use quota::{period_of, QuotaStore};

/// One known key and its live state, shared by all workers.
#[derive(Debug)]
pub struct KeyEntry {
    pub key_ref: KeyRef,
    status: KeyStatus,
    allowed_ips: Vec<IpNet>,
    allowed_models: Vec<String>,
    expires_at: Option<u64>,
    total_quota: Option<u64>,
    /// This key's own limits (`rate_limit.per_key` with the key's overrides); `None`: unlimited.
    pub limits: Option<Arc<LimitSet>>,
    /// Tokens consumed in the quota period `period`.
    used: AtomicU64,
    period: AtomicU64,
}

/// The shared auth state: built once at start, read by every worker.
pub struct Auth {
    header_names: Vec<Vec<u8>>,
    keys: HashMap<String, Arc<KeyEntry>>,
    responses: Vec<DenialResponse>,
    quota_period: Option<crate::config::QuotaPeriod>,
    store: QuotaStore,
}

impl Auth {
    /// `None` when auth is off. Opens the quota database and restores consumption from it.
    pub fn new(config: &Config) -> io::Result<Option<Arc<Auth>>> {
        let Some(auth) = &config.auth else {
            return Ok(None);
        };
        let now = unix_now();
        let period = period_of(auth.quota_period, now);
        let (store, saved) = QuotaStore::open(&auth.quota_path)?;
        let keys = config
            .api_keys
            .iter()
            .map(|k| {
                let used = saved
                    .get(&quota::key_id(&k.key))
                    .filter(|(p, _)| *p == period)
                    .map_or(0, |(_, used)| *used);
                (
                    k.key.clone(),
                    Arc::new(entry(k, &config.rate_limit.per_key, used, period)),
                )
            })
            .collect();
        Ok(Some(Arc::new(Auth {
            header_names: auth
                .header_names
                .iter()
                .map(|h| h.as_bytes().to_vec())
                .collect(),
            keys,
            responses: auth.responses.clone(),
            quota_period: auth.quota_period,
            store,
        })))
    }

    /// Header names whose values are client credentials, lowercased: never sent upstream.
    pub fn header_names(&self) -> &[Vec<u8>] {
        &self.header_names
    }

    /// The client's key: the first configured header that carries one. `Authorization` (and any
    /// other header) may say `Bearer <key>`; an `Authorization` with another scheme is skipped.
    pub fn extract_key<'a>(&self, head: &RequestHead, buf: &'a [u8]) -> Option<&'a [u8]> {
        for name in &self.header_names {
            let Some(value) = head.header(buf, name) else {
                continue;
            };
            let value = value.trim_ascii();
            let key = match value.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
                _ if name == b"authorization" => continue,
                _ => value,
            };
            if !key.is_empty() {
                return Some(key);
            }
        }
        None
    }

    /// Admission: is this a known key, usable now, from this address?
    pub fn identify(&self, key: Option<&[u8]>, ip: IpAddr) -> Result<Arc<KeyEntry>, GatewayError> {
        let key = key.ok_or_else(|| self.deny(Denial::MissingKey))?;
        let entry = std::str::from_utf8(key)
            .ok()
            .and_then(|k| self.keys.get(k))
            .ok_or_else(|| self.deny(Denial::InvalidKey))?;
        match entry.status {
            KeyStatus::Active => {}
            KeyStatus::Disabled => return Err(self.deny(Denial::Disabled)),
            KeyStatus::Expired => return Err(self.deny(Denial::Expired)),
            KeyStatus::QuotaExceeded => return Err(self.deny(Denial::QuotaExceeded)),
        }
        if entry.expires_at.is_some_and(|t| unix_now() >= t) {
            return Err(self.deny(Denial::Expired));
        }
        if !entry.allowed_ips.is_empty() && !entry.allowed_ips.iter().any(|n| n.contains(&ip)) {
            return Err(self.deny(Denial::IpNotAllowed));
        }
        Ok(Arc::clone(entry))
    }

    /// After the body was inspected: may this key use `model`, and has it quota left?
    pub fn authorize(&self, entry: &KeyEntry, model: Option<&str>) -> Result<(), GatewayError> {
        if !entry.allowed_models.is_empty()
            && !model.is_some_and(|m| entry.allowed_models.iter().any(|a| a == m))
        {
            return Err(self.deny(Denial::ModelNotAllowed));
        }
        if let Some(total) = entry.total_quota {
            if self.used(entry) >= total {
                return Err(self.deny(Denial::QuotaExceeded));
            }
        }
        Ok(())
    }

    /// Tokens a key consumed, from its usage record: accrues to its quota (persisted) and its
    /// token rate. Called off the worker cores (the usage reporter thread).
    pub fn charge_tokens(&self, api_key: &str, tokens: u64) {
        let Some(entry) = self.keys.get(api_key) else {
            return;
        };
        if let Some(limits) = &entry.limits {
            limits.charge_tokens(tokens);
        }
        let period = period_of(self.quota_period, unix_now());
        self.roll_period(entry, period);
        let used = entry.used.fetch_add(tokens, Ordering::AcqRel) + tokens;
        self.store.save(
            quota::key_id(api_key),
            entry.key_ref.name.clone(),
            period,
            used,
        );
    }

    /// Tokens consumed by `entry` in the current quota period.
    pub fn used(&self, entry: &KeyEntry) -> u64 {
        let period = period_of(self.quota_period, unix_now());
        if entry.period.load(Ordering::Acquire) == period {
            entry.used.load(Ordering::Acquire)
        } else {
            0
        }
    }

    /// Starts a new quota period at zero once the calendar moved on; the CAS elects one resetter.
    fn roll_period(&self, entry: &KeyEntry, period: u64) {
        let seen = entry.period.load(Ordering::Acquire);
        if seen != period
            && entry
                .period
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            entry.used.store(0, Ordering::Release);
        }
    }

    fn deny(&self, denial: Denial) -> GatewayError {
        let r = &self.responses[denial as usize];
        GatewayError::Denied {
            denial,
            status: r.status,
            message: r.message.clone(),
        }
    }
}

fn entry(k: &ApiKeyConfig, per_key: &LimitSpec, used: u64, period: u64) -> KeyEntry {
    let spec = k.rate_limit.or(*per_key);
    KeyEntry {
        key_ref: KeyRef {
            name: k.name.clone(),
            user_id: k.user_id.clone(),
            api_key: k.key.clone(),
        },
        status: k.status,
        allowed_ips: k.allowed_ips.clone(),
        allowed_models: k.allowed_models.clone(),
        expires_at: k.expires_at,
        total_quota: k.total_quota,
        limits: (!spec.is_empty()).then(|| Arc::new(LimitSet::new(&spec))),
        used: AtomicU64::new(used),
        period: AtomicU64::new(period),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Format};

    fn auth(yaml: &str, db: &std::path::Path) -> Arc<Auth> {
        let text = format!(
            "backends: [{{url: 'http://127.0.0.1:1'}}]\nauth: {{enabled: true, quota_path: '{}'}}\n{yaml}",
            db.display()
        );
        Auth::new(&parse(&text, Format::Yaml).unwrap())
            .unwrap()
            .unwrap()
    }

    fn head(raw: &[u8]) -> RequestHead {
        let mut h = RequestHead::default();
        assert!(crate::http::parse_request(raw, 65536, &mut h).unwrap());
        h
    }

    fn code(e: GatewayError) -> (u16, &'static str) {
        (e.status(), e.code())
    }

    #[test]
    fn key_extraction_follows_header_order_and_schemes() {
        let dir = tempdir();
        let a = auth("api_keys: [{key: k1}]", &dir.join("q.db"));
        let raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-KEY: k2\r\nAuthorization: bearer  k1 \r\n\r\n";
        assert_eq!(a.extract_key(&head(raw), raw), Some(&b"k1"[..]));
        let raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Basic abc\r\nX-Api-Key: k2\r\n\r\n";
        assert_eq!(a.extract_key(&head(raw), raw), Some(&b"k2"[..]));
        let raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(a.extract_key(&head(raw), raw), None);
    }

    #[test]
    fn decisions() {
        let dir = tempdir();
        let a = auth(
            "api_keys:\n\
             - {key: ok, allowed_ips: ['10.0.0.0/8', '::1'], allowed_models: [m1], total_quota: 100}\n\
             - {key: off, status: disabled}\n\
             - {key: old, expires_at: '2020-01-01T00:00:00Z'}\n\
             - {key: gone, status: 3}\n",
            &dir.join("q.db"),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            code(a.identify(None, ip("10.1.1.1")).unwrap_err()),
            (401, "invalid_api_key")
        );
        assert_eq!(
            code(a.identify(Some(b"nope"), ip("10.1.1.1")).unwrap_err()),
            (401, "invalid_api_key")
        );
        assert_eq!(
            code(a.identify(Some(b"off"), ip("10.1.1.1")).unwrap_err()).0,
            403
        );
        assert_eq!(
            code(a.identify(Some(b"old"), ip("10.1.1.1")).unwrap_err()).0,
            401
        );
        assert_eq!(
            code(a.identify(Some(b"gone"), ip("10.1.1.1")).unwrap_err()).0,
            401
        );
        assert_eq!(
            code(a.identify(Some(b"ok"), ip("127.0.0.1")).unwrap_err()).0,
            403
        );
        let e = a.identify(Some(b"ok"), ip("::1")).unwrap();
        let e2 = a.identify(Some(b"ok"), ip("10.9.9.9")).unwrap();
        assert!(Arc::ptr_eq(&e, &e2));
        assert_eq!(code(a.authorize(&e, Some("m2")).unwrap_err()).0, 403);
        assert_eq!(code(a.authorize(&e, None).unwrap_err()).0, 403);
        a.authorize(&e, Some("m1")).unwrap();
        a.charge_tokens("ok", 99);
        a.authorize(&e, Some("m1")).unwrap();
        a.charge_tokens("ok", 1);
        assert_eq!(
            code(a.authorize(&e, Some("m1")).unwrap_err()),
            (429, "insufficient_quota")
        );
    }

    #[test]
    fn quota_survives_restart() {
        let dir = tempdir();
        let db = dir.join("q.db");
        {
            let a = auth("api_keys: [{key: k, total_quota: 50}]", &db);
            a.charge_tokens("k", 30);
            a.charge_tokens("k", 20);
        }
        let a = auth("api_keys: [{key: k, total_quota: 50}]", &db);
        let e = a
            .identify(Some(b"k"), "127.0.0.1".parse().unwrap())
            .unwrap();
        assert_eq!(a.used(&e), 50);
        assert_eq!(
            a.authorize(&e, None).unwrap_err().code(),
            "insufficient_quota"
        );
    }

    fn tempdir() -> std::path::PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "llmproxy-auth-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
