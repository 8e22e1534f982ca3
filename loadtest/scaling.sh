#!/usr/bin/env bash
# How llmproxy's cost grows with load: CPU per 1k requests/s (non-streaming, wrk at 1x/4x/16x
# connections) and memory per stream (soak at 1x/4x/16x concurrent streams). Markdown table and
# PNG plot in loadtest/results/. See loadtest/README.md.
set -euo pipefail
SCRIPT=scaling

usage() {
  cat <<'EOF'
usage: loadtest/scaling.sh [options]

  --levels "L..."      load multipliers (default "1 4 16")
  --base-conns C       wrk connections at 1x (default 4: 4/16/64)
  --base-streams S     concurrent streams at 1x (default 250: 250/1000/4000)
  --duration S         seconds per wrk run (default 10; --quick: 3)
  --quick              --duration 3 --base-streams 100
  --itl-ms MS          simulator inter-token delay for the soak part (default 100)
  --tokens N           tokens per stream in the soak part (default 40; stream ~ tokens x itl)
  --ramp-ms MS         soak ramp (default 2000)
  --workers N          llmproxy workers (default 2)
  --sim-workers N      simulator workers (default 2)
  --skip-streams       only the CPU part
  --llmproxy PATH      use this llmproxy binary instead of building one
  --no-build           do not run cargo (binaries must exist)
  --keep               keep the temp dir
  -h, --help           this text
EOF
}

ORIG_CMD="loadtest/scaling.sh${*:+ $*}"
LEVELS="1 4 16"; BASE_CONNS=4; BASE_STREAMS=250; DURATION=10; ITL_MS=100; TOKENS=40; RAMP_MS=2000
WORKERS=2; SIM_WORKERS=2; SKIP_STREAMS=0; LLMPROXY_ARG=""; BUILD=1; KEEP=0; WARMUP_S=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --levels) LEVELS=${2:-}; shift; shift || true ;;
    --base-conns) BASE_CONNS=${2:-}; shift; shift || true ;;
    --base-streams) BASE_STREAMS=${2:-}; shift; shift || true ;;
    --duration) DURATION=${2:-}; shift; shift || true ;;
    --quick) DURATION=3; BASE_STREAMS=100; shift ;;
    --itl-ms) ITL_MS=${2:-}; shift; shift || true ;;
    --tokens) TOKENS=${2:-}; shift; shift || true ;;
    --ramp-ms) RAMP_MS=${2:-}; shift; shift || true ;;
    --workers) WORKERS=${2:-}; shift; shift || true ;;
    --sim-workers) SIM_WORKERS=${2:-}; shift; shift || true ;;
    --skip-streams) SKIP_STREAMS=1; shift ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "scaling: unknown option: $1" >&2; exit 1 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in BASE_CONNS BASE_STREAMS DURATION ITL_MS TOKENS RAMP_MS WORKERS SIM_WORKERS; do
  is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
for l in $LEVELS; do is_uint "$l" && (( l >= 1 )) || die "--levels must be positive integers (got '$LEVELS')"; done
(( BASE_CONNS >= 1 && DURATION >= 1 )) || die "--base-conns and --duration must be >= 1"
missing=()
for t in wrk jq curl awk python3; do command -v "$t" >/dev/null || missing+=("$t"); done
(( ${#missing[@]} == 0 )) || die "missing tool(s): ${missing[*]} (Debian: apt-get install -y wrk jq curl python3 python3-venv)"

# matplotlib: the system python's, else a venv under loadtest/results/.venv (shared with litellm.sh)
PY=python3
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  PY="$RESULTS_DIR/.venv/bin/python"
  if ! { [[ -x "$PY" ]] && "$PY" -c 'import matplotlib' 2>/dev/null; }; then
    log "installing matplotlib into loadtest/results/.venv"
    mkdir -p "$RESULTS_DIR"
    [[ -x "$PY" ]] || python3 -m venv "$RESULTS_DIR/.venv" || die "python3 -m venv failed (apt-get install -y python3-venv)"
    "$RESULTS_DIR/.venv/bin/pip" install -q matplotlib >&2 || die "pip install matplotlib failed"
  fi
fi

build_all "$BUILD" "$LLMPROXY_ARG"
RES="$WORK/scaling.jsonl"; : >"$RES"

# ---------------------------------------------------------------- CPU per 1k req/s
log "CPU: wrk at $(for l in $LEVELS; do printf '%s ' $(( l * BASE_CONNS )); done)connections, ${DURATION} s each"
read -r SIM_PORT GW_PORT <<<"$("$PROBE" free-ports 2)"
start sim "$LLMPROXY" mock-llm --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --itl-ms 0
await_port sim "$SIM_PORT"
write_proxy_conf "$WORK/llmproxy.yaml" "$GW_PORT" "$SIM_PORT" "$WORKERS"
start llmproxy "$LLMPROXY" serve --config "$WORK/llmproxy.yaml"
await_port llmproxy "$GW_PORT"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
  -d '{"model":"mock-model","messages":[{"role":"user","content":"Hello"}],"max_tokens":1}' \
  "http://127.0.0.1:$GW_PORT/v1/chat/completions") || true
[[ $code == 200 ]] || die "smoke request through llmproxy returned '$code' (see $WORK/llmproxy.log)"
GPID=${PID_OF[llmproxy]}; SPID=${PID_OF[sim]}
for l in $LEVELS; do
  c=$(( l * BASE_CONNS )); t=$(( c < 2 ? c : 2 ))
  wrk -c "$c" -t "$t" -d "${WARMUP_S}s" -s "$LT/post.lua" "http://127.0.0.1:$GW_PORT/" >/dev/null 2>&1 || true
  log "  ${l}x: wrk -c $c -t $t -d ${DURATION}s"
  g0=$(cpu_ticks "$GPID"); s0=$(cpu_ticks "$SPID")
  run_bounded wrk $(( DURATION + 30 )) "$WORK/wrk-$l.txt" wrk -c "$c" -t "$t" -d "${DURATION}s" --latency \
    -s "$LT/post.lua" "http://127.0.0.1:$GW_PORT/" || { cat "$WORK/wrk-$l.txt" "$WORK/wrk.err" >&2; die "wrk failed at ${l}x"; }
  g1=$(cpu_ticks "$GPID"); s1=$(cpu_ticks "$SPID")
  line=$(sed -n 's/^JSON //p' "$WORK/wrk-$l.txt")
  [[ -n "$line" ]] || { cat "$WORK/wrk-$l.txt" >&2; die "no summary from wrk at ${l}x"; }
  jq -c --argjson l "$l" --argjson c "$c" --argjson g "$(( g1 - g0 ))" --argjson s "$(( s1 - s0 ))" \
    --argjson hz "$CLK_TCK" --argjson rss "$(rss_kib "$GPID")" \
    '{part:"cpu", level:$l, conns:$c, rps, requests, duration_s, p50_us, p99_us,
      errors:(.err_connect+.err_read+.err_write+.err_status+.err_timeout),
      proxy_cpu_s:($g/$hz), sim_cpu_s:($s/$hz), rss_after_kib:$rss,
      proxy_cores:(($g/$hz)/.duration_s),
      cpu_per_1k_rps:(if .requests > 0 then ($g/$hz) * 1000 / .requests else null end)}' <<<"$line" >>"$RES"
  jq -r 'select(.level == '"$l"') | "   \(.rps|round) req/s, llmproxy \(.proxy_cpu_s) CPU s = \(.proxy_cores*100|round)% of a core, \(.cpu_per_1k_rps*1000|round/1000) cores per 1k req/s, errors \(.errors)"' "$RES" | tail -n1 >&2
done
stop llmproxy sim

# ---------------------------------------------------------------- memory per stream
if [[ $SKIP_STREAMS == 0 ]]; then
  for l in $LEVELS; do
    n=$(( l * BASE_STREAMS ))
    # Memory only: no steady-state TTFT requests (the plateau here is too short for them).
    log "memory: ${l}x = $n concurrent streams (loadtest/soak.sh --proxy-only)"
    rc=0
    run_bounded "soak-$l" $(( (RAMP_MS + ITL_MS * TOKENS) / 1000 + 120 )) "$WORK/soak-$l.txt" "$LT/soak.sh" --proxy-only --no-build --llmproxy "$LLMPROXY" --streams "$n" --ramp-ms "$RAMP_MS" \
      --itl-ms "$ITL_MS" --tokens "$TOKENS" --workers "$WORKERS" --sim-workers "$SIM_WORKERS" \
      --steady-requests 0 --out "$WORK/soak-$l.jsonl" || rc=$?
    [[ -s "$WORK/soak-$l.jsonl" ]] || { tail -n 20 "$WORK/soak-$l.txt" "$WORK/soak-$l.err" >&2; die "soak.sh failed at ${l}x (exit $rc)"; }
    jq -c --argjson l "$l" '{part:"mem", level:$l, streams, ok, failed, max_open, rss_idle_kib, rss_peak_kib,
        rss_per_stream_kib, ttft_p50_us:.ttft_us.p50, ttft_p99_us:.ttft_us.p99}' "$WORK/soak-$l.jsonl" >>"$RES"
    jq -r 'select(.part == "mem" and .level == '"$l"') | "   ok \(.ok), failed \(.failed), peak RSS \(.rss_peak_kib) KiB, \(.rss_per_stream_kib) KiB/stream"' "$RES" >&2
  done
fi

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS_DIR"
cp "$RES" "$RESULTS_DIR/scaling.jsonl"
REPORT=$( {
  echo "# llmproxy: how cost grows with load"
  echo
  machine_info "$ORIG_CMD"
  echo "- llmproxy workers $WORKERS, simulator workers $SIM_WORKERS; wrk and the simulator share the cores with llmproxy"
  echo
  echo "## CPU per 1k requests/s (non-streaming, \`stream:false\`, \`max_tokens:1\`, simulator --ttft-ms 0 --itl-ms 0)"
  echo
  echo "wrk -c C -t min(C,2) -d ${DURATION}s --latency -s loadtest/post.lua, after a ${WARMUP_S} s warm-up; closed loop, so a higher level means more connections, not a fixed rate. CPU = utime+stime of the llmproxy process (all threads) from /proc/PID/stat, before/after the wrk run. **cores per 1k req/s** = (CPU s / wall s) / (req/s / 1000) = CPU seconds per 1000 requests."
  echo
  jq -rs '
    def r(n): if . == null then "–" else ((. * pow(10; n) | round) / pow(10; n) | tostring) end;
    "| load | wrk connections | req/s | p50 µs | p99 µs | llmproxy CPU s | llmproxy cores busy | cores per 1k req/s | simulator CPU s | errors |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    (.[] | select(.part == "cpu") | "| \(.level)x | \(.conns) | \(.rps|r(0)) | \(.p50_us) | \(.p99_us) | \(.proxy_cpu_s|r(2)) | \(.proxy_cores|r(2)) | \(.cpu_per_1k_rps|r(3)) | \(.sim_cpu_s|r(2)) | \(.errors) |")
  ' "$RES"
  if [[ $SKIP_STREAMS == 0 ]]; then
    echo
    echo "## Memory per stream (concurrent SSE streams, loadtest/soak.sh --proxy-only)"
    echo
    echo "Simulator --ttft-ms 0 --itl-ms $ITL_MS --tokens $TOKENS (a stream lasts ~$(( ITL_MS * TOKENS )) ms), streams started over $RAMP_MS ms; fresh llmproxy per level. KiB per stream = (peak VmRSS while streams were open − idle VmRSS) / streams."
    echo
    jq -rs '
      def r(n): if . == null then "–" else ((. * pow(10; n) | round) / pow(10; n) | tostring) end;
      "| load | streams | ok | failed | max open | RSS idle MiB | RSS peak MiB | KiB per stream | TTFT p50 µs | TTFT p99 µs |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      (.[] | select(.part == "mem") | "| \(.level)x | \(.streams) | \(.ok) | \(.failed) | \(.max_open) | \(.rss_idle_kib/1024|r(1)) | \(.rss_peak_kib/1024|r(1)) | \(.rss_per_stream_kib|r(1)) | \(.ttft_p50_us|r(0)) | \(.ttft_p99_us|r(0)) |")
    ' "$RES"
  fi
  echo
  echo "Plot: loadtest/results/scaling.png; raw: loadtest/results/scaling.jsonl"
} )
printf '%s\n' "$REPORT" >"$RESULTS_DIR/scaling.md"

"$PY" - "$RES" "$RESULTS_DIR/scaling.png" "$ORIG_CMD" <<'PYEOF' || die "plotting failed"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = [r for r in rows if r["part"] == "cpu"]
mem = [r for r in rows if r["part"] == "mem"]
fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(11 if mem else 6, 4.2), squeeze=False)
ax = axes[0][0]
x = [r["conns"] for r in cpu]
ax.plot(x, [r["cpu_per_1k_rps"] for r in cpu], "o-", color="tab:blue", label="cores per 1k req/s")
ax.set_xscale("log", base=2); ax.set_xticks(x); ax.set_xticklabels([f'{r["level"]}x\n{r["conns"]} conns' for r in cpu])
ax.set_ylabel("llmproxy cores per 1k req/s", color="tab:blue"); ax.set_ylim(bottom=0)
ax.set_title("Non-streaming: CPU cost per request")
ax2 = ax.twinx()
ax2.plot(x, [r["rps"] for r in cpu], "s--", color="tab:gray", label="req/s")
ax2.set_ylabel("req/s", color="tab:gray"); ax2.set_ylim(bottom=0)
if mem:
    ax = axes[0][1]
    x = [r["streams"] for r in mem]
    ax.plot(x, [r["rss_per_stream_kib"] for r in mem], "o-", color="tab:green")
    ax.set_xscale("log", base=2); ax.set_xticks(x); ax.set_xticklabels([f'{r["level"]}x\n{r["streams"]}' for r in mem])
    ax.set_ylabel("KiB per open stream", color="tab:green"); ax.set_ylim(bottom=0)
    ax.set_title("Streaming: memory per concurrent stream")
    ax2 = ax.twinx()
    ax2.plot(x, [r["rss_peak_kib"] / 1024 for r in mem], "s--", color="tab:gray")
    ax2.set_ylabel("peak VmRSS MiB", color="tab:gray"); ax2.set_ylim(bottom=0)
fig.suptitle(sys.argv[3], fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
PYEOF

echo
printf '%s\n' "$REPORT"
echo
echo "(written to loadtest/results/scaling.md, scaling.png, scaling.jsonl)" >&2
FAILED=$(jq -s '[.[] | select(.part == "cpu") | .errors] + [.[] | select(.part == "mem") | .failed] | add // 0' "$RES")
(( FAILED == 0 )) || { echo "$SCRIPT: $FAILED failed requests/streams" >&2; exit 3; }
