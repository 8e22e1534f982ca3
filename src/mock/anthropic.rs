//! vLLM's Anthropic Messages wire format (`vllm/entrypoints/anthropic/`): `POST /v1/messages`,
//! streamed or not, and `POST /v1/messages/count_tokens`.
//!
//! What vLLM sends, and so what this sends: ids are the chat completion's (`chatcmpl-...`);
//! events are `event: NAME\ndata: JSON\n\n`, dumped with only the fields vLLM sets:
//! `message_start` (usage `{"input_tokens": prompt, "output_tokens": 0}`, no cache fields),
//! `content_block_start` (with the first token), one `content_block_delta` per token,
//! `content_block_stop`, `message_delta` (stop reason; usage with `input_tokens` and the
//! `output_tokens` generated), `message_stop`. No `ping`. The JSON form carries the same usage.
//! Everything per request is rendered once; a token event is a few `extend_from_slice` calls.

use serde::Deserialize;
use serde_json::Value;

use super::conn::Generated;
use super::openai::{
    bad_json, push_json_escaped, resolve_model, text_chars, word, ApiError, TokenKnobs,
};
use super::Shared;
use crate::http::push_decimal;

/// The fields of a Messages (or count_tokens) request the simulator reads.
#[derive(Deserialize)]
struct MessagesRequest {
    /// Required, as vLLM's pydantic model has it.
    model: String,
    messages: Vec<InputMessage>,
    system: Option<Value>,
    max_tokens: Option<u64>,
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct InputMessage {
    content: Value,
}

impl MessagesRequest {
    fn parse(sh: &Shared, body: &[u8]) -> Result<(MessagesRequest, usize, u64), ApiError> {
        let req: MessagesRequest = serde_json::from_slice(body).map_err(bad_json)?;
        let model = resolve_model(sh, Some(&req.model))?;
        let chars = req.system.as_ref().map_or(0, text_chars)
            + req
                .messages
                .iter()
                .map(|m| text_chars(&m.content))
                .sum::<u64>();
        // The chat endpoint's prompt count, so both APIs agree on the same text.
        let prompt_tokens = chars.div_ceil(4).max(1);
        Ok((req, model, prompt_tokens))
    }
}

/// `POST /v1/messages/count_tokens`: the prompt tokens a Messages request would use.
pub(super) fn count_tokens(sh: &Shared, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let (_, _, input_tokens) = MessagesRequest::parse(sh, body)?;
    Ok(serde_json::json!({
        "input_tokens": input_tokens,
        "context_management": {"original_input_tokens": input_tokens},
    })
    .to_string()
    .into_bytes())
}

/// One Messages answer, rendered on demand event by event.
pub(super) struct Message {
    model: usize,
    stream: bool,
    steps: u64,
    /// `end_turn`, or `max_tokens` when `max_tokens` cut the answer short.
    stop_reason: &'static str,
    prompt_tokens: u64,
    /// The message's `"id":"chatcmpl-..."` field.
    id: Vec<u8>,
    /// `"model":"..."`, escaped.
    model_field: Vec<u8>,
}

impl Message {
    pub fn parse(sh: &Shared, body: &[u8], knobs: TokenKnobs) -> Result<Message, ApiError> {
        let (req, model, prompt_tokens) = MessagesRequest::parse(sh, body)?;
        let (steps, stop_reason) = match req.max_tokens {
            None => return Err(ApiError::new(400, "Field required: max_tokens")),
            Some(0) => return Err(ApiError::new(400, "max_tokens must be positive")),
            Some(max) if max < knobs.tokens => (max, "max_tokens"),
            Some(_) => (knobs.tokens, "end_turn"),
        };
        let mut id = b"\"id\":\"chatcmpl-".to_vec();
        id.extend_from_slice(&sh.hex_id());
        id.push(b'"');
        let mut model_field = b"\"model\":\"".to_vec();
        push_json_escaped(&mut model_field, &sh.opts.models[model]);
        model_field.push(b'"');
        Ok(Message {
            model,
            stream: req.stream.unwrap_or(false),
            steps,
            stop_reason,
            prompt_tokens,
            id,
            model_field,
        })
    }

    fn usage(&self, out: &mut Vec<u8>, output_tokens: u64) {
        out.extend_from_slice(b"\"usage\":{\"input_tokens\":");
        push_decimal(out, self.prompt_tokens);
        out.extend_from_slice(b",\"output_tokens\":");
        push_decimal(out, output_tokens);
        out.push(b'}');
    }
}

fn start_event(ev: &mut Vec<u8>, name: &[u8]) {
    ev.extend_from_slice(b"event: ");
    ev.extend_from_slice(name);
    ev.extend_from_slice(b"\ndata: ");
}

impl Generated for Message {
    fn model(&self) -> usize {
        self.model
    }

    fn stream(&self) -> bool {
        self.stream
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    /// `message_start`, and the text block's start when there is a first token.
    fn first_events(&self) -> usize {
        1 + usize::from(self.steps > 0)
    }

    fn first_event(&self, k: usize, ev: &mut Vec<u8>) {
        if k == 0 {
            start_event(ev, b"message_start");
            ev.extend_from_slice(b"{\"type\":\"message_start\",\"message\":{");
            ev.extend_from_slice(&self.id);
            ev.extend_from_slice(b",\"content\":[],");
            ev.extend_from_slice(&self.model_field);
            ev.extend_from_slice(b",\"stop_reason\":null,\"stop_sequence\":null,");
            self.usage(ev, 0);
            ev.extend_from_slice(b"}}\n\n");
        } else {
            start_event(ev, b"content_block_start");
            ev.extend_from_slice(b"{\"type\":\"content_block_start\",\"content_block\":{\"type\":\"text\",\"text\":\"\"},\"index\":0}\n\n");
        }
    }

    fn step_event(&self, i: u64, ev: &mut Vec<u8>) {
        start_event(ev, b"content_block_delta");
        ev.extend_from_slice(
            b"{\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"",
        );
        ev.extend_from_slice(word(i));
        ev.extend_from_slice(b"\"},\"index\":0}\n\n");
    }

    /// The text block's stop (if it started), `message_delta` with the usage, `message_stop`.
    fn closing_events(&self) -> usize {
        2 + usize::from(self.steps > 0)
    }

    fn closing_event(&self, k: usize, ev: &mut Vec<u8>) {
        match k + usize::from(self.steps == 0) {
            0 => {
                start_event(ev, b"content_block_stop");
                ev.extend_from_slice(b"{\"type\":\"content_block_stop\",\"index\":0}\n\n");
            }
            1 => {
                start_event(ev, b"message_delta");
                ev.extend_from_slice(b"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"");
                ev.extend_from_slice(self.stop_reason.as_bytes());
                ev.extend_from_slice(b"\"},");
                self.usage(ev, self.steps);
                ev.extend_from_slice(b"}\n\n");
            }
            _ => {
                start_event(ev, b"message_stop");
                ev.extend_from_slice(b"{\"type\":\"message_stop\"}\n\n");
            }
        }
    }

    fn full_body(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        out.extend_from_slice(&self.id);
        out.extend_from_slice(b",\"type\":\"message\",\"role\":\"assistant\",\"content\":[");
        if self.steps > 0 {
            out.extend_from_slice(b"{\"type\":\"text\",\"text\":\"");
            (0..self.steps).for_each(|i| out.extend_from_slice(word(i)));
            out.extend_from_slice(b"\"}");
        }
        out.extend_from_slice(b"],");
        out.extend_from_slice(&self.model_field);
        out.extend_from_slice(b",\"stop_reason\":\"");
        out.extend_from_slice(self.stop_reason.as_bytes());
        out.extend_from_slice(b"\",");
        self.usage(out, self.steps);
        out.push(b'}');
    }
}
