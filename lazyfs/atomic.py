"""Crash-safe file replacement shared by the chunk cache and the readiness maps."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

# Every temporary file the store creates starts with this, so a start-up scan can tell a
# crash leftover from a real chunk or map and delete it.
TMP_PREFIX = ".tmp-"


# Temporary names: the process id and a counter, not tempfile's random ones (a chunk cache
# write is one of thousands at a cold start, and mkstemp's name drawing and file object cost
# more Python than the syscalls).  O_EXCL still refuses a name a crash left behind.
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_serial = itertools.count()


def atomic_write(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or all of the new one.

    The temp file lives in the same directory so the rename cannot cross filesystems; fsync
    before the rename stops a power loss from leaving a correctly named file with no data.
    """
    folder = os.path.dirname(path)
    while True:
        tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{next(_serial)}")
        try:
            fd = os.open(tmp, _FLAGS, 0o600)
        except FileExistsError:
            continue  # a leftover of an earlier process with this id
        break
    try:
        try:
            done = os.write(fd, data)
            if done < len(data):  # short only on a full disk or a signal: go on or fail
                view = memoryview(data)
                while done < len(data):
                    done += os.write(fd, view[done:])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
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
