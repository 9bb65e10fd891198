#!/usr/bin/env bash
# The test command: set up (idempotent), lint, then run the whole suite.
# Needs root: tests mount FUSE for real and start a registry and containerd on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lazyfs snapshotter tools tests scripts
.venv/bin/lint-imports  # layers point one way (contracts in pyproject.toml)
.venv/bin/mypy  # strict on lazyfs/ (pyproject.toml)
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
# pytest's "no tests collected" (5) must not pass for success.
if [ "$status" -eq 5 ]; then
  echo "no tests ran" >&2
  exit 1
fi
exit "$status"
