"""Lazy layer writers and readers: round trips, range mapping, footers, bad input."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
import tracemalloc
from typing import Any

import msgspec
import pytest

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.formats import estargz, zstdchunked
from lazyfs.formats.chunkio import chunks_for_range, decode_chunk
from lazyfs.formats.framing import chunk_cuts
from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc
from lazyfs.formats.toc import (
    MAX_OFFSET,
    TOC,
    Chunk,
    Entry,
    TocBudget,
    decode_toc,
    decode_toc_table,
    encode_toc,
    validate,
)
from lazyfs.testing.layers import Item, make_tar, sample_items, seeded_bytes

WRITERS = {"zstd:chunked": zstdchunked.write_layer, "estargz": estargz.write_layer}


def convert(tar: bytes, fmt: str, chunk_size: int = 64 * 1024, head_size: int = 0):
    out = io.BytesIO()
    res = WRITERS[fmt](io.BytesIO(tar), out, chunk_size=chunk_size, head_size=head_size)
    return out.getvalue(), res


def load(blob: bytes, annotations: dict[str, str]) -> TOC:
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), annotations)
    return decode_layer_toc(loc, blob[loc.start : loc.end])


def members(tar: bytes) -> dict[str, tuple[object, ...]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isfile() else b""
            out[m.name] = (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.uname,
                m.gname,
                m.mtime,
                m.linkname,
                m.devmajor,
                m.devminor,
                dict(m.pax_headers),
                data,
            )
    return out


def read_file(blob: bytes, toc: TOC, e: Entry, off: int, n: int) -> bytes:
    out = bytearray()
    for c in chunks_for_range(e, off, n):
        out += decode_chunk(toc.compression, blob[c.offset : c.end], c)
    first = chunks_for_range(e, off, n)
    base = first[0].file_offset if first else off
    return bytes(out[off - base : off - base + n])


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_round_trip_keeps_every_byte_and_entry(fmt: str, tmp_path) -> None:
    tar = make_tar(sample_items())
    blob, res = convert(tar, fmt)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    plain = subprocess.run(
        ["zstd", "-dc", str(path)] if fmt == "zstd:chunked" else ["gzip", "-dc", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    if fmt == "zstd:chunked":
        assert plain == tar  # byte-identical: the diff_id does not change
    src, got = members(tar), members(plain)
    got.pop(estargz.TOC_NAME, None)
    assert got == src
    listed = subprocess.run(
        ["tar", "-t", "-f", "-"], input=tar, check=True, capture_output=True
    ).stdout
    listed_lazy = subprocess.run(
        ["tar", "-t", "-f", "-"], input=plain, check=True, capture_output=True
    ).stdout
    assert listed_lazy.replace(estargz.TOC_NAME.encode() + b"\n", b"") == listed
    assert res.diff_id == "sha256:" + __import__("hashlib").sha256(plain).hexdigest()

    toc = load(blob, res.annotations)
    by = toc.by_name()
    for it in sample_items():
        e = by[it.name.rstrip("/")]
        assert e.type == it.type
        assert e.mode == it.mode
        if it.type == "reg":
            assert read_file(blob, toc, e, 0, e.size) == it.data
        if it.xattrs:
            assert {k: v.decode() for k, v in e.xattrs.items()} == it.xattrs
    big = by["data/big.bin"]
    assert len(big.chunks) == 5
    assert all(c.zeros for c in by["data/zeros.bin"].chunks) == (fmt == "zstd:chunked")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_random_ranges_need_only_overlapping_chunks(fmt: str) -> None:
    data = seeded_bytes(1_000_003, 7)
    blob, res = convert(make_tar([Item("f", data=data)]), fmt, chunk_size=50_000)
    toc = load(blob, res.annotations)
    e = toc.by_name()["f"]
    rnd = random.Random(1)
    for _ in range(200):
        off = rnd.randrange(0, len(data))
        n = rnd.randrange(1, 150_000)
        cs = chunks_for_range(e, off, n)
        assert len(cs) <= n // 50_000 + 2
        assert read_file(blob, toc, e, off, n) == data[off : off + n]


@pytest.mark.parametrize(
    ("size", "chunk", "head", "cuts"),
    [
        (0, 100, 0, []),
        (250, 100, 0, [100, 100, 50]),
        (250, 100, 30, [30, 100, 100, 20]),
        (30, 100, 30, [30]),  # no larger than the head: one chunk
        (31, 100, 30, [30, 1]),
        (250, 100, 100, [100, 100, 50]),  # a head no smaller than a chunk is no head
        (250, 100, 400, [100, 100, 50]),
    ],
)
def test_chunk_cuts(size: int, chunk: int, head: int, cuts: list[int]) -> None:
    assert chunk_cuts(size, chunk, head) == cuts


@pytest.mark.parametrize(("chunk", "head"), [(0, 0), (-1, 0), (100, -1)])
def test_chunk_cuts_refuses_bad_sizes(chunk: int, head: int) -> None:
    with pytest.raises(FormatError, match="bad chunk sizes"):
        chunk_cuts(10, chunk, head)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_member_claiming_more_than_the_stream_holds_fails_where_it_ends(fmt: str) -> None:
    """A member's size is the input's word (PAX allows any): the writer cuts it as it reads
    and fails where the stream ends, not after listing every cut of the size claimed (a
    claim of 10**18 bytes was 2.4e11 cuts of 4 MiB: no error, memory until none is left;
    here 4e6 cuts of 1 byte, 32 MB of list)."""
    info = tarfile.TarInfo("liar")
    info.size = 4_000_000
    tar = info.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 512
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="truncated tar stream"):
            convert(tar, fmt, chunk_size=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_small_head_chunk_round_trips(fmt: str) -> None:
    """A big file's first chunk cut small (a header read first is served sooner): the TOC
    records the cuts, and every range reads back, across the head's end too."""
    data = seeded_bytes(300_007, 3)
    small = b"tiny"
    tar = make_tar([Item("big", data=data), Item("small", data=small)])
    blob, res = convert(tar, fmt, chunk_size=100_000, head_size=4096)
    toc = load(blob, res.annotations)
    big, tiny = toc.by_name()["big"], toc.by_name()["small"]
    assert [c.size for c in big.chunks] == chunk_cuts(len(data), 100_000, 4096)
    assert [c.file_offset for c in big.chunks] == [0, 4096, 104_096, 204_096]
    assert len(tiny.chunks) == 1
    for off, n in ((0, 10), (4000, 200), (4096, 1), (0, len(data)), (250_000, 60_000)):
        assert read_file(blob, toc, big, off, n) == data[off : off + n]
    assert read_file(blob, toc, tiny, 0, 4) == small


def test_output_is_deterministic() -> None:
    tar = make_tar(sample_items())
    for fmt in WRITERS:
        assert convert(tar, fmt)[0] == convert(tar, fmt)[0]


def test_corrupt_chunk_is_an_integrity_error() -> None:
    blob, res = convert(make_tar([Item("f", data=seeded_bytes(5000, 3))]), "zstd:chunked")
    toc = load(blob, res.annotations)
    c = toc.by_name()["f"].chunks[0]
    raw = bytearray(blob[c.offset : c.end])
    raw[len(raw) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        decode_chunk("zstd", bytes(raw), c)
    bad = Chunk(c.file_offset, c.size, c.offset, c.end, "sha256:" + "0" * 64)
    with pytest.raises(IntegrityError):
        decode_chunk("zstd", blob[c.offset : c.end], bad)


def test_toc_digest_mismatch_is_refused() -> None:
    blob, res = convert(make_tar([Item("f", data=b"x")]), "estargz")
    ann = {k: "sha256:" + "1" * 64 for k in res.annotations}
    with pytest.raises(IntegrityError):
        load(blob, ann)
    blob, res = convert(make_tar([Item("f", data=b"x")]), "zstd:chunked")
    with pytest.raises(IntegrityError):
        load(blob, {k: "sha256:" + "1" * 64 for k in res.annotations})


def test_not_a_lazy_layer() -> None:
    with pytest.raises(FormatError, match="not a lazy layer"):
        locate_toc(b"\0" * 64, 64, None)


def test_old_footers_are_read() -> None:
    blob, _res = convert(make_tar([Item("f", data=b"hello")]), "zstd:chunked")
    f = zstdchunked.parse_footer(blob[-64:])
    old = (
        bytes(blob[:-72])
        + b"".join(v.to_bytes(8, "little") for v in (f.offset, f.length, f.length_uncompressed, 1))
        + zstdchunked.MAGIC_OLD
    )
    toc = load(old, {})
    assert toc.by_name()["f"].size == 5
    # Legacy stargz: a 47-byte footer with the bare 22-byte extra field.
    blob, _ = convert(make_tar([Item("f", data=b"hello")]), "estargz")
    off, _ = estargz.parse_footer(blob[-64:])
    payload = b"%016xSTARGZ" % off
    import struct
    import zlib

    c = zlib.compressobj(0, zlib.DEFLATED, -15)
    legacy = (
        b"\x1f\x8b\x08\x04\0\0\0\0\0\xff"
        + struct.pack("<H", 22)
        + payload
        + c.compress(b"")
        + c.flush()
        + b"\0" * 8
    )
    assert len(legacy) == 47
    toc = load(blob[:-51] + legacy, {})
    assert toc.by_name()["f"].size == 5


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"type": "reg", "name": "../x", "size": 0}], "escapes"),
        ([{"type": "reg", "name": "/abs", "size": 0}], "absolute"),
        ([{"type": "reg", "name": "a\u0000b", "size": 0}], "NUL"),
        ([{"type": "weird", "name": "x"}], "unknown entry type"),
        ([{"type": "reg", "name": "x", "size": -1}], ">= 0 .*size"),
        (
            [{"type": "dir", "name": "d"}, {"type": "hardlink", "name": "x", "linkName": "d"}],
            "directory",
        ),
        (
            [
                {
                    "type": "reg",
                    "name": "x",
                    "size": 10,
                    "offset": 0,
                    "endOffset": 5,
                    "chunkSize": 4,
                    "chunkDigest": "sha256:" + "0" * 64,
                }
            ],
            "cover",
        ),
        (
            [
                {
                    "type": "reg",
                    "name": "x",
                    "size": 4,
                    "offset": 10,
                    "endOffset": 99999,
                    "chunkDigest": "sha256:" + "0" * 64,
                }
            ],
            "outside",
        ),
        ([{"type": "chunk", "name": "x", "offset": 1}], "does not follow"),
    ],
)
def test_toc_validation(entries: list[dict[str, object]], message: str) -> None:
    import json

    doc = json.dumps({"version": 1, "entries": entries}).encode()
    with pytest.raises(FormatError, match=message):
        decode_toc(doc, compression="zstd", blob_size=1000)


def test_wire_entry_types_are_decoded_as_the_kinds_themselves() -> None:
    """The wire's types are the decoder's own strings (none made per entry), and every kind
    is one of them; an unknown one is still refused with its entry named (above)."""
    import typing

    from lazyfs.formats import toc as toc_module

    doc = b'{"version":1,"entries":[{"type":"reg","name":"a"},{"type":"reg","name":"b"}]}'
    first, second = toc_module._wire_decoder.decode(doc).entries
    assert first.type is second.type
    assert set(typing.get_args(toc_module._WireType)) == set(toc_module._WIRE_CODES)


def test_toc_size_cap_and_garbage() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        decode_toc(b"{nope", compression="zstd", blob_size=10)
    with pytest.raises(FormatError, match="schema"):
        decode_toc(b'{"version":1,"entries":[{"name":1}]}', compression="zstd", blob_size=10)



@pytest.mark.parametrize("decode", [decode_toc, decode_toc_table])
def test_a_data_end_past_any_blob_offset_is_refused(decode: Any) -> None:
    """A zstd:chunked footer's TOC offset is a uint64: as a file's last chunk's end (none
    given) it did not fit the packed columns' int64, and OverflowError escaped the decode."""
    doc = {"version": 1, "entries": [
        {"type": "dir", "name": ""},
        {"type": "reg", "name": "f", "size": 10, "offset": 100, "digest": "sha256:" + "a" * 64},
    ]}  # fmt: skip
    raw = msgspec.json.encode(doc)
    budget = TocBudget()
    for end in (2**63 + 5, 2**64 - 9, MAX_OFFSET + 1):
        with pytest.raises(FormatError, match="data ends at"):
            decode(raw, compression="zstd", blob_size=2**64 - 1, data_end=end, budget=budget)
    assert budget.entries == 0
    decode(raw, compression="zstd", blob_size=2**64 - 1, data_end=MAX_OFFSET)

def test_encode_decode_round_trip() -> None:
    blob, res = convert(make_tar(sample_items()), "zstd:chunked")
    toc = load(blob, res.annotations)
    again = decode_toc(
        encode_toc(toc.entries, flavour="zstd:chunked"), compression="zstd", blob_size=toc.data_end
    )
    assert again.entries == toc.entries
    validate(again)


def test_truncated_tar_is_refused() -> None:
    tar = make_tar([Item("f", data=seeded_bytes(5000, 1))])
    with pytest.raises(FormatError, match="truncated"):
        convert(tar[:1500], "zstd:chunked")


def test_a_chunk_cannot_inflate_past_its_size() -> None:
    import resource

    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))  # declares 256 MiB
    chunk = Chunk(0, 10, 0, len(bomb), "sha256:" + "0" * 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(IntegrityError):
        decode_chunk("zstd", bomb, chunk)  # 10 zero bytes do not hash to that digest
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


def test_a_toc_with_header_spellings_decodes_to_normal_entries() -> None:
    """What containers/storage writes (and lazyfs now too): names and hardlink targets as
    spelt, type bits in modes, device numbers on a file, xattrs split between ``xattrs`` and
    lazyfs's ``lazyfsXattrs``; lazyfs sees the normalised entries."""
    doc = {
        "version": 1,
        "entries": [
            {"type": "dir", "name": "./", "mode": 0o40755},
            {"type": "dir", "name": "./etc", "mode": 0o40755, "accesstime": "2023-01-01T00:00:00Z"},
            {"type": "reg", "name": "./etc/f", "mode": 0o100644, "devMajor": 7, "devMinor": 9,
             "xattrs": {"user.a": "MQ=="}, "lazyfsXattrs": {"user.b": "Mg=="}},
            {"type": "hardlink", "name": "./etc/h", "linkName": "./etc/f", "mode": 0o644},
            {"type": "char", "name": "./null", "mode": 0o20666, "devMajor": 1, "devMinor": 3},
        ],
    }  # fmt: skip
    toc = decode_toc(msgspec.json.encode(doc), compression="zstd", blob_size=100)
    view = [(e.name, e.type, e.mode, e.link_name, e.dev_major, e.dev_minor, e.xattrs)
            for e in toc.entries]  # fmt: skip
    assert view == [
        ("", "dir", 0o755, "", 0, 0, {}),
        ("etc", "dir", 0o755, "", 0, 0, {}),
        ("etc/f", "reg", 0o644, "", 0, 0, {"user.a": b"1", "user.b": b"2"}),
        ("etc/h", "hardlink", 0o644, "etc/f", 0, 0, {}),
        ("null", "char", 0o666, "", 1, 3, {}),
    ]
