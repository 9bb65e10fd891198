"""zstd:chunked's tar-split frame and annotations, as containers/storage reads them."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile

import msgspec
import pytest
import zstandard

from lazyfs import oci
from lazyfs.formats import zstdchunked
from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc
from lazyfs.formats.tarsplit import FILE, SEGMENT, crc64, read_tar_split
from lazyfs.testing.layers import Item, make_tar, sample_items


def write(tar: bytes) -> tuple[bytes, zstdchunked.LayerResult]:
    out = io.BytesIO()
    res = zstdchunked.write_layer(io.BytesIO(tar), out, chunk_size=64 * 1024)
    return out.getvalue(), res


def test_crc64_is_gos_iso_table() -> None:
    # The catalogued check value of CRC-64/GO-ISO, big-endian as Go's Sum() appends it.
    assert crc64(b"123456789") == bytes.fromhex("b90956c775a41001")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_split_rebuilds_the_exact_tar(fmt: int) -> None:
    items = sample_items()
    tar = make_tar(items, fmt=fmt) + bytes(2048)  # extra zeros after the end: kept too
    blob, res = write(tar)
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()  # unchanged
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    assert reader.read() == tar  # skippable frames are invisible to zstd -d

    # The footer's tar-split fields, the annotation and the TOC agree on one frame.
    footer = zstdchunked.parse_footer(blob[-TAIL_SIZE:])
    assert footer is not None and footer.tarsplit_offset > footer.offset + footer.length
    start, length = footer.tarsplit_offset, footer.tarsplit_length
    assert struct.unpack("<II", blob[start - 8 : start]) == (zstdchunked.SKIPPABLE_MAGIC, length)
    assert start + length + 8 + zstdchunked.FOOTER_SIZE == len(blob)
    ann = res.annotations
    assert ann[oci.ANN_ZSTD_TARSPLIT_POSITION] == (
        f"{start}:{length}:{footer.tarsplit_length_uncompressed}"
    )
    compressed = blob[start : start + length]
    toc_comp = blob[footer.offset : footer.offset + footer.length]
    toc_json = zstandard.ZstdDecompressor().decompress(toc_comp)
    assert msgspec.json.decode(toc_json)["tarSplitDigest"] == oci.sha256_digest(compressed)
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
    assert len(lines) == footer.tarsplit_length_uncompressed

    # Segments and file contents in position order are the tar, byte for byte.
    contents = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isfile():
                contents[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    entries = read_tar_split(lines)
    assert [e.position for e in entries] == list(range(len(entries)))
    rebuilt = bytearray()
    files = 0
    for e in entries:
        if e.type == SEGMENT:
            rebuilt += e.payload or b""
        else:
            assert e.type == FILE
            files += 1
            data = contents.get(e.name.rstrip("/"), b"")
            assert e.size == len(data)
            if e.size:
                assert e.payload == crc64(data)
                rebuilt += data
            else:
                assert e.payload is None
    assert files == len(items)
    assert bytes(rebuilt) == tar
    assert lines.count(b"\n") == len(entries) and b'"name":"etc/"' in lines


def test_both_annotation_families_and_old_readers() -> None:
    blob, res = write(make_tar([Item("a", data=b"x" * 5000), Item("d", "dir")]))
    ann = res.annotations
    assert ann[oci.ANN_ZSTD_CHECKSUM] == ann[oci.ANN_ZSTD_CHECKSUM_OLD] == res.toc_digest
    assert ann[oci.ANN_ZSTD_POSITION] == ann[oci.ANN_ZSTD_POSITION_OLD]
    # A reader that knows only the old keys finds the TOC from them.
    old = {k: v for k, v in ann.items() if k.startswith("io.containers.")}
    assert len(old) == 2
    offset, length, _plain, kind = map(int, old[oci.ANN_ZSTD_POSITION_OLD].split(":"))
    assert kind == 1 and oci.sha256_digest(blob[offset : offset + length]) == res.toc_digest
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), old)
    toc = decode_layer_toc(loc, blob[loc.start : loc.end])
    assert [e.name for e in toc.entries] == ["a", "d"]


def test_a_layer_without_tar_split_still_reads() -> None:
    """Layers lazyfs wrote before (40-byte-style fields zero, new keys only) stay readable."""
    blob, res = write(make_tar([Item("a", data=b"hello")]))
    footer = zstdchunked.parse_footer(blob[-TAIL_SIZE:])
    assert footer is not None
    old_footer = msgspec.structs.replace(
        footer, tarsplit_offset=0, tarsplit_length=0, tarsplit_length_uncompressed=0
    )
    cut = blob[: footer.offset + footer.length] + zstdchunked.skippable_frame(
        zstdchunked.encode_footer(old_footer)
    )
    ann = {
        k: v
        for k, v in res.annotations.items()
        if k.startswith("io.github.") and "tarsplit" not in k
    }
    loc = locate_toc(cut[-TAIL_SIZE:], len(cut), ann)
    assert [e.name for e in decode_layer_toc(loc, cut[loc.start : loc.end]).entries] == ["a"]


@pytest.mark.parametrize(
    "items",
    [
        [Item(".", "dir"), Item("./etc", "dir"), Item("./etc/a", data=b"a" * 100)],  # tar -C d .
        [Item("etc", "dir"), Item("etc/h", "hardlink", link="./etc/a")],
    ],
)
def test_no_tar_split_when_headers_say_more_than_the_toc(items: list[Item]) -> None:
    """Newer containers/storage refuses a layer whose tar-split and TOC disagree (names spelt
    differently, say), but pulls one without a tar-split whole: so none is written."""
    tar = make_tar(items)
    blob, res = write(tar)
    footer = zstdchunked.parse_footer(blob[-TAIL_SIZE:])
    assert footer is not None and footer.tarsplit_offset == footer.tarsplit_length == 0
    assert oci.ANN_ZSTD_TARSPLIT_POSITION not in res.annotations
    assert oci.ANN_ZSTD_POSITION_OLD in res.annotations
    assert footer.offset + footer.length + 8 + zstdchunked.FOOTER_SIZE == len(blob)
    toc_comp = blob[footer.offset : footer.offset + footer.length]
    assert "tarSplitDigest" not in msgspec.json.decode(
        zstandard.ZstdDecompressor().decompress(toc_comp)
    )
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
    assert decode_layer_toc(loc, blob[loc.start : loc.end]).entries


def test_mode_type_bits_and_atime_mean_no_tar_split() -> None:
    tar = bytearray(make_tar([Item("a", data=b"x")], fmt=tarfile.USTAR_FORMAT))
    tar[100:108] = b"0100644\0"  # S_IFREG in the mode field, as some writers put it
    tar[148:156] = b"        "
    tar[148:155] = b"%06o\0" % sum(tar[:512])
    _, res = write(bytes(tar))
    assert oci.ANN_ZSTD_TARSPLIT_POSITION not in res.annotations

    info = tarfile.TarInfo("b")
    info.pax_headers = {"atime": "1700000000.5"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(b""))
    _, res = write(buf.getvalue())
    assert oci.ANN_ZSTD_TARSPLIT_POSITION not in res.annotations
