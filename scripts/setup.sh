#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): system packages,
# a virtualenv at .venv, and lazyfs installed into it editable with test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config          # FUSE runtime and headers for pyfuse3
  docker-registry                        # reference OCI distribution server (tests, demo)
  containerd runc                        # snapshotter tests
  golang-github-containerd-containerd-dev  # snapshots.proto + mount.proto for the snapshotter
  stargz-snapshotter                     # ctr-remote: peer-made eStargz/zstdchunked layers
  skopeo umoci                           # check converted images with non-lazy tools
  fuse-overlayfs                         # benchmark baseline
  podman                                 # partial pulls of our zstd:chunked (issue 12)
  zstd curl apache2-utils attr iproute2 python3-venv
  autoconf automake gcc make             # build pjdfstest (from ../shared/third_party) in tests
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lazyfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/install.log
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test,codegen]'; } \
      >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
fi

# pyfuse3 cannot ask the kernel to cache directory listings; this rebuilds it so it can (once,
# about a minute; idempotent: nothing happens while the installed build is the patched one).
.venv/bin/python scripts/pyfuse3_cache_dir.py

# The snapshotter's gRPC modules are generated (gitignored) from the protos Debian ships.
if [ ! -f snapshotter/lazyfs_snapshotter/api/snapshots_pb2.py ] \
    || [ scripts/gen_snapshotter_proto.py -nt snapshotter/lazyfs_snapshotter/api/snapshots_pb2.py ]; then
  .venv/bin/python scripts/gen_snapshotter_proto.py
fi
