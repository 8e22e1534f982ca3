#!/usr/bin/env python3
"""Fairness workload for loadtest/fairness.sh (standard library only).

Phase "alone": the light key alone, one request at a time with a pause, for --alone seconds.
Phase "flood": the flood key (--flood-clients closed-loop clients, long answers), the batch key
(--batch-clients, answers half as long) and the light key together for --flood seconds.
Flood and batch answer lengths vary by +-50% around their mean. Every client streams with stream_options.include_usage, so each request's exact prompt and
completion tokens are known; completion tokens are counted when their event arrives, prompt
tokens at the first event. Prints one JSON object with the figures.
"""
import argparse
import http.client
import json
import random
import threading
import time


def stream(host, port, key, tokens, content, out, stop_at):
    """One streamed chat request; appends (t, kind, n) token events to out; returns TTFT (s)."""
    body = json.dumps({
        "model": "mock-model", "stream": True, "max_tokens": tokens,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}],
    })
    conn = http.client.HTTPConnection(host, port, timeout=300)
    start = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body, {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json",
        "x-mock-tokens": str(tokens)})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        conn.close()
        return None, resp.status
    ttft = None
    first = None
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        now = time.monotonic()
        if b'"usage":{' in line and b'"choices":[]' in line:
            usage = json.loads(line[6:])["usage"]
            out.append((first or now, "prompt", usage["prompt_tokens"]))
            continue
        if b'"content":"' in line and b'"content":""' not in line:
            if ttft is None:
                ttft, first = now - start, now
            out.append((now, "completion", 1))
    conn.close()
    return ttft, 200


def closed_loop(host, port, key, tokens, content, out, stop_at, pause, ttfts, statuses, spread=0.0):
    # Answer lengths spread uniformly over +-spread of `tokens`, so that the backend's slots
    # do not free in lockstep.
    rng = random.Random(hash((key, threading.get_ident())))
    while time.monotonic() < stop_at:
        n = max(1, round(tokens * rng.uniform(1 - spread, 1 + spread)))
        ttft, status = stream(host, port, key, n, content, out, stop_at)
        statuses.append(status)
        if ttft is not None:
            ttfts.append(ttft)
        else:
            time.sleep(0.05)
        if pause:
            time.sleep(pause)


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--alone", type=float, default=20)
    ap.add_argument("--flood", type=float, default=60)
    ap.add_argument("--window", type=float, default=10)
    ap.add_argument("--flood-clients", type=int, default=32)
    ap.add_argument("--batch-clients", type=int, default=8)
    ap.add_argument("--flood-tokens", type=int, default=200)
    ap.add_argument("--light-tokens", type=int, default=8)
    ap.add_argument("--light-pause", type=float, default=0.25)
    a = ap.parse_args()
    host = "127.0.0.1"
    prompt = "tell me a long story " * 8  # about 40 tokens

    # Alone.
    light_alone, st = [], []
    closed_loop(host, a.port, "sk-light-0000001", a.light_tokens, "hi", [], time.monotonic() + a.alone,
                a.light_pause, light_alone, st)

    # Flood.
    events = {"flood": [], "batch": [], "light": []}
    ttfts = {"flood": [], "batch": [], "light": []}
    statuses = {"flood": [], "batch": [], "light": []}
    start = time.monotonic()
    stop_at = start + a.flood
    threads = []
    spec = [("flood", "sk-flood-0000001", a.flood_tokens, a.flood_clients),
            ("batch", "sk-batch-0000001", a.flood_tokens // 2, a.batch_clients)]
    for name, key, tokens, n in spec:
        for _ in range(n):
            threads.append(threading.Thread(target=closed_loop, args=(
                host, a.port, key, tokens, prompt, events[name], stop_at, 0, ttfts[name],
                statuses[name], 0.5)))
    # The light key starts once the others have filled the backends.
    def light():
        time.sleep(2)
        closed_loop(host, a.port, "sk-light-0000001", a.light_tokens, "hi", events["light"], stop_at,
                    a.light_pause, ttfts["light"], statuses["light"])
    threads.append(threading.Thread(target=light))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic()

    windows = []
    w = start
    while w + a.window <= stop_at + 1e-9:
        row = {}
        for name in events:
            row[name] = sum(n for (t, _, n) in events[name] if w <= t < w + a.window)
        backlogged = row["flood"] + row["batch"]
        row["flood_share"] = row["flood"] / backlogged if backlogged else None
        windows.append(row)
        w += a.window
    flood_window = [e for name in events for e in events[name] if start <= e[0] < stop_at]
    completion = sum(n for (_, k, n) in flood_window if k == "completion")
    total = sum(n for (_, _, n) in flood_window)
    result = {
        "light_alone_ttft_p50_ms": pct(light_alone, 50) * 1000,
        "light_alone_ttft_p90_ms": pct(light_alone, 90) * 1000,
        "light_alone_requests": len(light_alone),
        "light_flood_ttft_p50_ms": (pct(ttfts["light"], 50) or 0) * 1000,
        "light_flood_ttft_p90_ms": (pct(ttfts["light"], 90) or 0) * 1000,
        "light_flood_requests": len(ttfts["light"]),
        "windows": windows,
        "completion_tokens_per_s": completion / a.flood,
        "tokens_per_s": total / a.flood,
        "statuses": {k: {str(s): v.count(s) for s in set(v)} for k, v in statuses.items()},
        "drain_s": end - stop_at,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
