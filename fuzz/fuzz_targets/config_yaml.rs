//! The config loader (`llmproxy::config::parse`) on YAML text: refuses or accepts, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::config::{parse, Format};

fuzz_target!(|text: &str| {
    if let Err(error) = parse(text, Format::Yaml) {
        assert!(!error.to_string().is_empty(), "a refusal says why");
    }
});
