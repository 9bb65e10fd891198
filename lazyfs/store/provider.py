"""The store's one hook for chunks that come from somewhere other than their layer's blob.

A :class:`ChunkProvider` is asked before the network for chunks the cache lacks (on-demand
reads, prefetch, pulls) and may answer some of them, e.g. by applying a binary patch to chunks
the cache already holds (:mod:`lazyfs.delta.provider`).  The store trusts nothing it returns:
every chunk is checked against its digest before it is cached or served, and a chunk the
provider does not produce is fetched from the blob as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from lazyfs.formats.toc import Chunk
from lazyfs.store.layerstate import Layer


class ChunkProvider(Protocol):
    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        """Content for some of ``chunks`` (and, optionally, other chunks made on the way),
        keyed by digest.  Network I/O it does must run inside ``slot()`` (a fetch slot at the
        caller's priority).  Must not raise for a chunk it cannot make: it leaves it out."""
        ...
