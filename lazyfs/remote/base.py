"""The one interface every byte source implements: a registry, an OCI layout, a blob file."""

from __future__ import annotations

import abc
import hashlib
from typing import BinaryIO

from lazyfs.errors import IntegrityError

DOWNLOAD_PIECE = 8 * 1024 * 1024


class Source(abc.ABC):
    """Where bytes come from.  Implementations retry transient faults themselves and raise
    :class:`~lazyfs.errors.RemoteError` / :class:`~lazyfs.errors.NotFoundError` when they give
    up.  Partial data is never returned: ``read_range`` gives exactly ``end - start`` bytes."""

    #: a short label for logs and stats, e.g. ``127.0.0.1:5000/app`` or ``oci:/path``
    name: str

    @abc.abstractmethod
    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: ``(raw bytes, media type, digest)``.
        When ``ref`` is a digest, the bytes are verified against it."""

    @abc.abstractmethod
    async def get_blob(self, digest: str) -> bytes:
        """Fetch a whole (small) blob, verified against its digest: configs, TOCs of tests."""

    @abc.abstractmethod
    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob.  Not verified here: the caller verifies chunks."""

    def ranges_supported(self) -> bool:
        """False once the source was seen ignoring range requests (a registry answering 200
        with the whole blob): callers then fetch the whole blob once instead of once per
        range, which would cost the blob's size for every read."""
        return True

    async def download(self, digest: str, size: int, dst: BinaryIO) -> None:
        """Write the whole blob to ``dst`` and verify it against ``digest``."""
        sha = hashlib.sha256()
        for start in range(0, size, DOWNLOAD_PIECE):
            data = await self.read_range(digest, start, min(size, start + DOWNLOAD_PIECE))
            sha.update(data)
            dst.write(data)
        if "sha256:" + sha.hexdigest() != digest:
            raise IntegrityError(f"{self.name}: blob {digest} has digest sha256:{sha.hexdigest()}")

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""
