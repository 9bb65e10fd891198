"""Big chunks (issue 9): decoded and verified straight into the cache in bounded windows, and
served from there.  Unit tests here run the store over an in-memory source with the "big"
threshold shrunk; the end-to-end tests mount real images with a 64 MiB chunk."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard

from lazyfs.errors import IntegrityError, LazyfsError
from lazyfs.formats.chunkio import decode_chunk_into
from lazyfs.formats.toc import Chunk
from lazyfs.store import ChunkCache, bigchunk
from tests.test_store import chunk_files, make, rand

SMALL_BIG = 64 * 1024  # the threshold in unit tests: chunks over it are "big"
WINDOW = 16 * 1024


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bigchunk, "BIG_CHUNK_BYTES", SMALL_BIG)
    monkeypatch.setattr(bigchunk, "WINDOW_BYTES", WINDOW)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- decoding in pieces ------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_decode_into_skips_inner_and_stops_at_the_declared_size(compression: str) -> None:
    head, body = rand(5000, 1), rand(300_000, 2)
    if compression == "zstd":
        c = zstandard.ZstdCompressor()
        raw = c.compress(head) + c.compress(body) + c.compress(b"trailing content")
    else:
        raw = gzip.compress(head) + gzip.compress(body) + gzip.compress(b"trailing content")
    chunk = Chunk(0, len(body), 0, len(raw), _digest(body), inner=len(head))
    out = io.BytesIO()
    decode_chunk_into(compression, io.BytesIO(raw), chunk, out)  # type: ignore[arg-type]
    assert out.getvalue() == body


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_decode_into_a_bomb_writes_no_more_than_declared(compression: str) -> None:
    zeros = bytes(64 << 20)
    raw = (
        zstandard.ZstdCompressor().compress(zeros)
        if compression == "zstd"
        else gzip.compress(zeros)
    )
    chunk = Chunk(0, 100_000, 0, len(raw), _digest(rand(100_000, 3)))

    class Counting(io.RawIOBase):
        written = 0

        def write(self, b: object) -> int:
            n = len(b)  # type: ignore[arg-type]
            self.written += n
            return n

    out = Counting()
    with pytest.raises(IntegrityError, match="failed verification"):
        decode_chunk_into(compression, io.BytesIO(raw), chunk, out)  # type: ignore[arg-type]
    assert out.written == 100_000


# -- the store ---------------------------------------------------------------------------------


def test_big_chunk_is_decoded_to_disk_and_served_in_ranges(tmp_path: Path) -> None:
    data = rand(1_000_000, 4)
    store, layer, src, toc, _ = make(
        tmp_path, {"big": data, "small": rand(3000, 5)}, chunk_size=1_000_000
    )
    e = toc.by_name()["big"]
    assert bigchunk.is_big(e.chunks[0])

    async def main() -> None:
        assert await store.read(layer, e, 123_456, 4096) == data[123_456 : 123_456 + 4096]
        assert await store.read(layer, e, 0, len(data)) == data
        await store.aclose()

    trio.run(main)
    c = e.chunks[0]
    span = [(s, t) for d, s, t in src.requests if c.offset <= s < c.end]
    assert len(span) == -(-(c.end - c.offset) // WINDOW)  # one pass, in windows
    assert all(t - s <= WINDOW for s, t in span)
    assert store.cache.path_of(c.digest).read_bytes() == data
    assert not [p for p in chunk_files(tmp_path / "cache") if p.name.startswith(".tmp-")]
    assert layer.stats.chunks_ready == layer.stats.chunks_total - 1  # "small" was not read


def test_concurrent_readers_share_one_decode(tmp_path: Path) -> None:
    data = rand(500_000, 6)
    store, layer, src, toc, _ = make(tmp_path, {"big": data}, chunk_size=500_000)
    e = toc.by_name()["big"]

    async def main() -> None:
        src.gate_all = trio.Event()
        got: dict[int, bytes] = {}

        async def reader(off: int) -> None:
            got[off] = await store.read(layer, e, off, 10_000)

        async with trio.open_nursery() as n:
            for off in range(0, 500_000, 50_000):
                n.start_soon(reader, off)
            await trio.testing.wait_all_tasks_blocked()
            src.gate_all.set()
        assert got == {off: data[off : off + 10_000] for off in got}
        assert len(got) == 10
        await store.aclose()

    trio.run(main)
    c = e.chunks[0]
    assert len(src.requests) == -(-(c.end - c.offset) // WINDOW)


def test_corrupt_big_chunk_is_retried_once_then_an_error_and_nothing_cached(tmp_path: Path) -> None:
    data = rand(300_000, 7)
    store, layer, src, toc, _ = make(tmp_path, {"big": data}, chunk_size=300_000)
    e = toc.by_name()["big"]
    src.corrupt_all = True

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await store.read(layer, e, 0, 4096)
        src.corrupt_all = False  # the registry heals: the next read succeeds
        assert await store.read(layer, e, 200_000, 4096) == data[200_000:204_096]
        await store.aclose()

    trio.run(main)
    assert layer.stats.integrity_errors == 2 and layer.stats.retries == 1


def test_corrupt_big_chunk_leaves_no_file(tmp_path: Path) -> None:
    store, layer, src, toc, _ = make(tmp_path, {"big": rand(300_000, 8)}, chunk_size=300_000)
    e = toc.by_name()["big"]
    src.corrupt_all = True

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await store.read(layer, e, 0, 4096)
        await store.aclose()

    trio.run(main)
    assert [p for p in chunk_files(tmp_path / "cache") if "layers" not in p.parts] == []
    assert store.cache.bytes == 0


def test_big_chunk_larger_than_the_cache_is_an_error(tmp_path: Path) -> None:
    store, layer, _src, toc, _ = make(
        tmp_path, {"big": rand(300_000, 9)}, chunk_size=300_000, max_bytes=200_000
    )
    e = toc.by_name()["big"]

    async def main() -> None:
        with pytest.raises(LazyfsError, match="larger than the cache"):
            await store.read(layer, e, 0, 4096)
        await store.aclose()

    trio.run(main)
    assert store.cache.bytes == 0


def test_cached_big_chunk_is_verified_in_pieces_after_a_restart(tmp_path: Path) -> None:
    data = rand(6_000_000, 10)
    store, layer, _src, toc, _ = make(tmp_path, {"big": data}, chunk_size=6_000_000)
    e = toc.by_name()["big"]
    trio.run(store.read, layer, e, 0, 10)
    path = store.cache.path_of(e.chunks[0].digest)
    again = ChunkCache(tmp_path / "cache")
    assert (
        again.read(e.chunks[0].digest, len(data), 5_000_000, 5_000_100) == data[5_000_000:5_000_100]
    )
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"X")
    third = ChunkCache(tmp_path / "cache")
    assert third.read(e.chunks[0].digest, len(data), 0, 10) is None
    assert not path.exists()


def test_a_reader_cancelled_mid_decode_leaves_no_temp_file_and_the_next_read_works(
    tmp_path: Path,
) -> None:
    data = rand(400_000, 11)
    store, layer, src, toc, _ = make(tmp_path, {"big": data}, chunk_size=400_000)
    e = toc.by_name()["big"]
    c = e.chunks[0]

    async def main() -> None:
        src.gates[c.offset + 3 * WINDOW] = trio.Event()  # the fourth window never comes
        with trio.move_on_after(1) as scope:
            await store.read(layer, e, 0, 4096)
        assert scope.cancelled_caught
        assert [p for p in chunk_files(tmp_path / "cache") if p.name.startswith(".tmp-")] == []
        src.gates.clear()
        assert await store.read(layer, e, 300_000, 4096) == data[300_000:304_096]
        assert layer.stats.cache_misses == 2 and layer.stats.cache_hits == 0
        await store.aclose()

    trio.run(main)


def test_a_cold_sequential_read_of_many_big_chunks_keeps_their_decodes_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold `cat` of a 512 MiB file (128 big chunks) used to hang: every small read pushed
    # the read-ahead one chunk further, each big chunk held one of trio's 40 worker threads
    # while it waited for its windows, and the windows' reads (a local source reads in a
    # worker thread) then waited for a thread forever.
    data = rand(60 * 70_000, 12)
    store, layer, src, toc, _ = make(tmp_path, {"big": data}, chunk_size=70_000, concurrency=8)
    e = toc.by_name()["big"]
    assert len(e.chunks) == 60 and all(bigchunk.is_big(c) for c in e.chunks)
    mem_read = src.read_range

    async def read_in_a_thread(digest: str, start: int, end: int) -> bytes:
        data = await mem_read(digest, start, end)
        return await trio.to_thread.run_sync(bytes, data)  # as a local source does

    monkeypatch.setattr(src, "read_range", read_in_a_thread)
    live = peak = 0
    decode = bigchunk.decode_to_cache

    async def counted(*args: object) -> list[str]:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            return await decode(*args)  # type: ignore[arg-type]
        finally:
            live -= 1

    monkeypatch.setattr("lazyfs.store.layerstore.decode_to_cache", counted)

    async def main() -> None:
        with trio.fail_after(20):
            async with store.running():
                got = bytearray()
                while len(got) < len(data):
                    got += await store.read(layer, e, len(got), 4096)
        assert got == data

    trio.run(main)
    assert 1 <= peak <= 8  # at most one per request slot
