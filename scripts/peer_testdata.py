"""Build peer-made (ctr-remote) eStargz and zstd:chunked layers as test data.

Run via scripts/make-peer-testdata.sh (needs root, containerd, ctr, ctr-remote).

Steps: build a deterministic source layer tar and a one-layer OCI image archive
around it; import it into a private containerd (lazyfs.testing.containerd); run
``ctr-remote image convert --oci`` with ``--estargz`` and ``--zstdchunked``;
export each result and write the converted layer blob plus a JSON sidecar with
its descriptor into the output directory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lazyfs.testing.containerd import ContainerdInstance  # noqa: E402

SEED = 20261123
MTIME = 1_700_000_000  # fixed timestamp for every tar entry
CHUNK_SIZE = 64 * 1024
SRC_REF = "localhost/lazyfs/peer-src:1"
VARIANTS: dict[str, list[str]] = {
    "estargz": ["--oci", "--estargz", "--estargz-chunk-size", str(CHUNK_SIZE)],
    # ctr-remote applies the eStargz builder options (incl. chunk size) to zstd:chunked.
    "zstdchunked": ["--oci", "--zstdchunked", "--estargz-chunk-size", str(CHUNK_SIZE)],
}
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def seeded_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def build_source_tar() -> bytes:
    """Deterministic PAX layer tar: the ground truth for extracted content."""
    rng = random.Random(SEED)
    files: list[tuple[str, bytes, int, dict[str, str]]] = [
        ("etc/empty", b"", 0o644, {}),
        ("etc/ten.txt", b"0123456789", 0o644, {}),
        ("data/small.bin", seeded_bytes(rng, 100 * 1024 + 17), 0o644, {}),
        # 4 full 64 KiB chunks plus a partial fifth one.
        ("data/big.bin", seeded_bytes(rng, 4 * CHUNK_SIZE + 12345), 0o644, {}),
        # Highly compressible multi-chunk file (zero-filled).
        ("data/zeros.bin", bytes(2 * CHUNK_SIZE + 100), 0o644, {}),
        ("bin/hello.sh", b"#!/bin/sh\necho hello from lazyfs peer data\n", 0o755, {}),
        ("etc/xattr.txt", b"has an xattr\n", 0o644, {"SCHILY.xattr.user.test": "lazyfs-value"}),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "data", "etc", "etc/subdir"):
            tf.addfile(_info(d + "/", tarfile.DIRTYPE, 0o755))
        for name, content, mode, pax in files:
            ti = _info(name, tarfile.REGTYPE, mode)
            ti.size = len(content)
            if pax:
                ti.pax_headers = dict(pax)
            tf.addfile(ti, io.BytesIO(content))
        link = _info("etc/subdir/link-to-ten", tarfile.SYMTYPE, 0o777)
        link.linkname = "../ten.txt"
        tf.addfile(link)
        hard = _info("data/big-hardlink.bin", tarfile.LNKTYPE, 0o644)
        hard.linkname = "data/big.bin"
        tf.addfile(hard)
    return buf.getvalue()


def sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def build_oci_archive(layer_tar: bytes) -> bytes:
    """A one-layer OCI image layout, as a tar archive ``ctr images import`` takes."""
    layer_gz = gzip.compress(layer_tar, compresslevel=6, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/hello.sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "peer_testdata.py"}],
    }
    config_b = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": MT_LAYER_GZ, "digest": sha256(layer_gz), "size": len(layer_gz)}],
    }
    manifest_b = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": sha256(manifest_b),
                "size": len(manifest_b),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": SRC_REF},
            }
        ],
    }
    entries = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for blob in (layer_gz, config_b, manifest_b):
        entries["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = blob
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("blobs/", "blobs/sha256/"):
            tf.addfile(_info(name, tarfile.DIRTYPE, 0o755))
        for name, data in entries.items():
            ti = _info(name, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def read_oci_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {
            m.name.removeprefix("./"): tf.extractfile(m).read()  # type: ignore[union-attr]
            for m in tf.getmembers()
            if m.isfile()
        }


def layer_from_export(path: Path) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(layer descriptor, layer blob, manifest) of the single-layer image in *path*."""
    files = read_oci_archive(path)

    def blob(digest: str) -> bytes:
        data = files["blobs/" + digest.replace(":", "/")]
        if sha256(data) != digest:
            raise RuntimeError(f"digest mismatch for {digest}")
        return data

    index = json.loads(files["index.json"])
    desc = index["manifests"][0]
    doc = json.loads(blob(desc["digest"]))
    if doc.get("mediaType") == MT_INDEX or "manifests" in doc:
        doc = json.loads(blob(doc["manifests"][0]["digest"]))
    (layer,) = doc["layers"]
    data = blob(layer["digest"])
    if len(data) != layer["size"]:
        raise RuntimeError("layer size mismatch")
    return layer, data, doc


def tool_versions() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    def dpkg(pkg: str) -> str:
        return first_line("dpkg-query", "-W", "-f=${Version}", pkg)

    return {
        "containerd": first_line("containerd", "--version"),
        "ctr-remote (stargz-snapshotter deb)": dpkg("stargz-snapshotter"),
        "containerd (deb)": dpkg("containerd"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "peer")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    source = build_source_tar()
    (out / "source.tar").write_bytes(source)
    versions = tool_versions()

    with tempfile.TemporaryDirectory(prefix="lazyfs-peer-") as tmp_s:
        tmp = Path(tmp_s)
        archive = tmp / "src-oci.tar"
        archive.write_bytes(build_oci_archive(source))
        with ContainerdInstance() as ctrd:
            ctrd.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive))
            for name, flags in VARIANTS.items():
                ref = f"localhost/lazyfs/peer-{name}:1"
                ctrd.ctr("images", "convert", *flags, SRC_REF, ref, binary="ctr-remote")
                exported = tmp / f"{name}.tar"
                ctrd.ctr("images", "export", "--skip-manifest-json", str(exported), ref)
                layer, data, manifest = layer_from_export(exported)
                (out / f"{name}.layer").write_bytes(data)
                sidecar = {
                    "descriptor": layer,
                    "source_diff_id": sha256(source),
                    "chunk_size": CHUNK_SIZE,
                    "convert_command": ["ctr-remote", "images", "convert", *flags, SRC_REF, ref],
                    "tool_versions": versions,
                    "image_manifest": manifest,
                }
                text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
                (out / f"{name}.json").write_text(text)
                print(f"{name}: {layer['digest']} {layer['size']} bytes", file=sys.stderr)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"total {total} bytes in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
