//! The request-body inspection (`inspect`, `inspect_form`, `request_stream_usage`,
//! `RequestInfo::replace_model`, reached through `llmproxy::fuzzing`).
//!
//! On a body `serde_json` reads as an object, the scan agrees with it: the model the gateway
//! decodes (and routes, authorizes and bills by) is the model the backend reads, and so is the
//! stream flag. Both edits leave valid JSON that says what the edit meant, and the ranges the
//! edited `RequestInfo` keeps are the ones a fresh scan of the edited body finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::fuzzing::{inspect, inspect_form, request_stream_usage, RequestInfo};
use serde_json::Value;

/// Model names an alias may put in place of the client's: shorter, longer, and empty.
const SERVED: [&str; 3] = ["m", "served/model-with-a-longer-name", ""];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        // A form: the content type is the first line, the body the rest.
        let at = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (content_type, body) = (&rest[..at], rest.get(at + 1..).unwrap_or_default());
        if let Some(info) = inspect_form(body, content_type) {
            check_ranges(&info, body);
            let mut model = String::new();
            info.decode_model(body, &mut model);
        }
        return;
    }
    let body = rest;
    let Some(info) = inspect(body) else {
        return;
    };
    check_ranges(&info, body);
    let mut model = String::new();
    let decoded = info.decode_model(body, &mut model);
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    match object.get("model") {
        Some(Value::String(read)) => {
            assert!(
                decoded && model == *read,
                "the gateway reads model {model:?}, the backend {read:?}"
            )
        }
        Some(_) => {} // not a string: the backend refuses the request
        None => assert_eq!(info.model, None, "a model the backend does not read"),
    }
    if let Some(Value::Bool(stream)) = object.get("stream") {
        assert_eq!(info.stream, *stream, "stream flag");
    }

    let mut edited = body.to_vec();
    let mut edited_info = info.clone();
    if request_stream_usage(&mut edited, &mut edited_info) {
        let value = still_json(&edited, &edited_info);
        assert_eq!(
            value["stream_options"]["include_usage"],
            Value::Bool(true),
            "usage not asked for"
        );
        assert_eq!(
            value["model"],
            object.get("model").cloned().unwrap_or(Value::Null)
        );
    } else {
        // Already asked for: the member the scan found is the one the backend reads.
        let (_, at) = info.include_usage.clone().expect("usage left unasked");
        let read = &object.get("stream_options").unwrap_or(&Value::Null)["include_usage"];
        assert_eq!(
            serde_json::from_slice::<Value>(&body[at]).ok().as_ref(),
            Some(read)
        );
    }

    for served in SERVED {
        let mut renamed = body.to_vec();
        let mut renamed_info = info.clone();
        renamed_info.replace_model(&mut renamed, served);
        let value = still_json(&renamed, &renamed_info);
        if info.model.is_some() {
            assert!(renamed_info.decode_model(&renamed, &mut model) && model == served);
            assert_eq!(value["model"], served);
        }
    }
});

/// Every range lies inside the body and is ordered; `end` is the top-level closing brace.
fn check_ranges(info: &RequestInfo, body: &[u8]) {
    let ranges = [
        &info.model,
        &info.stream_options,
        &info.stream_options_null,
        &info.user,
    ];
    for range in ranges
        .into_iter()
        .flatten()
        .chain(info.include_usage.as_ref().map(|(_, r)| r))
    {
        assert!(
            range.start <= range.end && range.end <= body.len(),
            "{range:?} outside the body"
        );
    }
    if !info.form {
        assert_eq!(body.get(info.end), Some(&b'}'));
    }
}

/// An edited body: valid JSON, and scanned afresh, the same ranges as its edited info.
fn still_json(body: &[u8], info: &RequestInfo) -> Value {
    let value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "the edit broke the JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    assert_eq!(
        inspect(body).as_ref(),
        Some(info),
        "{}",
        String::from_utf8_lossy(body)
    );
    value
}
