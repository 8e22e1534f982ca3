//! The command line: `check` reports config errors with key paths, help and version work.

use std::process::Command;

fn llmproxy(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(args)
        .output()
        .expect("run llmproxy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("llmproxy-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_example_configs() {
    for file in [
        "llmproxy.yaml",
        "llmproxy.toml",
        "seed-minimal.yaml",
        "demo.yaml",
    ] {
        let path = format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"));
        let (ok, text) = llmproxy(&["check", "--config", &path]);
        assert!(ok, "{file}: {text}");
        assert!(text.contains(": ok"), "{text}");
    }
}

#[test]
fn check_reports_every_error_with_its_key_path() {
    let path = temp_config(
        "bad.yaml",
        "listne: \":8000\"\nbackends:\n  - url: \"http://a:1\"\n    weight: 0\n  - url: \"ftp://b\"\n",
    );
    let (ok, text) = llmproxy(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains("listne: unknown key") && text.contains("listen"),
        "{text}"
    );
    assert!(text.contains("backends[0].weight"), "{text}");
    assert!(text.contains("backends[1].url"), "{text}");
    let _ = std::fs::remove_file(path);

    let path = temp_config(
        "env.toml",
        "listen = \"${LLMPROXY_TEST_UNSET_VAR}\"\n[[backends]]\nurl = \"http://a:1\"\n",
    );
    let (ok, text) = llmproxy(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok && text.contains("LLMPROXY_TEST_UNSET_VAR"), "{text}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn serve_refuses_an_invalid_config_before_listening() {
    let path = temp_config("refuse.yaml", "backends: []\n");
    let (ok, text) = llmproxy(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!ok && text.contains("backends"), "{text}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn version_and_help() {
    let (ok, text) = llmproxy(&["--version"]);
    assert!(ok && text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    for cmd in [
        &["--help"][..],
        &["serve", "--help"],
        &["check", "--help"],
        &["mock-llm", "--help"],
        &["demo", "--help"],
    ] {
        let (ok, text) = llmproxy(cmd);
        assert!(ok && text.contains("Usage"), "{cmd:?}: {text}");
    }
}
