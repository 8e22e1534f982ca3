//! The Lua policy stage: an operator's script sees the request (key, IP, method, path, headers,
//! model) and the key's provider data, and allows or denies with a status, message and metadata.
//!
//! One Lua state per worker thread (a `Lua` is not `Send`), created and the script compiled once
//! at worker start. Sandboxed: only the table, string, math and utf8 libraries, and the base
//! library without load, loadstring, dofile, loadfile, require, collectgarbage or print; an
//! instruction budget (a count hook aborts the call) and a memory cap. A failing script never
//! harms the worker: the call errors, the state is collected, the next request runs normally.

use std::cell::Cell;
use std::rc::Rc;

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::KeyEntry;
use crate::config::LuaConfig;

/// How often (in VM instructions) the budget hook runs.
const HOOK_EVERY: u32 = 1000;

pub struct LuaPolicy {
    lua: Lua,
    authorize: Function,
    steps: Rc<Cell<u64>>,
}

/// The request as the script sees it.
pub struct LuaRequest<'a> {
    pub api_key: &'a str,
    pub ip: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub model: Option<&'a str>,
}

/// The script's answer.
pub enum Verdict {
    Allow,
    Deny { status: u16, message: String },
}

impl LuaPolicy {
    /// Builds the sandbox and compiles the script, which must define `authorize(request, key)`.
    pub fn new(config: &LuaConfig) -> Result<LuaPolicy, String> {
        let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(|e| e.to_string())?;
        let globals = lua.globals();
        for name in [
            "load",
            "loadstring",
            "dofile",
            "loadfile",
            "require",
            "collectgarbage",
            "print",
        ] {
            globals
                .raw_set(name, Value::Nil)
                .map_err(|e| e.to_string())?;
        }
        lua.set_memory_limit(config.max_memory)
            .map_err(|e| e.to_string())?;
        let steps = Rc::new(Cell::new(0u64));
        let budget_steps = config.max_instructions.div_ceil(u64::from(HOOK_EVERY));
        let counter = steps.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                counter.set(counter.get() + 1);
                if counter.get() > budget_steps {
                    Err(mlua::Error::runtime("instruction budget exceeded"))
                } else {
                    Ok(VmState::Continue)
                }
            },
        )
        .map_err(|e| e.to_string())?;
        steps.set(0);
        lua.load(config.source.as_str())
            .set_name("auth policy")
            .exec()
            .map_err(|e| e.to_string())?;
        let authorize: Function = globals
            .get("authorize")
            .map_err(|_| "the script must define a function authorize(request, key)".to_string())?;
        Ok(LuaPolicy {
            lua,
            authorize,
            steps,
        })
    }

    /// Runs the script for one request. `Err` is the script's failure (budget, memory, error).
    pub fn decide(&self, req: &LuaRequest<'_>, key: &KeyEntry) -> Result<Verdict, String> {
        self.steps.set(0);
        let result = self.call(req, key);
        if result.is_err() {
            // Give back what a runaway script allocated before the next request.
            let _ = self.lua.gc_collect();
        }
        result.map_err(|e| e.to_string())
    }

    fn call(&self, req: &LuaRequest<'_>, key: &KeyEntry) -> mlua::Result<Verdict> {
        let lua = &self.lua;
        let r = lua.create_table()?;
        r.set("api_key", req.api_key)?;
        r.set("ip", req.ip)?;
        r.set("method", req.method)?;
        r.set("path", req.path)?;
        r.set("model", req.model)?;
        let headers = lua.create_table()?;
        for (n, v) in &req.headers {
            headers.set(n.to_ascii_lowercase(), *v)?;
        }
        r.set("headers", headers)?;
        let k = lua.create_table()?;
        k.set("name", key.key_ref.name.as_str())?;
        k.set("user_id", key.key_ref.user_id.as_deref())?;
        k.set("total_quota", key.total_quota)?;
        k.set("allowed_models", key.allowed_models.clone())?;
        let answer: Value = self.authorize.call((r, k))?;
        Ok(match answer {
            Value::Boolean(true) => Verdict::Allow,
            Value::Table(t) => verdict(&t)?,
            _ => Verdict::Deny {
                status: 403,
                message: "Request denied by policy.".into(),
            },
        })
    }
}

fn verdict(t: &Table) -> mlua::Result<Verdict> {
    if t.get::<Option<bool>>("allow")?.unwrap_or(false) {
        return Ok(Verdict::Allow);
    }
    let status = t
        .get::<Option<u16>>("status")?
        .filter(|s| (400..=599).contains(s))
        .unwrap_or(403);
    let message = t
        .get::<Option<String>>("message")?
        .unwrap_or_else(|| "Request denied by policy.".into());
    Ok(Verdict::Deny { status, message })
}
