"""formats/elf.py: the libraries an ELF file names, from real files of this machine and from
hostile bytes (which answer None or less, never an exception)."""

from __future__ import annotations

import os
import random
import struct
import sys
from pathlib import Path

from lazyfs.formats import elf
from lazyfs.testing.elffile import make_elf


def _needed(data: bytes) -> tuple[list[str | None], str | None] | None:
    """What the follow-ups read, in their order, from a whole file's bytes."""
    h = elf.parse_header(data)
    if h is None:
        return None
    layout = elf.parse_layout(h, data)
    if layout is None or layout.dynamic is None:
        return None
    off, size = layout.dynamic
    d = elf.parse_dynamic(h, data[off : off + size])
    span = d.string_span()
    if span is None or d.strtab is None:
        return [], None
    at = layout.file_offset(d.strtab + span[0])
    if at is None:
        return None
    table = data[at : at + span[1] - span[0]]
    names = [elf.string_at(table, o - span[0]) for o in d.needed]
    runpath = elf.string_at(table, d.runpath - span[0]) if d.runpath is not None else None
    return names, runpath


def test_the_running_interpreter_needs_libc() -> None:
    exe = Path(os.path.realpath(sys.executable)).read_bytes()
    got = _needed(exe)
    assert got is not None
    names, _ = got
    assert "libc.so.6" in names and all(n and "/" not in n for n in names)


def test_a_shared_library_of_this_machine() -> None:
    import _ssl  # an extension module: a shared object that needs libssl and libcrypto

    got = _needed(Path(_ssl.__file__).read_bytes())
    assert got is not None
    assert {"libssl.so.3", "libcrypto.so.3"} <= set(got[0])


def test_a_made_file_with_runpath() -> None:
    data = make_elf(["libA.so.1", "libB.so"], runpath="$ORIGIN/../private", pad=b"\1" * 5000)
    assert _needed(data) == (["libA.so.1", "libB.so"], "$ORIGIN/../private")
    h = elf.parse_header(data)
    assert h is not None and h.phdrs_end < 4096
    assert elf.search_dirs("$ORIGIN/../private:/opt/lib:rel:$LIB/x", "usr/bin") == [
        "/usr/bin/../private",
        "/opt/lib",
    ]
    assert elf.default_dirs(h)[:2] == ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")


def test_no_elf_no_answer() -> None:
    assert elf.parse_header(b"") is None
    assert elf.parse_header(b"#!/bin/sh\n" + bytes(100)) is None
    data = bytearray(make_elf(["libA.so"]))
    data[4] = 3  # no such class
    assert elf.parse_header(bytes(data)) is None


def test_every_truncation_answers_none_or_less() -> None:
    data = make_elf(["libA.so.1"], pad=b"\2" * 300)
    for n in range(len(data)):
        got = _needed(data[:n])
        assert got is None or got[0] in ([], [None], ["libA.so.1"])


def test_hostile_counts_and_offsets() -> None:
    data = bytearray(make_elf(["libA.so.1"]))
    huge = bytearray(data)
    struct.pack_into("<H", huge, 56, 0xFFFF)  # e_phnum
    assert elf.parse_header(bytes(huge)) is None
    far = bytearray(data)
    struct.pack_into("<Q", far, 32, 2**63)  # e_phoff far beyond the file
    h = elf.parse_header(bytes(far))
    assert h is None or elf.parse_layout(h, bytes(far)) is None
    # A dynamic section of nothing but entries, no DT_NULL: bounded by what was read.
    h = elf.parse_header(bytes(data))
    assert h is not None
    many = struct.pack("<qQ", elf.DT_NEEDED, 1) * 10_000
    assert len(elf.parse_dynamic(h, many).needed) == elf.MAX_NEEDED
    # A string table offset outside the table, and a string without its NUL.
    assert elf.string_at(b"abc", 7) is None and elf.string_at(b"abc", -1) is None
    assert elf.string_at(b"abc", 0) is None
    assert elf.string_at(b"\0abc\0", 1) == "abc"


def test_a_runpath_of_many_directories_is_cut_short() -> None:
    # Every directory costs a look-up per DT_NEEDED name on the mount's event loop: 4 KiB
    # of "/a/./:/a/././:..." (distinct, all absolute) would be ~200 of them.
    many = ":".join("/a" + "/." * i for i in range(200))
    dirs = elf.search_dirs(many + ":/a/./", "o")
    assert dirs == ["/a" + "/." * i for i in range(elf.MAX_SEARCH_DIRS)]
    assert elf.search_dirs("/x:/y:/x:$ORIGIN", "o") == ["/x", "/y", "/o"]


def test_random_mutations_never_raise() -> None:
    rng = random.Random(64)
    import _ssl

    real = Path(_ssl.__file__).read_bytes()
    for base in (make_elf(["libA.so.1", "libB.so"], runpath="$ORIGIN"), real):
        for _ in range(300):
            data = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                i = (
                    rng.randrange(min(len(data), 4096))
                    if rng.random() < 0.7
                    else rng.randrange(len(data))
                )
                data[i] = rng.randrange(256)
            _needed(bytes(data))
