"""Where a mount's runtime files live: its control socket and log, keyed by the mount point."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/lazyfs")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lazyfs-{os.getuid()}"
    return Path(base) / "lazyfs"


def canonical(mountpoint: str | os.PathLike[str]) -> str:
    """The absolute path with the parents' symlinks resolved but the mount point itself not
    touched: a stat of a mount whose daemon hangs would hang the caller too."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def control_path(mountpoint: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(os.fsencode(canonical(mountpoint))).hexdigest()[:16]
    return runtime_dir() / f"{key}.sock"


def log_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The daemon's log when ``--log`` is not given: beside its control socket, so it outlives
    a crashed daemon (until reboot) and ``lazyfs stats`` can point to it."""
    return control_path(mountpoint).with_suffix(".log")
