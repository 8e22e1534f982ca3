#!/usr/bin/env bash
# Where a governed request's CPU goes: the same non-streaming wrk load through llmproxy bare,
# with keys and limits, and governed (keys, limits, metering to the spool, a webhook and
# PostgreSQL), with CPU per request for each gateway thread role, the simulator, the webhook
# receiver and the PostgreSQL server. Markdown table in loadtest/results/. See loadtest/README.md.
set -euo pipefail
SCRIPT=cost

usage() {
  cat <<'EOF'
usage: loadtest/cost.sh [options]

  --duration S         seconds per wrk run (default 10)
  --connections C      wrk keep-alive connections (default 64)
  --rounds R           repeat the three targets, interleaved (default 1; medians reported)
  --llmproxy PATH      use this llmproxy binary instead of building one
  --baseline PATH      also run every target with this (older) llmproxy binary, interleaved,
                       for a before/after table from one run
  --no-build           do not run cargo (binaries must exist)
  --keep               keep the temp dir
  -h, --help           this text
EOF
}

ORIG_CMD="loadtest/cost.sh${*:+ $*}"
DURATION=10; CONNS=64; ROUNDS=1; LLMPROXY_ARG=""; BASELINE=""; BUILD=1; KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION=${2:-}; shift; shift || true ;;
    --connections) CONNS=${2:-}; shift; shift || true ;;
    --rounds) ROUNDS=${2:-}; shift; shift || true ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --baseline) BASELINE=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "cost: unknown option: $1" >&2; exit 1 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in DURATION CONNS ROUNDS; do
  is_uint "${!v}" && (( ${!v} >= 1 )) || die "$v must be a positive integer (got '${!v}')"
done
for tool in wrk jq psql python3; do command -v "$tool" >/dev/null || die "$tool not found"; done
PG_DSN="host=127.0.0.1 user=postgres dbname=test"
psql "$PG_DSN" -qtAc "SELECT 1" >/dev/null 2>&1 || die "PostgreSQL not reachable as $PG_DSN"
build_all "$BUILD" "$LLMPROXY_ARG"
declare -A BIN_OF=([current]=$LLMPROXY)
BUILDS=(current)
if [[ -n $BASELINE ]]; then
  [[ -x $BASELINE ]] || die "--baseline $BASELINE is not an executable"
  BIN_OF[baseline]=$BASELINE
  BUILDS=(baseline current)
fi

KEY=sk-loadtest-governed-0001
export LOADTEST_AUTH=$KEY
TABLE="loadtest_cost_$$"
trap 'for b in baseline current; do psql "$PG_DSN" -qc "DROP TABLE IF EXISTS ${TABLE}_$b" >/dev/null 2>&1 || true; done; cleanup' EXIT

read -r SIM_PORT HOOK_PORT GW_PORT <<<"$("$PROBE" free-ports 3)"
start sim "$LLMPROXY" mock-llm --listen "127.0.0.1:$SIM_PORT" --workers 1 --ttft-ms 0 --itl-ms 0 --tokens 8
await_port sim "$SIM_PORT"
start webhook python3 "$ROOT/tests/support/webhook_receiver.py" --count-only --port "$HOOK_PORT" --out "$WORK/webhook.jsonl"
await_port webhook "$HOOK_PORT"

write_conf() { # FILE TARGET TAG BUILD (TAG names its files; each build its own table)
  write_proxy_conf "$1" "$GW_PORT" "$SIM_PORT" 1
  [[ $2 == bare ]] && return 0
  append_keys_conf "$1" "$KEY" "$WORK/quota-$3.db"
  [[ $2 == keys ]] && return 0
  append_metering_conf "$1" "$WORK/spool-$3.db" "$HOOK_PORT" "$PG_DSN" "${TABLE}_$4"
}

# Thread CPU ticks of a process by role: worker, usage-ingest, usage-delivery, quota, other.
roles() { # PID
  local t comm
  for t in /proc/"$1"/task/*; do
    comm=$(cat "$t/comm")
    case "$comm" in
      llmproxy-w*) echo "worker $(cpu_ticks_of "$t")" ;;
      llmproxy-usage) echo "usage-ingest $(cpu_ticks_of "$t")" ;;
      llmproxy-usage-*) echo "usage-delivery $(cpu_ticks_of "$t")" ;;
      llmproxy-quota) echo "quota $(cpu_ticks_of "$t")" ;;
      *) echo "other $(cpu_ticks_of "$t")" ;;
    esac
  done | awk '{s[$1] += $2} END {for (k in s) print k, s[k]}' | sort
}
cpu_ticks_of() { awk '{print $14 + $15}' "$1/stat"; }
# All PostgreSQL server processes (the reporter's connection stays open between runs).
pg_ticks() {
  local p s=0
  for p in $(pgrep -x postgres); do s=$((s + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
  echo "$s"
}

RESULTS="$WORK/cost.jsonl"
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for target in bare keys governed; do
  for build in "${BUILDS[@]}"; do
    log "round $round: $target ($build)"
    write_conf "$WORK/$target.yaml" "$target" "$target-$build-$round" "$build"
    start gw "${BIN_OF[$build]}" serve --config "$WORK/$target.yaml"
    await_port gw "$GW_PORT"
    gw=${PID_OF[gw]}
    curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d '{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
      "http://127.0.0.1:$GW_PORT/v1/chat/completions" || die "smoke request to $target failed"
    before=$(roles "$gw"); sim0=$(cpu_ticks "${PID_OF[sim]}"); hook0=$(cpu_ticks "${PID_OF[webhook]}"); pg0=$(pg_ticks)
    run_bounded wrk $((DURATION + 30)) "$WORK/wrk.out" \
      wrk -t 2 -c "$CONNS" -d "${DURATION}s" -s "$LT/post.lua" "http://127.0.0.1:$GW_PORT" \
      || die "wrk failed (see $WORK/wrk.err)"
    # Reporters finish delivering what the run produced before the CPU is read.
    sleep 3
    after=$(roles "$gw"); sim1=$(cpu_ticks "${PID_OF[sim]}"); hook1=$(cpu_ticks "${PID_OF[webhook]}"); pg1=$(pg_ticks)
    stop gw
    w=$(sed -n 's/^JSON //p' "$WORK/wrk.out")
    [[ -n "$w" ]] || die "no wrk result for $target"
    join <(echo "$before") <(echo "$after") \
      | jq -R -s --argjson w "$w" --arg t "$target" --arg b "$build" --argjson r "$round" --argjson hz "$CLK_TCK" \
          --argjson sim $((sim1 - sim0)) --argjson hook $((hook1 - hook0)) --argjson pg $((pg1 - pg0)) '
          ($w.requests) as $n | (1000000 / $hz / $n) as $us
          | [split("\n")[] | select(length > 0) | split(" ") | {key: .[0], value: (((.[2] | tonumber) - (.[1] | tonumber)) * $us)}]
          | from_entries
          | {round: $r, target: $t, build: $b, rps: $w.rps, errors: ($w.err_status + $w.err_connect + $w.err_read + $w.err_write + $w.err_timeout),
             gateway: ., simulator: ($sim * $us), webhook: ($hook * $us), postgres: ($pg * $us)}' >>"$RESULTS"
  done
  done
done

mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/cost.md"
{
  echo "# llmproxy: CPU per request, bare vs keys vs governed"
  echo
  machine_info "$ORIG_CMD"
  echo
  echo "wrk -c $CONNS -t 2 -d ${DURATION}s, one gateway worker, one simulator worker; CPU is utime + stime"
  echo "from /proc, in µs per request answered (medians over $ROUNDS round(s)). keys = a key checked and"
  echo "per-key limits; governed = keys plus metering to the SQLite spool, a webhook (counting receiver)"
  echo "and PostgreSQL, all on this machine. \"on the box\" adds the webhook receiver and the PostgreSQL"
  echo "server, which take their CPU from the same cores."
  echo
  [[ -n $BASELINE ]] && echo "baseline = \`$BASELINE\`; current = \`$LLMPROXY\`." && echo
  echo "| target | build | req/s | worker | usage ingest | usage delivery | quota | other | gateway total | simulator | webhook | PostgreSQL | on the box | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  jq -s -r '
    def med: sort | if length == 0 then 0 else .[(length - 1) / 2 | floor] end;
    def f: . * 10 | round / 10;
    group_by([.target, .build]) | map({t: .[0].target, b: .[0].build, rows: .})
    | sort_by([{bare: 0, keys: 1, governed: 2}[.t], {baseline: 0, current: 1}[.b]])[]
    | .rows as $r
    | ($r | map(.gateway.worker // 0) | med) as $wk
    | ($r | map(.gateway["usage-ingest"] // 0) | med) as $in
    | ($r | map(.gateway["usage-delivery"] // 0) | med) as $de
    | ($r | map(.gateway.quota // 0) | med) as $qu
    | ($r | map(.gateway.other // 0) | med) as $ot
    | ($r | map(.webhook) | med) as $wh | ($r | map(.postgres) | med) as $pg
    | ($wk + $in + $de + $qu + $ot) as $gw
    | "| \(.t) | \(.b) | \($r | map(.rps) | med | round) | \($wk | f) | \($in | f) | \($de | f) | \($qu | f) | \($ot | f) | \($gw | f) | \($r | map(.simulator) | med | f) | \($wh | f) | \($pg | f) | \($gw + $wh + $pg | f) | \($r | map(.errors) | add) |"
  ' "$RESULTS"
} >"$OUT"
cp "$RESULTS" "$RESULTS_DIR/cost.jsonl"
cat "$OUT"
echo
echo "(written to loadtest/results/cost.md)"
