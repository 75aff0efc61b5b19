#!/usr/bin/env bash
# The README's main command (for now: the endpoints of the sample configuration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== one-tproxy endpoints --config docs/OpenNebulaNetwork.conf --network-id 3"
.venv/bin/one-tproxy --config docs/OpenNebulaNetwork.conf endpoints --network-id 3
echo "demo: OK"
