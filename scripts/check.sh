#!/usr/bin/env bash
# The README's test command: installs everything, then lint, type checks and
# every test (unit and, as root, integration). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check tproxy tests twisted bench
echo "== mypy"
.venv/bin/mypy

echo "== trial (under coverage)"
rm -f .coverage
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
.venv/bin/coverage run -m twisted.trial ${TRIAL_ARGS:-} tests 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
.venv/bin/coverage report --skip-empty | grep -E "^TOTAL" || true
# A plain closing line, read the same way whatever the runner.
summary=$(grep -E '^(PASSED|FAILED) \(' "$out" | tail -n 1)
ran=$(grep -E '^Ran [0-9]+ tests' "$out" | tail -n 1 | awk '{print $2}')
num() { local v; v=$(echo "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 || true); echo "${v:-0}"; }
failed=$(( $(num failures) + $(num errors) + $(num unexpectedSuccesses) ))
skipped=$(num skips)
passed=$(( ${ran:-0} - failed - skipped ))
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
if [ "$rc" -ne 0 ] || [ "${ran:-0}" -eq 0 ]; then
    echo "check: FAILED" >&2
    exit 1
fi
echo "check: OK"
