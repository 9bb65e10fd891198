"""Chunks too big to hold in memory: fetched in windows, decoded and hashed straight into a
file in the chunk cache, and served from there.

containers/storage cuts zstd:chunked chunks with a rolling hash that has no upper bound, so a
real layer can hold a chunk of hundreds of MiB.  Decoding one in memory would cost its size
(twice: compressed and plain) to read 4 KiB of it.  Here a big chunk costs a few windows:
one being fetched, one queued, one being decoded, plus the decoder's 1 MiB pieces.  The
compressed range is fetched as consecutive range requests, so the remote sources need
nothing new, and a registry that ignores Range is served from its whole local copy as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

from lazyfs.formats.chunkio import decode_chunk_into
from lazyfs.formats.toc import Chunk, Compression
from lazyfs.store.chunkcache import ChunkCache

# Chunks needing more than this decoded (inner offset included), or spanning more than this
# compressed, are big.  Our writers and eStargz's cut 4 MiB chunks: those stay in memory.
BIG_CHUNK_BYTES = 4 * 1024 * 1024
# Compressed bytes per range request of a big chunk.
WINDOW_BYTES = 4 * 1024 * 1024

Fetch = Callable[[int, int], Awaitable[bytes]]


def is_big(chunk: Chunk) -> bool:
    return not chunk.zeros and (
        chunk.inner + chunk.size > BIG_CHUNK_BYTES or chunk.end - chunk.offset > BIG_CHUNK_BYTES
    )


class _Pull:
    """The compressed stream as a file the decoder (in a worker thread) reads from: each
    window comes from the fetching task over a channel."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._buf = b""
        self._pos = 0

    def read(self, size: int = -1, /) -> bytes:
        if self._pos >= len(self._buf):
            try:
                self._buf = trio.from_thread.run(self._receive.receive)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            self._pos = 0
        end = len(self._buf) if size < 0 else self._pos + size
        out = self._buf[self._pos : end]
        self._pos += len(out)
        return out


async def decode_to_cache(
    cache: ChunkCache, compression: Compression, chunk: Chunk, fetch: Fetch
) -> list[str]:
    """Fetch, decode and verify ``chunk`` into the cache; returns the digests evicted to
    make room.  Raises IntegrityError when it does not verify (nothing is cached then),
    LazyfsError when it cannot fit in the cache, and whatever ``fetch`` raises.  Each call
    holds a worker thread and a few windows until it ends: callers bound how many run."""
    evicted = await trio.to_thread.run_sync(cache.reserve, chunk.size)
    out, tmp = await trio.to_thread.run_sync(cache.temp_file, chunk.digest)
    send, receive = trio.open_memory_channel[bytes](1)
    fetch_error: list[BaseException] = []
    decode_error: list[BaseException] = []

    async def produce() -> None:
        async with send:
            try:
                for start in range(chunk.offset, chunk.end, WINDOW_BYTES):
                    await send.send(await fetch(start, min(chunk.end, start + WINDOW_BYTES)))
            except Exception as e:  # the decoder sees the stream end; the error wins
                fetch_error.append(e)

    def decode() -> None:
        with out:
            decode_chunk_into(compression, _Pull(receive), chunk, out)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            try:
                # Not from trio's shared thread limiter: the decoder waits on the fetch, whose
                # reads may need a thread from it.  Callers bound how many run at once.
                await trio.to_thread.run_sync(decode, limiter=trio.CapacityLimiter(1))
            except Exception as e:
                decode_error.append(e)
            # The decoder stops at the chunk's declared size: windows still coming are spare.
            nursery.cancel_scope.cancel()
        if decode_error:  # a failed fetch cut the stream short: that is the cause
            raise (fetch_error or decode_error)[0]
        evicted += await trio.to_thread.run_sync(cache.adopt, chunk.digest, tmp, chunk.size)
    finally:
        out.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # gone already once adopted
    return evicted
