"""A Source wrapper that keeps small documents (manifests by digest, configs) on disk.

Content addressed, verified on the way in and on the way out, so a remount of an image asks the
network for nothing but a tag's current digest.  Ranges of layer blobs pass through: chunks
have their own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import IntegrityError
from lazyfs.remote.base import RangesSink, Sink, Source


class CachingSource(Source):
    def __init__(self, inner: Source, directory: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def underlying(self) -> Source:
        return self.inner.underlying()

    def _load(self, digest: str) -> bytes | None:
        path = self.dir / oci.check_digest(digest)
        try:
            data = path.read_bytes()
            return oci.verify(data, digest, "cached document")
        except FileNotFoundError:
            return None
        except IntegrityError:
            path.unlink(missing_ok=True)  # damaged: fetch it again
            return None

    def _store(self, digest: str, data: bytes) -> None:
        # No fsync: each document is checked against its digest when loaded (a torn one is
        # fetched again), and a cold mount writes five of them on its way to readiness, on
        # the event loop: fsyncs took 1-90 ms each here (measured), in series with the TOC.
        atomic_write(self.dir / oci.check_digest(digest), data, fsync=False)

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        if ref.startswith("sha256:"):
            data = self._load(ref)
            if data is not None:
                return data, oci.sniff_media_type(data), ref
        data, media_type, digest = await self.inner.get_manifest(ref)
        self._store(digest, data)
        return data, media_type, digest

    async def get_blob(self, digest: str) -> bytes:
        data = self._load(digest)
        if data is None:
            data = await self.inner.get_blob(digest)
            self._store(digest, data)
        return data

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        return await self.inner.read_range(digest, start, end)

    async def stream_range(self, digest: str, start: int, end: int, sink: Sink) -> None:
        await self.inner.stream_range(digest, start, end, sink)

    async def stream_ranges(
        self, digest: str, ranges: Sequence[tuple[int, int]], sink: RangesSink
    ) -> None:
        await self.inner.stream_ranges(digest, ranges, sink)

    def multirange(self, digest: str) -> bool:
        return self.inner.multirange(digest)

    def ranges_supported(self) -> bool:
        return self.inner.ranges_supported()

    async def download(self, digest: str, size: int, dst: BinaryIO) -> None:
        await self.inner.download(digest, size, dst)

    async def aclose(self) -> None:
        await self.inner.aclose()
