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
# VMKIT_TEST_WORKERS=N runs the tests in N processes (pytest-xdist); the tests of a file that share
# a guest stay on one worker (--dist loadgroup, markers set by tests/conftest.py). 0 or unset: serial.
workers="${VMKIT_TEST_WORKERS:-0}"
if [ "$workers" != 0 ]; then
    exec .venv/bin/pytest -n "$workers" --dist loadgroup "$@"
fi
exec .venv/bin/pytest "$@"
