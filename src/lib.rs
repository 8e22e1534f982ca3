//! llmproxy: a thread-per-core gateway for OpenAI-compatible inference servers.
//!
//! A request moves through named phases, each owned by one module and flowing one way:
//! `server` (runtimes, listeners) accepts; `http` parses; `proxy` admits, routes and relays;
//! `upstream` owns backend connections; errors decided anywhere are rendered by `error`.

pub mod config;
pub mod error;
pub mod http;
pub mod mock;
