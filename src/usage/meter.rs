//! The meter: watches a response body as it is relayed and keeps just enough to account for it.
//!
//! - JSON bodies: a bounded copy (usage sits near the end of OpenAI responses, so an oversized
//!   body keeps its tail); it is parsed later, on the reporter thread, never on a worker.
//! - SSE bodies: an incremental scanner that finds event boundaries, counts content events and
//!   keeps only the last event that carries `usage`. Events are inspected where they lie in the
//!   relay buffer; only an event split across two reads is carried over.
//! - Strip mode (the gateway asked the backend for usage on the client's behalf): the usage-only
//!   event is metered but not forwarded, so the client sees exactly the events it asked for.

use memchr::memmem;

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
    /// The JSON payload of the last SSE event that carried usage.
    Event(Vec<u8>),
}

pub struct Meter {
    sse: bool,
    strip_usage: bool,
    /// JSON: the body copy. SSE: the incomplete event carried from the previous read.
    carry: Vec<u8>,
    carry_overflow: bool,
    truncated: bool,
    /// The previous payload ended with '\n' (an event boundary may straddle two reads).
    after_newline: bool,
    last_usage: Vec<u8>,
    content_events: u32,
}

impl Meter {
    /// `sse`: the response is `text/event-stream`. `strip_usage`: remove usage-only events from
    /// what the client receives (only honoured for SSE).
    pub fn new(sse: bool, strip_usage: bool) -> Self {
        Meter {
            sse,
            strip_usage: sse && strip_usage,
            carry: Vec::new(),
            carry_overflow: false,
            truncated: false,
            after_newline: false,
            last_usage: Vec::new(),
            content_events: 0,
        }
    }

    pub fn strips(&self) -> bool {
        self.strip_usage
    }

    /// Content events seen so far (SSE `data:` events other than `[DONE]` and usage-only ones).
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
            if self.last_usage.is_empty() {
                Captured::Nothing
            } else {
                Captured::Event(self.last_usage)
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

    fn scan(&mut self, data: &[u8], mut out: Option<&mut Vec<u8>>) {
        let mut start = 0;
        // A boundary split across reads: "...\n" | "\n...".
        if self.after_newline && data.first() == Some(&b'\n') {
            self.carry_event(b"\n", out.as_deref_mut());
            self.finish_carried(out.as_deref_mut());
            start = 1;
        }
        let mut from = start;
        while let Some(end) = next_boundary(data, from) {
            if self.carry.is_empty() && !self.carry_overflow {
                self.event(&data[start..end], out.as_deref_mut());
            } else {
                self.carry_event(&data[start..end], out.as_deref_mut());
                self.finish_carried(out.as_deref_mut());
            }
            start = end;
            from = end;
        }
        if start < data.len() {
            self.carry_event(&data[start..], out);
        }
        self.after_newline = data.last() == Some(&b'\n');
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

    fn finish_carried(&mut self, out: Option<&mut Vec<u8>>) {
        if self.carry_overflow {
            // Already forwarded piece by piece; it still counts.
            self.carry_overflow = false;
            self.content_events += 1;
            return;
        }
        let event = std::mem::take(&mut self.carry);
        self.event(&event, out);
        self.carry = event;
        self.carry.clear();
    }

    /// One complete event, boundary included.
    fn event(&mut self, event: &[u8], out: Option<&mut Vec<u8>>) {
        let payload = data_payload(event);
        let mut forward = true;
        if let Some(json) = payload {
            if json.starts_with(b"[DONE]") {
            } else if let Some(usage_only) = carries_usage(json) {
                self.last_usage.clear();
                self.last_usage.extend_from_slice(json);
                if usage_only {
                    forward = !self.strip_usage;
                } else {
                    self.content_events += 1;
                }
            } else {
                self.content_events += 1;
            }
        }
        if let (Some(out), true) = (out, forward) {
            out.extend_from_slice(event);
        }
    }
}

/// End (exclusive) of the first event boundary ("\n\n" or "\n\r\n") at or after `from`.
fn next_boundary(data: &[u8], from: usize) -> Option<usize> {
    for p in memchr::memchr_iter(b'\n', &data[from..]) {
        let p = from + p;
        match data.get(p + 1) {
            Some(b'\n') => return Some(p + 2),
            Some(b'\r') if data.get(p + 2) == Some(&b'\n') => return Some(p + 3),
            _ => {}
        }
    }
    None
}

/// The JSON after `data:` in an event (first data line), trimmed.
fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let mut rest = event;
    loop {
        let line_end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
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

/// `Some(usage_only)` when the event's JSON has a non-null `usage` object.
fn carries_usage(json: &[u8]) -> Option<bool> {
    let at = memmem::find(json, b"\"usage\"")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn keeps_last_usage_event_across_every_split() {
        for split in 1..STREAM.len() {
            let mut m = Meter::new(true, false);
            m.observe(&STREAM.as_bytes()[..split]);
            m.observe(&STREAM.as_bytes()[split..]);
            assert_eq!(m.content_events(), 3, "split {split}");
            let Captured::Event(e) = m.finish() else {
                panic!("no usage at split {split}")
            };
            assert!(e.starts_with(b"{\"choices\":[],\"usage\""));
        }
    }

    #[test]
    fn strip_mode_removes_only_the_usage_event() {
        let expected = STREAM.replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
            "",
        );
        for split in 1..STREAM.len() {
            let mut m = Meter::new(true, true);
            let mut out = Vec::new();
            m.filter(&STREAM.as_bytes()[..split], &mut out);
            m.filter(&STREAM.as_bytes()[split..], &mut out);
            m.flush(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "split {split}");
            assert!(matches!(m.finish(), Captured::Event(_)));
        }
    }

    #[test]
    fn body_copy_is_bounded_and_keeps_the_tail() {
        let mut m = Meter::new(false, true);
        assert!(!m.strips());
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
}
