#!/usr/bin/env bash
# Many concurrent SSE streams: first directly against the simulator, then through llmproxy,
# same N. Every stream verified event by event; TTFT per stream; llmproxy's VmRSS sampled while
# the streams are open; once all are open, the TTFT of sequential new requests (steady state).
# See loadtest/README.md.
set -euo pipefail
SCRIPT=soak

usage() {
  cat <<'EOF'
usage: loadtest/soak.sh [options]

  --streams N        concurrent streams per target (default 10000; --quick: 1000)
  --quick            --streams 1000
  --ramp-ms MS       start the N streams evenly over MS (default 3000)
  --itl-ms MS        simulator inter-token delay (default 200)
  --tokens N         tokens per stream (default 100); a stream lasts about tokens x itl
  --steady-requests M  once all streams are open, M sequential new requests for the
                     steady-state TTFT (default 500; 0: none); they must fit in the
                     plateau, stream length - ramp
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
STREAMS=10000; RAMP_MS=3000; ITL_MS=200; TOKENS=100; STEADY=500; WORKERS=2; SIM_WORKERS=2
PROXY_ONLY=0; OUT=""; LLMPROXY_ARG=""; BUILD=1; KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --streams) STREAMS=${2:-}; shift; shift || true ;;
    --quick) STREAMS=1000; shift ;;
    --ramp-ms) RAMP_MS=${2:-}; shift; shift || true ;;
    --itl-ms) ITL_MS=${2:-}; shift; shift || true ;;
    --tokens) TOKENS=${2:-}; shift; shift || true ;;
    --steady-requests) STEADY=${2:-}; shift; shift || true ;;
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

for v in STREAMS RAMP_MS ITL_MS TOKENS STEADY WORKERS SIM_WORKERS; do
  is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
(( STREAMS >= 1 && TOKENS >= 1 && WORKERS >= 1 && SIM_WORKERS >= 1 )) || die "--streams, --tokens, --workers, --sim-workers must be >= 1"
command -v jq >/dev/null || die "jq is needed (apt-get install -y jq)"
STREAM_MS=$(( TOKENS * ITL_MS ))
if (( RAMP_MS >= STREAM_MS )); then
  echo "$SCRIPT: warning: ramp ${RAMP_MS} ms >= stream length ~${STREAM_MS} ms: not all streams will be open at once" >&2
elif (( STEADY > 0 && STREAM_MS - RAMP_MS < 1000 )); then
  # 500 steady requests took 0.05 s at 500 streams, 15 s at 9968 through llmproxy on 2 busy cores;
  # the report says when streams ended during them.
  echo "$SCRIPT: warning: plateau ~$(( STREAM_MS - RAMP_MS )) ms (stream length - ramp) may be too short for $STEADY steady requests" >&2
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
    --ramp-ms "$RAMP_MS" --tokens "$TOKENS" --check words --rss-pid "$3" --timeout-ms "$READ_TIMEOUT_MS" \
    --steady-requests "$STEADY" --label "$1" || rc=$?
  line=$(cat "$WORK/probe-$1.json")
  [[ -n "$line" ]] || die "probe soak against $1 produced no result (exit $rc; killed after ${LIMIT_S} s?)"
  n1=$(tcp_counters)
  line=$(jq -c --argjson a "$n0" --argjson b "$n1" '. + {tcp: ($b | with_entries(.value -= ($a[.key] // 0)))}' <<<"$line")
  echo "$line" >>"$RES"
  jq -r '"   ok \(.ok), failed \(.failed), max open \(.max_open), ramp TTFT p50 \(.ttft_us.p50) µs p99 \(.ttft_us.p99) µs"
         + (if .steady then ", steady TTFT p50 \(.steady_ttft_us.p50) µs p99 \(.steady_ttft_us.p99) µs (\(.steady.ok) ok, \(.steady.errors) errors)" else "" end)
         + ", client CPU \(.client_cpu_s.total) s"
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
  echo "- llmproxy workers $WORKERS; simulator workers $SIM_WORKERS, --ttft-ms 0 --itl-ms $ITL_MS --tokens $TOKENS; streams started evenly over $RAMP_MS ms; simulator counted $SIM_COMPLETED completed streams (soak streams and steady-state requests of both runs)"
  echo "- Client: loadtest/probe soak, one epoll loop for all streams (one connection each) and one thread for the steady-state requests; every stream checked: status 200, $TOKENS content events each equal to the simulator's word for its position, \`data: [DONE]\` last. Client CPU = the probe's user + system time over its whole run"
  echo
  jq -rs --argjson n "$STREAMS" --argjson ramp "$RAMP_MS" '
    def r0: if . == null then "–" else (round | tostring) end;
    def r1: if . == null then "–" else ((. * 10 | round) / 10 | tostring) end;
    def r2: if . == null then "–" else ((. * 100 | round) / 100 | tostring) end;
    def signed: if . == null then "–" elif . >= 0 then "+" + (round | tostring) else (round | tostring) end;
    def mib: if . == null then "–" else ((. / 1024 * 10 | round) / 10 | tostring) end;
    (map(select(.label == "direct")) | first) as $d
    # f of this row minus f of the direct row, signed; "–" for the direct row or without one.
    | def added(f): if .label == "direct" or $d == null then "–"
        else (f) as $a | ($d | f) as $b | if $a == null or $b == null then "–" else ($a - $b | signed) end end;
    "| target | streams ok | failed | max open | ramp TTFT p50 µs | ramp TTFT p99 µs | added p50 | added p99 | RSS idle MiB | RSS peak MiB | KiB per stream | client CPU s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      (.[] | "| \(.label)\(if .label == "direct" then " (RSS: simulator)" else "" end) | \(.ok) | \(.failed) | \(.max_open) | \(.ttft_us.p50|r0) | \(.ttft_us.p99|r0) | "
        + "\(added(.ttft_us.p50)) | \(added(.ttft_us.p99)) | \(.rss_idle_kib|mib) | \(.rss_peak_kib|mib) | \(.rss_per_stream_kib|r1) | \(.client_cpu_s.total|r2) |"),
      "",
      "Ramp TTFT: request write to the first `data:` line of each of the N streams, while they are being opened at \(if $ramp > 0 then "\($n * 1000 / $ramp | round)/s" else "once" end): it measures the box (client, gateway and simulator on shared cores) absorbing that burst of new connections.",
      (if any(.[]; .steady) then
        "",
        "Steady state: once all streams were open, \(first(.[] | select(.steady) | .steady.requests)) sequential streaming requests (`max_tokens` 1) on one keep-alive connection to the same target, after \(first(.[] | select(.steady) | .steady.warmup)) not recorded; TTFT = request write to the first `data:` line. This is what a new request pays while the gateway holds the streams. Open = streams open when the steady requests started → when they ended.",
        "",
        "| target | requests ok | errors | open (start → end) | steady TTFT p50 µs | p90 µs | p99 µs | max µs | added p50 | added p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (.[] | select(.steady) | "| \(.label) | \(.steady.ok) | \(.steady.errors) | \(.steady.open_at_start) → \(.steady.open_at_end) | \(.steady_ttft_us.p50|r0) | \(.steady_ttft_us.p90|r0) | "
          + "\(.steady_ttft_us.p99|r0) | \(.steady_ttft_us.max|r0) | \(added(.steady_ttft_us.p50)) | \(added(.steady_ttft_us.p99)) |")
      else empty end),
      "",
      "TCP during each run (TcpExt counters of the whole network namespace, so other load on the box counts too): "
        + (map("\(.label): listen overflows \(.tcp.ListenOverflows // "?"), SYN retransmits \(.tcp.TCPSynRetrans // "?"), RTO timeouts \(.tcp.TCPTimeouts // "?")") | join("; ")) + ".",
      "",
      "KiB per stream = (peak VmRSS while streams were open − VmRSS before the first stream) / streams. Max open = streams with response head received and `[DONE]` not yet read, at the same time.",
      (.[] | select(.failed > 0) | "", "**\(.label): \(.failed) failed streams**: \(.errors | map("\(.count)× \(.error)") | join("; "))"),
      (.[] | select(.steady.errors > 0) | "", "**\(.label): \(.steady.errors) steady-state requests failed**: first error \(.steady.first_error)"),
      (.[] | select(.steady and .steady.open_at_end < .steady.open_at_start)
        | "", "**\(.label): \(.steady.open_at_start - .steady.open_at_end) streams ended during the steady-state requests**: the plateau (stream length − ramp) was too short for them; raise --tokens or --itl-ms."),
      (map(select(.label == "llmproxy")) | first) as $p
      | if $p == null then empty else
          "", "Issue 7 streaming targets (informational, this run): RSS peak \($p.rss_peak_kib|mib) MiB (target <= 200 MB at 10k streams), \($p.rss_per_stream_kib|r1) KiB/stream (target <= 20), "
            + "added TTFT p99 at steady state \($p | added(.steady_ttft_us.p99)) µs (target <= 200; new requests while \($p.steady.open_at_end // "–") streams are open), all delivered: \($p.failed == 0 and $p.ok == $n). "
            + "For comparison, added ramp TTFT p99 \($p | added(.ttft_us.p99)) µs (the connection burst, not the target)."
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
FAILED=$(jq -s 'map(.failed + (.streams - .ok - .failed) + (.steady.errors // 0)) | add' "$RES")
(( FAILED == 0 )) || { echo "$SCRIPT: $FAILED streams or steady-state requests failed" >&2; exit 3; }
