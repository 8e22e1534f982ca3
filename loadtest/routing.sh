#!/usr/bin/env bash
# Where routing puts prompts, measured: several simulated vLLM backends with a prefix-caching KV
# cache (mock-llm --kv-blocks), a multi-tenant multi-turn conversation workload (probe
# conversations), and the gateway's strategies side by side: prefix-cache hit rate from the
# backends' /metrics, TTFT p50/p90, throughput, requests per backend. Markdown table and PNG plot
# in loadtest/results/. See loadtest/README.md.
set -euo pipefail
SCRIPT=routing

usage() {
  cat <<'EOF'
usage: loadtest/routing.sh [options]

  --strategies "S..."  default "round_robin least_load cache_aware oracle"; oracle = round_robin
                       with routing.affinity.header X-Conversation (each conversation on one backend)
  --workloads "W..."   uniform and/or skewed (default both)
  --backends N         simulated backends (default 4)
  --kv-blocks B        KV-cache blocks per backend (default 2048)
  --block-tokens T     tokens per block (default 16)
  --prefill-us US      prefill per uncached prompt token, µs (default 100)
  --max-running R      running sequences per backend, the rest wait (default 4)
  --tokens N           tokens generated per answer (default 16)
  --itl-ms MS          time per generated token (default 5)
  --tenants T          tenants, each with its own system prompt (default 16)
  --users U            conversations per tenant (default 4)
  --turns K            turns per conversation (default 6)
  --system-tokens S    system prompt per tenant, tokens (default 1000)
  --question-tokens Q  new user text per turn, tokens (default 96)
  --answer-tokens A    assistant text added to the history per turn, tokens (default 96)
  --concurrency C      client threads, one request in flight each (default 16)
  --hot-share P        skewed run: share of the conversations that are tenant 0's (default 0.6)
  --quick              --users 2 --turns 3
  --workers N          llmproxy workers (default 2)
  --llmproxy PATH      use this llmproxy binary instead of building one
  --no-build           do not run cargo (binaries must exist)
  --keep               keep the temp dir
  -h, --help           this text
EOF
}

ORIG_CMD="loadtest/routing.sh${*:+ $*}"
STRATEGIES="round_robin least_load cache_aware oracle"; WORKLOADS="uniform skewed"
BACKENDS=4; KV_BLOCKS=2048; BLOCK_TOKENS=16; PREFILL_US=100; MAX_RUNNING=4; TOKENS=16; ITL_MS=5
TENANTS=16; USERS=4; TURNS=6; SYSTEM_TOKENS=1000; QUESTION_TOKENS=96; ANSWER_TOKENS=96
CONCURRENCY=16; HOT_SHARE=0.6; WORKERS=2; LLMPROXY_ARG=""; BUILD=1; KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --strategies) STRATEGIES=${2:-}; shift; shift || true ;;
    --workloads) WORKLOADS=${2:-}; shift; shift || true ;;
    --backends) BACKENDS=${2:-}; shift; shift || true ;;
    --kv-blocks) KV_BLOCKS=${2:-}; shift; shift || true ;;
    --block-tokens) BLOCK_TOKENS=${2:-}; shift; shift || true ;;
    --prefill-us) PREFILL_US=${2:-}; shift; shift || true ;;
    --max-running) MAX_RUNNING=${2:-}; shift; shift || true ;;
    --tokens) TOKENS=${2:-}; shift; shift || true ;;
    --itl-ms) ITL_MS=${2:-}; shift; shift || true ;;
    --tenants) TENANTS=${2:-}; shift; shift || true ;;
    --users) USERS=${2:-}; shift; shift || true ;;
    --turns) TURNS=${2:-}; shift; shift || true ;;
    --system-tokens) SYSTEM_TOKENS=${2:-}; shift; shift || true ;;
    --question-tokens) QUESTION_TOKENS=${2:-}; shift; shift || true ;;
    --answer-tokens) ANSWER_TOKENS=${2:-}; shift; shift || true ;;
    --concurrency) CONCURRENCY=${2:-}; shift; shift || true ;;
    --hot-share) HOT_SHARE=${2:-}; shift; shift || true ;;
    --quick) USERS=2; TURNS=3; shift ;;
    --workers) WORKERS=${2:-}; shift; shift || true ;;
    --llmproxy) LLMPROXY_ARG=${2:-}; shift; shift || true ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "routing: unknown option: $1" >&2; exit 1 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for v in BACKENDS KV_BLOCKS BLOCK_TOKENS PREFILL_US MAX_RUNNING TOKENS ITL_MS TENANTS USERS TURNS \
         SYSTEM_TOKENS QUESTION_TOKENS ANSWER_TOKENS CONCURRENCY WORKERS; do
  is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
(( BACKENDS >= 1 && KV_BLOCKS >= 1 && BLOCK_TOKENS >= 1 && MAX_RUNNING >= 1 )) || die "--backends, --kv-blocks, --block-tokens and --max-running must be >= 1"
[[ $HOT_SHARE =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || die "--hot-share must be between 0 and 1 (got '$HOT_SHARE')"
for s in $STRATEGIES; do
  case "$s" in round_robin|least_load|cache_aware|oracle) ;; *) die "unknown strategy '$s'" ;; esac
done
for w in $WORKLOADS; do
  case "$w" in uniform|skewed) ;; *) die "unknown workload '$w'" ;; esac
done
missing=()
for t in jq curl awk python3; do command -v "$t" >/dev/null || missing+=("$t"); done
(( ${#missing[@]} == 0 )) || die "missing tool(s): ${missing[*]} (Debian: apt-get install -y jq curl python3 python3-venv)"

# matplotlib: the system python's, else a venv under loadtest/results/.venv (shared with scaling.sh)
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
{ "$LLMPROXY" mock-llm --help 2>/dev/null || true; } | grep -q -- "--kv-blocks" || die "$LLMPROXY's simulator has no --kv-blocks (prefix cache)"
{ "$PROBE" 2>&1 || true; } | grep -q "probe conversations" || die "probe at $PROBE has no conversations mode (rebuild without --no-build)"
RES="$WORK/routing.jsonl"; : >"$RES"

# gateway_conf FILE PORT STRATEGY SIM_PORTS...
gateway_conf() {
  local file=$1 port=$2 strategy=$3; shift 3
  {
    echo "listen: \"127.0.0.1:$port\""
    echo "workers: $WORKERS"
    echo "log:"
    echo "  access: false"
    case "$strategy" in
      oracle) printf 'load_balance: round_robin\nrouting:\n  affinity:\n    header: X-Conversation\n' ;;
      least_load) printf 'load_balance: least_load\nrouting:\n  least_load:\n    interval: 200ms\n' ;;
      *) echo "load_balance: $strategy" ;;
    esac
    echo "backends:"
    for p in "$@"; do echo "  - url: \"http://127.0.0.1:$p\""; done
  } >"$file"
}

# backend_counts PORT: "queries hits requests" from a backend's /metrics
backend_counts() {
  curl -sS --max-time 5 "http://127.0.0.1:$1/metrics" | awk '
    /^vllm:prefix_cache_queries_total/ {q += $NF} /^vllm:prefix_cache_hits_total/ {h += $NF}
    /^mock_requests_total/ {r += $NF} END {printf "%d %d %d\n", q, h, r}'
}

# sample_in_flight OUT PORTS...: every 250 ms, one line "port running+waiting" per backend
sample_in_flight() {
  local out=$1; shift
  while :; do
    for p in "$@"; do
      curl -sS --max-time 1 "http://127.0.0.1:$p/metrics" 2>/dev/null | awk -v p="$p" '
        /^vllm:num_requests_(running|waiting)/ {n += $NF} END {print p, n + 0}'
    done >>"$out"
    sleep 0.25
  done
}

SKIPPED=()
for workload in $WORKLOADS; do
  hot=0; [[ $workload == skewed ]] && hot=$HOT_SHARE
  for strategy in $STRATEGIES; do
    mapfile -t ports < <("$PROBE" free-ports $(( BACKENDS + 1 )) | tr ' ' '\n')
    gw_port=${ports[0]}; sims=("${ports[@]:1}")
    gateway_conf "$WORK/gw-$strategy.yaml" "$gw_port" "$strategy" "${sims[@]}"
    if ! "$LLMPROXY" --config "$WORK/gw-$strategy.yaml" check >"$WORK/check-$strategy.txt" 2>&1; then
      if [[ $strategy == cache_aware ]]; then
        log "skipping cache_aware: this gateway rejects it ($(tail -n1 "$WORK/check-$strategy.txt"))"
        (( ${#SKIPPED[@]} )) || SKIPPED+=("cache_aware (the gateway at $LLMPROXY rejects \`load_balance: cache_aware\`: it lands with the cache branch)")
        continue
      fi
      cat "$WORK/check-$strategy.txt" >&2; die "config for $strategy rejected"
    fi
    log "$workload / $strategy: $BACKENDS backends x $KV_BLOCKS blocks of $BLOCK_TOKENS tokens"
    # Fresh backends per run: every strategy starts from cold caches and zero counters.
    for i in "${!sims[@]}"; do
      start "sim$i" "$LLMPROXY" mock-llm --listen "127.0.0.1:${sims[$i]}" --workers 1 \
        --kv-blocks "$KV_BLOCKS" --block-tokens "$BLOCK_TOKENS" --prefill-us-per-token "$PREFILL_US" \
        --max-running "$MAX_RUNNING" --tokens "$TOKENS" --itl-ms "$ITL_MS"
    done
    for i in "${!sims[@]}"; do await_port "sim$i" "${sims[$i]}"; done
    start llmproxy "$LLMPROXY" serve --config "$WORK/gw-$strategy.yaml"
    await_port llmproxy "$gw_port"
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
      -d '{"model":"mock-model","messages":[{"role":"user","content":"smoke"}],"max_tokens":1}' \
      "http://127.0.0.1:$gw_port/v1/chat/completions") || true
    [[ $code == 200 ]] || die "smoke request through llmproxy returned '$code' (see $WORK/llmproxy.log)"
    # least_load needs a first scrape of every backend before it has a picture.
    [[ $strategy == least_load ]] && sleep 0.5
    declare -a before=()
    for i in "${!sims[@]}"; do before[$i]=$(backend_counts "${sims[$i]}"); done
    : >"$WORK/inflight.txt"
    start sampler sample_in_flight "$WORK/inflight.txt" "${sims[@]}"
    rc=0
    run_bounded probe 1800 "$WORK/probe.json" "$PROBE" conversations --addr "127.0.0.1:$gw_port" \
      --tenants "$TENANTS" --users "$USERS" --turns "$TURNS" --system-tokens "$SYSTEM_TOKENS" \
      --question-tokens "$QUESTION_TOKENS" --answer-tokens "$ANSWER_TOKENS" --max-tokens "$TOKENS" \
      --concurrency "$CONCURRENCY" --hot-share "$hot" --header X-Conversation \
      --label "$workload/$strategy" || rc=$?
    stop sampler
    [[ -s "$WORK/probe.json" ]] || { cat "$WORK/probe.err" >&2; die "probe failed for $workload/$strategy (exit $rc)"; }
    per_backend="[]"; queries=0; hits=0
    for i in "${!sims[@]}"; do
      read -r q0 h0 r0 <<<"${before[$i]}"
      read -r q1 h1 r1 <<<"$(backend_counts "${sims[$i]}")"
      peak=$(awk -v p="${sims[$i]}" '$1 == p && $2 > m {m = $2} END {print m + 0}' "$WORK/inflight.txt")
      queries=$(( queries + q1 - q0 )); hits=$(( hits + h1 - h0 ))
      per_backend=$(jq -c --argjson r "$(( r1 - r0 ))" --argjson q "$(( q1 - q0 ))" --argjson h "$(( h1 - h0 ))" \
        --argjson peak "$peak" '. + [{requests: $r, queries: $q, hits: $h, peak_in_flight: $peak}]' <<<"$per_backend")
    done
    jq -c --arg w "$workload" --arg s "$strategy" --argjson q "$queries" --argjson h "$hits" \
      --argjson b "$per_backend" \
      '{workload: $w, strategy: $s, requests, errors, conversations, hot_conversations, turns,
        ttft_p50_us: .ttft_us.p50, ttft_p90_us: .ttft_us.p90, ttft_p99_us: .ttft_us.p99, wall_s, rps,
        queries: $q, hits: $h, hit_rate: (if $q > 0 then $h / $q else null end), backends: $b,
        first_error}' "$WORK/probe.json" >>"$RES"
    jq -r 'select(.workload == "'"$workload"'" and .strategy == "'"$strategy"'") |
      "   hit rate \(.hit_rate * 1000 | round / 10)%, TTFT p50 \(.ttft_p50_us / 1000 | round) ms p90 \(.ttft_p90_us / 1000 | round) ms, \(.rps) req/s, per backend \([.backends[].requests] | join("/")), errors \(.errors)"' "$RES" >&2
    stop llmproxy
    for i in "${!sims[@]}"; do stop "sim$i"; done
  done
done

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS_DIR"
cp "$RES" "$RESULTS_DIR/routing.jsonl"
REPORT=$( {
  echo "# llmproxy: routing and prefix caches"
  echo
  machine_info "$ORIG_CMD"
  echo "- $BACKENDS simulated vLLM backends (\`mock-llm --kv-blocks $KV_BLOCKS --block-tokens $BLOCK_TOKENS --prefill-us-per-token $PREFILL_US --max-running $MAX_RUNNING --tokens $TOKENS --itl-ms $ITL_MS\`, fresh per run), llmproxy with $WORKERS workers; all on the same cores as the client"
  echo "- Workload (\`probe conversations\`): $TENANTS tenants × $USERS conversations, $TURNS turns each; system prompt $SYSTEM_TOKENS tokens per tenant, $QUESTION_TOKENS-token questions, $ANSWER_TOKENS-token answers added to the history; $CONCURRENCY client threads; skewed: tenant 0 owns $HOT_SHARE of the conversations"
  echo "- Hit rate = Σ vllm:prefix_cache_hits_total / Σ vllm:prefix_cache_queries_total over the backends (tokens). TTFT at the client (streamed, to the first data: event). oracle = round_robin + routing.affinity.header X-Conversation"
  echo
  jq -rs '
    def r(n): if . == null then "–" else ((. * pow(10; n) | round) / pow(10; n) | tostring) end;
    "| workload | strategy | hit rate | TTFT p50 ms | TTFT p90 ms | req/s | requests per backend | peak in flight per backend | errors |",
    "|---|---|---:|---:|---:|---:|---|---|---:|",
    (.[] | "| \(.workload) | \(.strategy) | \((.hit_rate // 0) * 100 | r(1))% | \(.ttft_p50_us / 1000 | r(0)) | \(.ttft_p90_us / 1000 | r(0)) | \(.rps | r(1)) | \([.backends[].requests] | map(tostring) | join(" / ")) | \([.backends[].peak_in_flight] | map(tostring) | join(" / ")) | \(.errors) |")
  ' "$RES"
  for s in "${SKIPPED[@]}"; do echo; echo "Skipped: $s"; done
  echo
  echo "Plot: loadtest/results/routing.png; raw: loadtest/results/routing.jsonl"
} )
printf '%s\n' "$REPORT" >"$RESULTS_DIR/routing.md"

"$PY" - "$RES" "$RESULTS_DIR/routing.png" "$ORIG_CMD" <<'PYEOF' || die "plotting failed"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
workloads = list(dict.fromkeys(r["workload"] for r in rows))
strategies = list(dict.fromkeys(r["strategy"] for r in rows))
panels = [
    ("prefix-cache hit rate (%)", lambda r: 100 * (r["hit_rate"] or 0)),
    ("TTFT p50 (ms)", lambda r: r["ttft_p50_us"] / 1000),
    ("TTFT p90 (ms)", lambda r: r["ttft_p90_us"] / 1000),
    ("throughput (req/s)", lambda r: r["rps"]),
]
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
width = 0.8 / max(len(strategies), 1)
for ax, (title, value) in zip(axes, panels):
    for k, s in enumerate(strategies):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            for r in rows:
                if r["workload"] == w and r["strategy"] == s:
                    xs.append(j + (k - (len(strategies) - 1) / 2) * width)
                    ys.append(value(r))
        ax.bar(xs, ys, width, label=s)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=len(strategies), fontsize=9)
fig.suptitle(sys.argv[3], fontsize=8)
fig.tight_layout(rect=(0, 0.07, 1, 1))
fig.savefig(sys.argv[2], dpi=110)
PYEOF

echo
printf '%s\n' "$REPORT"
echo
echo "(written to loadtest/results/routing.md, routing.png, routing.jsonl)" >&2
FAILED=$(jq -s '[.[].errors] | add // 0' "$RES")
(( FAILED == 0 )) || { echo "$SCRIPT: $FAILED failed requests" >&2; exit 3; }
