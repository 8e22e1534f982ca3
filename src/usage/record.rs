//! The billing record: bills a worker's [`UsageEvent`] ([`Billed`]: token counts parsed from the
//! captured body or SSE events in the dialect of its API, estimated from that dialect's output
//! when the backend reported none) and shows it as a
//! [`Record`] (key masked; timestamp in RFC 3339 UTC). Runs on the reporter thread only; it must
//! not do I/O.

use memchr::memmem;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Captured, Outcome, UsageEvent, CLIENT_CLOSED};
use crate::api::Api;
use crate::time::Rfc3339;

/// One request's usage, as spooled and delivered, over its string type: the ingest thread
/// serializes a `Record<&str>` borrowed from the event ([`Accounted::record`]), sinks parse the
/// spooled JSON back into a [`UsageRecord`]. One definition, so both have the same JSON. Field
/// names are the wire names (webhook JSON, SQL columns); the seed README's webhook fields are all
/// here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<S> {
    /// The gateway's id: unique per request (the idempotency key of every delivery).
    pub request_id: S,
    /// The client's `X-Request-Id`, when it sent one (it is what the client saw echoed).
    pub client_request_id: Option<S>,
    /// RFC 3339 UTC, millisecond precision: when the request started.
    pub timestamp: S,
    /// The client key's configured name.
    pub key_name: Option<S>,
    pub user_id: Option<S>,
    /// Masked (`sk-te...001`) unless `include_raw_key`.
    pub api_key: Option<S>,
    pub model: Option<S>,
    pub endpoint: S,
    /// The API (dialect) of the endpoint, [`Api::as_str`]. Empty in records spooled by a version
    /// that predates it.
    #[serde(default)]
    pub api: S,
    pub is_stream: bool,
    pub backend_url: S,
    /// The backend's spillover tier (`backends[].tier`); 0 in records spooled before tiers.
    #[serde(default)]
    pub tier: u8,
    pub status_code: u16,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    /// No usage from the backend: completion = stream events with output (JSON: output
    /// characters / 4, rounded up), prompt = request bytes / 4.
    pub usage_estimated: bool,
    /// "ok" | "cancelled" | "error".
    pub status: S,
}

/// A record that owns its strings: what the spool gives back to the sinks.
pub type UsageRecord = Record<String>;

/// Token counts as the record bills them (OpenAI's terms; other dialects are mapped to them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub cached: u64,
    pub reasoning: u64,
}

/// OpenAI chat/completions/embeddings usage. `prompt_tokens` is required: a `usage` without it
/// is another API's (Responses' `input_tokens`, say), not a zero.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<RawUsage>,
}

impl From<RawUsage> for Tokens {
    fn from(u: RawUsage) -> Self {
        Tokens {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
            total: u
                .total_tokens
                .unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens)),
            cached: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// Anthropic Messages usage. `input_tokens` excludes the tokens read from or written to the
/// prompt cache, which Anthropic reports beside it.
#[derive(Deserialize, Default)]
struct MessagesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl MessagesUsage {
    /// `later` over `self`, field by field: what a `message_delta` reports replaces what
    /// `message_start` did (its counts are cumulative), absent or null fields do not.
    fn updated(self, later: MessagesUsage) -> MessagesUsage {
        MessagesUsage {
            input_tokens: later.input_tokens.or(self.input_tokens),
            output_tokens: later.output_tokens.or(self.output_tokens),
            cache_read_input_tokens: later
                .cache_read_input_tokens
                .or(self.cache_read_input_tokens),
            cache_creation_input_tokens: later
                .cache_creation_input_tokens
                .or(self.cache_creation_input_tokens),
        }
    }

    /// The whole prompt: uncached input, cache reads and cache writes.
    fn prompt(&self) -> u64 {
        // Saturating: the counts are the backend's, and a sum must not wrap.
        self.input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
    }

    /// The tokens billed; none unless both input and output were reported (an empty or partial
    /// usage is not a zero).
    fn tokens(&self) -> Option<Tokens> {
        let (prompt, completion) = (self.prompt(), self.output_tokens?);
        self.input_tokens?;
        Some(Tokens {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            cached: self.cache_read_input_tokens.unwrap_or(0),
            reasoning: 0,
        })
    }
}

#[derive(Deserialize)]
struct WithMessagesUsage {
    usage: Option<MessagesUsage>,
}

/// `message_start`'s payload.
#[derive(Deserialize)]
struct MessageStart {
    message: WithMessagesUsage,
}

/// OpenAI Responses usage; both counts required, as for chat.
#[derive(Deserialize)]
struct ResponsesUsage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: Option<u64>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

impl From<ResponsesUsage> for Tokens {
    fn from(u: ResponsesUsage) -> Self {
        Tokens {
            prompt: u.input_tokens,
            completion: u.output_tokens,
            total: u
                .total_tokens
                .unwrap_or(u.input_tokens.saturating_add(u.output_tokens)),
            cached: u
                .input_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning: u
                .output_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct WithResponsesUsage {
    usage: Option<ResponsesUsage>,
}

/// A terminal Responses event's payload: the response, with its usage.
#[derive(Deserialize)]
struct ResponsesTerminal {
    response: WithResponsesUsage,
}

/// The usage the backend reported for a response of `api`, if any. A Messages stream without a
/// `message_delta` that carries usage has not reported its output: none.
pub fn parse_usage(api: Api, captured: &Captured) -> Option<Tokens> {
    match (api, captured) {
        (_, Captured::Nothing) => None,
        (Api::Messages, Captured::MessageEvents { start, delta }) => {
            let delta = serde_json::from_slice::<WithMessagesUsage>(delta)
                .ok()?
                .usage?;
            let start = serde_json::from_slice::<MessageStart>(start)
                .ok()
                .and_then(|s| s.message.usage)
                .unwrap_or_default();
            start.updated(delta).tokens()
        }
        (Api::Messages, Captured::Body { bytes, truncated }) => {
            body_usage::<WithMessagesUsage, MessagesUsage>(bytes, *truncated, |b| b.usage)?.tokens()
        }
        (Api::Responses, Captured::Event(json)) => {
            let terminal = serde_json::from_slice::<ResponsesTerminal>(json).ok()?;
            terminal.response.usage.map(Tokens::from)
        }
        (Api::Responses, Captured::Body { bytes, truncated }) => {
            body_usage::<WithResponsesUsage, ResponsesUsage>(bytes, *truncated, |b| b.usage)
                .map(Tokens::from)
        }
        (_, Captured::Event(json)) => serde_json::from_slice::<WithUsage>(json)
            .ok()?
            .usage
            .map(Tokens::from),
        (_, Captured::Body { bytes, truncated }) => {
            body_usage::<WithUsage, RawUsage>(bytes, *truncated, |b| b.usage).map(Tokens::from)
        }
        (_, Captured::MessageEvents { .. }) => None,
    }
}

/// The top-level `usage` of a JSON body (`B`, read with `usage`); of a body whose head was cut
/// off, the value of its last `"usage"` key.
fn body_usage<B: DeserializeOwned, U: DeserializeOwned>(
    bytes: &[u8],
    truncated: bool,
    usage: impl FnOnce(B) -> Option<U>,
) -> Option<U> {
    if truncated {
        usage_in_tail(bytes)
    } else {
        usage(serde_json::from_slice::<B>(bytes).ok()?)
    }
}

/// A body whose head was cut off: parse just the value of its last `"usage"` key. The stream
/// deserializer reads one value and ignores what follows it (the rest of the enclosing object).
fn usage_in_tail<U: DeserializeOwned>(bytes: &[u8]) -> Option<U> {
    let at = memmem::rfind(bytes, b"\"usage\"")?;
    let rest = &bytes[at + 7..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<U>();
    values.next()?.ok()
}

/// A response body's generated text: what a non-streaming estimate counts.
#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    choices: Vec<OutputChoice>,
}

#[derive(Deserialize)]
struct OutputChoice {
    message: Option<OutputMessage>,
    /// Completions.
    text: Option<String>,
}

#[derive(Deserialize)]
struct OutputMessage {
    content: Option<String>,
    reasoning_content: Option<String>,
    /// Newer vLLM's name for `reasoning_content`; one of the two is counted.
    reasoning: Option<String>,
    tool_calls: Option<Vec<OutputToolCall>>,
}

#[derive(Deserialize)]
struct OutputToolCall {
    function: Option<OutputFunction>,
}

#[derive(Deserialize)]
struct OutputFunction {
    arguments: Option<String>,
}

/// Anthropic Messages output: `content` blocks.
#[derive(Deserialize)]
struct MessagesOutput {
    #[serde(default)]
    content: Vec<MessagesBlock>,
}

#[derive(Deserialize)]
struct MessagesBlock {
    text: Option<String>,
    thinking: Option<String>,
    /// A `tool_use` block's arguments.
    input: Option<serde_json::Value>,
}

/// OpenAI Responses output: `output` items (messages, reasoning, function calls).
#[derive(Deserialize)]
struct ResponsesOutput {
    #[serde(default)]
    output: Vec<ResponsesItem>,
}

#[derive(Deserialize)]
struct ResponsesItem {
    /// Messages' `output_text` (and `refusal`) parts, reasoning's `reasoning_text` parts.
    content: Option<Vec<ResponsesText>>,
    /// Reasoning summaries.
    summary: Option<Vec<ResponsesText>>,
    /// Function calls.
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ResponsesText {
    text: Option<String>,
    refusal: Option<String>,
}

/// The completion estimate of a body of `api` without usage: the characters of its output
/// (text, reasoning, tool-call arguments) / 4, rounded up. 0 if it does not parse.
fn output_tokens_estimate(api: Api, body: &[u8]) -> u64 {
    let chars = match api {
        Api::Messages => serde_json::from_slice::<MessagesOutput>(body).map(|o| {
            o.content
                .iter()
                .map(|b| {
                    chars(b.text.as_ref())
                        + chars(b.thinking.as_ref())
                        + b.input
                            .as_ref()
                            .map_or(0, |i| i.to_string().chars().count())
                })
                .sum()
        }),
        Api::Responses => serde_json::from_slice::<ResponsesOutput>(body).map(|o| {
            let texts = |t: &Option<Vec<ResponsesText>>| -> usize {
                t.iter()
                    .flatten()
                    .map(|t| chars(t.text.as_ref()) + chars(t.refusal.as_ref()))
                    .sum()
            };
            o.output
                .iter()
                .map(|i| texts(&i.content) + texts(&i.summary) + chars(i.arguments.as_ref()))
                .sum()
        }),
        _ => serde_json::from_slice::<Output>(body)
            .map(|o| o.choices.iter().map(OutputChoice::chars).sum()),
    };
    (chars.unwrap_or(0) as u64).div_ceil(4)
}

fn chars(s: Option<&String>) -> usize {
    s.map_or(0, |s| s.chars().count())
}

impl OutputChoice {
    fn chars(&self) -> usize {
        chars(self.text.as_ref()) + self.message.as_ref().map_or(0, OutputMessage::chars)
    }
}

impl OutputMessage {
    fn chars(&self) -> usize {
        let arguments = self
            .tool_calls
            .iter()
            .flatten()
            .filter_map(|t| t.function.as_ref())
            .map(|f| chars(f.arguments.as_ref()));
        chars(self.content.as_ref())
            + chars(self.reasoning_content.as_ref().or(self.reasoning.as_ref()))
            + arguments.sum::<usize>()
    }
}

/// What a request is billed: its tokens (reported, or estimated), and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Billed {
    pub tokens: Tokens,
    pub estimated: bool,
    pub outcome: Outcome,
}

impl Billed {
    pub fn of(event: &UsageEvent) -> Billed {
        // A backend that answered with an error generated nothing billable, whatever its body
        // says. 499 is no answer at all (the client left first), not an error answer.
        let refused =
            event.status_code != CLIENT_CLOSED && !(200..300).contains(&event.status_code);
        let (usage, outcome) = if refused {
            (Some(Tokens::default()), Outcome::Failed)
        } else {
            (parse_usage(event.api, &event.captured), event.outcome)
        };
        let (tokens, estimated) = match usage {
            Some(t) => (t, false),
            None => {
                let prompt = reported_prompt(&event.captured).unwrap_or(event.request_bytes / 4);
                let completion = match &event.captured {
                    Captured::Body {
                        bytes,
                        truncated: false,
                    } => output_tokens_estimate(event.api, bytes),
                    _ => u64::from(event.content_events),
                };
                let t = Tokens {
                    prompt,
                    completion,
                    total: prompt + completion,
                    ..Tokens::default()
                };
                (t, true)
            }
        };
        Billed {
            tokens,
            estimated,
            outcome,
        }
    }
}

/// The prompt a stream reported before it stopped short of its usage: a Messages stream's
/// `message_start` (the output is only known from the last `message_delta`).
fn reported_prompt(captured: &Captured) -> Option<u64> {
    let Captured::MessageEvents { start, .. } = captured else {
        return None;
    };
    let usage = serde_json::from_slice::<MessageStart>(start)
        .ok()?
        .message
        .usage?;
    usage.input_tokens.map(|_| usage.prompt())
}

/// An event as the ingest thread holds it until its batch is spooled: billed, and timestamped
/// once. Its record borrows from it: no string is copied per record.
#[derive(Debug)]
pub struct Accounted {
    pub event: UsageEvent,
    pub billed: Billed,
    timestamp: Rfc3339,
}

impl Accounted {
    /// `event`, billed as `billed` ([`Billed::of`] the same event).
    pub fn new(event: UsageEvent, billed: Billed) -> Accounted {
        let timestamp = Rfc3339::new(event.started_at);
        Accounted {
            event,
            billed,
            timestamp,
        }
    }

    pub fn record(&self, include_raw_key: bool) -> Record<&str> {
        let Accounted {
            event,
            billed,
            timestamp,
        } = self;
        let key = event.key.as_deref();
        let api_key = key.map(|k| {
            if include_raw_key {
                k.api_key.as_str()
            } else {
                k.masked_key()
            }
        });
        Record {
            request_id: &event.request_id,
            client_request_id: event.client_request_id.as_deref(),
            timestamp: timestamp.as_str(),
            key_name: key.map(|k| k.name.as_str()),
            user_id: key.and_then(|k| k.user_id.as_deref()),
            api_key,
            model: event.model.as_deref(),
            endpoint: &event.endpoint,
            api: event.api.as_str(),
            is_stream: event.is_stream,
            backend_url: &event.backend_url,
            tier: event.tier,
            status_code: event.status_code,
            latency_ms: event.latency.as_millis() as u64,
            ttft_ms: event.ttft.map(|t| t.as_millis() as u64),
            prompt_tokens: billed.tokens.prompt,
            completion_tokens: billed.tokens.completion,
            total_tokens: billed.tokens.total,
            cached_tokens: billed.tokens.cached,
            reasoning_tokens: billed.tokens.reasoning,
            usage_estimated: billed.estimated,
            status: billed.outcome.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::mask_key;
    use crate::time::civil_from_days;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn event(status_code: u16, captured: Captured, content_events: u32) -> UsageEvent {
        UsageEvent {
            request_id: "r".into(),
            client_request_id: None,
            started_at: UNIX_EPOCH,
            key: None,
            model: None,
            endpoint: "/v1/chat/completions".into(),
            api: Api::ChatCompletions,
            is_stream: false,
            backend_url: Arc::from("http://b"),
            tier: 0,
            status_code,
            latency: Duration::ZERO,
            ttft: None,
            outcome: Outcome::Completed,
            captured,
            content_events,
            request_bytes: 40,
            fair_share_charged: 0.0,
        }
    }

    fn accounted(event: UsageEvent) -> Accounted {
        let billed = Billed::of(&event);
        Accounted::new(event, billed)
    }

    fn body(json: &str) -> Captured {
        Captured::Body {
            bytes: json.as_bytes().to_vec(),
            truncated: false,
        }
    }

    #[test]
    fn a_body_without_usage_is_estimated_from_its_output_text() {
        let cases = [
            // 25 characters: 7 tokens (rounded up).
            (
                r#"{"choices":[{"message":{"role":"assistant","content":"Hello world, how are you?"}}]}"#,
                7,
            ),
            // Characters, not bytes: 8 of them, 12 bytes.
            (r#"{"choices":[{"message":{"content":"héllo wö"}}]}"#, 2),
            // Reasoning and tool-call arguments are output too; `null`s are none.
            (
                r#"{"choices":[{"message":{"content":null,"reasoning_content":"abcd","tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
                3,
            ),
            // Completions: every choice's text.
            (r#"{"choices":[{"text":"once upon"},{"text":" a"}]}"#, 3),
            (
                r#"{"choices":[{"message":{"content":""}}],"usage":null}"#,
                0,
            ),
        ];
        for (json, completion) in cases {
            let a = accounted(event(200, body(json), 0));
            let r = a.record(false);
            assert!(r.usage_estimated, "{json}");
            assert_eq!(r.prompt_tokens, 10, "{json}");
            assert_eq!(r.completion_tokens, completion, "{json}");
            assert_eq!(r.total_tokens, 10 + completion, "{json}");
        }
        // Streams are estimated from the events the meter counted.
        let a = accounted(event(200, Captured::Nothing, 4));
        let r = a.record(false);
        assert_eq!((r.completion_tokens, r.usage_estimated), (4, true));
    }

    #[test]
    fn a_non_2xx_answer_bills_nothing_and_is_an_error() {
        let with_usage =
            r#"{"error":{"message":"x"},"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
        for status_code in [400, 404, 429, 500, 503] {
            let captured = [
                body(r#"{"object":"error","message":"upstream says no","code":400}"#),
                body(with_usage),
                Captured::Nothing,
            ];
            for captured in captured {
                let a = accounted(event(status_code, captured, 3));
                let r = a.record(false);
                assert_eq!(r.status, "error");
                assert_eq!(r.status_code, status_code);
                assert!(!r.usage_estimated);
                let tokens = [r.prompt_tokens, r.completion_tokens, r.total_tokens];
                assert_eq!(tokens, [0; 3], "{status_code}");
            }
        }
        let ok = accounted(event(200, body(with_usage), 0));
        let ok = ok.record(false);
        assert_eq!((ok.status, ok.total_tokens), ("ok", 10));
    }

    /// The record built the plain way (a `String` per field, the key masked and the time
    /// formatted per request): the reference that the borrowed record's spooled JSON must match
    /// byte for byte.
    fn owned_record(event: &UsageEvent, include_raw_key: bool) -> UsageRecord {
        let Billed {
            tokens,
            estimated,
            outcome,
        } = Billed::of(event);
        let (key_name, user_id, api_key) = match &event.key {
            Some(k) => {
                let shown = if include_raw_key {
                    k.api_key.clone()
                } else {
                    mask_key(&k.api_key)
                };
                (Some(k.name.clone()), k.user_id.clone(), Some(shown))
            }
            None => (None, None, None),
        };
        let since = event
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        let timestamp = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since.subsec_millis()
        );
        UsageRecord {
            request_id: event.request_id.clone(),
            client_request_id: event.client_request_id.clone(),
            timestamp,
            key_name,
            user_id,
            api_key,
            model: event.model.clone(),
            endpoint: event.endpoint.clone(),
            api: event.api.as_str().to_string(),
            is_stream: event.is_stream,
            backend_url: event.backend_url.to_string(),
            tier: event.tier,
            status_code: event.status_code,
            latency_ms: event.latency.as_millis() as u64,
            ttft_ms: event.ttft.map(|t| t.as_millis() as u64),
            prompt_tokens: tokens.prompt,
            completion_tokens: tokens.completion,
            total_tokens: tokens.total,
            cached_tokens: tokens.cached,
            reasoning_tokens: tokens.reasoning,
            usage_estimated: estimated,
            status: outcome.as_str().to_string(),
        }
    }

    #[test]
    fn spooled_json_is_the_owned_records_json() {
        let awkward = "q\"uo\\te \u{1}\u{1f}\n\t\u{7f} é 😀 \u{2028}</script>";
        let key = |name: &str, user: Option<&str>, api_key: &str| {
            Some(Arc::new(super::super::KeyRef::new(
                name.into(),
                user.map(Into::into),
                api_key.into(),
            )))
        };
        let usage = br#"{"usage":{"prompt_tokens":7,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let mut events = vec![
            // Nothing optional, nothing reported: estimated, cancelled before any answer.
            UsageEvent {
                outcome: Outcome::Cancelled,
                ..event(CLIENT_CLOSED, Captured::Nothing, 3)
            },
            UsageEvent {
                request_id: format!("id-{awkward}"),
                client_request_id: Some(awkward.into()),
                started_at: UNIX_EPOCH + Duration::from_millis(1_768_386_600_123),
                key: key(awkward, Some(awkward), &format!("sk-{awkward}")),
                model: Some(format!("meta-llama/{awkward}")),
                is_stream: true,
                backend_url: Arc::from(format!("http://b/{awkward}")),
                tier: 0,
                latency: Duration::from_micros(812_999),
                ttft: Some(Duration::from_millis(95)),
                ..event(200, Captured::Event(usage.to_vec()), 9)
            },
            // A short key (masked entirely), no user; a key whose ends are multi-byte.
            UsageEvent {
                key: key("k", None, "sk-short"),
                started_at: UNIX_EPOCH + Duration::from_secs(951_782_400),
                ..event(200, body(r#"{"choices":[{"text":"four"}]}"#), 0)
            },
            UsageEvent {
                key: key("ключ", Some(""), "ключ-очень-длинный-ключ"),
                // Before the epoch.
                started_at: UNIX_EPOCH - Duration::from_secs(5),
                ..event(503, body(std::str::from_utf8(usage).unwrap()), 0)
            },
            // Past the year 9999.
            UsageEvent {
                started_at: UNIX_EPOCH + Duration::from_secs(400_000_000_000),
                model: Some(String::new()),
                ..event(200, Captured::Nothing, 0)
            },
        ];
        events.extend((0..3).map(|i| UsageEvent {
            request_id: format!("req-{i}"),
            key: key("team-a", Some("user_alice"), "sk-test-key-001"),
            ..event(200, Captured::Event(usage.to_vec()), 0)
        }));

        let dir = std::env::temp_dir().join(format!("llmproxy-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut spool = crate::usage::Spool::open(&dir.join("usage.db")).unwrap();
        let batch: Vec<Accounted> = events.into_iter().map(accounted).collect();
        for (n, include_raw_key) in [false, true].into_iter().enumerate() {
            let records: Vec<Record<&str>> =
                batch.iter().map(|a| a.record(include_raw_key)).collect();
            spool.insert(&records).unwrap();
            let rows = spool.pending("test", 1000).unwrap();
            let rows = &rows[n * batch.len()..];
            assert_eq!(rows.len(), batch.len());
            for (row, a) in rows.iter().zip(&batch) {
                let owned = owned_record(&a.event, include_raw_key);
                assert_eq!(row.json, serde_json::to_string(&owned).unwrap());
                assert_eq!(row.record().unwrap(), owned);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_body_event_and_truncated_tail() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let full = Captured::Body {
            bytes: body.to_vec(),
            truncated: false,
        };
        let expected = Tokens {
            prompt: 7,
            completion: 5,
            total: 12,
            cached: 3,
            reasoning: 2,
        };
        assert_eq!(parse_usage(Api::ChatCompletions, &full), Some(expected));
        let tail = Captured::Body {
            bytes: body[20..].to_vec(),
            truncated: true,
        };
        assert_eq!(parse_usage(Api::ChatCompletions, &tail), Some(expected));
        let event = Captured::Event(
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec(),
        );
        assert_eq!(
            parse_usage(Api::ChatCompletions, &event),
            Some(Tokens {
                prompt: 1,
                completion: 2,
                total: 3,
                ..Tokens::default()
            })
        );
        let null = Captured::Body {
            bytes: br#"{"usage":null}"#.to_vec(),
            truncated: false,
        };
        assert_eq!(parse_usage(Api::ChatCompletions, &null), None);
        assert_eq!(parse_usage(Api::ChatCompletions, &Captured::Nothing), None);
    }

    fn dialect_event(api: Api, captured: Captured, content_events: u32) -> UsageEvent {
        UsageEvent {
            api,
            ..event(200, captured, content_events)
        }
    }

    #[test]
    fn messages_usage_maps_cache_reads_and_writes_into_the_prompt() {
        let tokens = |prompt, completion, cached| Tokens {
            prompt,
            completion,
            total: prompt + completion,
            cached,
            reasoning: 0,
        };
        let json = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"cache_read_input_tokens":30,"cache_creation_input_tokens":5,"output_tokens":7}}"#;
        let full = body(std::str::from_utf8(json).unwrap());
        assert_eq!(parse_usage(Api::Messages, &full), Some(tokens(45, 7, 30)));
        let tail = Captured::Body {
            bytes: json[30..].to_vec(),
            truncated: true,
        };
        assert_eq!(parse_usage(Api::Messages, &tail), Some(tokens(45, 7, 30)));
        // vLLM: no cache fields, `input_tokens` is the whole prompt; the delta repeats it.
        let events = |start: &str, delta: &str| Captured::MessageEvents {
            start: start.as_bytes().to_vec(),
            delta: delta.as_bytes().to_vec(),
        };
        let vllm = events(
            r#"{"type":"message_start","message":{"id":"chatcmpl-1","content":[],"usage":{"input_tokens":12,"output_tokens":0}}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":12,"output_tokens":16}}"#,
        );
        assert_eq!(parse_usage(Api::Messages, &vllm), Some(tokens(12, 16, 0)));
        // Anthropic: cache fields in message_start, output in the last delta; a delta's
        // non-null fields replace message_start's, null ones do not.
        let anthropic = events(
            r#"{"type":"message_start","message":{"usage":{"input_tokens":3,"cache_read_input_tokens":100,"cache_creation_input_tokens":0,"output_tokens":1}}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":40,"cache_read_input_tokens":null,"input_tokens":4}}"#,
        );
        assert_eq!(
            parse_usage(Api::Messages, &anthropic),
            Some(tokens(104, 40, 100))
        );
        // A stream cut before its message_delta: the prompt is exact, the output estimated.
        let cut = events(
            r#"{"type":"message_start","message":{"usage":{"input_tokens":3,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
            "",
        );
        assert_eq!(parse_usage(Api::Messages, &cut), None);
        let empty = body(r#"{"type":"message","content":[],"usage":{}}"#);
        assert_eq!(
            parse_usage(Api::Messages, &empty),
            None,
            "no counts is not a zero"
        );
        let empty = body(r#"{"object":"response","output":[],"usage":{"total_tokens":0}}"#);
        assert_eq!(
            parse_usage(Api::Responses, &empty),
            None,
            "no counts is not a zero"
        );
        let r = accounted(dialect_event(Api::Messages, cut, 6));
        let r = r.record(false);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (103, 6));
        assert!(r.usage_estimated);
        assert_eq!(r.api, "messages");
    }

    #[test]
    fn responses_usage_is_read_from_the_body_and_the_terminal_event() {
        let usage = r#"{"input_tokens":20,"input_tokens_details":{"cached_tokens":8,"input_tokens_per_turn":[20]},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":4,"tool_output_tokens":0},"total_tokens":36}"#;
        let expected = Tokens {
            prompt: 20,
            completion: 16,
            total: 36,
            cached: 8,
            reasoning: 4,
        };
        let json = format!(
            r#"{{"id":"resp_1","object":"response","output":[],"status":"completed","usage":{usage},"user":null}}"#
        );
        assert_eq!(parse_usage(Api::Responses, &body(&json)), Some(expected));
        let tail = Captured::Body {
            bytes: json.as_bytes()[40..].to_vec(),
            truncated: true,
        };
        assert_eq!(parse_usage(Api::Responses, &tail), Some(expected));
        let done = format!(
            r#"{{"response":{{"id":"resp_1","usage":{usage}}},"sequence_number":7,"type":"response.completed"}}"#
        );
        let terminal = Captured::Event(done.into_bytes());
        assert_eq!(parse_usage(Api::Responses, &terminal), Some(expected));
        let failed = Captured::Event(
            br#"{"response":{"status":"failed","usage":null},"type":"response.failed"}"#.to_vec(),
        );
        assert_eq!(parse_usage(Api::Responses, &failed), None);
        // The same bytes read as chat usage are no usage at all, never a zero.
        assert_eq!(parse_usage(Api::ChatCompletions, &body(&json)), None);
        let r = accounted(dialect_event(Api::Responses, body(&json), 0));
        let r = r.record(false);
        assert_eq!(
            (r.total_tokens, r.cached_tokens, r.usage_estimated),
            (36, 8, false)
        );
        assert_eq!(r.api, "responses");
    }

    #[test]
    fn dialect_bodies_without_usage_are_estimated_from_their_output() {
        let cases = [
            // 12 + 8 characters of text and thinking, 7 of tool input: 27 -> 7 tokens.
            (
                Api::Messages,
                r#"{"type":"message","content":[{"type":"thinking","thinking":"hmm, so.","signature":"abc"},{"type":"text","text":"Hello world!"},{"type":"tool_use","id":"t","name":"f","input":{"a":1}}]}"#,
                7,
            ),
            (
                Api::Messages,
                r#"{"type":"message","content":[],"usage":null}"#,
                0,
            ),
            // Message text 5, reasoning 4 + summary 2, arguments 7: 18 -> 5 tokens.
            (
                Api::Responses,
                r#"{"object":"response","output":[{"type":"reasoning","summary":[{"type":"summary_text","text":"ok"}],"content":[{"type":"reasoning_text","text":"abcd"}]},{"type":"message","content":[{"type":"output_text","text":"hello","annotations":[]}]},{"type":"function_call","name":"f","arguments":"{\"a\":1}"}]}"#,
                5,
            ),
            (
                Api::Responses,
                r#"{"object":"response","output":[{"type":"message","content":[{"type":"refusal","refusal":"no"}]}],"usage":null}"#,
                1,
            ),
        ];
        for (api, json, completion) in cases {
            let r = accounted(dialect_event(api, body(json), 0));
            let r = r.record(false);
            assert!(r.usage_estimated, "{json}");
            assert_eq!(
                (r.prompt_tokens, r.completion_tokens),
                (10, completion),
                "{json}"
            );
            assert_eq!(r.api, api.as_str());
        }
        // Streams without usage: the content events the meter counted.
        for api in [Api::Messages, Api::Responses] {
            let r = accounted(dialect_event(api, Captured::Nothing, 5));
            let r = r.record(false);
            assert_eq!((r.completion_tokens, r.usage_estimated), (5, true));
        }
    }

    #[test]
    fn counts_too_large_to_add_saturate() {
        // Found by fuzz/fuzz_targets/usage_record.rs: the total of two huge counts overflowed.
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":2}}"#;
        let captured = Captured::Body {
            bytes: body.to_vec(),
            truncated: false,
        };
        assert_eq!(
            parse_usage(Api::ChatCompletions, &captured).map(|t| t.total),
            Some(u64::MAX)
        );
        let huge = u64::MAX;
        for (api, body) in [
            (
                Api::Messages,
                format!(
                    r#"{{"usage":{{"input_tokens":{huge},"cache_read_input_tokens":{huge},"output_tokens":{huge}}}}}"#
                ),
            ),
            (
                Api::Responses,
                format!(r#"{{"usage":{{"input_tokens":{huge},"output_tokens":{huge}}}}}"#),
            ),
        ] {
            let captured = Captured::Body {
                bytes: body.into_bytes(),
                truncated: false,
            };
            let tokens = parse_usage(api, &captured).expect("usage");
            assert_eq!((tokens.prompt, tokens.total), (huge, huge), "{api:?}");
        }
    }
}
