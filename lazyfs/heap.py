"""The C heap: hand back to the system what a large start-up step freed."""

from __future__ import annotations

import os

# glibc's mallopt parameter for the most arenas its threads may use (malloc.h).
_M_ARENA_MAX = -8


def trim_heap() -> None:
    """Hand the free memory left in the C heap back to the system: glibc keeps freed blocks
    mapped (a TOC decode or cache write of 100k entries leaves 7-18 MiB of RSS) until asked.
    Without glibc (no ``malloc_trim``) nothing is done."""
    import ctypes  # only after large steps: a mount's start-up pays the import once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def one_arena() -> bool:
    """Have every thread allocate from glibc's main arena; whether it was set (glibc only).
    Call before any thread allocates.

    A worker thread otherwise gets an arena of its own, whose free top :func:`trim_heap`
    cannot hand back (glibc's malloc_trim trims only the main arena's top), and glibc keeps
    up to twice its mmap threshold there, a threshold that rises to the largest mapped block
    freed (up to 32 MiB): a TOC decode of 100k entries in a worker left 17 MiB more RSS after
    a mount (BENCHMARKS "H61").  Pinning the thresholds instead kept more buffers mapped and
    faulted in afresh: a cold read of a 512 MiB file 1.16x (8 MiB) to 1.8x (128 KiB) slower.
    The cost measured instead: a read soak of 100k small files 1.15x slower (threads waiting
    for the one arena's lock, probably; not profiled), for 50 MiB less RSS after it."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl has no such name)
        return False
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1
