#!/bin/sh
# Checks systemd/llmproxy.service with `systemd-analyze verify`. The unit's binary path
# (/usr/local/bin/llmproxy) need not exist here: a temporary copy points at BIN (first argument,
# default: target/release/llmproxy, else target/debug/llmproxy, else /bin/true).
# Needs systemd-analyze (Debian: apt-get install -y systemd).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-}
if [ -z "$bin" ]; then
    for candidate in "${CARGO_TARGET_DIR:-$here/../target}/release/llmproxy" \
                     "${CARGO_TARGET_DIR:-$here/../target}/debug/llmproxy" /bin/true; do
        if [ -x "$candidate" ]; then bin=$candidate; break; fi
    done
fi
bin=$(realpath "$bin")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/llmproxy#$bin#g" "$here/llmproxy.service" > "$tmp/llmproxy.service"
out=$(systemd-analyze verify "$tmp/llmproxy.service" 2>&1) || { echo "$out"; exit 1; }
# verify exits 0 on some warnings; treat any message about our unit as a failure.
if echo "$out" | grep -q "llmproxy.service"; then
    echo "$out"
    exit 1
fi
echo "systemd/llmproxy.service: ok (systemd-analyze verify, ExecStart=$bin)"
