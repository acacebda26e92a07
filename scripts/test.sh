#!/usr/bin/env bash
# The one test command, for developers and CI alike: a venv (made if missing), the package installed editable
# with its test and bench extras (the smoke benchmark is part of the suite), then ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/core).
# System packages the tests need (PostgreSQL, bubblewrap, ...) are installed by .ci/run, not here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# A venv copied from elsewhere or left by another Python may be there but broken: make it again then.
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "== creating .venv with $PYTHON" >&2
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi

echo "== pip install -e '.[test,bench]'" >&2
.venv/bin/python -m pip install -q -e '.[test,bench]' </dev/null

echo "== ruff check src tests" >&2
.venv/bin/ruff check src tests

echo "== mypy" >&2
.venv/bin/mypy

echo "== pytest" >&2
rc=0
.venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@" </dev/null || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests; a test run that tests nothing is a failure" >&2
    exit 1
fi
exit "$rc"
