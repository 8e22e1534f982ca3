#!/usr/bin/env bash
# Many concurrent SSE streams: first directly against the simulator, then through llmproxy,
# same N. Every stream verified event by event; TTFT per stream; llmproxy's VmRSS sampled while
# the streams are open. See loadtest/README.md.
set -euo pipefail
SCRIPT=soak

usage() {
  cat <<'EOF'
usage: loadtest/soak.sh [options]

  --streams N        concurrent streams per target (default 10000; --quick: 1000)
  --quick            --streams 1000
  --ramp-ms MS       start the N streams evenly over MS (default 3000)
  --itl-ms MS        simulator inter-token delay (default 200)
  --tokens N         tokens per stream (default 50); a stream lasts about tokens x itl
  --workers N        llmproxy workers (default 2)
  --sim-workers N    simulator workers (default 2)
  --proxy-only       skip the direct run (no added-TTFT figures)
  --out FILE         also write the probe's JSON lines (one per target) to FILE
  --llmproxy PATH    use this llmproxy binary instead of building one
  --no-build         do not run cargo (binaries must exist)
  --keep             keep the temp dir (configs, logs) and print its path
  -h, --help         this text
EOF
}

ORIG_CMD="loadtest/soak.sh${*:+ $*}"
STREAMS=10000; RAMP_MS=3000; ITL_MS=200; TOKENS=50; WORKERS=2; SIM_WORKERS=2
PROXY_ONLY=0; OUT=""; LLMPROXY_ARG=""; BUILD=1; KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --streams) STREAMS=${2:-}; shift; shift || true ;;
    --quick) STREAMS=1000; shift ;;
    --ramp-ms) RAMP_MS=${2:-}; shift; shift || true ;;
    --itl-ms) ITL_MS=${2:-}; shift; shift || true ;;
    --tokens) TOKENS=${2:-}; shift; shift || true ;;
    --workers) WORKERS=${2:-}; shift; shift || true ;;
    --sim-workers) SIM_WORKERS=${2:-}; shift; shift || true ;;
    --proxy-only) PROXY_ONLY=1; shift ;;
    --out) OUT=${2:-}; shift; shift || true ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "soak: unknown option: $1" >&2; exit 1 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in STREAMS RAMP_MS ITL_MS TOKENS WORKERS SIM_WORKERS; do
  is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
(( STREAMS >= 1 && TOKENS >= 1 && WORKERS >= 1 && SIM_WORKERS >= 1 )) || die "--streams, --tokens, --workers, --sim-workers must be >= 1"
command -v jq >/dev/null || die "jq is needed (apt-get install -y jq)"
STREAM_MS=$(( TOKENS * ITL_MS ))
if (( RAMP_MS >= STREAM_MS )); then
  echo "$SCRIPT: warning: ramp ${RAMP_MS} ms >= stream length ~${STREAM_MS} ms: not all streams will be open at once" >&2
fi

# File descriptors: llmproxy holds 2 per stream (client + upstream), the simulator and the
# probe 1 each; plus listeners, io_uring, logs. All processes inherit this shell's limit.
NEED_FDS=$(( 2 * STREAMS + 64 ))
fds_for "$NEED_FDS" || die "llmproxy needs about $NEED_FDS open files for $STREAMS streams (2 per stream + 64; idle it holds 13); \
the limit is $(ulimit -Sn) soft / $(ulimit -Hn) hard and cannot be raised here (needs CAP_SYS_RESOURCE, e.g. docker --ulimit nofile=65536). \
Use --streams $(( ( $(ulimit -Hn) - 64 ) / 2 )) or less."

build_all "$BUILD" "$LLMPROXY_ARG"

read -r SIM_PORT GW_PORT <<<"$("$PROBE" free-ports 2)"
start sim "$LLMPROXY" mock-llm --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" \
  --ttft-ms 0 --itl-ms "$ITL_MS" --tokens "$TOKENS"
await_port sim "$SIM_PORT"

RES="$WORK/soak.jsonl"; : >"$RES"
# Bounded: ramp + stream length + 60 s, then the probe is killed (and counts as a failure).
LIMIT_S=$(( (RAMP_MS + STREAM_MS) / 1000 + 60 ))
READ_TIMEOUT_MS=$(( ITL_MS * 5 > 10000 ? ITL_MS * 5 : 10000 ))

run_soak() { # LABEL PORT PID
  local line rc=0 n0 n1
  n0=$(tcp_counters)
  log "$1: $STREAMS streams over ${RAMP_MS} ms, ~${STREAM_MS} ms each (sim --itl-ms $ITL_MS --tokens $TOKENS)"
  run_bounded "probe-$1" "$LIMIT_S" "$WORK/probe-$1.json" "$PROBE" soak --addr "127.0.0.1:$2" --streams "$STREAMS" \
    --ramp-ms "$RAMP_MS" --tokens "$TOKENS" --check words --rss-pid "$3" --timeout-ms "$READ_TIMEOUT_MS" --label "$1" || rc=$?
  line=$(cat "$WORK/probe-$1.json")
  [[ -n "$line" ]] || die "probe soak against $1 produced no result (exit $rc; killed after ${LIMIT_S} s?)"
  n1=$(tcp_counters)
  line=$(jq -c --argjson a "$n0" --argjson b "$n1" '. + {tcp: ($b | with_entries(.value -= ($a[.key] // 0)))}' <<<"$line")
  echo "$line" >>"$RES"
  jq -r '"   ok \(.ok), failed \(.failed), max open \(.max_open), TTFT p50 \(.ttft_us.p50) µs p99 \(.ttft_us.p99) µs"
         + (if (.errors|length) > 0 then ", errors: \(.errors)" else "" end)' <<<"$line" >&2
}

if [[ $PROXY_ONLY == 0 ]]; then
  run_soak direct "$SIM_PORT" "${PID_OF[sim]}"
  sleep 1
fi
write_proxy_conf "$WORK/llmproxy.yaml" "$GW_PORT" "$SIM_PORT" "$WORKERS"
start llmproxy "$LLMPROXY" serve --config "$WORK/llmproxy.yaml"
await_port llmproxy "$GW_PORT"
sleep 1   # idle RSS is read by the probe just before the first stream
run_soak llmproxy "$GW_PORT" "${PID_OF[llmproxy]}"
kill -0 "${PID_OF[llmproxy]}" 2>/dev/null || die "llmproxy died during the soak (see $WORK/llmproxy.log)"

SIM_COMPLETED=$(curl -fsS --max-time 5 "http://127.0.0.1:$SIM_PORT/metrics" 2>/dev/null \
  | awk '/^mock_streams_completed_total/ {s += $2} END {print s + 0}' || echo "?")

REPORT=$( {
  echo "# llmproxy soak: $STREAMS concurrent SSE streams"
  echo
  machine_info "$ORIG_CMD"
  echo "- llmproxy workers $WORKERS; simulator workers $SIM_WORKERS, --ttft-ms 0 --itl-ms $ITL_MS --tokens $TOKENS; streams started evenly over $RAMP_MS ms; simulator counted $SIM_COMPLETED completed streams"
  echo "- Client: loadtest/probe soak, one thread (64 KiB stack) and one connection per stream; every stream checked: status 200, $TOKENS content events each equal to the simulator's word for its position, \`data: [DONE]\` last"
  echo
  jq -rs --argjson n "$STREAMS" '
    def r0: if . == null then "–" else (round | tostring) end;
    def r1: if . == null then "–" else ((. * 10 | round) / 10 | tostring) end;
    def signed: if . == null then "–" elif . >= 0 then "+" + (round | tostring) else (round | tostring) end;
    def mib: if . == null then "–" else ((. / 1024 * 10 | round) / 10 | tostring) end;
    (map(select(.label == "direct")) | first) as $d
    | "| target | streams ok | failed | max open | TTFT p50 µs | TTFT p99 µs | added p50 | added p99 | RSS idle MiB | RSS peak MiB | KiB per stream |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      (.[] | "| \(.label)\(if .label == "direct" then " (RSS: simulator)" else "" end) | \(.ok) | \(.failed) | \(.max_open) | \(.ttft_us.p50|r0) | \(.ttft_us.p99|r0) | "
        + (if .label == "direct" or $d == null then "– | – | " else "\((.ttft_us.p50 - $d.ttft_us.p50)|signed) | \((.ttft_us.p99 - $d.ttft_us.p99)|signed) | " end)
        + "\(.rss_idle_kib|mib) | \(.rss_peak_kib|mib) | \(.rss_per_stream_kib|r1) |"),
      "",
      "TCP during each run (TcpExt counters of the whole network namespace, so other load on the box counts too): "
        + (map("\(.label): listen overflows \(.tcp.ListenOverflows // "?"), SYN retransmits \(.tcp.TCPSynRetrans // "?"), RTO timeouts \(.tcp.TCPTimeouts // "?")") | join("; ")) + ".",
      "",
      "KiB per stream = (peak VmRSS while streams were open − VmRSS before the first stream) / streams. Max open = streams with response head received and `[DONE]` not yet read, at the same time.",
      (.[] | select(.failed > 0) | "", "**\(.label): \(.failed) failed streams**: \(.errors | map("\(.count)× \(.error)") | join("; "))"),
      (map(select(.label == "llmproxy")) | first) as $p
      | if $p == null then empty else
          "", "Issue 7 streaming targets (informational, this run): RSS peak \($p.rss_peak_kib|mib) MiB (target <= 200 MB at 10k streams), \($p.rss_per_stream_kib|r1) KiB/stream (target <= 20), added TTFT p99 \(if $d then (($p.ttft_us.p99 - $d.ttft_us.p99)|signed) else "–" end) µs (target <= 200), all delivered: \($p.failed == 0 and $p.ok == $n)"
        end
  ' "$RES"
} )

mkdir -p "$RESULTS_DIR"
printf '%s\n' "$REPORT" >"$RESULTS_DIR/soak-latest.md"
cp "$RES" "$RESULTS_DIR/soak-latest.jsonl"
[[ -z "$OUT" ]] || cp "$RES" "$OUT"
echo
printf '%s\n' "$REPORT"
echo
echo "(written to loadtest/results/soak-latest.md; probe JSON incl. RSS samples [ms, open, KiB] in soak-latest.jsonl)" >&2
FAILED=$(jq -s 'map(.failed + (.streams - .ok - .failed)) | add' "$RES")
(( FAILED == 0 )) || { echo "$SCRIPT: $FAILED streams failed" >&2; exit 3; }
