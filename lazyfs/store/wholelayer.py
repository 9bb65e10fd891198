"""Layers without a TOC (plain gzip, zstd or uncompressed tar): fetched whole, indexed once.

Such a layer cannot be read piece by piece from the registry, so the first mount downloads it
whole (verified against its blob digest by the source), unpacks it to a local tar while
hashing it (verified against the config's diff_id) and indexes that tar: a TOC whose chunks
are ranges of the local tar (compression ``none``), each hashed like any other chunk.  Every
chunk then goes into the chunk cache and the TOC into the TOC cache, so a later mount of the
same layer fetches nothing.  From then on the layer is served like a lazy one, through a
:class:`WholeLayerSource` that reads the local tar, and downloads and unpacks the layer again
should a chunk be missing (evicted) in a later mount.

A mount does not wait for that: with ``background`` set, :meth:`WholeLayers.index` only
registers the layer (a :class:`PendingIndex`) and the opener starts its download once the
mount is ready; what depends on the layer waits for it there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgspec
import trio
import zstandard

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.formats.layer import TocLocation, decompressing
from lazyfs.formats.tarstream import TarReader
from lazyfs.formats.toc import TOC, Chunk, Entry, validate
from lazyfs.remote.base import Source
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.layerstate import read_span

log = logging.getLogger(__name__)

# Chunks cut from a whole layer's files: the size our writers use.
INDEX_CHUNK = 4 * 1024 * 1024
_PIECE = 1024 * 1024


def index_tar(f: BinaryIO, where: str) -> TOC:
    """The TOC of an uncompressed tar: every member, regular files cut into chunks that are
    byte ranges of the tar itself."""
    reader = TarReader(f, where=where)
    entries: list[Entry] = []
    for member in reader:
        e = member.entry
        if e.type == "reg" and e.size:
            chunks: list[Chunk] = []
            whole = hashlib.sha256()
            pos = 0
            while pos < e.size:
                start = reader.position
                data = reader.read(min(INDEX_CHUNK, e.size - pos))
                whole.update(data)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                chunks.append(Chunk(pos, len(data), start, start + len(data), digest))
                pos += len(data)
            e = msgspec.structs.replace(
                e, chunks=tuple(chunks), digest="sha256:" + whole.hexdigest()
            )
        entries.append(e)
    toc = TOC(compression="none", entries=entries, data_end=reader.position)
    validate(toc)
    return toc


class WholeFetch(msgspec.Struct):
    """One whole-layer download, for the mount command's progress lines and ``lazyfs stats``."""

    digest: str
    media_type: str
    size: int  # blob bytes
    seconds: float | None = None  # None while it downloads (or when it failed)
    error: str | None = None  # why the download or its check failed; the next access retries
    received: int | None = None  # blob bytes received so far, while it downloads (see report)


class _Indexed(msgspec.Struct):
    diff_id: str
    toc: TOC


class WholeLayerSource(Source):
    """The bytes of one whole layer's local tar, for the store; everything else (and other
    blobs) from ``inner``."""

    def __init__(self, owner: WholeLayers, desc: oci.Descriptor, diff_id: str) -> None:
        self.owner = owner
        self.desc = desc
        self.diff_id = diff_id
        self.name = f"{owner.source.name} (whole layer)"
        self.tar: Path | None = None
        self._lock = trio.Lock()

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        return await self.owner.source.get_manifest(ref)

    async def get_blob(self, digest: str) -> bytes:
        return await self.owner.source.get_blob(digest)

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        if digest != self.desc.digest:
            return await self.owner.source.read_range(digest, start, end)
        tar = await self.unpack()
        return await trio.to_thread.run_sync(read_span, tar, start, end)

    async def unpack(self) -> Path:
        """The local tar, downloading and unpacking the layer first if need be (once)."""
        async with self._lock:
            if self.tar is None or not self.tar.exists():
                self.tar = await self.owner.fetch(self.desc, self.diff_id)
            return self.tar

    async def aclose(self) -> None:
        if self.tar is not None:
            self.tar.unlink(missing_ok=True)
            self.tar = None


class WholeLayers:
    """The whole-layer fallback of one opened image: where its tars and TOCs live."""

    def __init__(
        self,
        source: Source,
        cache: ChunkCache,
        progress: Callable[[WholeFetch], None] | None = None,
        *,
        background: bool = False,
    ) -> None:
        self.source = source
        self.cache = cache
        self.sources: dict[str, WholeLayerSource] = {}
        self.fetches: dict[str, WholeFetch] = {}  # downloads of this open, last one per blob
        self.progress = progress  # told at the start and end of each download
        self.background = background  # index() defers: see PendingIndex
        self.pending: dict[str, PendingIndex] = {}  # by blob digest, while background
        self._receiving: dict[str, BinaryIO] = {}  # the blob files of downloads under way

    def _toc_path(self, digest: str) -> Path:
        return self.cache.tocs_dir / f"{oci.check_digest(digest)}.whole"

    def _source(self, desc: oci.Descriptor, diff_id: str) -> WholeLayerSource:
        src = self.sources.get(desc.digest)
        if src is None:
            src = self.sources[desc.digest] = WholeLayerSource(self, desc, diff_id)
        return src

    def cached(self, desc: oci.Descriptor, diff_id: str) -> tuple[TocLocation, TOC] | None:
        """The index made by an earlier mount, if it is there and intact."""
        path = self._toc_path(desc.digest)
        try:
            got = msgspec.msgpack.decode(path.read_bytes(), type=_Indexed)
            if got.diff_id != diff_id:
                raise FormatError("indexed for another diff_id")
            validate(got.toc)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, LazyfsError) as e:
            log.info("not using the index of whole layer %s: %s", desc.digest, e)
            path.unlink(missing_ok=True)
            return None
        self._source(desc, diff_id)
        return _location(got.toc), got.toc

    async def index(self, desc: oci.Descriptor, diff_id: str) -> tuple[TocLocation, TOC]:
        """Download, verify and index a layer that has no TOC; cache its chunks and TOC.
        With ``background``: register it in ``pending`` instead and answer an empty TOC (a
        placeholder the opener replaces once the layer is indexed)."""
        if self.background:
            self._source(desc, diff_id)
            self.pending.setdefault(desc.digest, PendingIndex(self, desc, diff_id))
            empty = TOC(compression="none", entries=[], data_end=0)
            return _location(empty), empty
        return await self.index_now(desc, diff_id)

    async def index_now(self, desc: oci.Descriptor, diff_id: str) -> tuple[TocLocation, TOC]:
        src = self._source(desc, diff_id)
        tar = await src.unpack()
        where = f"layer {desc.digest}"
        toc = await trio.to_thread.run_sync(_index_and_cache, tar, where, self.cache)
        path = self._toc_path(desc.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = msgspec.msgpack.encode(_Indexed(diff_id, toc))
        await trio.to_thread.run_sync(atomic_write, path, data)
        return _location(toc), toc

    async def fetch(self, desc: oci.Descriptor, diff_id: str) -> Path:
        """Download ``desc`` whole and unpack it to a private tar, checked against
        ``diff_id``."""
        d = self.cache.blobs_dir
        d.mkdir(parents=True, exist_ok=True)
        hexpart = oci.check_digest(desc.digest)
        tar = d / f"{hexpart}.{os.getpid()}.tar"
        t0 = time.monotonic()
        log.warning(
            "layer %s (%s, %d bytes) has no TOC: fetching it whole",
            desc.digest,
            desc.mediaType,
            desc.size,
        )
        start = WholeFetch(desc.digest, desc.mediaType, desc.size)
        if self.fetches.get(desc.digest) != start:  # not told already by announce()
            self.tell(start)
        with tempfile.TemporaryFile(dir=d) as blob:
            self._receiving[desc.digest] = blob
            try:
                await self.source.download(desc.digest, desc.size, blob)  # checks the digest
            finally:
                del self._receiving[desc.digest]
            blob.seek(0)
            await trio.to_thread.run_sync(_unpack, blob, desc, diff_id, tar)
        seconds = time.monotonic() - t0
        log.warning("layer %s fetched whole and verified in %.1fs", desc.digest, seconds)
        self.tell(WholeFetch(desc.digest, desc.mediaType, desc.size, seconds))
        return tar

    def report(self, digest: str) -> WholeFetch | None:
        """The last word on ``digest``'s download, with the bytes received so far."""
        fetch = self.fetches.get(digest)
        blob = self._receiving.get(digest)
        if fetch is None or blob is None:
            return fetch
        try:
            received = os.fstat(blob.fileno()).st_size
        except (OSError, ValueError):  # closed meanwhile: the next report says how it ended
            return fetch
        return msgspec.structs.replace(fetch, received=received)

    def announce(self, desc: oci.Descriptor) -> None:
        """Tell of a download about to start in the background (before the mount is ready,
        so the command that mounts hears of it)."""
        self.tell(WholeFetch(desc.digest, desc.mediaType, desc.size))

    def tell(self, fetch: WholeFetch) -> None:
        """Record ``fetch`` as the last word on its blob and pass it to ``progress``."""
        self.fetches[fetch.digest] = fetch
        if self.progress is not None:
            try:
                self.progress(fetch)
            except OSError as e:  # the command went away: the download goes on
                log.info("cannot report whole-layer progress: %s", e)
                self.progress = None

    async def aclose(self) -> None:
        for src in self.sources.values():
            await src.aclose()


class PendingIndex:
    """A layer without a TOC, downloaded and indexed in the background.  Every waiter shares
    one attempt; a failed attempt is remembered (its waiters get the error, never a partial
    index) and the next :meth:`wait` starts another."""

    def __init__(self, owner: WholeLayers, desc: oci.Descriptor, diff_id: str) -> None:
        self.owner = owner
        self.desc = desc
        self.diff_id = diff_id
        self.result: tuple[TocLocation, TOC] | None = None
        self.error: LazyfsError | None = None
        self._done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Begin (or, after a failure, begin again) the download in ``nursery``."""
        self._nursery = nursery
        if self.result is None and (self._done is None or self.error is not None):
            self.owner.announce(self.desc)
            self.error = None
            self._done = trio.Event()
            nursery.start_soon(self._run, self._done)

    async def _run(self, done: trio.Event) -> None:
        try:
            self.result = await self.owner.index_now(self.desc, self.diff_id)
        except Exception as e:  # a background task: nothing may escape into the mount
            if not isinstance(e, LazyfsError | OSError):
                log.exception("indexing layer %s failed", self.desc.digest)
            log.warning("layer %s: %s", self.desc.digest, e)
            self.error = e if isinstance(e, LazyfsError) else LazyfsError(str(e))
            d = self.desc
            self.owner.tell(WholeFetch(d.digest, d.mediaType, d.size, error=str(self.error)))
        finally:
            done.set()

    def retry(self) -> None:
        """Start another attempt if the last one failed (the next access retries)."""
        if self.error is not None and self._nursery is not None:
            self.start(self._nursery)

    async def wait(self) -> tuple[TocLocation, TOC]:
        """The layer's location and TOC once indexed; raises why the attempt failed."""
        if self.result is not None:
            return self.result
        assert self._done is not None, "wait() before start()"
        await self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _location(toc: TOC) -> TocLocation:
    return TocLocation("tar", 0, 0, toc.data_end, None, toc.data_end)


def _unpack(blob: BinaryIO, desc: oci.Descriptor, diff_id: str, tar: Path) -> None:
    sha = hashlib.sha256()
    tmp = tar.with_name(tar.name + ".partial")
    try:
        with open(tmp, "wb") as out:
            src = decompressing(blob, desc.mediaType)
            try:
                while piece := src.read(_PIECE):
                    sha.update(piece)
                    out.write(piece)
            except (OSError, EOFError, zstandard.ZstdError) as e:
                raise IntegrityError(f"layer {desc.digest} does not decompress: {e}") from None
        if "sha256:" + sha.hexdigest() != diff_id:
            raise IntegrityError(
                f"layer {desc.digest} unpacks to sha256:{sha.hexdigest()}, "
                f"but the image config says {diff_id}"
            )
        tmp.replace(tar)
    finally:
        tmp.unlink(missing_ok=True)


def _index_and_cache(tar: Path, where: str, cache: ChunkCache) -> TOC:
    with open(tar, "rb") as f:
        toc = index_tar(f, where)
    for e in toc.entries:
        for c in e.chunks:
            if c.digest not in cache:
                cache.put(c.digest, read_span(tar, c.offset, c.end), verified=False)
    return toc
