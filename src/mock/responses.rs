//! vLLM's OpenAI Responses wire format (`vllm/entrypoints/openai/responses/`): `POST
//! /v1/responses`, streamed or not.
//!
//! What vLLM sends, and so what this sends: the response object (`resp_...`, status
//! `completed`, or `incomplete` with `incomplete_details` when `max_output_tokens` cut it short)
//! with `usage` {`input_tokens`, `input_tokens_details` {`cached_tokens`, per-turn lists},
//! `output_tokens`, `output_tokens_details` {`reasoning_tokens`, `tool_output_tokens`, per-turn
//! lists}, `total_tokens`}. Streams are `event: TYPE\ndata: JSON\n\n` with a `sequence_number`
//! from 0: `response.created` and `response.in_progress` at once (usage null), then with the
//! first token `response.output_item.added` and `response.content_part.added`, one
//! `response.output_text.delta` per token, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`, and `response.completed` with the
//! whole response and its usage (vLLM names the terminal event `response.completed` whatever the
//! status). The response object is rendered per request; a token event is a few
//! `extend_from_slice` calls.

use serde::Deserialize;
use serde_json::{json, Value};

use super::conn::Generated;
use super::openai::{
    bad_json, check_priority, resolve_model, text_chars, unix_now, word, ApiError, TokenKnobs,
};
use super::Shared;
use crate::http::push_decimal;

/// The served models' context length, as `/v1/models` reports it.
const MAX_MODEL_LEN: u64 = 8192;
/// Events before the first token delta: created, in_progress, output_item.added,
/// content_part.added.
const BEFORE_DELTAS: u64 = 4;

#[derive(Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Value,
    instructions: Option<String>,
    stream: Option<bool>,
    max_output_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Not `Option`: like vLLM's pydantic `int = 0`, a null is a type error.
    #[serde(default)]
    priority: i64,
}

/// One Responses answer, rendered on demand event by event.
pub(super) struct Response {
    model: usize,
    stream: bool,
    priority: i64,
    steps: u64,
    prompt_tokens: u64,
    knobs: TokenKnobs,
    /// The response object without `output`, `status`, `incomplete_details` and `usage`.
    object: Value,
    /// The output message's id, `msg_...`.
    item_id: String,
    /// The head of every text delta event, up to its `delta` value.
    delta_head: Vec<u8>,
}

impl Response {
    pub fn parse(sh: &Shared, body: &[u8], knobs: TokenKnobs) -> Result<Response, ApiError> {
        let req: ResponsesRequest = serde_json::from_slice(body).map_err(bad_json)?;
        let model = resolve_model(sh, req.model.as_deref())?;
        check_priority(sh, req.priority)?;
        let input_chars = match &req.input {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.get("content"))
                .map(text_chars)
                .sum(),
            _ => return Err(ApiError::new(400, "Invalid input")),
        };
        let chars = input_chars
            + req
                .instructions
                .as_deref()
                .map_or(0, |s| s.chars().count() as u64);
        let prompt_tokens = chars.div_ceil(4).max(1);
        let max_output_tokens = req
            .max_output_tokens
            .unwrap_or(MAX_MODEL_LEN.saturating_sub(prompt_tokens));
        let steps = knobs.tokens.min(max_output_tokens);
        let id = sh.hex_id();
        let item_id = format!(
            "msg_{}",
            std::str::from_utf8(&sh.hex_id()).unwrap_or_default()
        );
        let object = json!({
            "id": format!("resp_{}", std::str::from_utf8(&id).unwrap_or_default()),
            "created_at": unix_now(),
            "instructions": req.instructions,
            "metadata": null,
            "model": sh.opts.models[model],
            "object": "response",
            "parallel_tool_calls": true,
            "temperature": req.temperature.unwrap_or(1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": req.top_p.unwrap_or(1.0),
            "background": false,
            "max_output_tokens": max_output_tokens,
            "max_tool_calls": null,
            "previous_response_id": null,
            "prompt": null,
            "reasoning": null,
            "service_tier": "auto",
            "text": null,
            "top_logprobs": null,
            "truncation": "disabled",
            "user": null,
            "input_messages": null,
            "output_messages": null,
        });
        let delta_head =
            b"event: response.output_text.delta\ndata: {\"content_index\":0,\"delta\":\"".to_vec();
        Ok(Response {
            model,
            stream: req.stream.unwrap_or(false),
            priority: req.priority,
            steps,
            prompt_tokens,
            knobs,
            object,
            item_id,
            delta_head,
        })
    }

    fn text(&self) -> String {
        (0..self.steps)
            .map(|i| std::str::from_utf8(word(i)).unwrap_or_default())
            .collect()
    }

    /// The output message, `in_progress` (no content yet) or `completed`.
    fn message(&self, completed: bool) -> Value {
        let (status, content) = if !completed {
            ("in_progress", json!([]))
        } else if self.steps == 0 {
            ("completed", json!([]))
        } else {
            ("completed", json!([self.text_part(Value::Null)]))
        };
        json!({"id": self.item_id, "content": content, "role": "assistant", "status": status, "type": "message"})
    }

    fn text_part(&self, logprobs: Value) -> Value {
        json!({"annotations": [], "text": self.text(), "type": "output_text", "logprobs": logprobs})
    }

    /// The response object: in progress (no output, no usage), or finished.
    fn response(&self, finished: bool) -> Value {
        let mut r = self.object.clone();
        let cut = self.knobs.tokens > self.steps;
        let fields = if !finished {
            json!({"output": [], "status": "in_progress", "incomplete_details": null, "usage": null})
        } else {
            let (cached, reasoning) = (
                self.knobs.cached_tokens.unwrap_or(0),
                self.knobs.reasoning_tokens.unwrap_or(0),
            );
            json!({
                "output": [self.message(true)],
                "status": if cut { "incomplete" } else { "completed" },
                "incomplete_details": if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null },
                "usage": {
                    "input_tokens": self.prompt_tokens,
                    "input_tokens_details": {
                        "cached_tokens": cached,
                        "input_tokens_per_turn": [self.prompt_tokens],
                        "cached_tokens_per_turn": [cached],
                    },
                    "output_tokens": self.steps,
                    "output_tokens_details": {
                        "reasoning_tokens": reasoning,
                        "tool_output_tokens": 0,
                        "output_tokens_per_turn": [self.steps],
                        "tool_output_tokens_per_turn": [0],
                    },
                    "total_tokens": self.prompt_tokens + self.steps,
                },
            })
        };
        if let (Some(r), Value::Object(fields)) = (r.as_object_mut(), fields) {
            r.extend(fields);
        }
        r
    }

    /// `event: TYPE\ndata: {...fields, "sequence_number": N, "type": TYPE}\n\n`.
    fn event(ev: &mut Vec<u8>, kind: &str, sequence_number: u64, mut fields: Value) {
        if let Some(f) = fields.as_object_mut() {
            f.insert("sequence_number".into(), sequence_number.into());
            f.insert("type".into(), kind.into());
        }
        ev.extend_from_slice(b"event: ");
        ev.extend_from_slice(kind.as_bytes());
        ev.extend_from_slice(b"\ndata: ");
        ev.extend_from_slice(fields.to_string().as_bytes());
        ev.extend_from_slice(b"\n\n");
    }
}

impl Generated for Response {
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

    fn opening_events(&self) -> usize {
        2
    }

    fn opening_event(&self, k: usize, ev: &mut Vec<u8>) {
        let kind = ["response.created", "response.in_progress"][k];
        Self::event(
            ev,
            kind,
            k as u64,
            json!({"response": self.response(false)}),
        );
    }

    /// The output message and its text part, once there is a token.
    fn first_events(&self) -> usize {
        if self.steps > 0 {
            2
        } else {
            0
        }
    }

    fn first_event(&self, k: usize, ev: &mut Vec<u8>) {
        let sequence_number = 2 + k as u64;
        if k == 0 {
            let item = json!({"item": self.message(false), "output_index": 0});
            Self::event(ev, "response.output_item.added", sequence_number, item);
        } else {
            let part =
                json!({"annotations": [], "text": "", "type": "output_text", "logprobs": []});
            let fields = json!({"content_index": 0, "item_id": self.item_id, "output_index": 0, "part": part});
            Self::event(ev, "response.content_part.added", sequence_number, fields);
        }
    }

    fn step_event(&self, i: u64, ev: &mut Vec<u8>) {
        ev.extend_from_slice(&self.delta_head);
        ev.extend_from_slice(word(i));
        ev.extend_from_slice(b"\",\"item_id\":\"");
        ev.extend_from_slice(self.item_id.as_bytes());
        ev.extend_from_slice(b"\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":");
        push_decimal(ev, BEFORE_DELTAS + i);
        ev.extend_from_slice(b",\"type\":\"response.output_text.delta\"}\n\n");
    }

    /// The text's, part's and message's ends (once there was a token), then the response.
    fn closing_events(&self) -> usize {
        if self.steps > 0 {
            4
        } else {
            1
        }
    }

    fn closing_event(&self, k: usize, ev: &mut Vec<u8>) {
        // Without a token there is only the last one.
        let (phase, first) = if self.steps > 0 {
            (k, BEFORE_DELTAS + self.steps)
        } else {
            (3, 2)
        };
        let sequence_number = first + k as u64;
        let (kind, fields) = match phase {
            3 => (
                "response.completed",
                json!({"response": self.response(true)}),
            ),
            0 => (
                "response.output_text.done",
                json!({"content_index": 0, "item_id": self.item_id, "logprobs": [], "output_index": 0, "text": self.text()}),
            ),
            1 => (
                "response.content_part.done",
                json!({"content_index": 0, "item_id": self.item_id, "output_index": 0, "part": self.text_part(Value::Null)}),
            ),
            _ => (
                "response.output_item.done",
                json!({"item": self.message(true), "output_index": 0}),
            ),
        };
        Self::event(ev, kind, sequence_number, fields);
    }

    fn full_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.response(true).to_string().as_bytes());
    }
}
