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
exec .venv/bin/pytest "$@"
