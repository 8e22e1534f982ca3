#!/usr/bin/env bash
# TLS termination, side by side in one run: llmproxy and nginx terminating https with the same
# certificate (ECDSA P-256, made here with openssl) and cipher (TLS 1.3, both take the client's
# first choice, TLS_AES_256_GCM_SHA384 from wrk's OpenSSL), in front of the same simulator over
# plain HTTP; plus llmproxy without TLS. Rounds are interleaved so that the shared machine's
# noise falls on every target alike.
#
#   loadtest/tls.sh [--llmproxy BIN] [--rounds N] [--duration 10s] [--connections 64]
#
# Prints per target and round: non-streaming chat completions per second (wrk, keep-alive) and
# p50/p99 latency; then the time to first token of a stream at one connection (p50, p99 over
# 300 requests on a kept-alive connection, Python client) plain and over TLS.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/llmproxy
ROUNDS=3
DURATION=10s
CONNS=64
while [[ $# -gt 0 ]]; do
  case $1 in
    --llmproxy) BIN=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for t in wrk nginx openssl python3 "$BIN"; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install -y wrk nginx openssl)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/llmproxy-tls-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
await_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 644 "$WORK/key.pem"

SIM=$(free_port); PLAIN=$(free_port); TLS=$(free_port); NGINX=$(free_port)
"$BIN" mock-llm --listen "127.0.0.1:$SIM" --tokens 4 >"$WORK/sim.log" 2>&1 & PIDS+=($!)
cat >"$WORK/plain.yaml" <<EOF
listen: "127.0.0.1:$PLAIN"
workers: 1
log: {access: false}
backends: [{url: "http://127.0.0.1:$SIM"}]
EOF
sed -e "s/$PLAIN/$TLS/" "$WORK/plain.yaml" >"$WORK/tls.yaml"
printf 'tls:\n  cert: "%s"\n  key: "%s"\n' "$WORK/cert.pem" "$WORK/key.pem" >>"$WORK/tls.yaml"
"$BIN" --config "$WORK/plain.yaml" >"$WORK/plain.log" 2>&1 & PIDS+=($!)
"$BIN" --config "$WORK/tls.yaml" >"$WORK/tls.log" 2>&1 & PIDS+=($!)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 1000000;
    upstream sim { server 127.0.0.1:$SIM; keepalive 256; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NGINX ssl reuseport;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;' & PIDS+=($!)
for p in $SIM $PLAIN $TLS $NGINX; do await_port "$p"; done

echo "rev $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty), $(nginx -v 2>&1), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "target round rps p50_us p99_us"
for round in $(seq "$ROUNDS"); do
  for target in llmproxy_tls nginx_tls llmproxy_plain; do
    case $target in
      llmproxy_tls) url="https://127.0.0.1:$TLS" ;;
      nginx_tls) url="https://127.0.0.1:$NGINX" ;;
      llmproxy_plain) url="http://127.0.0.1:$PLAIN" ;;
    esac
    line=$(wrk -t1 -c"$CONNS" -d"$DURATION" -s loadtest/post.lua "$url" | sed -n 's/^JSON //p')
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["err_status"]==0 and d["err_connect"]==0, d; print(sys.argv[2], sys.argv[3], d["rps"], d["p50_us"], d["p99_us"])' "$line" "$target" "$round"
  done
done

# New handshakes per second: `openssl s_time -new` opens a connection, completes a full
# handshake (no session resumption) and closes it, one after another, for 5 s.
for round in $(seq "$ROUNDS"); do
  for target in llmproxy_tls nginx_tls; do
    port=$TLS; [[ $target == nginx_tls ]] && port=$NGINX
    line=$(openssl s_time -connect "127.0.0.1:$port" -new -time 5 2>/dev/null | grep 'real seconds' | head -n1)
    # "N connections in T real seconds, B bytes read per connection"
    awk -v t="$target" -v r="$round" '{printf "handshakes %s round %s: %d in %s s, %.0f per second\n", t, r, $1, $4, $1 / $4}' <<<"$line"
  done
done

# Time to first token at one connection: request sent -> first body byte of a stream.
python3 - "$PLAIN" "$TLS" "$WORK/cert.pem" <<'PY'
import http.client, json, ssl, sys, time
plain, tls, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
body = json.dumps({"model": "mock-model", "stream": True, "max_tokens": 2,
                   "messages": [{"role": "user", "content": "Hello"}]})
def ttfts(conn, n=300):
    out = []
    for _ in range(n + 20):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read1(1)
        out.append((time.perf_counter() - t0) * 1e6)
        r.read()
    out = sorted(out[20:])
    return out[len(out) // 2], out[int(len(out) * 0.99)]
ctx = ssl.create_default_context(cafile=ca)
for rnd in range(3):
    p = ttfts(http.client.HTTPConnection("127.0.0.1", plain))
    t = ttfts(http.client.HTTPSConnection("127.0.0.1", tls, context=ctx))
    print(f"ttft round {rnd + 1}: plain p50 {p[0]:.0f} us p99 {p[1]:.0f} us; tls p50 {t[0]:.0f} us p99 {t[1]:.0f} us; tls - plain p50 {t[0] - p[0]:+.0f} us")
PY
