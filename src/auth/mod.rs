//! Auth: owns who is calling. Extracts the client's key from the configured headers, looks it up
//! in the static key list (`api_keys`), decides whether it may make this request (status,
//! expiry, client IP, model, quota) and keeps each key's quota consumption.
//!
//! It must not block a worker: keys are in memory, and quota consumption is persisted by its own
//! thread ([`quota`]). It must not render responses (that is `error`) nor count rates (`limits`).

mod cache;
pub mod ledger;
mod lua;
mod providers;
mod quota;
pub mod store;

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use ipnet::IpNet;

use crate::config::{
    ApiKeyConfig, AuthConfig, Config, Denial, DenialResponse, KeyStatus, LimitSpec, PipelineMode,
    ProviderConfig, QuotaPeriod,
};
use crate::error::GatewayError;
use crate::http::RequestHead;
use crate::limits::LimitSet;
use crate::schedule::Service;
use crate::usage::KeyRef;
use cache::{Cache, Found, Job};
use ledger::Ledger;
pub use lua::{LuaPolicy, LuaRequest, Verdict};
use quota::{period_of, QuotaStore, Saved};

/// Longest a request waits for a provider look-up before it is answered 503.
const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One known key as its provider described it, plus its live state.
#[derive(Debug)]
pub struct KeyEntry {
    /// Shared with each request's usage event: one reference count per request, not three strings.
    pub key_ref: Arc<KeyRef>,
    status: KeyStatus,
    allowed_ips: Vec<IpNet>,
    allowed_models: Vec<String>,
    expires_at: Option<u64>,
    total_quota: Option<u64>,
    /// Scheduling band (`api_keys[].priority`) and the highest one the key may ask for.
    pub priority: i32,
    pub max_priority: i32,
    pub live: Arc<KeyLive>,
}

/// What outlives cache refreshes of a key: its limits and its quota consumption.
#[derive(Debug)]
pub struct KeyLive {
    /// `rate_limit.per_key` with the key's overrides; `None`: unlimited.
    pub limits: Option<Arc<LimitSet>>,
    /// Tokens consumed in the quota period `period`.
    used: AtomicU64,
    period: AtomicU64,
    name: String,
    /// The key's stable hash ([`quota::key_id`]): its name in the quota store and in Redis.
    key_id: String,
    quota_period: Option<QuotaPeriod>,
    /// Its tokens are shared through the [`Ledger`] (it has a token rate or a quota).
    shared: bool,
    /// Set by a request, cleared by the ledger when it reads the shared totals back.
    active: AtomicBool,
    /// Tokens served, weighted, for `scheduling`'s fair share (the Virtual Token Counter).
    pub service: Arc<Service>,
    /// Tokens served (prompt + completion) since this generation's keys were loaded.
    served: AtomicU64,
}

/// What the look-up threads share with the workers.
struct Shared {
    config: AuthConfig,
    per_key: LimitSpec,
    static_keys: HashMap<String, Arc<KeyEntry>>,
    /// Live state by raw key, for static and provider keys alike.
    registry: Mutex<HashMap<String, Arc<KeyLive>>>,
    saved: Saved,
    cache: Cache,
    /// The Lua stage with its script text resolved.
    lua: Option<crate::config::LuaConfig>,
    /// Shared token accounting, with `rate_limit.storage: redis`.
    ledger: Option<Arc<Ledger>>,
    /// `scheduling.completion_weight`, when scheduling is on.
    completion_weight: Option<f64>,
}

/// The shared auth state: built once at start, read by every worker.
pub struct Auth {
    shared: Arc<Shared>,
    header_names: Vec<Vec<u8>>,
    /// Only the static list: answered on the worker, no cache, no threads.
    static_only: bool,
    /// The pipeline has a webhook: cache answers per (key, client IP).
    per_ip: bool,
    /// Dropped before the quota store, so the look-up threads end first.
    jobs: Option<Sender<Job>>,
    store: QuotaStore,
}

/// The request facts providers may decide on.
pub struct Caller<'a> {
    pub ip: IpAddr,
    pub ip_text: &'a str,
    pub method: &'a [u8],
    pub path: &'a [u8],
}

impl Auth {
    /// `None` when auth is off. Opens the quota database and restores consumption from it; starts
    /// the look-up threads when the pipeline has providers besides the static list. With a
    /// `ledger`, keys' tokens are also charged to, and read back from, the shared totals.
    pub fn new(config: &Config, ledger: Option<Arc<Ledger>>) -> io::Result<Option<Arc<Auth>>> {
        let Some(auth) = &config.auth else {
            return Ok(None);
        };
        let (store, saved) = QuotaStore::open(&auth.quota_path.0)?;
        let lua = match &auth.lua {
            None => None,
            Some(l) => {
                let mut l = l.clone();
                if let Some(file) = &l.file {
                    l.source = std::fs::read_to_string(file).map_err(|e| {
                        io::Error::new(e.kind(), format!("lua script {}: {e}", file.display()))
                    })?;
                }
                // Compiled once here so a broken script stops the start, not a request.
                LuaPolicy::new(&l).map_err(|e| io::Error::other(format!("lua script: {e}")))?;
                Some(l)
            }
        };
        let mut shared = Shared {
            config: auth.clone(),
            per_key: config.rate_limit.per_key,
            static_keys: HashMap::new(),
            registry: Mutex::new(HashMap::new()),
            saved,
            cache: Cache::new(auth.cache.clone()),
            lua,
            ledger,
            completion_weight: config.scheduling.as_ref().map(|s| s.completion_weight),
        };
        shared.static_keys = config
            .api_keys
            .iter()
            .map(|k| (k.key.clone(), shared.entry(k)))
            .collect();
        let shared = Arc::new(shared);
        let static_only = auth.pipeline.iter().all(|p| *p == ProviderConfig::Static);
        let jobs = if static_only {
            None
        } else {
            let (tx, rx) = crossbeam_channel::unbounded::<Job>();
            for i in 0..auth.lookup_threads {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("llmproxy-auth{i}"))
                    .spawn(move || lookup_loop(&shared, &rx))?;
            }
            Some(tx)
        };
        Ok(Some(Arc::new(Auth {
            shared,
            header_names: auth
                .header_names
                .iter()
                .map(|h| h.as_bytes().to_vec())
                .collect(),
            static_only,
            per_ip: auth
                .pipeline
                .iter()
                .any(|p| matches!(p, ProviderConfig::Webhook { .. })),
            jobs,
            store,
        })))
    }

    /// This worker's Lua policy state, when the pipeline has a lua stage.
    pub fn lua_policy(&self) -> Option<Result<LuaPolicy, String>> {
        self.shared.lua.as_ref().map(LuaPolicy::new)
    }

    /// Drops cached provider answers, after the admin API deleted a key.
    pub fn forget_cached(&self) {
        self.shared.cache.clear();
    }

    pub fn has_lua_policy(&self) -> bool {
        self.shared.lua.is_some()
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

    /// Admission: is this a known key, usable now, from this address? Static keys are answered
    /// at once; provider keys from the cache or, on a miss, from a look-up thread.
    pub async fn identify(
        &self,
        key: Option<&[u8]>,
        caller: &Caller<'_>,
    ) -> Result<Arc<KeyEntry>, GatewayError> {
        let key = key.ok_or_else(|| self.deny(Denial::MissingKey))?;
        let key = std::str::from_utf8(key).map_err(|_| self.deny(Denial::InvalidKey))?;
        if self.static_only {
            let entry = self
                .shared
                .static_keys
                .get(key)
                .ok_or_else(|| self.deny(Denial::InvalidKey))?;
            self.check(entry, caller.ip)?;
            return Ok(Arc::clone(entry));
        }
        let jobs = self
            .jobs
            .as_ref()
            .expect("look-up threads run unless static_only");
        // A webhook may decide on the address too, so its answers are cached per address.
        let slot = if self.per_ip {
            Cow::Owned(format!("{key}\0{}", caller.ip_text))
        } else {
            Cow::Borrowed(key)
        };
        let found = match self.shared.cache.fresh(&slot) {
            Some(found) => found,
            None => {
                let job = Job {
                    slot: slot.into_owned(),
                    key: key.to_string(),
                    ip: caller.ip_text.to_string(),
                    method: String::from_utf8_lossy(caller.method).into_owned(),
                    path: String::from_utf8_lossy(caller.path).into_owned(),
                };
                // A provider that hangs must not hold the request (or its connection) forever.
                monoio::time::timeout(LOOKUP_WAIT, self.shared.cache.resolve(jobs, job))
                    .await
                    .ok()
                    .flatten()
                    .ok_or(GatewayError::AuthUnavailable)?
            }
        };
        let first = found.first().ok_or_else(|| self.deny(Denial::InvalidKey))?;
        for entry in found.iter() {
            self.check(entry, caller.ip)?;
        }
        Ok(Arc::clone(first))
    }

    fn check(&self, entry: &KeyEntry, ip: IpAddr) -> Result<(), GatewayError> {
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
        Ok(())
    }

    /// After the body was inspected: may this key use `model`, and has it quota left?
    pub fn authorize(&self, entry: &KeyEntry, model: Option<&str>) -> Result<(), GatewayError> {
        let live = &entry.live;
        // A load, and a store only on the key's first request of a ledger round.
        if live.shared && !live.active.load(Ordering::Relaxed) {
            live.active.store(true, Ordering::Relaxed);
        }
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
        if let Some(live) = self.live(api_key) {
            self.charge_live(&live, tokens);
        }
    }

    /// [`Auth::charge_tokens`] from a usage record, plus with `scheduling` the key's fair-share
    /// counter: the request was charged an estimate (`charged`) when dispatched, and is now
    /// charged what it really cost instead (prompt + `completion_weight` × completion).
    pub fn charge_usage(&self, api_key: &str, tokens: &crate::usage::Tokens, charged: f64) {
        let Some(live) = self.live(api_key) else {
            return;
        };
        self.charge_live(&live, tokens.total);
        if let Some(weight) = self.shared.completion_weight {
            let cost = tokens.prompt as f64 + weight * tokens.completion as f64;
            live.service.charge(cost - charged);
        }
    }

    fn live(&self, api_key: &str) -> Option<Arc<KeyLive>> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(api_key)
            .cloned()
    }

    fn charge_live(&self, live: &Arc<KeyLive>, tokens: u64) {
        if let Some(limits) = &live.limits {
            limits.charge_tokens(tokens);
        }
        let period = period_of(self.shared.config.quota_period, unix_now());
        roll_period(live, period);
        live.served.fetch_add(tokens, Ordering::Relaxed);
        let used = live.used.fetch_add(tokens, Ordering::AcqRel) + tokens;
        if let Some(ledger) = self.shared.ledger.as_ref().filter(|_| live.shared) {
            ledger.charge(live, period, tokens);
        }
        self.store
            .save(live.key_id.clone(), live.name.clone(), period, used);
    }

    /// The `n` keys served the most tokens, by name, for the metrics (run at scrape only).
    pub fn top_served(&self, n: usize) -> Vec<(String, u64)> {
        let mut top: Vec<(String, u64)> = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|l| (l.name.clone(), l.served.load(Ordering::Relaxed)))
            .filter(|&(_, t)| t > 0)
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }

    /// Tokens consumed by `entry` in the current quota period.
    pub fn used(&self, entry: &KeyEntry) -> u64 {
        let period = period_of(self.shared.config.quota_period, unix_now());
        if entry.live.period.load(Ordering::Acquire) == period {
            entry.live.used.load(Ordering::Acquire)
        } else {
            0
        }
    }

    fn deny(&self, denial: Denial) -> GatewayError {
        let r: &DenialResponse = &self.shared.config.responses[denial as usize];
        GatewayError::Denied {
            denial,
            status: r.status,
            message: r.message.clone(),
        }
    }
}

impl Drop for Auth {
    fn drop(&mut self) {
        // Closing the job channel ends the look-up threads; the quota store flushes after.
        self.jobs.take();
    }
}

/// Starts a new quota period at zero once the calendar moved on; the CAS elects one resetter.
fn roll_period(live: &KeyLive, period: u64) {
    let seen = live.period.load(Ordering::Acquire);
    if seen != period
        && live
            .period
            .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        live.used.store(0, Ordering::Release);
    }
}

impl Shared {
    /// An entry for `k`, sharing the live state of earlier entries for the same key.
    fn entry(&self, k: &ApiKeyConfig) -> Arc<KeyEntry> {
        let live = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(k.key.clone())
            .or_insert_with(|| {
                let spec = k.rate_limit.or(self.per_key);
                let period = period_of(self.config.quota_period, unix_now());
                let key_id = quota::key_id(&k.key);
                let used = self
                    .saved
                    .get(&key_id)
                    .filter(|(p, _)| *p == period)
                    .map_or(0, |(_, used)| *used);
                let service = crate::schedule::flow_of(&key_id);
                let live = Arc::new(KeyLive {
                    limits: (!spec.is_empty())
                        .then(|| Arc::new(LimitSet::new(&spec, format!("key:{key_id}")))),
                    used: AtomicU64::new(used),
                    period: AtomicU64::new(period),
                    name: k.name.clone(),
                    key_id,
                    quota_period: self.config.quota_period,
                    shared: k.total_quota.is_some() || spec.tokens_per_minute.is_some(),
                    active: AtomicBool::new(false),
                    service,
                    served: AtomicU64::new(0),
                });
                if let Some(ledger) = &self.ledger {
                    ledger.watch(&live);
                }
                live
            })
            .clone();
        Arc::new(KeyEntry {
            key_ref: Arc::new(KeyRef::new(
                k.name.clone(),
                k.user_id.clone(),
                k.key.clone(),
            )),
            status: k.status,
            allowed_ips: k.allowed_ips.clone(),
            allowed_models: k.allowed_models.clone(),
            expires_at: k.expires_at,
            total_quota: k.total_quota,
            priority: k.priority,
            max_priority: k.max_priority,
            live,
        })
    }

    /// Runs the pipeline for one key on a look-up thread.
    fn run_pipeline(&self, conns: &mut providers::Conns, job: &Job) -> Result<Found, String> {
        let req = providers::Request {
            api_key: &job.key,
            ip: &job.ip,
            method: &job.method,
            path: &job.path,
        };
        let mut found = Vec::new();
        let mut failure = None;
        for (i, provider) in self.config.pipeline.iter().enumerate() {
            let record = match provider {
                ProviderConfig::Static => Ok(self.static_keys.get(&job.key).cloned()),
                _ => providers::lookup(i, provider, conns, &req)
                    .map(|r| r.map(|cfg| self.entry(&cfg))),
            };
            match (record, self.config.mode) {
                (Ok(Some(e)), PipelineMode::FirstMatch) => return Ok(Arc::from(vec![e])),
                (Ok(Some(e)), PipelineMode::All) => found.push(e),
                (Ok(None), PipelineMode::FirstMatch) => {}
                (Ok(None), PipelineMode::All) => return Ok(Arc::from(Vec::new())),
                (Err(e), PipelineMode::FirstMatch) => failure = Some(e.0),
                (Err(e), PipelineMode::All) => return Err(e.0),
            }
        }
        // No provider knew the key; if one could not answer, the key may be valid.
        match failure {
            Some(e) if found.is_empty() => Err(e),
            _ => Ok(Arc::from(found)),
        }
    }
}

fn lookup_loop(shared: &Shared, jobs: &Receiver<Job>) {
    let mut conns = providers::Conns::default();
    for job in jobs {
        // A panicking driver must still complete the slot, or its waiters would wait forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.run_pipeline(&mut conns, &job)
        }))
        .unwrap_or_else(|_| {
            conns = providers::Conns::default();
            Err("provider look-up panicked".to_string())
        });
        shared.cache.complete(&job.slot, result);
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

    fn identify(a: &Auth, key: Option<&[u8]>, ip: IpAddr) -> Result<Arc<KeyEntry>, GatewayError> {
        let caller = Caller {
            ip,
            ip_text: "",
            method: b"POST",
            path: b"/v1/x",
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(a.identify(key, &caller))
    }

    fn auth(yaml: &str, db: &std::path::Path) -> Arc<Auth> {
        let text = format!(
            "backends: [{{url: 'http://127.0.0.1:1'}}]\nauth: {{enabled: true, quota_path: '{}'}}\n{yaml}",
            db.display()
        );
        Auth::new(&parse(&text, Format::Yaml).unwrap(), None)
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
            code(identify(&a, None, ip("10.1.1.1")).unwrap_err()),
            (401, "invalid_api_key")
        );
        assert_eq!(
            code(identify(&a, Some(b"nope"), ip("10.1.1.1")).unwrap_err()),
            (401, "invalid_api_key")
        );
        assert_eq!(
            code(identify(&a, Some(b"off"), ip("10.1.1.1")).unwrap_err()).0,
            403
        );
        assert_eq!(
            code(identify(&a, Some(b"old"), ip("10.1.1.1")).unwrap_err()).0,
            401
        );
        assert_eq!(
            code(identify(&a, Some(b"gone"), ip("10.1.1.1")).unwrap_err()).0,
            401
        );
        assert_eq!(
            code(identify(&a, Some(b"ok"), ip("127.0.0.1")).unwrap_err()).0,
            403
        );
        let e = identify(&a, Some(b"ok"), ip("::1")).unwrap();
        let e2 = identify(&a, Some(b"ok"), ip("10.9.9.9")).unwrap();
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
        let e = identify(&a, Some(b"k"), "127.0.0.1".parse().unwrap()).unwrap();
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
