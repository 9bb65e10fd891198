"""The table of contents: one model for eStargz and zstd:chunked layers.

Two wire schemas (``EStargzTOC`` / ``ZstdChunkedTOC``) are decoded with msgspec at the edge and
normalised into :class:`TOC`, whose :class:`Entry` objects carry their content as a tuple of
:class:`Chunk` that tiles the file exactly.  Everything past :func:`decode_toc` can rely on the
invariants :func:`validate` checks, so no other module re-checks names, sizes or offsets.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime as _dt
import itertools
import operator
import posixpath
import re
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, TypeVar, cast, overload

import msgspec

from lazyfs.errors import FormatError
from lazyfs.formats.columns import RawDigests, narrow, raw_sha256

if TYPE_CHECKING:
    from lazyfs.formats.chunklist import ChunkList

# Entry kinds shared by both formats ("chunk" only exists on the wire).
EntryType = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]
ENTRY_TYPES: frozenset[str] = frozenset(EntryType.__args__)  # type: ignore[attr-defined]  # a Literal's members
_TYPES: dict[str, EntryType] = {t: t for t in EntryType.__args__}  # type: ignore[attr-defined]
_DEVICES = ("char", "block")

# A name with no empty, "." or ".." component and no leading or trailing slash is normal.
_PLAIN_NAME = re.compile(r"(?!\.\.?(?:/|$))[^/\x00]+(?:/(?!\.\.?(?:/|$))[^/\x00]+)*")

# A TOC larger than this is refused before decoding: it bounds memory for hostile layers.
MAX_TOC_BYTES = 256 * 1024 * 1024
# What all the TOCs of one image may hold together (README "Memory"): a mount keeps about
# 1 KiB per entry, and decoding costs at most ~17 bytes per JSON byte while it runs.
MAX_IMAGE_ENTRIES = 1_000_000
MAX_IMAGE_TOC_BYTES = 512 * 1024 * 1024

# What one chunk may decode to (inner offset included).  Big chunks are decoded to disk, not
# memory (store.bigchunk), so this only refuses the absurd: containers/storage's rolling hash
# has no upper bound and cuts real chunks of hundreds of MiB; a store whose cache cannot hold
# a chunk answers its readers EIO.  Hole ("zeros") chunks hold no data and are not capped.
MAX_CHUNK_SIZE = 4 * 1024**3
# Linux limits: what stat, readdir and mknod can show (anything larger would overflow later).
NAME_MAX = 255  # bytes per path component
PATH_MAX = 4096  # bytes per path, including the NUL
MAX_ID = 2**32 - 2  # uid/gid; 2**32 - 1 means "no change" to chown
MAX_DEV_MAJOR = 2**12 - 1
MAX_DEV_MINOR = 2**20 - 1
MAX_OFFSET = 2**62  # file sizes and blob offsets: far beyond any real file, inside off_t
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

# "none": chunks are plain ranges of an uncompressed tar (a layer without a TOC, indexed locally).
Compression = Literal["zstd", "gzip", "none"]


# Shared by every entry without xattrs (most of them); entries are never mutated in place.
_NO_XATTRS: dict[str, bytes] = {}
# Modes are a handful of values over 256 (CPython's small-int cache): one object per value.
_MODES: dict[int, int] = {}


def _own_int(n: int) -> int:
    return n + 0 if n > 256 else n  # a new object above the small-int cache


# Values below this (sizes of small files, ids) repeat across a layer's entries: one object
# per distinct value per TOC, from a table that lives while the TOC decodes.
SHARED_INT_BELOW = 1 << 16


def _shared_int(n: int, ints: dict[int, int]) -> int:
    if n <= 256 or n >= SHARED_INT_BELOW:
        return _own_int(n)
    own = ints.get(n)
    if own is None:
        own = ints[n] = n + 0
    return own


class Chunk(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One independently fetchable, verifiable piece of a regular file.

    ``offset:end`` is the compressed byte range in the blob (whole zstd frames or gzip members);
    decompressing it and skipping ``inner`` bytes yields ``size`` bytes of file content that
    belong at ``file_offset`` and hash to ``digest``.  ``zeros`` chunks hold a hole: nothing is
    fetched for them.
    """

    file_offset: int
    size: int
    offset: int
    end: int
    digest: str
    inner: int = 0
    zeros: bool = False


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A filesystem entry of one layer.  ``name`` is normalised: relative, no ``..``, no ``/``
    at either end; the root directory is ``""``."""

    name: str
    type: EntryType
    mode: int = 0o644  # permission and suid/sgid/sticky bits only; type comes from ``type``
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    size: int = 0
    mtime_ns: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = {}
    digest: str = ""  # sha256 of the whole content, for regular files
    chunks: tuple[Chunk, ...] = ()


class TOC(msgspec.Struct, kw_only=True):
    compression: Compression
    entries: Sequence[Entry]  # a list, or an EntryTable (entries made when asked for)
    # End of the file-content region: no chunk may reach past it (the TOC itself starts here).
    data_end: int
    # Where a prefetch landmark starts, or 0: the chunks before it are the layer's prefetch
    # set, laid out first in rank order by ``lazyfs convert --prefetch`` (or ctr-remote).
    prefetch_end: int = 0

    def by_name(self, keep: Callable[[str], bool] | None = None) -> Mapping[str, Entry]:
        """Entries by name (the last of a repeated name, as a tar reader keeps it), only the
        names ``keep`` takes if given.  For an :class:`EntryTable` only the names are indexed
        and an entry is made when looked up: a prefetch resolving a few hundred paths must
        not make all of a layer's entries (nor all 1,300 of Debian's zoneinfo it keeps)."""
        entries = self.entries
        if isinstance(entries, EntryTable):
            return _EntriesByName(entries, entries.rows_named(keep))
        return {e.name: e for e in entries if keep is None or keep(e.name)}

    def files_before(self, end: int) -> list[Entry]:
        """The regular files whose first chunk starts before blob offset ``end``, in blob
        order: a re-laid-out layer's prefetch set.  A table makes only those entries."""
        if isinstance(self.entries, EntryTable):
            return [self.entries[i] for i in self.entries.files_starting_before(end)]
        files = [e for e in self.entries if e.type == "reg" and e.chunks]
        files = [e for e in files if e.chunks[0].offset < end]
        files.sort(key=lambda e: e.chunks[0].offset)
        return files


class TarHeader(msgspec.Struct, kw_only=True, gc=False):
    """A member's header as Go's archive/tar reads it, unnormalised: what containers/storage
    derives a zstd:chunked TOC entry from, and compares the TOC with (through the tar-split)
    before it partial-pulls a layer.  Names and links as spelt (``./etc/``), the mode with any
    type bits, access and change times, device numbers on any type, ``SCHILY.xattr.`` records
    only.  Times are nanoseconds, 0 for none."""

    name: str
    link_name: str = ""
    mode: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = {}
    #: Why containers/storage could not accept a tar-split for a layer holding this header
    #: (its own reader would type or frame it differently); empty when it can.
    unrepresentable: str = ""


# --------------------------------------------------------------------------------------------
# Wire schemas.  Field names follow the peers' JSON exactly; unknown fields are ignored so a
# newer writer's extra keys do not break us.


# Range checks run in msgspec's decoder (C), not per entry in Python: a number out of range is
# refused with the field and entry index named.
_Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_OFFSET)]
_Mode = Annotated[int, msgspec.Meta(ge=0)]
_Major = Annotated[int, msgspec.Meta(ge=0, le=MAX_DEV_MAJOR)]
_Minor = Annotated[int, msgspec.Meta(ge=0, le=MAX_DEV_MINOR)]


#: The entry types on the wire: decoded as these very strings, none made per entry (~0.5 ms
#: of the Debian TOC's decode); a TOC with another is decoded again as _LooseWireEntry.
_WireType = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]


class _WireEntry(msgspec.Struct, kw_only=True, gc=False):
    type: _WireType
    name: str
    size: _Offset = 0
    modtime: str | None = None
    linkName: str = ""
    mode: _Mode = 0
    uid: _Id = 0
    gid: _Id = 0
    userName: str = ""
    groupName: str = ""
    devMajor: _Major = 0
    devMinor: _Minor = 0
    xattrs: dict[str, str] | None = None
    # lazyfs's own key: xattrs a header gives besides SCHILY.xattr records (LIBARCHIVE.xattr),
    # kept out of ``xattrs`` where containers/storage expects exactly the SCHILY ones.
    lazyfsXattrs: dict[str, str] | None = None
    digest: str = ""
    offset: _Offset = 0
    endOffset: _Offset = 0
    innerOffset: _Offset = 0
    chunkOffset: _Offset = 0
    chunkSize: _Offset = 0
    chunkDigest: str = ""
    chunkType: str = ""


class _WireTOC(msgspec.Struct):
    version: int
    entries: list[_WireEntry]


class _LooseWireEntry(_WireEntry, kw_only=True, gc=False):
    """A wire entry of any type: what refuses an unknown one names its entry."""

    type: str  # type: ignore[assignment]


class _LooseWireTOC(msgspec.Struct):
    version: int
    entries: list[_LooseWireEntry]


_wire_decoder = msgspec.json.Decoder(_WireTOC)
_loose_wire_decoder = msgspec.json.Decoder(_LooseWireTOC)


def _parse_time(s: str | None) -> int:
    if not s:
        return 0
    try:
        # Go writes RFC 3339 with up to nanoseconds; Python parses microseconds, so split.
        base, frac, tz = s, "", ""
        if "." in s:
            base, rest = s.split(".", 1)
            i = 0
            while i < len(rest) and rest[i].isdigit():
                i += 1
            frac, tz = rest[:i], rest[i:]
        else:
            for sep in ("Z", "+", "-"):
                pos = s.rfind(sep)
                if pos > 10:
                    base, tz = s[:pos], s[pos:]
                    break
        if tz in ("Z", "z", ""):
            tz = "+00:00"
        t = _dt.datetime.fromisoformat(base + tz)
        ns = int((frac + "000000000")[:9]) if frac else 0
        return int(t.timestamp()) * 1_000_000_000 + ns
    except ValueError as e:
        raise FormatError(f"bad modtime {s!r}") from e


# How Go writes a UTC time: parsed without datetime (a TOC holds thousands of distinct ones).
_UTC_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)
_EPOCH_DAY = _dt.date(1970, 1, 1).toordinal()


# Many such times, each on its own line, hours, minutes and seconds in range: one match
# checks them all.
_UTC_TIMES = re.compile(
    r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,9})?Z\n)*"
)


def _parse_times(times: Collection[str | None]) -> dict[str | None, int]:
    """Each of ``times`` (distinct) in nanoseconds, as :func:`_parse_time` reads it: column
    by column when each is a UTC time as Go writes it, else one by one."""
    given = [s for s in times if s]
    lines = "\n".join(given) + "\n"
    if lines.count("\n") == len(given) and _UTC_TIMES.fullmatch(lines):
        try:
            days = {
                d: _dt.date.fromisoformat(d).toordinal() - _EPOCH_DAY
                for d in dict.fromkeys([s[:10] for s in given])
            }
        except ValueError:
            return _parse_times_each(times)  # not a date: refused in _parse_time's words
        # "YYYY-MM-DDTHH:MM:SS" is 19 characters; a fraction follows its dot.  One int per
        # time of day (HHMMSS: an int() is the cost), made seconds by arithmetic.
        hms = [int(s[11:13] + s[14:16] + s[17:19]) for s in given]
        seconds = [
            days[s[:10]] * 86400 + t - t // 10000 * 6400 - t // 100 % 100 * 40
            for s, t in zip(given, hms, strict=True)
        ]
        fractions = [int(s[20:-1].ljust(9, "0")) if len(s) > 20 else 0 for s in given]
        out: dict[str | None, int] = dict.fromkeys([s for s in times if not s], 0)
        out.update(
            (s, t * 1_000_000_000 + f) for s, t, f in zip(given, seconds, fractions, strict=True)
        )
        return out
    return _parse_times_each(times)


def _parse_times_each(times: Iterable[str | None]) -> dict[str | None, int]:
    days: dict[str, int] = {}  # a layer's times fall on a few days
    out: dict[str | None, int] = {}
    for s in times:
        m = _UTC_TIME.fullmatch(s) if s else None
        if m is None:
            out[s] = _parse_time(s)
            continue
        date, hour, minute, second, frac = m.groups()
        h, mi, sec = int(hour), int(minute), int(second)
        day = days.get(date)
        if day is None and h < 24 and mi < 60 and sec < 60:
            with contextlib.suppress(ValueError):  # not a date: refused below
                day = days[date] = _dt.date.fromisoformat(date).toordinal() - _EPOCH_DAY
        if day is None or not (h < 24 and mi < 60 and sec < 60):
            out[s] = _parse_time(s)  # refused, in its words
            continue
        ns = int((frac + "00000000")[:9]) if frac else 0
        out[s] = ((day * 24 + h) * 60 + mi) * 60_000_000_000 + sec * 1_000_000_000 + ns
    return out


def format_time(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    t = _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return t + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


def normalize_name(name: str) -> str:
    """Normalise a layer path; refuse anything that could escape the root."""
    if name and _PLAIN_NAME.fullmatch(name):
        return name  # the common case, already normal: no normpath per entry
    if "\x00" in name:
        raise FormatError(f"entry name contains NUL: {name!r}")
    if name.startswith("/"):
        raise FormatError(f"entry name is absolute: {name!r}")
    norm = posixpath.normpath(name) if name else "."
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        raise FormatError(f"entry name escapes the root: {name!r}")
    return norm


class TocBudget:
    """What the TOCs of one image may hold together, charged layer by layer (layers decode
    in worker threads, or in steps on an event loop's, hence the lock).  Bounds a mount's memory for
    any image, however its entries are spread over layers."""

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        self.max_entries = MAX_IMAGE_ENTRIES if max_entries is None else max_entries
        self.max_bytes = MAX_IMAGE_TOC_BYTES if max_bytes is None else max_bytes
        self.entries = 0
        self.bytes = 0
        self._lock = threading.Lock()
        # One layer decodes at a time: its transient cost (JSON + wire structs) is not
        # multiplied by the layer count.  msgspec holds the GIL anyway.
        self.decoding = threading.Lock()

    def charge(self, json_bytes: int, entries: int) -> None:
        with self._lock:
            if self.bytes + json_bytes > self.max_bytes:
                raise FormatError(
                    f"the image's TOCs exceed {self.max_bytes} bytes together; refusing it"
                )
            if self.entries + entries > self.max_entries:
                raise FormatError(
                    f"the image's TOCs exceed {self.max_entries} entries together; refusing it"
                )
            self.bytes += json_bytes
            self.entries += entries

    def refund(self, entries: int) -> None:
        with self._lock:
            self.entries -= entries


def _short(name: str) -> str:
    # Hostile names can be megabytes long: error messages stay one short line.
    return repr(name) if len(name) <= 80 else repr(name[:60]) + f"… ({len(name)} characters)"


def check_path(name: str, what: str = "entry name", *, components: bool = True) -> None:
    """Refuse a path no kernel can show: a component over NAME_MAX bytes (unless
    ``components`` is False: a symlink's target is only a string), a path over PATH_MAX, or
    characters that do not encode, or a NUL (the kernel would cut a link's target there)."""
    if "\x00" in name:
        raise FormatError(f"{what} {_short(name)} contains a NUL")
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"{what} {_short(name)} is not encodable") from None
    if components and len(raw) > NAME_MAX and any(len(p) > NAME_MAX for p in raw.split(b"/")):
        raise FormatError(f"{what} {_short(name)} has a component over {NAME_MAX} bytes")
    if len(raw) >= PATH_MAX:
        raise FormatError(f"{what} {_short(name)} is {len(raw)} bytes, over PATH_MAX")


def _xattrs(w: _WireEntry) -> dict[str, bytes]:
    wire_xattrs = w.xattrs or {}
    if w.lazyfsXattrs:
        wire_xattrs = wire_xattrs | w.lazyfsXattrs
    xattrs: dict[str, bytes] = {}
    for k, v in wire_xattrs.items():
        if not k or "\x00" in k or len(k.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
            raise FormatError(f"bad xattr name {_short(k)} on {_short(w.name)}")
        try:
            xattrs[k] = base64.b64decode(v, validate=True)
        except ValueError as e:
            raise FormatError(f"xattr {_short(k)} of {_short(w.name)} is not base64") from e
        if len(xattrs[k]) > XATTR_SIZE_MAX:
            raise FormatError(f"xattr {_short(k)} of {_short(w.name)} is over {XATTR_SIZE_MAX}")
    return xattrs


# --------------------------------------------------------------------------------------------
# A decoded TOC as columns: what the TOC cache keeps, so that a mount rebuilds the entries
# without parsing, normalising and checking the JSON again (about a third of the time).
# Numbers are native-endian arrays: the cache is this machine's own.

_KINDS: tuple[EntryType, ...] = EntryType.__args__  # type: ignore[attr-defined]  # index = kind code
_KIND_CODES = {k: i for i, k in enumerate(_KINDS)}
_PACK_VERSION = 2


class _Packed(msgspec.Struct, array_like=True):
    version: int
    compression: Compression
    data_end: int
    prefetch_end: int
    names: list[str]
    kinds: bytes  # _KINDS index per entry
    numbers: bytes  # array("q"): every entry's mode, then uid, gid, size, mtime index
    owners: list[str]  # distinct user and group names
    owner_of: bytes  # array("I"): every entry's uname index, then gname index
    times: list[int]  # distinct mtimes
    digests: list[str]
    links: dict[int, str]  # by entry index: the few entries with a link
    devices: dict[int, tuple[int, int]]
    xattrs: dict[int, dict[str, bytes]]
    chunk_counts: bytes  # array("I") per entry
    chunks: bytes  # array("q"): every chunk's file_offset, then size, offset, end, inner, zeros
    chunk_digests: list[str | None]  # per chunk; None: its file's digest (a file's only chunk)


def pack_toc(toc: TOC) -> bytes:
    """``toc`` as columns (msgpack), for :func:`unpack_toc`.  Column by column, so that the
    only temporaries are a few large lists (a mount packs a fetched TOC before its tree)."""
    return msgspec.msgpack.encode(_pack(toc))


def _pack(toc: TOC) -> _Packed:
    entries = toc.entries
    owners: dict[str, int] = {}
    times: dict[int, int] = {}
    links = {i: e.link_name for i, e in enumerate(entries) if e.link_name}
    devices = {
        i: (e.dev_major, e.dev_minor) for i, e in enumerate(entries) if e.dev_major or e.dev_minor
    }
    xattrs = {i: e.xattrs for i, e in enumerate(entries) if e.xattrs}
    numbers = array("q")
    for column in (
        [e.mode for e in entries],
        [e.uid for e in entries],
        [e.gid for e in entries],
        [e.size for e in entries],
        [times.setdefault(e.mtime_ns, len(times)) for e in entries],
    ):
        numbers.extend(column)
    owner_of = array("I", [owners.setdefault(e.uname, len(owners)) for e in entries])
    owner_of.extend([owners.setdefault(e.gname, len(owners)) for e in entries])
    every = [c for e in entries for c in e.chunks]
    chunks = array("q")
    for chunk_column in (
        [c.file_offset for c in every],
        [c.size for c in every],
        [c.offset for c in every],
        [c.end for c in every],
        [c.inner for c in every],
        [c.zeros for c in every],
    ):
        chunks.extend(chunk_column)
    chunk_digests: list[str | None] = [
        None if len(e.chunks) == 1 and c.digest == e.digest else c.digest
        for e in entries
        for c in e.chunks
    ]
    return _Packed(
        version=_PACK_VERSION,
        compression=toc.compression,
        data_end=toc.data_end,
        prefetch_end=toc.prefetch_end,
        names=[e.name for e in entries],
        kinds=bytes([_KIND_CODES[e.type] for e in entries]),
        numbers=numbers.tobytes(),
        owners=list(owners),
        owner_of=owner_of.tobytes(),
        times=list(times),
        digests=[e.digest for e in entries],
        links=links,
        devices=devices,
        xattrs=xattrs,
        chunk_counts=array("I", [len(e.chunks) for e in entries]).tobytes(),
        chunks=chunks.tobytes(),
        chunk_digests=chunk_digests,
    )


_packed_decoder = msgspec.msgpack.Decoder(_Packed)


def decode_toc(
    data: bytes | list[bytes],
    *,
    compression: Compression,
    blob_size: int,
    data_end: int | None = None,
    budget: TocBudget | None = None,
    reserved: Collection[str] = (),
    landmark: str = "",
) -> TOC:
    """Decode and validate a TOC JSON document from either format, charging ``budget``.
    ``reserved``: names of the writers' own files, checked and then left out; the offset of
    ``landmark``'s first chunk is the TOC's ``prefetch_end``.  ``data`` in a list: the list
    is emptied, so that the JSON is freed once decoded, before the columns are built (an
    argument stays referenced by the caller until the call returns)."""
    held = data if isinstance(data, list) else [data]
    del data
    packed = msgspec.msgpack.encode(
        _decode_packed(held, compression, blob_size, data_end, budget, reserved, landmark)
    )
    # The entries made from the packed bytes: nothing they keep was allocated among the wire
    # structs (see decode_toc_table).
    cols = _columns(packed)
    p = cols.packed
    entries = _unpack_entries(p, cols.numbers, cols.owner_of, cols.counts, cols.flat)
    return TOC(
        compression=p.compression,
        entries=entries,
        data_end=p.data_end,
        prefetch_end=p.prefetch_end,
    )


def decode_toc_table(
    data: bytes | list[bytes],
    *,
    compression: Compression,
    blob_size: int,
    data_end: int | None = None,
    budget: TocBudget | None = None,
    reserved: Collection[str] = (),
    landmark: str = "",
) -> tuple[bytes, TOC]:
    """:func:`decode_toc`'s TOC with its entries an :class:`EntryTable`, no :class:`Entry`
    made, and the table's packed bytes (:func:`pack_toc`'s, for the TOC cache).  The wire
    entries are decoded straight into columns; the table is made from their packed bytes
    once the wire structs are freed, so none of its objects sits among them (a few small
    survivors in the interpreter's pools keep whole freed arenas resident).  ``data``: as
    :func:`decode_toc` takes it."""
    budget = TocBudget(max_bytes=MAX_TOC_BYTES) if budget is None else budget
    steps = decode_toc_table_steps(
        data,
        compression=compression,
        blob_size=blob_size,
        data_end=data_end,
        budget=budget,
        reserved=reserved,
        landmark=landmark,
    )
    del data
    with budget.decoding:
        return run_steps(steps)


_T = TypeVar("_T")

#: A decode cut into steps: it yields between them (each a few tens of milliseconds of CPU
#: at most for a TOC of ~10k entries), and returns its result.
Steps = Generator[None, None, _T]


def run_steps(steps: Steps[_T]) -> _T:
    """The result of ``steps``, run through without a pause."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(_T, done.value)


def decode_toc_table_steps(
    data: bytes | list[bytes],
    *,
    compression: Compression,
    blob_size: int,
    data_end: int | None = None,
    budget: TocBudget,
    reserved: Collection[str] = (),
    landmark: str = "",
) -> Steps[tuple[bytes, TOC]]:
    """:func:`decode_toc_table` in steps, for a caller that lets other work run between
    them (an event loop reading its sockets); the caller holds ``budget.decoding`` (which
    the steps do not take) from the first step to the last."""
    held = data if isinstance(data, list) else [data]
    del data
    p = yield from _packed_steps(held, compression, blob_size, data_end, budget, reserved, landmark)
    yield
    rows, end, prefetch_end = len(p.names), p.data_end, p.prefetch_end
    packed = msgspec.msgpack.encode(p)
    del p
    try:
        table = EntryTable(packed)
    except FormatError:
        budget.refund(rows)
        raise
    return packed, TOC(
        compression=compression,
        entries=table,
        data_end=end,
        prefetch_end=prefetch_end,
    )


def _decode_packed(
    held: list[bytes],
    compression: Compression,
    blob_size: int,
    data_end: int | None,
    budget: TocBudget | None,
    reserved: Collection[str],
    landmark: str,
) -> _Packed:
    if budget is None:
        budget = TocBudget(max_bytes=MAX_TOC_BYTES)
    steps = _packed_steps(held, compression, blob_size, data_end, budget, reserved, landmark)
    with budget.decoding:
        return run_steps(steps)


def _packed_steps(
    held: list[bytes],
    compression: Compression,
    blob_size: int,
    data_end: int | None,
    budget: TocBudget,
    reserved: Collection[str],
    landmark: str,
) -> Steps[_Packed]:
    """The JSON in ``held`` (emptied) as checked columns: its decode into wire structs,
    then (a step later) the columns; the caller holds ``budget.decoding``."""
    data = held.pop()
    if len(data) > MAX_TOC_BYTES:
        raise FormatError(f"TOC is {len(data)} bytes, over the {MAX_TOC_BYTES}-byte cap")
    end = blob_size if data_end is None else data_end
    # A chunk's end not given is this one's (a footer's offset: up to 2**64): held in the
    # packed columns' signed 64 bits only when it is a blob offset the wire schema allows.
    if not 0 <= end <= MAX_OFFSET:
        raise FormatError(f"the layer's data ends at {end}, past {MAX_OFFSET}")
    # Every entry is a JSON object, so the count of "{" bounds the entries from above before
    # decoding spends memory on them; the exact count replaces it afterwards.  (A bound from
    # the JSON's length saved ~1 ms but, held while the layer decodes, it is many times the
    # entries (18x Debian's) and refused another layer charged on the image's budget meanwhile.)
    guess = data.count(b"{")
    budget.charge(len(data), guess)
    try:
        try:
            wire = _wire_decoder.decode(data)
        except msgspec.ValidationError:
            # An entry type not known, say: decoded again with any type, so that it is
            # refused below with its entry named (other errors are the same again).
            wire = cast(_WireTOC, _loose_wire_decoder.decode(data))
    except msgspec.ValidationError as e:
        raise FormatError(f"TOC does not match the schema: {e}") from e
    except msgspec.DecodeError as e:
        raise FormatError(f"TOC is not valid JSON: {e}") from e
    finally:
        budget.refund(guess)
    # The JSON is freed before the columns are built: not alive beside them at the peak.
    del data
    rows = len(wire.entries)
    budget.charge(0, rows)
    try:
        yield
        return (yield from _wire_column_steps(wire.entries, compression, end, reserved, landmark))
    except FormatError:
        budget.refund(rows)  # a refused layer (a bad cached copy, say) holds nothing
        raise


# A wire entry's type as a kind code; "chunk" (a file's later chunk) only exists on the wire.
_CHUNK_CODE = len(_KINDS)
_WIRE_CODES: dict[str, int] = {k: i for i, k in enumerate((*_KINDS, "chunk"))}
_REG, _DIR, _HARDLINK = (_WIRE_CODES[k] for k in ("reg", "dir", "hardlink"))
_DEVICE_CODES = frozenset(_WIRE_CODES[k] for k in _DEVICES)
# Up to this many rare cases (chunk ends to find, hardlinks to check) take a Python step
# each; more, a pass over a whole column.
_FEW = 64
# Kind codes as bytes, translated: 0 for a "chunk" entry, 1 for any other.
_NOT_CHUNK = bytes(int(c != _CHUNK_CODE) for c in range(256))


def _wire_columns(
    wire: list[_WireEntry],
    compression: Compression,
    data_end: int,
    reserved: Collection[str],
    landmark: str,
) -> _Packed:
    """The wire entries as :class:`_Packed` columns, each file's chunk entries folded into it,
    checked as :func:`validate` checks entries, without making one :class:`Entry`.  Column by
    column (comprehensions, C scans); only the rare entries (links, xattrs, odd names, files
    of several chunks) take a Python step each."""
    return run_steps(_wire_column_steps(wire, compression, data_end, reserved, landmark))


def _wire_column_steps(
    wire: list[_WireEntry],
    compression: Compression,
    data_end: int,
    reserved: Collection[str],
    landmark: str,
) -> Steps[_Packed]:
    """:func:`_wire_columns` in two steps: names and chunks, then the rest."""
    codes = [_WIRE_CODES.get(w.type) for w in wire]
    if None in codes:
        w = wire[codes.index(None)]
        raise FormatError(f"unknown entry type {w.type!r} for {w.name!r}")
    kinds = cast(list[int], codes)
    # A file's "chunk" entries (its later chunks) follow its wire entry: where they are.
    later = _chunk_entries(wire, kinds) if _CHUNK_CODE in kinds else []
    if later:
        kept = bytes(kinds).translate(_NOT_CHUNK)
        es = list(itertools.compress(wire, kept))
        kinds = list(itertools.compress(kinds, kept))
    else:
        es = wire
    count = len(es)
    names = _normal_names([w.name for w in es])

    # Chunks: a file's wire entry is its first chunk; its "chunk" entries follow it.
    sizes = [w.size if c == _REG else 0 for c, w in zip(kinds, es, strict=True)]
    files = list(itertools.compress(range(count), sizes))
    if not later:
        owner, parts, last = files, [es[k] for k in files], None
    else:
        # The entry a chunk entry belongs to: the last entry before it (k chunk entries
        # come before the k-th, so its file is entry i - k - 1).
        more = [i - k - 1 for k, i in enumerate(later)]
        # Sorted merges of two sorted runs (C): each file's entry, then its chunk entries.
        owner = sorted(files + more)
        heads = list(itertools.compress(range(len(wire)), kept))
        parts = list(map(wire.__getitem__, sorted([heads[k] for k in files] + later)))
        last = list(map(operator.ne, owner, [*owner[1:], -1]))
    head = parts if not later else [es[o] for o in owner]
    c_fo = [w.chunkOffset for w in parts]
    c_size = [w.chunkSize or (h.size - w.chunkOffset) for w, h in zip(parts, head, strict=True)]
    c_zeros = [w.chunkType == "zeros" for w in parts]
    c_digest = [
        w.chunkDigest or (h.digest if s == h.size else "")
        for w, h, s in zip(parts, head, c_size, strict=True)
    ]
    if "" in c_digest:
        for w, h, d, z in zip(parts, head, c_digest, c_zeros, strict=True):
            if not d and not z:
                raise FormatError(f"chunk at {w.chunkOffset} of {h.name!r} has no digest")
    c_offset = [w.offset for w in parts]
    c_inner = [w.innerOffset for w in parts]
    # zstd:chunked gives ``endOffset`` once, on the file entry: the end of its last chunk.
    # Every other end is the next distinct content offset, or where the TOC begins.
    if last is None:
        c_end = [h.endOffset for h in head]
    else:
        c_end = [h.endOffset if t else 0 for h, t in zip(head, last, strict=True)]
    unknown = c_end.count(0)
    if unknown:
        if unknown > _FEW:  # eStargz (no end given anywhere): every chunk at once
            starts = sorted({*c_offset, data_end})
            after = dict(itertools.pairwise(starts))  # none after the last: its end stays 0
            c_end = [
                e or (0 if z else after.get(o, 0))
                for e, z, o in zip(c_end, c_zeros, c_offset, strict=True)
            ]
        else:  # a few chunk entries: each found by a C scan
            # In blob order already, mostly: sorting is a C pass.  With repeats, bisect_right
            # still finds the next distinct start.
            starts = sorted([*c_offset, data_end])
            m = -1
            for _ in range(unknown):
                m = c_end.index(0, m + 1)
                if not c_zeros[m]:
                    i = bisect.bisect_right(starts, c_offset[m])
                    if i < len(starts):
                        c_end[m] = starts[i]
    counts = array("I", map(bool, sizes))  # one chunk per file with content
    if later:
        for o in more:
            counts[o] += 1
    c_digests: list[str | None] = [
        None if counts[o] == 1 and d == h.digest else d
        for o, d, h in zip(owner, c_digest, head, strict=True)
    ]

    yield
    # The entries' own columns.
    modes = [w.mode & 0o7777 for w in es]
    uids = [w.uid for w in es]
    gids = [w.gid for w in es]
    modtimes = [w.modtime for w in es]
    times: dict[int, int] = {}
    time_of: dict[str | None, int] = {}
    for s, ns in _parse_times(dict.fromkeys(modtimes)).items():
        if not -(2**63) <= ns < 2**63:  # stat's nanoseconds are a signed 64-bit number
            name = names[modtimes.index(s)]
            raise FormatError(f"modtime {s!r} of {_short(name)} is out of range")
        time_of[s] = times.setdefault(ns, len(times))
    owners: dict[str, int] = {}
    unames = [owners.setdefault(w.userName, len(owners)) for w in es]
    gnames = [owners.setdefault(w.groupName, len(owners)) for w in es]
    links: dict[int, str] = {}
    for k in [k for k, w in enumerate(es) if w.linkName]:
        link, hard = es[k].linkName, kinds[k] == _HARDLINK
        if hard:
            link = normalize_name(link)
        check_path(link, "link target", components=hard)
        links[k] = link
    devices = (
        {
            k: (w.devMajor, w.devMinor)
            for k, (c, w) in enumerate(zip(kinds, es, strict=True))
            if c in _DEVICE_CODES and (w.devMajor or w.devMinor)
        }
        if _DEVICE_CODES.intersection(kinds)
        else {}
    )
    xattrs = {k: _xattrs(w) for k, w in enumerate(es) if w.xattrs or w.lazyfsXattrs}
    digests = [w.digest for w in es]
    columns = _Wire(
        names, kinds, sizes, links, owner, counts, c_fo, c_size, c_offset, c_end, c_inner, c_zeros
    )
    if not _valid(columns, data_end):
        # Something is wrong (or this check cannot tell): the entries say what, as validate
        # words it.  Only a bad (or unusual) TOC makes them.
        validate(TOC(compression=compression, entries=_wire_entries(columns), data_end=data_end))

    prefetch_end = 0
    drop = sorted(k for name in reserved for k in _rows_named(names, name))
    if drop:
        chunk_at = _ends(counts)
        for k in drop:
            if names[k] == landmark and counts[k]:
                prefetch_end = c_offset[chunk_at[k]]
        entry_columns: list[list[Any]] = [
            names,
            kinds,
            modes,
            uids,
            gids,
            sizes,
            modtimes,
            unames,
            gnames,
            digests,
        ]
        chunk_columns: list[list[Any]] = [
            c_fo,
            c_size,
            c_offset,
            c_end,
            c_inner,
            c_zeros,
            c_digests,
        ]
        for k in reversed(drop):
            for col in entry_columns:
                del col[k]
            for col in chunk_columns:
                del col[chunk_at[k] : chunk_at[k + 1]]
            del counts[k]
        links, devices, xattrs = _shift(links, drop), _shift(devices, drop), _shift(xattrs, drop)
    numbers = _int_bytes("q", modes, uids, gids, sizes, [time_of[s] for s in modtimes])
    owner_of = _int_bytes("I", unames, gnames)
    flat = _int_bytes("q", c_fo, c_size, c_offset, c_end, c_inner, c_zeros)
    return _Packed(
        version=_PACK_VERSION,
        compression=compression,
        data_end=data_end,
        prefetch_end=prefetch_end,
        names=names,
        kinds=bytes(kinds),
        numbers=numbers,
        owners=list(owners),
        owner_of=owner_of,
        times=list(times),
        digests=digests,
        links=links,
        devices=devices,
        xattrs=xattrs,
        chunk_counts=counts.tobytes(),
        chunks=flat,
        chunk_digests=c_digests,
    )


def _int_bytes(code: str, *columns: Sequence[int]) -> bytes:
    """``columns`` one after another as an array of ``code`` would hold them (struct packs
    a list in C: ``array.extend`` converts number by number through the argument parser),
    each column on its own: the five of a TOC of 8.2k entries chained into one list first
    took 0.3 ms more."""
    try:
        return b"".join([struct.pack(f"{len(c)}{code}", *c) for c in columns])
    except struct.error as e:  # as array's own conversion refuses a number out of range
        raise OverflowError(str(e)) from None


def _chunk_entries(wire: list[_WireEntry], codes: list[int]) -> list[int]:
    """Where the "chunk" entries are in ``wire``; each must follow a file with content (or
    another of its chunks).  A step per chunk entry, none per other entry."""
    found: list[int] = []
    at = codes.index(_CHUNK_CODE)
    while at >= 0:
        before = at - 1
        if not (found and found[-1] == before) and (
            before < 0 or codes[before] != _REG or not wire[before].size
        ):
            raise FormatError(f"chunk entry for {wire[at].name!r} does not follow its file")
        found.append(at)
        try:
            at = codes.index(_CHUNK_CODE, at + 1)
        except ValueError:
            at = -1
    return found


def _normal_names(names: list[str]) -> list[str]:
    """``names`` normalised and checked as :func:`normalize_name` and
    :func:`check_path` do, a Python step only for a name that needs one."""
    joined = "\x00" + "\x00".join(names) + "\x00"
    # Every trailing slash (a directory's) dropped in one C pass; an odd name is normalised
    # below from its own spelling.
    stripped = joined.replace("/\x00", "\x00")
    parts = stripped[1:-1].split("\x00")
    odd: Sequence[int] = []
    if len(parts) != len(names):
        odd = range(len(names))  # a name holds NUL: normalize_name says which
    else:
        # The names with something to normalise, found by C scans of them joined (a scan for
        # one character is the quickest): an empty component ("", "/a", "a//b", "a//") or a
        # component ending in a dot ("." or ".." if the character before it says so).
        flat = stripped.replace("/", "\x00")
        found = list(_finds(flat, "\x00\x00"))
        for at in _finds(flat, ".\x00"):
            if flat[at - 1] == "\x00" or (flat[at - 1] == "." and flat[at - 2] == "\x00"):
                found.append(at)
        if found:
            seps = list(itertools.accumulate((len(n) + 1 for n in parts), initial=0))
            odd = sorted({bisect.bisect_right(seps, at) - 1 for at in found})
        given = [names[k] for k in odd]
        names = parts
        for k, name in zip(odd, given, strict=True):
            names[k] = name
    for k in odd:
        names[k] = normalize_name(names[k])
    if not joined.isascii() or max(map(len, names), default=0) > NAME_MAX:
        for name in names:
            if len(name) > NAME_MAX or not name.isascii():
                check_path(name)  # a shorter ASCII name fits in NAME_MAX and PATH_MAX as it is
    return names


_Text = TypeVar("_Text", str, bytes)


def _finds(text: _Text, part: _Text) -> Iterator[int]:
    """Where ``part`` occurs in ``text``, overlaps included."""
    at = text.find(part)
    while at >= 0:
        yield at
        at = text.find(part, at + 1)


class _Wire(NamedTuple):
    """What :func:`validate` looks at, as the columns :func:`_wire_columns` builds."""

    names: list[str]
    kinds: list[int]
    sizes: list[int]
    links: dict[int, str]
    owner: list[int]  # the entry of each chunk
    counts: array[int]
    c_fo: list[int]
    c_size: list[int]
    c_offset: list[int]
    c_end: list[int]
    c_inner: list[int]
    c_zeros: list[bool]


def _valid(w: _Wire, data_end: int) -> bool:
    """Whether the columns hold what :func:`validate` accepts.  False when they may not: a
    hardlink whose target's name repeats is left to it."""
    if "" in w.names and any(not n and c != _DIR for n, c in zip(w.names, w.kinds, strict=True)):
        return False
    if w.c_size and min(w.c_size) <= 0:
        return False
    if len(w.owner) == len(set(w.owner)):  # each file one chunk: it starts at 0, holds it all
        if any(w.c_fo) or w.c_size != list(map(w.sizes.__getitem__, w.owner)):
            return False
    else:
        # A file's chunks are together, in order: each starts where the one before it in the
        # same file ends (a file's first at 0), and its last ends at the file's size.
        first = list(map(operator.ne, w.owner, [-1, *w.owner[:-1]]))
        ends = list(map(operator.add, w.c_fo, w.c_size))
        if w.c_fo != [0 if f else e for f, e in zip(first, [0, *ends[:-1]], strict=True)]:
            return False
        last = [*first[1:], True]
        files = itertools.compress(w.owner, last)
        if list(itertools.compress(ends, last)) != list(map(w.sizes.__getitem__, files)):
            return False
    if True in w.c_zeros:
        if not all(
            z or (o < e <= data_end and i + s <= MAX_CHUNK_SIZE)
            for z, o, e, i, s in zip(
                w.c_zeros, w.c_offset, w.c_end, w.c_inner, w.c_size, strict=True
            )
        ):
            return False
    elif w.c_end and not (
        all(map(operator.lt, w.c_offset, w.c_end))
        and max(w.c_end) <= data_end
        and max(map(operator.add, w.c_inner, w.c_size) if any(w.c_inner) else w.c_size)
        <= MAX_CHUNK_SIZE
    ):
        return False  # offsets and inner offsets are >= 0 (the wire schema's bounds)
    if _HARDLINK in w.kinds:
        hardlinks = list(_finds(bytes(w.kinds), bytes([_HARDLINK])))
        latest = _latest(w.names, {w.links.get(k, "") for k in hardlinks})
        for k in hardlinks:
            target = latest.get(w.links.get(k, ""))
            # Not an earlier entry's name, or the latest of several: left to validate.
            if target is not None and (target >= k or w.kinds[target] == _DIR):
                return False
    return True


def _latest(names: list[str], wanted: set[str]) -> dict[str, int]:
    """Where each of ``wanted`` is last in ``names`` (if anywhere)."""
    if len(wanted) > _FEW:
        return {n: k for n, k in zip(names, range(len(names)), strict=True) if n in wanted}
    latest = {}
    for name in wanted:
        for k in _rows_named(names, name):
            latest[name] = k
    return latest


def _rows_named(names: list[str], name: str) -> Iterator[int]:
    """Where ``name`` is in ``names``, in order: each found by a C scan."""
    k = -1
    with contextlib.suppress(ValueError):
        while True:
            k = names.index(name, k + 1)
            yield k


def _wire_entries(w: _Wire) -> list[Entry]:
    """The columns as the entries :func:`validate` checks (only what it looks at)."""
    entries: list[Entry] = []
    at = _ends(w.counts)
    for k, name in enumerate(w.names):
        chunks = (
            Chunk(w.c_fo[m], w.c_size[m], w.c_offset[m], w.c_end[m], "", w.c_inner[m], w.c_zeros[m])
            for m in range(at[k], at[k + 1])
        )
        e = Entry(name=name, type=_KINDS[w.kinds[k]], size=w.sizes[k], chunks=tuple(chunks))
        e.link_name = w.links.get(k, "")
        entries.append(e)
    return entries


_V = TypeVar("_V")


def _shift(by_index: dict[int, _V], dropped: list[int]) -> dict[int, _V]:
    """``by_index`` (keyed by entry index) once the ``dropped`` entries are gone."""
    gone = set(dropped)
    return {k - bisect.bisect_left(dropped, k): v for k, v in by_index.items() if k not in gone}


class _Columns(msgspec.Struct):
    """A packed TOC's number columns, checked against one another."""

    packed: _Packed
    numbers: array[int]
    owner_of: array[int]
    counts: array[int]
    flat: array[int]


def _columns(data: bytes) -> _Columns:
    """``data`` (:func:`pack_toc`) decoded, its columns' lengths checked (not its values)."""
    if len(data) > MAX_TOC_BYTES:
        raise FormatError(f"packed TOC is {len(data)} bytes, over the {MAX_TOC_BYTES}-byte cap")
    try:
        p = _packed_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise FormatError(f"packed TOC is damaged: {e}") from e
    return _checked(p)


def _checked(p: _Packed) -> _Columns:
    if p.version != _PACK_VERSION:
        raise FormatError(f"packed TOC of version {p.version}, not {_PACK_VERSION}")
    count = len(p.names)
    numbers, owner_of = array("q"), array("I")
    counts, flat = array("I"), array("q")
    try:
        numbers.frombytes(p.numbers)
        owner_of.frombytes(p.owner_of)
        counts.frombytes(p.chunk_counts)
        flat.frombytes(p.chunks)
    except ValueError as e:
        raise FormatError(f"packed TOC is damaged: {e}") from e
    chunk_total = sum(counts)
    if not (
        len(p.kinds) == len(p.digests) == len(counts) == count
        and len(numbers) == 5 * count
        and len(owner_of) == 2 * count
        and len(flat) == 6 * chunk_total == 6 * len(p.chunk_digests)
    ):
        raise FormatError("packed TOC is damaged: its columns differ in length")
    return _Columns(p, numbers, owner_of, counts, flat)


def unpack_toc(data: bytes, *, budget: TocBudget | None = None) -> TOC:
    """The TOC :func:`pack_toc` packed, the same values shared as :func:`decode_toc` shares
    them, validated again; charging ``budget``."""
    cols = _columns(data)
    p = cols.packed
    count = len(p.names)
    if budget is None:
        budget = TocBudget(max_bytes=MAX_TOC_BYTES)
    budget.charge(len(data), count)
    try:
        toc = TOC(
            compression=p.compression,
            entries=_unpack_entries(p, cols.numbers, cols.owner_of, cols.counts, cols.flat),
            data_end=p.data_end,
            prefetch_end=p.prefetch_end,
        )
        validate(toc)
    except (IndexError, KeyError, OverflowError, ValueError) as e:
        budget.refund(count)
        raise FormatError(f"packed TOC is damaged: {e!r}") from None
    except FormatError:
        budget.refund(count)
        raise
    return toc


def table_toc(data: bytes, *, budget: TocBudget | None = None) -> TOC:
    """The TOC :func:`pack_toc` packed, its entries an :class:`EntryTable` (made on demand);
    charging ``budget``.  Not validated again: only for bytes packed from a TOC that was (the
    TOC cache, checked against its sha256), since validating makes every entry."""
    cols = _columns(data)
    p = cols.packed
    if budget is None:
        budget = TocBudget(max_bytes=MAX_TOC_BYTES)
    budget.charge(len(data), len(p.names))
    try:
        table = EntryTable(cols)
    except FormatError:
        budget.refund(len(p.names))
        raise
    return TOC(
        compression=p.compression,
        entries=table,
        data_end=p.data_end,
        prefetch_end=p.prefetch_end,
    )


class EntryTable(Sequence[Entry]):
    """A layer's entries kept as columns, each :class:`Entry` made when asked for (equal each
    time, not the same object).  Names are one string with the end of each; sha256 digests 32
    bytes each; numbers in the narrowest array that holds them; chunk columns that are all 0
    (file offsets of one-chunk files, inner offsets, holes) not kept.  At 100k one-chunk files:
    8 MiB, where the entries :func:`unpack_toc` makes (with their names, digests, chunks, the
    chunks' ints and tuples) hold 49 MiB; a few µs an entry made.  Give it only what
    :func:`unpack_toc` accepted: the columns' lengths are checked here, their values there."""

    __slots__ = (
        "_chunk_at",
        "_chunk_digests",
        "_chunks",
        "_count",
        "_devices",
        "_digests",
        "_kinds",
        "_links",
        "_name_ends",
        "_names",
        "_numbers",
        "_owner_of",
        "_owners",
        "_times",
        "_xattrs",
    )

    def __init__(self, data: bytes | _Columns) -> None:
        cols = _columns(data) if isinstance(data, bytes) else data
        p = cols.packed
        self._count = count = len(p.names)
        raw = raw_sha256(p.digests)
        self._digests: _Digests = p.digests if raw is None else RawDigests(raw)
        self._kinds = p.kinds
        self._owners = [sys.intern(o) for o in p.owners]
        self._times = p.times
        self._links, self._devices, self._xattrs = p.links, p.devices, p.xattrs
        try:
            self._names, self._name_ends = "".join(p.names), _ends(p.names)
            # Where each entry's chunks start in the chunk columns (and the last one's end).
            self._chunk_at = _ends(cols.counts)
            # mode, uid, gid, size, mtime index: each in the narrowest array that holds it
            self._numbers = tuple(
                narrow(cols.numbers[k * count : (k + 1) * count]) for k in range(5)
            )
            self._owner_of = narrow(cols.owner_of)
            total = len(p.chunk_digests)
            # file offset, size, offset, end, inner, zeros; None: all 0
            self._chunks = tuple(
                narrow(col) if col.tobytes().strip(b"\0") else None
                for col in (cols.flat[k * total : (k + 1) * total] for k in range(6))
            )
        except OverflowError as e:
            raise FormatError(f"packed TOC is damaged: {e}") from None
        self._chunk_digests = p.chunk_digests

    def __len__(self) -> int:
        return self._count

    def rows(self) -> Iterator[tuple[str, EntryType]]:
        """Each entry's name and type, in order, without making its :class:`Entry` (what a
        tree is built from)."""
        names, ends = self._names, self._name_ends
        # Iterators in C (a slice per name, a kind per code): no Python step per row.
        named = map(names.__getitem__, map(slice, ends, itertools.islice(ends, 1, None)))
        return zip(named, map(_KINDS.__getitem__, self._kinds), strict=True)

    def rows_named(self, keep: Callable[[str], bool] | None = None) -> dict[str, int]:
        """The rows of the names ``keep`` takes (all without it), by name (the last row of a
        repeated name): one pass over the names, no entry made and no kind looked up."""
        names, ends = self._names, self._name_ends
        named = map(names.__getitem__, map(slice, ends, ends[1:]))
        if keep is None:
            return {name: i for i, name in enumerate(named)}
        return {name: i for i, name in enumerate(named) if keep(name)}

    def mentions(self, text: str) -> bool:
        """Whether some entry's name holds ``text`` (a layer without whiteouts has no ``.wh.``)."""
        return text in self._names

    def files_starting_before(self, end: int) -> list[int]:
        """Rows of the regular files with chunks whose first chunk starts before ``end``, in
        blob order (TOC order among equals), without making their entries."""
        reg, kinds, at = _KIND_CODES["reg"], self._kinds, self._chunk_at
        offset = self._chunks[2]
        first = [
            (offset[at[i]] if offset else 0, i)
            for i in range(self._count)
            if kinds[i] == reg and at[i + 1] > at[i]
        ]
        first.sort()
        return [i for start, i in first if start < end]

    def kind_mode(self, i: int) -> tuple[EntryType, int]:
        """Entry ``i``'s type and mode, without making it."""
        return _KINDS[self._kinds[i]], self._numbers[0][i]

    def link_name(self, i: int) -> str:
        return self._links.get(i, "")

    def has_xattr(self, key: str) -> bool:
        """Whether any entry has the xattr ``key``."""
        return any(key in x for x in self._xattrs.values())

    def stat_fields(self, i: int) -> tuple[EntryType, int, int, int, int, int, int]:
        """Entry ``i``'s type, uid, gid, size, mtime_ns and device numbers, without making it
        (with its chunks): a LOOKUP's or a listing's attributes need only these."""
        _, uid, gid, size, mtime = self._numbers
        major, minor = self._devices.get(i, (0, 0))
        return _KINDS[self._kinds[i]], uid[i], gid[i], size[i], self._times[mtime[i]], major, minor

    def chunks(self) -> ChunkList:
        """Every entry's chunks in order, as ``entry.chunks`` would give them, as columns (a
        layer's chunk list at mount), sharing this table's columns where it can: neither the
        entries nor their chunks are made."""
        from lazyfs.formats.chunklist import ChunkList  # imports this

        file_offset, c_size, offset, end, inner, zeros = self._chunks
        total = len(self._chunk_digests)
        at = self._chunk_at
        counts = list(map(operator.sub, itertools.islice(at, 1, None), at))
        # The entry of each chunk: each file with chunks, and a file of several again for
        # each chunk after its first (few: merged in, a sort of two sorted runs in C).
        rows = range(self._count)
        several = list(itertools.compress(rows, map(operator.gt, counts, itertools.repeat(1))))
        owners = list(itertools.compress(rows, counts))
        if several:
            owners = sorted(owners + [i for i in several for _ in range(counts[i] - 1)])
        # A chunk's size is its file's, but for the chunks of files of several.
        size_of = list(map(self._numbers[3].__getitem__, owners))
        if c_size is not None:
            for i in several:
                size_of[at[i] : at[i + 1]] = c_size[at[i] : at[i + 1]]
        size = narrow(size_of)
        owner = array("I", owners)
        fd, given = self._digests, self._chunk_digests
        named = [d for d in given if d is not None]  # chunks not spelt as their file's digest
        raw = raw_sha256(named) if isinstance(fd, RawDigests) else None
        digests: bytes | list[str]
        slots = None
        if raw is not None and not named:  # each chunk has its file's digest: shared
            digests, slots = fd.raw, owner  # type: ignore[union-attr]
        elif raw is not None and len(named) * 8 <= total:
            # A few chunks of their own (files of several chunks): the files' digests and
            # theirs after them, each chunk's slot its file's but for those few.  Joining a
            # slice a chunk took ~1.1 ms at 6.6k chunks (4 of them named), a mount waiting.
            digests, slots = fd.raw + raw, owner  # type: ignore[union-attr]
            has_own = map(operator.is_not, given, itertools.repeat(None))
            own_rows = itertools.compress(range(total), has_own)
            for k, m in enumerate(own_rows, len(fd.raw) // 32):  # type: ignore[union-attr]
                slots[m] = k
        elif raw is not None:
            whole, own = memoryview(fd.raw), memoryview(raw)  # type: ignore[union-attr]
            n = itertools.count(0, 32)
            digests = b"".join(
                [
                    whole[32 * o : 32 * o + 32] if d is None else own[(k := next(n)) : k + 32]
                    for o, d in zip(owner, given, strict=True)
                ]
            )
        else:
            digests = [fd[o] if d is None else d for o, d in zip(owner, given, strict=True)]
        none = array("B", bytes(total))
        return ChunkList(
            file_offsets=file_offset,
            sizes=size,
            offsets=offset if offset is not None else none,
            ends=end if end is not None else none,
            inners=inner,
            zeros=zeros,
            digests=digests,
            slots=slots,
        )

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Entry]: ...
    def __getitem__(self, i: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("entry index out of range")
        mode, uid, gid, size, mtime = self._numbers
        digest = self._digests[i]
        e = Entry(
            name=self._names[self._name_ends[i] : self._name_ends[i + 1]],
            type=_KINDS[self._kinds[i]],
            mode=mode[i],
            uid=uid[i],
            gid=gid[i],
            uname=self._owners[self._owner_of[i]],
            gname=self._owners[self._owner_of[self._count + i]],
            size=size[i],
            mtime_ns=self._times[mtime[i]],
            link_name=self._links.get(i, ""),
            xattrs=self._xattrs.get(i, _NO_XATTRS),
            digest=digest,
        )
        if i in self._devices:
            e.dev_major, e.dev_minor = self._devices[i]
        first, last = self._chunk_at[i], self._chunk_at[i + 1]
        if first < last:
            file_offset, c_size, offset, end, inner, zeros = self._chunks
            digests = self._chunk_digests
            e.chunks = tuple(
                [
                    Chunk(
                        file_offset[m] if file_offset else 0,
                        e.size if last - first == 1 or not c_size else c_size[m],
                        offset[m] if offset else 0,
                        end[m] if end else 0,
                        digest if digests[m] is None else digests[m],  # type: ignore[arg-type]
                        inner[m] if inner else 0,
                        bool(zeros[m]) if zeros else False,
                    )
                    for m in range(first, last)
                ]
            )
        return e


class _EntriesByName(Mapping[str, Entry]):
    """A table's entries by name, each made when looked up."""

    def __init__(self, table: EntryTable, rows: dict[str, int]) -> None:
        self._table = table
        self._rows = rows

    def __getitem__(self, name: str) -> Entry:
        return self._table[self._rows[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def has_xattr(entries: Sequence[Entry], key: str) -> bool:
    """Whether any of a TOC's entries has the xattr ``key`` (a table's without making them)."""
    if isinstance(entries, EntryTable):
        return entries.has_xattr(key)
    return any(key in e.xattrs for e in entries)


_Digests = RawDigests | list[str]


def _ends(parts: Sequence[str] | array[int]) -> array[int]:
    """The end of each piece of ``parts`` put end to end (lengths, or strings), after a 0."""
    lengths = parts if isinstance(parts, array) else map(len, parts)
    return array("I", _int_bytes("I", list(itertools.accumulate(lengths, initial=0))))


def _unpack_entries(
    p: _Packed, numbers: array[int], owner_of: array[int], counts: array[int], flat: array[int]
) -> list[Entry]:
    entries: list[Entry] = []
    append = entries.append
    ints: dict[int, int] = {}
    owners = [sys.intern(o) for o in p.owners]
    times, links, devices, xattrs = p.times, p.links, p.devices, p.xattrs
    rare = set(links) | set(devices) | set(xattrs)
    # Column by column (C), then one zip: no index arithmetic per entry.
    count, total = len(p.names), len(p.chunk_digests)
    modes, uids, gids, sizes, mtimes = (
        numbers[k * count : (k + 1) * count].tolist() for k in range(5)
    )
    rows = zip(
        p.names,
        p.kinds,
        modes,
        uids,
        gids,
        sizes,
        mtimes,
        owner_of[:count].tolist(),
        owner_of[count:].tolist(),
        p.digests,
        counts.tolist(),
        strict=True,
    )
    c_file_offset, c_size, c_offset, c_end, c_inner, c_zeros = (
        flat[k * total : (k + 1) * total].tolist() for k in range(6)
    )
    chunk_digests = p.chunk_digests
    n = 0  # chunks so far
    for i, (name, code, mode, uid, gid, size, t, un, gn, digest, k) in enumerate(rows):
        e = Entry(
            name=name,
            type=_KINDS[code],
            mode=_MODES.setdefault(mode, mode),
            uid=uid if uid <= 256 else _shared_int(uid, ints),
            gid=gid if gid <= 256 else _shared_int(gid, ints),
            uname=owners[un],
            gname=owners[gn],
            size=_shared_int(size, ints),
            mtime_ns=times[t],
            xattrs=_NO_XATTRS,  # not left to the default: msgspec would copy it per entry
            digest=digest,
        )
        if i in rare:
            e.link_name = links.get(i, "")
            e.dev_major, e.dev_minor = devices.get(i, (0, 0))
            e.xattrs = xattrs.get(i, _NO_XATTRS)
        if k == 1:
            offset, end, one = c_offset[n], c_end[n], chunk_digests[n]
            e.chunks = (
                Chunk(
                    c_file_offset[n],
                    e.size,  # what validate checks the only chunk tiles
                    ints.get(offset) or offset,
                    ints.get(end) or ints.setdefault(end, end),
                    digest if one is None else one,
                    c_inner[n],
                    bool(c_zeros[n]),
                ),
            )
        elif k:
            chunks: list[Chunk] = []
            for m in range(n, n + k):
                offset, end, digest = c_offset[m], c_end[m], chunk_digests[m]
                if digest is None:
                    raise FormatError(
                        "packed TOC is damaged: a chunk of several has no digest of its own"
                    )
                chunks.append(
                    Chunk(
                        c_file_offset[m],
                        _shared_int(c_size[m], ints),
                        ints.get(offset) or offset,
                        ints.get(end) or ints.setdefault(end, end),
                        digest,
                        _shared_int(c_inner[m], ints),
                        bool(c_zeros[m]),
                    )
                )
            e.chunks = tuple(chunks)
        n += k
        append(e)
    return entries


def validate(toc: TOC) -> None:
    """Check the invariants the rest of lazyfs relies on; raise FormatError naming the entry."""
    seen: dict[str, Entry] = {}
    for e in toc.entries:
        if e.type not in ENTRY_TYPES:
            raise FormatError(f"unknown entry type {e.type!r} for {e.name!r}")
        if e.size < 0:
            raise FormatError(f"negative size for {e.name!r}")
        if e.name == "" and e.type != "dir":
            raise FormatError("the root entry must be a directory")
        if e.type == "reg":
            pos = 0
            for c in e.chunks:
                if c.file_offset != pos or c.size <= 0:
                    raise FormatError(f"chunks of {e.name!r} do not tile the file at {pos}")
                if not c.zeros and not (0 <= c.offset < c.end <= toc.data_end):
                    raise FormatError(
                        f"chunk at {c.file_offset} of {e.name!r} lies outside the blob "
                        f"({c.offset}..{c.end}, data ends at {toc.data_end})"
                    )
                if c.inner < 0:
                    raise FormatError(f"negative inner offset in {e.name!r}")
                if not c.zeros and c.inner + c.size > MAX_CHUNK_SIZE:
                    # inner + size is what decompression must produce to verify the chunk.
                    raise FormatError(
                        f"chunk at {c.file_offset} of {_short(e.name)} needs "
                        f"{c.inner + c.size} bytes, over the {MAX_CHUNK_SIZE}-byte chunk cap"
                    )
                pos += c.size
            if pos != e.size:
                raise FormatError(f"chunks of {e.name!r} cover {pos} of {e.size} bytes")
        elif e.chunks:
            raise FormatError(f"{e.type} entry {e.name!r} has content chunks")
        if e.type == "hardlink":
            # A target outside this layer may come from a lower one (the merged tree checks
            # that); one inside must be an earlier entry that can be linked.
            target = seen.get(e.link_name)
            if target is not None and target.type == "dir":
                raise FormatError(f"hardlink {e.name!r} targets a directory")
        seen[e.name] = e


# --------------------------------------------------------------------------------------------
# Encoding back to the wire.


def encode_toc(
    entries: Sequence[Entry],
    *,
    flavour: Literal["estargz", "zstd:chunked"],
    tar_split_digest: str = "",
    headers: Sequence[TarHeader] | None = None,
) -> bytes:
    """Encode entries as the given format's TOC JSON (deterministic key order);
    ``tar_split_digest``: zstd:chunked's ``tarSplitDigest`` (the compressed tar-split's).

    ``headers`` (zstd:chunked, one per entry): the members' headers as spelt; each entry then
    carries what containers/storage derives from its header (raw name and link, raw mode,
    times, device numbers, SCHILY xattrs) so that it matches the tar-split, and the xattrs
    lazyfs sees beyond those under ``lazyfsXattrs``.  :func:`decode_toc` normalises them back
    into the same entries."""
    out: list[dict[str, object]] = []
    zstd = flavour == "zstd:chunked"
    if headers is not None and len(headers) != len(entries):
        raise ValueError("one header per entry")
    for n, e in enumerate(entries):
        d = _normal_fields(e) if headers is None else _header_fields(e, headers[n])
        if e.digest:
            d["digest"] = e.digest
        for i, c in enumerate(e.chunks):
            cd = d if i == 0 else {"type": "chunk", "name": d["name"]}
            cd["offset"] = c.offset
            if zstd:
                if i == 0:
                    cd["endOffset"] = e.chunks[-1].end
                if c.zeros:
                    cd["chunkType"] = "zeros"
            elif c.inner:
                cd["innerOffset"] = c.inner
            if i:
                cd["chunkOffset"] = c.file_offset
            if len(e.chunks) > 1:
                cd["chunkSize"] = c.size
            cd["chunkDigest"] = c.digest
            if i:
                out.append(cd)
            else:
                out.append(d)
        if not e.chunks:
            out.append(d)
    doc: dict[str, object] = {"version": 1, "entries": out}
    if tar_split_digest:
        doc["tarSplitDigest"] = tar_split_digest
    try:
        return msgspec.json.encode(doc)
    except UnicodeEncodeError:
        raise _not_utf8(out) from None


def _b64(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())}


def _normal_fields(e: Entry) -> dict[str, object]:
    """The entry as lazyfs spells it when no header is given: normal names (a directory's
    with a trailing slash), permission bits only, device numbers on devices only."""
    name = e.name + "/" if e.type == "dir" and e.name else e.name or "./"
    device = e.type in _DEVICES
    header = TarHeader(
        name=name,
        link_name=e.link_name,
        mode=e.mode,
        size=e.size if e.type == "reg" else 0,
        uid=e.uid,
        gid=e.gid,
        mtime_ns=e.mtime_ns,
        dev_major=e.dev_major if device else 0,
        dev_minor=e.dev_minor if device else 0,
        xattrs=e.xattrs,
    )
    return _header_fields(e, header)


def _header_fields(e: Entry, h: TarHeader) -> dict[str, object]:
    d: dict[str, object] = {"type": e.type, "name": h.name}
    if e.type == "reg" or h.size:
        d["size"] = h.size
    if h.mtime_ns:
        d["modtime"] = format_time(h.mtime_ns)
    if h.atime_ns:
        d["accesstime"] = format_time(h.atime_ns)
    if h.ctime_ns:
        d["changetime"] = format_time(h.ctime_ns)
    if h.link_name:
        d["linkName"] = h.link_name
    d["mode"] = h.mode
    if h.uid:
        d["uid"] = h.uid
    if h.gid:
        d["gid"] = h.gid
    if e.uname:
        d["userName"] = e.uname
    if e.gname:
        d["groupName"] = e.gname
    if e.type in _DEVICES or h.dev_major or h.dev_minor:
        d["devMajor"] = h.dev_major
        d["devMinor"] = h.dev_minor
    if h.xattrs:
        d["xattrs"] = _b64(h.xattrs)
    if e.xattrs and e.xattrs != h.xattrs:
        more = {k: v for k, v in e.xattrs.items() if h.xattrs.get(k) != v}
        if more:
            d["lazyfsXattrs"] = _b64(more)
    return d


def _not_utf8(out: list[dict[str, object]]) -> FormatError:
    """Name the first entry JSON cannot carry (surrogates stand for bytes that are not UTF-8)."""
    for d in out:
        try:
            msgspec.json.encode(d)
        except UnicodeEncodeError:
            name = str(d.get("name", "")).encode("utf-8", "surrogateescape")
            return FormatError(
                f"entry {name!r}: its name, link, owner or an xattr name is not UTF-8, "
                "which a TOC (JSON) cannot carry"
            )
    return FormatError("the TOC holds text that is not UTF-8")
