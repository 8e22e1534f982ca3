//! vLLM's OpenAI wire format: request bodies in, response bodies and SSE events out.
//!
//! Pure byte building, no I/O and no timing: `conn` decides when each piece is written. Everything
//! per request (ids, the chunk prefix with the escaped model name) is rendered once into a
//! [`Generation`]; each token event is then a few `extend_from_slice` calls into a reused buffer.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::conn::Generated;
use super::Shared;
use crate::http::push_decimal;

/// Deterministic output: token `i` is `WORDS[i % WORDS.len()]`. ASCII without JSON specials, so
/// tokens are copied into JSON strings unescaped.
pub(super) const WORDS: [&str; 16] = [
    "hello ",
    "world ",
    "this ",
    "is ",
    "a ",
    "simulated ",
    "response ",
    "from ",
    "the ",
    "mock ",
    "language ",
    "model ",
    "running ",
    "behind ",
    "llmproxy ",
    "today ",
];
/// Values given to a called tool's required parameters, in order.
const ARG_VALUES: [&str; 4] = ["Paris", "London", "Tokyo", "Berlin"];
/// Bytes per streamed tool-argument fragment.
const ARG_FRAGMENT: usize = 8;

/// An error answered with vLLM's body `{"error":{"message","type","param","code"}}`, or on the
/// Anthropic routes with the body vLLM translates it to, `{"type":"error","error":{"type","message"}}`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// The body; `anthropic`: in the Anthropic routes' shape.
    pub fn body(&self, anthropic: bool) -> Vec<u8> {
        let phrase = crate::http::reason(self.status).replace(' ', "");
        let kind = if phrase.is_empty() {
            if self.status >= 500 {
                "InternalServerError".to_string()
            } else {
                "BadRequestError".to_string()
            }
        } else if phrase.ends_with("Error") {
            phrase
        } else {
            phrase + "Error"
        };
        let body = if anthropic {
            serde_json::json!({"type": "error", "error": {"type": kind, "message": self.message}})
        } else {
            serde_json::json!({
                "error": {"message": self.message, "type": kind, "param": null, "code": self.status}
            })
        };
        body.to_string().into_bytes()
    }
}

pub(super) fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::new(400, format!("Invalid request body: {e}"))
}

/// vLLM's 400 for a `priority` other than 0 when no priority scheduling flag is given (its
/// input processor raises this `ValueError`).
pub(super) fn check_priority(sh: &Shared, priority: i64) -> Result<(), ApiError> {
    if priority != 0 && !sh.opts.priority_scheduling() {
        return Err(ApiError::new(
            400,
            format!("Got priority {priority} but Priority scheduling is not enabled."),
        ));
    }
    Ok(())
}

/// Index of the served model a request names; a missing `model` means the first, as in vLLM.
pub(super) fn resolve_model(sh: &Shared, model: Option<&str>) -> Result<usize, ApiError> {
    match model {
        None => Ok(0),
        Some(m) => sh
            .opts
            .models
            .iter()
            .position(|x| x == m)
            .ok_or_else(|| ApiError::new(404, format!("The model `{m}` does not exist."))),
    }
}

#[derive(Deserialize)]
struct GenRequest {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    prompt: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<Value>,
    /// Not `Option`: like vLLM's pydantic `int = 0`, a null is a type error.
    #[serde(default)]
    priority: i64,
}

#[derive(Deserialize)]
struct Message {
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

#[derive(Deserialize)]
struct Tool {
    function: ToolFunction,
}

#[derive(Deserialize)]
struct ToolFunction {
    name: String,
    parameters: Option<Value>,
}

/// Per-request values taken from `x-mock-*` headers or the flags they override.
#[derive(Clone, Copy, Debug)]
pub(super) struct TokenKnobs {
    pub tokens: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

struct ToolCall {
    name: String,
    arguments: String,
    /// Where each streamed argument fragment starts, then `arguments.len()`.
    cuts: Vec<usize>,
    id: [u8; 32],
}

/// One chat or text completion, rendered on demand event by event.
pub(super) struct Generation {
    model: usize,
    stream: bool,
    chat: bool,
    /// Streams: `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`; non-streams the
    /// same without `data: `.
    prefix: Vec<u8>,
    /// Completion tokens: words, or for a tool call its header plus argument fragments.
    steps: u64,
    finish: &'static str,
    tool: Option<ToolCall>,
    prompt_tokens: u64,
    include_usage: bool,
    continuous_usage: bool,
    knobs: TokenKnobs,
    priority: i64,
}

impl Generation {
    pub fn parse(
        sh: &Shared,
        chat: bool,
        body: &[u8],
        knobs: TokenKnobs,
    ) -> Result<Generation, ApiError> {
        let req: GenRequest = serde_json::from_slice(body).map_err(bad_json)?;
        let model = resolve_model(sh, req.model.as_deref())?;
        check_priority(sh, req.priority)?;
        let mut chars = 0u64;
        let mut token_ids = 0u64;
        if chat {
            let messages = req
                .messages
                .ok_or_else(|| ApiError::new(400, "Field required: messages"))?;
            chars += messages
                .iter()
                .filter_map(|m| m.content.as_ref())
                .map(text_chars)
                .sum::<u64>();
        } else {
            match req
                .prompt
                .ok_or_else(|| ApiError::new(400, "Field required: prompt"))?
            {
                Value::String(s) => chars += s.chars().count() as u64,
                Value::Array(items) => {
                    for item in &items {
                        match item {
                            Value::String(s) => chars += s.chars().count() as u64,
                            Value::Number(_) => token_ids += 1,
                            Value::Array(ids) => token_ids += ids.len() as u64,
                            _ => return Err(ApiError::new(400, "Invalid prompt")),
                        }
                    }
                }
                _ => return Err(ApiError::new(400, "Invalid prompt")),
            }
        }
        let prompt_tokens = (chars.div_ceil(4) + token_ids).max(1);

        let tool = if chat {
            pick_tool(req.tools.unwrap_or_default(), req.tool_choice, sh)
        } else {
            None
        };
        let (steps, finish) = match &tool {
            Some(t) => (t.cuts.len() as u64, "tool_calls"),
            None => match req.max_completion_tokens.or(req.max_tokens) {
                Some(max) if max < knobs.tokens => (max, "length"),
                _ => (knobs.tokens, "stop"),
            },
        };
        let stream = req.stream.unwrap_or(false);
        let (include_usage, continuous_usage) = match &req.stream_options {
            // vLLM only honours continuous_usage_stats together with include_usage.
            Some(o) => {
                let inc = o.include_usage.unwrap_or(false);
                (inc, inc && o.continuous_usage_stats.unwrap_or(false))
            }
            None => (false, false),
        };

        let mut prefix = Vec::with_capacity(160);
        if stream {
            prefix.extend_from_slice(b"data: ");
        }
        prefix.extend_from_slice(if chat {
            b"{\"id\":\"chatcmpl-"
        } else {
            b"{\"id\":\"cmpl-"
        });
        prefix.extend_from_slice(&sh.hex_id());
        prefix.extend_from_slice(match (chat, stream) {
            (true, true) => b"\",\"object\":\"chat.completion.chunk\",\"created\":",
            (true, false) => b"\",\"object\":\"chat.completion\",\"created\":",
            (false, _) => b"\",\"object\":\"text_completion\",\"created\":",
        });
        push_decimal(&mut prefix, unix_now());
        prefix.extend_from_slice(b",\"model\":\"");
        push_json_escaped(&mut prefix, &sh.opts.models[model]);
        prefix.extend_from_slice(b"\",\"choices\":[");

        Ok(Generation {
            model,
            stream,
            chat,
            prefix,
            steps,
            finish,
            tool,
            prompt_tokens,
            include_usage,
            continuous_usage,
            knobs,
            priority: req.priority,
        })
    }

    /// Chat's first event, `delta: {"role":"assistant","content":""}`.
    fn role_event(&self, ev: &mut Vec<u8>) {
        ev.extend_from_slice(&self.prefix);
        ev.extend_from_slice(b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]");
        self.end_event(ev, 0);
    }

    /// The event for completion token `i`; the last one carries `finish_reason`.
    fn token_event(&self, i: u64, ev: &mut Vec<u8>) {
        ev.extend_from_slice(&self.prefix);
        ev.extend_from_slice(b"{\"index\":0,");
        match (&self.tool, self.chat) {
            (Some(t), _) if i == 0 => {
                ev.extend_from_slice(
                    b"\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"chatcmpl-tool-",
                );
                ev.extend_from_slice(&t.id);
                ev.extend_from_slice(b"\",\"type\":\"function\",\"function\":{\"name\":\"");
                push_json_escaped(ev, &t.name);
                ev.extend_from_slice(b"\",\"arguments\":\"\"}}]}");
            }
            (Some(t), _) => {
                let (start, end) = (t.cuts[i as usize - 1], t.cuts[i as usize]);
                ev.extend_from_slice(
                    b"\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"",
                );
                push_json_escaped(ev, &t.arguments[start..end]);
                ev.extend_from_slice(b"\"}}]}");
            }
            (None, true) => {
                ev.extend_from_slice(b"\"delta\":{\"content\":\"");
                ev.extend_from_slice(word(i));
                ev.extend_from_slice(b"\"}");
            }
            (None, false) => {
                ev.extend_from_slice(b"\"text\":\"");
                ev.extend_from_slice(word(i));
                ev.push(b'"');
            }
        }
        ev.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        if i + 1 == self.steps {
            ev.push(b'"');
            ev.extend_from_slice(self.finish.as_bytes());
            ev.extend_from_slice(b"\",\"stop_reason\":null}]");
        } else if self.chat {
            ev.extend_from_slice(b"null}]");
        } else {
            // vLLM's completion stream choices always carry stop_reason.
            ev.extend_from_slice(b"null,\"stop_reason\":null}]");
        }
        self.end_event(ev, i + 1);
    }

    /// A generation of zero tokens still ends its choice with a finish_reason.
    fn empty_finish_event(&self, ev: &mut Vec<u8>) {
        ev.extend_from_slice(&self.prefix);
        ev.extend_from_slice(if self.chat {
            b"{\"index\":0,\"delta\":{\"content\":\"\"},\"logprobs\":null,\"finish_reason\":\""
        } else {
            b"{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\""
        });
        ev.extend_from_slice(self.finish.as_bytes());
        ev.extend_from_slice(b"\",\"stop_reason\":null}]");
        self.end_event(ev, 0);
    }

    /// The `"choices": []` usage event sent before `[DONE]` when `include_usage` asked for it.
    fn usage_event(&self, ev: &mut Vec<u8>) {
        ev.extend_from_slice(&self.prefix);
        ev.extend_from_slice(b"],");
        self.push_usage(ev, self.steps, true);
        ev.extend_from_slice(b"}\n\n");
    }

    fn end_event(&self, ev: &mut Vec<u8>, completion_tokens: u64) {
        if self.continuous_usage {
            ev.push(b',');
            self.push_usage(ev, completion_tokens, false);
        }
        ev.extend_from_slice(b"}\n\n");
    }

    fn push_usage(&self, out: &mut Vec<u8>, completion: u64, details: bool) {
        out.extend_from_slice(b"\"usage\":{\"prompt_tokens\":");
        push_decimal(out, self.prompt_tokens);
        out.extend_from_slice(b",\"total_tokens\":");
        push_decimal(out, self.prompt_tokens + completion);
        out.extend_from_slice(b",\"completion_tokens\":");
        push_decimal(out, completion);
        if details {
            if let Some(n) = self.knobs.cached_tokens {
                out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
                push_decimal(out, n);
                out.push(b'}');
            }
            if let Some(n) = self.knobs.reasoning_tokens {
                out.extend_from_slice(b",\"completion_tokens_details\":{\"reasoning_tokens\":");
                push_decimal(out, n);
                out.push(b'}');
            }
        }
        out.push(b'}');
    }

    /// The whole non-streaming response body.
    fn body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        if self.chat {
            out.extend_from_slice(b"{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
            match &self.tool {
                Some(t) => {
                    out.extend_from_slice(b"null,\"tool_calls\":[{\"id\":\"chatcmpl-tool-");
                    out.extend_from_slice(&t.id);
                    out.extend_from_slice(b"\",\"type\":\"function\",\"function\":{\"name\":\"");
                    push_json_escaped(out, &t.name);
                    out.extend_from_slice(b"\",\"arguments\":\"");
                    push_json_escaped(out, &t.arguments);
                    out.extend_from_slice(b"\"}}]}");
                }
                None => {
                    out.push(b'"');
                    (0..self.steps).for_each(|i| out.extend_from_slice(word(i)));
                    out.extend_from_slice(b"\",\"tool_calls\":[]}");
                }
            }
        } else {
            out.extend_from_slice(b"{\"index\":0,\"text\":\"");
            (0..self.steps).for_each(|i| out.extend_from_slice(word(i)));
            out.push(b'"');
        }
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":\"");
        out.extend_from_slice(self.finish.as_bytes());
        out.extend_from_slice(b"\",\"stop_reason\":null}],");
        self.push_usage(out, self.steps, true);
        out.push(b'}');
    }
}

/// Chat: the role chunk first; completions: nothing before the tokens. After them: a zero-token
/// generation's finish chunk, the usage chunk when asked for, and `[DONE]`.
impl Generated for Generation {
    fn model(&self) -> usize {
        self.model
    }

    fn priority(&self) -> i64 {
        self.priority
    }

    fn stream(&self) -> bool {
        self.stream
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn first_events(&self) -> usize {
        usize::from(self.chat)
    }

    fn first_event(&self, _: usize, ev: &mut Vec<u8>) {
        self.role_event(ev);
    }

    fn step_event(&self, i: u64, ev: &mut Vec<u8>) {
        self.token_event(i, ev);
    }

    fn closing_events(&self) -> usize {
        usize::from(self.steps == 0) + usize::from(self.include_usage) + 1
    }

    fn closing_event(&self, mut k: usize, ev: &mut Vec<u8>) {
        if self.steps == 0 {
            if k == 0 {
                return self.empty_finish_event(ev);
            }
            k -= 1;
        }
        if self.include_usage && k == 0 {
            return self.usage_event(ev);
        }
        ev.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn full_body(&self, out: &mut Vec<u8>) {
        self.body(out);
    }
}

/// The characters of a message's `content`: a string, or the `text` of each of its parts.
pub(super) fn text_chars(content: &Value) -> u64 {
    match content {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|t| t.chars().count() as u64)
            .sum(),
        _ => 0,
    }
}

/// Token `i` of every simulated answer.
pub(super) fn word(i: u64) -> &'static [u8] {
    WORDS[(i % WORDS.len() as u64) as usize].as_bytes()
}

/// The tool the simulated assistant calls: the one `tool_choice` names, else the first; none when
/// there are no tools or `tool_choice` is "none".
fn pick_tool(tools: Vec<Tool>, choice: Option<Value>, sh: &Shared) -> Option<ToolCall> {
    let named = match &choice {
        Some(Value::String(s)) if s == "none" => return None,
        Some(c) => c.pointer("/function/name").and_then(Value::as_str),
        None => None,
    };
    let tool = match named {
        Some(n) => tools
            .iter()
            .find(|t| t.function.name == n)
            .or(tools.first()),
        None => tools.first(),
    }?;
    // Python's json.dumps layout, which is what vLLM's tool parsers emit.
    let mut arguments = String::from("{");
    let required = tool
        .function
        .parameters
        .as_ref()
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array);
    for (i, name) in required
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .enumerate()
    {
        if i > 0 {
            arguments.push_str(", ");
        }
        arguments.push_str(&Value::from(name).to_string());
        arguments.push_str(": \"");
        arguments.push_str(ARG_VALUES[i % ARG_VALUES.len()]);
        arguments.push('"');
    }
    arguments.push('}');
    let mut cuts = vec![0];
    let mut at = 0;
    while at < arguments.len() {
        at = (at + ARG_FRAGMENT).min(arguments.len());
        // Parameter names may be non-ASCII; fragments end on character boundaries.
        while !arguments.is_char_boundary(at) {
            at += 1;
        }
        cuts.push(at);
    }
    Some(ToolCall {
        name: tool.function.name.clone(),
        arguments,
        cuts,
        id: sh.hex_id(),
    })
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: Option<String>,
    input: Value,
    encoding_format: Option<String>,
    /// vLLM's pooling requests take one too (it orders nothing here: embeddings do not queue).
    #[serde(default)]
    priority: i64,
}

/// `/v1/embeddings`: one unit vector per input, derived from the input's bytes.
pub(super) fn embeddings(sh: &Shared, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let req: EmbeddingRequest = serde_json::from_slice(body).map_err(bad_json)?;
    let model = resolve_model(sh, req.model.as_deref())?;
    check_priority(sh, req.priority)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::new(
                400,
                format!("Unsupported encoding_format `{f}`."),
            ))
        }
    };
    // (seed, prompt tokens) per input.
    let invalid = || {
        ApiError::new(
            400,
            "Invalid input: expected a string, strings, or token arrays.",
        )
    };
    let text = |s: &str| {
        (
            fnv1a(s.as_bytes()),
            (s.chars().count() as u64).div_ceil(4).max(1),
        )
    };
    let ids = |v: &[Value]| -> Option<(u64, u64)> {
        let mut h = fnv1a(b"");
        for x in v {
            h = fnv1a_step(h, &x.as_u64()?.to_le_bytes());
        }
        Some((h, v.len() as u64))
    };
    let inputs: Vec<(u64, u64)> = match &req.input {
        Value::String(s) => vec![text(s)],
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![ids(items).ok_or_else(invalid)?]
        }
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|x| match x {
                Value::String(s) => Some(text(s)),
                Value::Array(v) => ids(v),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    let dim = sh.opts.embedding_dim;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, &(seed, _))| {
            let mut v: Vec<f32> = (0..dim as u64)
                .map(|j| (super::splitmix64(seed ^ j) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect();
            // vLLM normalizes embeddings by default.
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::from(v)
            };
            serde_json::json!({"index": i, "object": "embedding", "embedding": embedding})
        })
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|&(_, n)| n).sum();
    let id = sh.hex_id();
    Ok(serde_json::json!({
        "id": format!("embd-{}", std::str::from_utf8(&id).unwrap_or_default()),
        "object": "list",
        "created": unix_now(),
        "model": sh.opts.models[model],
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    })
    .to_string()
    .into_bytes())
}

/// `/v1/models`.
pub(super) fn models(sh: &Shared) -> Vec<u8> {
    let data: Vec<Value> = sh
        .opts
        .models
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m, "object": "model", "created": sh.started, "owned_by": "vllm",
                "root": m, "parent": null, "max_model_len": 8192,
            })
        })
        .collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

fn fnv1a(b: &[u8]) -> u64 {
    fnv1a_step(0xcbf2_9ce4_8422_2325, b)
}

fn fnv1a_step(mut h: u64, b: &[u8]) -> u64 {
    for &x in b {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends `s` as the inside of a JSON string.
pub(super) fn push_json_escaped(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let mut digits = [0; 2];
                hex::encode_to_slice([b], &mut digits).expect("two digits for one byte");
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&digits);
            }
            _ => out.push(b),
        }
    }
}
