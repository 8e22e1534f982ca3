"""The real `anthropic` and `openai` Python SDKs through the gateway, on every API it meters.

Usage: sdk_dialects.py GATEWAY_URL GOOD_KEY LIMITED_KEY QUOTA_KEY. GOOD_KEY is unlimited,
LIMITED_KEY may make one request per minute, QUOTA_KEY has a total_quota that one request spends.
Prints `usage <client-request-id> <json>` for each metered call, as the SDK reports it, so
tests/dialects_billing_sdk.rs can compare the gateway's records with what the client saw. Run by that test.
"""
import json
import sys
import time

import anthropic
import openai

gateway, good, limited, quota = sys.argv[1:5]
MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def report(rid, usage):
    print(f"usage {rid} {json.dumps(usage)}", flush=True)


def claude(key):
    return anthropic.Anthropic(base_url=gateway, api_key=key, max_retries=0)


def oai(key):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)


def rid(name):
    return {"X-Request-Id": name}


# Anthropic Messages, JSON and streaming, and count_tokens.
msg = claude(good).messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                   extra_headers=rid("t-messages-json"))
check(msg.type == "message" and msg.content[0].type == "text", "messages.create answers a message")
check(msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, "messages.create reports usage")
report("t-messages-json", msg.usage.model_dump())

with claude(good).messages.stream(model=MODEL, max_tokens=12, messages=MESSAGES,
                                  extra_headers=rid("t-messages-stream")) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
check(len(text) > 0, "messages.stream streams text")
check(final.usage.output_tokens > 0, "messages.stream ends with usage")
report("t-messages-stream", final.usage.model_dump())

counted = claude(good).messages.count_tokens(model=MODEL, messages=MESSAGES,
                                             extra_headers=rid("t-count-tokens"))
check(counted.input_tokens > 0, "messages.count_tokens answers")

# OpenAI Responses, JSON and streaming, and embeddings.
resp = oai(good).responses.create(model=MODEL, input="Say hello.", max_output_tokens=12,
                                  extra_headers=rid("t-responses-json"))
# The length limit ends the answer "incomplete", as vLLM reports it.
check(resp.status in ("completed", "incomplete") and resp.output_text, "responses.create answers")
report("t-responses-json", resp.usage.model_dump())

done = None
for event in oai(good).responses.create(model=MODEL, input="Say hello.", max_output_tokens=12,
                                        stream=True, extra_headers=rid("t-responses-stream")):
    if event.type in ("response.completed", "response.incomplete"):
        done = event.response
check(done is not None and done.usage.output_tokens > 0, "responses stream completes with usage")
report("t-responses-stream", done.usage.model_dump())

emb = oai(good).embeddings.create(model=MODEL, input="hello", extra_headers=rid("t-embeddings"))
check(len(emb.data[0].embedding) > 0, "embeddings.create answers")
report("t-embeddings", emb.usage.model_dump())

# Refusals raise the SDK's own classes, on both APIs.
try:
    claude("sk-not-a-key").messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
    check(False, "an unknown key is refused")
except anthropic.AuthenticationError as e:
    check(e.status_code == 401, f"anthropic: unknown key -> AuthenticationError ({e!r})")

claude(limited).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
try:
    claude(limited).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
    check(False, "the second request of the minute is refused")
except anthropic.RateLimitError as e:
    check(e.status_code == 429, f"anthropic: over the rate -> RateLimitError ({e!r})")
try:
    oai(limited).responses.create(model=MODEL, input="hi")
    check(False, "the rate applies to responses too")
except openai.RateLimitError as e:
    check(e.status_code == 429, f"openai: over the rate -> RateLimitError ({e!r})")

# One Messages request spends QUOTA_KEY's quota; once it is charged, every dialect is refused.
claude(quota).messages.create(model=MODEL, max_tokens=12, messages=MESSAGES)


def spent_everywhere():
    calls = [
        lambda: claude(quota).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES),
        lambda: oai(quota).responses.create(model=MODEL, input="hi"),
        lambda: oai(quota).chat.completions.create(model=MODEL, messages=MESSAGES),
        lambda: oai(quota).embeddings.create(model=MODEL, input="hi"),
    ]
    refused = 0
    for call in calls:
        try:
            call()
        except (anthropic.RateLimitError, openai.RateLimitError):
            refused += 1
    return refused == len(calls)


deadline = time.time() + 10
while not spent_everywhere():
    check(time.time() < deadline, "a spent quota is refused on every dialect within 10 s")
    time.sleep(0.05)
check(True, "a spent quota is refused on messages, responses, chat and embeddings")
print("all dialect SDK checks passed")
