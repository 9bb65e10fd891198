"""A file over 4 GiB: converted in bounded memory, its TOC right, readable through a mount."""

from __future__ import annotations

import hashlib
import json
import resource
import tarfile
from pathlib import Path

from lazyfs.formats import zstdchunked
from lazyfs.formats.chunkio import chunks_for_range, decode_chunk
from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc
from lazyfs.testing.mounts import mounted

SIZE = 4 * 1024**3 + 3 * 1024**2 + 17  # past 4 GiB, not chunk-aligned
MARKS = {0: b"start", 4 * 1024**3 + 100: b"past-4GiB", SIZE - 3: b"end"}
CHUNK = 8 * 1024**2


class HugeTar:
    """A readable stream of a tar holding one mostly-zero file of SIZE bytes (never in memory)."""

    def __init__(self) -> None:
        info = tarfile.TarInfo("huge.img")
        info.size, info.mode, info.mtime = SIZE, 0o644, 1_700_000_000
        self.header = info.tobuf(format=tarfile.PAX_FORMAT)
        self.total = len(self.header) + SIZE + (-SIZE % 512) + 1024
        self.pos = 0

    def _byte_range(self, start: int, n: int) -> bytes:
        out = bytearray(n)
        h = len(self.header)
        if start < h:
            piece = self.header[start : start + n]
            out[: len(piece)] = piece
        for off, mark in MARKS.items():
            at = h + off - start
            for i, b in enumerate(mark):
                if 0 <= at + i < n:
                    out[at + i] = b
        return bytes(out)

    def read(self, n: int = -1) -> bytes:
        n = self.total - self.pos if n < 0 else min(n, self.total - self.pos)
        data = self._byte_range(self.pos, n)
        self.pos += n
        return data


def expected(offset: int, n: int) -> bytes:
    out = bytearray(n)
    for off, mark in MARKS.items():
        for i, b in enumerate(mark):
            if 0 <= off + i - offset < n:
                out[off + i - offset] = b
    return bytes(out)


def test_file_over_4gib_converts_in_bounded_memory_and_mounts(tmp_path: Path) -> None:
    layout = tmp_path / "img"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp_blob = tmp_path / "layer"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(tmp_blob, "wb") as out:
        res = zstdchunked.write_layer(HugeTar(), out, chunk_size=CHUNK)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 512 * 1024  # bounded by chunk buffers, not by the 4 GiB file
    blob = tmp_blob.read_bytes()
    assert len(blob) < 64 * 1024**2  # zeros compress; the TOC is small
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
    toc = decode_layer_toc(loc, blob[loc.start : loc.end])
    e = toc.by_name()["huge.img"]
    assert e.size == SIZE
    assert sum(c.zeros for c in e.chunks) >= len(e.chunks) - 3
    for off in MARKS:
        data = b"".join(
            decode_chunk("zstd", blob[c.offset : c.end], c) for c in chunks_for_range(e, off, 16)
        )
        first = chunks_for_range(e, off, 16)[0].file_offset
        assert data[off - first : off - first + 16] == expected(off, min(16, SIZE - off))

    # Serve it from an OCI layout and read past 4 GiB through FUSE.
    (blobs / res.digest[7:]).write_bytes(blob)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [res.diff_id]},
        }
    ).encode()
    (blobs / hashlib.sha256(config).hexdigest()).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": res.media_type,
                    "digest": res.digest,
                    "size": res.size,
                    "annotations": res.annotations,
                }
            ],
        }
    ).encode()
    (blobs / hashlib.sha256(manifest).hexdigest()).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "big"},
                    }
                ],
            }
        )
    )
    mnt = tmp_path / "mnt"
    with mounted(f"oci:{layout}:big", mnt, "--read-only", "--cache", str(tmp_path / "c")):
        path = mnt / "huge.img"
        assert path.stat().st_size == SIZE
        with open(path, "rb") as f:
            for off in MARKS:
                f.seek(off)
                assert f.read(16) == expected(off, min(16, SIZE - off))
