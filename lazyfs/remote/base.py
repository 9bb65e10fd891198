"""The one interface every byte source implements: a registry, an OCI layout, a blob file."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import BinaryIO

from lazyfs.errors import IntegrityError

DOWNLOAD_PIECE = 8 * 1024 * 1024
# Streamed ranges are handed over in pieces of at most this size (a source without a
# transfer of its own reads whole ranges up to DOWNLOAD_PIECE: one read_range each).
STREAM_PIECE = 256 * 1024

#: receives a streamed range's bytes in order; the transfer waits while it runs
Sink = Callable[[bytes], Awaitable[None]]
#: receives several ranges' bytes in blob order: ``(blob offset of the piece, the piece)``
RangesSink = Callable[[int, bytes], Awaitable[None]]

#: Set by a task that must know when its requests have left (a mount builds its tree, a
#: stretch of CPU, once its early prefetch travels): a network source calls it as each
#: request's headers are written.  Tasks started from that task inherit it.
REQUEST_SENT: ContextVar[Callable[[], None] | None] = ContextVar(
    "lazyfs_request_sent", default=None
)


def check_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    """Several ranges of one blob must be non-empty, ascending and disjoint: a server may
    answer overlapping ranges with the whole blob (Go's ServeContent does when their sizes
    add up to more than the blob), and an ordered answer is what a sink can use at once."""
    prev = 0
    for start, end in ranges:
        if start < prev or end <= start:
            raise ValueError(f"ranges must be ascending, disjoint and non-empty: {ranges[:8]}")
        prev = end


class Source(abc.ABC):
    """Where bytes come from.  Implementations retry transient faults themselves and raise
    :class:`~lazyfs.errors.RemoteError` / :class:`~lazyfs.errors.NotFoundError` when they give
    up.  Partial data is never returned: ``read_range`` gives exactly ``end - start`` bytes."""

    #: a short label for logs and stats, e.g. ``127.0.0.1:5000/app`` or ``oci:/path``
    name: str

    def underlying(self) -> Source:
        """The source beneath wrappers such as the document cache: what speaks a registry's
        own APIs (referrers), which a wrapper does not pass on."""
        return self

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

    async def stream_range(self, digest: str, start: int, end: int, sink: Sink) -> None:
        """Bytes ``[start, end)`` of a blob handed to ``sink`` in order, piece by piece, as
        they arrive, so a large range never sits in memory whole and its first bytes are
        used before its last arrive.  The transfer waits while ``sink`` runs.  A transfer cut
        mid-way resumes after the last byte handed over: ``sink`` sees every byte exactly
        once, ``end - start`` in all, or the call raises.  Not verified here."""
        for pos in range(start, end, DOWNLOAD_PIECE):
            await sink(await self.read_range(digest, pos, min(end, pos + DOWNLOAD_PIECE)))

    async def stream_ranges(
        self, digest: str, ranges: Sequence[tuple[int, int]], sink: RangesSink
    ) -> None:
        """Several ranges of a blob (ascending, disjoint: :func:`check_ranges`), handed to
        ``sink`` in blob order with each piece's blob offset, every byte exactly once, or the
        call raises.  A registry asks for them in as few requests as it can (multi-range);
        this default streams one range after the other."""
        check_ranges(ranges)
        for start, end in ranges:
            await self.stream_range(digest, start, end, _at(start, sink))

    def multirange(self, digest: str) -> bool:
        """Whether :meth:`stream_ranges` costs about one request whatever the number of
        ranges, so a planner should leave gaps out rather than merge across them."""
        return False

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


def _at(start: int, sink: RangesSink) -> Sink:
    """A :data:`Sink` for one range that tells ``sink`` where each piece lies."""
    pos = start

    async def piece(data: bytes) -> None:
        nonlocal pos
        at, pos = pos, pos + len(data)
        await sink(at, data)

    return piece
