"""Deterministic sample layers and OCI layouts for tests: every entry type, real bytes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard
from lazyfs_tools.convert import convert

from lazyfs.ocilayout import Layout

MTIME = 1_700_000_000


@dataclass
class Item:
    name: str
    type: str = "reg"  # reg dir symlink hardlink char block fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    mtime: float = MTIME


_TAR_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def seeded_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tar(items: list[Item], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for it in items:
            info = tarfile.TarInfo(it.name)
            info.type = _TAR_TYPES[it.type]
            info.mode = it.mode
            info.uid, info.gid = it.uid, it.gid
            info.uname, info.gname = ("root" if it.uid == 0 else f"u{it.uid}"), "root"
            info.mtime = it.mtime
            info.linkname = it.link
            info.devmajor, info.devminor = it.major, it.minor
            if it.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in it.xattrs.items()}
            if it.type == "reg":
                info.size = len(it.data)
                tf.addfile(info, io.BytesIO(it.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def sample_items(big: int = 300_000) -> list[Item]:
    """One of each entry type, odd sizes, a long name, xattrs, a multi-chunk file."""
    long_dir = "deep/" + "/".join(["d" * 60] * 3)
    return [
        Item("etc", "dir", mode=0o755),
        Item("etc/hostname", data=b"lazyfs\n"),
        Item("etc/empty", data=b""),
        Item("etc/secret", data=b"s3cret\n", mode=0o600, uid=1000, gid=1000),
        Item("bin", "dir", mode=0o755),
        Item("bin/tool", data=seeded_bytes(10_000, 1), mode=0o4755),
        Item("bin/link-to-tool", "symlink", link="tool", mode=0o777),
        Item("bin/hard-tool", "hardlink", link="bin/tool", mode=0o4755),
        Item("data", "dir", mode=0o1777),
        Item("data/big.bin", data=seeded_bytes(big, 2)),
        Item("data/zeros.bin", data=bytes(200_000)),
        Item("data/attrs", data=b"with xattrs\n", xattrs={"user.color": "blue", "user.n": "1"}),
        Item("dev", "dir", mode=0o755),
        Item("dev/null", "char", mode=0o666, major=1, minor=3),
        Item("dev/sda", "block", mode=0o660, major=8, minor=0),
        Item("dev/pipe", "fifo", mode=0o644),
        Item("deep", "dir", mode=0o755),
        Item(long_dir, "dir", mode=0o755),
        Item(long_dir + "/" + "f" * 200, data=b"long name\n"),
        Item("utf8-ünïcode ✓.txt", data=b"unicode\n", mtime=MTIME + 0.5),
    ]


def compress(tar: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(tar, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


_MT = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "tar": "application/vnd.oci.image.layer.v1.tar",
}


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    d = Layout(layout).write_blob(data)
    return d.digest, d.size


def put_image(
    layout: Layout, layers: list[dict[str, object]], diff_ids: list[str], arch: str = "amd64"
) -> dict[str, object]:
    """Store the config and manifest of an image whose layer blobs (``layers``: their
    descriptors) are in ``layout`` already; the manifest's descriptor."""
    cd, cn = layout.put_json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    md, mn = layout.put_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cd,
                "size": cn,
            },
            "layers": layers,
        }
    )
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn}


def _manifest(
    layout: Path,
    tars: list[bytes],
    kind: str,
    arch: str,
    mutate: Callable[[bytes], bytes],
    media_type: str | None,
) -> dict[str, object]:
    layers: list[dict[str, object]] = []
    diff_ids = []
    for t in tars:
        blob = mutate(compress(t, kind))
        d, n = _put(layout, blob)
        layers.append({"mediaType": media_type or _MT[kind], "digest": d, "size": n})
        diff_ids.append("sha256:" + hashlib.sha256(t).hexdigest())
    desc = put_image(Layout(layout), layers, diff_ids, arch)
    return {**desc, "platform": {"architecture": arch, "os": "linux"}}


def make_layout(
    layout: Path,
    tars: list[bytes],
    *,
    kind: str = "gzip",
    tag: str = "latest",
    platforms: tuple[str, ...] = ("amd64",),
    mutate: Callable[[bytes], bytes] = lambda b: b,
    media_type: str | None = None,
) -> Path:
    """Write an OCI layout holding one image (or an index of several platforms) of ``tars``."""
    Layout(layout).init()
    descs = [_manifest(layout, tars, kind, arch, mutate, media_type) for arch in platforms]
    if len(descs) == 1:
        top = descs[0]
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": descs,
        }
        d, n = _put(layout, json.dumps(index, sort_keys=True).encode())
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": n}
    top = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
    top.pop("platform", None)
    Layout(layout).write_top([top])
    return layout


CHUNK = 64 * 1024  # make_lazy_layout's chunks: small, so that a test's few files span several


def make_lazy_layout(
    dst: Path, tars: list[bytes], *, tag: str = "v1", kind: str = "gzip", chunk_size: int = CHUNK
) -> Path:
    """An image of ``tars`` converted for lazy pulling (zstd:chunked) into the OCI layout
    ``dst``, tagged ``tag``; the source layout (``kind`` layers) stays beside it as DST-src."""
    src = dst.with_name(f"{dst.name}-src")
    make_layout(src, tars, kind=kind, tag=tag)
    convert(f"oci:{src}:{tag}", f"oci:{dst}:{tag}", chunk_size=chunk_size)
    return dst
