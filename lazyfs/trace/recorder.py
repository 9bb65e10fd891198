"""Record what a workload reads from a mount: the :class:`~lazyfs.fs.ops.AccessListener` that
turns FUSE opens and reads into a :class:`~lazyfs.trace.schema.Trace`.

Everything on the read path is O(1) dictionary work on in-memory records (a sequential read
only extends its last range); nothing is written until :meth:`Recorder.trace` is asked for, at
unmount or by ``lazyfs trace dump``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from lazyfs.formats.toc import Entry
from lazyfs.trace.schema import FileAccess, Range, Trace

# Ranges kept per file.  Past this, the two closest neighbours are merged: a trace says which
# parts of a file matter for prefetch, and a few hundred tiny holes do not change that.
MAX_RANGES = 64


class _File:
    """The running record of one file (one inode)."""

    __slots__ = (
        "bytes_read",
        "entry",
        "first_open_ns",
        "first_read_ns",
        "layer",
        "path",
        "ranges",
        "reads",
        "wait_ns",
    )

    def __init__(self, path: str, entry: Entry, layer: str) -> None:
        self.path = path
        self.entry = entry
        self.layer = layer
        self.first_open_ns = -1
        self.first_read_ns = -1
        self.reads = 0
        self.bytes_read = 0
        self.wait_ns = 0
        # Sorted, disjoint [start, end) pairs as lists so the common case (a read continuing
        # the last range) is an in-place update.
        self.ranges: list[list[int]] = []

    def add_range(self, start: int, end: int) -> None:
        rs = self.ranges
        if rs and rs[-1][0] <= start <= rs[-1][1]:
            if end > rs[-1][1]:
                rs[-1][1] = end  # sequential: the hot path
            return
        i = bisect.bisect_left(rs, [start, end])
        # Merge with the neighbour before, then swallow every range the new one reaches.
        if i > 0 and rs[i - 1][1] >= start:
            i -= 1
            rs[i][1] = max(rs[i][1], end)
        else:
            rs.insert(i, [start, end])
        cur = rs[i]
        j = i + 1
        while j < len(rs) and rs[j][0] <= cur[1]:
            cur[1] = max(cur[1], rs[j][1])
            j += 1
        del rs[i + 1 : j]
        if len(rs) > MAX_RANGES:
            _, k = min((rs[k + 1][0] - rs[k][1], k) for k in range(len(rs) - 1))
            rs[k][1] = rs[k + 1][1]
            del rs[k + 1]

    def access(self) -> FileAccess:
        return FileAccess(
            path=self.path,
            layer=self.layer,
            digest=self.entry.digest,
            size=self.entry.size,
            first_open_ns=self.first_open_ns,
            first_read_ns=self.first_read_ns,
            reads=self.reads,
            bytes_read=self.bytes_read,
            wait_ns=self.wait_ns,
            ranges=[(a, b) for a, b in self.ranges],
        )


class Recorder:
    """Collects accesses while attached as ``Operations.listener``.  ``layer_digests``: the
    image's layer blob digests in manifest order (what the listener's layer index points at)."""

    def __init__(
        self, image: str, manifest: str, layer_digests: Sequence[str], group: str = "default"
    ) -> None:
        self.image = image
        self.manifest = manifest
        self.layer_digests = list(layer_digests)
        self.group = group
        self._files: dict[int, _File] = {}  # inode -> record, in first-access order
        self._t0 = time.monotonic_ns()
        self._started = datetime.now(UTC)
        self.last_new_ns = 0  # when the latest file was first accessed (idle detection)

    def start(self) -> None:
        """Call when the mount is ready: times are counted from here."""
        self._t0 = time.monotonic_ns()
        self._started = datetime.now(UTC)

    # ------------------------------------------------------------------ listener (hot path)

    def _record(
        self, ino: int, entry: Entry, layer: int, path: Callable[[], Sequence[str]], now: int
    ) -> _File:
        f = self._files.get(ino)
        # Equal, not only identical: a mount's tree makes its lower entries on demand.
        if f is None or (f.entry is not entry and f.entry != entry):
            # First access (or the inode now shows other content): the path is taken now,
            # once, since walking to the root costs the tree's depth.
            f = _File("/".join(path()), entry, self.layer_digests[layer])
            self._files.pop(ino, None)
            self._files[ino] = f
            self.last_new_ns = now
        return f

    def opened(self, ino: int, entry: Entry, layer: int, path: Callable[[], Sequence[str]]) -> None:
        now = time.monotonic_ns() - self._t0
        f = self._record(ino, entry, layer, path, now)
        if f.first_open_ns < 0:
            f.first_open_ns = now

    def read(
        self,
        ino: int,
        entry: Entry,
        layer: int,
        path: Callable[[], Sequence[str]],
        offset: int,
        size: int,
        wait_ns: int,
    ) -> None:
        now = time.monotonic_ns() - self._t0
        f = self._record(ino, entry, layer, path, now)
        if f.first_read_ns < 0:
            f.first_read_ns = now
        f.reads += 1
        f.wait_ns += wait_ns
        if size > 0:
            f.bytes_read += size
            f.add_range(offset, offset + size)

    # ------------------------------------------------------------------ results

    @property
    def files(self) -> int:
        return len(self._files)

    def summary(self) -> dict[str, int]:
        """Cheap progress for idle detection: no per-file work."""
        now = time.monotonic_ns() - self._t0
        return {"files": len(self._files), "now_ns": now, "last_new_ns": self.last_new_ns}

    def trace(self) -> Trace:
        return Trace(
            image=self.image,
            manifest=self.manifest,
            layers=list(self.layer_digests),
            group=self.group,
            started=self._started.isoformat().replace("+00:00", "Z"),
            duration_ns=time.monotonic_ns() - self._t0,
            files=[f.access() for f in self._files.values()],
        )


__all__ = ["MAX_RANGES", "Range", "Recorder"]
