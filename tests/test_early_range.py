"""A re-laid-out layer's start-up range (``lazyfs convert --prefetch``'s annotation) requested
beside its TOC on a cold mount, its chunks verified against the TOC once it is decoded."""

# ruff: noqa: F811
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.ocilayout import Layout
from lazyfs.opener import _Early, _known, _remember, _tag_file, warm_connections
from lazyfs.remote.base import Source
from lazyfs.remote.registry import RegistrySource
from lazyfs.store.earlyrange import MAX_EARLY_BYTES, EarlyRange, early_range
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted, startup_groups, wait_prefetched
from lazyfs.testing.server import refusing_port
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

FILES = {f"app/f{i:02d}.bin": seeded_bytes(150_000, 700 + i) for i in range(12)}
USED = ["app/f09.bin", "app/f02.bin", "app/f05.bin"]
KEY = oci.ANN_LAZYFS_PREFETCH_RANGE


@pytest.fixture(scope="module")
def relaid(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("early")
    items = [Item("app", "dir", mode=0o755), *(Item(n, data=b) for n, b in FILES.items())]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    src = Layout(d / "src")
    groups = d / "groups.json"
    groups.write_bytes(
        startup_groups(
            "early/app", src.find("v1").digest, src.manifest("v1").layers[0].digest, FILES, USED
        )
    )
    convert(
        f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024, prefetch=str(groups)
    )
    layer = Layout(d / "lazy").manifest("v1").layers[0]
    push_oci_layout(d / "lazy", f"{registry.host}/early/app:v1", tag="v1")
    return {"dir": d / "lazy", "layer": layer, "repo": "early/app"}


def _read_used(mnt: Path) -> dict:
    for name in USED:
        assert (mnt / name).read_bytes() == FILES[name]
    stats: dict = mount_stats(mnt)["layers"][0]["stats"]
    return stats


def test_convert_writes_the_range_and_a_cold_mount_asks_for_it_beside_the_toc(
    relaid: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = relaid["layer"]
    offset, length = map(int, layer.annotations[KEY].split(":"))
    # The group's three files (450 kB) first, then the landmark: the range covers them.
    assert offset == 0 and 450_000 // 2 < length < layer.size
    early = f"bytes=0-{length - 1}"
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.2  # every answer held: what overlaps the TOC's transfer shows
    ref = f"{fault_proxy.host}/{relaid['repo']}:v1"
    args = ("--plain-http", "--read-only", "--cache", str(tmp_path / "c"))
    with mounted(ref, tmp_path / "mnt", *args) as m:
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert not pf["error"]
        stats = _read_used(m.mountpoint)
        assert stats["cache_misses"] == 0 and stats["integrity_errors"] == 0
    # Asked for before the TOC's answer came back; nothing else of the blob after it.
    before = fault_proxy.ranges_before_first_answer(layer.digest)
    assert early in before and len(before) == 2, before
    assert len(fault_proxy.blob_requests(layer.digest)) == 2, fault_proxy.ranges


def test_range_bytes_that_do_not_verify_are_fetched_again(
    relaid: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = relaid["layer"]
    length = int(layer.annotations[KEY].split(":")[1])
    fault_proxy.flip_range = f"bytes=0-{length - 1}"  # the early range's answer is damaged
    ref = f"{fault_proxy.host}/{relaid['repo']}:v1"
    args = ("--plain-http", "--read-only", "--cache", str(tmp_path / "c"))
    with mounted(ref, tmp_path / "mnt", *args) as m:
        wait_prefetched(m.mountpoint)
        stats = _read_used(m.mountpoint)
        assert stats["integrity_errors"] > 0 and stats["retries"] > 0
    # Each damaged chunk fetched once more, alone.
    assert len(fault_proxy.blob_requests(layer.digest)) > 3


def _retag(layout: Path, tag: str, value: str | None) -> None:
    """``v1`` again as ``tag``, its layer's range annotation ``value`` (None: none)."""
    lay = Layout(layout)
    doc = json.loads(lay.read_blob(lay.find("v1").digest))
    ann = doc["layers"][0]["annotations"]
    ann.pop(KEY)
    if value is not None:
        ann[KEY] = value
    new = lay.write_blob(json.dumps(doc).encode())
    tops = json.loads((layout / "index.json").read_text())["manifests"]
    top = {"mediaType": oci.MT_OCI_MANIFEST, "digest": new.digest, "size": new.size}
    lay.write_top([*tops, {**top, "annotations": {oci.ANN_REF_NAME: tag}}])


def test_hostile_or_missing_annotations_are_ignored(
    relaid: dict, registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = relaid["layer"]
    cases = {
        "none": None,
        "garbage": "soon:please",
        "past": f"0:{layer.size + 1}",
        "huge": f"0:{MAX_EARLY_BYTES + 1}",
    }
    for tag, value in cases.items():
        _retag(relaid["dir"], tag, value)
        push_oci_layout(relaid["dir"], f"{registry.host}/{relaid['repo']}:{tag}", tag=tag)
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.1
    for tag in cases:
        fault_proxy.reset()
        fault_proxy.match = "/v2/"
        fault_proxy.delay = 0.1
        ref = f"{fault_proxy.host}/{relaid['repo']}:{tag}"
        args = ("--plain-http", "--read-only", "--cache", str(tmp_path / f"c-{tag}"))
        with mounted(ref, tmp_path / "mnt", *args) as m:
            wait_prefetched(m.mountpoint)
            _read_used(m.mountpoint)
        # As before: only the TOC's request until it is answered.
        assert len(fault_proxy.ranges_before_first_answer(layer.digest)) == 1, tag


def test_early_range_parses_only_a_range_inside_the_blob() -> None:
    def desc(value: str | None, size: int = 1000) -> oci.Descriptor:
        ann = {KEY: value} if value is not None else None
        return oci.Descriptor(mediaType="", digest="sha256:" + "0" * 64, size=size, annotations=ann)

    assert early_range(desc("0:600")) == (0, 600)
    assert early_range(desc("100:900")) == (100, 1000)
    for bad in (None, "", "600", "a:b", "-1:10", "0:0", "0:-5", "0:1001", "500:501", "1:2:3"):
        assert early_range(desc(bad)) is None, bad
    assert early_range(desc(f"0:{MAX_EARLY_BYTES + 1}", size=2 * MAX_EARLY_BYTES)) is None


def test_the_ranges_an_image_holds_at_once_are_bounded_together() -> None:
    """Each layer's range is held in memory until the TOCs are decoded: a manifest annotating
    many layers with a range each just under the bound must not add up to gigabytes."""
    asked: list[str] = []

    class Stalled:  # the registry never answers: every range asked for stays held
        name = "stalled"

        async def stream_ranges(self, digest: str, *_: Any) -> None:
            asked.append(digest)
            await trio.sleep_forever()

    size = MAX_EARLY_BYTES // 2
    layers = [
        oci.Descriptor(
            mediaType=oci.MT_LAYER_ZSTD,
            digest=f"sha256:{i:064x}",
            size=2 * size,
            annotations={oci.ANN_LAZYFS_PREFETCH_RANGE: f"0:{size}"},
        )
        for i in range(5)
    ]
    held: list[EarlyRange] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            early = _Early(nursery, cast(Source, Stalled()), None)
            for desc in layers:
                early.toc_sent(desc)
            held.extend(e for es in early.ranges.values() for e in es)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sum(e.end - e.start for e in held) <= MAX_EARLY_BYTES
    assert sorted(asked) == [d.digest for d in layers[:2]]  # tasks start in any order


def _manifest_answered_after_v2_asked(proxy: FaultProxy) -> bool:
    """Whether ``GET /v2/`` (the connection warmed) arrived before the manifest's answer left."""
    v2 = next(i for i, ev in enumerate(proxy.events) if ev[:2] == ("in", "/v2/"))
    out = next(i for i, ev in enumerate(proxy.events) if ev[0] == "out" and "/manifests/" in ev[1])
    return v2 < out


def test_a_cold_mount_warms_connections_while_the_manifest_travels(
    relaid: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.2  # the manifest's answer held: the warming overlaps it
    ref = f"{fault_proxy.host}/{relaid['repo']}:v1"
    args = ("--plain-http", "--read-only", "--cache", str(tmp_path / "c"))
    with mounted(ref, tmp_path / "mnt", *args) as m:
        _read_used(m.mountpoint)
    warm = warm_connections(early_ranges=True, referrers=True)  # a mount's defaults
    assert fault_proxy.paths.count("/v2/") == warm, fault_proxy.paths
    assert _manifest_answered_after_v2_asked(fault_proxy), fault_proxy.events
    # Warm: the manifest is known, its TOC kept: nothing goes beside it, nothing is warmed.
    fault_proxy.reset()
    with mounted(ref, tmp_path / "mnt", *args) as m:
        _read_used(m.mountpoint)
    assert "/v2/" not in fault_proxy.paths and fault_proxy.paths, fault_proxy.paths


def test_warming_a_connection_that_fails_is_only_logged() -> None:
    async def main(port: int) -> None:
        source = RegistrySource(f"127.0.0.1:{port}", "nobody/here", plain_http=True)
        try:
            await source.preconnect()  # refused: logged, not raised
        finally:
            await source.aclose()

    with refusing_port() as port:
        trio.run(main, port)


def test_a_damaged_tag_file_makes_a_cold_open_and_is_written_again(tmp_path: Path) -> None:
    """The tag's last digest is a hint kept in the cache: bytes that are no text (a torn or
    overwritten file) must not end the open; the next ``_remember`` writes it again."""
    image, digest = "127.0.0.1:5000/some/repo:v1", "sha256:" + "ab" * 32
    (tmp_path / oci.check_digest(digest)).write_bytes(b"{}")  # the manifest is cached
    _tag_file(tmp_path, image).write_bytes(b"\xff\xfe not utf-8")
    assert not _known(tmp_path, image)
    resolved = cast(Any, type("Resolved", (), {"index_digest": None, "manifest_digest": digest}))
    _remember(tmp_path, image, resolved)
    assert _known(tmp_path, image)
