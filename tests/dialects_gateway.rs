//! The APIs beside chat completions, through the gateway: each is routed by its own path, its
//! model read from its own body (a multipart form for audio), its refusals shaped for its clients
//! (Anthropic's on `/v1/messages`), and vLLM's routes outside `/v1` relayed with auth like the rest.

mod common;

use common::*;
use serde_json::{json, Value};

fn gateway(backend: std::net::SocketAddr, tag: &str) -> Proc {
    spawn_gateway(&format!(
        r#"
listen: "{{listen}}"
workers: 1
backends: [{{url: "http://{backend}"}}]
auth:
  quota_path: "{}"
api_keys:
  - {{key: "sk-audio", allowed_models: ["whisper-1"]}}
  - {{key: "sk-any"}}
"#,
        unique_path(&format!("llmproxy-dialects-{tag}")).display()
    ))
}

fn transcription(key: &str, model: &str) -> Vec<u8> {
    let body = format!(
        "--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--b0und\r\n\
         Content-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b0und--\r\n"
    );
    let mut raw = format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: multipart/form-data; boundary=b0und\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body.as_bytes());
    raw
}

#[test]
fn the_model_of_an_audio_form_is_authorized() {
    let sim = spawn_mock(&[]);
    let gw = gateway(sim.addr, "audio");
    let refused = request(gw.addr, &transcription("sk-audio", "tts-1"));
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "model_not_allowed");
    // The allowed model reaches the backend (the simulator has no audio route: its own 404).
    let allowed = request(gw.addr, &transcription("sk-audio", "whisper-1"));
    assert_ne!(allowed.json()["error"]["code"], "model_not_allowed");
    assert_eq!(allowed.json()["detail"], "Not Found", "{}", allowed.text());
}

#[test]
fn refusals_on_messages_take_anthropics_shape() {
    let sim = spawn_mock(&[]);
    let gw = gateway(sim.addr, "shape");
    let body = json!({"model": "mock-model", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]});
    let check = |r: &Response, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v: Value = r.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    };
    let anthropic = [("anthropic-version", "2023-06-01")];
    check(
        &post_json(gw.addr, "/v1/messages", &body, &anthropic),
        401,
        "authentication_error",
    );
    check(
        &post_json(
            gw.addr,
            "/v1/messages?beta=true",
            &body,
            &[("x-api-key", "sk-wrong")],
        ),
        401,
        "authentication_error",
    );
    check(
        &post_json(
            gw.addr,
            "/v1/messages/count_tokens",
            &body,
            &[("x-api-key", "sk-audio")],
        ),
        403,
        "permission_error",
    );
    // The same refusal on an OpenAI path keeps OpenAI's shape.
    let openai = post_json(gw.addr, "/v1/responses", &body, &[]);
    assert_eq!(openai.status, 401);
    assert_eq!(openai.json()["error"]["code"], "invalid_api_key");
}

#[test]
fn vllm_routes_outside_v1_are_relayed_with_auth() {
    let sim = spawn_mock(&[]);
    let gw = gateway(sim.addr, "routes");
    let body = json!({"model": "mock-model", "prompt": "hi"});
    for path in [
        "/tokenize",
        "/detokenize",
        "/pooling",
        "/classify",
        "/score",
        "/rerank",
        "/invocations",
    ] {
        let anonymous = post_json(gw.addr, path, &body, &[]);
        assert_eq!(anonymous.status, 401, "{path}: {}", anonymous.text());
        // With a key, the backend answers (the simulator's own 404, not the gateway's).
        let r = post_json(gw.addr, path, &body, &[("authorization", "Bearer sk-any")]);
        assert_eq!(r.json()["detail"], "Not Found", "{path}: {}", r.text());
    }
    let unknown = post_json(
        gw.addr,
        "/tokenizer",
        &body,
        &[("authorization", "Bearer sk-any")],
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "unknown_url");
}
