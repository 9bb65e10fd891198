# ruff: noqa: RUF001, RUF003  (×, – in Markdown output are intended)
"""What entries made on demand would take off a mount's heap (issue 13, daemon RSS at 100k
files): ``EntryTable`` against the entries ``unpack_toc`` makes, and the mount's state now
(tree + entries + the store's chunk list) against the state with entries on demand (nodes
keep an entry index, the layer keeps the table; the store keeping its chunk objects, or not),
built in this process from the bench_memory image's cached TOC and measured with tracemalloc.

Run from the repo root: ``.venv/bin/python scripts/bench_entrytable.py [--files N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import benchlib as bl
import msgspec
import trio
from bench_memory import files

from lazyfs.formats.toc import EntryTable, unpack_toc
from lazyfs.fs.tree import IMPLICIT_DIR, Tree
from lazyfs.opener import open_image
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.chunkmap import DigestIndex, layer_chunks
from lazyfs.store.tocs import _CachedTOC


def cached_packed(image: Path, cache: Path) -> bytes:
    """The packed TOC a mount of ``image`` leaves in its TOC cache."""

    async def run() -> None:
        async with open_image(f"oci:{image}", cache_dir=cache):
            pass

    trio.run(run)
    (toc_file,) = ChunkCache(cache).tocs_dir.iterdir()
    return msgspec.msgpack.decode(toc_file.read_bytes(), type=_CachedTOC).packed


def heap_of(build: object) -> tuple[float, object]:
    """MiB live after ``build()`` (what it returns kept alive)."""
    gc.collect()
    tracemalloc.start()
    kept = build()  # type: ignore[operator]
    gc.collect()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return size / 2**20, kept


def mount_state(packed: bytes, on_demand: str) -> object:
    """What a mount keeps of one layer: its tree, entries, the store's chunks and index.
    ``on_demand``: "" (as now), "tree" (nodes keep an index; the store its chunk objects),
    "all" (the store no chunk objects either)."""
    toc = unpack_toc(packed)
    tree = Tree.from_layers([toc])
    chunks = layer_chunks(toc)
    index = DigestIndex(chunks)
    if not on_demand:
        return toc, tree, chunks, index
    table = EntryTable(packed)
    pos = {id(e): i for i, e in enumerate(toc.entries)}
    for node in list(tree.walk()):
        e = node[1].entry
        if e is not None and e is not IMPLICIT_DIR:
            i = pos[id(e)]
            node[1].entry = i + 0 if i > 256 else i  # type: ignore[assignment]  # its index
    if on_demand == "tree":
        return tree, table, chunks, index
    # The store would read its chunks from the table's columns: no list of chunk objects.
    index._chunks = ()  # type: ignore[assignment]
    return tree, table, index._hashes, index._pos


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args()
    n = args.files
    image = bl.lazy_image(f"tree-{n}", lambda: files(n))
    with tempfile.TemporaryDirectory(prefix="bench-entrytable-") as tmp:
        packed = cached_packed(image, Path(tmp))
    rows: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for what, build in (
            ("unpack_toc's entries", lambda: unpack_toc(packed)),
            ("EntryTable", lambda: EntryTable(packed)),
            ("mount state now", lambda: mount_state(packed, "")),
            ("mount state, tree's entries on demand", lambda: mount_state(packed, "tree")),
            ("mount state, entries and chunks on demand", lambda: mount_state(packed, "all")),
        ):
            mib, kept = heap_of(build)
            rows.setdefault(f"{what}: live heap MiB", []).append(mib)
            del kept
        for what, build in (
            ("unpack_toc", lambda: unpack_toc(packed)),
            ("EntryTable", lambda: EntryTable(packed)),
        ):
            t0 = time.process_time()
            kept = build()
            rows.setdefault(f"{what}: CPU ms", []).append((time.process_time() - t0) * 1000)
            if isinstance(kept, EntryTable):
                step = max(1, len(kept) // 20_000)
                t0 = time.process_time()
                for i in range(0, len(kept), step):
                    kept[i]
                each = (time.process_time() - t0) / len(range(0, len(kept), step)) * 1e6
                rows.setdefault("EntryTable: one entry made, CPU µs", []).append(each)
            del kept
    table = bl.md_table(
        ["what", "median (min–max)"],
        [[k, bl.fmt_range(bl.summarize(v))] for k, v in rows.items()],
    )
    text = (
        f"### Entries on demand at {n:,} files ({args.reps} runs, in-process)\n\n{table}\n\n"
        f"1-min load average {os.getloadavg()[0]:.1f} at the end (2 CPUs, shared).\n"
    )
    print(text)
    bl.write_json("bench_entrytable", {"results": rows})
    if not args.no_markdown:
        bl.append_markdown(
            "Issue 13: entries on demand", bl.machine_info(), bl.command_line(), text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
