//! The Lua policy stage: decisions with status and message, and a sandbox that refuses escapes
//! (os, io, require, load, dofile) and survives bombs (string.rep, endless loops) without
//! harming the worker: the next request on the same worker still works.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};

const SCRIPT: &str = r#"
function authorize(req, key)
  local attack = req.headers["x-attack"]
  if attack == "os" then return os.execute("touch /tmp/llmproxy-pwned") end
  if attack == "io" then return io.open("/etc/passwd"):read("*a") end
  if attack == "require" then return require("os") end
  if attack == "load" then return load("return 1")() end
  if attack == "dofile" then return dofile("/etc/passwd") end
  if attack == "rep" then local s = string.rep("x", 1 << 30) return #s > 0 end
  if attack == "grow" then local t = {} for i = 1, 1e9 do t[i] = i end return true end
  if attack == "loop" then while true do end end
  if attack == "debug" then return debug.getinfo(1) end
  if req.model == "forbidden-model" then
    return {allow = false, status = 451, message = "Not for " .. key.name}
  end
  return req.ip == "127.0.0.1" and req.method == "POST" and req.path == "/v1/chat/completions"
end
"#;

fn call(gw: SocketAddr, model: &str, attack: Option<&str>) -> Response {
    let mut headers = vec![("Authorization", "Bearer lua-key")];
    if let Some(a) = attack {
        headers.push(("X-Attack", a));
    }
    let body: Value = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    post_json(gw, "/v1/chat/completions", &body, &headers)
}

#[test]
fn lua_policy_decides_and_sandbox_holds() {
    let mock = spawn_mock(&[]);
    let script_file = unique_path("llmproxy-policy").with_extension("lua");
    std::fs::write(&script_file, SCRIPT).unwrap();
    let db = unique_path("llmproxy-lua").with_extension("db");
    // One worker: every request below runs on the same Lua state.
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends: [{{url: \"http://{}\"}}]\n\
         auth:\n  quota_path: \"{}\"\n  pipeline:\n    - {{type: static}}\n    \
         - {{type: lua, file: \"{}\", max_instructions: 5000000, max_memory: 8MiB}}\n\
         api_keys: [{{key: lua-key, name: Lua}}]\n",
        mock.addr,
        db.display(),
        script_file.display()
    ));
    assert_eq!(call(gw.addr, "mock-model", None).status, 200);
    let r = call(gw.addr, "forbidden-model", None);
    assert_eq!(r.status, 451);
    assert_eq!(r.json()["error"]["message"], "Not for Lua");
    assert_eq!(r.json()["error"]["code"], "access_denied");

    for attack in [
        "os", "io", "require", "load", "dofile", "rep", "grow", "loop", "debug",
    ] {
        let r = call(gw.addr, "mock-model", Some(attack));
        assert_eq!(r.status, 500, "{attack}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "auth_policy_error", "{attack}");
        let next = call(gw.addr, "mock-model", None);
        assert_eq!(
            next.status,
            200,
            "worker harmed after {attack}: {}",
            next.text()
        );
    }
    assert!(!std::path::Path::new("/tmp/llmproxy-pwned").exists());
    let _ = std::fs::remove_file(script_file);
}
