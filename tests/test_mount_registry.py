"""Lazy mounts from the real docker-registry on loopback, through a counting fault proxy."""

# ruff: noqa: F811
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import (
    Item,
    make_lazy_layout,
    make_tar,
    sample_items,
    seeded_bytes,
)
from lazyfs.testing.mounts import lazyfs_cmd, mount_stats, mounted, run
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

SHARED = seeded_bytes(400_000, 42)


def _image(d: Path, name: str, extra: list[Item]) -> Path:
    base = make_tar(
        [*sample_items(), Item("shared", "dir", mode=0o755), Item("shared/lib.so", data=SHARED)]
    )
    make_lazy_layout(d / name, [base, make_tar(extra)])
    return d / name


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("images")
    a = _image(d, "a", [Item("app", "dir", mode=0o755), Item("app/a.txt", data=b"image a\n")])
    # Image b shares the base files but has its own base layer blob (another top layer and a
    # different file order in its base), so only chunk-level dedup can save the fetch.
    other_base = make_tar(
        [
            Item("shared", "dir", mode=0o755),
            Item("shared/lib.so", data=SHARED),
            Item("only-b", data=seeded_bytes(1000, 5)),
        ]
    )
    make_lazy_layout(d / "b", [other_base])
    push_oci_layout(a, f"{registry.host}/lazy/a:v1", tag="v1")
    push_oci_layout(d / "b", f"{registry.host}/lazy/b:v1", tag="v1")
    return {"a": "lazy/a:v1", "b": "lazy/b:v1"}


def _blob_requests(proxy: FaultProxy) -> int:
    return sum("/blobs/sha256:" in p for p in proxy.paths)


def test_remount_fetches_nothing(pushed: dict, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    ref = f"{fault_proxy.host}/{pushed['a']}"
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--cache", str(cache))
    with mounted(ref, mnt, *args):
        assert (mnt / "shared" / "lib.so").read_bytes() == SHARED
        assert (mnt / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)
        assert mount_stats(mnt)["layers"][0]["stats"]["requests"] > 0
    first = _blob_requests(fault_proxy)
    assert first > 0
    fault_proxy.reset()
    with mounted(ref, mnt, *args):
        assert (mnt / "shared" / "lib.so").read_bytes() == SHARED
        assert (mnt / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)
        assert all(layer["stats"]["requests"] == 0 for layer in mount_stats(mnt)["layers"])
    # The tag is resolved again (a manifest request), but no blob: TOCs and chunks are local.
    assert _blob_requests(fault_proxy) == 0, fault_proxy.paths


def test_shared_chunks_are_fetched_once_across_images(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(
        f"{fault_proxy.host}/{pushed['a']}",
        tmp_path / "ma",
        "--plain-http",
        "--read-only",
        "--cache",
        str(cache),
    ):
        assert (tmp_path / "ma" / "shared" / "lib.so").read_bytes() == SHARED
    with mounted(
        f"{fault_proxy.host}/{pushed['b']}",
        tmp_path / "mb",
        "--plain-http",
        "--read-only",
        "--cache",
        str(cache),
    ) as m:
        assert (m.mountpoint / "shared" / "lib.so").read_bytes() == SHARED
        layer = mount_stats(m.mountpoint)["layers"][0]["stats"]
        assert layer["requests"] == 0  # every chunk of lib.so came from image a's fetch
        assert layer["cache_hits"] > 0


def test_faults_give_right_bytes_or_eio(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    ref = f"{fault_proxy.host}/{pushed['a']}"
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--plain-http", "--read-only", "--cache", str(tmp_path / "c")):
        # transient faults are retried away
        fault_proxy.fail_next(2, 503)
        fault_proxy.drop_next(1)
        fault_proxy.truncate_next(1)
        assert (mnt / "etc" / "hostname").read_bytes() == b"lazyfs\n"
        fault_proxy.flip_next(1)  # one bit flip heals by refetching the chunk
        assert (mnt / "bin" / "tool").read_bytes() == seeded_bytes(10_000, 1)
        fault_proxy.ignore_range = True  # a registry that answers 200 with the whole blob
        with open(mnt / "data" / "big.bin", "rb") as f:
            f.seek(250_000)
            assert f.read(1000) == seeded_bytes(300_000, 2)[250_000:251_000]
        fault_proxy.ignore_range = False
    # persistent corruption (a fresh cache, so the bytes must come over the wire): the reader
    # sees EIO, never wrong bytes
    with mounted(ref, mnt, "--plain-http", "--read-only", "--cache", str(tmp_path / "c2")):
        fault_proxy.flip_next(1000)
        fd = os.open(mnt / "shared" / "lib.so", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, 0)
            assert exc.value.errno == 5
        finally:
            os.close(fd)
        fault_proxy.reset()
        assert (mnt / "shared" / "lib.so").read_bytes() == SHARED


def test_commit_writes_the_upper_layer(
    pushed: dict, registry: RegistryInstance, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"{registry.host}/{pushed['a']}",
        mnt,
        "--plain-http",
        "--upper",
        str(tmp_path / "up"),
        "--cache",
        str(tmp_path / "c"),
    ):
        (mnt / "app" / "new.txt").write_text("committed\n")
        os.unlink(mnt / "etc" / "hostname")
        res = run(*lazyfs_cmd("commit", str(mnt), str(tmp_path / "diff.tar")))
        assert res.returncode == 0, res.stderr
    names = subprocess.run(
        ["tar", "-tf", str(tmp_path / "diff.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "app/new.txt" in names and "etc/.wh.hostname" in names


def test_registry_ignoring_range_is_downloaded_once(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.ignore_range = True  # every blob request answers 200 with the whole blob
    mnt = tmp_path / "mnt"
    with mounted(
        f"{fault_proxy.host}/{pushed['a']}",
        mnt,
        "--plain-http",
        "--read-only",
        "--cache",
        str(tmp_path / "c"),
    ):
        before = _blob_requests(fault_proxy)  # the footers and TOCs, read at mount
        for path, want in [
            ("data/big.bin", seeded_bytes(300_000, 2)),
            ("shared/lib.so", SHARED),
            ("bin/tool", seeded_bytes(10_000, 1)),
            ("etc/hostname", b"lazyfs\n"),
        ]:
            assert (mnt / path).read_bytes() == want
        for p in sorted(mnt.rglob("*")):  # and every other file, in path order
            if p.is_file() and not p.is_symlink():
                p.read_bytes()
        layers = mount_stats(mnt)["layers"]
    # Reading the footers at mount found each blob sent whole: one download of each, begun
    # then, serves every later read, so the reads ask the registry for nothing more.
    assert _blob_requests(fault_proxy) == before, fault_proxy.paths
    assert before <= 1 + 2 * len(layers)  # the config; per layer a dropped answer, a download
    assert not list((tmp_path / "c" / "blobs").glob("*"))  # the spool is gone at unmount
