#!/usr/bin/env bash
# Benchmarks: run every script under bench/ that is ready (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for b in bench/bench_*.py; do
    [ -e "$b" ] || continue
    echo "== $b"
    .venv/bin/python "$b"
done
