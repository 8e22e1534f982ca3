//! The usage meter (`llmproxy::usage::Meter`), in every API's dialect, on a response body the
//! fuzzer writes and cuts into reads: an SSE stream observed, the same stream filtered in strip
//! mode, and a JSON body copied.
//!
//! However the reads cut the body, the meter counts the same content events and captures the same
//! usage, strip mode forwards the same bytes, and those bytes are the stream itself when nothing
//! was stripped (a meter that does not strip forwards everything). A JSON body is copied whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::api::Api;
use llmproxy::usage::{Captured, Meter};
use llmproxy_fuzz::{reads, split_plan};

/// Longer events are forwarded uninspected once split across reads (the meter's `MAX_EVENT`, 256
/// KiB), so only the cut ones stop being metered; inputs stay below it to compare cuts.
const MAX_INPUT: usize = 256 * 1024;

/// What a meter made of a body: forwarded bytes (strip mode), content events, the capture.
type Metered = (Vec<u8>, u32, Captured);

/// Runs `meter` over `reads` the way the relay does: `filter` then `flush` in strip mode,
/// `observe` otherwise.
fn run<'a>(mut meter: Meter, filter: bool, reads: impl Iterator<Item = &'a [u8]>) -> Metered {
    let mut forwarded = Vec::new();
    for read in reads {
        if filter {
            meter.filter(read, &mut forwarded);
        } else {
            meter.observe(read);
        }
    }
    if filter {
        meter.flush(&mut forwarded);
    }
    (forwarded, meter.content_events(), meter.finish())
}

/// Checks one way of metering a body. `new_meter(strip)` builds the meter under test, so each
/// dialect of the meter is checked by passing its constructor.
fn check(new_meter: impl Fn(bool) -> Meter, plan: &[u8], body: &[u8]) {
    let whole = |strip, filter| run(new_meter(strip), filter, std::iter::once(body));
    let cut = |strip, filter| run(new_meter(strip), filter, reads(plan, body));

    let observed = whole(false, false);
    assert_eq!(
        observed,
        cut(false, false),
        "observe: the cuts changed the count or the capture"
    );
    assert!(observed.0.is_empty());

    let stripped = whole(true, true);
    assert_eq!(
        stripped,
        cut(true, true),
        "strip: the cuts changed what was forwarded"
    );
    assert_eq!(
        (stripped.1, &stripped.2),
        (observed.1, &observed.2),
        "strip metered differently"
    );
    assert!(stripped.0.len() <= body.len());
    if observed.2 == Captured::Nothing {
        assert!(
            stripped.0 == body,
            "strip removed bytes but captured no usage"
        );
    }

    let passed = cut(false, true);
    assert!(
        passed.0 == body,
        "a meter that does not strip changed the stream"
    );
    assert_eq!((passed.1, &passed.2), (observed.1, &observed.2));
}

fuzz_target!(|input: &[u8]| {
    if input.len() > MAX_INPUT {
        return;
    }
    let (plan, body) = split_plan(input);
    for api in Api::ALL {
        check(|strip| Meter::new(api, true, strip), plan, body);
    }

    // A JSON body (not SSE) is copied, whatever the cuts and the strip flag.
    let copied = run(
        Meter::new(Api::ChatCompletions, false, true),
        false,
        reads(plan, body),
    );
    let expected = if body.is_empty() {
        Captured::Nothing
    } else {
        Captured::Body {
            bytes: body.to_vec(),
            truncated: false,
        }
    };
    assert_eq!((copied.1, copied.2), (0, expected));
});
