"""Test images, built reproducibly and cached in ``.bench/images/NAME/`` between runs.

Each image exists as three OCI layouts tagged ``bench``: ``gzip/`` (plain, what a full pull
fetches), ``zstd/`` (``lazyfs convert``, zstd:chunked) and ``estargz/`` (``ctr-remote image
convert --estargz --oci`` in a private containerd; ``lazyfs convert --format estargz`` only if
that fails, recorded in ``meta.json``), plus ``rootfs/`` (the extracted tree, for native
baselines).  ``meta.json`` is written last and marks the image complete.

- ``syn1k`` / ``syn10k`` / ``syn100k``: seeded synthetic trees; log-normal file sizes (median
  2 KiB, sigma 1.5, capped at 1 MiB; 512 B median for 100k), mixed compressibility.
- ``bigfile``: one 64 MiB incompressible file (the ``read`` scenario).
- ``debian``: ``debootstrap --variant=minbase --include=python3 bookworm`` with the machine's
  apt mirror (apt lists and .deb cache dropped, /dev empty, as in Debian's own images); if
  debootstrap cannot work here, the host-Python sample image (lazyfs/testing/sample.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, FileSpec, MiB, log, write_tar

IMAGES_DIR = BENCH_DIR / "images"
TAG = "bench"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
WORKLOAD = (
    "import json, email.parser, http.client, sqlite3, decimal, asyncio, "
    "xml.etree.ElementTree, argparse, logging, unittest, csv, zipfile; print(1)"
)
# The synthetic images' "start-up": read a seeded tenth of the files (and stat the rest of
# their directories), from the host, as a program scanning its own install would.
SYNTH_READER = (
    "import os, sys\n"
    "root = sys.argv[1]\n"
    "n = 0\n"
    "for rel in open(sys.argv[2]).read().split():\n"
    "    with open(os.path.join(root, rel), 'rb') as f:\n"
    "        n += len(f.read())\n"
    "print(n)\n"
)


@dataclass(frozen=True)
class Synthetic:
    files: int
    median: int
    sigma: float
    cap: int
    seed: int

    def specs(self) -> list[FileSpec]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.files):
            size = min(self.cap, int(math.exp(rng.gauss(math.log(self.median), self.sigma))))
            name = f"data/d{i // 1000:03d}/e{(i // 100) % 10}/f{i:06d}.bin"
            out.append(FileSpec(name, size, self.seed * 1_000_003 + i))
        return out


SYNTHETIC = {
    "syn1k": Synthetic(1_000, 2048, 1.5, MiB, 1),
    "syn10k": Synthetic(10_000, 2048, 1.5, MiB, 10),
    "syn100k": Synthetic(100_000, 512, 1.2, 256 * 1024, 100),
}
ALL_IMAGES = [*SYNTHETIC, "bigfile", "debian"]
BIGFILE = "data/big.bin"
BIGFILE_SIZE = 64 * MiB


@dataclass
class Image:
    name: str
    dir: Path
    meta: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    def layout(self, fmt: str) -> Path:
        return self.dir / fmt

    def describe(self) -> str:
        if self.meta["workload"] == "python3":
            return f"`chroot ROOT /usr/bin/python3 -c '{WORKLOAD}'`"
        return "a host Python reading a seeded tenth of the files (`readlist.txt`)"

    def workload(self, root: Path) -> list[str]:
        if self.meta["workload"] == "python3":
            return ["chroot", str(root), "/usr/bin/python3", "-c", WORKLOAD]
        return [sys.executable, "-c", SYNTH_READER, str(root), str(self.dir / "readlist.txt")]


# ----------------------------------------------------------------------------- layouts


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(4 * MiB):
            h.update(data)
    return "sha256:" + h.hexdigest()


def gzip_layout(tar: Path, layout: Path) -> None:
    """A one-layer gzip OCI image (``gzip -n -6``: deterministic) tagged ``bench``."""
    from lazyfs.ocilayout import Layout

    out = Layout(layout)
    out.init()
    gz = layout / "layer.gz.tmp"
    with gz.open("wb") as f:
        subprocess.run(["gzip", "-n", "-6", "-c", str(tar)], stdout=f, check=True)
    ldig, lsize = out.put_file(gz)
    gz.unlink()
    cdig, csize = out.put_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha256_file(tar)]},
        }
    )
    mdig, msize = out.put_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": csize},
            "layers": [{"mediaType": MT_GZIP, "digest": ldig, "size": lsize}],
        }
    )
    out.write_top(
        [
            {
                "mediaType": MT_MANIFEST,
                "digest": mdig,
                "size": msize,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ]
    )


def manifest_of(layout: Path) -> dict[str, Any]:
    """The first image manifest of ``layout`` (through nested indexes), as JSON."""
    from lazyfs.ocilayout import Layout

    lay = Layout(layout)
    doc: dict[str, Any] = json.loads(lay.read_blob(lay.index().manifests[0].digest))
    while "manifests" in doc:
        doc = json.loads(lay.read_blob(doc["manifests"][0]["digest"]))
    return doc


def layer_blobs(layout: Path) -> list[dict[str, Any]]:
    return list(manifest_of(layout)["layers"])


# ----------------------------------------------------------------------------- eStargz


class _Containerd:
    """One private containerd shared by all conversions of a build (started on first use)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.stack = contextlib.ExitStack()
        self.inst: Any = None

    def get(self) -> Any:
        if self.inst is None:
            from lazyfs.testing.containerd import ContainerdInstance

            self.inst = self.stack.enter_context(ContainerdInstance())
            if self.inst.pid:
                self.state.add_pid(self.inst.pid, "containerd")
        return self.inst

    def close(self) -> None:
        pid = self.inst.pid if self.inst is not None else None
        self.stack.close()
        if pid:
            self.state.drop_pid(pid)


def _estargz_ctr_remote(ctrd: _Containerd, name: str, src: Path, dst: Path, tmp: Path) -> None:
    src_ref = f"localhost/lazyfs-bench/{name}:gzip"
    dst_ref = f"localhost/lazyfs-bench/{name}:estargz"
    archive = tmp / "import.tar"
    index = json.loads((src / "index.json").read_text())
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": src_ref}
    with tarfile.open(archive, "w") as tf:
        for p in sorted((src / "blobs").rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
        for fname, data in (
            ("oci-layout", (src / "oci-layout").read_bytes()),
            ("index.json", json.dumps(index).encode()),
        ):
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    c = ctrd.get()
    c.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive), timeout=1800)
    archive.unlink()
    c.ctr("images", "convert", "--oci", "--estargz", src_ref, dst_ref, binary="ctr-remote",
          timeout=1800)  # fmt: skip
    exported = tmp / "export.tar"
    c.ctr("images", "export", "--skip-manifest-json", str(exported), dst_ref, timeout=1800)
    for ref in (src_ref, dst_ref):
        c.ctr("images", "rm", "--sync", ref, check=False)
    out = tmp / "estargz"
    out.mkdir()
    with tarfile.open(exported) as tf:
        tf.extractall(out, filter="data")
    exported.unlink()
    from lazyfs.ocilayout import Layout

    top = json.loads((out / "index.json").read_text())["manifests"][0]
    Layout(out).write_top([{**top, "annotations": {"org.opencontainers.image.ref.name": TAG}}])
    (out / "manifest.json").unlink(missing_ok=True)
    out.replace(dst)


# ----------------------------------------------------------------------------- sources


def _debian_rootfs() -> Path | None:
    """The debootstrap tree (cached), or None if debootstrap cannot work here."""
    root = IMAGES_DIR / "debian-rootfs"
    if (root / "usr" / "bin" / "python3").exists():
        return root
    if shutil.which("debootstrap") is None:
        apt = subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"],
                             capture_output=True)  # fmt: skip
        if apt.returncode != 0:
            return None
    mirror = apt_mirror()
    tmp = root.with_name("debian-rootfs.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log("debootstrap bookworm from the apt mirror (a few minutes, once)")
    res = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(tmp), mirror],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 or not (tmp / "usr" / "bin" / "python3").exists():
        log(f"debootstrap failed ({res.stderr.strip()[-300:]}); using the sample image")
        return None
    tmp.replace(root)
    return root


#: An explicit Debian mirror (``scripts/bench.py --debian-mirror URL``); else apt's own.
MIRROR: str | None = None


def apt_mirror(security: bool = False) -> str:
    """The Debian mirror to debootstrap from: ``MIRROR`` if given, else the first non-security
    mirror of this machine's apt sources (deb822 or one-line style); ``security``: the first
    security mirror instead.  No built-in default: results must not depend on (or name) a host
    nobody chose."""
    if MIRROR and not security:
        return MIRROR
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text())
    for text in texts:
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            if ("security" in m.group(1)) == security:
                return m.group(1)
    raise SystemExit(
        "no Debian mirror: this machine's apt sources name none; pass --debian-mirror URL"
    )


def _debian_tar(root: Path, tar: Path) -> None:
    top = sorted(os.listdir(root))
    subprocess.run(
        ["tar", "--sort=name", "--numeric-owner", "--xattrs", "-C", str(root),
         "--exclude=dev/*", "--exclude=var/cache/apt/*", "--exclude=var/lib/apt/lists/*",
         "--exclude=proc/*", "--exclude=sys/*", "-cf", str(tar), *top],
        check=True,
    )  # fmt: skip


def _sample_tar(tmp: Path, tar: Path) -> None:
    from lazyfs.testing.sample import build_sample_image

    layout = build_sample_image(tmp / "sample")
    (layer,) = layer_blobs(layout)
    with tar.open("wb") as out:
        src = layout / "blobs" / "sha256" / layer["digest"][7:]
        subprocess.run(["gzip", "-dc", str(src)], stdout=out, check=True)


# ----------------------------------------------------------------------------- build


def build(name: str, state: Any, ctrd: _Containerd) -> Image:
    d = IMAGES_DIR / name
    meta_path = d / "meta.json"
    if meta_path.exists():
        return Image(name, d, json.loads(meta_path.read_text()))
    log(f"building image {name} (cached in {d} afterwards)")
    shutil.rmtree(d, ignore_errors=True)
    tmp = d / "tmp"
    tmp.mkdir(parents=True)
    tar = tmp / "layer.tar"
    meta: dict[str, Any] = {"name": name, "workload": "reader"}
    if name in SYNTHETIC:
        syn = SYNTHETIC[name]
        specs = syn.specs()
        write_tar(tar, specs)
        pick = random.Random(syn.seed).sample(range(len(specs)), max(1, len(specs) // 10))
        (d / "readlist.txt").write_text("\n".join(specs[i].name for i in sorted(pick)) + "\n")
        meta["source"] = f"synthetic {syn}"
        meta["files"] = syn.files
    elif name == "bigfile":
        write_tar(tar, [FileSpec(BIGFILE, BIGFILE_SIZE, 64, "random"),
                        FileSpec("data/small.txt", 100, 1, "textish")])  # fmt: skip
        (d / "readlist.txt").write_text(BIGFILE + "\n")
        meta["source"] = f"one {BIGFILE_SIZE} B random file"
        meta["files"] = 2
    elif name == "debian":
        root = _debian_rootfs()
        if root is not None:
            _debian_tar(root, tar)
            meta["source"] = (
                "debootstrap --variant=minbase --include=python3 bookworm (the apt mirror)"
            )
        else:
            _sample_tar(tmp, tar)
            meta["source"] = "FALLBACK: host-Python sample image (lazyfs/testing/sample.py)"
        meta["workload"] = "python3"
    else:
        raise SystemExit(f"unknown image {name}; known: {', '.join(ALL_IMAGES)}")
    meta["tar_bytes"] = tar.stat().st_size
    log(f"{name}: gzip layout ({meta['tar_bytes'] / MiB:.1f} MiB tar)")
    gzip_layout(tar, d / "gzip")
    log(f"{name}: lazyfs convert -> zstd:chunked")
    from lazyfs_tools.convert import convert

    convert(f"oci:{d / 'gzip'}:{TAG}", f"oci:{d / 'zstd'}:{TAG}")
    log(f"{name}: eStargz")
    try:
        _estargz_ctr_remote(ctrd, name, d / "gzip", d / "estargz", tmp)
        meta["estargz_tool"] = "ctr-remote image convert --estargz --oci"
    except Exception as e:
        log(f"ctr-remote conversion failed ({e}); using lazyfs convert --format estargz")
        shutil.rmtree(d / "estargz", ignore_errors=True)
        convert(f"oci:{d / 'gzip'}:{TAG}", f"oci:{d / 'estargz'}:{TAG}", fmt="estargz")
        meta["estargz_tool"] = "lazyfs convert --format estargz (ctr-remote failed)"
    log(f"{name}: extracting rootfs")
    (d / "rootfs").mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(d / "rootfs")],
                   check=True)  # fmt: skip
    meta["blobs"] = {
        fmt: [{"digest": b["digest"], "size": b["size"]} for b in layer_blobs(d / fmt)]
        for fmt in ("gzip", "zstd", "estargz")
    }
    shutil.rmtree(tmp)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Image(name, d, meta)


def build_all(names: list[str], state: Any) -> dict[str, Image]:
    """Every image in ``names`` (built if not cached); the containerd is gone on return."""
    ctrd = _Containerd(state)
    try:
        return {n: build(n, state, ctrd) for n in names}
    finally:
        ctrd.close()
