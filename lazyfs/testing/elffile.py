"""Small ELF files for tests of the loader's follow-ups (lazyfs.fs.neededlibs): a 64-bit
little-endian shared object with one loadable segment and a dynamic section naming
libraries, optionally far into the file (``pad`` bytes between the strings and it)."""

from __future__ import annotations

import struct

from lazyfs.formats import elf

_PHDRS_AT = 64
_PHDR = "<IIQQQQQQ"


def make_elf(
    needed: list[str], *, runpath: str | None = None, pad: bytes = b"", machine: int = elf.EM_X86_64
) -> bytes:
    strings = b"\0"
    offsets: list[int] = []
    for name in [*needed, *([runpath] if runpath is not None else [])]:
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    strtab = _PHDRS_AT + 2 * struct.calcsize(_PHDR)
    dyn_at = strtab + len(strings) + len(pad)
    dyn = [(elf.DT_NEEDED, o) for o in offsets[: len(needed)]]
    if runpath is not None:
        dyn.append((elf.DT_RUNPATH, offsets[-1]))
    dyn += [(elf.DT_STRTAB, strtab), (elf.DT_STRSZ, len(strings)), (elf.DT_NULL, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, val) for tag, val in dyn)
    total = dyn_at + len(dynamic)
    ident = elf.MAGIC + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 3, machine, 1, 0, _PHDRS_AT, 0, 0, 64, 56, 2, 64, 0, 0
    )
    phdrs = struct.pack(_PHDR, elf.PT_LOAD, 5, 0, 0, 0, total, total, 4096)
    phdrs += struct.pack(
        _PHDR, elf.PT_DYNAMIC, 6, dyn_at, dyn_at, dyn_at, len(dynamic), len(dynamic), 8
    )
    return header + phdrs + strings + pad + dynamic
