#!/usr/bin/env bash
# The LiteLLM proxy (from PyPI) beside llmproxy and the simulator directly, against the same
# simulator in one run: (a) non-streaming throughput/latency with wrk, (b) streaming TTFT with
# the probe. See loadtest/README.md.
set -euo pipefail
SCRIPT=litellm

usage() {
  cat <<'EOF'
usage: loadtest/litellm.sh [options]

  --quick               3 s per wrk run, 100 probe requests (validation run)
  --duration S          seconds per wrk run (default 10)
  --connections C       wrk connections (default 16; wrk threads min(C, 2))
  --requests N          streaming probe requests per target (default 300; --quick: 100)
  --stream-concurrency C probe concurrency (default 1)
  --itl-ms MS           simulator inter-token delay, streaming part (default 1)
  --tokens N            tokens per streamed response (default 8)
  --workers N           llmproxy workers = LiteLLM --num_workers (default 1)
  --sim-workers N       simulator workers (default 1)
  --litellm-spec SPEC   pip requirement to install (default 'litellm[proxy]'; pin e.g. 'litellm[proxy]==1.108.7')
  --no-install          do not pip install; loadtest/results/.venv must already have litellm
  --start-timeout S     seconds to wait for LiteLLM's /health/liveliness (default 180)
  --llmproxy PATH       use this llmproxy binary instead of building one
  --no-build            do not run cargo (binaries must exist)
  --keep                keep the temp dir (configs, logs incl. LiteLLM's) and print its path
  -h, --help            this text
EOF
}

ORIG_CMD="loadtest/litellm.sh${*:+ $*}"
DURATION=10; CONNS=16; REQUESTS=""; CONC=1; ITL_MS=1; TOKENS=8; WORKERS=1; SIM_WORKERS=1
SPEC='litellm[proxy]'; INSTALL=1; START_TIMEOUT=180; LLMPROXY_ARG=""; BUILD=1; KEEP=0; QUICK=0
WARMUP_S=1; PROBE_WARMUP=20
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; DURATION=3; shift ;;
    --duration) DURATION=${2:-}; shift; shift || true ;;
    --connections) CONNS=${2:-}; shift; shift || true ;;
    --requests) REQUESTS=${2:-}; shift; shift || true ;;
    --stream-concurrency) CONC=${2:-}; shift; shift || true ;;
    --itl-ms) ITL_MS=${2:-}; shift; shift || true ;;
    --tokens) TOKENS=${2:-}; shift; shift || true ;;
    --workers) WORKERS=${2:-}; shift; shift || true ;;
    --sim-workers) SIM_WORKERS=${2:-}; shift; shift || true ;;
    --litellm-spec) SPEC=${2:-}; shift; shift || true ;;
    --no-install) INSTALL=0; shift ;;
    --start-timeout) START_TIMEOUT=${2:-}; shift; shift || true ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "litellm: unknown option: $1" >&2; exit 1 ;;
  esac
done
[[ -n "$REQUESTS" ]] || { if [[ $QUICK == 1 ]]; then REQUESTS=100; else REQUESTS=300; fi; }

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in DURATION CONNS REQUESTS CONC ITL_MS TOKENS WORKERS SIM_WORKERS START_TIMEOUT; do
  is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
(( DURATION >= 1 && CONNS >= 1 && REQUESTS >= 1 && CONC >= 1 && WORKERS >= 1 && SIM_WORKERS >= 1 )) \
  || die "--duration, --connections, --requests, --stream-concurrency, --workers, --sim-workers must be >= 1"
missing=()
for t in wrk jq curl awk python3 openssl; do command -v "$t" >/dev/null || missing+=("$t"); done
(( ${#missing[@]} == 0 )) || die "missing tool(s): ${missing[*]} (Debian: apt-get install -y wrk jq curl python3 python3-venv openssl)"

# ---------------------------------------------------------------- LiteLLM from PyPI
VENV="$RESULTS_DIR/.venv"
if [[ $INSTALL == 1 ]] && ! [[ -x "$VENV/bin/litellm" && "$SPEC" == 'litellm[proxy]' ]]; then
  log "installing $SPEC into loadtest/results/.venv (pip)"
  mkdir -p "$RESULTS_DIR"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" >&2 \
    || die "python3 -m venv failed (Debian: apt-get install -y python3-venv)"
  "$VENV/bin/pip" install -q "$SPEC" >"$WORK/pip.log" 2>&1 \
    || { tail -n 30 "$WORK/pip.log" >&2; die "pip install '$SPEC' failed (log above)"; }
fi
[[ -x "$VENV/bin/litellm" ]] || die "no LiteLLM in $VENV (run without --no-install)"
LITELLM_V=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || echo unknown)

build_all "$BUILD" "$LLMPROXY_ARG"

# ---------------------------------------------------------------- processes
# One simulator for both parts: a non-streaming max_tokens:1 answer waits ttft only (0 here).
read -r PORT_direct PORT_llmproxy PORT_litellm <<<"$("$PROBE" free-ports 3)"
start sim "$LLMPROXY" mock-llm --listen "127.0.0.1:$PORT_direct" --workers "$SIM_WORKERS" \
  --ttft-ms 0 --itl-ms "$ITL_MS" --tokens "$TOKENS"
await_port sim "$PORT_direct"
write_proxy_conf "$WORK/llmproxy.yaml" "$PORT_llmproxy" "$PORT_direct" "$WORKERS"
start llmproxy "$LLMPROXY" serve --config "$WORK/llmproxy.yaml"
await_port llmproxy "$PORT_llmproxy"

# LiteLLM >= 1.10x refuses to start without a master key: every target gets the same
# Authorization header (the simulator and llmproxy without auth ignore it).
KEY="sk-$(openssl rand -hex 32)"
cat >"$WORK/litellm.yaml" <<EOF
model_list:
  - model_name: mock-model
    litellm_params:
      model: openai/mock-model
      api_base: http://127.0.0.1:$PORT_direct/v1
      api_key: x
litellm_settings:
  set_verbose: false
  telemetry: false
general_settings:
  master_key: $KEY
EOF
log "starting LiteLLM $LITELLM_V (--num_workers $WORKERS); it takes a while to import"
LITELLM_LOG=ERROR LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONUNBUFFERED=1 \
  start litellm "$VENV/bin/litellm" --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$PORT_litellm" \
  --num_workers "$WORKERS"
t_start=$SECONDS
until curl -fsS --max-time 2 "http://127.0.0.1:$PORT_litellm/health/liveliness" >/dev/null 2>&1; do
  if ! kill -0 "${PID_OF[litellm]}" 2>/dev/null; then
    tail -n 30 "$WORK/litellm.log" >&2; die "LiteLLM exited at start-up (log above)"
  fi
  (( SECONDS - t_start < START_TIMEOUT )) || { tail -n 30 "$WORK/litellm.log" >&2; die "LiteLLM not live after ${START_TIMEOUT} s"; }
  sleep 0.5
done
LITELLM_START_S=$(( SECONDS - t_start ))
log "LiteLLM live after ~${LITELLM_START_S} s"

TARGETS=(direct llmproxy litellm)
port_of() { local v="PORT_$1"; echo "${!v}"; }
pid_of() { case $1 in direct) echo "${PID_OF[sim]}";; *) echo "${PID_OF[$1]}";; esac; }
# CPU ticks of a process and its descendants (LiteLLM may fork workers)
tree_ticks() {
  local total=0 p kids
  total=$(cpu_ticks "$1" 2>/dev/null || echo 0)
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
  for p in $kids; do total=$(( total + $(tree_ticks "$p") )); done
  echo "$total"
}
tree_rss() {
  local total=0 p kids
  total=$(rss_kib "$1" 2>/dev/null || echo 0)
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
  for p in $kids; do total=$(( total + $(tree_rss "$p") )); done
  echo "$total"
}

BODY_NS='{"model":"mock-model","messages":[{"role":"user","content":"Hello"}],"stream":false,"max_tokens":1}'
BODY_S="{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true,\"max_tokens\":$TOKENS}"
smoke() { # TARGET
  local out code url="http://127.0.0.1:$(port_of "$1")/v1/chat/completions"
  out=$(curl -sS --max-time 30 -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY_NS" -w '\nHTTP %{http_code}' "$url" 2>&1) || true
  [[ $out == *'"choices"'* && $out == *'HTTP 200' ]] || die "smoke test (non-streaming) of $1 failed: $out"
  out=$(curl -sS -N --max-time 30 -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY_S" -w '\nHTTP %{http_code}' "$url" 2>&1) || true
  [[ $out == *'data: [DONE]'* && $out == *'HTTP 200' ]] || die "smoke test (streaming) of $1 failed: $out"
}
for t in "${TARGETS[@]}"; do smoke "$t"; done

RES="$WORK/litellm.jsonl"; : >"$RES"
# ---------------------------------------------------------------- (a) non-streaming
WRK_T=$(( CONNS < 2 ? CONNS : 2 ))
for t in "${TARGETS[@]}"; do
  url="http://127.0.0.1:$(port_of "$t")/"
  LOADTEST_AUTH=$KEY wrk -c "$CONNS" -t "$WRK_T" -d "${WARMUP_S}s" -s "$LT/post.lua" "$url" >/dev/null 2>&1 || true
  log "(a) $t: wrk -c $CONNS -t $WRK_T -d ${DURATION}s"
  pid=$(pid_of "$t"); c0=$(tree_ticks "$pid")
  LOADTEST_AUTH=$KEY run_bounded wrk $(( DURATION + 30 )) "$WORK/wrk-$t.txt" wrk -c "$CONNS" -t "$WRK_T" \
    -d "${DURATION}s" --timeout 10s --latency -s "$LT/post.lua" "$url" \
    || { cat "$WORK/wrk-$t.txt" "$WORK/wrk.err" >&2; die "wrk failed against $t"; }
  c1=$(tree_ticks "$pid")
  line=$(sed -n 's/^JSON //p' "$WORK/wrk-$t.txt")
  [[ -n "$line" ]] || { cat "$WORK/wrk-$t.txt" >&2; die "no summary from wrk against $t"; }
  jq -c --arg t "$t" --argjson ticks "$(( c1 - c0 ))" --argjson hz "$CLK_TCK" --argjson rss "$(tree_rss "$pid")" \
    '. + {part:"wrk", target:$t, cpu_s:($ticks/$hz), rss_kib:$rss,
          errors:(.err_connect+.err_read+.err_write+.err_status+.err_timeout)}' <<<"$line" >>"$RES"
done

# ---------------------------------------------------------------- (b) streaming TTFT
for t in "${TARGETS[@]}"; do
  log "(b) $t: probe stream, $REQUESTS requests at concurrency $CONC"
  rc=0
  run_bounded probe 300 "$WORK/probe-$t.json" "$PROBE" stream --addr "127.0.0.1:$(port_of "$t")" \
    --requests "$REQUESTS" --concurrency "$CONC" --warmup "$PROBE_WARMUP" --max-tokens "$TOKENS" --label "$t" \
    --auth "$KEY" || rc=$?
  line=$(cat "$WORK/probe-$t.json")
  [[ -n "$line" ]] || die "probe produced no result against $t (exit $rc)"
  jq -c --arg t "$t" '. + {part:"stream", target:$t}' <<<"$line" >>"$RES"
done

# ---------------------------------------------------------------- report
REPORT=$( {
  echo "# llmproxy vs LiteLLM proxy vs direct"
  echo
  machine_info "$ORIG_CMD"
  echo "- LiteLLM $LITELLM_V from PyPI (\`pip install '$SPEC'\`, venv loadtest/results/.venv, Python $("$VENV/bin/python" -V 2>&1 | cut -d' ' -f2)): \`litellm --config FILE --num_workers $WORKERS\`, one model \`openai/mock-model\` at the simulator, master key set (required by LiteLLM; every target gets the same Authorization header), no database, no callbacks, LITELLM_LOG=ERROR; live ~${LITELLM_START_S} s after start"
  echo "- llmproxy workers $WORKERS (config: listen, workers, one backend); simulator workers $SIM_WORKERS, --ttft-ms 0 --itl-ms $ITL_MS --tokens $TOKENS, one simulator for every target"
  echo
  echo "## (a) Non-streaming (\`stream:false\`, \`max_tokens:1\`)"
  echo
  echo "wrk -c $CONNS -t $WRK_T -d ${DURATION}s --timeout 10s --latency -s loadtest/post.lua after a ${WARMUP_S} s warm-up, targets in the order direct, llmproxy, litellm. CPU = utime+stime of the target process and its children during the run; RSS after the run. Latencies in µs."
  echo
  jq -rs '
    def r(n): if . == null then "–" else ((. * pow(10; n) | round) / pow(10; n) | tostring) end;
    def signed: if . == null then "–" elif . >= 0 then "+" + (round | tostring) else (round | tostring) end;
    [.[] | select(.part == "wrk")] as $w | ($w | map(select(.target == "direct")) | first) as $d
    | "| target | req/s | p50 | p99 | added p50 | added p99 | CPU s | CPU ms per request | RSS MiB | errors |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      ($w[] | "| \(.target)\(if .target == "direct" then " (simulator)" else "" end) | \(.rps|r(0)) | \(.p50_us) | \(.p99_us) | "
        + (if .target == "direct" then "– | – | " else "\((.p50_us - $d.p50_us)|signed) | \((.p99_us - $d.p99_us)|signed) | " end)
        + "\(.cpu_s|r(2)) | \(if .requests > 0 then (.cpu_s * 1000 / .requests | r(3)) else "–" end) | \(.rss_kib/1024|r(1)) | \(.errors) |"),
      "",
      ( ($w | map(select(.target == "llmproxy")) | first) as $p | ($w | map(select(.target == "litellm")) | first) as $l
        | "- llmproxy / LiteLLM throughput: **\(($p.rps / $l.rps)|r(1))x**")
  ' "$RES"
  echo
  echo "## (b) Streaming: time to first \`data:\` event"
  echo
  echo "loadtest/probe stream: $REQUESTS requests per target after $PROBE_WARMUP unmeasured, concurrency $CONC, keep-alive; \`stream:true, max_tokens:$TOKENS\`. TTFT = request write to first byte of the first \`data:\` event; gap = mean time between events. µs."
  echo
  jq -rs '
    def r(n): if . == null then "–" else ((. * pow(10; n) | round) / pow(10; n) | tostring) end;
    def signed: if . == null then "–" elif . >= 0 then "+" + (round | tostring) else (round | tostring) end;
    [.[] | select(.part == "stream")] as $s | ($s | map(select(.target == "direct")) | first) as $d
    | "| target | TTFT p50 | TTFT p99 | added p50 | added p99 | mean gap | events/req | requests | errors |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
      ($s[] | "| \(.target) | \(.ttft_us.p50|r(0)) | \(.ttft_us.p99|r(0)) | "
        + (if .target == "direct" then "– | – | " else "\((.ttft_us.p50 - $d.ttft_us.p50)|signed) | \((.ttft_us.p99 - $d.ttft_us.p99)|signed) | " end)
        + "\(.gap_us_mean|r(0)) | \(.events_per_request|r(2)) | \(.requests) | \(.errors)\(if .first_error then " (" + .first_error + ")" else "" end) |")
  ' "$RES"
} )

mkdir -p "$RESULTS_DIR"
printf '%s\n' "$REPORT" >"$RESULTS_DIR/litellm.md"
cp "$RES" "$RESULTS_DIR/litellm.jsonl"
echo
printf '%s\n' "$REPORT"
echo
echo "(written to loadtest/results/litellm.md and litellm.jsonl)" >&2
ERRORS=$(jq -s '[.[] | select(.part == "wrk") | .errors] + [.[] | select(.part == "stream") | .errors] | add // 0' "$RES")
(( ERRORS == 0 )) || { echo "$SCRIPT: $ERRORS failed requests" >&2; exit 3; }
