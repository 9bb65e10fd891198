"""A reader's fetched chunks are written to the cache when on-demand reads pause
(lazyfs.store.layerstore: ``_hold`` and the writer task): readers are served from memory
meanwhile, ``prefetch`` still returns with its chunks in the cache, the bytes held are
bounded, and a daemon stopped while chunks wait writes them all, one killed leaves no chunk
file that is wrong or cut short."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from lazyfs import atomic
from lazyfs.atomic import TMP_PREFIX
from lazyfs.store import ChunkCache, layerstore
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mounted
from tests.test_store import chunk_files, content_of, make, rand, run

Files = dict[str, bytes | list[bytes | int]]


def test_a_readers_chunks_are_cached_once_reads_pause_or_the_store_stops(tmp_path: Path) -> None:
    files: Files = {f"f{i}": rand(3000, 100 + i) for i in range(9)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=6000, hot_bytes=0)
    by = toc.by_name()
    cache_dir = tmp_path / "cache"

    def brought() -> int:  # chunks inside the ranges asked for so far
        return sum(
            any(s <= c.offset and c.end <= e for _, s, e in src.requests) for c in layer.by_offset
        )

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, by["f0"], 0, 3000) == content_of(toc, blob, "f0")
            await trio.testing.wait_all_tasks_blocked()
            assert chunk_files(cache_dir) == []  # held while reads go on
            assert layer.stats.bytes_unwritten >= 3000  # f0, at least (neighbours may decode)
            misses = []
            for _ in range(2):  # f1 came with f0's request
                assert await store.read(layer, by["f1"], 0, 3000) == content_of(toc, blob, "f1")
                misses.append(layer.stats.cache_misses)
            # From memory: no request, and a hit, not a network wait.
            assert len(src.requests) == 1 and misses[0] == misses[1]
            await trio.sleep(layerstore.WRITE_IDLE_SECONDS * 2)
            assert len(chunk_files(cache_dir)) == brought() >= 6
            assert layer.stats.bytes_unwritten == 0
            assert await store.read(layer, by["f6"], 0, 3000) == content_of(toc, blob, "f6")
            assert len(src.requests) == 2
        assert len(chunk_files(cache_dir)) == brought() >= 9  # written on the way out
        assert layer.stats.bytes_unwritten == 0

    run(main)


def test_prefetch_returns_with_held_chunks_in_the_cache(tmp_path: Path) -> None:
    # Copy-up prefetches a file's chunks, then reads them from the cache: chunks a reader
    # fetched that wait for their write are written by the prefetch, at once, not fetched.
    files: Files = {f"f{i}": rand(3000, 200 + i) for i in range(6)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=20_000)
    by = toc.by_name()

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, by["f0"], 0, 3000) == content_of(toc, blob, "f0")
            await trio.testing.wait_all_tasks_blocked()
            assert layer.stats.bytes_unwritten > 0 and chunk_files(tmp_path / "cache") == []
            await store.prefetch(layer, [by["f3"]], priority=layerstore.ONDEMAND)
            assert len(src.requests) == 1
            for c in by["f3"].chunks:
                assert store.cache.read(c.digest, c.size) == content_of(toc, blob, "f3")[
                    c.file_offset : c.file_offset + c.size
                ]
            assert layer.stats.bytes_unwritten == 3000 * 5  # the rest still waits

    run(main)


def test_prefetch_joining_a_readers_stream_returns_with_the_chunks_in_the_cache(
    tmp_path: Path,
) -> None:
    # The prefetch joins flights a reader's request is still bringing: they are held when
    # they resolve, and the prefetch writes them before it returns.
    files: Files = {f"f{i}": rand(3000, 300 + i) for i in range(6)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=20_000)
    by = toc.by_name()
    src.gate_all = trio.Event()

    async def main() -> None:
        async with store.running(), trio.open_nursery() as nursery:

            async def read() -> None:
                assert await store.read(layer, by["f0"], 0, 3000) == content_of(toc, blob, "f0")

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            prefetched = trio.Event()

            async def prefetch() -> None:
                await store.prefetch(layer, [by["f4"]])
                prefetched.set()

            nursery.start_soon(prefetch)
            await trio.testing.wait_all_tasks_blocked()
            src.gate_all.set()
            await prefetched.wait()
            assert len(src.requests) == 1
            for c in by["f4"].chunks:
                assert c.digest in store.cache

    run(main)


def test_held_bytes_stay_under_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reads that never pause: beyond the bound a reader's chunks are written at once.
    monkeypatch.setattr(layerstore, "WRITE_HOLD_BYTES", 10_000)
    files: Files = {f"f{i}": rand(3000, 400 + i) for i in range(30)}
    store, layer, _, toc, blob = make(tmp_path, files, readahead=0, amplify=0)
    by = toc.by_name()
    most = 0

    async def main() -> None:
        nonlocal most
        async with store.running():
            for i in range(30):
                name = f"f{i}"
                assert await store.read(layer, by[name], 0, 3000) == content_of(toc, blob, name)
                await trio.testing.wait_all_tasks_blocked()
                most = max(most, layer.stats.bytes_unwritten)
            # One request's chunks (3000 B) may go over the bound, no more.
            assert 10_000 <= most < 10_000 + 3000
        assert len(chunk_files(tmp_path / "cache")) == 90

    run(main)


def test_a_readers_large_chunk_waits_for_a_pause_too(tmp_path: Path) -> None:
    # An exec's first chunk (4 MiB): its file costs more CPU than a small one's (32 ms against
    # 0.4 on ext4), spent while the program starts, where a pause costs none.
    files: Files = {"program": [rand(1 << 20, 520)], "other": rand(1000, 521)}
    store, layer, _, toc, blob = make(tmp_path, files, chunk_size=1 << 20, readahead=0, amplify=0)
    e = toc.by_name()["program"]

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, e, 0, 4096) == content_of(toc, blob, "program")[:4096]
            await trio.testing.wait_all_tasks_blocked()
            assert chunk_files(tmp_path / "cache") == []
            assert layer.stats.bytes_unwritten == 1 << 20
            with trio.fail_after(10):
                while layer.stats.bytes_unwritten:
                    await trio.sleep(0.05)
            assert len(chunk_files(tmp_path / "cache")) == 1

    run(main)


def test_a_start_ups_prefetch_and_first_chunks_all_wait_for_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Debian start-up without groups holds ~30 MiB (landmarks, the program's first chunk,
    # its modules, the extension modules' libraries): none of it is written while it runs.
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 60.0)  # reads never pause
    mib = 1 << 20
    # Random bytes do not compress: 3 MiB chunks stay under a big chunk's 4 MiB.
    files: Files = {f"lib{i}": [rand(3 * mib, 530 + i)] for i in range(7)}
    files["program"] = [rand(3 * mib, 540)]
    store, layer, _, toc, blob = make(tmp_path, files, chunk_size=3 * mib, readahead=0, amplify=0)
    by = toc.by_name()

    async def main() -> None:
        async with store.running():
            await store.prefetch(layer, [by[f"lib{i}"] for i in range(7)], hold=True)
            want = content_of(toc, blob, "program")[:4096]
            assert await store.read(layer, by["program"], 0, 4096) == want
            await trio.testing.wait_all_tasks_blocked()
            assert chunk_files(tmp_path / "cache") == []
            assert layer.stats.bytes_unwritten == 24 * mib
        assert len(chunk_files(tmp_path / "cache")) == 8  # written on the way out

    run(main)


def test_a_large_chunk_is_written_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader's chunk over WRITE_HOLD_CHUNK is written at once (by default every chunk held
    # in memory may wait).
    monkeypatch.setattr(layerstore, "WRITE_HOLD_CHUNK", 2000)
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 60.0)  # no pause in this test
    files: Files = {"small": rand(1000, 500), "big": [rand(5000, 501)], "after": rand(1000, 502)}
    store, layer, _, toc, blob = make(tmp_path, files, readahead=0, amplify=9000)
    by = toc.by_name()

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, by["big"], 0, 5000) == content_of(toc, blob, "big")
            with trio.fail_after(10):  # "small" and "after" held, "big" written
                while not (
                    by["big"].chunks[0].digest in store.cache
                    and layer.stats.bytes_unwritten == 2000
                ):
                    await trio.sleep(0.01)
            assert len(chunk_files(tmp_path / "cache")) == 1
        assert len(chunk_files(tmp_path / "cache")) == 3

    run(main)


def test_a_held_prefetchs_chunks_wait_for_a_pause_in_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start-up's prefetch (hold=True) returns once its chunks are verified; their files
    # are made when reads pause, as a reader's are, and readers get them from memory.  Its
    # larger chunks wait too (a reader's over WRITE_HOLD_CHUNK are written at once).
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 0.5)
    monkeypatch.setattr(layerstore, "WRITE_HOLD_CHUNK", 500)
    monkeypatch.setattr(layerstore, "WRITE_BATCH_BYTES", 2000)
    files: Files = {f"f{i}": rand(3000, 600 + i) for i in range(6)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=0, hot_bytes=0)
    batches: list[int] = []
    put_many = store._put_many

    def counted(stored: list[tuple[str, bytes]]) -> list[str]:
        batches.append(len(stored))
        return put_many(stored)

    monkeypatch.setattr(store, "_put_many", counted)
    by = toc.by_name()
    cache_dir = tmp_path / "cache"
    later = [by[f"f{i}"] for i in range(1, 6)]

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, by["f0"], 0, 3000) == content_of(toc, blob, "f0")
            await store.prefetch(layer, later, hold=True)  # reads were busy just now
            with trio.fail_after(5):
                while len(chunk_files(cache_dir)) < 3:  # f0's, written in a thread
                    await trio.sleep(0.01)
            assert len(src.requests) == 2 and len(chunk_files(cache_dir)) == 3
            assert layer.stats.bytes_unwritten == 3000 * 5
            hits = layer.stats.cache_hits
            for e in later:
                assert await store.read(layer, e, 0, 3000) == content_of(toc, blob, e.name)
            assert len(src.requests) == 2 and layer.stats.cache_hits == hits + 3 * 5
            with trio.fail_after(10):
                while layer.stats.bytes_unwritten:
                    await trio.sleep(0.05)
            assert cache_is_sound(cache_dir) == 18 == len(chunk_files(cache_dir))
            assert store.cache.bytes == 3000 * 6
            assert batches[1:] == [2] * 7 + [1]  # f0's, then ~2000 B a turn

    run(main)


def test_a_held_prefetchs_chunks_are_written_at_the_stores_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 60.0)  # reads never pause
    files: Files = {f"f{i}": rand(3000, 700 + i) for i in range(4)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=0)
    by = toc.by_name()

    async def main() -> None:
        async with store.running():
            assert await store.read(layer, by["f0"], 0, 3000) == content_of(toc, blob, "f0")
            await store.prefetch(layer, [by["f2"], by["f3"]], hold=True)
            await trio.testing.wait_all_tasks_blocked()
            assert chunk_files(tmp_path / "cache") == []
            # Copy-up's prefetch (hold off) still returns with its chunks in the cache.
            await store.prefetch(layer, [by["f2"]], priority=layerstore.ONDEMAND)
            assert len(chunk_files(tmp_path / "cache")) == 3 and len(src.requests) == 2
        assert cache_is_sound(tmp_path / "cache") == 3 * 3
        assert layer.stats.bytes_unwritten == 0 and store.cache.bytes == 3000 * 3

    run(main)


def test_a_prefetch_held_before_the_store_runs_waits_for_a_pause_after_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mount's early prefetch decodes before the mount serves: its chunks wait until reads
    # pause once it does (its first readers come at once), or for the store's close.
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 0.3)
    files: Files = {f"f{i}": rand(3000, 650 + i) for i in range(4)}
    store, layer, src, toc, blob = make(tmp_path, files, readahead=0, amplify=0)
    by = toc.by_name()
    cache_dir = tmp_path / "cache"

    async def main() -> None:
        await store.prefetch(layer, [by["f0"], by["f1"]], hold=True)
        assert chunk_files(cache_dir) == [] and layer.stats.bytes_unwritten == 6000
        async with store.running():
            await trio.sleep(0.1)
            assert chunk_files(cache_dir) == []
            assert await store.read(layer, by["f1"], 0, 3000) == content_of(toc, blob, "f1")
            with trio.fail_after(10):
                while layer.stats.bytes_unwritten:
                    await trio.sleep(0.05)
            assert cache_is_sound(cache_dir) == 6 and len(src.requests) == 1
        await store.prefetch(layer, [by["f2"]], hold=True)  # the store no longer runs
        assert layer.stats.bytes_unwritten == 3000
        await store.aclose()
        assert cache_is_sound(cache_dir) == 9 and layer.stats.bytes_unwritten == 0

    run(main)


def test_a_chunk_files_creation_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ChunkCache(tmp_path / "c")
    datas = [rand(1000 + i, 800 + i) for i in range(50)]
    for d in datas:
        cache.put("sha256:" + hashlib.sha256(d).hexdigest(), d)
    assert cache_is_sound(tmp_path / "c") == 50 == len(chunk_files(tmp_path / "c"))
    # A crash's leftover under the name the next write would take is passed over.
    monkeypatch.setattr(atomic, "_serial", itertools.count(7))
    data = rand(3000, 900)
    hx = hashlib.sha256(data).hexdigest()
    (tmp_path / "c" / "chunks" / hx[:2]).mkdir(exist_ok=True)
    stale = tmp_path / "c" / "chunks" / hx[:2] / f"{TMP_PREFIX}{os.getpid()}-7"
    stale.write_bytes(b"left by a crash")
    cache.put("sha256:" + hx, data)
    assert cache.read("sha256:" + hx, 3000) == data
    assert stale.read_bytes() == b"left by a crash"  # the next start removes it
    assert ChunkCache(tmp_path / "c").temp_files_removed == 1


def test_a_chunk_write_cut_short_is_never_seen_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ChunkCache(tmp_path / "c")
    data = rand(20_000, 901)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    writes: list[int] = []

    def short_then_full(fd: int, b: bytes | memoryview) -> int:
        writes.append(len(b))
        if len(writes) == 1:
            return real_write(fd, bytes(b)[:5000])  # a short write: the rest follows
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(atomic.os, "write", short_then_full)
    with pytest.raises(OSError):
        cache.put(digest, data)
    monkeypatch.undo()
    assert writes == [20_000, 15_000]
    assert digest not in cache and chunk_files(tmp_path / "c") == []  # nor a temporary file
    cache.put(digest, data)
    assert cache.read(digest, 20_000) == data


# ------------------------------------------------------------------- a daemon, stopped or killed

N_FILES = 40
SIZE = 20_000


def file_data(i: int) -> bytes:
    return seeded_bytes(SIZE, 1000 + i)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("writes-image")
    items = [Item(f"f{i:02}", data=file_data(i)) for i in range(N_FILES)]
    make_lazy_layout(d / "lazy", [make_tar(items)], chunk_size=4096)
    return f"oci:{d / 'lazy'}:v1"


def cache_is_sound(cache: Path) -> int:
    """Every chunk file under its final name holds the bytes its name says; the number of
    them.  (A crash may leave ``TMP_PREFIX`` files, which the next start removes.)"""
    n = 0
    for p in chunk_files(cache):
        if p.name.startswith(TMP_PREFIX):
            continue
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p
        n += 1
    return n


def read_all(mnt: Path) -> None:
    for i in range(N_FILES):
        assert (mnt / f"f{i:02}").read_bytes() == file_data(i)


def test_a_daemon_stopped_while_chunks_wait_writes_them_all(image: str, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "c"
    opts = ("--read-only", "--no-prefetch", "--cache", str(cache))
    with mounted(image, mnt, *opts) as m:
        read_all(mnt)
        # Reads going on (page cache dropped, so they reach the daemon) keep the writes
        # waiting; the stop comes while they wait.
        fd = os.open(mnt / "f00", os.O_RDONLY)
        try:
            deadline = time.monotonic() + 2.0
            while True:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, 100, 0) == file_data(0)[:100]
                held = sum(la["stats"]["bytes_unwritten"] for la in m.stats()["layers"])
                if held or time.monotonic() > deadline:
                    break
            assert held > 0
        finally:
            os.close(fd)
    written = cache_is_sound(cache)
    assert written > 0
    with mounted(image, mnt, *opts) as m:
        read_all(mnt)
        stats = m.stats()["layers"]
        assert sum(la["stats"]["requests"] for la in stats) == 0  # all from the cache
    assert cache_is_sound(cache) == written


def test_a_daemon_killed_while_chunks_wait_leaves_no_wrong_chunk(
    image: str, tmp_path: Path
) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "c"
    opts = ("--read-only", "--no-prefetch", "--cache", str(cache))
    for delay in (0.0, layerstore.WRITE_IDLE_SECONDS):  # before the writes, about as they go
        with mounted(image, mnt, *opts) as m:
            read_all(mnt)
            time.sleep(delay)
            m.kill()
        cache_is_sound(cache)
    ChunkCache(cache)  # a start removes crash leftovers
    assert not [p for p in chunk_files(cache) if p.name.startswith(TMP_PREFIX)]
    with mounted(image, mnt, *opts):
        read_all(mnt)
    cache_is_sound(cache)


def test_a_readers_read_ahead_is_written_at_once_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long sequential read's read-ahead brings large chunks ahead of it for as long as it
    # lasts: held, they would keep WRITE_HOLD_BYTES in memory throughout (the 512 MiB file's
    # RSS row).  Only a start-up's prefetch (hold=True) waits for a pause in reads, and the
    # read-ahead of a file's first read (an exec's: the rest of the program), ``pipeline``
    # bytes at most.
    monkeypatch.setattr(layerstore, "WRITE_IDLE_SECONDS", 60.0)  # reads never pause
    monkeypatch.setattr(layerstore, "WRITE_HOLD_CHUNK", 0)  # the reader's own: at once too
    files: Files = {"big": rand(20_000, 950)}
    store, layer, src, toc, blob = make(
        tmp_path, files, chunk_size=1000, readahead=0, amplify=0, merge_gap=-1, pipeline=3000
    )
    e = toc.by_name()["big"]

    def brought() -> int:  # chunks inside the ranges asked for so far
        return sum(
            any(lo <= c.offset and c.end <= hi for _, lo, hi in src.requests)
            for c in layer.by_offset
        )

    async def main() -> None:
        async with store.running():
            want = content_of(toc, blob, "big")

            async def settled(requests: int) -> None:
                with trio.fail_after(10):  # every chunk brought: written or held
                    while len(src.requests) < requests or (
                        layer.stats.chunks_ready + len(store._held) < brought()
                    ):
                        await trio.sleep(0.01)

            assert await store.read(layer, e, 0, 1000) == want[:1000]
            await settled(2)
            first = set(store._held)  # the first read's read-ahead
            assert first and 0 < layer.stats.bytes_unwritten <= 3000
            assert len(chunk_files(tmp_path / "cache")) == 1  # the reader's own
            for off in range(1000, 12_000, 1000):
                assert await store.read(layer, e, off, 1000) == want[off : off + 1000]
            await settled(3)
            assert set(store._held) == first  # the later read-aheads: written at once
            assert len(chunk_files(tmp_path / "cache")) == brought() - len(first) >= 10

    run(main)
