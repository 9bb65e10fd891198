"""The persistent, content-addressed chunk cache.

Chunks are stored decompressed under ``DIR/chunks/ab/<hex>`` keyed by their sha256, so a chunk
shared by layers or images is stored once.  Files are written atomically and only after
verification; an LRU index (rebuilt at start from one directory scan, in mtime order) keeps
the total under ``max_bytes`` without ever evicting a pinned chunk.

The class is synchronous and thread-safe (one lock around the index, file I/O outside it): the
store calls it through ``trio.to_thread`` and the CLI (``lazyfs cache du/prune``) calls it
directly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from lazyfs.atomic import TMP_PREFIX, atomic_write, remove_temp_files
from lazyfs.errors import IntegrityError, LazyfsError
from lazyfs.formats.chunkio import check_chunk

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024**3
# On-disk mtimes are the LRU order after a restart.  Refreshing them on every hit would cost a
# syscall per read, so a hit only touches the file when its mtime is older than this.
TOUCH_INTERVAL_NS = 600 * 1_000_000_000

_HEX = frozenset("0123456789abcdef")


def default_cache_dir() -> Path:
    """``/var/lib/lazyfs/cache`` for root, else ``$XDG_CACHE_HOME/lazyfs`` (``~/.cache``)."""
    if os.geteuid() == 0:
        return Path("/var/lib/lazyfs/cache")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "lazyfs"


# A cached chunk over this size is hashed in pieces on its first read, not read whole.
VERIFY_WHOLE_BYTES = 4 * 1024 * 1024
_HASH_PIECE = 1024 * 1024


def _hashes_to(fd: int, hx: str) -> bool:
    sha = hashlib.sha256()
    pos = 0
    while piece := os.pread(fd, _HASH_PIECE, pos):
        sha.update(piece)
        pos += len(piece)
    return sha.hexdigest() == hx


def _hex_of(digest: str) -> str | None:
    algo, _, hx = digest.partition(":")
    if algo != "sha256" or len(hx) != 64 or not _HEX.issuperset(hx):
        return None
    return hx


class CacheUsage(msgspec.Struct, kw_only=True):
    dir: str
    chunks: int
    bytes: int
    max_bytes: int
    pinned: int
    layer_maps: int


class PruneResult(msgspec.Struct, kw_only=True):
    removed: int
    freed_bytes: int
    bytes: int  # what remains


# An index entry is one int, not an object: (mtime_ns, size, verified) packed.  The index holds
# every cached chunk, and a slotted object with its two ints cost ~100 B more per chunk
# (issue 13: RSS under a read soak of small files).
_SIZE_BITS = 40


def _pack(size: int, mtime_ns: int, verified: bool) -> int:
    return (mtime_ns << (_SIZE_BITS + 1)) | (size << 1) | verified


def _size(item: int) -> int:
    return (item >> 1) & ((1 << _SIZE_BITS) - 1)


def _mtime_ns(item: int) -> int:
    return item >> (_SIZE_BITS + 1)


def _verified(item: int) -> bool:
    return bool(item & 1)


class ChunkCache:
    """A size-bounded directory of verified, decompressed chunks.

    ``verify_first_read`` (default on): a chunk found on disk at start-up is re-hashed the
    first time it is read in this process, and after that only its size is checked.  That is
    one sha256 per chunk per mount (about 1 ms per MiB, in a worker thread) and it catches
    what the size check cannot: bit rot, tampering with a root-owned cache, or a filesystem
    that lost data despite fsync.  Unverified bytes are then never served, as for the network.

    ``fsync`` (default off): because of that first-read check a chunk file cut short or
    garbled by a crash is caught and fetched again, so durability buys nothing but latency:
    an fsync per chunk made a cold Python start-up a third slower.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        verify_first_read: bool = True,
        fsync: bool = False,
    ) -> None:
        self.dir = Path(dir) if dir is not None else default_cache_dir()
        self.chunks_dir = self.dir / "chunks"
        self.layers_dir = self.dir / "layers"
        # Beside the chunks, owned by their users: TOCs by layer digest (store.tocs),
        # manifests/configs by digest (store.documents), and whole blobs of a registry that
        # ignores Range, kept while a mount runs (store.layerstore).
        self.tocs_dir = self.dir / "tocs"
        self.documents_dir = self.dir / "documents"
        self.blobs_dir = self.dir / "blobs"
        self._chunks = os.fspath(self.chunks_dir)
        self.max_bytes = max_bytes
        self.verify_first_read = verify_first_read
        self.fsync = fsync
        #: whether reads can ask for page-cached bytes only (RWF_NOWAIT); found out at the
        #: first such read on a filesystem that cannot
        self.nowait_reads = hasattr(os, "RWF_NOWAIT")
        self._lock = threading.Lock()
        # hex -> _pack(...), least recently used first.  A plain dict (ordered; a use pops and
        # re-inserts): an OrderedDict adds a linked-list node to each of its many entries.
        self._index: dict[str, int] = {}
        self._bytes = 0
        self._pins: dict[str, int] = {}
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.temp_files_removed = self._scan()
        with self._lock:
            self._evict_locked(self.max_bytes)

    # ----------------------------------------------------------------------------- start-up

    def _scan(self) -> int:
        """Rebuild the index from the directory: one scandir per fan-out directory and one
        stat per file, no reads.  Returns how many crash leftovers were deleted."""
        found: list[tuple[int, str, int]] = []
        removed = remove_temp_files(self.chunks_dir) + remove_temp_files(self.layers_dir)
        with os.scandir(self.chunks_dir) as top:
            subdirs = [d for d in top if d.is_dir(follow_symlinks=False)]
        for d in subdirs:
            with os.scandir(d.path) as it:
                files = list(it)
            for f in files:
                if f.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f.path)
                        removed += 1
                    continue
                if len(f.name) != 64 or not _HEX.issuperset(f.name) or f.name[:2] != d.name:
                    continue  # not ours: leave it alone, and do not count it
                st = f.stat(follow_symlinks=False)
                if st.st_size == 0:
                    # No chunk is empty: this is a file whose data never reached the disk.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f.path)
                        removed += 1
                    continue
                found.append((st.st_mtime_ns, f.name, st.st_size))
        found.sort()
        for mtime, hx, size in found:
            self._index[hx] = _pack(size, mtime, False)
            self._bytes += size
        if removed:
            log.info("removed %d partial files from %s", removed, self.dir)
        return removed

    # ----------------------------------------------------------------------------- lookups

    def path_of(self, digest: str) -> Path:
        hx = _hex_of(digest)
        if hx is None:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return Path(self._file(hx))

    def _file(self, hx: str) -> str:
        # A str, not a Path: pathlib interns every part, and a chunk's hex (often the very
        # string keying the index) in the interpreter's interned table cost ~100 B a cached
        # chunk that nothing gave back (issue 13: RSS under a read soak).
        return os.path.join(self._chunks, hx[:2], hx)

    def layer_map_path(self, blob_digest: str) -> Path:
        return self.layers_dir / f"{blob_digest.partition(':')[2] or blob_digest}.map"

    def __contains__(self, digest: str) -> bool:
        # The index holds valid hex only, so a hit needs no validation (a mount asks this for
        # every chunk of every layer before it is ready).
        return digest.startswith("sha256:") and digest[7:] in self._index

    def holds_chunks(self) -> bool:
        """Whether the index knows any chunk (a fresh cache's does not)."""
        return bool(self._index)

    def probe(self, digest: str) -> bool:
        """Whether the chunk is on disk, adopting a file the index does not know (written by
        another process sharing the directory).  One stat at most."""
        hx = _hex_of(digest)
        if hx is None:
            return False
        if hx in self._index:
            return True
        try:
            st = os.stat(self._file(hx))
        except FileNotFoundError:
            return False
        if st.st_size == 0:
            return False
        with self._lock:
            if hx not in self._index:
                self._index[hx] = _pack(st.st_size, st.st_mtime_ns, False)
                self._bytes += st.st_size
        return True

    def is_verified(self, digest: str) -> bool:
        """True when a read of ``digest`` needs no hashing (it was checked in this process)."""
        hx = _hex_of(digest)
        with self._lock:
            item = self._index.get(hx) if hx is not None else None
            return item is not None and (_verified(item) or not self.verify_first_read)

    def read(
        self, digest: str, size: int, lo: int = 0, hi: int | None = None, *, nowait: bool = False
    ) -> bytes | None:
        """Bytes ``[lo, hi)`` of a cached chunk of ``size`` bytes, or None if it is not (or no
        longer validly) cached; a wrong-sized or corrupt file is deleted.  ``nowait``: raise
        BlockingIOError instead of waiting for the disk (bytes not all in the page cache, or
        an unverified chunk too big to hash whole); the caller tries again in a thread."""
        hx = _hex_of(digest)
        if hx is None:
            return None
        hi = size if hi is None else hi
        with self._lock:
            item = self._index.get(hx)
            verify = self.verify_first_read and (item is None or not _verified(item))
        if verify and nowait and size > VERIFY_WHOLE_BYTES:
            raise BlockingIOError(errno.EAGAIN, "a big unverified chunk is hashed in a thread")
        path = self._file(hx)
        # os.open and friends, not a file object: a first read per file of a start-up, where
        # the object's Python steps cost more than the syscalls.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop(hx, unlink=False)
            return None
        try:
            mtime_ns = self._check_size(fd, hx, size)
            if mtime_ns is None:
                return None
            if verify:
                out = self._verified_read(fd, hx, size, lo, hi, nowait)
            else:
                out = self._pread(fd, hi - lo, lo, nowait)
                if len(out) != hi - lo:
                    self._drop(hx, unlink=True)
                    return None
        finally:
            os.close(fd)
        if out is None:
            return None
        self._used(hx, size, mtime_ns, verify, path)
        return out

    def _check_size(self, fd: int, hx: str, size: int) -> int | None:
        """The file's mtime, or None (and the file dropped) when its size is not ``size``."""
        st = os.fstat(fd)
        if st.st_size != size:
            log.warning("cached chunk %s has %d bytes, not %d: dropped", hx, st.st_size, size)
            self._drop(hx, unlink=True)
            return None
        return st.st_mtime_ns

    def _verified_read(
        self, fd: int, hx: str, size: int, lo: int, hi: int, nowait: bool
    ) -> bytes | None:
        """``[lo, hi)`` of a chunk read for the first time in this process, after hashing it
        whole; None (and the file dropped) when it does not hash to its name."""
        if size > VERIFY_WHOLE_BYTES:
            # A big chunk is hashed in pieces: a 4 KiB read must not cost its size in RAM.
            ok = _hashes_to(fd, hx)
            data = os.pread(fd, hi - lo, lo) if ok else b""
            ok = ok and len(data) == hi - lo
        else:
            data = self._pread(fd, size, 0, nowait)
            ok = len(data) == size and hashlib.sha256(data).hexdigest() == hx
            if ok and (lo, hi) != (0, size):
                data = data[lo:hi]
        if not ok:
            log.warning("cached chunk %s failed verification: dropped", hx)
            self._drop(hx, unlink=True)
            return None
        return data

    def _pread(self, fd: int, n: int, at: int, nowait: bool) -> bytes:
        """``os.pread``; with ``nowait``, only from the page cache (RWF_NOWAIT, which also
        starts the read-ahead a caller in a thread then finds) or BlockingIOError."""
        if not nowait or not self.nowait_reads:
            return os.pread(fd, n, at)
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], at, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self.nowait_reads = False  # this filesystem cannot say; reads may wait, as before
            return os.pread(fd, n, at)
        if got != n:  # only part of it is in the page cache (or the file shrank: a thread sees)
            raise BlockingIOError(errno.EAGAIN, "part of the chunk is not in the page cache")
        return bytes(buf)

    def _used(self, hx: str, size: int, mtime_ns: int, verified_now: bool, path: str) -> None:
        """A read of a chunk: now the most recently used, and verified if it was hashed."""
        now = time.time_ns()
        touch = False
        with self._lock:
            item = self._index.pop(hx, None)
            if item is None:  # adopted from another process, or raced with an eviction
                item = _pack(size, mtime_ns, False)
                self._bytes += size
            mtime = _mtime_ns(item)
            if now - mtime > TOUCH_INTERVAL_NS:
                mtime = now
                touch = True
            self._index[hx] = _pack(_size(item), mtime, _verified(item) or verified_now)
        if touch:
            with contextlib.suppress(OSError):
                os.utime(path)

    # ----------------------------------------------------------------------------- writes

    def put(self, digest: str, data: bytes, *, verified: bool = False) -> list[str]:
        """Store a chunk (hashing it first unless the caller just did, e.g. ``decode_chunk``)
        and evict to stay under ``max_bytes``.  Returns the evicted digests.  Raises
        IntegrityError for data that does not match: it is never stored."""
        hx = _hex_of(digest)
        if hx is None:
            raise IntegrityError(f"unsupported chunk digest {digest!r}")
        if not verified:
            check_chunk(data, digest)
        with self._lock:
            if hx in self._index:
                self._index[hx] = self._index.pop(hx)  # now the most recently used
                return []
        path = self._file(hx)
        try:
            atomic_write(path, data, fsync=self.fsync)
        except FileNotFoundError:
            # The first chunk of its fan-out directory.  Made only then: a mkdir before every
            # write, failing with EEXIST, cost the cache writes of a cold start ~1/8 more.
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(path))
            atomic_write(path, data, fsync=self.fsync)
        with self._lock:
            if hx not in self._index:
                self._index[hx] = _pack(len(data), time.time_ns(), True)
                self._bytes += len(data)
            return self._evict_locked(self.max_bytes)

    def reserve(self, size: int) -> list[str]:
        """Make room for a chunk of ``size`` bytes about to be written as a file (a big chunk,
        decoded straight to disk): evict down to ``max_bytes - size`` and check the disk has
        the space.  Returns the evicted digests; raises LazyfsError naming the reason when the
        chunk cannot fit, so its readers get EIO instead of a full disk."""
        if size > self.max_bytes:
            raise LazyfsError(
                f"a chunk of {size} bytes is larger than the cache ({self.max_bytes} bytes)"
            )
        with self._lock:
            evicted = self._evict_locked(self.max_bytes - size)
        st = os.statvfs(self.chunks_dir)
        free = st.f_bavail * st.f_frsize
        if free < size:
            raise LazyfsError(
                f"a chunk of {size} bytes does not fit in the {free} bytes free under {self.dir}"
            )
        return evicted

    def temp_file(self, digest: str) -> tuple[BinaryIO, Path]:
        """A new temporary file beside the chunk's final place (same filesystem, so
        :meth:`adopt` is a rename; a crash leaves a ``TMP_PREFIX`` file the next scan removes)."""
        path = self.path_of(digest)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        return os.fdopen(fd, "wb"), Path(tmp)

    def adopt(self, digest: str, tmp: Path, size: int) -> list[str]:
        """Move a verified chunk file written by the caller into place (atomically) and index
        it.  Returns the evicted digests."""
        hx = _hex_of(digest)
        if hx is None:
            raise IntegrityError(f"unsupported chunk digest {digest!r}")
        if self.fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, self._file(hx))
        with self._lock:
            if hx not in self._index:
                self._index[hx] = _pack(size, time.time_ns(), True)
                self._bytes += size
            else:
                self._index[hx] = self._index.pop(hx)
            return self._evict_locked(self.max_bytes)

    def _drop(self, hx: str, *, unlink: bool) -> None:
        with self._lock:
            item = self._index.pop(hx, None)
            if item is not None:
                self._bytes -= _size(item)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(hx))

    def _evict_locked(self, target: int) -> list[str]:
        """Drop least recently used unpinned chunks until at most ``target`` bytes remain."""
        if self._bytes <= target:
            return []
        victims: list[str] = []
        excess = self._bytes - target
        for hx, item in self._index.items():
            if excess <= 0:
                break
            if hx in self._pins:
                continue
            victims.append(hx)
            excess -= _size(item)
        for hx in victims:
            self._bytes -= _size(self._index.pop(hx))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(hx))
        return ["sha256:" + hx for hx in victims]

    # ----------------------------------------------------------------------------- pins

    def pin(self, digests: Iterable[str]) -> None:
        """Protect chunks from eviction (also ones not cached yet: a reader pins before the
        fetch so the chunk it is about to get cannot be evicted by a concurrent put)."""
        with self._lock:
            for d in digests:
                hx = _hex_of(d)
                if hx is not None:
                    self._pins[hx] = self._pins.get(hx, 0) + 1

    def unpin(self, digests: Iterable[str]) -> list[str]:
        """Release pins; evicts what had to stay over budget.  Returns evicted digests."""
        with self._lock:
            for d in digests:
                hx = _hex_of(d)
                if hx is None:
                    continue
                n = self._pins.get(hx, 0) - 1
                if n > 0:
                    self._pins[hx] = n
                else:
                    self._pins.pop(hx, None)
            return self._evict_locked(self.max_bytes)

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        ds = list(digests)
        self.pin(ds)
        try:
            yield
        finally:
            self.unpin(ds)

    # ----------------------------------------------------------------------------- CLI

    @property
    def bytes(self) -> int:
        return self._bytes

    def du(self) -> CacheUsage:
        with self._lock:
            chunks, used, pinned = len(self._index), self._bytes, len(self._pins)
        maps = sum(1 for p in self.layers_dir.glob("*.map"))
        return CacheUsage(
            dir=str(self.dir),
            chunks=chunks,
            bytes=used,
            max_bytes=self.max_bytes,
            pinned=pinned,
            layer_maps=maps,
        )

    def prune(self, target_bytes: int = 0) -> PruneResult:
        """Evict least recently used chunks until at most ``target_bytes`` remain (pinned ones
        stay).  Layer maps are left: they are hints and heal on the next read."""
        with self._lock:
            before, n = self._bytes, len(self._index)
            self._evict_locked(max(target_bytes, 0))
            return PruneResult(
                removed=n - len(self._index), freed_bytes=before - self._bytes, bytes=self._bytes
            )
