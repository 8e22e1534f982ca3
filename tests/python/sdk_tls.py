"""The official openai Python SDK against a gateway serving https with a private CA.

Usage: sdk_tls.py BASE_URL CA_FILE (e.g. https://localhost:8443/v1 /tmp/ca.pem). Exits non-zero on
the first failure; run by tests/tls.rs.
"""
import ssl
import sys

from openai import APIConnectionError, DefaultHttpxClient, OpenAI

base_url, ca = sys.argv[1], sys.argv[2]
MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "hello over TLS"}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


client = OpenAI(base_url=base_url, api_key="sk-test", max_retries=0,
                http_client=DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)))
r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
check(r.choices[0].message.content and r.usage.completion_tokens == 5, "chat over https")

chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text and chunks[-1].usage.total_tokens > 0, "chat stream over https, usage last")

check(any(m.id == MODEL for m in client.models.list()), "model list over https")

# The system trust store does not know the private CA: the SDK must refuse the server.
untrusting = OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
try:
    untrusting.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    check(False, "a client without the CA is refused")
except APIConnectionError:
    check(True, "a client without the CA is refused")

print("all TLS SDK checks passed")
