"""The unmount's drain (LayerStore.drain) bounds what a reader started, not only the prefetch:
a read-ahead stalled at the unmount keeps the daemon no longer than about UNMOUNT_DRAIN (the
snapshotter waits STOP_WAIT, 2 s, for a daemon being stopped)."""

# ruff: noqa: F811
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.ocilayout import Layout
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted, run, start_mount
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

BIG = seeded_bytes(12 * 1024 * 1024, 83)  # beyond the store's 8 MiB read-ahead pipeline


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("drain")
    items = [Item("big.bin", data=BIG), Item("small", data=b"small")]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/drain/app:v1", tag="v1")
    return {"dir": d, "ref": f"{registry.host}/drain/app:v1"}


def test_an_unmount_waits_for_a_stalled_read_ahead_only_so_long(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = Layout(pushed["dir"] / "lazy").manifest("v1").layers[0].digest
    ref = pushed["ref"].replace(pushed["ref"].split("/")[0], fault_proxy.host, 1)
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-deltas", "--no-prefetch")
    args += ("--cache", str(tmp_path / "c"), "--read-timeout", "8")
    with mounted(ref, mnt, *args) as m:
        # The file's start and its read-ahead (8 MiB on) cached: below, a sequential reader
        # reads from the cache while its read-ahead asks for what lies beyond.
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            assert os.pread(fd, 4096, 0) == BIG[:4096]
        finally:
            os.close(fd)
        deadline = time.monotonic() + 20
        while any(la["stats"].get("bytes_unwritten") or la["stats"].get("inflight")
                  for la in mount_stats(mnt)["layers"]):  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
    fault_proxy.reset()
    fault_proxy.match = layer
    fault_proxy.rate = 200_000  # bytes/s: the read-ahead's 3.7 MB take ~18 s
    m = start_mount(ref, mnt, *args)
    try:
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            got = b""
            while len(got) < 2 << 20:
                got += os.pread(fd, 128 * 1024, len(got))
            assert got == BIG[: len(got)]
        finally:
            os.close(fd)
        deadline = time.monotonic() + 10
        while not any("/blobs/" in p for p in fault_proxy.paths):
            assert time.monotonic() < deadline, "no read-ahead was asked for"
            time.sleep(0.02)
        time.sleep(0.3)  # on its way
        t0 = time.monotonic()
        assert run("fusermount3", "-u", str(mnt)).returncode == 0
        m.wait(30)
        took = time.monotonic() - t0
    finally:
        m.stop()
    assert fault_proxy.paths, "the read-ahead was not asked for"
    assert took < 5.0, (took, fault_proxy.ranges)
