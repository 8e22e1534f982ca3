//! The meter: watches a response body as it is relayed and keeps just enough to account for it.
//!
//! - JSON bodies: a bounded copy (usage sits near the end of OpenAI responses, so an oversized
//!   body keeps its tail); it is parsed later, on the reporter thread, never on a worker.
//! - SSE bodies: an incremental scanner that finds event boundaries (blank lines, whatever the
//!   line endings and however reads cut them), counts content events and keeps only the events
//!   that carry usage, as each API reports it: OpenAI chat/completions the last event with
//!   `usage`; Anthropic Messages `message_start` and the last `message_delta` with `usage`;
//!   OpenAI Responses the terminal `response.*` event. The last two are told apart by their
//!   `event:` line. Events are inspected where they lie in the relay buffer; only an event split
//!   across two reads is carried over.
//! - Strip mode (the gateway asked the backend for usage on the client's behalf): the usage-only
//!   event is metered but not forwarded, so the client sees exactly the events it asked for.

use std::sync::LazyLock;

use memchr::memmem::{self, Finder};

use crate::api::Api;

/// Largest non-streaming body copied whole; beyond it only the tail is kept.
const MAX_BODY_COPY: usize = 1 << 20;
const BODY_TAIL: usize = 64 * 1024;
/// Longest SSE event carried across reads; a longer one is counted but not inspected.
const MAX_EVENT: usize = 256 * 1024;

/// What was captured for usage extraction, handed to the reporter thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Captured {
    /// Nothing usable (no body, or not JSON/SSE).
    Nothing,
    /// A non-streaming body; `truncated` when only its tail was kept.
    Body { bytes: Vec<u8>, truncated: bool },
    /// The JSON payload of the SSE event that carried usage: OpenAI chat/completions the last
    /// one with `usage`, Responses the terminal `response.*` event.
    Event(Vec<u8>),
    /// Anthropic Messages: the JSON payloads of `message_start` (input usage) and of the last
    /// `message_delta` that carried `usage` (cumulative output); either may be empty.
    MessageEvents { start: Vec<u8>, delta: Vec<u8> },
}

/// How an API's SSE events report usage and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// OpenAI chat/completions and anything else: `data:` lines only.
    OpenAi,
    /// Anthropic Messages: named events (`event:` lines).
    Messages,
    /// OpenAI Responses: named events (`event:` lines).
    Responses,
}

impl Dialect {
    fn of(api: Api) -> Dialect {
        match api {
            Api::Messages => Dialect::Messages,
            Api::Responses => Dialect::Responses,
            _ => Dialect::OpenAi,
        }
    }
}

pub struct Meter {
    dialect: Dialect,
    sse: bool,
    strip_usage: bool,
    /// JSON: the body copy. SSE: the incomplete event carried from the previous read.
    carry: Vec<u8>,
    carry_overflow: bool,
    truncated: bool,
    /// Where the previous payload left off in the line structure (boundaries straddle reads).
    eol: Eol,
    /// The last event that carried usage (Messages: the last `message_delta` with `usage`).
    last_usage: Vec<u8>,
    /// Messages: the `message_start` event.
    message_start: Vec<u8>,
    content_events: u32,
}

impl Meter {
    /// `api`: the dialect of the response. `sse`: the response is `text/event-stream`.
    /// `strip_usage`: remove usage-only events from what the client receives (only honoured for
    /// SSE of OpenAI chat/completions, the only streams the gateway adds usage to).
    pub fn new(api: Api, sse: bool, strip_usage: bool) -> Self {
        let dialect = Dialect::of(api);
        Meter {
            dialect,
            sse,
            strip_usage: sse && strip_usage && dialect == Dialect::OpenAi,
            carry: Vec::new(),
            carry_overflow: false,
            truncated: false,
            eol: Eol::LineStart,
            last_usage: Vec::new(),
            message_start: Vec::new(),
            content_events: 0,
        }
    }

    /// Content events seen so far: SSE events that carry generated output (non-empty content,
    /// text, reasoning or tool-call arguments); an oversized event, not inspected, counts too.
    pub fn content_events(&self) -> u32 {
        self.content_events
    }

    /// Observes body payload that is forwarded to the client unchanged.
    pub fn observe(&mut self, data: &[u8]) {
        if self.sse {
            self.scan(data, None);
        } else {
            self.copy_body(data);
        }
    }

    /// Strip mode: observes `data` and appends to `out` the complete events to forward. An
    /// incomplete trailing event is held until its end arrives (or [`Meter::flush`]).
    pub fn filter(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.scan(data, Some(out));
    }

    /// Strip mode, at the end of the body: forwards whatever incomplete event is still held.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.carry);
        self.carry.clear();
    }

    pub fn finish(self) -> Captured {
        if self.sse {
            match self.dialect {
                Dialect::Messages
                    if !(self.message_start.is_empty() && self.last_usage.is_empty()) =>
                {
                    Captured::MessageEvents {
                        start: self.message_start,
                        delta: self.last_usage,
                    }
                }
                _ if self.last_usage.is_empty() => Captured::Nothing,
                _ => Captured::Event(self.last_usage),
            }
        } else if self.carry.is_empty() {
            Captured::Nothing
        } else {
            Captured::Body {
                bytes: self.carry,
                truncated: self.truncated,
            }
        }
    }

    fn copy_body(&mut self, data: &[u8]) {
        if self.carry.len() + data.len() > MAX_BODY_COPY {
            self.truncated = true;
            let keep_from = (self.carry.len() + data.len()).saturating_sub(BODY_TAIL);
            if keep_from >= self.carry.len() {
                let skip = keep_from - self.carry.len();
                self.carry.clear();
                self.carry.extend_from_slice(&data[skip..]);
                return;
            }
            self.carry.drain(..keep_from);
        }
        self.carry.extend_from_slice(data);
    }

    /// Finds event ends: a blank line, with lines ended by "\r\n", "\n" or "\r" (the SSE
    /// rules). One memchr2 per line ending; bytes are copied only for an event cut by a read.
    fn scan(&mut self, data: &[u8], mut out: Option<&mut Vec<u8>>) {
        let Some(&first) = data.first() else {
            return;
        };
        // `start`: where the current event's bytes begin in `data` (earlier ones are carried).
        // `line`: where the current line begins, if it begins in `data`.
        let mut start = 0;
        let mut line = match self.eol {
            Eol::MidLine => None,
            Eol::LineStart => Some(0),
            Eol::AfterCr if first == b'\n' => Some(1),
            Eol::AfterCr => Some(0),
            Eol::AfterBoundaryCr { forwarded } if first == b'\n' => {
                // The "\n" of a "\r\n" that ended the previous event goes where that event went.
                if let (Some(out), true) = (out.as_deref_mut(), forwarded) {
                    out.push(b'\n');
                }
                start = 1;
                Some(1)
            }
            Eol::AfterBoundaryCr { .. } => Some(0),
        };
        let mut forwarded = false;
        let mut from = line.unwrap_or(0);
        while let Some(i) = memchr::memchr2(b'\r', b'\n', &data[from..]) {
            let at = from + i;
            let end = if data[at] == b'\r' && data.get(at + 1) == Some(&b'\n') {
                at + 2
            } else {
                at + 1
            };
            if line == Some(at) {
                forwarded = self.complete(&data[start..end], out.as_deref_mut());
                start = end;
            }
            line = Some(end);
            from = end;
        }
        if start < data.len() {
            self.carry_event(&data[start..], out);
        }
        // A '\r' last: the "\n" of a "\r\n" may be the next payload's first byte.
        self.eol = match (line == Some(data.len()), data[data.len() - 1]) {
            (false, _) => Eol::MidLine,
            (true, b'\r') if start == data.len() => Eol::AfterBoundaryCr { forwarded },
            (true, b'\r') => Eol::AfterCr,
            (true, _) => Eol::LineStart,
        };
    }

    /// The end of an event (`tail`, its last bytes, boundary included); whether it was forwarded.
    fn complete(&mut self, tail: &[u8], mut out: Option<&mut Vec<u8>>) -> bool {
        if self.carry.is_empty() && !self.carry_overflow {
            self.event(tail, out)
        } else {
            self.carry_event(tail, out.as_deref_mut());
            self.finish_carried(out)
        }
    }

    /// Holds part of an event until its end arrives. An event longer than [`MAX_EVENT`] is not
    /// held: strip mode forwards it as it comes, uninspected.
    fn carry_event(&mut self, part: &[u8], out: Option<&mut Vec<u8>>) {
        if self.carry_overflow || self.carry.len() + part.len() > MAX_EVENT {
            self.carry_overflow = true;
            if let Some(out) = out {
                out.extend_from_slice(&self.carry);
                out.extend_from_slice(part);
            }
            self.carry.clear();
        } else {
            self.carry.extend_from_slice(part);
        }
    }

    fn finish_carried(&mut self, out: Option<&mut Vec<u8>>) -> bool {
        if self.carry_overflow {
            // Already forwarded piece by piece; it still counts.
            self.carry_overflow = false;
            self.content_events += 1;
            return true;
        }
        let event = std::mem::take(&mut self.carry);
        let forwarded = self.event(&event, out);
        self.carry = event;
        self.carry.clear();
        forwarded
    }

    /// One complete event, boundary included; whether it was forwarded.
    fn event(&mut self, event: &[u8], out: Option<&mut Vec<u8>>) -> bool {
        let forward = match self.dialect {
            Dialect::OpenAi => self.openai_event(event),
            Dialect::Messages => {
                self.messages_event(event);
                true
            }
            Dialect::Responses => {
                self.responses_event(event);
                true
            }
        };
        if let (Some(out), true) = (out, forward) {
            out.extend_from_slice(event);
        }
        forward
    }

    /// Chat/completions: keeps the last event with `usage`; whether to forward it.
    fn openai_event(&mut self, event: &[u8]) -> bool {
        let mut forward = true;
        if let Some(json) = data_payload(event).filter(|j| !j.starts_with(b"[DONE]")) {
            if let Some(usage_only) = carries_usage(json) {
                keep(&mut self.last_usage, json);
                forward = !(usage_only && self.strip_usage);
            }
            if carries_output(json, &*OUTPUT_KEYS) {
                self.content_events += 1;
            }
        }
        forward
    }

    /// Messages: `message_start` has the input usage, each `message_delta` the cumulative
    /// output (so the last one counts), `content_block_delta` the generated output.
    fn messages_event(&mut self, event: &[u8]) {
        let (Some(name), Some(json)) = named_event(event) else {
            return;
        };
        match name {
            b"content_block_delta" if carries_output(json, &*MESSAGES_OUTPUT_KEYS) => {
                self.content_events += 1
            }
            b"message_start" => keep(&mut self.message_start, first_line(json)),
            b"message_delta" if carries_usage(json).is_some() => {
                keep(&mut self.last_usage, first_line(json))
            }
            _ => {}
        }
    }

    /// Responses: usage comes only in the terminal event, inside `response`; output in the
    /// `*.delta` events of text, reasoning, refusals and function-call arguments.
    fn responses_event(&mut self, event: &[u8]) {
        let (Some(name), Some(json)) = named_event(event) else {
            return;
        };
        match name {
            b"response.output_text.delta"
            | b"response.refusal.delta"
            | b"response.reasoning_text.delta"
            | b"response.reasoning_summary_text.delta"
            | b"response.function_call_arguments.delta"
                if carries_output(json, std::slice::from_ref(&*DELTA_KEY)) =>
            {
                self.content_events += 1
            }
            b"response.completed" | b"response.incomplete" | b"response.failed" => {
                keep(&mut self.last_usage, first_line(json))
            }
            _ => {}
        }
    }
}

/// Replaces `kept` with `json`, reusing its allocation.
fn keep(kept: &mut Vec<u8>, json: &[u8]) {
    kept.clear();
    kept.extend_from_slice(json);
}

/// The scanner's position in the line structure at the end of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    /// Inside a line.
    MidLine,
    /// Just after a line ending: the next byte starts a line.
    LineStart,
    /// Just after a '\r' that ended a line of an event still open.
    AfterCr,
    /// Just after a '\r' that ended an event (blank line); `forwarded`: that event was.
    AfterBoundaryCr { forwarded: bool },
}

/// The JSON after `data:` in an event (first data line), trimmed.
fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let mut rest = event;
    loop {
        let line_end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..line_end];
        if let Some(v) = line.strip_prefix(b"data:") {
            return Some(v.trim_ascii());
        }
        if line_end >= rest.len() {
            return None;
        }
        rest = &rest[line_end + 1..];
    }
}

/// The name (`event:` line, trimmed; none means the SSE default, "message") of an event, and
/// what follows its first `data:` up to the event's end: the JSON, then possibly more lines
/// (take [`first_line`] to keep it). Output checks read it as it is: a key search over a line
/// break or two finds the same keys, and sparing a scan of the data line keeps named events as
/// cheap as chat's. vLLM, OpenAI and Anthropic write `event:` then `data:`: that order is read
/// directly, any other in a pass over the lines.
fn named_event(event: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    if let Some(after) = event.strip_prefix(b"event:") {
        let line_end = memchr::memchr2(b'\n', b'\r', after).unwrap_or(after.len());
        let next = &after[line_end..];
        let next = next.strip_prefix(b"\r").unwrap_or(next);
        let next = next.strip_prefix(b"\n").unwrap_or(next);
        if let Some(data) = next.strip_prefix(b"data:") {
            return (Some(after[..line_end].trim_ascii()), Some(data));
        }
    }
    let (mut name, mut data) = (None, None);
    let mut rest = event;
    while !rest.is_empty() {
        let line_end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        if let Some(v) = rest[..line_end].strip_prefix(b"event:") {
            name = Some(v.trim_ascii());
        } else if let (Some(v), None) = (rest.strip_prefix(b"data:"), data) {
            data = Some(v);
        }
        if name.is_some() && data.is_some() {
            break;
        }
        rest = &rest[(line_end + 1).min(rest.len())..];
    }
    (name, data)
}

/// The first line of `data` (as [`named_event`] gives it), trimmed: an event's JSON.
fn first_line(data: &[u8]) -> &[u8] {
    let line_end = memchr::memchr2(b'\n', b'\r', data).unwrap_or(data.len());
    data[..line_end].trim_ascii()
}

/// `Some(usage_only)` when the event's JSON has a non-null `usage` object.
fn carries_usage(json: &[u8]) -> Option<bool> {
    let at = USAGE_KEY.find(json)?;
    let after = json[at + 7..]
        .iter()
        .position(|b| !matches!(b, b' ' | b':' | b'\t'))?;
    if json[at + 7 + after] != b'{' {
        return None;
    }
    let usage_only = memmem::find(json, b"\"choices\":[]").is_some()
        || memmem::find(json, b"\"choices\": []").is_some();
    Some(usage_only)
}

/// Searchers for the keys looked for in every event, built once: building one costs about as
/// much as searching an event of a few hundred bytes.
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
/// `content"` also ends `"reasoning_content"`.
static OUTPUT_KEYS: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| {
    [
        &b"content\""[..],
        b"\"text\"",
        b"\"arguments\"",
        b"\"reasoning\"",
    ]
    .map(Finder::new)
});

/// Messages `content_block_delta`: text, thinking and tool input deltas.
static MESSAGES_OUTPUT_KEYS: LazyLock<[Finder<'static>; 3]> =
    LazyLock::new(|| [&b"\"text\""[..], b"\"thinking\"", b"\"partial_json\""].map(Finder::new));
/// Responses `*.delta` events.
static DELTA_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\""));

/// Whether an event's JSON carries generated output: a non-empty string under one of `keys`
/// (chat: `content`, `reasoning_content`, `reasoning`, `text` or a tool call's `arguments`).
/// Key searches, not a parse; a content token is found by the first key.
fn carries_output(json: &[u8], keys: &[Finder<'static>]) -> bool {
    keys.iter().any(|key| {
        key.find_iter(json)
            .any(|at| non_empty_string_follows(&json[at + key.needle().len()..]))
    })
}

/// `rest` (what follows a key) is `: "` with any spacing, then a string that is not empty.
fn non_empty_string_follows(rest: &[u8]) -> bool {
    match rest.trim_ascii_start().strip_prefix(b":") {
        Some(value) => matches!(value.trim_ascii_start(), [b'"', next, ..] if *next != b'"'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str =
        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    /// Events that carry output in [`stream`] ("hi", " there").
    const CONTENT_EVENTS: u32 = 2;

    /// A stream with `eol` line endings and what strip mode forwards of it: vLLM's role-only
    /// first chunk, content, a comment, an event of two lines, the finish chunk, the usage-only
    /// chunk and `[DONE]`.
    fn stream(eol: &str) -> (String, String) {
        let usage = format!("data: {USAGE}");
        let events = [
            r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}],"usage":null}"#,
            r#"data: {"choices":[{"delta":{"content":"hi"}}]}"#,
            ": keep-alive",
            &format!(r#"id: 7{eol}data: {{"choices":[{{"delta":{{"content":" there"}}}}]}}"#),
            r#"data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            &usage,
            "data: [DONE]",
        ];
        let mut full = String::new();
        let mut stripped = String::new();
        for e in events {
            let event = format!("{e}{eol}{eol}");
            full.push_str(&event);
            if e != usage {
                stripped.push_str(&event);
            }
        }
        (full, stripped)
    }

    /// Feeds `pieces` through a fresh meter, as the relay does per read (strip mode: filter,
    /// then flush at the end). Returns what was forwarded, the content events and the capture.
    fn run<'a>(strip: bool, pieces: impl Iterator<Item = &'a [u8]>) -> (String, u32, Captured) {
        let mut m = Meter::new(Api::ChatCompletions, true, strip);
        let mut out = Vec::new();
        for p in pieces {
            if strip {
                m.filter(p, &mut out);
            } else {
                m.observe(p);
            }
        }
        if strip {
            m.flush(&mut out);
        }
        let events = m.content_events();
        (String::from_utf8(out).unwrap(), events, m.finish())
    }

    /// Every way of cutting `input` the tests try, named: at each single position, and into
    /// pieces of 1, 2 and 3 bytes starting at every offset.
    fn cuts(input: &[u8]) -> Vec<(String, Vec<&[u8]>)> {
        let mut all: Vec<_> = (0..=input.len())
            .map(|at| (format!("cut at {at}"), vec![&input[..at], &input[at..]]))
            .collect();
        for size in 1..=3 {
            for offset in 0..size {
                let (head, rest) = input.split_at(offset);
                let pieces = std::iter::once(head).chain(rest.chunks(size)).collect();
                all.push((format!("{size}-byte pieces after {offset}"), pieces));
            }
        }
        all
    }

    #[test]
    fn every_line_ending_and_every_cut_meters_and_strips_alike() {
        for eol in ["\n", "\r\n", "\r"] {
            let (full, stripped) = stream(eol);
            let usage = Captured::Event(USAGE.as_bytes().to_vec());
            for (cut, pieces) in cuts(full.as_bytes()) {
                let (out, events, captured) = run(false, pieces.iter().copied());
                assert_eq!(out, "");
                assert_eq!(events, CONTENT_EVENTS, "observe {eol:?} {cut}");
                assert_eq!(captured, usage, "observe {eol:?} {cut}");
                let (out, events, captured) = run(true, pieces.into_iter());
                assert_eq!(out, stripped, "strip {eol:?} {cut}");
                assert_eq!(events, CONTENT_EVENTS, "strip {eol:?} {cut}");
                assert_eq!(captured, usage, "strip {eol:?} {cut}");
            }
        }
    }

    #[test]
    fn flush_forwards_an_unterminated_event_unchanged() {
        let mut m = Meter::new(Api::ChatCompletions, true, true);
        let mut out = Vec::new();
        m.filter(b"data: [DONE]\r\n\r\ndata: {\"x\"", &mut out);
        assert_eq!(out, b"data: [DONE]\r\n\r\n");
        m.filter(b":1}\r\n", &mut out);
        m.flush(&mut out);
        assert_eq!(out, b"data: [DONE]\r\n\r\ndata: {\"x\":1}\r\n");
        assert_eq!(
            m.content_events(),
            0,
            "an unterminated event is not an event"
        );
    }

    #[test]
    fn only_events_with_generated_output_count() {
        let output = [
            r#"{"choices":[{"delta":{"content":"hi"}}]}"#,
            r#"{"choices": [{"delta": {"role": "assistant", "content": " "}}]}"#,
            r#"{"choices":[{"delta":{"content":"\""}}]}"#,
            r#"{"choices":[{"index":0,"text":" once"}]}"#,
            r#"{"choices":[{"delta":{"content":"","reasoning_content":"hmm"}}]}"#,
            r#"{"choices":[{"delta":{"reasoning":"hmm"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a"}}]}}]}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}"#,
        ];
        let none = [
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices": [{"delta": {"role": "assistant", "content": ""}}]}"#,
            r#"{"choices":[{"delta":{"content":null,"reasoning_content":null}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"c","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens_details":{"reasoning_tokens":0}}}"#,
        ];
        for (json, counted) in output
            .iter()
            .map(|j| (j, 1))
            .chain(none.iter().map(|j| (j, 0)))
        {
            let mut m = Meter::new(Api::ChatCompletions, true, false);
            m.observe(format!("data: {json}\n\n").as_bytes());
            assert_eq!(m.content_events(), counted, "{json}");
        }
    }

    #[test]
    fn an_oversized_event_is_forwarded_whole_and_counted() {
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\r\n\r\n",
            "y".repeat(MAX_EVENT)
        );
        let full = format!("{big}data: [DONE]\r\n\r\n");
        for size in [4096, 65536] {
            let (out, events, captured) = run(true, full.as_bytes().chunks(size));
            assert!(out == full, "{size}-byte pieces");
            assert_eq!((events, captured), (1, Captured::Nothing));
        }
    }

    #[test]
    fn body_copy_is_bounded_and_keeps_the_tail() {
        let mut m = Meter::new(Api::ChatCompletions, false, true);
        for _ in 0..40 {
            m.observe(&[b'x'; 64 * 1024]);
        }
        m.observe(b"\"usage\":{}}");
        let Captured::Body { bytes, truncated } = m.finish() else {
            panic!()
        };
        assert!(truncated);
        assert!(bytes.len() <= MAX_BODY_COPY);
        assert!(bytes.ends_with(b"\"usage\":{}}"));
    }

    /// A Messages stream as vLLM sends it (`event:` before `data:`), with a `ping`, a comment,
    /// an `id:` line, a thinking and a tool-input delta, one with `data:` before `event:`, an
    /// empty text delta, and `message_delta`s with and without usage (the last with it counts).
    /// Returns the stream and its two kept payloads.
    fn messages_stream(eol: &str) -> (String, String, String) {
        let start = r#"{"type":"message_start","message":{"id":"m","content":[],"model":"x","usage":{"input_tokens":9,"cache_read_input_tokens":4,"output_tokens":1}}}"#;
        let last_delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}"#;
        let events = [
            format!("event: message_start{eol}data: {start}"),
            format!(
                r#"event: content_block_start{eol}data: {{"type":"content_block_start","index":0,"content_block":{{"type":"text","text":""}}}}"#
            ),
            format!(r#"event: ping{eol}data: {{"type": "ping"}}"#),
            format!(
                r#"event: content_block_delta{eol}data: {{"type":"content_block_delta","delta":{{"type":"text_delta","text":"hi"}},"index":0}}"#
            ),
            ": keep-alive".to_string(),
            format!(
                r#"id: 3{eol}event: content_block_delta{eol}data: {{"type":"content_block_delta","delta":{{"type":"thinking_delta","thinking":"hm"}},"index":0}}"#
            ),
            format!(
                r#"event: content_block_delta{eol}data: {{"type":"content_block_delta","delta":{{"type":"input_json_delta","partial_json":"{{\"a"}},"index":1}}"#
            ),
            format!(
                r#"data: {{"type":"content_block_delta","delta":{{"type":"text_delta","text":"x"}},"index":0}}{eol}event: content_block_delta"#
            ),
            format!(
                r#"event: content_block_delta{eol}data: {{"type":"content_block_delta","delta":{{"type":"text_delta","text":""}},"index":0}}"#
            ),
            format!(
                r#"event: message_delta{eol}data: {{"type":"message_delta","delta":{{}},"usage":{{"output_tokens":2}}}}"#
            ),
            format!(
                r#"event: message_delta{eol}data: {{"type":"message_delta","delta":{{"stop_reason":null}}}}"#
            ),
            format!("event: message_delta{eol}data: {last_delta}"),
            format!(r#"event: message_stop{eol}data: {{"type":"message_stop"}}"#),
        ];
        let stream = events.iter().map(|e| format!("{e}{eol}{eol}")).collect();
        (stream, start.into(), last_delta.into())
    }

    /// A Responses stream: lifecycle events, text, reasoning and argument deltas (one empty),
    /// and the terminal `response.completed`, whose payload is returned with the stream.
    fn responses_stream(eol: &str) -> (String, String) {
        let done = r#"{"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":2},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":10}},"sequence_number":9,"type":"response.completed"}"#;
        let delta = |name: &str, d: &str| {
            format!(
                r#"event: {name}{eol}data: {{"delta":"{d}","item_id":"i","output_index":0,"type":"{name}"}}"#
            )
        };
        let events = [
            format!(
                r#"event: response.created{eol}data: {{"response":{{"id":"resp_1","status":"in_progress","usage":null}},"type":"response.created"}}"#
            ),
            delta("response.reasoning_text.delta", "hm"),
            delta("response.output_text.delta", "hi"),
            ": keep-alive".to_string(),
            delta("response.output_text.delta", ""),
            delta("response.reasoning_summary_text.delta", "so"),
            delta("response.function_call_arguments.delta", "{\\\"a"),
            format!(
                r#"event: response.output_text.done{eol}data: {{"text":"hi","type":"response.output_text.done"}}"#
            ),
            format!("event: response.completed{eol}data: {done}"),
        ];
        let stream = events.iter().map(|e| format!("{e}{eol}{eol}")).collect();
        (stream, done.into())
    }

    /// Feeds `pieces` to a fresh meter of `api` as the relay does without strip mode.
    fn observe_all<'a>(api: Api, pieces: impl Iterator<Item = &'a [u8]>) -> (u32, Captured) {
        let mut m = Meter::new(api, true, true);
        for p in pieces {
            m.observe(p);
        }
        (m.content_events(), m.finish())
    }

    #[test]
    fn messages_streams_keep_message_start_and_the_last_message_delta_at_every_cut() {
        for eol in ["\n", "\r\n", "\r"] {
            let (stream, start, delta) = messages_stream(eol);
            let expected = Captured::MessageEvents {
                start: start.into_bytes(),
                delta: delta.into_bytes(),
            };
            for (cut, pieces) in cuts(stream.as_bytes()) {
                let (events, captured) = observe_all(Api::Messages, pieces.into_iter());
                assert_eq!(events, 4, "{eol:?} {cut}");
                assert_eq!(captured, expected, "{eol:?} {cut}");
            }
        }
    }

    #[test]
    fn responses_streams_keep_the_terminal_event_at_every_cut() {
        for eol in ["\n", "\r\n", "\r"] {
            let (stream, done) = responses_stream(eol);
            for (cut, pieces) in cuts(stream.as_bytes()) {
                let (events, captured) = observe_all(Api::Responses, pieces.into_iter());
                assert_eq!(events, 4, "{eol:?} {cut}");
                assert_eq!(
                    captured,
                    Captured::Event(done.clone().into_bytes()),
                    "{eol:?} {cut}"
                );
            }
        }
    }

    #[test]
    fn named_dialects_are_never_stripped_and_chat_events_mean_nothing_to_them() {
        let (responses, _) = responses_stream("\n");
        let mut m = Meter::new(Api::Responses, true, true);
        let mut out = Vec::new();
        m.filter(responses.as_bytes(), &mut out);
        m.flush(&mut out);
        assert_eq!(out, responses.as_bytes());
        // A chat stream relayed on a Messages path: no named events, nothing kept.
        let (chat, _) = stream("\n");
        let (events, captured) = observe_all(Api::Messages, std::iter::once(chat.as_bytes()));
        assert_eq!((events, captured), (0, Captured::Nothing));
        let (messages, ..) = messages_stream("\n");
        let cut = messages.find("event: message_delta").unwrap();
        let (_, captured) =
            observe_all(Api::Messages, std::iter::once(&messages.as_bytes()[..cut]));
        let Captured::MessageEvents { start, delta } = captured else {
            panic!("{captured:?}")
        };
        assert!(start.starts_with(b"{\"type\":\"message_start\"") && delta.is_empty());
    }
}
