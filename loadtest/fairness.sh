#!/usr/bin/env bash
# Fair scheduling under saturation, measured: one simulated vLLM (mock-llm --max-running N, the
# rest queued first come first served, as vLLM's --max-num-seqs), two backlogged keys (flood:
# many closed-loop clients with long answers; batch: fewer clients, answers half as long) and
# one light interactive key (answers vary +-50% around those lengths). Modes, one after the
# other against the same simulator:
#   fifo  today's default: no scheduling, every request goes straight to the backend's queue;
#   fair  scheduling on, the backend's max_in_flight = N, so requests wait in the gateway in
#         fair order (completion_weight 1: what is equalized is what is measured, tokens);
#   fair_priority  the same with the light key at priority 1 (a higher band than the others);
#   fair_preempt   fair, against a simulator in SGLang's mode (--enable-priority-scheduling:
#         preemption on arrival) with engine_priority: sglang, so the light key's request (its
#         key has nothing else in flight) goes past max_in_flight and preempts a flood request.
# Each mode gets a fresh simulator.
# Reports the light key's TTFT p90 alone and under the flood, each backlogged key's share of the
# tokens served per 10 s window, and total throughput. Markdown table in loadtest/results/.
set -euo pipefail
SCRIPT=fairness

usage() {
  cat <<'EOF2'
usage: loadtest/fairness.sh [options]

  --max-running N      sequences the simulator runs at once (default 4)
  --itl-ms MS          time per generated token (default 10)
  --flood-clients C    flood key's concurrent clients (default 32)
  --batch-clients C    batch key's concurrent clients (default 8)
  --flood-tokens T     tokens per flood answer; batch answers are half (default 200)
  --alone S            seconds of the light key alone (default 20)
  --flood S            seconds of the flood (default 60)
  --modes "M..."       default "fifo fair fair_preempt" (also: fair_priority)
  --workers N          llmproxy workers (default 2)
  --llmproxy PATH      use this llmproxy binary instead of building one
  --no-build           do not run cargo (the binary must exist)
  --keep               keep the temp dir
  -h, --help           this text
EOF2
}

ORIG_CMD="loadtest/fairness.sh${*:+ $*}"
MAX_RUNNING=4; ITL_MS=10; FLOOD_CLIENTS=32; BATCH_CLIENTS=8; FLOOD_TOKENS=200; ALONE=20; FLOOD=60
MODES="fifo fair fair_preempt"; WORKERS=2; LLMPROXY_ARG=""; BUILD=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max-running) MAX_RUNNING=$2; shift 2 ;;
    --itl-ms) ITL_MS=$2; shift 2 ;;
    --flood-clients) FLOOD_CLIENTS=$2; shift 2 ;;
    --batch-clients) BATCH_CLIENTS=$2; shift 2 ;;
    --flood-tokens) FLOOD_TOKENS=$2; shift 2 ;;
    --alone) ALONE=$2; shift 2 ;;
    --flood) FLOOD=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --llmproxy) LLMPROXY_ARG=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v python3 >/dev/null || die "python3 not found"
if [[ $BUILD == 1 && -z "$LLMPROXY_ARG" ]]; then
  log "building llmproxy (cargo build --release)"
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" >&2 || die "cargo build failed"
fi
LLMPROXY=${LLMPROXY_ARG:-$TARGET_DIR/release/llmproxy}
[[ -x "$LLMPROXY" ]] || die "llmproxy binary not found at $LLMPROXY"

# ready_addr NAME FILE: waits for a --ready-file and prints its listen address
ready_addr() {
  for _ in $(seq 300); do
    if [[ -s "$2" ]]; then awk '/^listen /{print $2; exit}' "$2"; return; fi
    kill -0 "${PID_OF[$1]}" 2>/dev/null || die "$1 exited at start-up (see $WORK/$1.log)"
    sleep 0.1
  done
  die "$1 did not become ready"
}

declare -A RESULT=()
for mode in $MODES; do
  sim_flags=()
  [[ $mode == fair_preempt ]] && sim_flags=(--enable-priority-scheduling)
  rm -f "$WORK/sim.ready"
  start sim "$LLMPROXY" mock-llm --listen 127.0.0.1:0 --ready-file "$WORK/sim.ready" \
    --max-running "$MAX_RUNNING" --itl-ms "$ITL_MS" "${sim_flags[@]}"
  SIM=$(ready_addr sim "$WORK/sim.ready")
  log "$mode: simulator on $SIM (max running $MAX_RUNNING, $ITL_MS ms per token${sim_flags:+, ${sim_flags[*]}})"
  conf="$WORK/$mode.yaml"
  {
    echo "listen: \"127.0.0.1:0\""
    echo "workers: $WORKERS"
    echo "log: {access: false}"
    echo "backends:"
    echo "  - url: \"http://$SIM\""
    if [[ $mode == fair* ]]; then
      echo "    max_in_flight: $MAX_RUNNING"
      [[ $mode == fair_preempt ]] && echo "    engine_priority: sglang"
      echo "scheduling: {enabled: true, queue_timeout: 300s, completion_weight: 1.0}"
    fi
    echo "auth: {quota_path: \"$WORK/$mode-quota.db\"}"
    echo "api_keys:"
    echo "  - {key: sk-flood-0000001, name: flood}"
    echo "  - {key: sk-batch-0000001, name: batch}"
    if [[ $mode == fair_priority ]]; then
      echo "  - {key: sk-light-0000001, name: light, priority: 1}"
    else
      echo "  - {key: sk-light-0000001, name: light}"
    fi
  } >"$conf"
  rm -f "$WORK/$mode.ready"
  start "gw-$mode" "$LLMPROXY" serve --config "$conf" --ready-file "$WORK/$mode.ready"
  GW=$(ready_addr "gw-$mode" "$WORK/$mode.ready")
  log "$mode: gateway on $GW; light alone ${ALONE}s, then the flood ${FLOOD}s"
  RESULT[$mode]=$(python3 "$LT/fairness.py" --port "${GW##*:}" --alone "$ALONE" --flood "$FLOOD" \
    --flood-clients "$FLOOD_CLIENTS" --batch-clients "$BATCH_CLIENTS" --flood-tokens "$FLOOD_TOKENS")
  echo "${RESULT[$mode]}" >"$WORK/$mode.json"
  stop "gw-$mode"
  stop sim
done

mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/fairness-$(date -u +%Y%m%d-%H%M%S).md"
python3 - "$ORIG_CMD" "$WORK" $MODES >"$OUT" <<'PY'
import json, sys
cmd, work, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
r = {m: json.load(open(f"{work}/{m}.json")) for m in modes}
print(f"`{cmd}`\n")
print("| mode | light TTFT p50 / p90 alone (ms) | light TTFT p50 / p90 under flood (ms) | p90 ratio | light requests | tokens/s (prompt+completion) | completion tokens/s |")
print("|---|---|---|---|---|---|---|")
for m in modes:
    x = r[m]
    ratio = x["light_flood_ttft_p90_ms"] / x["light_alone_ttft_p90_ms"]
    print(f"| {m} | {x['light_alone_ttft_p50_ms']:.1f} / {x['light_alone_ttft_p90_ms']:.1f} | "
          f"{x['light_flood_ttft_p50_ms']:.1f} / {x['light_flood_ttft_p90_ms']:.1f} | {ratio:.1f}x | "
          f"{x['light_flood_requests']} | {x['tokens_per_s']:.0f} | {x['completion_tokens_per_s']:.0f} |")
for m in modes:
    if m != "fifo" and "fifo" in r:
        print(f"\n{m}/fifo throughput: {r[m]['tokens_per_s'] / r['fifo']['tokens_per_s']:.3f}")
print("\nflood key's share of the tokens served to the two backlogged keys, per 10 s window:\n")
print("| mode | " + " | ".join(f"{10*i}-{10*(i+1)} s" for i in range(len(r[modes[0]]["windows"]))) + " |")
print("|---|" + "---|" * len(r[modes[0]]["windows"]))
for m in modes:
    print(f"| {m} | " + " | ".join(f"{w['flood_share']:.3f}" if w['flood_share'] is not None else "-" for w in r[m]["windows"]) + " |")
print("\nstatuses:", json.dumps({m: r[m]["statuses"] for m in modes}))
PY
cat "$OUT"
log "written to $OUT"
