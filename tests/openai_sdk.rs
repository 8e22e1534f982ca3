//! The official `openai` Python SDK against a real gateway in front of the simulator: what users
//! actually run. Needs `python3 -m pip install openai` (done by .ci/run).

mod common;

use std::process::Command;

use common::*;

#[test]
fn openai_python_sdk_works_through_the_gateway() {
    if !python_has(&["openai"]) {
        return;
    }
    let sim = spawn_mock(&["--tokens", "8"]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n",
        sim.addr
    ));
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sdk_e2e.py"
        ))
        .arg(format!("http://{}/v1", gw.addr))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
}
