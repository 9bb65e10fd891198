"""The whole loop on the real registry: trace a workload, optimize, then mounts prefetch by
themselves, from groups stored beside the image or from a re-laid-out image's landmarks."""

# ruff: noqa: F811
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.ocilayout import Layout
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import (
    lazyfs_cmd,
    mount_stats,
    mounted,
    run,
    start_mount,
    startup_groups,
    wait_prefetched,
)
from lazyfs.testing.rootfs import host_rootfs_items
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

FILES = {f"app/m{i:02d}.bin": seeded_bytes(200_000, 300 + i) for i in range(24)}
WORKLOAD = ["/bin/sh", "-c", "cat /app/m17.bin /app/m03.bin /app/m11.bin > /dev/null"]
USED = ["app/m17.bin", "app/m03.bin", "app/m11.bin"]


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pipeline")
    items = [*host_rootfs_items(), Item("app", "dir", mode=0o755)]
    items += [Item(name, data=data) for name, data in FILES.items()]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/pipe/app:v1", tag="v1")
    return {"dir": d, "ref": f"{registry.host}/pipe/app:v1"}


def _read_used(mnt: Path) -> dict:
    for name in USED:
        assert (mnt / name).read_bytes() == FILES[name]
    return mount_stats(mnt)["layers"][0]["stats"]


def test_trace_optimize_push_then_mounts_prefetch(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    ref = pushed["ref"]
    res = run(
        *lazyfs_cmd(
            "trace",
            "run",
            ref,
            "--plain-http",
            "--group",
            "app",
            "--out",
            str(tmp_path / "t.json"),
            "--",
            *WORKLOAD,
        )
    )
    assert res.returncode == 0, res.stderr
    trace = json.loads((tmp_path / "t.json").read_text())
    paths = [f["path"] for f in trace["files"]]
    assert [p for p in paths if p.startswith("app/")] == USED
    res = run(
        *lazyfs_cmd(
            "optimize",
            str(tmp_path / "t.json"),
            "--out",
            str(tmp_path / "groups.json"),
            "--push",
            ref,
            "--plain-http",
        )
    )
    assert res.returncode == 0, res.stderr

    # A plain mount finds the groups beside the image and fetches them before they are read.
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--plain-http", "--read-only", "--cache", str(tmp_path / "c1")):
        pf = wait_prefetched(mnt)["prefetch"]
        assert pf["group"] == "app" and pf["entries"] >= len(USED) and not pf["error"]
        stats = _read_used(mnt)
        assert stats["cache_misses"] == 0 and stats["wait_ns"] == 0
    # The groups found are kept with the documents: a mount of the image with that cache
    # (chunks evicted: a fresh cache holding only them here) starts its prefetch at once,
    # asking the registry for no referrers (--no-deltas: deltas are looked up there too).
    kept = list((tmp_path / "c1" / "documents").glob("groups-of-*"))
    assert len(kept) == 1
    (tmp_path / "c4" / "documents").mkdir(parents=True)
    (tmp_path / "c4" / "documents" / kept[0].name).write_bytes(kept[0].read_bytes())
    proxied = ref.replace(ref.split("/")[0], fault_proxy.host, 1)
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c4"))
    with mounted(proxied, mnt, *args):
        pf = wait_prefetched(mnt)["prefetch"]
        assert pf["group"] == "app" and pf["entries"] >= len(USED) and not pf["error"]
        stats = _read_used(mnt)
        assert stats["cache_misses"] == 0
    assert not [p for p in fault_proxy.paths if "referrers" in p or "sha256-" in p]
    # --no-prefetch: the same reads wait for the network.
    with mounted(
        ref, mnt, "--plain-http", "--read-only", "--no-prefetch", "--cache", str(tmp_path / "c2")
    ):
        assert mount_stats(mnt).get("prefetch") is None
        stats = _read_used(mnt)
        assert stats["cache_misses"] > 0

    # Re-laid out: the group comes first in the layer, and a mount of the new image prefetches
    # up to the landmark with no groups document at all.
    d = pushed["dir"]
    convert(
        f"oci:{d / 'src'}:v1",
        f"oci:{tmp_path / 'relaid'}:v2",
        chunk_size=64 * 1024,
        prefetch=str(tmp_path / "groups.json"),
    )
    host = ref.split("/")[0]
    push_oci_layout(tmp_path / "relaid", f"{host}/pipe/relaid:v2", tag="v2")
    with mounted(
        f"{host}/pipe/relaid:v2",
        mnt,
        "--plain-http",
        "--read-only",
        "--cache",
        str(tmp_path / "c3"),
    ):
        pf = wait_prefetched(mnt)["prefetch"]
        assert pf["group"] == "landmark" and pf["entries"] >= len(USED)
        layer = mount_stats(mnt)["layers"][0]["stats"]
        assert layer["requests"] <= 2  # one contiguous range per layer
        stats = _read_used(mnt)
        assert stats["cache_misses"] == 0 and stats["wait_ns"] == 0

    # --prefetch-from picks one source.  Stored groups only: the relaid image has none yet.
    relaid = f"{host}/pipe/relaid:v2"
    _check_source(relaid, "groups", None, mnt, tmp_path)
    # Now groups stored beside it too (the same trace, as if recorded on it).
    relaid_layout = Layout(tmp_path / "relaid")
    trace["manifest"] = relaid_layout.find("v2").digest
    trace["layers"] = [layer.digest for layer in relaid_layout.manifest("v2").layers]
    (tmp_path / "t2.json").write_text(json.dumps(trace))
    res = run(*lazyfs_cmd("optimize", str(tmp_path / "t2.json"), "--out",
                          str(tmp_path / "g2.json"), "--push", relaid, "--plain-http"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    _check_source(relaid, "auto", "app", mnt, tmp_path)  # stored groups first
    _check_source(relaid, "landmark", "landmark", mnt, tmp_path)  # groups there, not asked for


def _check_source(image: str, source: str, group: str | None, mnt: Path, tmp: Path) -> None:
    """A mount with ``--prefetch-from source`` prefetches ``group`` (None: nothing)."""
    cache = tmp / f"cache-{source}"
    with mounted(image, mnt, "--plain-http", "--read-only", "--prefetch-from", source,
                 "--cache", str(cache)):  # fmt: skip
        if group is None:
            time.sleep(0.5)  # time enough to have started one
            assert mount_stats(mnt).get("prefetch") is None
        else:
            assert wait_prefetched(mnt)["prefetch"]["group"] == group, (image, source)


def test_an_unmount_lets_the_prefetch_on_its_way_land(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A daemon unmounted while its prefetch's request streams keeps what that request
    brings (it lands within serve.UNMOUNT_DRAIN): the next mount of the cache fetches none
    of it.  Cancelled at once, the request's rest was fetched again by that next mount."""
    layout = Layout(pushed["dir"] / "lazy")
    layer = layout.manifest("v1").layers[0].digest
    groups = tmp_path / "groups.json"
    groups.write_bytes(startup_groups("pipe/app", layout.find("v1").digest, layer, FILES, USED))
    ref = pushed["ref"].replace(pushed["ref"].split("/")[0], fault_proxy.host, 1)
    cache, mnt = tmp_path / "c", tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(cache))
    with mounted(ref, mnt, *args, "--no-prefetch"):
        pass  # the TOC is cached: below, the prefetch's is the layer's only request
    fault_proxy.reset()
    fault_proxy.match = layer
    fault_proxy.hold_next(1, at=50_000)  # a third of the first file's chunks
    m = start_mount(ref, mnt, *args, "--prefetch", str(groups))
    try:
        assert fault_proxy.holding.wait(10), fault_proxy.paths
        res = run("fusermount3", "-u", str(mnt))
        assert res.returncode == 0, res.stderr
        time.sleep(0.2)  # the daemon sees the unmount while the answer is held
        fault_proxy.unhold()
        assert m.wait(10)
    finally:
        fault_proxy.unhold()
        m.stop()
    assert len(fault_proxy.served) == 1, fault_proxy.ranges
    fault_proxy.reset()
    fault_proxy.match = layer
    with mounted(ref, mnt, *args, "--no-prefetch"):
        stats = _read_used(mnt)
    assert fault_proxy.served == [] and stats["cache_misses"] == 0, fault_proxy.ranges


def test_an_unmount_waits_for_a_stalled_prefetch_only_so_long(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The drain is bounded: a daemon whose prefetch's answer stalls exits within about
    UNMOUNT_DRAIN of its unmount, not after the read timeout (30 s)."""
    layout = Layout(pushed["dir"] / "lazy")
    layer = layout.manifest("v1").layers[0].digest
    groups = tmp_path / "groups.json"
    groups.write_bytes(startup_groups("pipe/app", layout.find("v1").digest, layer, FILES, USED))
    ref = pushed["ref"].replace(pushed["ref"].split("/")[0], fault_proxy.host, 1)
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(ref, mnt, *args, "--no-prefetch"):
        pass  # the TOC is cached: below, the prefetch's is the layer's only request
    fault_proxy.reset()
    fault_proxy.match = layer
    fault_proxy.stall_next(1)
    m = start_mount(ref, mnt, *args, "--prefetch", str(groups))
    try:
        deadline = time.monotonic() + 10
        while layer not in "".join(fault_proxy.paths) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # its first half sent, the rest stalled
        t0 = time.monotonic()
        assert run("fusermount3", "-u", str(mnt)).returncode == 0
        assert m.wait(10)
        assert time.monotonic() - t0 < 5.0
    finally:
        m.stop()
