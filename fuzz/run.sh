#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each, one after another (one process: the machine is
# shared). New inputs go to fuzz/work/<target>/ (not kept in git); the seeds in
# fuzz/corpus/<target>/ are read only. Exits non-zero if any target crashed, leaked, timed out
# or failed to build; a crashing input is saved under fuzz/artifacts/<target>/.
#
#   fuzz/run.sh 60            every target, 60 s each
#   fuzz/run.sh 60 chunked    only the targets named
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
  exit 2
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build || exit 1

failed=()
for target in "${targets[@]}"; do
  mkdir -p "work/$target" "corpus/$target"
  log="work/$target.log"
  echo "== $target: ${seconds}s"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: memory growth is a failure too.
  if cargo +nightly fuzz run "$target" "work/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done' "$log" | sed "s/^/   /"
  else
    echo "   FAILED: see fuzz/$log and fuzz/artifacts/$target/"
    grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY|panicked at)' "$log" | head -5 | sed "s/^/   /"
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz/run.sh: every target ran ${seconds}s without a failure"
