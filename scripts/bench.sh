#!/usr/bin/env bash
# The benchmark harness (see scripts/bench.py): lazyfs vs full pulls over an emulated WAN in a
# private network namespace.  Needs root.  `scripts/bench.sh --cleanup` undoes a killed run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--cleanup" ]; then
  bash scripts/setup.sh
  if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test,bench]' >.venv/install-bench.log 2>&1 \
      || { cat .venv/install-bench.log >&2; exit 1; }
  fi
fi
exec .venv/bin/python scripts/bench.py "$@"
