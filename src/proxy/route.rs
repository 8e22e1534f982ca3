//! Phase 2, route: runs once per request, right after its head is read, and decides who answers
//! it from the method and path alone. Routing is decided here and nowhere else; the API it names
//! drives body inspection, metering and the error shape of every later phase.

use crate::api::Api;
use crate::http::RequestHead;

use super::Generation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET|HEAD /health`: answered by the gateway, not accounted.
    Health,
    /// `GET|HEAD` on the metrics path, when exposition is on: answered by the gateway.
    Metrics,
    /// `GET /v1/models`: the merged model list once the checkers have one (after admission),
    /// else relayed.
    ModelList,
    /// Relayed to a backend in this API.
    Proxy(Api),
    /// A path the gateway neither serves nor relays.
    NotFound,
}

impl Route {
    /// The API accounted for a relayed route.
    pub fn api(self) -> Option<Api> {
        match self {
            Route::ModelList => Some(Api::Other),
            Route::Proxy(api) => Some(api),
            Route::Health | Route::Metrics | Route::NotFound => None,
        }
    }
}

pub fn decide(generation: &Generation, head: &RequestHead, buf: &[u8]) -> Route {
    let path = head.path(buf);
    let method = head.method.of(buf);
    let read_only = matches!(method, b"GET" | b"HEAD");
    let metrics = &generation.config.metrics;
    if read_only && path == b"/health" {
        Route::Health
    } else if read_only && metrics.enabled && path == metrics.path.as_bytes() {
        Route::Metrics
    } else if method == b"GET" && path == b"/v1/models" {
        Route::ModelList
    } else {
        Api::of_path(path).map_or(Route::NotFound, Route::Proxy)
    }
}
