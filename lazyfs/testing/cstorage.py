"""containers/storage's view of a zstd:chunked layer, re-stated for tests.

Before it partial-pulls a layer whose TOC names a tar-split, containers/storage (1.55 and
later, pkg/chunked) checks that the two describe the same members: it parses each tar-split
header segment with Go's archive/tar, derives the TOC entry it would write for that header,
and compares it field by field with the TOC entry of the same *raw* name; any difference, a
name on one side only or a name twice refuses the layer.  :func:`check_tar_split` does the
same from first principles (its own header parser, not lazyfs's), so tests can tell whether a
newer podman would take a lazyfs layer.  :func:`rebuild_tar` reassembles the layer's tar from
the tar-split and the file contents found through the TOC, as containers/storage does when
it exports a partially pulled layer.  :func:`awkward_tars` are sources with every header
shape that once made the TOC and the tar-split disagree.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import struct
import tarfile
from dataclasses import dataclass, field

import msgspec
import zstandard

from lazyfs import oci
from lazyfs.formats import zstdchunked
from lazyfs.formats.layer import TAIL_SIZE
from lazyfs.testing.layers import MTIME, Item, make_tar, seeded_bytes

# tar-split's storage format, read here with the standard library rather than lazyfs's own
# reader, so that the check does not share lazyfs's idea of the format: one JSON object per
# line, ``type`` 1 a file (``name``, ``size``), 2 a segment (raw bytes, base64 ``payload``).
FILE, SEGMENT = 1, 2


@dataclass(frozen=True)
class SplitEntry:
    type: int
    name: str
    size: int
    payload: bytes


def split_entries(lines: bytes) -> list[SplitEntry]:
    out = []
    for line in lines.splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        raw = d.get("payload")
        payload = base64.b64decode(raw) if d["type"] == SEGMENT and raw else b""
        out.append(SplitEntry(d["type"], d.get("name", ""), d.get("size", 0), payload))
    return out

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Go's tar type flags → TOC types (what containers/storage can describe; nothing else).
TOC_TYPES = {
    b"0": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}
HEADER_ONLY = {b"1", b"2", b"3", b"4", b"5", b"6"}  # Go reads no content after these


class Mismatch(AssertionError):
    """containers/storage would refuse the layer: its TOC and tar-split disagree."""


@dataclass
class Fields:
    """The fields containers/storage compares; times in ns, None for "no time" (0 too)."""

    type: str
    name: str
    link: str = ""
    mode: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int | None = None
    atime: int | None = None
    ctime: int | None = None
    major: int = 0
    minor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)  # values base64, as in the TOC


def _cut(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def _number(b: bytes) -> int:
    if b and b[0] & 0x80:  # base-256, two's complement over the field minus its top bit
        value = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        return value - (1 << (8 * len(b) - 1)) if b[0] & 0x40 else value
    digits = b.strip(b" \0")
    return int(digits, 8) if digits else 0


def _pax_seconds(s: str) -> int:
    whole, _, frac = s.partition(".")
    ns = (frac + "0" * 9)[:9] if frac else "0"
    value = abs(int(whole)) * 10**9 + int(ns)
    return -value if whole.startswith("-") else value


def _none_if_zero(ns: int) -> int | None:
    return ns or None


def parse_header(segment: bytes) -> tuple[Fields, int] | None:
    """The member one tar-split segment describes, as Go's archive/tar reads it, and the
    padding Go expects after its content; None at the end of the archive."""
    pos = 0
    pax: dict[bytes, bytes] = {}
    long_name = long_link = b""
    flag = b""
    while True:
        blk = segment[pos : pos + BLOCK]
        if len(blk) < BLOCK or blk == ZERO_BLOCK:
            return None
        stored = _number(blk[148:156])
        plain = blk[:148] + b" " * 8 + blk[156:]
        if stored not in (sum(plain), sum(struct.unpack("512b", plain))):
            raise Mismatch(f"bad header checksum at {pos} of a segment")
        flag = blk[156:157]
        size = _number(blk[124:136])
        body = segment[pos + BLOCK : pos + BLOCK + size]
        pos += BLOCK + size + (-size % BLOCK)
        if flag in (b"x", b"g"):
            if flag == b"g":
                raise Mismatch("a global PAX header is a member of its own, of no TOC type")
            rest = body
            while rest:
                length, _, _ = rest.partition(b" ")
                record = rest[: int(length)]
                key, _, value = record[len(length) + 1 : -1].partition(b"=")
                pax[key] = value
                rest = rest[int(length) :]
            continue
        if flag in (b"L", b"K"):
            if flag == b"L":
                long_name = _cut(body)
            else:
                long_link = _cut(body)
            continue
        break
    magic, version = blk[257:263], blk[263:265]
    star = magic == b"ustar\0" and blk[508:512] == b"tar\0"
    gnu = magic == b"ustar " and version == b" \0"
    name = _cut(blk[:100])
    atime = ctime = 0
    major = minor = 0
    if magic == b"ustar\0" or gnu:
        major, minor = _number(blk[329:337]), _number(blk[337:345])
    if magic == b"ustar\0":
        prefix = _cut(blk[345:476] if star else blk[345:500])
        if prefix:
            name = prefix + b"/" + name
        if star:
            atime, ctime = _number(blk[476:488]) * 10**9, _number(blk[488:500]) * 10**9
    elif gnu:
        if blk[345]:
            atime = _number(blk[345:357]) * 10**9
        if blk[357]:
            ctime = _number(blk[357:369]) * 10**9
    link = _cut(blk[157:257])
    mtime = _number(blk[136:148]) * 10**9
    uid, gid = _number(blk[108:116]), _number(blk[116:124])
    # Go merges the PAX records first (an empty value keeps the block's), then GNU names.
    if pax.get(b"path"):
        name = pax[b"path"]
    if pax.get(b"linkpath"):
        link = pax[b"linkpath"]
    if pax.get(b"uid"):
        uid = int(pax[b"uid"])
    if pax.get(b"gid"):
        gid = int(pax[b"gid"])
    if pax.get(b"size"):
        size = int(pax[b"size"])
    if pax.get(b"mtime"):
        mtime = _pax_seconds(pax[b"mtime"].decode())
    if pax.get(b"atime"):
        atime = _pax_seconds(pax[b"atime"].decode())
    if pax.get(b"ctime"):
        ctime = _pax_seconds(pax[b"ctime"].decode())
    name = long_name or name
    link = long_link or link
    if flag == b"\0":
        flag = b"5" if name.endswith(b"/") else b"0"
    if flag not in TOC_TYPES:
        raise Mismatch(f"type {flag!r} of {name!r} has no TOC type")
    xattrs = {
        k[len(b"SCHILY.xattr.") :].decode("utf-8", "surrogateescape"): base64.b64encode(v).decode()
        for k, v in pax.items()
        if k.startswith(b"SCHILY.xattr.")
    }
    fields = Fields(
        type=TOC_TYPES[flag],
        name=name.decode("utf-8", "surrogateescape"),
        link=link.decode("utf-8", "surrogateescape"),
        mode=_number(blk[100:108]),
        size=size,
        uid=uid,
        gid=gid,
        mtime=_none_if_zero(mtime),
        atime=_none_if_zero(atime),
        ctime=_none_if_zero(ctime),
        major=major,
        minor=minor,
        xattrs=xattrs,
    )
    content = 0 if flag in HEADER_ONLY else size
    return fields, -content % BLOCK


def _rfc3339(s: str | None) -> int | None:
    if not s:
        return None
    base, _, rest = s.partition(".")
    frac = "".join(c for c in rest if c.isdigit()) if rest else ""
    zone = rest[len(frac) :] if rest else base[19:]
    t = dt.datetime.fromisoformat(base[:19] + ("+00:00" if zone in ("Z", "") else zone))
    return _none_if_zero(int(t.timestamp()) * 10**9 + int((frac + "0" * 9)[:9] or 0))


def toc_fields(d: dict[str, object]) -> Fields:
    """The compared fields of one TOC entry (JSON object)."""

    def num(key: str) -> int:
        v = d.get(key, 0)
        assert isinstance(v, int)
        return v

    xattrs = d.get("xattrs") or {}
    assert isinstance(xattrs, dict)
    return Fields(
        type=str(d["type"]),
        name=str(d["name"]),
        link=str(d.get("linkName", "")),
        mode=num("mode"),
        size=num("size"),
        uid=num("uid"),
        gid=num("gid"),
        mtime=_rfc3339(d.get("modtime")),  # type: ignore[arg-type]
        atime=_rfc3339(d.get("accesstime")),  # type: ignore[arg-type]
        ctime=_rfc3339(d.get("changetime")),  # type: ignore[arg-type]
        major=num("devMajor"),
        minor=num("devMinor"),
        xattrs=dict(xattrs),
    )


@dataclass
class Layer:
    """The parts of a zstd:chunked blob the check reads."""

    toc: dict[str, object]
    tar_split: bytes  # uncompressed JSON lines, b"" when the layer has none
    blob: bytes


def open_layer(blob: bytes, annotations: dict[str, str]) -> Layer:
    footer = zstdchunked.parse_footer(blob[-TAIL_SIZE:])
    assert footer is not None, "no zstd:chunked footer"
    toc_comp = blob[footer.offset : footer.offset + footer.length]
    toc = msgspec.json.decode(zstandard.ZstdDecompressor().decompress(toc_comp))
    split = b""
    if toc.get("tarSplitDigest"):
        # containers/storage finds the tar-split through the annotation, and trusts it only
        # through the TOC's digest.
        offset, length, plain = map(
            int, annotations["io.github.containers.zstd-chunked.tarsplit-position"].split(":")
        )
        assert (offset, length, plain) == (
            footer.tarsplit_offset,
            footer.tarsplit_length,
            footer.tarsplit_length_uncompressed,
        )
        comp = blob[offset : offset + length]
        assert oci.sha256_digest(comp) == toc["tarSplitDigest"], "tar-split digest"
        split = zstandard.ZstdDecompressor().decompressobj().decompress(comp)
        assert len(split) == plain
    return Layer(toc, split, blob)


def check_tar_split(layer: Layer) -> int:
    """Raise :class:`Mismatch` where containers/storage would refuse the layer; return the
    number of members checked."""
    pending: dict[str, Fields] = {}
    for d in layer.toc["entries"]:  # type: ignore[attr-defined]
        if d["type"] == "chunk":
            continue
        if d["name"] in pending:
            raise Mismatch(f"TOC names {d['name']!r} twice")
        pending[d["name"]] = toc_fields(d)
    checked = 0
    padding = 0
    for e in split_entries(layer.tar_split):
        if e.type != SEGMENT:
            continue
        payload = e.payload
        if len(payload) < padding:
            raise Mismatch("a segment shorter than the previous member's padding")
        parsed = parse_header(payload[padding:])
        padding = 0
        if parsed is None:
            continue
        hdr, padding = parsed
        toc = pending.pop(hdr.name, None)
        if toc is None:
            raise Mismatch(f"tar-split member {hdr.name!r} is not in the TOC (or twice)")
        if toc != hdr:
            diff = {k: (v, getattr(hdr, k)) for k, v in vars(toc).items() if v != getattr(hdr, k)}
            raise Mismatch(f"{hdr.name!r}: TOC and tar-split differ in {diff}")
        checked += 1
    if pending:
        raise Mismatch(f"TOC entries missing from the tar-split: {sorted(pending)[:5]}")
    return checked


def rebuild_tar(layer: Layer) -> bytes:
    """Segments, and each file's content read through the TOC entry of its raw name."""
    by_name = {d["name"]: d for d in layer.toc["entries"] if d["type"] == "reg"}  # type: ignore[attr-defined]
    out = bytearray()
    for e in split_entries(layer.tar_split):
        if e.type == SEGMENT:
            out += e.payload
        elif e.type == FILE and e.size:
            d = by_name[e.name]
            frames = layer.blob[d["offset"] : d["endOffset"]]
            data = (
                zstandard.ZstdDecompressor()
                .stream_reader(io.BytesIO(frames), read_across_frames=True)
                .read()
            )
            assert len(data) == e.size, e.name
            out += data
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Sources with awkward headers.


def _block(
    name: bytes,
    flag: bytes,
    *,
    mode: int = 0o644,
    size: int = 0,
    link: bytes = b"",
    magic: bytes = b"ustar\x0000",
    tail: dict[int, bytes] | None = None,
) -> bytes:
    """One header block written by hand (fields tarfile will not write)."""
    b = bytearray(BLOCK)
    b[0 : len(name)] = name
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b"%07o\0" % 0
    b[116:124] = b"%07o\0" % 0
    b[124:136] = b"%011o\0" % size
    b[136:148] = b"%011o\0" % MTIME
    b[156:157] = flag
    b[157 : 157 + len(link)] = link
    b[257 : 257 + len(magic)] = magic
    for at, raw in (tail or {}).items():
        b[at : at + len(raw)] = raw
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _data(b: bytes) -> bytes:
    return b + bytes(-len(b) % BLOCK)


def _members(tar: bytes) -> bytes:
    """``tar`` without its end-of-archive blocks, to append members to."""
    while tar.endswith(ZERO_BLOCK):
        tar = tar[:-BLOCK]
    return tar


def concat(*tars: bytes) -> bytes:
    """One tar holding the members of ``tars`` in order."""
    return b"".join(_members(t) for t in tars) + bytes(2 * BLOCK)


def _pax(items: list[tuple[str, dict[str, str], bytes]], **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, **kw) as tf:  # type: ignore[call-overload]
        for name, pax, data in items:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            info.size = len(data)
            info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def awkward_tars() -> dict[str, bytes]:
    """Source tars whose headers say more than a normalised TOC entry would."""
    long = "l" * 120
    gnu_times = {345: b"%011o\0" % (MTIME - 5), 357: b"%011o\0" % (MTIME - 9)}
    end = bytes(2 * BLOCK)
    return {
        # `tar -C dir .`: every name starts with ./, directories end in /.
        "dot-slash": make_tar(
            [
                Item(".", "dir", mode=0o755),
                Item("./etc", "dir", mode=0o755),
                Item("./etc/a", data=b"a" * 100),
                Item("./etc/h", "hardlink", link="./etc/a"),
                Item("./etc/s", "symlink", link="./a"),
            ]
        ),
        # Type bits in the mode field, a directory without its slash, a V7-style directory.
        "mode-type-bits": _block(b"usr", b"5", mode=0o40755)
        + _block(b"usr/f", b"0", mode=0o100644, size=5)
        + _data(b"hello")
        + _block(b"old/", b"\0", mode=0o755, magic=b"")
        + _block(b"old/f", b"\0", mode=0o644, size=3, magic=b"")
        + _data(b"abc")
        + end,
        "pax-times-xattrs": _pax(
            [
                ("d/", {"atime": "1700000100.25", "ctime": "1700000200"}, b""),
                (
                    "d/f",
                    {
                        "mtime": "1700000000.123456789",
                        "atime": "1700000001.5",
                        "SCHILY.xattr.user.a": "1",
                        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                        "LIBARCHIVE.xattr.user.b": "Mg",
                        "uname": "",
                    },
                    b"x" * 1000,
                ),
                ("d/empty-xattr", {"SCHILY.xattr.user.e": ""}, b""),
            ]
        ),
        "gnu-long-names": make_tar(
            [
                Item(long, "dir", mode=0o755),
                Item(long + "/" + "f" * 150, data=b"long\n"),
                Item("h", "hardlink", link=long + "/" + "f" * 150),
                Item("s", "symlink", link="t" * 200),
            ],
            fmt=tarfile.GNU_FORMAT,
        ),
        "gnu-atime-ctime": _block(b"g", b"0", size=2, magic=b"ustar  \0", tail=gnu_times)
        + _data(b"gg")
        + end,
        "ustar-prefix": make_tar(
            [Item("p/" + "q" * 120, "dir", mode=0o755), Item("p/" + "q" * 120 + "/f", data=b"f")],
            fmt=tarfile.USTAR_FORMAT,
        ),
        "devices": _members(
            make_tar(
                [
                    Item("dev", "dir", mode=0o755),
                    Item("dev/null", "char", mode=0o666, major=1, minor=3),
                    Item("dev/sda", "block", mode=0o660, major=8, minor=0),
                    Item("dev/fifo", "fifo"),
                ]
            )
        )
        # A regular file whose header also names a device: Go keeps the numbers.
        + _block(b"dev/odd", b"0", size=1, tail={329: b"%07o\0" % 7, 337: b"%07o\0" % 9})
        + _data(b"o")
        + end,
        "zeros": make_tar(
            [
                Item("z", data=bytes(300_000)),
                Item("e", data=b""),
                Item("r", data=seeded_bytes(9, 1)),
            ]
        ),
        "utf8": make_tar([Item("ünï ✓", data=b"u"), Item("a<b>&c", data=b"j")]),
    }


def unrepresentable_tars() -> dict[str, bytes]:
    """Sources containers/storage could not write as a layer that passes its own check (or,
    for device numbers on a file beyond Linux's, that lazyfs's TOC reader would refuse): a
    tar-split is left out of these (it then pulls the layer whole)."""
    end = bytes(2 * BLOCK)
    return {
        "global-pax": _pax([("a", {}, b"a")], pax_headers={"comment": "git archive"}),
        "duplicate": make_tar([Item("a", data=b"1"), Item("a", data=b"2")]),
        "contiguous": _block(b"c", b"7", size=1) + _data(b"c") + end,
        "device-on-file": _block(b"f", b"0", tail={329: b"%07o\0" % 0o7777777}) + end,
    }
