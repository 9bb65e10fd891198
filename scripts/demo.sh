#!/usr/bin/env bash
# The main job end to end: set up (idempotent), then build, convert, serve, mount and start
# the embedded sample image, and print the numbers.  Needs root (FUSE mounts, chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
