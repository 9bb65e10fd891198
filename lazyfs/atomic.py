"""Crash-safe file replacement shared by the chunk cache and the readiness maps."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Every temporary file the store creates starts with this, so a start-up scan can tell a
# crash leftover from a real chunk or map and delete it.
TMP_PREFIX = ".tmp-"


def atomic_write(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or all of the new one.

    The temp file lives in the same directory so the rename cannot cross filesystems; fsync
    before the rename stops a power loss from leaving a correctly named file with no data.
    """
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_temp_files(directory: Path) -> int:
    """Delete crash leftovers (``TMP_PREFIX`` files) directly inside ``directory``."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for e in entries:
        if e.name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed += 1
    return removed
