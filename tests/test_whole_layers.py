"""Images whose layers have no TOC (plain gzip, zstd, tar) mount too: each such layer is
fetched whole (in the background: tests/test_background_layers.py), verified against its digest
and diff_id, indexed once into the cache, and a later mount of it fetches nothing.  Against the
real registry."""

# ruff: noqa: F811
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.fs.daemon import Daemon
from lazyfs.fs.unmount import is_mounted
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

BIG = seeded_bytes(9 * 1024 * 1024 + 123, 9)  # three index chunks


def _base() -> bytes:
    return make_tar(
        [
            Item("etc", "dir", mode=0o755),
            Item("etc/hostname", data=b"whole\n"),
            Item("etc/gone", data=b"deleted above\n"),
            Item("bin", "dir", mode=0o755),
            Item("bin/tool", data=seeded_bytes(10_000, 1), mode=0o755),
            Item("data", "dir", mode=0o700, uid=1000, gid=1000),
            Item("data/big.bin", data=BIG),
            Item("data/empty", data=b""),
            Item("link", "symlink", link="etc/hostname"),
            Item("bin/hard", "hardlink", link="bin/tool"),
        ]
    )


def _top() -> bytes:
    return make_tar(
        [Item("etc", "dir", mode=0o755), Item("etc/.wh.gone"), Item("top.txt", data=b"top\n")]
    )


def _check(mnt: Path) -> None:
    assert (mnt / "etc" / "hostname").read_bytes() == b"whole\n"
    assert (mnt / "data" / "big.bin").read_bytes() == BIG
    assert (mnt / "bin" / "hard").read_bytes() == seeded_bytes(10_000, 1)
    assert os.readlink(mnt / "link") == "etc/hostname"
    assert (mnt / "data" / "empty").read_bytes() == b""
    assert not (mnt / "etc" / "gone").exists()  # the upper layer's whiteout
    assert (mnt / "top.txt").read_bytes() == b"top\n"
    st = (mnt / "data").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1000, 0o700)


def _blob_gets(proxy: FaultProxy) -> list[str]:
    return [p for p in proxy.paths if "/blobs/sha256:" in p]


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
def test_a_plain_image_mounts_and_a_remount_fetches_nothing(
    kind: str, registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    make_layout(tmp_path / "img", [_base(), _top()], kind=kind, tag="v1")
    push_oci_layout(tmp_path / "img", f"{registry.host}/whole/{kind}:v1", tag="v1")
    ref = f"{fault_proxy.host}/whole/{kind}:v1"
    cache = str(tmp_path / "cache")
    args = ("--plain-http", "--read-only", "--cache", cache, "--no-prefetch")
    with mounted(ref, tmp_path / "m1", *args) as m:
        _check(m.mountpoint)
    # The config; per layer, its footer (to learn it has no TOC) and one whole download.
    assert len(_blob_gets(fault_proxy)) <= 1 + 2 * 2, fault_proxy.paths
    fault_proxy.reset()
    with mounted(ref, tmp_path / "m2", *args) as m:
        _check(m.mountpoint)
        stats = json.loads(run(*lazyfs_cmd("stats", str(m.mountpoint), "--json")).stdout)
        assert all(layer["stats"]["requests"] == 0 for layer in stats["layers"])
    assert _blob_gets(fault_proxy) == []  # TOCs and chunks are in the cache
    assert not list((tmp_path / "cache" / "blobs").glob("*"))  # the local tars are gone


def test_lazy_and_plain_layers_mix(registry: RegistryInstance, tmp_path: Path) -> None:
    make_layout(tmp_path / "lazy-src", [_base()], kind="gzip", tag="v1")
    convert(f"oci:{tmp_path / 'lazy-src'}:v1", f"oci:{tmp_path / 'lazy'}:v1")
    # A plain gzip layer on top of the converted one, in one image.
    from lazyfs.ocilayout import Layout

    lazy = Layout(tmp_path / "lazy")
    manifest = lazy.manifest("v1")
    make_layout(tmp_path / "plain", [_top()], kind="gzip", tag="v1")
    plain = Layout(tmp_path / "plain")
    top = plain.manifest("v1").layers[0]
    lazy.write_blob(plain.read_blob(top.digest))
    config = json.loads(lazy.read_blob(manifest.config.digest))
    top_config = json.loads(plain.read_blob(plain.manifest("v1").config.digest))
    config["rootfs"]["diff_ids"] += top_config["rootfs"]["diff_ids"]
    cdesc = lazy.write_blob(json.dumps(config).encode())
    doc = json.loads(lazy.read_blob(lazy.find("v1").digest))
    doc["config"] = {**doc["config"], "digest": cdesc.digest, "size": cdesc.size}
    doc["layers"].append({"mediaType": top.mediaType, "digest": top.digest, "size": top.size})
    digest, size = lazy.put_json(doc)
    lazy.write_top([{"mediaType": doc["mediaType"], "digest": digest, "size": size,
                     "annotations": {"org.opencontainers.image.ref.name": "v1"}}])  # fmt: skip
    push_oci_layout(tmp_path / "lazy", f"{registry.host}/whole/mixed:v1", tag="v1")
    ref = f"{registry.host}/whole/mixed:v1"
    with mounted(ref, tmp_path / "m", "--plain-http", "--read-only", "--cache",
                 str(tmp_path / "c")) as m:  # fmt: skip
        _check(m.mountpoint)
        assert (m.ready.layers, m.ready.plain) == (2, [top.mediaType])  # told with "ready"
    r = run(*lazyfs_cmd("inspect", ref, "--plain-http"))
    assert r.returncode == 0, r.stderr
    heads = [line for line in r.stdout.splitlines() if line.startswith("# layer")]
    assert len(heads) == 2
    assert "zstd:chunked" in heads[0] and "lazy" in heads[0]
    assert "NOT LAZY" in heads[1]


def _mount_cmd(ref: str, mnt: Path, cache: Path) -> tuple[Daemon, str]:
    """``lazyfs mount`` as a user runs it (it forks its daemon): the daemon and the stderr."""
    mnt.mkdir()
    r = run(*lazyfs_cmd("mount", ref, str(mnt), "--plain-http", "--read-only", "--cache",
                        str(cache), "--no-prefetch"), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return Daemon(int(r.stdout.rsplit("(pid ", 1)[1].rstrip(")\n")), mnt), r.stderr


def test_mount_says_which_layers_are_not_lazy_and_shows_their_download(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    make_layout(tmp_path / "img", [_base(), _top()], kind="gzip", tag="v1")
    push_oci_layout(tmp_path / "img", f"{registry.host}/whole/told:v1", tag="v1")
    ref = f"{registry.host}/whole/told:v1"
    from lazyfs.ocilayout import Layout

    sizes = {d.digest: d.size for d in Layout(tmp_path / "img").manifest("v1").layers}
    daemon, err = _mount_cmd(ref, tmp_path / "m1", tmp_path / "c")
    try:
        lines = err.splitlines()
        # One line as each download starts (in the background: the mount is ready before).
        assert sum("has" not in x and x.endswith(": fetching it whole") for x in lines) == 2, err
        told = [x for x in lines if "not lazy" in x]
        assert told == [
            f"lazyfs: 2 of 2 layers of {ref} are plain (tar+gzip), not lazy: fetched whole "
            "in the background, what needs them waits (once: the cache keeps them; `lazyfs "
            "stats` shows the download); `lazyfs convert` makes them lazy, and `skopeo copy "
            "--preserve-digests` keeps them lazy when pushed"
        ], err
        _check(daemon.mountpoint)  # waits for both layers
        stats = json.loads(run(*lazyfs_cmd("stats", str(daemon.mountpoint), "--json")).stdout)
        whole = {layer["digest"]: layer["whole"] for layer in stats["layers"]}
        assert {d: w["size"] for d, w in whole.items()} == sizes
        assert all(w["seconds"] >= 0 for w in whole.values())
        table = run(*lazyfs_cmd("stats", str(daemon.mountpoint))).stdout
        assert table.count("fetched whole: ") == 2, table
    finally:
        daemon.stop()
    assert not is_mounted(str(tmp_path / "m1"))
    # Indexed in the cache: the next mount downloads nothing, but still says they are plain.
    daemon, err = _mount_cmd(ref, tmp_path / "m2", tmp_path / "c")
    try:
        _check(daemon.mountpoint)
        assert "fetching it whole" not in err and "2 of 2 layers" in err, err
    finally:
        daemon.stop()
    assert not is_mounted(str(tmp_path / "m2"))
