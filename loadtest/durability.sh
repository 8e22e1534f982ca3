#!/usr/bin/env bash
# What `usage_hook.durability: sync` costs a response: the same governed gateway (a key, limits,
# metering to the SQLite spool and a counting webhook) with `durability: async` and `sync`,
# side by side, wrk non-streaming at 1 and at 64 connections, rounds interleaved. Markdown table
# in loadtest/results/durability.md. See loadtest/README.md.
set -euo pipefail
SCRIPT=durability

usage() {
  cat <<'EOF2'
usage: loadtest/durability.sh [options]

  --duration S         seconds per wrk run (default 10)
  --rounds R           interleaved rounds; medians reported (default 3)
  --llmproxy PATH      use this llmproxy binary instead of building one
  --no-build           do not run cargo (binaries must exist)
  --keep               keep the temp dir
  -h, --help           this text
EOF2
}

ORIG_CMD="loadtest/durability.sh${*:+ $*}"
DURATION=10; ROUNDS=3; LLMPROXY_ARG=""; BUILD=1; KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION=${2:-}; shift; shift || true ;;
    --rounds) ROUNDS=${2:-}; shift; shift || true ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "durability: unknown option: $1" >&2; exit 1 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in DURATION ROUNDS; do
  is_uint "${!v}" && (( ${!v} >= 1 )) || die "$v must be a positive integer (got '${!v}')"
done
for tool in wrk jq python3; do command -v "$tool" >/dev/null || die "$tool not found"; done
build_all "$BUILD" "$LLMPROXY_ARG"

KEY=sk-loadtest-durable-0001
export LOADTEST_AUTH=$KEY
read -r SIM_PORT HOOK_PORT GW_PORT <<<"$("$PROBE" free-ports 3)"
start sim "$LLMPROXY" mock-llm --listen "127.0.0.1:$SIM_PORT" --workers 1 --ttft-ms 0 --itl-ms 0 --tokens 8
await_port sim "$SIM_PORT"
start webhook python3 "$ROOT/tests/support/webhook_receiver.py" --count-only --port "$HOOK_PORT" --out "$WORK/webhook.jsonl"
await_port webhook "$HOOK_PORT"

write_conf() { # FILE MODE ROUND
  write_proxy_conf "$1" "$GW_PORT" "$SIM_PORT" 1
  append_keys_conf "$1" "$KEY" "$WORK/quota-$2-$3.db"
  cat >>"$1" <<EOF2
usage_hook:
  enabled: true
  durability: $2
  spool_path: "$WORK/spool-$2-$3.db"
  reporters:
    - {name: webhook, type: webhook, url: "http://127.0.0.1:$HOOK_PORT/usage", batch_size: 500}
EOF2
}

RESULTS="$WORK/durability.jsonl"
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for conns in 1 64; do
    for mode in async sync; do
      log "round $round: $conns connection(s), durability $mode"
      write_conf "$WORK/$mode.yaml" "$mode" "$round-$conns"
      start gw "$LLMPROXY" serve --config "$WORK/$mode.yaml"
      await_port gw "$GW_PORT"
      run_bounded warm 30 /dev/null wrk -t 1 -c "$conns" -d 1s -s "$LT/post.lua" "http://127.0.0.1:$GW_PORT" || true
      run_bounded wrk $((DURATION + 30)) "$WORK/wrk.out" \
        wrk -t 1 -c "$conns" -d "${DURATION}s" -s "$LT/post.lua" "http://127.0.0.1:$GW_PORT" \
        || die "wrk failed (see $WORK/wrk.err)"
      stop gw
      w=$(sed -n 's/^JSON //p' "$WORK/wrk.out")
      [[ -n "$w" ]] || die "no wrk result"
      jq -c --arg m "$mode" --argjson c "$conns" --argjson r "$round" \
        '{round: $r, mode: $m, conns: $c, rps, p50_us, p90_us, p99_us,
          errors: (.err_status + .err_connect + .err_read + .err_write + .err_timeout)}' <<<"$w" >>"$RESULTS"
    done
  done
done

mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/durability.md"
{
  echo "# llmproxy: usage_hook.durability async vs sync"
  echo
  machine_info "$ORIG_CMD"
  echo
  echo "wrk -t 1 -d ${DURATION}s, non-streaming, one gateway worker, one simulator worker; keys, limits,"
  echo "metering to the SQLite spool and a counting webhook (batch_size 500). Medians over $ROUNDS"
  echo "interleaved round(s); \"sync added\" is sync's p50 minus async's, and sync's req/s over async's."
  echo
  echo "| connections | async req/s | sync req/s | sync/async | async p50 µs | sync p50 µs | sync added p50 µs | async p99 µs | sync p99 µs | errors |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  jq -s -r '
    def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    group_by(.conns)[] | . as $g | ($g[0].conns) as $c
    | [$g[] | select(.mode == "async")] as $a | [$g[] | select(.mode == "sync")] as $s
    | ($a | map(.rps) | median) as $ar | ($s | map(.rps) | median) as $sr
    | ($a | map(.p50_us) | median) as $ap | ($s | map(.p50_us) | median) as $sp
    | "| \($c) | \($ar | floor) | \($sr | floor) | \(($sr / $ar * 1000 | round) / 1000) | \($ap) | \($sp) | \($sp - $ap) | \($a | map(.p99_us) | median) | \($s | map(.p99_us) | median) | \([$g[].errors] | add) |"
  ' "$RESULTS"
} >"$OUT"
cat "$OUT"
