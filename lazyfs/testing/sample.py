"""The embedded default image: this machine's own Python 3 and its standard library.

A real program with a real start-up (hundreds of small files read in a burst, a few large
shared libraries), built from files already on disk so the demo needs no download.  Written
as an ordinary gzip OCI image, deterministically (fixed mtimes in the tar headers, sorted
entries), so its digest only changes when the host's Python does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

from lazyfs import oci
from lazyfs.ocilayout import Layout

PYTHON = "/usr/bin/python3"
STDLIB = "/usr/lib/python3.11"
EXTRA = ("/bin/sh", "/usr/bin/env", "/etc/os-release")
# A start-up that imports a realistic spread of the standard library.
WORKLOAD = (
    "import json, email.parser, http.client, sqlite3, decimal, asyncio, "
    "xml.etree.ElementTree, argparse, logging, unittest, csv, zipfile; print('started')"
)


def _libraries(path: str) -> set[str]:
    res = subprocess.run(["ldd", path], capture_output=True, text=True)
    return {m.group(1) for m in re.finditer(r"(/\S+) \(0x", res.stdout)}


def _files() -> list[str]:
    files = {PYTHON, *EXTRA}
    files |= _libraries(os.path.realpath(PYTHON)) | _libraries("/bin/sh")
    for root, dirs, names in os.walk(STDLIB):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "idlelib", "tkinter", "turtledemo"))
        for n in names:
            p = os.path.join(root, n)
            files.add(p)
            if n.endswith(".so"):
                files |= _libraries(p)
    return sorted(files)


def _tar(files: list[str]) -> bytes:
    buf = io.BytesIO()
    seen_dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add_dirs(path: str) -> None:
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tf.addfile(info)

        for path in files:
            arc = path.lstrip("/")
            real = os.path.realpath(path)
            add_dirs(arc)
            info = tarfile.TarInfo(arc)
            st = os.stat(real)
            info.mode, info.mtime, info.size = st.st_mode & 0o7777, 0, st.st_size
            with open(real, "rb") as f:
                tf.addfile(info, f)
        for d in ("proc", "dev", "tmp", "sys"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, 0
            tf.addfile(info)
    return buf.getvalue()


def build_sample_image(dest: Path, tag: str = "sample") -> Path:
    """Write the sample image as an OCI layout at ``dest`` (kept if it is already there)."""
    if (dest / "index.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    layout = Layout(tmp)
    layout.init()
    tar = _tar(_files())
    layer = layout.write_blob(gzip.compress(tar, compresslevel=6, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": [PYTHON, "-c", WORKLOAD]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    cdesc = layout.write_blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_MANIFEST,
        "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": cdesc.digest, "size": cdesc.size},
        "layers": [{"mediaType": oci.MT_LAYER_GZIP, "digest": layer.digest, "size": layer.size}],
    }
    mdesc = layout.write_blob(json.dumps(manifest, sort_keys=True).encode())
    layout.write_index(
        oci.Index(
            schemaVersion=2,
            manifests=[
                oci.Descriptor(
                    mediaType=oci.MT_OCI_MANIFEST,
                    digest=mdesc.digest,
                    size=mdesc.size,
                    annotations={oci.ANN_REF_NAME: tag},
                )
            ],
        )
    )
    os.replace(tmp, dest)
    return dest
