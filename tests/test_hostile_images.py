"""Hostile TOCs, decompression bombs and misbehaving registries (issue 9: input and memory).

TOCs are crafted as JSON here; bombs are built cheaply (repeated deflate blocks, zstd frames
whose header lies about their size) and decoded in a child process under ``RLIMIT_AS``, next to
the decoding the code used to do, to show the limit is one the old code would blow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zlib
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
import trio
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.formats import estargz, zstdchunked
from lazyfs.formats.chunkio import decode_chunk
from lazyfs.formats.layer import TAIL_SIZE, TocLocation, locate_toc, toc_json
from lazyfs.formats.toc import MAX_CHUNK_SIZE, TOC, Chunk, Entry, TocBudget, decode_toc
from lazyfs.store import plan
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.layerstore import LayerStore
from lazyfs.store.tocs import load_layer
from tests.test_store import MemSource

DIGEST = "sha256:" + "ab" * 32
GiB = 1 << 30


def _toc(*entries: dict[str, object]) -> bytes:
    return json.dumps({"version": 1, "entries": [{"type": "dir", "name": "./"}, *entries]}).encode()


def _decode(data: bytes, budget: TocBudget | None = None) -> None:
    decode_toc(data, compression="zstd", blob_size=1 << 40, budget=budget)


def _reg(name: str = "f", size: int = 10, **kw: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "type": "reg",
        "name": name,
        "size": size,
        "offset": 100,
        "endOffset": 200,
        "digest": DIGEST,
        "chunkDigest": DIGEST,
    }
    entry.update(kw)
    return entry


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


# -- numbers and names at the TOC edge --------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"type": "reg", "name": "u", "uid": 2**32}, "uid"),
        ({"type": "dir", "name": "g", "gid": 2**40}, "gid"),
        ({"type": "char", "name": "c", "devMajor": 2**40}, "devMajor"),
        ({"type": "block", "name": "b", "devMinor": -1}, "devMinor"),
        ({"type": "char", "name": "c", "devMajor": -1}, "devMajor"),
        (_reg(size=2**63), "size"),
        (_reg(chunkSize=2**63), "chunkSize"),
        (_reg(offset=-5), "offset"),
        (_reg(size=MAX_CHUNK_SIZE + 1), "chunk cap"),
        (_reg(size=1000, innerOffset=MAX_CHUNK_SIZE), "chunk cap"),
        ({"type": "reg", "name": "a" * 256}, "component over 255"),
        ({"type": "reg", "name": "d/" + "a" * 5000}, "component over 255"),
        ({"type": "reg", "name": "/".join(["d" * 200] * 25)}, "PATH_MAX"),
        ({"type": "reg", "name": "x" * 1_000_000}, "component over 255"),
        ({"type": "symlink", "name": "l", "linkName": "t" * 5000}, "PATH_MAX"),
        ({"type": "symlink", "name": "l", "linkName": "a\x00b"}, "NUL"),
        ({"type": "dir", "name": "m", "mode": -1}, "mode"),
        ({"type": "dir", "name": "t", "modtime": "9999-12-31T00:00:00Z"}, "modtime"),
        ({"type": "dir", "name": "t", "modtime": "0001-01-01T00:00:00Z"}, "modtime"),
        ({"type": "reg", "name": "x", "xattrs": {"user.\x00a": "eA=="}}, "xattr"),
        ({"type": "reg", "name": "x", "xattrs": {"user." + "k" * 300: "eA=="}}, "xattr"),
    ],
)
def test_out_of_range_entry_is_refused(entry: dict[str, object], words: str) -> None:
    with pytest.raises(FormatError) as e:
        _decode(_toc(entry))
    assert words in _one_line(e)


def test_limits_themselves_are_accepted() -> None:
    _decode(
        _toc(
            {"type": "reg", "name": "u", "uid": 2**32 - 2, "gid": 2**32 - 2},
            {"type": "char", "name": "c", "devMajor": 4095, "devMinor": 2**20 - 1},
            {"type": "dir", "name": "a" * 255},
            {"type": "reg", "name": "a" * 255 + "/" + "b" * 255},
            _reg("big", size=MAX_CHUNK_SIZE),
            # A hole is not decoded, so it may be as large as a file can be.
            _reg("sparse", size=2**40, chunkType="zeros", chunkDigest="", digest=""),
        )
    )


def test_image_budget_spans_layers() -> None:
    files: list[dict[str, object]] = [{"type": "reg", "name": f"f{i}"} for i in range(40)]
    layer = _toc(*files)
    budget = TocBudget(max_entries=100)
    _decode(layer, budget)
    _decode(layer, budget)  # 82 entries so far
    with pytest.raises(FormatError) as e:
        _decode(layer, budget)
    assert "100 entries" in _one_line(e)
    with pytest.raises(FormatError) as e:
        _decode(layer, TocBudget(max_bytes=len(layer) - 1))
    assert "bytes" in _one_line(e)


class _ChargedMeanwhile(TocBudget):
    """Charges another layer's 900 entries just after a layer's first charge, as the event
    loop may (a cached TOC unpacked) while a worker decodes that layer's JSON."""

    other = ""

    def charge(self, json_bytes: int, entries: int) -> None:
        super().charge(json_bytes, entries)
        if not self.other:
            try:
                super().charge(0, 900)
                self.other = "charged"
            except FormatError as e:
                self.other = str(e)


def test_a_layer_charged_while_another_decodes_fits_when_the_image_does() -> None:
    """What a layer holds of the image's budget while it decodes is a close bound on its
    entries, not one that refuses another layer the image has room for (H92)."""
    entries = [{"type": "reg", "name": f"dir/file-{i:04d}.py", "mode": 420} for i in range(50)]
    budget = _ChargedMeanwhile(max_entries=1000)  # 900 + 50: they fit
    _decode(json.dumps({"version": 1, "entries": entries}).encode(), budget)
    assert budget.other == "charged"
    assert budget.entries == 950


# -- bombs, decoded under a memory limit ------------------------------------------------------

LIMIT = 768 << 20  # address space for the child: ample for the new code, not for the old


def _limited(code: str, *files: bytes) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child limited to LIMIT bytes of address space; ``files`` are handed
    over as paths in ``sys.argv``."""
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, data in enumerate(files):
            p = Path(d) / str(i)
            p.write_bytes(data)
            paths.append(str(p))
        prelude = "import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({0}, {0}))\n"
        return subprocess.run(
            [sys.executable, "-c", prelude.format(LIMIT) + textwrap.dedent(code), *paths],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},
        )


def _declaring(frame: bytes, size: int) -> bytes:
    """A zstd frame written without a content size, its header rewritten to declare ``size``
    (an 8-byte Frame_Content_Size field); the decoder only finds the lie at the end."""
    fhd = frame[4]
    assert fhd >> 6 == 0 and not fhd & 0x20 and fhd & 3 == 0, "plain header expected"
    return frame[:4] + bytes([fhd | 0xC0]) + frame[5:6] + struct.pack("<Q", size) + frame[6:]


def _zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


def test_zstd_chunk_declaring_64_gib_allocates_nothing() -> None:
    raw = _declaring(_zstd_frame(os.urandom(2 << 20)), 64 * GiB)
    chunk = Chunk(0, 4096, 0, len(raw), DIGEST)
    with pytest.raises(IntegrityError):
        decode_chunk("zstd", raw, chunk)
    code = """
        import zstandard
        from lazyfs.errors import IntegrityError
        from lazyfs.formats.chunkio import decode_chunk
        from lazyfs.formats.toc import Chunk
        raw = open(sys.argv[1], "rb").read()
        try:
            decode_chunk("zstd", raw, Chunk(0, 4096, 0, len(raw), "sha256:" + "ab" * 32))
        except IntegrityError:
            print("refused")
        try:
            zstandard.ZstdDecompressor().decompress(raw, max_output_size=4096)
        except MemoryError:
            print("old: MemoryError")
        except zstandard.ZstdError as e:
            print("old:", e)
    """
    out = _limited(code, raw)
    assert out.stdout.splitlines() == ["refused", "old: MemoryError"], out


def _zstd_location(raw: bytes, uncompressed: int, digest: str | None = None) -> TocLocation:
    return TocLocation("zstd:chunked", 8, 8 + len(raw), 0, digest, uncompressed)


def test_zstd_toc_declaring_3_gib_fails_before_allocating() -> None:
    raw = _declaring(_zstd_frame(b'{"version":1,"entries":[]}' + b" " * 100_000), 3 * GiB)
    with pytest.raises(FormatError) as e:  # with the digest right, the image is bad
        toc_json(_zstd_location(raw, 0, "sha256:" + hashlib.sha256(raw).hexdigest()), raw)
    _one_line(e)
    code = """
        import zstandard
        from lazyfs.errors import LazyfsError
        from lazyfs.formats.layer import TocLocation, toc_json
        from lazyfs.formats.toc import MAX_TOC_BYTES
        raw = open(sys.argv[1], "rb").read()
        try:
            toc_json(TocLocation("zstd:chunked", 8, 8 + len(raw), 0, None, 0), raw)
        except LazyfsError:
            print("refused")
        try:
            zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_TOC_BYTES)
        except MemoryError:
            print("old: MemoryError")
    """
    out = _limited(code, raw)
    assert out.stdout.splitlines() == ["refused", "old: MemoryError"], out


def test_zstd_toc_longer_than_its_footer_says_is_refused() -> None:
    frame = _zstd_frame(b" " * 10_000)
    with pytest.raises(FormatError) as e:
        toc_json(_zstd_location(frame, 1000), frame)
    assert "inflates past 1000" in _one_line(e)


def _gzip_bomb(gib: int) -> bytes:
    """One gzip member inflating to ``gib`` GiB of zeros, about 1 MiB per GiB: the same
    full-flushed deflate block (1 MiB of zeros, no back-reference across it) repeated."""
    zeros = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert again == block
    body = block * (gib << 10) + c.flush()
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + body + struct.pack("<II", 0, 0)  # the trailer is never reached


def test_estargz_toc_bomb_is_inflated_with_a_limit() -> None:
    bomb = _gzip_bomb(2)
    assert len(bomb) < 4 << 20
    code = """
        import zlib
        from lazyfs.errors import FormatError
        from lazyfs.formats.estargz import extract_toc_json
        raw = open(sys.argv[1], "rb").read()
        try:
            extract_toc_json(raw)
        except FormatError as e:
            print("refused:", e)
        try:
            zlib.decompressobj(wbits=31).decompress(raw)
        except MemoryError:
            print("old: MemoryError")
    """
    out = _limited(code, bomb)
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("refused: eStargz TOC inflates past"), out
    assert lines[1] == "old: MemoryError", out


def test_estargz_toc_digest_is_of_the_json() -> None:
    """The eStargz annotation covers the uncompressed JSON (so it is checked after the bounded
    inflate); zstd:chunked's covers the compressed frame (checked before inflating)."""
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w") as tf:
        info = tarfile.TarInfo("a")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    for mod in (estargz, zstdchunked):
        out = io.BytesIO()
        res = mod.write_layer(io.BytesIO(src.getvalue()), out)
        blob = out.getvalue()
        loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
        raw = blob[loc.start : loc.end]
        json_bytes = toc_json(loc, raw)
        covered = raw if mod is zstdchunked else json_bytes
        assert res.toc_digest == "sha256:" + hashlib.sha256(covered).hexdigest()
        msgspec.json.decode(json_bytes)


def test_corrupt_estargz_toc_is_an_integrity_error() -> None:
    """A bit flip inside the gzip member is damage, not a malformed image: the TOC fetch
    retries on IntegrityError (lazyfs.image), so the error must say so."""
    member = bytearray(gzip.compress(b"x" * 100_000, mtime=0))
    member[len(member) // 2] ^= 0xFF
    with pytest.raises(IntegrityError) as e:
        estargz.extract_toc_json(bytes(member))
    assert "eStargz TOC does not decompress" in _one_line(e)


class _FlipOnce(MemSource):
    """Damages one byte of the blob in the first response that carries it."""

    def __init__(self, blobs: dict[str, bytes], at: int) -> None:
        super().__init__(blobs)
        self.at = at
        self.pending = True

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        data = await super().read_range(digest, start, end)
        if self.pending and start <= self.at < end:
            self.pending = False
            i = self.at - start
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data


@pytest.mark.parametrize("fmt", [estargz, zstdchunked])
def test_toc_damaged_in_transit_is_fetched_again(fmt: ModuleType) -> None:
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w") as tf:
        for i in range(200):
            info = tarfile.TarInfo(f"dir/file-{i}")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    out = io.BytesIO()
    res = fmt.write_layer(io.BytesIO(src.getvalue()), out)
    blob = out.getvalue()
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
    desc = oci.Descriptor(res.media_type, res.digest, len(blob), res.annotations)
    source = _FlipOnce({res.digest: blob}, (loc.start + loc.end) // 2)

    async def main() -> None:
        info = await load_layer(source, desc, None)
        assert len(info.toc.entries) == 200

    trio.run(main)
    assert not source.pending and len(source.requests) == 2, source.requests


def test_a_request_decodes_at_most_its_plain_cap(tmp_path: Path) -> None:
    """Well-compressed chunks are merged by compressed span, but a request's decoded total is
    capped too: eight 16 MiB chunks of 100 compressed bytes each are not one request."""
    n, size = 8, 16 * 1024 * 1024
    chunks = tuple(
        Chunk(i * size, size, 100 * i, 100 * (i + 1), f"sha256:{i:064x}") for i in range(n)
    )
    toc = TOC(
        compression="zstd",
        entries=[
            Entry(name="", type="dir"),
            Entry(name="f", type="reg", size=n * size, chunks=chunks),
        ],
        data_end=100 * n,
    )
    layer = LayerStore(ChunkCache(tmp_path)).add_layer("sha256:" + "0" * 64, MemSource({}), toc)
    requests = plan.plan_requests(layer, list(chunks), 64 * 1024, 8 << 20, lambda c: False)
    assert [len(cs) for _, _, cs in requests] == [2] * (n // 2)
    assert all(sum(c.size for c in cs) <= plan.MAX_REQUEST_PLAIN for _, _, cs in requests)
