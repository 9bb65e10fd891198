"""Copy-up: giving a lower entry its own copy in the upper directory before it changes.

A regular file's content comes from the layer store directly (chunks brought into the cache at
on-demand priority, then read from it), not through the FUSE read path: a copy-up is not a
reader, so it shows in no trace, read count or wait time.  Copies are sparse: holes and chunks
of zeros are skipped, so a 1 TiB file of zeros costs no disk.  What must be written is checked
against the configured limit and the upper file system's free space before the first byte, so
a copy-up fails with EFBIG or ENOSPC instead of filling the disk.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence

import trio

from lazyfs.formats.toc import Chunk, Entry
from lazyfs.fs.upper import Upper, UpperPath, host_xattr
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.store.slots import ONDEMAND

log = logging.getLogger(__name__)

# Chunks brought in and written per step: bounds the memory one copy-up holds.
COPY_BATCH = 8 * 1024 * 1024
# Free space left to everything else on the upper file system after a copy-up: this much, or
# a twentieth of a smaller file system.
SPACE_MARGIN = 64 * 1024 * 1024

Names = Callable[[], list[tuple[str, ...]]]


def image_xattrs(e: Entry) -> dict[str, bytes]:
    """The xattrs of ``e`` that a copy may carry into the host's upper directory."""
    out: dict[str, bytes] = {}
    for k, v in e.xattrs.items():
        if not k or "\0" in k:
            log.warning("%s: xattr name with NUL not copied up", e.name)
        elif not host_xattr(k):
            out[k] = v
    return out


def data_chunks(e: Entry, length: int) -> list[Chunk]:
    """The chunks holding bytes below ``length`` that are not holes."""
    return [c for c in e.chunks if not c.zeros and c.size and c.file_offset < length]


class CopyUp:
    """Copies lower entries into one mount's upper directory."""

    def __init__(
        self,
        store: LayerStore,
        layers: Sequence[Layer],
        upper: Upper,
        *,
        max_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.layers = list(layers)
        self.upper = upper
        self.max_bytes = max_bytes  # None: only free space limits a copy

    # ------------------------------------------------------------------ entries

    async def directory(self, path: UpperPath, e: Entry) -> None:
        # ensure_dir fsyncs the directory and its parent: off the trio thread.
        xattrs = image_xattrs(e)
        await trio.to_thread.run_sync(
            lambda: self.upper.ensure_dir(
                path, mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs=xattrs
            )
        )

    def special(self, path: UpperPath, e: Entry) -> None:
        upper = self.upper
        if e.type == "symlink":
            upper.symlink(path, e.link_name)
        else:
            kind = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}[e.type]
            upper.mknod(path, kind | e.mode, os.makedev(e.dev_major, e.dev_minor))
            upper.chmod(path, e.mode)
        upper.chown(path, e.uid, e.gid)
        if e.type != "symlink":  # Linux keeps no user xattrs on symlinks
            for k, v in image_xattrs(e).items():
                upper.setxattr(path, k, v)
        upper.utimens(path, e.mtime_ns, e.mtime_ns)

    async def regular(
        self, tmp: UpperPath, layer: int, e: Entry, length: int, names: Names
    ) -> None:
        """Copy ``length`` bytes of ``e`` to ``tmp`` (a temporary name), then rename it to the
        first of ``names()`` and link the others, so a crash never leaves a half-copied file
        visible.  ``names`` is asked after the copy: the file may have moved meanwhile; no
        names means it was removed, and the copy is dropped (ENOENT)."""
        upper = self.upper
        fd = upper.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            await self._fill(fd, layer, e, length)
            await trio.to_thread.run_sync(os.fsync, fd)
            where = names()
            if not where:
                raise FileNotFoundError(errno.ENOENT, "removed during copy-up")
        except BaseException:
            os.close(fd)
            upper.unlink(tmp)
            raise
        os.close(fd)
        first, *others = where
        upper.rename(tmp, first)
        for other in others:  # hardlinks stay one inode
            upper.link(first, other)

    async def unlinked(self, tmp: UpperPath, layer: int, e: Entry, length: int) -> int:
        """A copy of ``e`` that no name leads to (its file was unlinked while open): a
        read-write descriptor of it, through ``tmp``, which is gone when this returns."""
        upper = self.upper
        fd = upper.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            upper.unlink(tmp)
            await self._fill(fd, layer, e, length)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _fill(self, fd: int, layer: int, e: Entry, length: int) -> None:
        """``length`` bytes of ``e`` and its metadata into ``fd``."""
        chunks = data_chunks(e, length)
        self.check_space(sum(min(c.size, length - c.file_offset) for c in chunks))
        if chunks:
            await self._copy_data(self.layers[layer], chunks, fd, length)
        os.ftruncate(fd, length)  # the holes and the zeros at the end
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)  # after chown, which clears set-id bits
        for k, v in image_xattrs(e).items():
            os.setxattr(fd, k, v)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    # ------------------------------------------------------------------ limits and data

    def check_space(self, needed: int) -> None:
        if self.max_bytes is not None and needed > self.max_bytes:
            raise OSError(errno.EFBIG, f"copy-up of {needed} bytes exceeds the limit")
        if needed:
            v = self.upper.statvfs()
            margin = min(SPACE_MARGIN, v.f_blocks * v.f_frsize // 20)
            if v.f_bavail * v.f_frsize < needed + margin:
                raise OSError(errno.ENOSPC, f"no room for a copy-up of {needed} bytes")

    async def _copy_data(self, layer: Layer, chunks: list[Chunk], fd: int, length: int) -> None:
        for batch in _batches(chunks):
            digests = [c.digest for c in batch]
            with self.store.cache.pinned(digests):  # not evicted between fetch and copy
                await self.store.prefetch(layer, batch, priority=ONDEMAND)
                await trio.to_thread.run_sync(self._write_batch, batch, fd, length)

    def _write_batch(self, batch: list[Chunk], fd: int, length: int) -> None:
        for c in batch:
            # In pieces: a big chunk (store.bigchunk) is never read into memory whole.
            end = min(c.size, length - c.file_offset)
            for lo in range(0, end, COPY_BATCH):
                hi = min(end, lo + COPY_BATCH)
                data = self.store.cache.read(c.digest, c.size, lo, hi)
                if data is None:
                    raise OSError(errno.EIO, f"chunk {c.digest} vanished from the cache")
                if data.count(0) != len(data):  # all zeros stays a hole
                    os.pwrite(fd, data, c.file_offset + lo)


def _batches(chunks: list[Chunk]) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    size = 0
    for c in chunks:
        batch.append(c)
        size += c.size
        if size >= COPY_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
