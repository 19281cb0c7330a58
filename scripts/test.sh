#!/usr/bin/env bash
# The README's second command (and what CI runs): install, lint, type-check, then every test:
# unit tests, integration tests that boot the micro guest under QEMU, and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "==> ruff"
.venv/bin/ruff check
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
# VMKIT_TEST_WORKERS=N runs the tests in N processes (pytest-xdist), each file's tests on one worker
# (--dist loadfile: a guest a file shares between its tests boots once). 0 or unset: serial.
workers="${VMKIT_TEST_WORKERS:-0}"
if [ "$workers" != 0 ]; then
    exec .venv/bin/pytest -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/pytest "$@"
