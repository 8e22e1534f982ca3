//! The official `openai` Python SDK raises its own exception classes on the gateway's refusals
//! (AuthenticationError, RateLimitError with the right codes). Needs `pip install openai`.

mod common;

use std::process::Command;

use common::*;

#[test]
fn openai_sdk_classifies_auth_and_limit_refusals() {
    if !python_has(&["openai"]) {
        return;
    }
    let mock = spawn_mock(&[]);
    let db = std::env::temp_dir().join(format!("llmproxy-sdk-{}.db", std::process::id()));
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends: [{{url: \"http://{}\"}}]\n\
         auth: {{quota_path: \"{}\"}}\n\
         api_keys:\n  - {{key: sk-good, rate_limit: {{requests_per_minute: 1}}}}\n  \
         - {{key: sk-spent, status: quota_exceeded}}\n",
        mock.addr,
        db.display()
    ));
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sdk_auth_errors.py"
        ))
        .arg(format!("http://{}/v1", gw.addr))
        .args(["sk-good", "sk-spent"])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all SDK auth checks passed"), "{stdout}");
}
