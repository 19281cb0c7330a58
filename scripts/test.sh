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
# The tests run in VMKIT_TEST_WORKERS processes (pytest-xdist; default 2: one per core of CI's
# machine, whose run would take about an hour serially), each file's tests on one worker
# (--dist loadfile: a guest a file shares between its tests boots once). 0: serial.
workers="${VMKIT_TEST_WORKERS:-2}"
if [ "$workers" != 0 ]; then
    exec .venv/bin/pytest -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/pytest "$@"
