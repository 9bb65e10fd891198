"""zstd:chunked's tar-split frame and annotations, as containers/storage reads them."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from pathlib import Path

import msgspec
import pytest
import zstandard
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.cli import main
from lazyfs.errors import FormatError
from lazyfs.formats import zstdchunked
from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc
from lazyfs.formats.tarsplit import FILE, SEGMENT, crc64, read_tar_split
from lazyfs.formats.tarstream import TarReader
from lazyfs.formats.toc import Entry
from lazyfs.testing.cstorage import (
    Mismatch,
    awkward_tars,
    check_tar_split,
    open_layer,
    rebuild_tar,
    unrepresentable_tars,
)
from lazyfs.testing.layers import Item, make_layout, make_tar, sample_items


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


def _view(e: Entry) -> tuple[object, ...]:
    return (e.name, e.type, e.mode, e.uid, e.gid, e.uname, e.gname, e.size, e.mtime_ns,
            e.link_name, e.dev_major, e.dev_minor, e.xattrs)  # fmt: skip


EXPECTED_MEMBERS = {
    "dot-slash": 5,
    "mode-type-bits": 4,
    "pax-times-xattrs": 3,
    "gnu-long-names": 4,
    "gnu-atime-ctime": 1,
    "ustar-prefix": 2,
    "devices": 5,
    "zeros": 3,
    "utf8": 2,
}


@pytest.mark.parametrize("case", sorted(awkward_tars()))
def test_awkward_headers_get_a_tar_split_that_containers_storage_accepts(case: str) -> None:
    """Every header shape that once made lazyfs leave the tar-split out: the TOC now says what
    containers/storage derives from each header, so its check passes; the tar-split still
    rebuilds the exact source; lazyfs itself sees the same normalised entries as before."""
    tar = awkward_tars()[case]
    blob, res = write(tar)
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert oci.ANN_ZSTD_TARSPLIT_POSITION in res.annotations and not res.no_tar_split
    layer = open_layer(blob, res.annotations)
    members = list(TarReader(io.BytesIO(tar)))
    assert check_tar_split(layer) == len(members) == res.entries == EXPECTED_MEMBERS[case]
    assert rebuild_tar(layer) == tar

    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
    toc = decode_layer_toc(loc, blob[loc.start : loc.end])
    assert [_view(e) for e in toc.entries] == [_view(m.entry) for m in members]


def test_the_check_refuses_what_containers_storage_refuses() -> None:
    """The re-stated check is not a formality: the TOC lazyfs wrote before (normalised names,
    masked modes, no access times) fails it, as it failed in containers/storage."""
    cases = awkward_tars()
    # Each case undoes one spelling the way the old writer did, and nothing else.
    def unspelt(field: str, value: object) -> object:
        if field in ("name", "linkName") and isinstance(value, str) and value.startswith("./"):
            return value.removeprefix("./")
        if field == "mode" and isinstance(value, int) and value & ~0o7777:
            return value & 0o7777
        return value

    for case, field in [
        ("dot-slash", "name"),
        ("dot-slash", "linkName"),
        ("mode-type-bits", "mode"),
        ("pax-times-xattrs", "accesstime"),
        ("pax-times-xattrs", "xattrs"),
        ("devices", "devMajor"),
    ]:
        blob, res = write(cases[case])
        layer = open_layer(blob, res.annotations)
        entries = layer.toc["entries"]
        assert isinstance(entries, list)
        if field in ("name", "linkName", "mode"):
            victim = next(
                d for d in entries
                if field in d and d["type"] != "chunk" and unspelt(field, d[field]) != d[field]
            )  # fmt: skip
            victim[field] = unspelt(field, victim[field])
        else:
            victim = next(d for d in entries if field in d and d["type"] != "chunk")
            del victim[field]
        with pytest.raises(Mismatch):
            check_tar_split(layer)


REASONS = {
    "global-pax": "global PAX header",
    "duplicate": "twice",
    "contiguous": "type 7",
    "device-on-file": "device numbers out of range",
}


@pytest.mark.parametrize("case", sorted(unrepresentable_tars()))
def test_no_tar_split_for_what_containers_storage_cannot_represent(case: str) -> None:
    """A global PAX header (Go returns it as a member of no TOC type), a repeated name (both
    sides are keyed by name), type 7: containers/storage's own writer could not produce a
    layer passing its check either, so no tar-split is written and it pulls the layer whole."""
    tar = unrepresentable_tars()[case]
    blob, res = write(tar)
    footer = zstdchunked.parse_footer(blob[-TAIL_SIZE:])
    assert footer is not None and footer.tarsplit_offset == footer.tarsplit_length == 0
    assert oci.ANN_ZSTD_TARSPLIT_POSITION not in res.annotations
    assert REASONS[case] in res.no_tar_split
    assert oci.ANN_ZSTD_POSITION_OLD in res.annotations
    assert footer.offset + footer.length + 8 + zstdchunked.FOOTER_SIZE == len(blob)
    assert "tarSplitDigest" not in open_layer(blob, res.annotations).toc
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), res.annotations)
    toc = decode_layer_toc(loc, blob[loc.start : loc.end])
    assert [_view(e) for e in toc.entries] == [_view(m.entry) for m in TarReader(io.BytesIO(tar))]


def test_a_name_that_is_not_utf8_is_refused_in_one_line() -> None:
    """JSON cannot carry it (Go would write U+FFFD, and then refuse its own layer)."""
    info = tarfile.TarInfo("caf\udce9")  # "café" in Latin-1, as tarfile keeps it
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(FormatError) as exc:
        write(buf.getvalue())
    assert "not UTF-8" in str(exc.value) and "\n" not in str(exc.value)
    assert "caf\\xe9" in str(exc.value)


def test_convert_reports_layers_without_tar_split(tmp_path: Path) -> None:
    tars = [awkward_tars()["dot-slash"], unrepresentable_tars()["duplicate"]]
    make_layout(tmp_path / "src", tars)
    report = convert(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'lazy'}:latest")
    assert len(report.no_tar_split) == 1
    assert report.no_tar_split[0].endswith("'a' appears twice")


def test_convert_command_warns_of_layers_without_tar_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_layout(tmp_path / "src", [unrepresentable_tars()["duplicate"]])
    src, dst = f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'lazy'}:latest"
    assert main(["convert", src, dst]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no tar-split for ")
    assert "appears twice" in err[0]


def test_a_link_target_with_a_nul_is_refused_in_one_line() -> None:
    # A pax linkpath may hold any byte; the kernel would cut the link's target at a NUL.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("l")
        info.type = tarfile.SYMTYPE
        info.linkname = "a\x00b" + "c" * 200  # long: tarfile keeps it in a pax record
        tf.addfile(info)
    with pytest.raises(FormatError) as e:
        list(TarReader(io.BytesIO(buf.getvalue())))
    assert "NUL" in str(e.value) and "\n" not in str(e.value)
