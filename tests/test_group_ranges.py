"""A prefetch group's byte ranges in its document (``Group.requests``, written by ``lazyfs
optimize`` from the image's TOCs): a cold mount of a layer laid out by path sends them
beside the TOC's request, given at open or stored beside the image, and adopts them once
the TOC is decoded (every chunk verified, none fetched twice).  A hostile document's are
clipped or refused; an old document without them works as before."""

# ruff: noqa: F811
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import trio
import trio.testing
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.cli.optimizecmd import add_requests
from lazyfs.ocilayout import Layout
from lazyfs.opener import _Early
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import subject_descriptor
from lazyfs.remote.registry import RegistrySource
from lazyfs.store.earlyrange import (
    MAX_EARLY_BYTES,
    MAX_EARLY_REQUESTS,
    MAX_EARLY_RUNS,
    EarlyRange,
    Run,
    group_requests,
)
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted, startup_groups, wait_prefetched
from lazyfs.trace.schema import Group, PrefetchGroups, decode_groups, encode
from lazyfs.trace.stored import push_groups
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

FILES = {f"app/f{i:02d}.bin": seeded_bytes(150_000, 900 + i) for i in range(12)}
USED = ["app/f09.bin", "app/f02.bin", "app/f05.bin"]
REPO = "ranges/app"


@pytest.fixture(scope="module")
def image(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The files laid out by path (not re-laid out: no annotated range), pushed, and a
    groups document for them with the byte ranges ``lazyfs optimize`` writes."""
    d = tmp_path_factory.mktemp("ranges")
    items = [Item("app", "dir", mode=0o755), *(Item(n, data=b) for n, b in FILES.items())]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/{REPO}:v1", tag="v1")
    lay = Layout(d / "lazy")
    manifest, layer = lay.find("v1").digest, lay.manifest("v1").layers[0]
    assert oci.ANN_LAZYFS_PREFETCH_RANGE not in (layer.annotations or {})
    old = decode_groups(startup_groups(REPO, manifest, layer.digest, FILES, USED))
    doc = decode_groups(encode(old))
    trio.run(functools.partial(add_requests, doc, f"{registry.host}/{REPO}:v1", plain_http=True))
    return {"manifest": manifest, "layer": layer, "old": old, "doc": doc}


def _header(runs: list[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in runs)


def _read_used(mnt: Path) -> dict:
    for name in USED:
        assert (mnt / name).read_bytes() == FILES[name]
    stats: dict = mount_stats(mnt)["layers"][0]["stats"]
    assert stats["integrity_errors"] == 0
    return stats


def _write(path: Path, doc: PrefetchGroups) -> Path:
    path.write_bytes(encode(doc))
    return path


def test_optimize_writes_the_first_requests_of_the_group(image: dict) -> None:
    requests = image["doc"].groups[0].requests
    assert list(requests) == [image["layer"].digest]
    [runs] = requests[image["layer"].digest]  # 450 kB: one multi-range request
    assert len(runs) == 3  # the three files lie apart in a layer laid out by path
    assert sum(e - s for s, e in runs) >= 450_000 // 2  # compressed, incompressible data
    assert not image["old"].groups[0].requests


def test_given_groups_ranges_leave_beside_the_toc_and_are_not_fetched_twice(
    image: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = image["layer"]
    [runs] = image["doc"].groups[0].requests[layer.digest]
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.2  # every answer held: what overlaps the TOC's transfer shows
    groups = _write(tmp_path / "groups.json", image["doc"])
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(
        f"{fault_proxy.host}/{REPO}:v1", tmp_path / "mnt", *args, "--prefetch", str(groups)
    ) as m:
        assert not wait_prefetched(m.mountpoint)["prefetch"]["error"]
        stats = _read_used(m.mountpoint)
        assert stats["cache_misses"] == 0
    before = fault_proxy.ranges_before_first_answer(layer.digest)
    assert len(before) == 2 and _header(runs) in before, before
    # The prefetch found the adopted chunks on their way: nothing of the blob went twice.
    assert len(fault_proxy.blob_requests(layer.digest)) == 2, fault_proxy.ranges


def test_stored_groups_ranges_leave_while_the_toc_travels(
    image: dict, registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = image["layer"]
    [runs] = image["doc"].groups[0].requests[layer.digest]

    async def store() -> None:
        src = RegistrySource(registry.host, REPO, plain_http=True)
        try:
            subject = await subject_descriptor(src, image["manifest"])
            await push_groups(src, subject, encode(image["doc"]))
        finally:
            await src.aclose()

    trio.run(store)
    fault_proxy.match = "/v2/"
    # Only the layer's requests held (the TOC's a long way): the lookup's answers come first.
    fault_proxy.delay, fault_proxy.delay_match = 0.6, layer.digest
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(f"{fault_proxy.host}/{REPO}:v1", tmp_path / "mnt", *args) as m:
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert pf["group"] == "startup" and not pf["error"]
        assert _read_used(m.mountpoint)["cache_misses"] == 0
    before = fault_proxy.ranges_before_first_answer(layer.digest)
    assert len(before) == 2 and _header(runs) in before, before
    assert len(fault_proxy.blob_requests(layer.digest)) == 2, fault_proxy.ranges


def test_hostile_or_missing_ranges_mount_and_serve_right(
    image: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = image["layer"]
    [runs] = image["doc"].groups[0].requests[layer.digest]
    size = layer.size
    cases: dict[str, tuple[list[list[tuple[int, int]]] | None, int]] = {
        # (the layer's requests in the document, requests before the TOC's answer)
        "old": (None, 1),
        "overlapping": ([[(0, 5000), (4000, 9000)]], 1),
        "across requests": ([[(0, 5000)], [(100, 200)]], 1),
        "too many": ([[(0, 10)]] * (MAX_EARLY_REQUESTS + 1), 1),
        "empty range": ([[(10, 10)]], 1),
        "past the blob": ([[*runs, (size - 10, size + 1_000_000), (size + 5, size + 9)]], 2),
    }
    for name, (requests, early) in cases.items():
        doc = msgspec.structs.replace(image["old"])
        if requests is not None:
            doc.groups[0].requests = {layer.digest: requests}
        groups = _write(tmp_path / "groups.json", decode_groups(encode(doc)))
        fault_proxy.reset()
        fault_proxy.match = "/v2/"
        fault_proxy.delay = 0.1
        args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / name))
        with mounted(
            f"{fault_proxy.host}/{REPO}:v1", tmp_path / "mnt", *args, "--prefetch", str(groups)
        ) as m:
            assert not wait_prefetched(m.mountpoint)["prefetch"]["error"], name
            _read_used(m.mountpoint)
        assert len(fault_proxy.ranges_before_first_answer(layer.digest)) == early, name


def test_group_requests_are_checked_against_the_blob() -> None:
    desc = oci.Descriptor(mediaType="", digest="sha256:" + "0" * 64, size=1000)
    assert group_requests(desc, [[(0, 10), (20, 30)], [(40, 50)]]) == [
        [(0, 10), (20, 30)],
        [(40, 50)],
    ]
    assert group_requests(desc, [[(900, 1200), (1500, 1600)], [(0, 5)]]) == [
        [(900, 1000)],
        [(0, 5)],
    ]
    assert group_requests(desc, [[(2000, 3000)]]) == []
    for bad in (
        [[(10, 5)]],
        [[(-1, 5)]],
        [[(0, 10), (5, 20)]],
        [[(20, 30), (0, 10)]],
        [[(0, 10)], [(5, 6)]],
        [[(0, 1)]] * (MAX_EARLY_REQUESTS + 1),
        [[(i, i + 1) for i in range(0, 2 * MAX_EARLY_RUNS + 2, 2)]],
    ):
        assert group_requests(desc, bad) == [], bad


def test_a_groups_early_requests_are_bounded_and_late_groups_wait_for_nothing() -> None:
    """Every early request's bytes wait in memory for the TOCs: a group's count against the
    image's bound with the annotations'; a group known after the TOCs are in sends none."""
    asked: list[list[tuple[int, int]]] = []

    class Stalled:  # the registry never answers: every range asked for stays held
        name = "stalled"

        async def stream_ranges(self, digest: str, runs: list[tuple[int, int]], _: Any) -> None:
            asked.append(list(runs))
            await trio.sleep_forever()

    third = MAX_EARLY_BYTES // 3
    layers = [
        oci.Descriptor(mediaType=oci.MT_LAYER_ZSTD, digest=f"sha256:{i:064x}", size=4 * third)
        for i in range(3)
    ]
    group = Group(
        name="g",
        runs=1,
        tiers=[],
        requests={d.digest: [[(0, 10), (20, third)], [(third, 2 * third)]] for d in layers},
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            early = _Early(nursery, cast(Source, Stalled()), None)
            early.toc_sent(layers[0])
            early.group_known(group)  # the stored group came while the TOC travels
            early.toc_sent(layers[1])
            await trio.testing.wait_all_tasks_blocked()
            held = sum(e.size for es in early.ranges.values() for e in es)
            assert held <= MAX_EARLY_BYTES
            early.adopted = True  # as ``adopt`` leaves it
            late = _Early(nursery, cast(Source, Stalled()), None)
            late.toc_sent(layers[2])
            late.adopted = True
            late.group_known(group)
            assert not late.ranges
            nursery.cancel_scope.cancel()

    trio.run(main)
    # The first layer's two requests, then the second's first: the third would pass the bound.
    # Each layer's second waits for its first (rank order), which never answers here.
    first = [(0, 10), (20, third)]
    assert sorted(asked) == sorted([first, first])


def test_a_groups_requests_go_one_after_another_each_as_the_one_before_ends() -> None:
    """A layer's early requests (rank order) leave one at a time: the next once those before
    it have about LEAD_RTTS round trips' worth of bytes left (their measured rate and
    latency), so the first-ranked bytes have the link to themselves and the link never
    idles; on a link that brings them faster, at once; a reader waiting for a later one's
    bytes sends it at once, and so does the end (or drop) of those before."""
    mb = 1_000_000
    desc = oci.Descriptor(mediaType=oci.MT_LAYER_ZSTD, digest="sha256:" + "1" * 64, size=10 * mb)
    requests = [[(0, mb)], [(2 * mb, 3 * mb)], [(4 * mb, 5 * mb)], [(6 * mb, 6 * mb + 10)]]
    group = Group(name="g", runs=1, tiers=[], requests={desc.digest: requests})
    latency, piece = 0.05, 1000

    def run(per_piece: float, body: Any) -> dict[int, float]:
        sent: dict[int, float] = {}

        class Paced:
            name = "paced"

            async def stream_ranges(self, digest: str, runs: list[Run], put: Any) -> None:
                sent[runs[0][0]] = trio.current_time()
                await trio.sleep(latency)
                for start, end in runs:
                    for at in range(start, end, piece):
                        await put(at, b"x" * min(piece, end - at))
                        if per_piece:
                            await trio.sleep(per_piece)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                early = _Early(nursery, cast(Source, Paced()), group)
                early.toc_sent(desc)
                await body(sent, *early.ranges[desc.digest])
                nursery.cancel_scope.cancel()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        return sent

    async def slow(sent: dict[int, float], e1: Any, e2: Any, e3: Any, e4: Any) -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert list(sent) == [0]  # the first alone
        # The second once the first has 2 round trips' worth (100 kB at 1 MB/s) left: ~0.95 s.
        await trio.sleep(0.85)
        assert list(sent) == [0]
        await trio.sleep(0.15)
        assert list(sent) == [0, 2 * mb]
        assert 0.9 <= sent[2 * mb] - sent[0] <= 1.0
        # A reader waits for the third's bytes: it goes now, not after the second.
        e3.want()
        await trio.testing.wait_all_tasks_blocked()
        assert 4 * mb in sent and e2.received < mb
        # The fourth waits for the second and third; both dropped: it goes.
        assert 6 * mb not in sent
        e2.drop()
        e3.drop()
        await trio.testing.wait_all_tasks_blocked()
        assert 6 * mb in sent

    run(0.001, slow)  # 1 MB/s

    async def fast(sent: dict[int, float], *_: Any) -> None:
        await trio.sleep(1)

    sent = run(0, fast)  # each request's bytes all at once: the rest go as the first ends
    assert sorted(sent) == [0, 2 * mb, 4 * mb, 6 * mb]
    assert max(sent.values()) - sent[0] <= latency + 0.001, sent


def test_an_adopted_range_hands_its_bytes_over_once_released() -> None:
    """The mount releases early ranges' bytes once its tree is built (``hold_early``)."""
    got: list[tuple[int, bytes]] = []

    async def sink(at: int, piece: bytes) -> None:
        got.append((at, piece))

    async def main() -> None:
        e = EarlyRange("sha256:" + "0" * 64, 0, 30, [(0, 10), (20, 30)])
        e.hold = trio.Event()
        await e._put(0, b"a" * 10)
        await e._put(20, b"b" * 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.feed, 0, 30, sink)
            await trio.testing.wait_all_tasks_blocked()
            assert not got
            e.hold.set()
        assert got == [(0, b"a" * 10), (20, b"b" * 10)] and e.reached == 30

    trio.run(main)


def test_a_range_handed_over_whole_leaves_its_connection_open(
    image: dict, fault_proxy: FaultProxy
) -> None:
    """Once every byte an early range asked for is handed over, the rest of its answer (a
    multipart body's closing boundary) is read, not cut off: the next request goes on the
    same connection instead of paying a new one's handshake (a round trip or two)."""
    layer = image["layer"]
    [runs] = image["doc"].groups[0].requests[layer.digest]
    assert len(runs) > 1  # a multipart answer
    size = sum(end - start for start, end in runs)

    async def main(boundary_held: bool) -> None:
        got: list[tuple[int, bytes]] = []

        async def sink(at: int, piece: bytes) -> None:
            got.append((at, piece))

        src = RegistrySource(fault_proxy.host, REPO, plain_http=True)
        try:
            e = EarlyRange(layer.digest, runs[0][0], runs[-1][1], runs)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(e.fetch, src)
                await e.feed(runs[0][0], runs[-1][1], sink)
                assert sum(len(p) for _, p in got) == size
                if boundary_held:
                    await trio.to_thread.run_sync(fault_proxy.holding.wait, 10)
                    fault_proxy.unhold()
            await src.read_range(layer.digest, 0, 10)
        finally:
            await src.aclose()

    fault_proxy.match = "/blobs/"
    trio.run(main, False)
    assert len(fault_proxy.ports) == 2 and fault_proxy.ports[0] == fault_proxy.ports[1], (
        fault_proxy.ports
    )
    # The closing boundary held back until every range's bytes were handed over.
    body = fault_proxy.served[0][1]
    fault_proxy.reset()
    fault_proxy.match = "/blobs/"
    fault_proxy.hold_next(1, body - 20)
    trio.run(main, True)
    assert len(fault_proxy.ports) == 2 and fault_proxy.ports[0] == fault_proxy.ports[1], (
        fault_proxy.ports
    )
