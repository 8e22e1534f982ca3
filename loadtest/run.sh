#!/usr/bin/env bash
# llmproxy load test: the simulator directly, llmproxy in front of it and nginx in front of it,
# measured side by side in one run. See loadtest/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: loadtest/run.sh [options]

  --quick                3 s per wrk run and 500 probe requests (validation run)
  --duration SECONDS     wrk duration per run (default 10)
  --rounds R             repeat the interleaved target sequence R times (default 1)
  --workers N            llmproxy workers = nginx worker_processes (default 1)
  --sim-workers N        simulator workers (default 1)
  --connections C        wrk keep-alive connections (default 64; wrk threads: 2)
  --requests N           streaming probe requests per target and pass (default 2000; --quick: 500)
  --stream-concurrency C second streaming pass at concurrency C, 0 = skip (default 16)
  --itl-ms MS            simulator inter-token delay for the streaming part (default 1)
  --tokens N             tokens per streamed response (default 8)
  --busy-poll D          busy_poll of the "busy" target (default 50us)
  --llmproxy PATH        use this llmproxy binary instead of building one
  --sim PATH             binary whose `mock-llm` subcommand is the simulator (default: the llmproxy binary)
  --no-build             do not run cargo build (binaries must exist)
  --keep                 keep the temp dir (configs, logs, raw JSON) and print its path
  -h, --help             this text
EOF
}

ORIG_CMD="loadtest/run.sh${*:+ $*}"
DURATION=10; ROUNDS=1; WORKERS=1; SIM_WORKERS=1; CONNS=64; WRK_THREADS=2
REQUESTS=""; CONC2=16; ITL_MS=1; TOKENS=8; LLMPROXY=""; SIM=""; BUILD=1; KEEP=0; QUICK=0
WARMUP_S=1; PROBE_WARMUP=100; BUSY_POLL=50us

SCRIPT=run.sh
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; DURATION=3; shift ;;
    --duration) need_arg "$@"; DURATION=$2; shift 2 ;;
    --rounds) need_arg "$@"; ROUNDS=$2; shift 2 ;;
    --workers) need_arg "$@"; WORKERS=$2; shift 2 ;;
    --sim-workers) need_arg "$@"; SIM_WORKERS=$2; shift 2 ;;
    --connections) need_arg "$@"; CONNS=$2; shift 2 ;;
    --requests) need_arg "$@"; REQUESTS=$2; shift 2 ;;
    --stream-concurrency) need_arg "$@"; CONC2=$2; shift 2 ;;
    --itl-ms) need_arg "$@"; ITL_MS=$2; shift 2 ;;
    --tokens) need_arg "$@"; TOKENS=$2; shift 2 ;;
    --busy-poll) need_arg "$@"; BUSY_POLL=$2; shift 2 ;;
    --llmproxy) need_arg "$@"; LLMPROXY=$2; shift 2 ;;
    --sim) need_arg "$@"; SIM=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
if [[ -z "$REQUESTS" ]]; then
  if [[ $QUICK == 1 ]]; then REQUESTS=500; else REQUESTS=2000; fi
fi
for v in DURATION ROUNDS WORKERS SIM_WORKERS CONNS REQUESTS CONC2 ITL_MS TOKENS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
(( ROUNDS >= 1 && WORKERS >= 1 && SIM_WORKERS >= 1 && DURATION >= 1 && REQUESTS >= 1 )) \
  || die "--rounds, --workers, --sim-workers, --duration and --requests must be >= 1"
(( CONNS >= WRK_THREADS )) || die "--connections must be >= $WRK_THREADS (wrk threads)"


# ---------------------------------------------------------------- tools
missing=()
for t in wrk nginx curl jq awk; do command -v "$t" >/dev/null || missing+=("$t"); done
[[ $BUILD == 0 ]] || command -v cargo >/dev/null || missing+=(cargo)
if (( ${#missing[@]} )); then
  die "missing tool(s): ${missing[*]} (Debian: apt-get install -y wrk nginx curl jq; cargo via rustup)"
fi

# ---------------------------------------------------------------- build
build_all "$BUILD" "$LLMPROXY"
SIM=${SIM:-$LLMPROXY}
[[ -x "$SIM" ]] || die "simulator binary not found at $SIM"
"$SIM" mock-llm --help 2>/dev/null | grep -q -- '--itl-ms' \
  || die "$SIM has no working 'mock-llm' simulator (needs --ttft-ms/--itl-ms/--tokens; is branch mock merged?)"

# ---------------------------------------------------------------- processes
chmod 755 "$WORK"   # nginx workers may run as another user when started by root

# VmRSS of a process plus its direct children (nginx master + workers; shared pages count twice)
rss_tree_kib() {
  local total kids c
  total=$(rss_kib "$1")
  kids=$(ps -o pid= --ppid "$1" || true)
  for c in $kids; do total=$(( total + $(rss_kib "$c" || echo 0) )); done
  echo "$total"
}

# ACCESS_LOG "off" turns the access log off; "default" writes it as nginx does by default
# (format combined, no buffer), to a file in DIR instead of Debian's /var/log/nginx/access.log.
write_nginx_conf() { # DIR LISTEN_PORT BACKEND_PORT WORKERS ACCESS_LOG
  local d=$1 access_log="access_log $1/access.log combined;"
  mkdir -p "$d"; chmod 755 "$d"
  [[ $5 == off ]] && access_log="access_log off;"
  cat >"$d/nginx.conf" <<EOF
worker_processes $4;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    $access_log
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
    keepalive_requests 1000000;
    upstream sim {
        server 127.0.0.1:$3;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$2 reuseport;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
}

# llmproxy as shipped: only what any config must say, so the access log is on (to stderr, which
# `start` sends to a file).
write_default_conf() { # FILE LISTEN_PORT BACKEND_PORT WORKERS
  cat >"$1" <<EOF
listen: "127.0.0.1:$2"
workers: $4
backends:
  - url: "http://127.0.0.1:$3"
EOF
}

start_nginx() { # NAME DIR
  start "$1" nginx -p "$2" -c "$2/nginx.conf" -e "$2/error.log" -g 'daemon off;'
}

BODY_NS='{"model":"mock-model","messages":[{"role":"user","content":"Hello"}],"stream":false,"max_tokens":1}'
BODY_S="{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true,\"max_tokens\":$TOKENS}"

# The governed target authenticates keys, so every target gets the same Authorization header.
GOV_KEY=sk-loadtest-governed-0001
export LOADTEST_AUTH=$GOV_KEY
GOV_TABLE="loadtest_usage_$$"
PG_DSN="host=127.0.0.1 user=postgres dbname=test"

# The production path: a key checked, limits on (set high enough never to refuse), and metering
# to the SQLite spool, a webhook and PostgreSQL.
write_governed_conf() { # FILE LISTEN_PORT BACKEND_PORT WORKERS WEBHOOK_PORT TAG
  write_proxy_conf "$1" "$2" "$3" "$4"
  append_keys_conf "$1" "$GOV_KEY" "$WORK/quota-$6.db"
  append_metering_conf "$1" "$WORK/spool-$6.db" "$5" "$PG_DSN" "$GOV_TABLE"
}

# The governed path's own cost, apart from the sinks': keys and limits alone, and those plus
# metering into the SQLite spool with no reporter (no webhook or PostgreSQL process sharing the cores).
write_keys_conf() { # FILE LISTEN_PORT BACKEND_PORT WORKERS TAG
  write_proxy_conf "$1" "$2" "$3" "$4"
  append_keys_conf "$1" "$GOV_KEY" "$WORK/quota-keys-$5.db"
}
write_spool_conf() { # FILE LISTEN_PORT BACKEND_PORT WORKERS TAG
  write_proxy_conf "$1" "$2" "$3" "$4"
  append_keys_conf "$1" "$GOV_KEY" "$WORK/quota-spool-$5.db"
  printf 'usage_hook:\n  enabled: true\n  spool_path: "%s"\n' "$WORK/spool-only-$5.db" >>"$1"
}

# Two requests on one keep-alive connection: both must be 200 with the expected content.
smoke() { # LABEL PORT stream|plain
  local out body=$BODY_NS want='"choices"' url="http://127.0.0.1:$2/v1/chat/completions"
  if [[ $3 == stream ]]; then body=$BODY_S; want='data: [DONE]'; fi
  local req=(-H 'Content-Type: application/json' -H "Authorization: Bearer $GOV_KEY" -d "$body" -w '\nSMOKE %{http_code} %{num_connects}\n' "$url")
  out=$(curl -sS -N --max-time 10 "${req[@]}" --next "${req[@]}" 2>&1) || die "smoke test of $1 failed: $out"
  local codes; codes=$(awk '/^SMOKE / {printf "%s ", $2}' <<<"$out")
  if [[ "$codes" != "200 200 " ]] || (( $(grep -cF -- "$want" <<<"$out") < 2 )); then
    die "smoke test of $1 ($3): expected two 200 responses with '$want' on one connection, got status ${codes:-none}:"$'\n'"$out"
  fi
  if [[ $(awk '/^SMOKE / {c = $3} END {print c}' <<<"$out") != 0 ]]; then
    echo "run.sh: warning: $1 did not keep the connection alive between two requests" >&2
  fi
}

# Brings up simulator + llmproxy (bare and governed) + nginx for one part. Sets PORT_<target>.
phase_up() { # TAG GATEWAY_WORKERS SIM_ARGS...
  local tag=$1 gw=$2; shift 2
  local ports; ports=$("$PROBE" free-ports 9)
  read -r PORT_direct PORT_llmproxy PORT_nginx PORT_governed PORT_busy PORT_default PORT_nginx_log \
    PORT_keys PORT_spool <<<"$ports"
  start "sim-$tag" "$SIM" mock-llm --listen "127.0.0.1:$PORT_direct" --workers "$SIM_WORKERS" "$@"
  await_port "sim-$tag" "$PORT_direct"
  curl -fsS --max-time 5 "http://127.0.0.1:$PORT_direct/health" >/dev/null \
    || die "simulator GET /health failed (see $WORK/sim-$tag.log)"
  write_proxy_conf "$WORK/llmproxy-$tag.yaml" "$PORT_llmproxy" "$PORT_direct" "$gw"
  start "llmproxy-$tag" "$LLMPROXY" serve --config "$WORK/llmproxy-$tag.yaml"
  write_governed_conf "$WORK/governed-$tag.yaml" "$PORT_governed" "$PORT_direct" "$gw" "$PORT_webhook" "$tag"
  start "governed-$tag" "$LLMPROXY" serve --config "$WORK/governed-$tag.yaml"
  write_proxy_conf "$WORK/busy-$tag.yaml" "$PORT_busy" "$PORT_direct" "$gw"
  echo "busy_poll: $BUSY_POLL" >>"$WORK/busy-$tag.yaml"
  start "busy-$tag" "$LLMPROXY" serve --config "$WORK/busy-$tag.yaml"
  write_default_conf "$WORK/default-$tag.yaml" "$PORT_default" "$PORT_direct" "$gw"
  start "default-$tag" "$LLMPROXY" serve --config "$WORK/default-$tag.yaml"
  write_keys_conf "$WORK/keys-$tag.yaml" "$PORT_keys" "$PORT_direct" "$gw" "$tag"
  start "keys-$tag" "$LLMPROXY" serve --config "$WORK/keys-$tag.yaml"
  write_spool_conf "$WORK/spool-$tag.yaml" "$PORT_spool" "$PORT_direct" "$gw" "$tag"
  start "spool-$tag" "$LLMPROXY" serve --config "$WORK/spool-$tag.yaml"
  write_nginx_conf "$WORK/nginx-$tag" "$PORT_nginx" "$PORT_direct" "$gw" off
  start_nginx "nginx-$tag" "$WORK/nginx-$tag"
  write_nginx_conf "$WORK/nginx_log-$tag" "$PORT_nginx_log" "$PORT_direct" "$gw" default
  start_nginx "nginx_log-$tag" "$WORK/nginx_log-$tag"
  await_port "llmproxy-$tag" "$PORT_llmproxy"
  await_port "governed-$tag" "$PORT_governed"
  await_port "busy-$tag" "$PORT_busy"
  await_port "nginx-$tag" "$PORT_nginx"
  await_port "default-$tag" "$PORT_default"
  await_port "nginx_log-$tag" "$PORT_nginx_log"
  await_port "keys-$tag" "$PORT_keys"
  await_port "spool-$tag" "$PORT_spool"
}

# Metering must keep up: once the governed gateway's reporters have drained (or 60 s passed),
# records spooled, delivered to the webhook and rows in PostgreSQL, against requests answered.
metering_check() { # TAG
  local m="http://127.0.0.1:$PORT_governed/metrics" t0=$SECONDS requests spooled backlog
  while :; do
    backlog=$(curl -fsS "$m" | awk '/^llmproxy_usage_spool_backlog/ {s += $2} END {print s + 0}')
    (( backlog == 0 || SECONDS - t0 > 60 )) && break
    sleep 1
  done
  requests=$(curl -fsS "$m" | awk '/^llmproxy_requests_total/ {s += $2} END {print s + 0}')
  spooled=$(curl -fsS "$m" | awk '/^llmproxy_usage_records_total/ {s += $2} END {print s + 0}')
  local webhook pg
  webhook=$(jq -s '[.[].records] | add // 0' "$WORK/webhook.jsonl")
  pg=$(psql "$PG_DSN" -tAc "SELECT count(*) FROM $GOV_TABLE" 2>/dev/null || echo 0)
  jq -nc --arg tag "$1" --argjson req "$requests" --argjson sp "$spooled" --argjson wh "$webhook" \
    --argjson pg "$pg" --argjson bl "$backlog" \
    '{part:"metering", phase:$tag, requests:$req, spooled:$sp, webhook:$wh, postgres:$pg, backlog:$bl}' >>"$RESULTS"
  : >"$WORK/webhook.jsonl"
  psql "$PG_DSN" -qc "DELETE FROM $GOV_TABLE" >/dev/null 2>&1 || true
}

phase_down() { stop "spool-$1" "keys-$1" "nginx_log-$1" "default-$1" "nginx-$1" "busy-$1" "governed-$1" "llmproxy-$1" "sim-$1"; }

# busy = the bare relay with `busy_poll` on; default = llmproxy as shipped (access log on);
# nginx_log = nginx with its default access_log; keys = keys and limits, no metering; spool =
# keys, limits and metering into the spool with no reporter.
TARGETS=(direct llmproxy governed nginx busy default nginx_log keys spool)
# Target order for round R (1-based): rotated so that no target is always first or last.
order() { local r=$(( ($1 - 1) % ${#TARGETS[@]} )); echo "${TARGETS[@]:$r} ${TARGETS[@]:0:$r}"; }
port_of() { local v="PORT_$1"; echo "${!v}"; }

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"

PORT_webhook=$("$PROBE" free-ports 1)
start webhook python3 "$ROOT/tests/support/webhook_receiver.py" --count-only --port "$PORT_webhook" --out "$WORK/webhook.jsonl"
await_port webhook "$PORT_webhook"
trap 'psql "$PG_DSN" -qc "DROP TABLE IF EXISTS $GOV_TABLE" >/dev/null 2>&1 || true; cleanup' EXIT


# ---------------------------------------------------------------- idle memory
log "idle memory: llmproxy and nginx with 2 workers each, after start, before any load"
phase_up mem 2 --ttft-ms 0 --itl-ms 0
sleep 1
RSS_PROXY2=$(rss_kib "${PID_OF[llmproxy-mem]}")
RSS_NGINX2=$(rss_tree_kib "${PID_OF[nginx-mem]}")
phase_down mem
jq -nc --argjson p "$RSS_PROXY2" --argjson n "$RSS_NGINX2" \
  '{part:"rss", llmproxy_kib:$p, nginx_kib:$n}' >>"$RESULTS"

# ---------------------------------------------------------------- (a) non-streaming, wrk
# wrk_pass PART CONNECTIONS THREADS: every target, ROUNDS interleaved rounds
wrk_pass() {
  local part=$1 conns=$2 threads=$3 r t url line
  for r in $(seq "$ROUNDS"); do
    for t in $(order "$r"); do
      url="http://127.0.0.1:$(port_of "$t")/"
      wrk -c "$conns" -t "$threads" -d "${WARMUP_S}s" -s "$LT/post.lua" "$url" >/dev/null 2>&1 || true
      log "  $part, round $r: $t"
      wrk -c "$conns" -t "$threads" -d "${DURATION}s" --latency -s "$LT/post.lua" "$url" \
        >"$WORK/$part-$t-$r.txt" 2>&1 || { cat "$WORK/$part-$t-$r.txt" >&2; die "wrk failed against $t"; }
      line=$(sed -n 's/^JSON //p' "$WORK/$part-$t-$r.txt")
      [[ -n "$line" ]] || { cat "$WORK/$part-$t-$r.txt" >&2; die "no summary from wrk against $t"; }
      jq -c --arg p "$part" --arg t "$t" --argjson r "$r" '. + {part:$p, target:$t, round:$r}' <<<"$line" >>"$RESULTS"
    done
  done
}
log "(a) non-streaming: wrk -c $CONNS -t $WRK_THREADS -d ${DURATION}s, then -c 1 -t 1; $ROUNDS round(s)"
phase_up a "$WORKERS" --ttft-ms 0 --itl-ms 0 --tokens "$TOKENS"
for t in "${TARGETS[@]}"; do smoke "$t" "$(port_of "$t")" plain; done
wrk_pass wrk "$CONNS" "$WRK_THREADS"
wrk_pass wrk1 1 1
RSS_PROXY_AFTER=$(rss_kib "${PID_OF[llmproxy-a]}")
metering_check a
phase_down a

# ---------------------------------------------------------------- (b) streaming, probe
log "(b) streaming: $REQUESTS sequential requests per target (sim --ttft-ms 0 --itl-ms $ITL_MS --tokens $TOKENS)"
phase_up b "$WORKERS" --ttft-ms 0 --itl-ms "$ITL_MS" --tokens "$TOKENS"
for t in "${TARGETS[@]}"; do smoke "$t" "$(port_of "$t")" stream; done
PASSES=(1); (( CONC2 > 1 )) && PASSES+=("$CONC2")
for c in "${PASSES[@]}"; do
  for r in $(seq "$ROUNDS"); do
    for t in $(order "$r"); do
      log "  concurrency $c, round $r: $t"
      line=$("$PROBE" stream --addr "127.0.0.1:$(port_of "$t")" --requests "$REQUESTS" \
               --concurrency "$c" --warmup "$PROBE_WARMUP" --max-tokens "$TOKENS" --label "$t" \
               --auth "$GOV_KEY") \
        || die "probe failed against $t: $line"
      jq -c --arg t "$t" --argjson r "$r" --argjson c "$c" \
        '. + {part:"stream", target:$t, round:$r, conc:$c}' <<<"$line" >>"$RESULTS"
    done
  done
done
metering_check b
phase_down b

# ---------------------------------------------------------------- report
NPROC=$(nproc)
KERNEL=$(uname -r)
CPU=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
NGINX_V=$(nginx -v 2>&1 | sed 's/^nginx version: //')
WRK_V=$({ wrk -v 2>&1 || true; } | head -n1 | awk '{print $2}')
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (dirty)" || true)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

REPORT=$(jq -rs \
  --arg cmd "$ORIG_CMD" --arg nproc "$NPROC" --arg kernel "$KERNEL" --arg cpu "$CPU" \
  --arg nginxv "$NGINX_V" --arg wrkv "$WRK_V" --arg rev "$REV$DIRTY" --arg load "$LOAD" \
  --arg date "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
  --argjson workers "$WORKERS" --argjson simw "$SIM_WORKERS" --argjson dur "$DURATION" \
  --argjson rounds "$ROUNDS" --argjson conns "$CONNS" --argjson thr "$WRK_THREADS" \
  --argjson reqs "$REQUESTS" --argjson itl "$ITL_MS" --argjson tokens "$TOKENS" \
  --argjson rssafter "$RSS_PROXY_AFTER" --argjson wu "$WARMUP_S" --argjson pw "$PROBE_WARMUP" \
  --arg busy "$BUSY_POLL" '
  def median: sort | if length == 0 then null
      elif length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  def r0: if . == null then "–" else (. * 1 | round | tostring) end;
  def r2: if . == null then "–" else ((. * 100 | round) / 100 | tostring) end;
  def signed: if . == null then "–" elif . >= 0 then "+" + (round | tostring) else (round | tostring) end;
  def mib: (. / 1024 * 10 | round) / 10 | tostring;
  . as $all
  | ["direct","llmproxy","governed","nginx","busy","default","nginx_log","keys","spool"] as $T
  | def wrk($part): [ $T[] as $t | [$all[] | select(.part==$part and .target==$t)] as $rs
      | {t:$t, rps:([$rs[].rps]|median), p50:([$rs[].p50_us]|median), p90:([$rs[].p90_us]|median),
         p99:([$rs[].p99_us]|median),
         err:([$rs[] | .err_connect+.err_read+.err_write+.err_status+.err_timeout] | add // 0)} ];
    wrk("wrk") as $W
  | wrk("wrk1") as $W1
  | ($W[0]) as $wd
  | ($W1[0]) as $w1d
  | ([$all[] | select(.part=="stream") | .conc] | unique) as $concs
  | ($all[] | select(.part=="rss")) as $rss
  | def wrow($w): "| \($w.t) | \($w.rps|r0) | \($w.p50|r0) | \($w.p99|r0) | "
        + (if $w.t=="direct" then "– | – | " else "\(($w.p50-$wd.p50)|signed) | \(($w.p99-$wd.p99)|signed) | " end)
        + "\($w.err) |";
    def srows($c):
      [ $T[] as $t | [$all[] | select(.part=="stream" and .conc==$c and .target==$t)] as $rs
        | {t:$t, p50:([$rs[].ttft_us.p50]|median), p99:([$rs[].ttft_us.p99]|median),
           gap:([$rs[].gap_us_mean]|median), ev:([$rs[].events_per_request]|median),
           n:([$rs[].requests]|add), err:([$rs[].errors]|add)} ] as $S
      | $S[0] as $sd
      | ($S[] | "| \(.t) | \(.p50|r0) | \(.p99|r0) | "
          + (if .t=="direct" then "– | – | " else "\((.p50-$sd.p50)|signed) | \((.p99-$sd.p99)|signed) | " end)
          + "\(.gap|r0) | " + (if .t=="direct" then "– | " else "\((.gap-$sd.gap)|signed) | " end)
          + "\(.ev|r2) | \(.n) | \(.err) |");
  [ "# llmproxy load test",
    "",
    "- Command: `\($cmd)`",
    "- Date: \($date); llmproxy commit \($rev)",
    "- Machine: nproc \($nproc), kernel \($kernel), CPU \($cpu); load average before report \($load)",
    "- Tools: nginx \($nginxv), wrk \($wrkv)",
    "- Workers: llmproxy \($workers), nginx worker_processes \($workers), simulator \($simw); nothing pinned; load generators share the same cores",
    "- Every figure is the median over \($rounds) round(s); targets run interleaved, order rotated per round",
    "",
    ( [ $all[] | select(.part=="wrk" or .part=="wrk1") | .err_connect+.err_read+.err_write+.err_status+.err_timeout ]
      + [ $all[] | select(.part=="stream") | .errors ] | add // 0 ) as $errs
    | if $errs > 0 then "**WARNING: \($errs) failed requests (see the errors columns and the run logs); the figures of an affected target are not valid.**\n" else empty end,
    "## (a) Non-streaming chat completion (`stream:false`, `max_tokens:1`)",
    "",
    "wrk -c \($conns) -t \($thr) -d \($dur)s --latency -s loadtest/post.lua (after a \($wu) s unmeasured warm-up per target and round); simulator --ttft-ms 0 --itl-ms 0. Latencies in µs.",
    "",
    "| target | req/s | p50 | p99 | added p50 vs direct | added p99 vs direct | errors |",
    "|---|---:|---:|---:|---:|---:|---:|",
    ($W[] | wrow(.)),
    "",
    "- llmproxy / nginx throughput: **\(($W[1].rps / $W[3].rps)|r2)**; governed / llmproxy: **\(($W[2].rps / $W[1].rps)|r2)**; governed / nginx: **\(($W[2].rps / $W[3].rps)|r2)**",
    "- llmproxy / direct throughput: \(($W[1].rps / $W[0].rps)|r2); nginx / direct: \(($W[3].rps / $W[0].rps)|r2)",
    "- As shipped, access logs on: default / nginx_log throughput: **\(($W[5].rps / $W[6].rps)|r2)**; access log on / off: llmproxy \(($W[5].rps / $W[1].rps)|r2), nginx \(($W[6].rps / $W[3].rps)|r2)",
    "- The governed path without its sinks: keys and limits / llmproxy: **\(($W[7].rps / $W[1].rps)|r2)**; keys, limits and metering to the spool only / llmproxy: **\(($W[8].rps / $W[1].rps)|r2)**",
    "- governed = llmproxy with a key checked, per-key limits (requests_per_minute, max_concurrent), and metering to the SQLite spool, a webhook and PostgreSQL; busy = llmproxy with `busy_poll: \($busy)`; default = llmproxy with its default config (access log on, to stderr: a file here); nginx_log = nginx with its default `access_log` (combined, unbuffered, to a file); keys = governed without metering; spool = governed with metering into the SQLite spool and no reporter",
    "",
    "## (a1) Non-streaming at concurrency 1: the latency a gateway adds",
    "",
    "wrk -c 1 -t 1 -d \($dur)s --latency, same requests and processes as (a). µs.",
    "",
    "| target | req/s | p50 | p90 | p99 | added p50 | added p90 | added p99 | errors |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ( $W1[] | "| \(.t) | \(.rps|r0) | \(.p50|r0) | \(.p90|r0) | \(.p99|r0) | "
        + (if .t=="direct" then "– | – | – | " else "\((.p50-$w1d.p50)|signed) | \((.p90-$w1d.p90)|signed) | \((.p99-$w1d.p99)|signed) | " end)
        + "\(.err) |" ),
    "",
    "- Access log on vs off at concurrency 1, added p50: llmproxy \(($W1[5].p50-$W1[1].p50)|signed) µs, nginx \(($W1[6].p50-$W1[3].p50)|signed) µs",
    "",
    ( $concs[] as $c |
      "## (b) Streaming, concurrency \($c): time to first `data:` event",
      "",
      "loadtest/probe: \($reqs) requests per target (after \($pw) unmeasured), \($c) keep-alive connection(s), sequential requests on each; simulator --ttft-ms 0 --itl-ms \($itl) --tokens \($tokens), `max_tokens:\($tokens)`. TTFT = request write to first byte of the first `data:` event; gap = mean time between `data:` events (excluding `[DONE]`). µs.",
      "",
      "| target | TTFT p50 | TTFT p99 | added p50 | added p99 | mean gap | added gap | events/req | requests | errors |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      srows($c),
      "" ),
    "## Metering (governed target)",
    "",
    "| part | requests answered | records spooled | delivered to webhook | rows in PostgreSQL | backlog left |",
    "|---|---:|---:|---:|---:|---:|",
    ( $all[] | select(.part=="metering")
      | "| \(.phase) | \(.requests) | \(.spooled) | \(.webhook) | \(.postgres) | \(.backlog) |" ),
    "",
    "## Memory",
    "",
    "| process | VmRSS |",
    "|---|---:|",
    "| llmproxy, 2 workers, idle after start | \($rss.llmproxy_kib|mib) MiB |",
    "| nginx, 2 worker_processes, idle after start (master + workers summed) | \($rss.nginx_kib|mib) MiB |",
    "| llmproxy, \($workers) worker(s), after part (a) | \($rssafter|mib) MiB |",
    "",
    "## Raw runs",
    "",
    "For stream rows p50/p99 are TTFT and req/s is requests over the probe wall time.",
    "",
    "| part | round | target | conc | req/s | p50 | p99 | gap | errors |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ( $all[] | select(.part=="wrk" or .part=="wrk1")
      | "| \(.part) | \(.round) | \(.target) | \(if .part=="wrk1" then 1 else $conns end) | \(.rps|r0) | \(.p50_us) | \(.p99_us) | – | \(.err_connect+.err_read+.err_write+.err_status+.err_timeout) |" ),
    ( $all[] | select(.part=="stream")
      | "| stream | \(.round) | \(.target) | \(.conc) | \(.requests / .wall_s|r0) | \(.ttft_us.p50|r0) | \(.ttft_us.p99|r0) | \(.gap_us_mean|r0) | \(.errors) |" )
  ] | .[]' "$RESULTS")

mkdir -p "$LT/results"
printf '%s\n' "$REPORT" >"$LT/results/latest.md"
cp "$RESULTS" "$LT/results/latest.jsonl"
echo
printf '%s\n' "$REPORT"
echo
echo "(written to loadtest/results/latest.md; raw JSON lines in loadtest/results/latest.jsonl)" >&2
ERRORS=$(jq -s '[.[] | select(.part=="wrk" or .part=="wrk1") | .err_connect+.err_read+.err_write+.err_status+.err_timeout]
                + [.[] | select(.part=="stream") | .errors] | add // 0' "$RESULTS")
if (( ERRORS > 0 )); then
  echo "run.sh: $ERRORS requests failed during the measurements; see the errors columns" >&2
  exit 3
fi
