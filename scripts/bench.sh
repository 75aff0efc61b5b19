#!/usr/bin/env bash
# Benchmarks: run every script under bench/ that is ready (as root).
# QUICK=1 for a short look (one repetition, short runs); see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# The mesh benchmark's tools. Their packages ship services that must not start
# on the machine itself: while installing, a policy-rc.d (Debian's switch for
# that) tells the init scripts not to start anything; it is removed afterwards.
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made_policy=1
fi
EXTRA_DEBS="${EXTRA_DEBS:-} iperf3 wrk nginx haproxy" bash scripts/setup.sh
cleanup
made_policy=0

for b in bench/bench_*.py; do
    [ -e "$b" ] || continue
    echo "== $b"
    .venv/bin/python "$b"
done
