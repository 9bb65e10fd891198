"""Unit tests of lazyfs.store: cache, readiness maps and the prioritised fetcher.

Layers are built in memory by a tiny zstd chunk writer (one frame per chunk) and served by an
in-memory Source that records requests and can delay, gate or corrupt them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
import zstandard

from lazyfs.errors import IntegrityError
from lazyfs.formats.chunklist import ChunkList
from lazyfs.formats.toc import TOC, Chunk, Compression, Entry, validate
from lazyfs.remote.base import REQUEST_SENT, Source
from lazyfs.store import (
    PREFETCH,
    ChunkCache,
    ChunkMap,
    Layer,
    LayerStats,
    LayerStore,
    default_cache_dir,
    layerstore,
)
from lazyfs.store.chunkmap import DigestIndex
from lazyfs.store.layerstate import READ_POS_MAX

# ------------------------------------------------------------------------------------ helpers


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_layer(
    files: dict[str, bytes | list[bytes | int]], chunk_size: int = 1000, gap: int = 0
) -> tuple[bytes, TOC]:
    """A zstd:chunked-like blob: each chunk its own zstd frame, ``gap`` junk bytes between
    chunks.  A file given as a list has explicit pieces; an int piece is a hole of that size."""
    cctx = zstandard.ZstdCompressor()
    blob = bytearray()
    entries = [Entry(name="", type="dir", mode=0o755)]
    for name, content in files.items():
        pieces: list[bytes | int]
        if isinstance(content, bytes):
            pieces = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]
        else:
            pieces = content
        chunks: list[Chunk] = []
        pos = 0
        for piece in pieces:
            if isinstance(piece, int):
                chunks.append(Chunk(pos, piece, 0, 0, "", zeros=True))
                pos += piece
                continue
            start = len(blob)
            blob += cctx.compress(piece)
            chunks.append(Chunk(pos, len(piece), start, len(blob), digest_of(piece)))
            blob += b"\xee" * gap
            pos += len(piece)
        entries.append(Entry(name=name, type="reg", size=pos, chunks=tuple(chunks)))
    toc = TOC(compression="zstd", entries=entries, data_end=len(blob))
    validate(toc)
    return bytes(blob), toc


def content_of(toc: TOC, blob: bytes, name: str) -> bytes:
    out = bytearray()
    dctx = zstandard.ZstdDecompressor()
    for c in toc.by_name()[name].chunks:
        out += bytes(c.size) if c.zeros else dctx.decompress(blob[c.offset : c.end])
    return bytes(out)


class MemSource(Source):
    """Serves blobs from memory; records every range request."""

    def __init__(self, blobs: dict[str, bytes], name: str = "mem") -> None:
        self.name = name
        self.blobs = blobs
        self.requests: list[tuple[str, int, int]] = []
        self.gates: dict[int, trio.Event] = {}  # request start offset -> wait for this first
        self.gate_all: trio.Event | None = None
        self.flips = 0  # corrupt this many of the next responses
        self.corrupt_all = False
        self.corrupt_at: set[int] = set()  # blob offsets damaged in every response

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        raise NotImplementedError

    async def get_blob(self, digest: str) -> bytes:
        return self.blobs[digest]

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        self.requests.append((digest, start, end))
        if self.gate_all is not None:
            await self.gate_all.wait()
        gate = self.gates.get(start)
        if gate is not None:
            await gate.wait()
        await trio.lowlevel.checkpoint()
        data = bytearray(self.blobs[digest][start:end])
        for at in self.corrupt_at:
            if start <= at < end:
                data[at - start] ^= 0x01
        if self.corrupt_all or self.flips > 0:
            self.flips -= 1
            data[len(data) // 2] ^= 0x10
        return bytes(data)


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


BLOB = "sha256:" + "b1" * 32
BLOB2 = "sha256:" + "b2" * 32


def make(
    tmp_path: Path,
    files: dict[str, bytes | list[bytes | int]],
    *,
    blob_digest: str = BLOB,
    max_bytes: int = 1 << 30,
    chunk_size: int = 1000,
    gap: int = 0,
    **store_kw: int,
) -> tuple[LayerStore, Layer, MemSource, TOC, bytes]:
    blob, toc = build_layer(files, chunk_size, gap)
    src = MemSource({blob_digest: blob})
    store = LayerStore(ChunkCache(tmp_path / "cache", max_bytes), **store_kw)
    layer = store.add_layer(blob_digest, src, toc)
    return store, layer, src, toc, blob


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def chunk_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "chunks").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------ reads


def test_random_ranges_return_exact_bytes(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {
        "a": rand(10_500, 1),
        "b": rand(999, 2),
        "empty": b"",
        "sparse": [rand(700, 3), 5000, rand(300, 4)],
        "c": rand(4000, 5),
    }
    store, layer, _src, toc, blob = make(tmp_path, files, chunk_size=1000)
    by_name = toc.by_name()
    want = {n: content_of(toc, blob, n) for n in files}
    rng = random.Random(7)
    nonempty = 0

    async def main() -> None:
        nonlocal nonempty
        for _ in range(300):
            name = rng.choice(list(files))
            e = by_name[name]
            off = rng.randrange(0, e.size + 50) if e.size else rng.randrange(0, 10)
            size = rng.randrange(0, 3000)
            got = await store.read(layer, e, off, size)
            assert got == want[name][off : off + size], (name, off, size)
            nonempty += bool(got)
        await store.aclose()

    run(main)
    assert want["sparse"][700:5700] == bytes(5000)
    assert layer.stats.chunks_ready == layer.stats.chunks_total
    # Reads that are empty (at or past EOF) are not counted.
    assert layer.stats.reads == nonempty == sum(layer.stats.latency_log2_us)


def test_single_flight(tmp_path: Path) -> None:
    store, layer, src, toc, blob = make(tmp_path, {"f": rand(3000, 1)})
    e = toc.by_name()["f"]
    results: list[bytes] = []

    async def main() -> None:
        src.gate_all = trio.Event()
        async with trio.open_nursery() as n:
            for _ in range(10):

                async def reader() -> None:
                    results.append(await store.read(layer, e, 1500, 100))

                n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert len(src.requests) == 1
            src.gate_all.set()

    run(main)
    assert len(src.requests) == 1
    assert results == [content_of(toc, blob, "f")[1500:1600]] * 10


def test_merging_counts_requests(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"f": rand(10_000, 1)}

    def requests_for(tmp: Path, **kw: int) -> tuple[int, int]:
        store, layer, src, toc, blob = make(tmp, files, gap=100, readahead=0, **kw)
        e = toc.by_name()["f"]

        async def main() -> None:
            assert await store.read(layer, e, 0, e.size) == content_of(toc, blob, "f")

        run(main)
        return len(src.requests), layer.stats.bytes_fetched

    merged, merged_bytes = requests_for(tmp_path / "m")
    separate, separate_bytes = requests_for(tmp_path / "s", merge_gap=50)
    capped, _ = requests_for(tmp_path / "c", max_request=1)
    assert (merged, separate, capped) == (1, 10, 10)
    # Merged requests also carry the gaps between chunks (9 gaps of 100 bytes).
    assert merged_bytes == separate_bytes + 900


def test_readahead_small_file_whole_and_random_access_none(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"small": rand(5000, 1), "big": rand(50_000, 2)}
    store, layer, src, toc, _blob = make(
        tmp_path, files, gap=100_000, merge_gap=200_000, readahead=10_000, amplify=0
    )
    small, big = toc.by_name()["small"], toc.by_name()["big"]

    async def main() -> None:
        await store.read(layer, small, 0, 10)  # first touch of a small file: all 5 chunks
        assert len(src.requests) == 1
        assert layer.stats.chunks_ready == 5
        await store.read(layer, small, 4000, 1000)
        assert len(src.requests) == 1
        await store.read(layer, big, 0, 10)  # big file: the next ~10 kB of chunks
        ready = layer.stats.chunks_ready
        assert 5 + 1 < ready < 5 + 50
        await store.read(layer, big, 40_000, 10)  # random access: only that chunk
        assert layer.stats.chunks_ready == ready + 1

    run(main)


def test_restart_fetches_nothing(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"a": rand(7000, 1), "b": rand(3000, 2)}
    store, layer, _src, toc, blob = make(tmp_path, files)
    progress: list[int] = []

    async def first() -> None:
        await store.fetch_all(layer, progress_cb=lambda s: progress.append(s.chunks_ready))
        await store.aclose()

    run(first)
    assert progress and progress[-1] == 10
    assert (tmp_path / "cache" / "layers" / (BLOB.split(":")[1] + ".map")).exists()

    src2 = MemSource({BLOB: blob})
    store2 = LayerStore(ChunkCache(tmp_path / "cache", 1 << 30))
    layer2 = store2.add_layer(BLOB, src2, toc)
    assert layer2.stats.chunks_ready == layer2.stats.chunks_total == 10

    async def second() -> None:
        for name in files:
            e = toc.by_name()[name]
            assert await store2.read(layer2, e, 0, e.size) == files[name]
        await store2.fetch_all(layer2)
        await store2.aclose()

    run(second)
    assert src2.requests == []
    assert layer2.stats.cache_hits == 10 and layer2.stats.cache_misses == 0


def test_a_fresh_cache_is_not_asked_for_each_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold mount (no chunk cached, no map kept) adds its layer without a lookup per chunk;
    with one chunk cached (another layer's), the lookups find it."""
    blob, toc = build_layer({"a": rand(3000, 1), "b": rand(2000, 2)})
    asked: list[str] = []
    contains = ChunkCache.__contains__

    def counted(self: ChunkCache, digest: str) -> bool:
        asked.append(digest)
        return contains(self, digest)

    monkeypatch.setattr(ChunkCache, "__contains__", counted)
    cache = ChunkCache(tmp_path / "cache")
    layer = LayerStore(cache).add_layer(BLOB, MemSource({BLOB: blob}), toc)
    assert asked == [] and layer.stats.chunks_ready == 0 and layer.stats.bytes_held == 0
    piece = rand(3000, 1)[:1000]
    cache.put(digest_of(piece), piece)
    layer = LayerStore(cache).add_layer(BLOB, MemSource({BLOB: blob}), toc)
    assert len(asked) == 5 and layer.stats.chunks_ready == 1
    first = toc.by_name()["a"].chunks[0]
    assert layer.stats.bytes_held == first.end - first.offset


def test_map_bit_for_missing_chunk_is_refetched(tmp_path: Path) -> None:
    store, layer, _src, toc, blob = make(tmp_path, {"a": rand(3000, 1)}, readahead=0)
    e = toc.by_name()["a"]
    want = content_of(toc, blob, "a")

    async def first() -> None:
        await store.fetch_all(layer)
        await store.aclose()

    run(first)
    probe = ChunkCache(tmp_path / "cache")
    probe.path_of(e.chunks[0].digest).unlink()  # pruned while nothing was mounted
    cache = ChunkCache(tmp_path / "cache")
    store2 = LayerStore(cache)
    src2 = MemSource({BLOB: blob})
    layer2 = store2.add_layer(BLOB, src2, toc)
    assert layer2.stats.chunks_ready == 2  # the map said 3; the directory wins
    cache.path_of(e.chunks[1].digest).unlink()  # pruned by another process while mounted
    assert layer2.stats.chunks_ready == 2

    async def second() -> None:
        assert await store2.read(layer2, e, 0, e.size) == want
        await store2.aclose()

    run(second)
    # Both missing chunks are adjacent: one merged request; chunk 2 came from the cache.
    assert [r[1:] for r in src2.requests] == [(e.chunks[0].offset, e.chunks[1].end)]
    assert layer2.stats.chunks_ready == 3


def test_dedup_across_layers(tmp_path: Path) -> None:
    shared = rand(2500, 9)
    blob1, toc1 = build_layer({"x": rand(1000, 1), "shared": shared})
    blob2, toc2 = build_layer({"shared": shared, "y": rand(500, 2)})
    src = MemSource({BLOB: blob1, BLOB2: blob2})
    store = LayerStore(ChunkCache(tmp_path / "cache", 1 << 30), behind=0)  # x stays remote
    l1 = store.add_layer(BLOB, src, toc1)
    l2 = store.add_layer(BLOB2, src, toc2)

    async def main() -> None:
        e1 = toc1.by_name()["shared"]
        assert await store.read(l1, e1, 0, e1.size) == shared
        n = len(src.requests)
        assert l2.stats.chunks_ready == 3  # marked through the other layer
        e2 = toc2.by_name()["shared"]
        assert await store.read(l2, e2, 0, e2.size) == shared
        assert len(src.requests) == n

    run(main)
    assert len(chunk_files(tmp_path / "cache")) == 3


# ------------------------------------------------------------------------------------ cache


def test_eviction_bound_and_pins(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", max_bytes=3000)
    pieces = [rand(1000, i) for i in range(6)]
    cache.pin([digest_of(pieces[0])])
    for p in pieces:
        cache.put(digest_of(p), p)
        assert cache.bytes <= 3000
    assert digest_of(pieces[0]) in cache  # pinned: survived although oldest
    assert digest_of(pieces[1]) not in cache
    assert digest_of(pieces[5]) in cache
    assert cache.read(digest_of(pieces[0]), 1000) == pieces[0]
    evicted = cache.unpin([digest_of(pieces[0])])
    assert evicted == []  # within budget already
    usage = cache.du()
    assert (usage.chunks, usage.bytes) == (3, 3000)
    assert len(chunk_files(tmp_path / "c")) == 3
    # Over budget while pinned: pins hold until released, then eviction catches up.
    d4, d5 = digest_of(pieces[4]), digest_of(pieces[5])
    cache.pin([d4, d5])
    cache.max_bytes = 1000
    cache.put(digest_of(pieces[1]), pieces[1])
    assert d4 in cache and d5 in cache and cache.bytes == 2000
    assert digest_of(pieces[1]) not in cache
    assert cache.unpin([d4, d5]) == [d4]  # least recently used first
    assert cache.bytes == 1000 and d5 in cache


def test_put_refuses_bad_data_and_prune(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c")
    good = rand(100, 1)
    with pytest.raises(IntegrityError):
        cache.put(digest_of(good), good + b"x")
    assert cache.du().chunks == 0
    for i in range(4):
        p = rand(100, i)
        cache.put(digest_of(p), p)
    r = cache.prune(150)
    assert (r.removed, r.freed_bytes, r.bytes) == (3, 300, 100)
    assert cache.prune(0).bytes == 0
    assert chunk_files(tmp_path / "c") == []


def test_put_makes_a_fan_out_directory_removed_beneath_it(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c")
    first = rand(100, 1)
    cache.put(digest_of(first), first)
    shutil.rmtree(cache.path_of(digest_of(first)).parent)  # someone cleaned up by hand
    again = rand(100, 1) + b"again"
    cache.put(digest_of(again), again)
    assert cache.path_of(digest_of(again)).read_bytes() == again


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c")
    pieces = [rand(100, i) for i in range(3)]
    for i, p in enumerate(pieces):
        cache.put(digest_of(p), p)
        os.utime(cache.path_of(digest_of(p)), ns=(10**18 + i, 10**18 + i))
    os.utime(cache.path_of(digest_of(pieces[0])), ns=(10**18 + 5, 10**18 + 5))
    again = ChunkCache(tmp_path / "c", max_bytes=200)  # evicts the oldest by mtime at start
    assert digest_of(pieces[1]) not in again
    assert digest_of(pieces[0]) in again and digest_of(pieces[2]) in again


def test_temp_files_cleaned_on_start(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c")
    p = rand(100, 1)
    cache.put(digest_of(p), p)
    sub = cache.path_of(digest_of(p)).parent
    (sub / ".tmp-abc123").write_bytes(b"partial")
    (tmp_path / "c" / "layers" / ".tmp-x").write_bytes(b"partial map")
    empty = digest_of(b"never written")
    cache.path_of(empty).parent.mkdir(exist_ok=True)
    cache.path_of(empty).write_bytes(b"")  # renamed before its data reached the disk
    again = ChunkCache(tmp_path / "c")
    assert again.temp_files_removed == 3
    assert [f.name for f in chunk_files(tmp_path / "c")] == [digest_of(p)[7:]]
    assert list((tmp_path / "c" / "layers").iterdir()) == []
    assert again.read(digest_of(p), 100) == p


def _cache_filled_and_closed(
    tmp_path: Path, data: bytes = rand(1000, 1), chunk_size: int = 1000
) -> tuple[TOC, bytes, Entry]:
    """One file's chunks fetched into the cache under ``tmp_path`` by a store then closed (as
    a daemon's stop leaves them): the TOC, the blob and the file's entry."""
    store, layer, _src, toc, blob = make(tmp_path, {"a": data}, chunk_size=chunk_size)

    async def first() -> None:
        await store.fetch_all(layer)
        await store.aclose()

    run(first)
    return toc, blob, toc.by_name()["a"]


def test_corrupt_cache_file_is_verified_on_first_read(tmp_path: Path) -> None:
    toc, blob, e = _cache_filled_and_closed(tmp_path)
    path = ChunkCache(tmp_path / "cache").path_of(e.chunks[0].digest)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))  # same size: only the hash can tell
    src2 = MemSource({BLOB: blob})
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    layer2 = store2.add_layer(BLOB, src2, toc)

    async def second() -> None:
        assert await store2.read(layer2, e, 0, 1000) == content_of(toc, blob, "a")

    run(second)
    assert len(src2.requests) == 1
    assert path.read_bytes() == content_of(toc, blob, "a")


def test_a_small_chunks_first_read_after_a_restart_is_hashed_without_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh daemon over a warm cache verifies each chunk on its first read: a small one on
    the trio thread (a worker thread's hop cost more than the hash, on every file's first read
    of a second container's start-up)."""
    toc, blob, e = _cache_filled_and_closed(tmp_path)
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    src2 = MemSource({BLOB: blob})
    layer2 = store2.add_layer(BLOB, src2, toc)
    assert not store2.cache.is_verified(e.chunks[0].digest)
    hops = _thread_hops(monkeypatch)

    async def second() -> None:
        assert await store2.read(layer2, e, 0, 1000) == content_of(toc, blob, "a")

    run(second)
    assert hops == [] and src2.requests == []
    assert store2.cache.is_verified(e.chunks[0].digest)


def _thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The functions run in worker threads from now on (trio.to_thread.run_sync counted)."""
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return hops


BIG_READ = 2 * layerstore.INLINE_READ_BYTES


def _verified_in_cache(tmp_path: Path, data: bytes) -> tuple[LayerStore, Layer, MemSource, Entry]:
    """A fresh store over a cache holding ``data`` as one chunk, verified in this process
    (and not in memory: a store's own fetches stay there a while)."""
    toc, blob, e = _cache_filled_and_closed(tmp_path, data, chunk_size=len(data))
    store = LayerStore(ChunkCache(tmp_path / "cache"))
    src = MemSource({BLOB: blob})
    layer = store.add_layer(BLOB, src, toc)
    assert store.cache.read(e.chunks[0].digest, len(data), 0, 0) == b""
    assert store.cache.is_verified(e.chunks[0].digest)
    return store, layer, src, e


def test_a_large_read_of_a_page_cached_verified_chunk_takes_no_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = rand(3 * BIG_READ, 3)
    store, layer, src, e = _verified_in_cache(tmp_path, data)
    hops = _thread_hops(monkeypatch)

    async def main() -> None:
        assert await store.read(layer, e, 100, BIG_READ) == data[100 : 100 + BIG_READ]

    run(main)
    assert hops == [] and src.requests == []


def test_a_read_from_the_cache_is_answered_without_a_checkpoint(tmp_path: Path) -> None:
    """A trip through trio's run queue put a cached READ behind every runnable task (a cold
    start's stream and decodes); one served from memory never took it either."""
    data = rand(3 * BIG_READ, 9)
    store, layer, _src, e = _verified_in_cache(tmp_path, data)

    async def main() -> None:
        for at, n in ((0, 1000), (5, BIG_READ)):  # small, and large from the page cache
            with trio.testing.assert_no_checkpoints():
                got = await store.read(layer, e, at, n)
            assert got == data[at : at + n]

    run(main)


@pytest.mark.parametrize("short", [False, True])
def test_a_large_read_the_disk_must_bring_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    """Not (all) in the page cache: RWF_NOWAIT says so (EAGAIN, or fewer bytes) and the read
    is done again in a worker thread, whole and right."""
    data = rand(3 * BIG_READ, 4)
    store, layer, _src, e = _verified_in_cache(tmp_path, data)
    hops = _thread_hops(monkeypatch)
    real = os.preadv

    def partly_cached(fd: int, buffers: list[bytearray], at: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT and threading.current_thread() is threading.main_thread():
            if not short:
                raise BlockingIOError(11, "not cached")
            return real(fd, [memoryview(buffers[0])[:4096]], at, flags)
        return real(fd, buffers, at, flags)

    monkeypatch.setattr(os, "preadv", partly_cached)

    async def main() -> None:
        assert await store.read(layer, e, 7, BIG_READ) == data[7 : 7 + BIG_READ]

    run(main)
    assert len(hops) == 1


def test_a_filesystem_without_rwf_nowait_reads_large_chunks_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = rand(3 * BIG_READ, 5)
    store, layer, _src, e = _verified_in_cache(tmp_path, data)

    def unsupported(fd: int, buffers: list[bytearray], at: int, flags: int = 0) -> int:
        raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")

    monkeypatch.setattr(os, "preadv", unsupported)
    hops = _thread_hops(monkeypatch)

    async def main() -> None:
        for at in (0, 1000):
            assert await store.read(layer, e, at, BIG_READ) == data[at : at + BIG_READ]

    run(main)
    assert not store.cache.nowait_reads
    assert len(hops) == 1  # the first read found out inline; the second went to a thread


def test_a_prefetch_over_a_warm_cache_verifies_its_chunks_for_their_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh store over a warm cache: the prefetch fetches nothing but hashes the cached
    chunks (in a worker thread), so the reads that follow do not."""
    data = rand(3 * BIG_READ, 6)
    toc, blob, e = _cache_filled_and_closed(tmp_path, data, chunk_size=len(data) // 2)
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    src2 = MemSource({BLOB: blob})
    layer2 = store2.add_layer(BLOB, src2, toc)
    assert not any(store2.cache.is_verified(c.digest) for c in e.chunks)

    async def prefetched() -> None:
        await store2.prefetch(layer2, [e])

    run(prefetched)
    assert all(store2.cache.is_verified(c.digest) for c in e.chunks)
    hops = _thread_hops(monkeypatch)

    async def read() -> None:
        assert await store2.read(layer2, e, 0, len(data)) == data

    run(read)
    assert hops == [] and src2.requests == []


def test_a_prefetch_over_a_warm_cache_keeps_its_small_chunks_for_their_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetch reads a small cached chunk whole to hash it: its bytes stay in memory, so
    the reads that follow open no cache file (each cost a fresh mount's first READ of a file
    ~90 us: open, fstat, pread, close).  Bigger chunks are read from their files, as before."""
    small, big = layerstore.KEEP_VERIFIED_BYTES // 2, layerstore.KEEP_VERIFIED_BYTES * 2
    data = rand(2 * small, 11)
    toc, blob, e = _cache_filled_and_closed(tmp_path, data, chunk_size=small)
    bigdata = rand(2 * big, 12)
    btoc, bblob, be = _cache_filled_and_closed(tmp_path / "b", bigdata, chunk_size=big)
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    layer2 = store2.add_layer(BLOB, MemSource({BLOB: blob}), toc)
    store3 = LayerStore(ChunkCache(tmp_path / "b" / "cache"))
    layer3 = store3.add_layer(BLOB, MemSource({BLOB: bblob}), btoc)
    file_reads: list[str] = []
    for store in (store2, store3):
        real = store.cache.read

        def counted(digest: str, *args: Any, real: Any = real, **kw: Any) -> bytes | None:
            file_reads.append(digest)
            return real(digest, *args, **kw)

        monkeypatch.setattr(store.cache, "read", counted)

    async def main() -> None:
        await store2.prefetch(layer2, [e])
        await store3.prefetch(layer3, [be])
        file_reads.clear()
        for at in range(0, len(data), 1000):
            assert await store2.read(layer2, e, at, 1000) == data[at : at + 1000]
        assert file_reads == []
        assert await store3.read(layer3, be, 0, 1000) == bigdata[:1000]
        assert file_reads == [be.chunks[0].digest]

    run(main)


def test_a_prefetch_over_a_warm_cache_counts_as_sent_before_it_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount waits for its early prefetch's requests to leave (REQUEST_SENT) before it
    builds its tree: over a warm cache none will, and the hashing must not hold it up."""
    data = rand(3000, 8)
    toc, blob, e = _cache_filled_and_closed(tmp_path, data)
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    layer2 = store2.add_layer(BLOB, MemSource({BLOB: blob}), toc)
    sent = threading.Event()
    hashed_after_sent: list[bool] = []
    real = store2._hashed

    def hashed(chunks: list[Chunk]) -> list[bytes | None]:
        hashed_after_sent.append(sent.wait(5))
        return real(chunks)

    monkeypatch.setattr(store2, "_hashed", hashed)

    async def main() -> None:
        REQUEST_SENT.set(sent.set)
        await store2.prefetch(layer2, [e])

    run(main)
    assert hashed_after_sent == [True]
    assert all(store2.cache.is_verified(c.digest) for c in e.chunks)


def test_a_prefetch_over_a_warm_cache_fetches_a_corrupt_chunk_again(tmp_path: Path) -> None:
    data = rand(3000, 7)
    toc, blob, e = _cache_filled_and_closed(tmp_path, data)
    path = ChunkCache(tmp_path / "cache").path_of(e.chunks[1].digest)
    bad = bytearray(path.read_bytes())
    bad[5] ^= 1
    path.write_bytes(bytes(bad))  # same size: only the hash can tell
    store2 = LayerStore(ChunkCache(tmp_path / "cache"))
    src2 = MemSource({BLOB: blob})
    layer2 = store2.add_layer(BLOB, src2, toc)

    async def main() -> None:
        await store2.prefetch(layer2, [e])
        assert await store2.read(layer2, e, 0, len(data)) == data

    run(main)
    assert len(src2.requests) == 1
    assert path.read_bytes() == data[1000:2000]
    assert all(store2.cache.is_verified(c.digest) for c in e.chunks)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/lib/lazyfs/cache")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert default_cache_dir() == Path("/x/cache/lazyfs")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert default_cache_dir() == Path.home() / ".cache" / "lazyfs"


# ------------------------------------------------------------------------------------ integrity


def test_corrupt_source_raises_and_caches_nothing(tmp_path: Path) -> None:
    store, layer, src, toc, _blob = make(tmp_path, {"a": rand(1000, 1)})
    src.corrupt_all = True
    e = toc.by_name()["a"]

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await store.read(layer, e, 0, 10)
        with pytest.raises(IntegrityError):
            await store.prefetch(layer, [e])

    run(main)
    assert len(src.requests) == 4  # each attempt retried once
    assert layer.stats.integrity_errors == 4 and layer.stats.retries == 2
    assert store.cache.du().chunks == 0 and chunk_files(tmp_path / "cache") == []
    assert layer.stats.chunks_ready == 0


def test_bit_flip_once_heals(tmp_path: Path) -> None:
    store, layer, src, toc, blob = make(tmp_path, {"a": rand(1000, 1)})
    src.flips = 1
    e = toc.by_name()["a"]

    async def main() -> None:
        assert await store.read(layer, e, 0, 1000) == content_of(toc, blob, "a")

    run(main)
    assert len(src.requests) == 2
    assert layer.stats.retries == 1 and layer.stats.chunks_ready == 1


# ------------------------------------------------------------------------------------ priorities


def _three_files(tmp_path: Path, concurrency: int) -> tuple[LayerStore, Layer, MemSource, TOC]:
    files: dict[str, bytes | list[bytes | int]] = {n: rand(1000, i) for i, n in enumerate("abcd")}
    store, layer, src, toc, _ = make(
        tmp_path, files, gap=10_000, merge_gap=0, concurrency=concurrency
    )
    return store, layer, src, toc


def test_ondemand_overtakes_queued_prefetch(tmp_path: Path) -> None:
    store, layer, src, toc = _three_files(tmp_path, concurrency=1)
    by = toc.by_name()
    starts = {n: by[n].chunks[0].offset for n in "abcd"}
    order: list[str] = []

    async def main() -> None:
        gate = src.gates[starts["a"]] = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(store.prefetch, layer, [by["a"]])  # holds the only slot
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(store.prefetch, layer, [by["b"]])  # queued
            n.start_soon(store.prefetch, layer, [by["c"]])  # queued
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(store.read, layer, by["d"], 0, 10)  # new on-demand read
            n.start_soon(store.read, layer, by["c"], 0, 10)  # joins queued prefetch: boosted
            await trio.testing.wait_all_tasks_blocked()
            gate.set()

    run(main)
    order = [next(n for n, s in starts.items() if s == r[1]) for r in src.requests]
    assert order[0] == "a"
    assert set(order[1:3]) == {"c", "d"}
    assert order[3] == "b"


def test_reserved_slot_for_ondemand(tmp_path: Path) -> None:
    store, layer, src, toc = _three_files(tmp_path, concurrency=4)  # 3 slots for prefetch
    by = toc.by_name()
    gate = trio.Event()

    async def main() -> None:
        for n in "abc":
            src.gates[by[n].chunks[0].offset] = gate
        async with trio.open_nursery() as nursery:
            for n in "abc":
                nursery.start_soon(store.prefetch, layer, [by[n]], PREFETCH)
            await trio.testing.wait_all_tasks_blocked()
            assert len(src.requests) == 3
            with trio.fail_after(2):
                assert len(await store.read(layer, by["d"], 0, 100)) == 100
            gate.set()

    run(main)


def test_cancelled_fetcher_hands_over_to_waiter(tmp_path: Path) -> None:
    store, layer, src, toc, blob = make(tmp_path, {"a": rand(1000, 1)})
    e = toc.by_name()["a"]
    got: list[bytes] = []

    async def main() -> None:
        gate = src.gates[0] = trio.Event()
        async with trio.open_nursery() as n:
            scope = trio.CancelScope()

            async def first() -> None:
                with scope:
                    await store.read(layer, e, 0, 10)

            async def second() -> None:
                got.append(await store.read(layer, e, 0, 10))

            n.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gate.set()

    run(main)
    assert got == [content_of(toc, blob, "a")[:10]]
    assert len(src.requests) == 2


# ------------------------------------------------------------------------------------ misc


def test_background_fill_and_stats(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"a": rand(20_000, 1), "b": rand(3000, 2)}
    store, layer, _src, toc, _blob = make(tmp_path, files, max_request=4000)
    waits: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            e = toc.by_name()["b"]
            for _ in range(2):
                waits.append((await store.read_waited(layer, e, 0, 10))[1])
            store.background(n)
            with trio.fail_after(5):
                while layer.stats.chunks_ready < layer.stats.chunks_total:
                    await trio.sleep(0.01)
            await store.aclose()

    run(main)
    assert waits[0] > 0 and waits[1] == 0  # the second read is a hit: it waited for nothing
    s = msgspec.to_builtins(layer.stats)
    assert s["chunks_ready"] == s["chunks_total"] == 23
    assert s["bytes_ready"] == s["bytes_total"] == 23_000
    assert s["reads"] == 2 and s["cache_hits"] >= 1 and s["wait_ns"] > 0
    assert msgspec.convert(s, LayerStats) == layer.stats


def test_chunk_map_roundtrip_and_bad_files(tmp_path: Path) -> None:
    digests = [digest_of(bytes([i])) for i in range(11)]
    path = tmp_path / "m.map"
    m = ChunkMap.load(path, BLOB, digests)  # missing file: empty
    assert m.ready == 0 and len(m.bits) == 2
    for i in (0, 3, 10):
        assert m.set(i)
    assert not m.set(3)
    assert m.clear(0) and not m.clear(0)
    assert m.due(max_changes=4, max_age=3600) and not m.due(max_changes=5, max_age=3600)
    path.write_bytes(m.snapshot())
    assert m.changes == 0
    again = ChunkMap.load(path, BLOB, digests)
    assert [i for i in range(11) if again[i]] == [3, 10] and again.ready == 2
    # Another chunk order, another blob, or garbage: start empty (the map is only a hint).
    assert ChunkMap.load(path, BLOB, digests[::-1]).ready == 0
    assert ChunkMap.load(path, BLOB2, digests).ready == 0
    path.write_bytes(b"\x93garbage")
    assert ChunkMap.load(path, BLOB, digests).ready == 0
    # Flags, one byte per chunk, answer as the bits do; setting them counts each change.
    assert again.flags() == bytes(1 if i in (3, 10) else 0 for i in range(11))
    again.set_flags(bytes(1 if i in (0, 3, 9) else 0 for i in range(11)))
    assert [i for i in range(11) if again[i]] == [0, 3, 9]
    assert again.ready == 3 and again.changes == 3  # 0 and 9 set, 10 cleared
    assert ChunkMap(path, BLOB, []).flags() == b""


def test_digest_index_answers_as_a_dict() -> None:
    chunks = [Chunk(0, 1, i, i + 1, digest_of(str(i).encode())) for i in range(500)]
    index = DigestIndex(ChunkList.of(chunks))
    assert len(index) == 500
    assert all(index[c.digest] == i and c.digest in index for i, c in enumerate(chunks))
    missing = digest_of(b"missing")
    assert index.get(missing) is None and missing not in index
    with pytest.raises(KeyError):
        index[missing]
    assert DigestIndex(ChunkList.of([])).get(missing) is None


def test_read_positions_are_bounded(tmp_path: Path) -> None:
    """A soak that reads every file of a big layer keeps only the latest read positions."""
    toc = TOC(compression="zstd", entries=[], data_end=0)
    layer = Layer(BLOB, MemSource({}), toc, ChunkMap(tmp_path / "m.map", BLOB, []))
    assert layer.note_read("a", 10) is None and layer.note_read("a", 20) == 10
    for i in range(READ_POS_MAX):
        layer.note_read(f"f{i}", i)
    assert len(layer.read_pos) == READ_POS_MAX
    assert layer.note_read("a", 0) is None  # the oldest was forgotten: a first read again
    assert layer.note_read(f"f{READ_POS_MAX - 1}", 0) == READ_POS_MAX - 1


def test_store_read_larger_than_cache(tmp_path: Path) -> None:
    store, layer, src, toc, blob = make(
        tmp_path, {"f": rand(10_000, 1)}, max_bytes=2500, readahead=0
    )
    e = toc.by_name()["f"]

    async def main() -> None:
        # All ten chunks are pinned during the read, so it succeeds although they do not fit;
        # eviction catches up when the read lets go of them.
        assert await store.read(layer, e, 0, e.size) == content_of(toc, blob, "f")
        await store.aclose()

    run(main)
    assert store.cache.bytes <= 2500
    assert layer.stats.chunks_ready == store.cache.du().chunks == 2
    assert len(src.requests) == 1


def test_amplify_takes_following_files_in_blob_order(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {f"f{i}": rand(3000, 100 + i) for i in range(40)}
    store, layer, src, toc, _blob = make(tmp_path, files, readahead=0, amplify=20_000)
    by = toc.by_name()

    async def main() -> None:
        await store.read(layer, by["f0"], 0, 10)
        assert len(src.requests) == 1
        _, _start, end = src.requests[0]
        # the request grew past f0 by at most the budget (plus the chunk that crosses it)
        assert 20_000 - 4000 < end - by["f0"].chunks[-1].end <= 20_000
        got_ready = layer.stats.chunks_ready
        for i in range(1, 40):  # neighbours are local now; the next miss amplifies again
            await store.read(layer, by[f"f{i}"], 0, 3000)
        assert got_ready > 3
        assert len(src.requests) <= 40 * 3000 // 20_000 + 1
        # a random (non-sequential) read of a file takes no neighbours
        await store.read(layer, by["f5"], 1000, 10)

    run(main)


def test_amplify_also_takes_the_files_just_before(tmp_path: Path) -> None:
    # A start-up often reads a file's neighbour before it in the layer next (a package's
    # __init__ after the module it imported): those come with the same request.
    files: dict[str, bytes | list[bytes | int]] = {f"f{i}": rand(3000, 100 + i) for i in range(40)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=9000, behind=9000)
    by = toc.by_name()

    async def main() -> None:
        assert await store.read(layer, by["f20"], 0, 3000) == content_of(toc, blob, "f20")
        ((_, start, end),) = src.requests
        assert by["f17"].chunks[0].offset <= start <= by["f18"].chunks[0].offset
        assert by["f22"].chunks[-1].end <= end <= by["f23"].chunks[-1].end
        for name in ("f18", "f19", "f21", "f22"):  # the neighbours are local now
            assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
        assert len(src.requests) == 1

    run(main)


def test_a_waited_small_chunk_is_decoded_at_once_on_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chunk a reader waits for is decoded alone as soon as its bytes are in, with no
    # worker thread; the neighbours its request brought go to worker threads in batches.
    files: dict[str, bytes | list[bytes | int]] = {f"f{i}": rand(3000, 100 + i) for i in range(40)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=9000, behind=9000)
    by = toc.by_name()
    decoded_on: dict[str, bool] = {}
    real = layerstore.decode_chunk

    def recording(comp: Compression, raw: bytes, c: Chunk) -> bytes:
        decoded_on[c.digest] = threading.current_thread() is threading.main_thread()
        return real(comp, raw, c)

    monkeypatch.setattr(layerstore, "decode_chunk", recording)

    async def main() -> None:
        assert await store.read(layer, by["f20"], 0, 3000) == content_of(toc, blob, "f20")
        for name in ("f19", "f21"):  # brought by the same request, decoded meanwhile
            assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
        assert len(src.requests) == 1

    run(main)
    mine = {c.digest for c in by["f20"].chunks}
    assert all(decoded_on[d] for d in mine)
    others = [on_trio for d, on_trio in decoded_on.items() if d not in mine]
    assert others and not any(others)


def test_a_waited_large_chunk_is_decoded_before_the_neighbours_that_came_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Too large to decode on the trio thread, it goes to a worker thread alone, ahead of the
    # neighbours its request brought before it, instead of in one batch with them.
    files: dict[str, bytes | list[bytes | int]] = {f"f{i}": rand(3000, 100 + i) for i in range(9)}
    files["big"] = [rand(100_000, 7)]  # one chunk, > 64 KiB compressed (random bytes)
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=1000, behind=9000)
    by = toc.by_name()
    batches: list[list[str]] = []
    real = LayerStore._decode_batch

    def recording(self: LayerStore, *args: Any) -> Coroutine[Any, Any, None]:
        batches.append([c.digest for c, _ in args[2]])  # in the order the tasks are started
        return real(self, *args)

    monkeypatch.setattr(LayerStore, "_decode_batch", recording)

    async def main() -> None:
        assert await store.read(layer, by["big"], 0, 10) == content_of(toc, blob, "big")[:10]
        for name in ("f7", "f8"):  # brought before it by the same request
            assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
        assert len(src.requests) == 1

    run(main)
    assert batches[0] == [by["big"].chunks[0].digest]
    assert by["f8"].chunks[0].digest in [d for b in batches[1:] for d in b]


def test_amplify_takes_more_while_what_it_brought_is_read(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {f"f{i}": rand(3000, 100 + i) for i in range(150)}
    store, layer, src, toc, blob = make(
        tmp_path, files, readahead=0, amplify=5000, amplify_max=40_000, behind=0
    )
    by = toc.by_name()

    async def main() -> None:
        for i in range(60):  # a walk in blob order: the second miss's request takes the cap
            name = f"f{i}"
            assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
        sizes = [end - start for _, start, end in src.requests]
        assert sizes[0] < 10_000 and sizes[1] > 35_000, sizes
        assert len(src.requests) <= 6, sizes  # 30 with the base budget alone
        # Reads elsewhere: once a request's neighbours went unread, the budget halves.
        for name in ("f100", "f120", "f140"):
            assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
        sizes = [end - start for _, start, end in src.requests[-3:]]
        assert sizes[0] > 35_000 and 15_000 < sizes[1] < 25_000 and sizes[2] < 15_000, sizes

    run(main)


def test_a_failed_chunk_is_fetched_afresh_by_the_next_reader(tmp_path: Path) -> None:
    # With fetches in the mount's nursery, a failed flight may still be registered while the
    # rest of its request is stored; a later reader must not inherit that failure.
    files: dict[str, bytes | list[bytes | int]] = {"a": rand(1000, 1), "b": rand(30_000, 2)}
    store, layer, src, toc, blob = make(tmp_path, files)
    e = toc.by_name()["a"]
    src.corrupt_at = {e.chunks[0].offset + 5}

    async def main() -> None:
        async with store.running():
            with pytest.raises(IntegrityError):
                await store.read(layer, e, 0, 1000)  # the request also brings b's chunks
            src.corrupt_at = set()
            assert await store.read(layer, e, 0, 1000) == content_of(toc, blob, "a")

    run(main)


def test_reads_within_one_chunk_do_not_push_the_read_ahead_further(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"big": rand(20_000, 8)}
    store, layer, src, toc, blob = make(
        tmp_path, files, chunk_size=1000, readahead=0, amplify=0, merge_gap=-1, pipeline=3000
    )
    e = toc.by_name()["big"]
    gate = trio.Event()
    for c in e.chunks[1:]:
        src.gates[c.offset] = gate  # read-ahead stays in flight while the reader reads on

    async def main() -> None:
        async with store.running():
            for off in range(0, 1000, 100):  # ten sequential reads of chunk 0
                assert await store.read(layer, e, off, 100) == content_of(toc, blob, "big")[
                    off : off + 100
                ]
                await trio.testing.wait_all_tasks_blocked()
            ahead = {s for _, s, _ in src.requests} - {e.chunks[0].offset}
            assert ahead == {c.offset for c in e.chunks[1:3]}  # 3000 bytes ahead, no more
            gate.set()

    run(main)


def test_sequential_reader_has_the_next_chunks_fetched_ahead(tmp_path: Path) -> None:
    files: dict[str, bytes | list[bytes | int]] = {"big": rand(20_000, 7)}
    store, layer, src, toc, blob = make(
        tmp_path, files, chunk_size=1000, readahead=0, amplify=0, merge_gap=-1, pipeline=3000
    )
    e = toc.by_name()["big"]

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, e, 0, 1000) == content_of(toc, blob, "big")[:1000]
            await trio.testing.wait_all_tasks_blocked()
            # chunk 0 on demand, chunks 1-3 ahead of the reader (a 3000-byte window)
            assert len(src.requests) >= 3
            n = len(src.requests)
            assert await store.read(layer, e, 1000, 1000) == content_of(toc, blob, "big")[1000:2000]
            assert len(src.requests) >= n  # chunk 1 was already there or on its way
        # a random read elsewhere does not pipeline
        before = len(src.requests)
        await store.read(layer, e, 15_500, 10)
        assert len(src.requests) == before + 1

    run(main)


def test_a_reader_that_hurries_a_stream_being_cut_off_starts_nothing_in_its_closed_nursery(
    tmp_path: Path,
) -> None:
    # A stream keeps a complete chunk nobody waits for until a batch's worth is in; a reader
    # who starts to wait for it hurries the stream (``_obtain``: ``f.group.hurry()``).  When
    # the stream is cut off (a prefetch cancelled at unmount), its nursery closes, with one
    # scheduler turn before its task forgets ``hurry``: a reader woken in that turn started a
    # task in the closed nursery, RuntimeError out of its READ.  Trio orders a turn's tasks at
    # random, so the cut is made many times (before the fix: about half of them raised).
    store, layer, _src, _toc, blob = make(tmp_path, {"f0": rand(3000, 31)}, readahead=0)
    chunks = list(layer.by_offset)

    async def one() -> None:
        g = store._register(layerstore._Group(chunks[0].offset, chunks[-1].end, chunks), PREFETCH)
        cut = trio.Event()

        async def stream(layer: Layer, g: Any, sink: Any) -> None:
            c = chunks[0]
            await sink(c.offset, blob[c.offset : c.end])  # kept for a batch: nobody waits
            try:
                await trio.sleep_forever()
            finally:
                cut.set()

        async def reader() -> None:
            await cut.wait()
            hurry = g.flights[chunks[0].digest].group.hurry
            if hurry is not None:
                hurry()

        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def fetch() -> None:
                with scope:
                    await store._run_group(layer, g, None, stream)

            nursery.start_soon(fetch)
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert layer.stats.chunks_ready == 0  # the chunk waits for its batch
            scope.cancel()
        assert not store._inflight  # the cut-off flights are forgotten

    async def main() -> None:
        for _ in range(40):
            await one()

    run(main)


def test_a_chunk_another_process_cached_after_the_start_is_read_not_fetched(
    tmp_path: Path,
) -> None:
    """Daemons share one cache (the snapshotter's chains): a chunk another one writes after
    this store's start is not in this store's index, nor in its map, yet it is on disk.  A
    reader that needs it finds it there (checked on that first read) instead of fetching it
    again; the neighbours the read would have amplified to stay unfetched too."""
    files: dict[str, bytes | list[bytes | int]] = {"a": rand(3000, 1), "b": rand(2000, 2)}
    mine, layer, src, toc, blob = make(tmp_path, files, readahead=0)
    theirs_src = MemSource({BLOB: blob})
    theirs = LayerStore(ChunkCache(tmp_path / "cache", 1 << 30))  # another process's view
    their_layer = theirs.add_layer(BLOB, theirs_src, toc)
    a = toc.by_name()["a"]

    async def main() -> None:
        assert await theirs.read(their_layer, a, 0, a.size) == files["a"]
        await theirs.aclose()
        assert theirs_src.requests  # fetched there, written to the shared directory
        assert await mine.read(layer, a, 0, a.size) == files["a"]
        assert src.requests == []
        await mine.aclose()

    run(main)
