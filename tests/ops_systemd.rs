//! The systemd unit passes `systemd-analyze verify` (skipped where systemd-analyze is missing;
//! CI installs it: `apt-get install -y systemd`).

use std::process::Command;

#[test]
fn unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{dir}/systemd/verify.sh"))
        .arg(env!("CARGO_BIN_EXE_llmproxy"))
        .output()
        .expect("run systemd/verify.sh");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
