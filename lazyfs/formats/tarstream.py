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
from lazyfs.formats.toc import Entry, EntryType, normalize_name

BLOCK = 512

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


GNU_MAGIC = b"ustar  \0"  # old GNU headers, whose atime/ctime fields Go reads


@dataclass(slots=True)
class Member:
    """One tar member: its raw header blocks, its parsed entry, and its content size."""

    header: bytes
    entry: Entry
    size: int  # bytes of content that follow the header
    # As the header spells them (Go's archive/tar reads these), before normalisation.
    raw_name: str = ""
    raw_link: str = ""
    # The header carries what a TOC entry does not: type bits in the mode, access or change
    # times, libarchive-style xattrs.
    extra: bool = False
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
                    long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif t == tarfile.GNUTYPE_LONGLINK:
                    long_link = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                # Global PAX headers only carry defaults we do not use; their bytes are kept.
                continue
            if t in (tarfile.GNUTYPE_SPARSE,) or any(k.startswith("GNU.sparse") for k in pax):
                raise FormatError(
                    f"{self._where}: sparse tar members are not supported "
                    f"({info.name!r} at byte {start})"
                )
            kind = _TYPES.get(t)
            if kind is None:
                raise FormatError(
                    f"{self._where}: unsupported tar member type {t!r} for {info.name!r}"
                )
            raw_name = pax.get("path") or long_name or info.name
            if info.isdir() and not ("path" in pax or long_name) and _name_field(first)[-1:] == "/":
                raw_name += "/"  # TarInfo drops a directory's trailing slash; the header has it
            return Member(
                bytes(raw),
                _entry(info, kind, pax, long_name, long_link),
                _size(info, pax, kind),
                raw_name=raw_name,
                raw_link=pax.get("linkpath") or long_link or info.linkname,
                extra=bool(info.mode & ~0o7777)
                or "atime" in pax
                or "ctime" in pax
                or any(k.startswith("LIBARCHIVE.xattr.") for k in pax)
                or (first[257:265] == GNU_MAGIC and any(first[345:369])),
            )

    def _read_exact_more(self, n: int) -> bytes:
        data = self._f.read(n)
        while len(data) < n:
            piece = self._f.read(n - len(data))
            if not piece:
                raise FormatError(f"{self._where}: truncated tar header at byte {self.position}")
            data += piece
        return data


def _name_field(block: bytes) -> str:
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


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


def _size(info: tarfile.TarInfo, pax: dict[str, str], kind: str) -> int:
    size = int(pax["size"]) if "size" in pax else info.size
    if size < 0:
        raise FormatError(f"negative size for {info.name!r}")
    # Only regular files carry content; a hardlink with a size would be unusual but its
    # bytes still have to be consumed to stay in frame.
    return size if kind in ("reg", "hardlink") or size else 0


def _entry(
    info: tarfile.TarInfo,
    kind: EntryType,
    pax: dict[str, str],
    long_name: str | None,
    long_link: str | None,
) -> Entry:
    name = pax.get("path") or long_name or info.name
    link = pax.get("linkpath") or long_link or info.linkname
    mtime = pax.get("mtime")
    mtime_ns = _pax_time(mtime) if mtime else int(info.mtime) * 1_000_000_000
    xattrs: dict[str, bytes] = {}
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            xattrs[k[len("SCHILY.xattr.") :]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            xattrs[k[len("LIBARCHIVE.xattr.") :]] = base64.b64decode(v + "==")
    if kind == "reg" and info.type == tarfile.AREGTYPE and name.endswith("/"):
        kind = "dir"  # old V7 archives mark directories with a trailing slash only
    return Entry(
        name=normalize_name(name),
        type=kind,
        mode=info.mode & 0o7777,
        uid=int(pax["uid"]) if "uid" in pax else info.uid,
        gid=int(pax["gid"]) if "gid" in pax else info.gid,
        uname=pax.get("uname", info.uname),
        gname=pax.get("gname", info.gname),
        size=_size(info, pax, kind) if kind == "reg" else 0,
        mtime_ns=mtime_ns,
        link_name=normalize_name(link) if kind == "hardlink" else link,
        dev_major=info.devmajor if kind in ("char", "block") else 0,
        dev_minor=info.devminor if kind in ("char", "block") else 0,
        xattrs=xattrs,
    )


def _pax_time(s: str) -> int:
    neg = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    ns = int(whole or 0) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns
