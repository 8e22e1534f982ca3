"""The official openai Python SDK classifies the gateway's auth and limit refusals.

Usage: sdk_auth_errors.py BASE_URL GOOD_KEY SPENT_KEY. The gateway allows GOOD_KEY one request per
minute and marks SPENT_KEY quota_exceeded; run by tests/auth_openai_sdk.rs.
"""
import sys

import openai
from openai import OpenAI

base, good, spent = sys.argv[1:4]
MESSAGES = [{"role": "user", "content": "hi"}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def refusal(key):
    client = OpenAI(base_url=base, api_key=key, max_retries=0)
    try:
        client.chat.completions.create(model="mock-model", messages=MESSAGES)
    except openai.APIStatusError as e:
        return e
    return None


e = refusal("sk-not-a-key")
check(isinstance(e, openai.AuthenticationError), f"unknown key -> AuthenticationError ({e!r})")
check(e.code == "invalid_api_key", "code invalid_api_key")

r = OpenAI(base_url=base, api_key=good, max_retries=0).chat.completions.with_raw_response.create(
    model="mock-model", messages=MESSAGES)
check(r.headers.get("x-ratelimit-limit-requests") == "1", "x-ratelimit headers on success")

e = refusal(good)
check(isinstance(e, openai.RateLimitError), f"over the rate -> RateLimitError ({e!r})")
check(e.code == "rate_limit_exceeded", "code rate_limit_exceeded")
check(e.response.headers.get("retry-after") is not None, "Retry-After")

e = refusal(spent)
check(isinstance(e, openai.RateLimitError), f"quota spent -> RateLimitError ({e!r})")
check(e.code == "insufficient_quota" and e.type == "insufficient_quota", "insufficient_quota")

print("all SDK auth checks passed")
