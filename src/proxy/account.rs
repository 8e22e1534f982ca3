//! Phase 8, account: runs once per request the gateway did not answer on its own behalf (health
//! and metrics are not accounted), after its response is written or abandoned. Reads the
//! request's [`RequestOutcome`] and nothing else to update the metrics, write the access log line
//! and hand the usage event to the reporter. It must stay cheap: no I/O, one channel send (the
//! access line goes into the worker's buffer, see [`crate::logging::access`]). With
//! `usage_hook.durability: sync` it returns the future the response's last bytes wait on.

use std::time::{Instant, SystemTime};

use super::conn::ClientConn;
use super::outcome::RequestOutcome;
use super::request_id::RequestId;
use super::{Context, Generation};
use crate::error::GatewayError;
use crate::logging::access::{self, AccessLine};
use crate::metrics;
use crate::usage::{Captured, Committed, Outcome, UsageEvent};

/// A request whose head could not be read: counted, with its rejection.
pub fn unparsed(ctx: &Context, e: &GatewayError) {
    let m = ctx.metrics();
    m.request(metrics::PATHS.len() - 1, false, None, e.status());
    if let Some(why) = e.rejection() {
        m.reject(why);
    }
}

pub fn finish(
    ctx: &Context,
    generation: &Generation,
    c: &ClientConn,
    request_id: &RequestId,
    outcome: RequestOutcome,
) -> Option<Committed> {
    let now = Instant::now();
    let m = ctx.metrics();
    let o = &outcome;
    let p = &o.progress;
    let path = c.head.path(&c.buf);
    let path_slot = metrics::path_index(path);
    let backend = o.backend();
    let slot = backend.map(|b| generation.slots[b]);
    m.request(path_slot, o.stream, slot, o.status);
    if let Some(why) = o.rejected {
        m.reject(why);
    }
    if let Some(kind) = o.upstream_error {
        m.upstream_error(kind);
    }
    if o.ending == Some(Outcome::Cancelled) {
        m.client_cancels.inc();
    }
    m.retries.add(u64::from(o.retries));
    m.latency.observe(now - o.started);
    let ttft = o.body_read.zip(p.first_byte).map(|(s, f)| f - s);
    if let Some(ttft) = ttft {
        m.ttft.observe(ttft);
    }
    if let (Some(sent), Some(done)) = (p.sent_upstream, p.upstream_done) {
        m.upstream_latency.observe(done - sent);
    }
    // Gateway time on the way in (body read to upstream write) and out (upstream head to
    // client write); connect time counts as the backend's, retries as the gateway's.
    if let (Some(read), Some(sent), Some(head), Some(written)) = (
        o.body_read,
        p.sent_upstream,
        p.upstream_head,
        p.head_written,
    ) {
        m.overhead.observe((sent - read) + (written - head));
    }
    let model = o.has_model.then_some(c.model.as_str());

    if generation.config.log.access {
        access::write(&AccessLine {
            request_id: request_id.as_str(),
            key: o.key.as_ref().map_or("-", |k| k.key_ref.name.as_str()),
            model: model.unwrap_or("-"),
            path: metrics::PATHS[path_slot],
            stream: o.stream,
            status: o.status,
            bytes: p.bytes,
            ttft,
            total: now - o.started,
            backend: backend.map_or("-", |b| generation.upstreams.backend(b).url.as_str()),
            retries: o.retries,
        });
    }

    let (Some(usage), Some(ending), Some(backend), Some(api)) =
        (&generation.usage, o.ending, backend, o.api)
    else {
        return None;
    };
    // Counting tokens generates nothing, and a request that never reached a backend cost none.
    if !api.billed() || !o.reached_backend() {
        return None;
    }
    let RequestOutcome {
        progress,
        key,
        started,
        body_read,
        status,
        stream,
        fair_share_charged,
        ..
    } = outcome;
    let (captured, content_events) = match progress.meter {
        Some(m) => {
            let events = m.content_events();
            (m.finish(), events)
        }
        None => (Captured::Nothing, 0),
    };
    let started = body_read.unwrap_or(started);
    // The record's id is the billing key (the webhook's Idempotency-Key, the table's unique
    // column): a client's id may repeat, so it is kept beside the gateway's own.
    let (billing_id, client_request_id) = if request_id.from_client {
        let own = RequestId::generate(&ctx.ids);
        (
            own.as_str().to_owned(),
            Some(request_id.as_str().to_owned()),
        )
    } else {
        (request_id.as_str().to_owned(), None)
    };
    let served_by = generation.upstreams.backend(backend);
    usage.send(
        ctx.worker(),
        UsageEvent {
            request_id: billing_id,
            client_request_id,
            started_at: SystemTime::now() - started.elapsed(),
            key: key.as_ref().map(|k| k.key_ref.clone()),
            model: model.map(str::to_owned),
            endpoint: String::from_utf8_lossy(path).into_owned(),
            api,
            is_stream: stream,
            backend_url: served_by.url_shared.clone(),
            tier: served_by.tier,
            status_code: status,
            latency: started.elapsed(),
            ttft,
            outcome: ending,
            captured,
            content_events,
            request_bytes: c.body.len() as u64,
            fair_share_charged,
        },
    )
}
