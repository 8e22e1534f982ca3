"""End-to-end checks with the official openai Python SDK against a gateway URL.

Usage: sdk_e2e.py BASE_URL (e.g. http://127.0.0.1:8000/v1). Exits non-zero on the first failure;
run by tests/openai_sdk.rs against a real gateway in front of the simulator.
"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2] if len(sys.argv) > 2 else "sk-test", max_retries=0)
MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "Say hello to the gateway"}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
check(r.choices[0].message.content and r.usage.completion_tokens == 5, "chat non-stream with usage")
check(r.choices[0].finish_reason == "length", "finish_reason length when max_tokens caps")

chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(len(text) > 0 and chunks[0].choices[0].delta.role == "assistant", "chat stream deltas")
check(all(c.usage is None for c in chunks), "no usage chunk when the client did not ask")

chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
check(chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0, "usage chunk when asked")

c = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
check(c.choices[0].text and c.usage.completion_tokens == 4, "completions non-stream")
parts = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, stream=True))
check("".join(p.choices[0].text for p in parts if p.choices), "completions stream")

e = client.embeddings.create(model=MODEL, input=["a", "b"])
check(len(e.data) == 2 and len(e.data[0].embedding) > 0 and e.usage.prompt_tokens > 0, "embeddings (base64 by default)")
e = client.embeddings.create(model=MODEL, input="a", encoding_format="float")
check(isinstance(e.data[0].embedding[0], float), "embeddings float")

models = client.models.list()
check(MODEL in [m.id for m in models.data], "models list")

tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, stream=True)
name, args = None, ""
for ch in stream:
    if ch.choices and ch.choices[0].delta.tool_calls:
        tc = ch.choices[0].delta.tool_calls[0]
        name = name or (tc.function.name if tc.function else None)
        args += (tc.function.arguments or "") if tc.function else ""
check(name == "get_weather" and "location" in json.loads(args), "tool-call deltas assemble to valid JSON")

try:
    client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    check(False, "unknown model raises")
except Exception as exc:  # the SDK maps 404 to NotFoundError
    check(type(exc).__name__ == "NotFoundError", f"unknown model raises NotFoundError ({type(exc).__name__})")

raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
import uuid
rid = raw.headers.get("x-request-id", "")
check(uuid.UUID(rid).version == 7, f"x-request-id returned as a UUIDv7 ({rid})")
print("all SDK checks passed")
