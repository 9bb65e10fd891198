"""A small real root filesystem made from this machine's own binaries and their libraries."""

from __future__ import annotations

import os
import re
import subprocess

from lazyfs.testing.layers import Item

PROGRAMS = ("/bin/sh", "/bin/cat", "/bin/ls", "/usr/bin/sha256sum", "/usr/bin/env")


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def host_rootfs_items(programs: tuple[str, ...] = PROGRAMS) -> list[Item]:
    """Items for a layer holding ``programs`` and every shared library they load."""
    files: dict[str, str] = {}
    for prog in programs:
        real = os.path.realpath(prog)
        files[prog.lstrip("/")] = real
        for lib in _libraries(real):
            files[lib.lstrip("/")] = os.path.realpath(lib)
    dirs: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    items = [Item(d, "dir", mode=0o755) for d in sorted(dirs)]
    for path, real in sorted(files.items()):
        with open(real, "rb") as f:
            items.append(Item(path, data=f.read(), mode=0o755))
    for d in ("proc", "dev", "tmp"):
        if d not in dirs:
            items.append(Item(d, "dir", mode=0o1777 if d == "tmp" else 0o755))
    return items
