"""A layer as the store knows it: its TOC's chunks in the orders the store needs, its
readiness map and counters, and (for a registry that ignores Range) a whole local copy."""

from __future__ import annotations

import itertools
import operator
from pathlib import Path

import trio

from lazyfs.errors import RemoteError
from lazyfs.formats.chunklist import ChunkList
from lazyfs.formats.toc import TOC
from lazyfs.remote.base import Source
from lazyfs.store.chunkmap import ChunkMap, DigestIndex, indexed_chunks
from lazyfs.store.stats import LayerStats

READ_POS_MAX = 4096  # files whose read position a layer remembers


class WholeBlob:
    """A layer blob downloaded whole, for a source that ignores Range."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = trio.Event()
        self.error: BaseException | None = None


def read_span(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise RemoteError(f"{path}: short local copy ({len(data)} of {end - start} bytes)")
    return data


def _in_blob_order(chunks: ChunkList) -> bool:
    """Whether ``chunks`` are sorted by (offset, end), read from the columns."""
    offsets, ends = chunks.offsets, chunks.ends
    nxt = itertools.islice(offsets, 1, None)
    if not all(map(operator.le, offsets, nxt)):
        return False
    ties = itertools.compress(
        range(1, len(offsets)), map(operator.eq, offsets, itertools.islice(offsets, 1, None))
    )
    return all(ends[i - 1] <= ends[i] for i in ties)


class Layer:
    """A layer blob known to the store: its TOC, source, readiness map and stats."""

    def __init__(
        self,
        blob_digest: str,
        source: Source,
        toc: TOC,
        cmap: ChunkMap,
        chunks: tuple[ChunkList, DigestIndex] | None = None,
    ) -> None:
        """``chunks``: ``indexed_chunks(toc)`` when the caller has them already."""
        self.blob_digest = blob_digest
        self.source = source
        self.toc = toc
        self.map = cmap
        # The map's bit order, as columns: a chunk is made when a read or prefetch needs it.
        self.chunks, self.index = indexed_chunks(toc) if chunks is None else chunks
        # A TOC lists its chunks in blob order as a rule: then one list serves both orders.
        if _in_blob_order(self.chunks):
            self.by_offset = self.chunks
        else:
            offsets, ends = self.chunks.offsets, self.chunks.ends
            self.by_offset = self.chunks.select(
                sorted(range(len(offsets)), key=lambda i: (offsets[i], ends[i]))
            )
        self.offsets = self.by_offset.offsets  # for bisect
        sizes = self.chunks.sizes
        self.stats = LayerStats(
            blob=blob_digest,
            source=getattr(source, "name", ""),
            chunks_total=len(self.chunks),
            chunks_ready=cmap.ready,
            bytes_total=sum(sizes),
            bytes_ready=sum(itertools.compress(sizes, cmap.flags())),
        )
        # Entry name -> where its last read ended: a read starting there is sequential.  The
        # most recent READ_POS_MAX files only, so a soak that reads every file stays bounded.
        self.read_pos: dict[str, int] = {}
        self.size = 0  # compressed blob size, when known
        self.whole: WholeBlob | None = None  # a local copy, for sources that ignore Range

    def note_read(self, name: str, end: int) -> int | None:
        """Record that a read of ``name`` ended at ``end``; return where the previous one
        ended (None: no read of it is remembered)."""
        prev = self.read_pos.pop(name, None)
        self.read_pos[name] = end  # re-inserted: the dict's order is recency
        if len(self.read_pos) > READ_POS_MAX:
            del self.read_pos[next(iter(self.read_pos))]
        return prev

    def set_ready(self, i: int) -> bool:
        if not self.map.set(i):
            return False
        self.stats.chunks_ready += 1
        self.stats.bytes_ready += self.chunks.sizes[i]
        return True

    def clear_ready(self, i: int) -> bool:
        if not self.map.clear(i):
            return False
        self.stats.chunks_ready -= 1
        self.stats.bytes_ready -= self.chunks.sizes[i]
        return True

    def __repr__(self) -> str:
        return f"<Layer {self.blob_digest[:19]} {self.stats.chunks_ready}/{len(self.chunks)}>"
