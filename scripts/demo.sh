#!/usr/bin/env bash
# Set up and run the demo: bubblewrap (the job sandbox) if missing, a venv with xwhep, then `xw demo`
# (an embedded SQLite server, a local worker, a registered app, a submitted work, its result printed).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get -q -y update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends bubblewrap >/dev/null
    else
        echo "demo: bubblewrap is needed: sudo apt-get install bubblewrap" >&2
        exit 1
    fi
fi
python3 -c 'import venv' 2>/dev/null || { echo "demo: python3-venv is needed: apt-get install python3-venv" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e . </dev/null
exec .venv/bin/python -m xwhep.demo
