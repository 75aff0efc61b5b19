#!/usr/bin/env bash
# Installs everything one-tproxy needs on a Debian/Ubuntu machine, as root:
# the Debian packages (only those missing) and a virtualenv .venv with the
# project and its test tools. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(nftables libnftables1 iproute2 python3 python3-venv curl util-linux procps ${EXTRA_DEBS:-})
missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.one-tproxy-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing one-tproxy and its test tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
    touch "$stamp"
fi
