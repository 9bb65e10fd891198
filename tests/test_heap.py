"""lazyfs.heap: every thread on glibc's main arena (H61: a TOC decode in a worker thread left
its arena's free top mapped, which malloc_trim does not hand back: 17 MiB more RSS at 100k
files)."""

from __future__ import annotations

import subprocess
import sys

# In a fresh process (the setting is for good): the arenas glibc reports once a thread has
# allocated a block and exited.
_PROBE = """
import ctypes, os, sys, tempfile, threading
from lazyfs.heap import one_arena

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
if sys.argv[1] == "one":
    assert one_arena()
worker = threading.Thread(target=lambda: libc.free(libc.malloc(1 << 16)))
worker.start()
worker.join()
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(open(path).read().count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_threads_share_the_main_arena() -> None:
    assert _arenas("default") >= 2  # glibc's default: the thread got an arena of its own
    assert _arenas("one") == 1
