//! Phase 5, authorize: runs once the body is read, for requests whose caller was identified by
//! a key. Decides on the model the client asked for (before any alias rewrite): model allowed,
//! quota left, then the Lua policy when one is configured. `Ok` lets the request go upstream.

use crate::auth::{KeyEntry, LuaRequest, Verdict};
use crate::config::Denial;
use crate::error::GatewayError;

use super::conn::ClientConn;
use super::Generation;

pub fn authorize(
    generation: &Generation,
    c: &ClientConn,
    key: &KeyEntry,
    model: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(auth) = &generation.auth else {
        return Ok(());
    };
    auth.authorize(key, model)?;
    run_policy(generation, c, key, model)
}

/// The Lua stage, when configured.
fn run_policy(
    generation: &Generation,
    c: &ClientConn,
    key: &KeyEntry,
    model: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(policy) = &generation.lua else {
        return if generation.lua_failed {
            Err(GatewayError::PolicyFailed)
        } else {
            Ok(())
        };
    };
    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap_or("")
    }
    let req = LuaRequest {
        api_key: &key.key_ref.api_key,
        ip: &c.ip,
        method: text(c.head.method.of(&c.buf)),
        path: text(c.head.path(&c.buf)),
        headers: c
            .head
            .headers
            .iter()
            .map(|(n, v)| (text(n.of(&c.buf)), text(v.of(&c.buf))))
            .collect(),
        model,
    };
    match policy.decide(&req, key) {
        Ok(Verdict::Allow) => Ok(()),
        Ok(Verdict::Deny { status, message }) => Err(GatewayError::Denied {
            denial: Denial::Policy,
            status,
            message,
        }),
        Err(e) => {
            tracing::warn!(key = %key.key_ref.name, "lua policy failed: {e}");
            Err(GatewayError::PolicyFailed)
        }
    }
}
