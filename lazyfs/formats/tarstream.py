"""A streaming tar reader that keeps every original byte.

:mod:`tarfile` parses headers well but hides their raw bytes and reads ahead, so it cannot be
used to recompress a layer without changing its tar stream.  This reader frames the stream
itself (512-byte blocks, PAX and GNU long-name headers) and borrows only
``TarInfo.frombuf`` for parsing one header block.  The lazy writers re-emit the raw bytes, so a
converted layer decompresses to exactly the source tar and its diff_id does not change.
"""

from __future__ import annotations

import base64
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from lazyfs.errors import FormatError
from lazyfs.formats.toc import (
    MAX_DEV_MAJOR,
    MAX_DEV_MINOR,
    Entry,
    EntryType,
    TarHeader,
    check_path,
    normalize_name,
)

BLOCK = 512
SCHILY = "SCHILY.xattr."
LIBARCHIVE = "LIBARCHIVE.xattr."

_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


# Formats as Go's archive/tar tells them apart (containers/storage reads headers with it).
USTAR_MAGIC = b"ustar\0"  # POSIX ustar and PAX; with STAR_TRAILER at 508, star
GNU_MAGIC = b"ustar  \0"  # old GNU (magic and version): atime/ctime where ustar has a prefix
STAR_TRAILER = b"tar\0"
# Earliest and latest times RFC 3339 (and so a TOC) can spell: years 1 to 9999.
_MIN_TIME_NS = -62135596800 * 1_000_000_000
_MAX_TIME_NS = 253402300799 * 1_000_000_000


@dataclass(slots=True)
class Member:
    """One tar member: its raw header blocks, its parsed entry, and its content size."""

    header: bytes
    entry: Entry
    size: int  # bytes of content that follow the header
    tar: TarHeader  # the header as spelt (the entry is its normalised form)
    padding: int = field(init=False)

    def __post_init__(self) -> None:
        self.padding = -self.size % BLOCK


class TarReader:
    """Iterate members of an uncompressed tar stream; read each member's content in order.

    Usage: ``for m in reader: data = reader.read(n) ...`` — content not read before the next
    iteration is skipped.  After iteration ``trailer`` holds the end-of-archive bytes.
    """

    def __init__(self, f: BinaryIO, *, where: str = "layer") -> None:
        self._f = f
        self._where = where
        self._left = 0  # unread content + padding of the current member
        self._content_left = 0
        self.trailer = b""
        self.position = 0

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self._f.read(n - len(buf))
            if not piece:
                raise FormatError(
                    f"{self._where}: truncated tar stream at byte {self.position + len(buf)}"
                )
            buf += piece
        self.position += n
        return bytes(buf)

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes of the current member's content."""
        n = min(n, self._content_left)
        if n <= 0:
            return b""
        data = self._read_exact(n)
        self._content_left -= n
        self._left -= n
        return data

    def _skip_rest(self) -> bytes:
        """Consume the current member's unread content and padding; return the padding."""
        while self._content_left:
            self.read(min(self._content_left, 1 << 20))
        pad = self._read_exact(self._left) if self._left else b""
        self._left = 0
        return pad

    @property
    def pending_padding(self) -> int:
        return self._left - self._content_left

    def take_padding(self) -> bytes:
        """After all content is read: the padding bytes before the next header."""
        return self._skip_rest()

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip_rest()
            member = self._next()
            if member is None:
                return
            self._content_left = member.size
            self._left = member.size + member.padding
            yield member

    def _next(self) -> Member | None:
        raw = bytearray()
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        global_pax = False
        while True:
            start = self.position
            first = self._f.read(BLOCK)
            if not first:
                if raw:
                    raise FormatError(f"{self._where}: truncated tar stream at byte {start}")
                # A stream that simply ends is accepted (some writers omit the trailer).
                return None
            if len(first) < BLOCK:
                first += self._read_exact_more(BLOCK - len(first))
            self.position = start + BLOCK
            if first == bytes(BLOCK):
                rest = self._f.read()
                self.trailer = first + rest
                self.position += len(rest)
                if raw:
                    raise FormatError(f"{self._where}: extended header without a member")
                return None
            try:
                info = tarfile.TarInfo.frombuf(first, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise FormatError(f"{self._where}: bad tar header at byte {start}: {e}") from e
            raw += first
            t = info.type
            if t in (
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            ):
                body = self._read_exact(info.size + (-info.size % BLOCK))
                raw += body
                payload = body[: info.size]
                if t == tarfile.XHDTYPE:
                    pax.update(_parse_pax(payload, self._where, start))
                elif t == tarfile.GNUTYPE_LONGNAME:
                    long_name = _cstr(payload)
                elif t == tarfile.GNUTYPE_LONGLINK:
                    long_link = _cstr(payload)
                else:
                    # Global PAX headers only carry defaults we do not use; their bytes are
                    # kept with the next member's.
                    global_pax = True
                continue
            if t in (tarfile.GNUTYPE_SPARSE,) or any(k.startswith("GNU.sparse") for k in pax):
                raise FormatError(
                    f"{self._where}: sparse tar members are not supported "
                    f"({info.name!r} at byte {start})"
                )
            try:
                header = _tar_header(first, info, pax, long_name, long_link)
            except ValueError as e:
                raise FormatError(f"{self._where}: bad tar header at byte {start}: {e}") from e
            kind = _kind(first[156:157], header.name)
            if kind is None:
                raise FormatError(
                    f"{self._where}: unsupported tar member type {t!r} for {info.name!r}"
                )
            if header.size < 0:
                raise FormatError(f"{self._where}: negative size for {info.name!r}")
            problem = header.unrepresentable
            if global_pax:
                problem = "a global PAX header (Go's reader returns it as a member)"
            elif t == tarfile.CONTTYPE:
                problem = "a contiguous-file member (type 7)"
            elif header.size and kind != "reg":
                problem = f"content on a {kind} member (Go's reader skips none)"
            elif kind not in ("char", "block") and not (
                0 <= header.dev_major <= MAX_DEV_MAJOR and 0 <= header.dev_minor <= MAX_DEV_MINOR
            ):
                # Kept out of the TOC, whose reader refuses them (they mean nothing here).
                header.dev_major = header.dev_minor = 0
                problem = f"device numbers out of range on a {kind}"
            if problem:
                header.unrepresentable = problem
            return Member(bytes(raw), _entry(header, kind, info, pax), header.size, header)

    def _read_exact_more(self, n: int) -> bytes:
        data = self._f.read(n)
        while len(data) < n:
            piece = self._f.read(n - len(data))
            if not piece:
                raise FormatError(f"{self._where}: truncated tar header at byte {self.position}")
            data += piece
        return data


def _cstr(field: bytes) -> str:
    """A string field as Go reads it: up to the first NUL."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_KINDS: dict[bytes, EntryType] = {**_TYPES, tarfile.AREGTYPE: "reg"}


def _kind(typeflag: bytes, name: str) -> EntryType | None:
    # Old V7 archives mark a directory by the trailing slash of its (final) name only.
    if typeflag == tarfile.AREGTYPE and name.endswith("/"):
        return "dir"
    return _KINDS.get(typeflag)


def _tar_header(
    block: bytes,
    info: tarfile.TarInfo,
    pax: dict[str, str],
    long_name: str | None,
    long_link: str | None,
) -> TarHeader:
    """What Go's archive/tar makes of a member's header block and its extensions.

    ``tarfile`` parses the numbers alike but not the rest: it strips a directory's trailing
    slash, joins a GNU header's atime field onto the name as if it were a ustar prefix and
    reads no atime/ctime.  Empty PAX values leave the block's value, as in Go; a GNU long
    name wins over a PAX path."""
    problem = ""
    name = _cstr(block[:100])
    atime = ctime = 0
    dev_major = dev_minor = 0
    magic = block[257:263]
    if magic == USTAR_MAGIC or block[257:265] == GNU_MAGIC:
        dev_major, dev_minor = info.devmajor, info.devminor  # V7 headers have no such fields
    if magic == USTAR_MAGIC:
        star = block[508:512] == STAR_TRAILER
        prefix = _cstr(block[345:476] if star else block[345:500])
        if prefix:
            name = prefix + "/" + name
        if star:
            atime = _header_time(block[476:488])
            ctime = _header_time(block[488:500])
    elif block[257:265] == GNU_MAGIC:
        try:
            atime = _header_time(block[345:357]) if block[345] else 0
            ctime = _header_time(block[357:369]) if block[357] else 0
        except tarfile.HeaderError:
            # Go then guesses the fields are a ustar prefix written by old Go: not worth
            # following.
            atime = ctime = 0
            problem = "GNU access/change time fields that do not parse"
    link = _cstr(block[157:257])
    h = TarHeader(
        name=long_name or name,
        link_name=long_link or link,
        mode=info.mode,
        size=info.size,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=int(info.mtime) * 1_000_000_000,
        atime_ns=atime,
        ctime_ns=ctime,
        dev_major=dev_major,
        dev_minor=dev_minor,
    )
    if pax:  # most members have no PAX records
        h.name = long_name or pax.get("path") or name
        h.link_name = long_link or pax.get("linkpath") or link
        h.size = int(pax.get("size") or h.size)
        h.uid = int(pax.get("uid") or h.uid)
        h.gid = int(pax.get("gid") or h.gid)
        if pax.get("mtime"):
            h.mtime_ns = _pax_time(pax["mtime"])
        if pax.get("atime"):
            h.atime_ns = _pax_time(pax["atime"])
        if pax.get("ctime"):
            h.ctime_ns = _pax_time(pax["ctime"])
        h.xattrs = {
            k[len(SCHILY) :]: v.encode("utf-8", "surrogateescape")
            for k, v in pax.items()
            if k.startswith(SCHILY)
        }
    if not (
        _MIN_TIME_NS <= h.atime_ns <= _MAX_TIME_NS and _MIN_TIME_NS <= h.ctime_ns <= _MAX_TIME_NS
    ):
        h.atime_ns = h.ctime_ns = 0
        problem = "an access or change time out of the range a TOC can carry"
    if h.mode < 0:
        h.mode, problem = h.mode & 0o7777, "a negative mode"
    h.unrepresentable = problem
    return h


def _header_time(field: bytes) -> int:
    seconds: int = tarfile.nti(field)  # type: ignore[attr-defined]  # public, undocumented
    return seconds * 1_000_000_000


def _parse_pax(payload: bytes, where: str, at: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        sp = payload.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(payload[pos:sp])
        except ValueError as e:
            raise FormatError(f"{where}: bad PAX record at byte {at}") from e
        record = payload[sp + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise FormatError(f"{where}: bad PAX record at byte {at}")
        key, _, value = record[:-1].partition(b"=")
        # Values are UTF-8 except xattrs, which are raw bytes; keep them lossless.
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _entry(h: TarHeader, kind: EntryType, info: tarfile.TarInfo, pax: dict[str, str]) -> Entry:
    xattrs: dict[str, bytes] = {}
    for k, v in pax.items():  # in record order: a later record for the same xattr wins
        if k.startswith(SCHILY):
            xattrs[k[len(SCHILY) :]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith(LIBARCHIVE):
            xattrs[k[len(LIBARCHIVE) :]] = base64.b64decode(v + "==")
    if kind == "symlink":
        check_path(h.link_name, "link target", components=False)  # as a TOC's are checked
    return Entry(
        name=normalize_name(h.name),
        type=kind,
        mode=h.mode & 0o7777,
        uid=h.uid,
        gid=h.gid,
        uname=pax.get("uname") or info.uname,
        gname=pax.get("gname") or info.gname,
        size=h.size if kind == "reg" else 0,
        mtime_ns=h.mtime_ns,
        link_name=normalize_name(h.link_name) if kind == "hardlink" else h.link_name,
        dev_major=h.dev_major if kind in ("char", "block") else 0,
        dev_minor=h.dev_minor if kind in ("char", "block") else 0,
        xattrs=xattrs,
    )


def _pax_time(s: str) -> int:
    neg = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    ns = int(whole or 0) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns
