"""Multi-range requests on the real registry, through the fault proxy: scattered chunks in one
request, the fallbacks to single ranges (200 whole, one range, 416), a cut multipart answer
resuming, a redirect to a host that refuses multi-range, and hostile multipart answers that
never serve a wrong byte; the multipart parser itself without a network."""

# ruff: noqa: F811
from __future__ import annotations

import concurrent.futures
import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import httpcore
import msgspec
import pytest
import trio
from lazyfs_tools.convert import convert

from lazyfs.errors import LazyfsError
from lazyfs.formats.toc import Entry
from lazyfs.opener import open_image
from lazyfs.remote.multipart import (
    MAX_RANGE_HEADER,
    ByteRanges,
    Malformed,
    encode,
    range_spec,
    split_ranges,
)
from lazyfs.remote.registry import RECV_BYTES, RegistrySource, RetryPolicy, receive_wide
from lazyfs.store import plan
from lazyfs.store.slots import PrioritySlots
from lazyfs.testing.dockerregistry import RegistryInstance, push_one_layer
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import (
    lazyfs_cmd,
    mount_stats,
    mounted,
    run,
    startup_groups,
    wait_prefetched,
)
from lazyfs.trace.schema import Group, RankedEntry, Tier
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

# 40 incompressible files of 100 kB (two 64 KiB chunks each) in one layer, laid out by path;
# a start-up that wants every third one finds them 200 kB apart.
FILES = {f"app/f{i:02d}": seeded_bytes(100_000, 700 + i) for i in range(40)}
SCATTERED = list(FILES)[::3]
REPO = "multirange/app"
QUICK = RetryPolicy(base_delay=0.01, max_delay=0.05, stall_timeout=0.3, deadline=0.6)


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("multirange")
    items = [Item("app", "dir", mode=0o755)] + [Item(n, data=b) for n, b in FILES.items()]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    return push_one_layer(d / "lazy", f"{registry.host}/{REPO}:v1", tag="v1")


def _layer_requests(proxy: FaultProxy, digest: str, since: int = 0) -> list[str | None]:
    """The Range header of every request for the layer blob (after the first ``since``)."""
    seen = zip(proxy.paths[since:], proxy.ranges[since:], strict=True)
    return [r for p, r in seen if p.endswith(digest)]


def _prefetch_and_read_with(
    proxy: FaultProxy, mode: str, tmp: Path
) -> tuple[list[str | None], dict[str, object]]:
    """:func:`_prefetch_and_read` of the scattered files, the proxy answering multi-range
    requests as ``mode`` says."""
    proxy.multirange = mode
    try:
        return trio.run(_prefetch_and_read, proxy, tmp, SCATTERED)
    finally:
        proxy.reset()


async def _prefetch_and_read(
    proxy: FaultProxy, tmp: Path, names: list[str], opened: Callable[[], None] = lambda: None
) -> tuple[list[str | None], dict[str, object]]:
    """Prefetch ``names`` cold through ``proxy``, check every byte read back, and return the
    layer's Range headers during the prefetch and the source's multi-range state.
    ``opened`` runs once the image is open (its config and TOC are fetched)."""
    ref = f"{proxy.host}/{REPO}:v1"
    async with open_image(ref, cache_dir=tmp, plain_http=True) as img:
        src = img.source.inner  # type: ignore[attr-defined]  # CachingSource over the registry
        assert isinstance(src, RegistrySource)
        src.retry = QUICK
        store, layer = img.store, img.layers[0].layer
        byname = layer.toc.by_name()
        entries: list[Entry] = [byname[n] for n in names]
        before = len(proxy.ranges)
        opened()
        await store.prefetch(layer, entries)
        asked = _layer_requests(proxy, layer.blob_digest, before)
        for e in entries:
            assert await store.read(layer, e, 0, e.size) == FILES[e.name]
        state = {
            "refused": set(src.multirange_refused),
            "multi": src.multirange(layer.blob_digest),
            "stats": msgspec.to_builtins(layer.stats),
        }
        return asked, state


def test_scattered_chunks_come_in_one_request(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    asked, state = trio.run(_prefetch_and_read, fault_proxy, tmp_path, SCATTERED)
    assert len(asked) == 1 and asked[0] is not None
    assert asked[0].count(",") == len(SCATTERED) - 1  # a range per file: 200 kB gaps left out
    stats = state["stats"]
    assert isinstance(stats, dict)
    assert (stats["requests"], stats["multirange_requests"]) == (1, 1)
    assert stats["streams"] == []  # none under way any more
    assert state["multi"] and not state["refused"]


@pytest.mark.parametrize("mode", ["whole", "first", "416"])
def test_a_host_without_multirange_gets_single_ranges(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path, mode: str
) -> None:
    asked, state = _prefetch_and_read_with(fault_proxy, mode, tmp_path)
    first, rest = asked[0], asked[1:]
    assert first is not None and "," in first  # tried once...
    assert rest and all(r is not None and "," not in r for r in rest)  # ...then one at a time
    if mode == "first":  # the first range was used as it came
        assert len(rest) == len(SCATTERED) - 1
    assert state["refused"] == {fault_proxy.host} and not state["multi"]


def test_a_cut_multipart_answer_resumes_with_what_is_missing(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    def cut() -> None:
        fault_proxy.rate = 20e6  # paced, so the client has read the half sent before the cut
        fault_proxy.drop_next(1)

    try:
        asked, state = trio.run(_prefetch_and_read, fault_proxy, tmp_path, SCATTERED, cut)
    finally:
        fault_proxy.reset()
    assert len(asked) == 2, asked
    first, second = (r.removeprefix("bytes=").split(",") for r in asked if r is not None)
    assert len(first) == len(SCATTERED)
    # The resumed request starts inside the range that was cut and asks for nothing before.
    assert 1 < len(second) < len(first)
    cut = len(first) - len(second)
    assert second[1:] == first[cut + 1 :]
    lo, hi = (int(x) for x in second[0].split("-"))
    start, end = (int(x) for x in first[cut].split("-"))
    assert start <= lo <= hi == end
    assert state["multi"]  # a cut is not a refusal


def test_a_redirect_to_a_host_without_multirange(
    pushed: dict, registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The registry sends blobs to a storage host (307), and that host answers only the first
    # range: the storage host is remembered, not the registry.
    with FaultProxy(registry.url) as storage:
        storage.multirange = "first"
        fault_proxy.redirect_to = storage.url
        try:
            asked, state = trio.run(_prefetch_and_read, fault_proxy, tmp_path, SCATTERED)
        finally:
            fault_proxy.reset()
        stored = _layer_requests(storage, pushed["digest"])
    assert "," in (asked[0] or "") and len(asked) > 1
    assert all("," not in (r or "") for r in asked[1:])
    assert stored[-len(asked) :] == asked
    assert state["refused"] == {storage.host} and not state["multi"]


@pytest.mark.parametrize("mode", ["reorder", "lie", "overlap", "long", "garbage"])
def test_a_hostile_multipart_answer_never_serves_a_wrong_byte(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path, mode: str
) -> None:
    # Every byte read back is checked in _prefetch_and_read; what differs is how it got there.
    asked, state = _prefetch_and_read_with(fault_proxy, mode, tmp_path)
    stats = state["stats"]
    assert isinstance(stats, dict)
    if mode == "lie":  # well formed but wrong bytes: each chunk fails and is fetched again
        assert stats["integrity_errors"] == 2 * len(SCATTERED)
        assert len(asked) == 1 + 2 * len(SCATTERED)
    elif mode == "overlap":  # repeated bytes are dropped: nothing to fall back from
        assert len(asked) == 1 and state["multi"]
    else:  # parts out of order, a part too long, no boundary: single ranges from then on
        assert state["refused"] == {fault_proxy.host} and len(asked) > 1
        assert all("," not in (r or "") for r in asked[1:])


def test_a_grouped_cold_start_over_scattered_files_is_one_request(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    used = SCATTERED[::-1]  # ranked in another order than the blob's
    groups = _groups_file(pushed, used, tmp_path / "groups.json")
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--prefetch", str(groups))
    with mounted(f"{fault_proxy.host}/{REPO}:v1", mnt, *args, "--cache", str(tmp_path / "c")):
        assert not wait_prefetched(mnt)["prefetch"]["error"]
        for n in used:
            assert (mnt / n).read_bytes() == FILES[n]
        stats = mount_stats(mnt)
    layer = stats["layers"][0]["stats"]
    assert layer["cache_misses"] == 0
    assert (layer["requests"], layer["multirange_requests"], layer["overtakes"]) == (1, 1, 0)
    # Every request for the layer's blob: its footer and TOC (one or two), the group's one.
    assert len(_layer_requests(fault_proxy, pushed["digest"])) <= 3, fault_proxy.ranges


def _groups_file(pushed: dict, names: list[str], path: Path) -> Path:
    path.write_bytes(startup_groups(REPO, pushed["manifest"], pushed["digest"], FILES, names))
    return path


def test_a_reader_at_once_after_ready_joins_the_groups_request(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The start-up reads its first file the moment the mount is ready, before the prefetch
    # has sent anything: it waits for the group's request and reads from it, sending none.
    groups = _groups_file(pushed, SCATTERED, tmp_path / "groups.json")
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--prefetch", str(groups))
    with mounted(f"{fault_proxy.host}/{REPO}:v1", mnt, *args, "--cache", str(tmp_path / "c")):
        assert (mnt / SCATTERED[0]).read_bytes() == FILES[SCATTERED[0]]
        stats = wait_prefetched(mnt)
        text = run(*lazyfs_cmd("stats", str(mnt)), check=True).stdout
    layer = stats["layers"][0]["stats"]
    assert (layer["requests"], layer["multirange_requests"], layer["overtakes"]) == (1, 1, 0)
    assert len(_layer_requests(fault_proxy, pushed["digest"])) <= 3, fault_proxy.ranges
    assert "requests: 1 multi-range, 0 overtakes; 0 streaming now" in text, text


# ------------------------------------------------------------------------------- no network


def _body(parts: list[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    return encode(parts, 1_000_000, b"b0und4ry"), b"b0und4ry"


def _parse(body: bytes, boundary: bytes, step: int) -> tuple[list[tuple[int, bytes]], bool]:
    p = ByteRanges(boundary)
    got: list[tuple[int, bytes]] = []
    for i in range(0, len(body), step):
        got += p.feed(body[i : i + step])
    p.finish()
    joined: dict[int, bytearray] = {}
    for at, data in got:  # pieces of one part, joined
        for start, buf in joined.items():
            if start + len(buf) == at:
                buf += data
                break
        else:
            joined[at] = bytearray(data)
    return [(at, bytes(b)) for at, b in joined.items()], p.done


@pytest.mark.parametrize("step", [1, 7, 100, 1 << 20])
def test_byteranges_parse_in_any_pieces(step: int) -> None:
    rng = random.Random(step)
    parts = [(at, rng.randbytes(n)) for at, n in ((0, 10), (500, 1), (9000, 3000))]
    body, boundary = _body(parts)
    assert _parse(body, boundary, step) == (parts, True)
    # A preamble, quoted boundaries and padding after a boundary are allowed.
    assert _parse(b"junk\r\n" + body, boundary, step) == (parts, True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b.replace(b"Content-Range", b"Content-Rang"),
        lambda b: b.replace(b"bytes 500-500", b"bytes 500-499"),
        lambda b: b.replace(b"bytes 500-500", b"bytes x-500"),
        lambda b: b.replace(b"--b0und4ry", b"--b0und4rY"),
        lambda b: b[:60] + b"X" + b[60:],  # one byte more in a part
        lambda b: b"x" * 2000 + b,  # a preamble that never ends
    ],
)
def test_byteranges_refuse_what_they_cannot_read_exactly(damage: object) -> None:
    body, boundary = _body([(0, b"0123456789"), (500, b"x"), (9000, b"abc")])
    with pytest.raises(Malformed):
        _parse(damage(body), boundary, 13)  # type: ignore[operator]


def test_range_headers_stay_bounded() -> None:
    ranges = [(i * 100_000_000, i * 100_000_000 + 5) for i in range(1000)]
    parts = split_ranges(ranges)
    assert [r for p in parts for r in p] == ranges
    assert all(len(range_spec(p)) <= MAX_RANGE_HEADER for p in parts)
    assert len(parts) == 6  # about 22 bytes a range
    with pytest.raises(ValueError):
        trio.run(_overlapping)


async def _overlapping() -> None:
    async def sink(at: int, data: bytes) -> None:
        raise AssertionError("nothing to hand over")

    src = RegistrySource("127.0.0.1:1", REPO, plain_http=True)
    try:
        await src.stream_ranges("sha256:" + "0" * 64, [(0, 10), (5, 20)], sink)
    except LazyfsError:
        raise AssertionError("checked before any request") from None
    finally:
        await src.aclose()


def test_bundles_keep_to_the_header_and_byte_caps() -> None:
    plans: list[plan.Plan] = [(i * 1_000_000, i * 1_000_000 + 1000, []) for i in range(600)]
    bundles = plan.bundle(plans)
    assert [p for b in bundles for p in b] == plans
    assert all(len(range_spec([(s, e) for s, e, _ in b])) <= MAX_RANGE_HEADER for b in bundles)
    assert len(bundles) == 3  # ~19 bytes a range
    big = plan.bundle(plans[:10], max_bytes=3000)
    assert [len(b) for b in big] == [3, 3, 3, 1]


def test_groups_of_another_image_of_the_same_files_still_match(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # Groups traced on an image apply to its re-laid-out copy (other layer digests): by path,
    # when the top-most layer holding the path has the traced content.
    from lazyfs.fs.prefetch import Prefetcher

    def ranked(name: str, data: bytes) -> RankedEntry:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return RankedEntry(layer="sha256:" + "e" * 64, path=name, digest=digest, size=len(data))

    entries = [ranked(n, FILES[n]) for n in SCATTERED]
    entries.append(ranked(SCATTERED[0].replace("f", "g"), b"no such file"))
    entries.append(ranked(list(FILES)[1], b"other content at that path"))
    group = Group(name="startup", runs=1, tiers=[Tier(name="always", entries=entries)])

    async def main() -> None:
        ref = f"{fault_proxy.host}/{REPO}:v1"
        async with open_image(ref, cache_dir=tmp_path, plain_http=True) as img:
            p = Prefetcher(img.store, img.store_layers(), group)
            assert (p.stats.entries, p.stats.skipped) == (len(SCATTERED), 2)

    trio.run(main)


def test_the_prefetch_says_when_its_requests_are_sent(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # A mount builds its tree (a stretch of CPU) once its early prefetch's requests have
    # left: the prefetcher says so as their headers are written, long before the answers.
    from lazyfs.fs.prefetch import Prefetcher

    def ranked(name: str) -> RankedEntry:
        digest = "sha256:" + hashlib.sha256(FILES[name]).hexdigest()
        return RankedEntry(layer="sha256:" + "e" * 64, path=name, digest=digest, size=100_000)

    entries = [ranked(n) for n in SCATTERED]
    group = Group(name="startup", runs=1, tiers=[Tier(name="always", entries=entries)])

    async def main() -> None:
        async with open_image(
            f"{fault_proxy.host}/{REPO}:v1", cache_dir=tmp_path, plain_http=True
        ) as img:
            since = len(fault_proxy.paths)
            fault_proxy.delay, fault_proxy.delay_match = 1.0, "/blobs/"  # every answer late
            p = Prefetcher(img.store, img.store_layers(), group)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.run)
                with trio.fail_after(0.7):
                    await p.sent.wait()
                    assert not p.stats.prefetch_done
                    while not any(fault_proxy.ranges[since:]):
                        await trio.sleep(0.01)  # the proxy's thread notes it
            assert p.stats.prefetch_done and not p.stats.error
            fault_proxy.delay = None
            # Nothing left to send (all cached): said at once, with no request.
            since = len(fault_proxy.paths)
            again = Prefetcher(img.store, img.store_layers(), group)
            with trio.fail_after(5):
                await again.run()
            assert again.sent.is_set() and len(fault_proxy.paths) == since

    trio.run(main)


def test_a_big_batch_goes_as_requests_cut_by_rank() -> None:
    from lazyfs.formats.toc import Chunk
    from lazyfs.fs.prefetch import by_rank

    a, b = object(), object()  # two layers: only their identity matters here
    mib = 1024 * 1024

    def item(layer: object, i: int) -> tuple:
        # Ranked files 1 MiB each, placed in the blob against rank order.
        return layer, [Chunk(0, mib, (20 - i) * mib, (21 - i) * mib, f"d{i}")]

    items = [item(a if i % 2 else b, i) for i in range(14)]
    parts = by_rank(items)
    ranks = [sorted(int(c.digest[1:]) for cs in p.values() for c in cs) for p in parts]
    assert ranks == [[0, 1], [2, 3, 4, 5], list(range(6, 14))]  # 1:2:4 of the bytes
    assert set(parts[0]) == {a, b}
    assert by_rank(items[:1]) == [{b: items[0][1]}]  # a small batch stays one request
    in_order = items[::-1]  # ranked as the blob lies (re-laid out): one request
    assert len(by_rank(in_order)) == 1


def test_a_groups_document_cuts_its_first_requests_finer() -> None:
    """The requests a groups document carries go one after another (rank order, each at
    the link's whole rate): finer parts than the prefetch's own, which go at once."""
    from lazyfs.formats.toc import Chunk
    from lazyfs.fs.prefetch import EARLY_RANK_SHARES, by_rank
    from lazyfs.store.earlyrange import MAX_EARLY_REQUESTS

    a = object()
    mib = 1024 * 1024
    items = [(a, [Chunk(0, mib, (20 - i) * mib, (21 - i) * mib, f"d{i}")]) for i in range(12)]
    parts = by_rank(items, shares=EARLY_RANK_SHARES)
    ranks = [sorted(int(c.digest[1:]) for cs in p.values() for c in cs) for p in parts]
    assert ranks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert len(EARLY_RANK_SHARES) <= MAX_EARLY_REQUESTS


# ------------------------------------------------------------------------------- batched misses


# Paced answers take about a second: a cut one is still retried.
PACED = RetryPolicy(base_delay=0.01, max_delay=0.05, stall_timeout=1.0, deadline=5.0)


async def _read_while_busy(
    proxy: FaultProxy, tmp: Path, first: str, names: list[str], meanwhile: Callable[[], None]
) -> tuple[list[str | None], dict[str, object]]:
    """Read ``first`` from a cold store with a single request slot; while its request streams
    (the proxy paces it), call ``meanwhile`` and read ``names`` at once, each checked byte for
    byte.  Returns the layer's Range headers after the first and the layer's stats."""
    ref = f"{proxy.host}/{REPO}:v1"
    async with open_image(ref, cache_dir=tmp, plain_http=True) as img:
        src = img.source.inner  # type: ignore[attr-defined]
        assert isinstance(src, RegistrySource)
        src.retry = PACED
        store, layer = img.store, img.layers[0].layer
        store.amplify = store.readahead = 0  # each reader asks for its own file's chunks only
        store._slots = PrioritySlots(1, 0)  # the others wait for the first's slot
        byname = layer.toc.by_name()
        before = len(proxy.ranges)

        async def read(name: str) -> None:
            e = byname[name]
            assert await store.read(layer, e, 0, e.size) == FILES[name]

        async with store.running(), trio.open_nursery() as nursery:
            nursery.start_soon(read, first)
            while not any(s.received for s in layer.stats.streams):  # the first is answered
                await trio.sleep(0.001)
            meanwhile()
            for name in names:
                nursery.start_soon(read, name)
        asked = _layer_requests(proxy, layer.blob_digest, before)
        return asked[1:], msgspec.to_builtins(layer.stats)


def _busy_reads(
    proxy: FaultProxy, tmp: Path, meanwhile: Callable[[], None] = lambda: None
) -> tuple[list[str | None], dict[str, object]]:
    proxy.rate = 1e6  # the first file's 100 kB take ~0.1 s
    try:
        return trio.run(_read_while_busy, proxy, tmp, SCATTERED[0], SCATTERED[1:], meanwhile)
    finally:
        proxy.reset()


def test_misses_waiting_for_a_request_go_together(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    asked, stats = _busy_reads(fault_proxy, tmp_path)
    # Twelve readers missed while the first's request streamed: one request for all of them.
    assert len(asked) == 1 and asked[0] is not None
    assert asked[0].count(",") == len(SCATTERED) - 2, asked
    assert (stats["requests"], stats["multirange_requests"]) == (2, 1)
    assert stats["batched_misses"] == len(SCATTERED) - 2


def test_a_cut_batch_of_misses_resumes(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    asked, stats = _busy_reads(fault_proxy, tmp_path, lambda: fault_proxy.drop_next(1))
    assert len(asked) == 2, asked  # the batch, cut half-way, then what it had not brought
    first, second = (r.removeprefix("bytes=").split(",") for r in asked if r is not None)
    assert len(first) == len(SCATTERED) - 1 and 1 <= len(second) < len(first)
    assert stats["integrity_errors"] == 0


@pytest.mark.parametrize("mode", ["whole", "first", "416"])
def test_batched_misses_from_a_host_without_multirange(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path, mode: str
) -> None:
    asked, stats = _busy_reads(
        fault_proxy, tmp_path, lambda: setattr(fault_proxy, "multirange", mode)
    )
    first, rest = asked[0], asked[1:]
    assert first is not None and "," in first  # tried once...
    assert rest and all(r is not None and "," not in r for r in rest)  # ...then one at a time
    assert stats["integrity_errors"] == 0


def test_concurrent_readers_on_a_cold_mount_share_requests(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    names = list(FILES)
    args = ("--plain-http", "--read-only", "--cache", str(tmp_path / "c"))
    fault_proxy.rate = 16e6  # requests stay in flight a little while others miss
    try:
        with mounted(f"{fault_proxy.host}/{REPO}:v1", mnt, *args):
            before = len(fault_proxy.ranges)
            with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
                got = list(pool.map(lambda n: (mnt / n).read_bytes(), names))
            stats = mount_stats(mnt)["layers"][0]["stats"]
        asked = _layer_requests(fault_proxy, pushed["digest"], before)
    finally:
        fault_proxy.reset()
    assert got == [FILES[n] for n in names]
    assert len(asked) < len(names), asked  # joined flights, read-ahead, batched misses
    assert stats["integrity_errors"] == 0


async def _pieces_after_a_pause(host: str, digest: str, size: int) -> tuple[list[int], bytes]:
    sizes: list[int] = []
    got = bytearray()

    async def sink(at: int, data: bytes) -> None:
        if not sizes:
            time.sleep(0.3)  # busy (blocking): the answer's next bytes wait in the socket
        sizes.append(len(data))
        got.extend(data)

    src = RegistrySource(host, REPO, plain_http=True)
    try:
        await src.stream_ranges(digest, [(0, size)], sink)
    finally:
        await src.aclose()
    return sizes, bytes(got)


def test_an_answer_is_read_as_far_as_the_socket_holds(
    pushed: dict, registry: RegistryInstance
) -> None:
    """What came while the reader was busy is taken in one step, not 64 KiB at a time
    (httpx's default; up to registry.RECV_BYTES once ``receive_wide``, as a mount daemon):
    each step costs the event loop more than its copy.  (Before: no piece above 64 KiB.)"""
    blob = pushed["blob"]
    receive_wide()  # as a mount daemon does once glibc's thresholds are raised
    try:
        sizes, got = trio.run(_pieces_after_a_pause, registry.host, pushed["digest"], len(blob))
    finally:
        receive_wide(False)
    assert got == blob
    assert max(sizes) > 64 * 1024, sizes


async def _first_bytes_ignoring_range(proxy: FaultProxy, digest: str) -> tuple[bytes, int]:
    src = RegistrySource(proxy.host, REPO, plain_http=True)
    try:
        got = await src.read_range(digest, 0, 100)
        return got, src.stats.bytes_received
    finally:
        await src.aclose()


def test_a_whole_blob_answer_is_not_read_through(pushed: dict, fault_proxy: FaultProxy) -> None:
    """A host that ignores Range sends the whole blob for 100 bytes: the source reads what
    the socket holds (up to registry.RECV_BYTES) and closes, not the whole 4 MB."""
    fault_proxy.ignore_range = True
    blob = pushed["blob"]
    assert len(blob) > 2 * RECV_BYTES
    got, received = trio.run(_first_bytes_ignoring_range, fault_proxy, pushed["digest"])
    assert got == blob[:100]
    assert received <= 2 * RECV_BYTES, received


def test_reads_are_wide_only_once_asked() -> None:
    """``lazyfs pull`` and the snapshotter keep httpcore's 64 KiB reads: under glibc's start
    thresholds a 1 MiB buffer is mapped and unmapped per read (BENCHMARKS "H88")."""
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == 64 * 1024
    receive_wide()
    try:
        assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == RECV_BYTES
    finally:
        receive_wide(False)
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == 64 * 1024
