#!/usr/bin/env bash
# Worker instructions per request, by callgrind (repeatable whatever the machine's load): runs
# `llmproxy serve` under valgrind with one worker (io_driver: epoll; valgrind does not run
# io_uring), access log off, in front of `llmproxy mock-llm`, sends N non-streaming chat requests
# over one keep-alive connection, and prints the busiest thread's instructions (the worker).
# Per request = (the figure for 3000 - the figure for 1000) / 2000: start-up and idle ticks cancel.
#
# usage: loadtest/callgrind.sh LLMPROXY_BINARY N
set -euo pipefail
[[ $# == 2 ]] || { sed -n 2,8p "$0" >&2; exit 2; }
BIN=$1; N=$2
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
D=$(mktemp -d /tmp/llmproxy-callgrind.XXXX)
trap 'kill "${GW:-}" "${SIM:-}" 2>/dev/null || true; rm -rf "$D"' EXIT
"$BIN" mock-llm --listen 127.0.0.1:0 --ready-file "$D/sim.ready" >"$D/sim.log" 2>&1 & SIM=$!
for _ in $(seq 100); do [[ -s $D/sim.ready ]] && break; sleep 0.05; done
SIMADDR=$(awk '/^listen /{print $2}' "$D/sim.ready")
PORT=$((20000 + RANDOM % 20000))
cat >"$D/c.yaml" <<Y
listen: "127.0.0.1:$PORT"
workers: 1
io_driver: epoll
log: {access: false}
backends: [{url: "http://$SIMADDR"}]
Y
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.out.%p" \
  "$BIN" serve --config "$D/c.yaml" >"$D/gw.log" 2>&1 & GW=$!
python3 - "$PORT" "$N" <<'PY'
import http.client, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.connect()
        break
    except OSError:
        time.sleep(0.1)
body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
for _ in range(n):
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
kill -INT "$GW"; wait "$GW" 2>/dev/null || true; GW=
cat "$D"/cg.out.* | awk '/^summary:/ {print $2}' | sort -n | tail -1
