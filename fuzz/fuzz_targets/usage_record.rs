//! The usage record parser (`llmproxy::usage::parse_usage`, `Billed::of`) on arbitrary captured
//! bytes, and the record built from it.
//!
//! A refused answer bills nothing; an estimate adds up and comes from the request size and the
//! output seen; reported usage is what the JSON says, which `serde_json` reads back the same way.
//! The record's JSON (what the spool keeps) parses back into the same record.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use llmproxy::api::Api;
use llmproxy::usage::{
    parse_usage, Accounted, Billed, Captured, Outcome, UsageEvent, UsageRecord, CLIENT_CLOSED,
};

/// Bytes before the captured ones: the capture's kind (1), the backend status (2), the content
/// events (4) and the request size (8).
const PREFIX: usize = 15;

fuzz_target!(|input: &[u8]| {
    if input.len() < PREFIX {
        return;
    }
    let (prefix, bytes) = input.split_at(PREFIX);
    let number =
        |at: std::ops::Range<usize>| prefix[at].iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let captured = match prefix[0] % 4 {
        0 => Captured::Nothing,
        1 => Captured::Event(bytes.to_vec()),
        kind => Captured::Body {
            bytes: bytes.to_vec(),
            truncated: kind == 3,
        },
    };
    let status_code = number(1..3) as u16;
    let content_events = number(3..7) as u32;
    let request_bytes = number(7..15);

    // The chat dialect: the one whose usage shape the comparison below reads.
    let reported = parse_usage(Api::ChatCompletions, &captured);
    // The usage parser skips the other members unchecked (invalid UTF-8 in a string there does not
    // stop it), so it is compared only with JSON that `serde_json` reads whole.
    let whole_json = match &captured {
        Captured::Event(json)
        | Captured::Body {
            bytes: json,
            truncated: false,
        } => serde_json::from_slice::<serde_json::Value>(json).ok(),
        _ => None,
    };
    if let (Some(tokens), Some(value)) = (reported, whole_json) {
        let usage = &value["usage"];
        let field = |name: &str| usage[name].as_u64().unwrap_or(0);
        assert_eq!(
            (tokens.prompt, tokens.completion),
            (field("prompt_tokens"), field("completion_tokens"))
        );
        if let Some(total) = usage["total_tokens"].as_u64() {
            assert_eq!(tokens.total, total);
        }
    }

    let event = UsageEvent {
        request_id: "fuzz".into(),
        client_request_id: None,
        started_at: UNIX_EPOCH,
        key: None,
        model: Some(String::from_utf8_lossy(bytes).into_owned()),
        endpoint: "/v1/chat/completions".into(),
        api: Api::ChatCompletions,
        is_stream: true,
        backend_url: Arc::from("http://backend"),
        tier: 0,
        status_code,
        latency: Duration::from_millis(request_bytes),
        ttft: None,
        outcome: Outcome::Completed,
        captured,
        content_events,
        request_bytes,
    };
    let billed = Billed::of(&event);
    let tokens = billed.tokens;
    if status_code != CLIENT_CLOSED && !(200..300).contains(&status_code) {
        assert_eq!(
            (tokens.total, billed.estimated, billed.outcome),
            (0, false, Outcome::Failed)
        );
    } else if billed.estimated {
        assert!(reported.is_none());
        assert_eq!(tokens.prompt, request_bytes / 4);
        assert_eq!(tokens.total, tokens.prompt + tokens.completion);
        match &event.captured {
            Captured::Body {
                bytes,
                truncated: false,
            } => {
                assert!(tokens.completion <= (bytes.len() as u64).div_ceil(4))
            }
            _ => assert_eq!(tokens.completion, u64::from(content_events)),
        }
    } else {
        assert_eq!(Some(tokens), reported);
    }

    let accounted = Accounted::new(event, billed);
    let record = accounted.record(false);
    let json = serde_json::to_string(&record).expect("a record serializes");
    let back: UsageRecord = serde_json::from_str(&json).expect("a spooled record parses back");
    assert_eq!(
        serde_json::to_value(&back).ok(),
        serde_json::to_value(&record).ok()
    );
});
