#!/usr/bin/env bash
# Regenerate tests/data/peer/: eStargz and zstd:chunked layers made by a peer
# implementation (ctr-remote from Debian's stargz-snapshotter) from a seeded,
# deterministic source layer.  Uses a private containerd under a temp dir (see
# lazyfs/testing/containerd.py); never touches a system containerd.
# Needs root, containerd, ctr, ctr-remote.  See tests/data/peer/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in containerd ctr ctr-remote; do
  command -v "$tool" >/dev/null || { echo "make-peer-testdata: $tool not found" >&2; exit 1; }
done
if [ "$(id -u)" -ne 0 ]; then
  echo "make-peer-testdata: containerd needs root" >&2
  exit 1
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/peer_testdata.py "$@"
