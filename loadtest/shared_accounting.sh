#!/usr/bin/env bash
# What shared token accounting (rate_limit.storage: redis) costs on the governed path, side by
# side in one run: two gateways on one simulator, a key with total_quota and tokens_per_minute set
# never to refuse, one gateway with `storage: memory`, the other with `storage: redis`; wrk runs
# interleaved. With --callgrind N, instead: the worker's, usage reporter's and ledger's
# instructions per request (callgrind, N and 3N requests, one worker on epoll).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: loadtest/shared_accounting.sh [options]

  --rounds R        interleaved wrk rounds (default 3)
  --duration S      seconds per wrk run (default 5)
  --connections C   wrk keep-alive connections (default 64; 2 threads)
  --callgrind N     instruction counts instead of wrk: runs of N and 3N requests
  --llmproxy PATH   use this llmproxy binary instead of building one
  --no-build        do not run cargo build
  -h, --help        this text

Needs Redis at 127.0.0.1:6379 (keys under a unique prefix, deleted at exit), wrk, curl,
python3 and, with --callgrind, valgrind.
EOF
}

ROUNDS=3; DURATION=5; CONNS=64; CALLGRIND=0; LLMPROXY=""; BUILD=1
SCRIPT=shared_accounting
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) need_arg "$@"; ROUNDS=$2; shift 2 ;;
    --duration) need_arg "$@"; DURATION=$2; shift 2 ;;
    --connections) need_arg "$@"; CONNS=$2; shift 2 ;;
    --callgrind) need_arg "$@"; CALLGRIND=$2; shift 2 ;;
    --llmproxy) need_arg "$@"; LLMPROXY=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
for v in ROUNDS DURATION CONNS CALLGRIND; do is_uint "${!v}" || die "$v must be a non-negative integer"; done

if [[ $BUILD == 1 && -z $LLMPROXY ]]; then
  log "building llmproxy (cargo build --release)"
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" >&2 || die "cargo build failed"
fi
LLMPROXY=${LLMPROXY:-$TARGET_DIR/release/llmproxy}
[[ -x $LLMPROXY ]] || die "llmproxy binary not found at $LLMPROXY"
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || die "Redis at 127.0.0.1:6379 is unreachable"
PREFIX="llmproxy-shared-accounting-$$:"
trap 'redis-cli --scan --pattern "$PREFIX*" | xargs -r redis-cli del >/dev/null; cleanup' EXIT

# ready FILE: waits until a `--ready-file` is written; prints its listen address.
ready() {
  for _ in $(seq 600); do [[ -s $1 ]] && break; sleep 0.1; done
  [[ -s $1 ]] || die "nothing wrote $1 (see the logs in $WORK)"
  awk '/^listen/ {print $2}' "$1"
}

start sim "$LLMPROXY" mock-llm --listen 127.0.0.1:0 --ready-file "$WORK/sim.ready"
SIM_ADDR=$(ready "$WORK/sim.ready")

conf() { # STORAGE EXTRA_YAML
  cat >"$WORK/$1.yaml" <<EOF
listen: "127.0.0.1:0"
workers: 1
log: {access: false}
backends: [{url: "http://$SIM_ADDR"}]
auth: {enabled: true, storage: file, quota_path: "$WORK/$1-quota.db"}
api_keys: [{key: "sk-shared-accounting-0001", name: sa, total_quota: 1000000000000}]
rate_limit:
  storage: $1
  redis: {url: "redis://127.0.0.1:6379/", prefix: "$PREFIX"}
  per_key: {tokens_per_minute: 1000000000000}
$2
EOF
}

BODY='{"model": "mock-model", "messages": [{"role": "user", "content": "Hello"}]}'

if (( CALLGRIND > 0 )); then
  command -v valgrind >/dev/null || die "valgrind not found"
  # Instructions of each thread after N and 3N requests: per request = difference / 2N, so that
  # start-up and idle ticks cancel out.
  for storage in memory redis; do
    for n in "$CALLGRIND" $((3 * CALLGRIND)); do
      conf "$storage" "io_driver: epoll"
      out="$WORK/cg-$storage-$n"; mkdir -p "$out"
      start "cg-$storage-$n" valgrind --tool=callgrind --separate-threads=yes \
        --callgrind-out-file="$out/cg.%p" "$LLMPROXY" serve --config "$WORK/$storage.yaml" \
        --ready-file "$out/ready"
      addr=$(ready "$out/ready")
      python3 - "$addr" "$n" "$BODY" <<'PY'
import http.client, sys
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=60)
for _ in range(int(sys.argv[2])):
    c.request("POST", "/v1/chat/completions", sys.argv[3],
              {"Authorization": "Bearer sk-shared-accounting-0001", "Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
      sleep 1
      kill -INT "${PID_OF[cg-$storage-$n]}"; wait "${PID_OF[cg-$storage-$n]}" || true
      unset "PID_OF[cg-$storage-$n]"
      for f in "$out"/cg.*-*; do
        total=$({ grep -m1 '^totals:' "$f" || true; } | awk '{print $2}')
        role=""
        grep -q 'proxy::conn' "$f" && role=worker
        [[ -z $role ]] && grep -q 'usage::reporter' "$f" && role=reporter
        grep -q 'ledger::Sync' "$f" && role=ledger
        [[ -n $role && -n $total ]] && echo "$storage $n $role $total"
      done
    done
  done | awk '
    { v[$1 " " $3 " " $2] += $4; n[$2] = 1; roles[$1 " " $3] = 1 }
    END {
      for (k in n) { if (!lo || k + 0 < lo) lo = k + 0; if (k + 0 > hi) hi = k + 0 }
      for (r in roles) printf "| %s | %s | %.0f |\n", substr(r, 1, index(r, " ") - 1), substr(r, index(r, " ") + 1), (v[r " " hi] - v[r " " lo]) / (hi - lo)
    }' | sort >"$WORK/counts"
  echo "| storage | thread | instructions per request |"
  echo "|---|---|---:|"
  cat "$WORK/counts"
  exit 0
fi

for storage in memory redis; do
  conf "$storage" ""
  start "$storage" "$LLMPROXY" serve --config "$WORK/$storage.yaml" --ready-file "$WORK/$storage.ready"
done
declare -A ADDR=([memory]=$(ready "$WORK/memory.ready") [redis]=$(ready "$WORK/redis.ready"))
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-shared-accounting-0001"
EOF
declare -A RPS=()
for r in $(seq "$ROUNDS"); do
  for storage in memory redis; do
    rps=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$WORK/post.lua" \
      "http://${ADDR[$storage]}/v1/chat/completions" | awk '/Requests\/sec/ {print $2}')
    log "round $r: $storage $rps req/s"
    RPS[$storage]+="$rps "
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
mem=$(median <<<"${RPS[memory]}"); red=$(median <<<"${RPS[redis]}")
echo "| storage | req/s per round | median |"
echo "|---|---|---:|"
echo "| memory | ${RPS[memory]}| $mem |"
echo "| redis | ${RPS[redis]}| $red |"
awk -v m="$mem" -v r="$red" 'BEGIN {printf "redis / memory: %.3f\n", r / m}'
curl -s "http://${ADDR[redis]}/metrics" | grep -E '^llmproxy_shared_accounting_' || true
