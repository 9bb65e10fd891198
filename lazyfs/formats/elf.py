"""What an ELF file's dynamic section says about the libraries it needs: just enough of the
format to name them as the dynamic loader would, from the file's bytes (the System V gABI:
the file header, the program headers, the dynamic section, its string table).

Pure parsing, no I/O: the caller reads the ranges named here.  Every function answers None
(or less) for bytes that are not what they claim, never raises: the input is any file of an
image."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_DYNAMIC = 2
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_RPATH = 15
DT_RUNPATH = 29

EM_X86_64 = 62
EM_AARCH64 = 183

# Bounds that no real file reaches and that keep a hostile one's cost small.
MAX_PHNUM = 512
MAX_DYNAMIC = 64 * 1024  # bytes of dynamic section read
MAX_NEEDED = 128
MAX_NAME = 4096  # a string's bytes (PATH_MAX)
# Search directories kept of a DT_RUNPATH/DT_RPATH (real ones name one to three): each is
# looked up for every DT_NEEDED name, and 4 KiB of "/a/:/a/./:..." made ~340 of them, a
# second of look-ups per file.
MAX_SEARCH_DIRS = 16


@dataclass(frozen=True)
class Header:
    """The ELF file header's fields this module uses."""

    is64: bool
    little: bool
    machine: int
    phoff: int
    phentsize: int
    phnum: int

    @property
    def phdrs_end(self) -> int:
        """The file offset where the program headers end (read this much from 0)."""
        return self.phoff + self.phentsize * self.phnum

    @property
    def _order(self) -> str:
        return "<" if self.little else ">"


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class Layout:
    """The loadable segments and where the dynamic section lies in the file."""

    loads: tuple[Segment, ...]
    dynamic: tuple[int, int] | None  # (file offset, size), size at most MAX_DYNAMIC

    def file_offset(self, vaddr: int) -> int | None:
        """The file offset of the address ``vaddr`` (as DT_STRTAB gives), if mapped."""
        for s in self.loads:
            if s.vaddr <= vaddr < s.vaddr + s.filesz:
                return s.offset + (vaddr - s.vaddr)
        return None


@dataclass(frozen=True)
class Dynamic:
    """The dynamic section's entries that name libraries: string-table offsets, and the
    string table's address and size."""

    needed: tuple[int, ...]
    strtab: int | None
    strsz: int
    runpath: int | None
    rpath: int | None

    def string_span(self) -> tuple[int, int] | None:
        """The part of the string table (start, end offsets within it) holding every string
        named here, or None when there is none."""
        offs = [o for o in (*self.needed, self.runpath, self.rpath) if o is not None]
        if not offs or self.strtab is None:
            return None
        lo, hi = min(offs), min(max(offs) + MAX_NAME, self.strsz or max(offs) + MAX_NAME)
        return (lo, hi) if lo < hi else None


def parse_header(data: bytes) -> Header | None:
    """The file header at the start of ``data``, or None if it is no ELF file of a known
    class and byte order (or its program headers make no sense)."""
    if len(data) < 52 or data[:4] != MAGIC or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    is64, little = data[4] == 2, data[5] == 1
    o = "<" if little else ">"
    if is64:
        if len(data) < 64:
            return None
        machine = struct.unpack_from(o + "H", data, 18)[0]
        phoff = struct.unpack_from(o + "Q", data, 32)[0]
        phentsize, phnum = struct.unpack_from(o + "HH", data, 54)
        want = 56
    else:
        machine = struct.unpack_from(o + "H", data, 18)[0]
        phoff = struct.unpack_from(o + "I", data, 28)[0]
        phentsize, phnum = struct.unpack_from(o + "HH", data, 42)
        want = 32
    if phentsize < want or not 0 < phnum <= MAX_PHNUM or phoff <= 0:
        return None
    return Header(is64, little, machine, phoff, phentsize, phnum)


def parse_layout(h: Header, data: bytes) -> Layout | None:
    """The program headers, from ``data`` = the file's bytes from offset 0 (at least to
    ``h.phdrs_end``); None if they are not all there."""
    if len(data) < h.phdrs_end:
        return None
    o = h._order
    loads: list[Segment] = []
    dynamic = None
    for i in range(h.phnum):
        at = h.phoff + i * h.phentsize
        if h.is64:
            ptype, _, offset, vaddr, _, filesz = struct.unpack_from(o + "IIQQQQ", data, at)
        else:
            ptype, offset, vaddr, _, filesz = struct.unpack_from(o + "IIIII", data, at)
        if ptype == PT_LOAD:
            loads.append(Segment(offset, vaddr, filesz))
        elif ptype == PT_DYNAMIC and dynamic is None and filesz > 0:
            dynamic = (offset, min(filesz, MAX_DYNAMIC))
    return Layout(tuple(loads), dynamic)


def parse_dynamic(h: Header, data: bytes) -> Dynamic:
    """The dynamic section's entries in ``data`` (its bytes), up to DT_NULL."""
    o = h._order
    fmt, size = (o + "qQ", 16) if h.is64 else (o + "iI", 8)
    needed: list[int] = []
    strtab = runpath = rpath = None
    strsz = 0
    for at in range(0, len(data) - size + 1, size):
        tag, val = struct.unpack_from(fmt, data, at)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed) < MAX_NEEDED:
            needed.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        elif tag == DT_STRSZ:
            strsz = val
        elif tag == DT_RUNPATH:
            runpath = val
        elif tag == DT_RPATH:
            rpath = val
    return Dynamic(tuple(needed), strtab, strsz, runpath, rpath)


def string_at(table: bytes, offset: int) -> str | None:
    """The NUL-terminated string at ``offset`` of ``table`` (a part of a string table), or
    None if it is empty, unterminated within MAX_NAME bytes, or outside."""
    if not 0 <= offset < len(table):
        return None
    end = table.find(b"\0", offset, offset + MAX_NAME)
    if end <= offset:
        return None
    return table[offset:end].decode("utf-8", "surrogateescape")


def search_dirs(value: str | None, origin: str) -> list[str]:
    """A DT_RUNPATH/DT_RPATH value as directories (relative to the image root), ``$ORIGIN``
    replaced by ``origin`` (the object's directory); entries with other tokens ($LIB,
    $PLATFORM: they depend on the machine) or relative ones (the process's directory) are
    left out; at most MAX_SEARCH_DIRS, each once."""
    out: list[str] = []
    for d in (value or "").split(":"):
        d = d.replace("${ORIGIN}", "/" + origin).replace("$ORIGIN", "/" + origin)
        if d.startswith("/") and "$" not in d and d not in out:
            out.append(d)
            if len(out) == MAX_SEARCH_DIRS:
                break
    return out


def default_dirs(h: Header) -> tuple[str, ...]:
    """Where a glibc (Debian's multiarch) or musl loader looks after the cache: the
    compiled-in directories for this machine, most specific first."""
    triplet = {EM_X86_64: "x86_64-linux-gnu", EM_AARCH64: "aarch64-linux-gnu"}.get(h.machine)
    multi = (f"/lib/{triplet}", f"/usr/lib/{triplet}") if triplet else ()
    lib64 = ("/lib64", "/usr/lib64") if h.is64 else ()
    return (*multi, *lib64, "/lib", "/usr/lib", "/usr/local/lib")
