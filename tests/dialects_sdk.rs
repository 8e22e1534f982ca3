//! The official `anthropic` and `openai` Python SDKs against the simulator's Messages, token
//! counting and Responses endpoints. Needs `python3 -m pip install anthropic openai` (done by
//! .ci/run); without them the test prints SKIPPED and passes, unless LLMPROXY_REQUIRE_SERVICES=1.

mod common;

use std::process::Command;

use common::*;

#[test]
fn anthropic_and_openai_sdks_parse_the_simulators_messages_and_responses() {
    if !python_has(&["anthropic", "openai"]) {
        return;
    }
    let sim = spawn_mock(&["--tokens", "6"]);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sdk_dialects.py"
        ))
        .arg(format!("http://{}", sim.addr))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all dialect SDK checks passed"), "{stdout}");
}
