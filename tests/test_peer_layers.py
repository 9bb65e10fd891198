"""Layers made by a peer (ctr-remote from Debian's stargz-snapshotter) read correctly.

The blobs in tests/data/peer were made by scripts/make-peer-testdata.sh; see its README.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from lazyfs.errors import IntegrityError
from lazyfs.formats.chunkio import decode_chunk
from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc

PEER = Path(__file__).parent / "data" / "peer"


def source_members() -> dict[str, tarfile.TarInfo]:
    return {
        m.name.rstrip("/").removeprefix("./"): m
        for m in tarfile.open(PEER / "source.tar").getmembers()
    }


@pytest.mark.parametrize(("name", "fmt"), [("estargz", "estargz"), ("zstdchunked", "zstd:chunked")])
def test_peer_layer_reads_back_the_source(name: str, fmt: str) -> None:
    blob = (PEER / f"{name}.layer").read_bytes()
    desc = json.loads((PEER / f"{name}.json").read_text())["descriptor"]
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), desc["annotations"])
    assert loc.format == fmt
    assert loc.expected_digest  # the TOC was checked against the manifest's annotation
    toc = decode_layer_toc(loc, blob[loc.start : loc.end])
    src = source_members()
    tf = tarfile.open(PEER / "source.tar")
    by = toc.by_name()
    assert set(by) - {""} == set(src) - {""}
    multi = 0
    for path, m in src.items():
        e = by[path]
        assert e.mode == m.mode & 0o7777, path
        assert (e.uid, e.gid) == (m.uid, m.gid), path
        if m.issym():
            assert e.type == "symlink" and e.link_name == m.linkname
        elif m.islnk():
            assert e.type == "hardlink" and e.link_name == m.linkname.removeprefix("./")
        elif m.isfile():
            want = tf.extractfile(m).read()
            got = b"".join(
                decode_chunk(toc.compression, blob[c.offset : c.end], c) for c in e.chunks
            )
            assert got == want, path
            multi += len(e.chunks) > 1
        xattrs = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert e.xattrs == xattrs, path
    assert multi >= 2  # the data really exercises multi-chunk files


def test_peer_toc_digest_is_enforced() -> None:
    blob = bytearray((PEER / "zstdchunked.layer").read_bytes())
    desc = json.loads((PEER / "zstdchunked.json").read_text())["descriptor"]
    loc = locate_toc(bytes(blob[-TAIL_SIZE:]), len(blob), desc["annotations"])
    blob[loc.start + 20] ^= 1
    with pytest.raises(IntegrityError):
        decode_layer_toc(loc, bytes(blob[loc.start : loc.end]))
