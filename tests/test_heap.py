"""lazyfs.heap: glibc's thresholds held low while a mount decodes its TOCs, then held where
glibc's own raise would take them (H61: raised by a TOC decode's freed temporaries, a worker
thread's arena kept 17 MiB more at 100k files)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lazyfs import heap

# In a fresh process (the settings are for good): whether glibc maps a 12 MiB block on its
# own after a 24 MiB mapped block was freed.
_PROBE = """
import ctypes, sys
from lazyfs import heap

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
for step in sys.argv[1:]:
    assert getattr(heap, step)()
libc.free(libc.malloc(24 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(12 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _mapped(*steps: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *steps], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_thresholds_held_low_then_raised() -> None:
    assert _mapped() == 0  # glibc's default: the freed 24 MiB block raised the threshold
    assert _mapped("start_up_thresholds") == 1  # held: not raised
    assert _mapped("start_up_thresholds", "serving_thresholds") == 0


def test_without_glibc_the_thresholds_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """musl has no CS_GNU_LIBC_VERSION (Python: ValueError), a libc may leave it undefined
    (None): neither calls mallopt, whose parameter numbers are glibc's own."""

    def no_name(name: str) -> str:
        raise ValueError("unrecognized configuration name")

    for confstr in (no_name, lambda name: None):
        monkeypatch.setattr(heap.os, "confstr", confstr)
        assert not heap.start_up_thresholds() and not heap.serving_thresholds()
