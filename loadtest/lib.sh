# Shared helpers for the loadtest scripts (sourced, not run).
# Expects: SCRIPT (name for messages). Provides process start/stop with cleanup on exit,
# builds, port waiting, /proc readings and the machine-info header.

die() { echo "$SCRIPT: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LT="$ROOT/loadtest"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROBE="$TARGET_DIR/loadtest-probe/release/llmproxy-probe"
RESULTS_DIR="$LT/results"

WORK=$(mktemp -d "/tmp/llmproxy-$SCRIPT.XXXXXX")
KEEP=${KEEP:-0}
declare -A PID_OF=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pids=("${PID_OF[@]}")
  if (( ${#pids[@]} )); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      local alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      (( alive )) || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then echo "$SCRIPT: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... : CMD in the background, output to $WORK/NAME.log, pid in PID_OF[NAME]
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PID_OF[$name]=$!
}

# stop NAME... : TERM (then KILL after 5 s) and reap
stop() {
  local name p
  for name in "$@"; do
    p=${PID_OF[$name]:-}
    [[ -n "$p" ]] || continue
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    unset "PID_OF[$name]"
  done
}

await_port() { # NAME PORT [TIMEOUT_MS]
  if ! "$PROBE" wait "127.0.0.1:$2" "${3:-10000}" 2>/dev/null; then
    echo "---- $WORK/$1.log" >&2; tail -n 20 "$WORK/$1.log" >&2 || true
    die "$1 did not start listening on 127.0.0.1:$2"
  fi
  kill -0 "${PID_OF[$1]}" 2>/dev/null || die "$1 exited at start-up (see $WORK/$1.log)"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime + stime of a process (all threads), in clock ticks
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# build_all BUILD LLMPROXY_OVERRIDE: builds llmproxy (unless given) and the probe; sets LLMPROXY
build_all() {
  if [[ $1 == 1 ]]; then
    command -v cargo >/dev/null || die "cargo not found"
    if [[ -z "$2" ]]; then
      log "building llmproxy (cargo build --release)"
      cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" >&2 || die "cargo build of llmproxy failed"
    fi
    log "building the probe"
    cargo build --release --quiet --manifest-path "$LT/probe/Cargo.toml" \
      --target-dir "$TARGET_DIR/loadtest-probe" >&2 || die "cargo build of loadtest/probe failed"
  fi
  LLMPROXY=${2:-$TARGET_DIR/release/llmproxy}
  [[ -x "$LLMPROXY" ]] || die "llmproxy binary not found at $LLMPROXY"
  [[ -x "$PROBE" ]] || die "probe binary not found at $PROBE (run without --no-build)"
  { "$LLMPROXY" mock-llm --help 2>/dev/null || true; } | grep -q -- "--itl-ms" || die "$LLMPROXY has no mock-llm simulator"
  { "$PROBE" 2>&1 || true; } | grep -q "probe soak" || die "probe at $PROBE has no soak mode (rebuild without --no-build)"
}

# Access log off, as for nginx (access_log off): both relays do the same work.
write_proxy_conf() { # FILE LISTEN_PORT BACKEND_PORT WORKERS
  cat >"$1" <<EOF
listen: "127.0.0.1:$2"
workers: $4
log:
  access: false
backends:
  - url: "http://127.0.0.1:$3"
EOF
}

# The governed path's parts, appended to a write_proxy_conf file. A key checked, with per-key
# limits set high enough never to refuse:
append_keys_conf() { # FILE KEY QUOTA_DB
  cat >>"$1" <<EOF
auth:
  enabled: true
  storage: "file"
  quota_path: "$3"
api_keys:
  - key: "$2"
    name: "loadtest"
    total_quota: 1000000000000
rate_limit:
  per_key:
    requests_per_minute: 1000000000
    max_concurrent: 100000
EOF
}

# Metering to the SQLite spool, a webhook and PostgreSQL, in batches of 500:
append_metering_conf() { # FILE SPOOL_DB WEBHOOK_PORT PG_DSN TABLE
  cat >>"$1" <<EOF
usage_hook:
  enabled: true
  spool_path: "$2"
  reporters:
    - {name: webhook, type: webhook, url: "http://127.0.0.1:$3/usage", batch_size: 500}
    - name: postgres
      type: database
      batch_size: 500
      database: {driver: postgres, dsn: "$4", table: "$5"}
EOF
}

# fds_for NEEDED: raise the soft open-files limit of this shell (and its children) to NEEDED
fds_for() {
  local want=$1
  (( $(ulimit -Sn) >= want )) && return 0
  ulimit -Sn "$want" 2>/dev/null && return 0
  ulimit -n "$want" 2>/dev/null && return 0   # raising the hard limit needs CAP_SYS_RESOURCE
  return 1
}

# Markdown header lines: command, date, commit, machine, load
machine_info() { # ORIG_CMD
  local rev dirty cpu
  rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (dirty)" || true)
  cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  echo "- Command: \`$1\`"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); llmproxy commit $rev$dirty"
  echo "- Machine: nproc $(nproc), kernel $(uname -r), CPU ${cpu:-unknown}, RAM $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), open files limit $(ulimit -Sn)/$(ulimit -Hn)"
  echo "- Load average at report time: $(cut -d' ' -f1-3 /proc/loadavg) (nothing pinned; clients, simulator and gateway share the cores)"
}

# TcpExt counters of this network namespace as JSON (shared with anything else on the box):
# accept-queue overflows and SYN retransmits explain TTFT outliers of about 1 s or more.
tcp_counters() {
  awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else {
         printf "{"; sep = "";
         for (i = 2; i <= NF; i++) if (k[i] ~ /^(ListenOverflows|ListenDrops|TCPSynRetrans|TCPTimeouts)$/) { printf "%s\"%s\":%s", sep, k[i], $i; sep = "," }
         print "}" } }' /proc/net/netstat
}

# run_bounded NAME SECONDS OUTFILE CMD... : runs CMD under `timeout` in the background (stdout to
# OUTFILE, stderr to $WORK/NAME.err) and waits for it. A signal to the script interrupts the wait,
# and cleanup stops CMD too (`timeout` runs CMD in its own process group, out of reach of Ctrl-C).
run_bounded() {
  local name=$1 secs=$2 out=$3 rc=0; shift 3
  timeout -k 5 "$secs" "$@" >"$out" 2>"$WORK/$name.err" &
  PID_OF[$name]=$!
  wait "${PID_OF[$name]}" || rc=$?
  unset "PID_OF[$name]"
  return $rc
}
