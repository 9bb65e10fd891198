"""The C heap: hand back to the system what a large start-up step freed."""

from __future__ import annotations

import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's start values, and the most its own raise reaches (64-bit: 32 MiB, trim twice that).
_START = (128 * 1024, 128 * 1024)
_RAISED = (32 * 1024 * 1024, 64 * 1024 * 1024)


def trim_heap() -> None:
    """Hand the free memory left in the C heap back to the system: glibc keeps freed blocks
    mapped (a TOC decode or cache write of 100k entries leaves 7-18 MiB of RSS) until asked.
    Without glibc (no ``malloc_trim``) nothing is done."""
    import ctypes  # only after large steps: a mount's start-up pays the import once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def start_up_thresholds() -> bool:
    """Hold glibc's mmap and trim thresholds at their start values until
    :func:`serving_thresholds`; whether they were set (glibc only).

    glibc raises both each time a larger mapped block is freed, and keeps a worker thread
    arena's free top up to the trim threshold: ``malloc_trim`` trims only the main arena's
    top.  Raised by the multi-MiB temporaries of a TOC decode of 100k entries, that left the
    decoding thread's arena 17 MiB fuller after a mount (BENCHMARKS "H61").  Held low, a
    large block is mapped on its own and a thread's arena is trimmed as it is freed."""
    return _mallopt(*_START)


def serving_thresholds() -> bool:
    """Once start-up's TOCs are decoded: the thresholds glibc's own raise would reach, held,
    so reads keep their buffers in the heap as they did (held at the start values, a cold
    read of a 512 MiB file was 1.8x slower: every buffer mapped and faulted in afresh)."""
    return _mallopt(*_RAISED)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl has no such name)
        return False
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return (
        mallopt is not None
        and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )
