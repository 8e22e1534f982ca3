"""The official anthropic and openai Python SDKs against the simulator's Messages and Responses
endpoints: the SDKs must parse every answer, and the usage must be what vLLM would report.

Usage: sdk_dialects.py BASE_URL (e.g. http://127.0.0.1:8001); exits 1 on the first failed
check. tests/dialects_sdk.rs checks first that both SDKs import.
"""
import sys

import anthropic
import openai

BASE = sys.argv[1]
MODEL = "mock-model"
TOKENS = 6  # the simulator runs with --tokens 6
PROMPT = "Say hello to the gateway"  # 24 characters: 6 prompt tokens
MESSAGES = [{"role": "user", "content": PROMPT}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


claude = anthropic.Anthropic(base_url=BASE, api_key="sk-test", max_retries=0)

m = claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
check(m.content[0].type == "text" and m.content[0].text, "messages.create text")
check(m.stop_reason == "end_turn", "messages.create stop_reason end_turn")
check((m.usage.input_tokens, m.usage.output_tokens) == (6, TOKENS), f"messages.create usage {m.usage}")

m = claude.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES)
check(m.stop_reason == "max_tokens" and m.usage.output_tokens == 2, "max_tokens caps the answer")

with claude.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
check(text and text == final.content[0].text, "messages.stream text equals the final message")
check((final.usage.input_tokens, final.usage.output_tokens) == (6, TOKENS), f"messages.stream usage {final.usage}")
check(final.stop_reason == "end_turn", "messages.stream stop_reason")

events = [e.type for e in claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True)]
check(events[0] == "message_start" and events[-1] == "message_stop", f"raw stream events {events}")
check(events.count("content_block_delta") == TOKENS, "one content_block_delta per token")

n = claude.messages.count_tokens(model=MODEL, messages=MESSAGES)
check(n.input_tokens == 6, f"messages.count_tokens {n}")

try:
    claude.messages.create(model="no-such-model", max_tokens=5, messages=MESSAGES)
    check(False, "unknown model raises")
except anthropic.NotFoundError as e:
    check(e.status_code == 404, "unknown model raises anthropic.NotFoundError")

client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", max_retries=0)

r = client.responses.create(model=MODEL, input=PROMPT)
check(r.status == "completed" and r.output_text, "responses.create output_text")
u = r.usage
check((u.input_tokens, u.output_tokens, u.total_tokens) == (6, TOKENS, 6 + TOKENS), f"responses.create usage {u}")
check(u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0, "usage details")

r = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=2)
check(r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", "max_output_tokens: incomplete")

events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": PROMPT}], stream=True))
types = [e.type for e in events]
check(types[:2] == ["response.created", "response.in_progress"], f"stream opens {types[:2]}")
check([e.sequence_number for e in events] == list(range(len(events))), "sequence numbers count from 0")
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
done = events[-1]
check(done.type == "response.completed" and done.response.output_text == deltas, "response.completed carries the text")
u = done.response.usage
check((u.input_tokens, u.output_tokens) == (6, TOKENS), f"streamed usage {u}")

with client.responses.stream(model=MODEL, input=PROMPT) as stream:
    final = stream.get_final_response()
check(final.usage.output_tokens == TOKENS, "responses.stream final response")

print("all dialect SDK checks passed")
