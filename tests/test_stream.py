"""Streamed range reads on the real registry, through the fault proxy: a cold start with a
prefetch group in a few large requests, a reader overtaking a stream, a cut stream resuming, a
stall timing out, and planned ranges that never fetch again what is already here."""

# ruff: noqa: F811
from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import msgspec
import pytest
import trio

from lazyfs.errors import RemoteError
from lazyfs.formats.toc import Chunk, Entry
from lazyfs.opener import open_image
from lazyfs.remote.registry import RegistrySource, RetryPolicy
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.testing.dockerregistry import RegistryInstance, push_one_layer
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted, startup_groups, wait_prefetched
from lazyfs.testing.server import ThreadedHTTPServer
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

# 40 incompressible files of 100 kB (two 64 KiB chunks each): 4 MB in one layer; then five
# of 20 kB (one chunk each: closer together than a request merges across).
FILES = {f"app/f{i:02d}": seeded_bytes(100_000, 900 + i) for i in range(40)}
SMALL = {f"app/s{i}": seeded_bytes(20_000, 950 + i) for i in range(5)}
REPO = "stream/app"
QUICK = RetryPolicy(base_delay=0.01, max_delay=0.05, stall_timeout=0.3, deadline=0.6)


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("stream")
    items = [Item("app", "dir", mode=0o755)]
    items += [Item(n, data=b) for n, b in (FILES | SMALL).items()]
    make_lazy_layout(d / "lazy", [make_tar(items)])
    return {"dir": d, **push_one_layer(d / "lazy", f"{registry.host}/{REPO}:v1", tag="v1")}


@asynccontextmanager
async def _source(proxy: FaultProxy) -> AsyncIterator[RegistrySource]:
    src = RegistrySource(proxy.host, REPO, plain_http=True, retry=QUICK)
    try:
        yield src
    finally:
        await src.aclose()


@asynccontextmanager
async def _opened(
    proxy: FaultProxy, cache: Path
) -> AsyncIterator[tuple[LayerStore, Layer, dict[str, Entry]]]:
    """The image opened through ``proxy``: its store, its one layer, and that layer's entries
    by name."""
    async with open_image(f"{proxy.host}/{REPO}:v1", cache_dir=cache, plain_http=True) as img:
        layer = img.layers[0].layer
        yield img.store, layer, layer.toc.by_name()


async def _stream(src: RegistrySource, digest: str, start: int, end: int) -> bytes:
    pieces: list[bytes] = []

    async def keep(piece: bytes) -> None:
        pieces.append(piece)

    await src.stream_range(digest, start, end, keep)
    return b"".join(pieces)


def test_a_cut_stream_resumes_after_its_last_byte(pushed: dict, fault_proxy: FaultProxy) -> None:
    blob, digest = pushed["blob"], pushed["digest"]
    end = 2_000_000

    async def main() -> None:
        async with _source(fault_proxy) as src:
            fault_proxy.rate = 50e6  # paced, so the client has read the half sent before the cut
            fault_proxy.drop_next(1)
            assert await _stream(src, digest, 1000, end) == blob[1000:end]

    trio.run(main)
    first, second = fault_proxy.ranges
    assert first == f"bytes=1000-{end - 1}"
    resumed = int(second.removeprefix("bytes=").split("-")[0])  # type: ignore[union-attr]
    assert 1000 < resumed <= 1000 + (end - 1000) // 2  # after what came, not from the start


def test_a_stall_resumes_and_a_stall_for_good_times_out(
    pushed: dict, fault_proxy: FaultProxy
) -> None:
    blob, digest = pushed["blob"], pushed["digest"]

    async def main() -> None:
        # A deadline a loaded machine cannot miss: the resumed request must come, whenever.
        patient = msgspec.structs.replace(QUICK, stall_timeout=1.0, deadline=60.0)
        src = RegistrySource(fault_proxy.host, REPO, plain_http=True, retry=patient)
        try:
            fault_proxy.stall_next(1)  # found by lack of progress, then the rest is asked for
            t0 = time.monotonic()
            assert await _stream(src, digest, 0, 1_000_000) == blob[:1_000_000]
            assert patient.stall_timeout <= time.monotonic() - t0
        finally:
            await src.aclose()
        # Counted at the proxy, not timed (a loaded machine is slow, not wrong): the stalled
        # answer, then a request for exactly what it did not bring (again if that one was
        # slow to start: never from before what came).
        first, *resumed = fault_proxy.ranges
        assert first == "bytes=0-999999" and resumed[0] == "bytes=500000-999999", resumed
        assert all(r is not None and r.endswith("-999999") and int(r[6:-7]) >= 500000
                   for r in resumed), resumed  # fmt: skip
        fault_proxy.reset()
        async with _source(fault_proxy) as src:
            fault_proxy.stall_next(100)  # every answer stalls: an error within the deadline
            with pytest.raises(RemoteError):
                await _stream(src, digest, 0, 100_000)
            # No attempt starts after the deadline: at most one per stall timeout within it
            # (fewer when the machine is slow), never the 100 stalls on offer.
            tries = len(fault_proxy.ranges)
            assert 1 <= tries <= 1 + math.ceil(QUICK.deadline / QUICK.stall_timeout), tries

    trio.run(main)


def test_a_reader_overtakes_a_prefetch_stream(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The proxy holds the prefetch stream after its first 300 kB until both reads are done:
    # the first file came with it, the last one can only come by a request of its own.  No
    # clock: a read that waited for the stream would wait for good (then fail_after).  The
    # stream is paced so its measured speed (what judges the last file far ahead) is at most
    # 1 MB/s, less the longer it is held, however fast or loaded the machine.
    async def main() -> None:
        async with _opened(fault_proxy, tmp_path / "c") as (store, layer, names):
            files = [names[n] for n in FILES]
            chunks = sum(len(f.chunks) for f in files)
            fault_proxy.reset()
            fault_proxy.rate = 1e6
            fault_proxy.hold_next(1, at=300_000)
            first = files[0]
            async with store.running(), trio.open_nursery() as nursery:
                nursery.start_soon(store.prefetch, layer, files)
                assert await trio.to_thread.run_sync(fault_proxy.holding.wait, 60)
                with trio.fail_after(30):
                    while layer.stats.chunks_ready < len(first.chunks):
                        await trio.sleep(0.01)  # the stream's first file is here
                    assert await store.read(layer, first, 0, first.size) == FILES[first.name]
                    last = files[-1]  # far ahead: asked for on its own
                    assert await store.read(layer, last, 0, last.size) == FILES[last.name]
                # Both done while the stream is still held half-way.
                assert layer.stats.chunks_ready < chunks
                assert len(fault_proxy.served) == 2, fault_proxy.ranges
                fault_proxy.unhold()
            assert layer.stats.cache_misses == 2  # both chunks of the last file
            # The stream and the overtaking request; the stream skipped what was overtaken.
            assert len(fault_proxy.served) == 2, fault_proxy.ranges
            assert layer.stats.chunks_ready == chunks

    trio.run(main)


def test_a_reader_of_a_chunk_the_stream_brought_does_not_wait_for_its_batch(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The proxy holds the prefetch stream once the first file's first chunk is in: that chunk
    # waits for a batch's worth of neighbours (STREAM_BATCH) before it is decoded.  A reader
    # who comes for it then must have it at once, not when the held stream goes on (never,
    # here, until the reader is done: a read that waited would hit fail_after).
    async def main() -> None:
        async with _opened(fault_proxy, tmp_path / "c") as (store, layer, names):
            files = [names[n] for n in FILES]
            first = files[0]
            c = first.chunks[0]
            fault_proxy.reset()
            fault_proxy.hold_next(1, at=c.end - c.offset + 4096)  # into the second chunk
            async with store.running(), trio.open_nursery() as nursery:
                nursery.start_soon(store.prefetch, layer, files)
                assert await trio.to_thread.run_sync(fault_proxy.holding.wait, 60)
                await trio.sleep(0.2)  # the held part is in, and nobody waits for it yet
                assert layer.stats.chunks_ready == 0
                with trio.fail_after(10):
                    got = await store.read(layer, first, 0, 1000)
                assert got == FILES[first.name][:1000]
                assert len(fault_proxy.served) == 1, fault_proxy.ranges  # no request of its own
                fault_proxy.unhold()

    trio.run(main)


def test_a_held_answer_released_by_a_reset_is_whole() -> None:
    """FaultProxy.hold_next: the rest of a held answer starts where its first part ended, even
    when a reset (which releases it) or another hold_next moved the proxy's hold point."""
    blob = seeded_bytes(200_000, 77)

    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

    upstream = ThreadedHTTPServer()
    port = upstream.serve(Upstream)
    got: list[bytes] = []

    def fetch(url: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as resp:
            got.append(resp.read())

    with upstream, FaultProxy(f"http://127.0.0.1:{port}") as proxy:
        proxy.hold_next(1, at=50_000)
        client = threading.Thread(target=fetch, args=(f"{proxy.url}/v2/r/blobs/x",))
        client.start()
        assert proxy.holding.wait(30)
        proxy.reset()  # releases it; the proxy's hold point is 0 again
        client.join(30)
    assert not client.is_alive() and got == [blob]


def test_a_grouped_cold_start_takes_a_few_requests(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # 30 files laid out together, 3 MB, ranked in another order than the blob's: prefetch in
    # 1 MiB requests asked 3 times; a stream asks once.
    used = list(FILES)[:30][::-1]
    groups = tmp_path / "groups.json"
    groups.write_bytes(startup_groups(REPO, pushed["manifest"], pushed["digest"], FILES, used))
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--prefetch", str(groups))
    with mounted(f"{fault_proxy.host}/{REPO}:v1", mnt, *args, "--cache", str(tmp_path / "c")):
        assert not wait_prefetched(mnt)["prefetch"]["error"]
        for n in used:
            assert (mnt / n).read_bytes() == FILES[n]
        stats = mount_stats(mnt)
    layer = stats["layers"][0]["stats"]
    assert layer["cache_misses"] == 0
    # Every blob request of the image: config, TOC, and the group's stream.
    assert len(fault_proxy.served) <= 6, fault_proxy.ranges
    assert layer["requests"] == 1


class _Patches:
    """A chunk provider that makes one file's chunks (as a delta would from an old file)."""

    def __init__(self, made: dict[str, bytes]) -> None:
        self.made = made

    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        return {c.digest: self.made[c.digest] for c in chunks if c.digest in self.made}


def test_planned_ranges_skip_chunks_cached_or_provided(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # Five small files 20 kB apart would be one range: b (cached) and d (made by the
    # provider, as an update's patch makes a changed file) cut it.
    async def main() -> None:
        async with _opened(fault_proxy, tmp_path / "c") as (store, layer, names):
            a, b, c, d, e = (names[n] for n in SMALL)
            await store.prefetch(layer, [b])
            store.provider = _Patches(
                {
                    ch.digest: SMALL[d.name][ch.file_offset : ch.file_offset + ch.size]
                    for ch in d.chunks
                }
            )
            fault_proxy.reset()
            await store.prefetch(layer, [a, b, c, d, e])
            assert layer.stats.provided_chunks == len(d.chunks)
            for x in (a, b, c, d, e):
                assert await store.read(layer, x, 0, x.size) == SMALL[x.name]
            # a, c and e: one multi-range request, each part a file exactly (headers aside)
            spans = [(x.chunks[0].offset, x.chunks[-1].end) for x in (a, c, e)]
            assert fault_proxy.ranges == ["bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)]
            fetched = sum(e - s for s, e in spans)
            assert fetched < fault_proxy.blob_bytes < fetched + 3 * 200

    trio.run(main)
