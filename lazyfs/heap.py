"""The C heap: hand back to the system what a large start-up step freed."""

from __future__ import annotations


def trim_heap() -> None:
    """Hand the free memory left in the C heap back to the system: glibc keeps freed blocks
    mapped (a TOC decode or cache write of 100k entries leaves 7-18 MiB of RSS) until asked.
    Without glibc (no ``malloc_trim``) nothing is done."""
    import ctypes  # only after large steps: a mount's start-up pays the import once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
