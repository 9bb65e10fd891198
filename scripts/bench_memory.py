# ruff: noqa: RUF001, RUF003  (×, – in Markdown output are intended)
"""Daemon memory at N files (issue 13): a heap breakdown by allocation site, and the mount
daemon's RSS after an lstat walk and after a cold read soak (every file read once, fresh
chunk cache), for this tree and optionally a baseline tree in the same run; with
``--big-mib N`` also after a cold read of one N MiB file (its own image, fresh cache).

``--baseline DIR``: a directory holding another ``lazyfs`` package (for instance
``git archive main lazyfs | tar -x -C DIR``); its daemon runs with DIR as working directory.
Run from the repo root: ``.venv/bin/python scripts/bench_memory.py [--files N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def _benchlib() -> ModuleType:
    # Imported on use: benchlib imports this checkout's lazyfs, and the heap breakdown of a
    # baseline must import the baseline's instead.
    import benchlib

    return benchlib


def files(n: int) -> list[Any]:
    bl = _benchlib()
    return [bl.FileSpec(f"d{i // 100:04d}/f{i:06d}", i % 1024, seed=i) for i in range(n)]


def big_file(mib: int) -> list[Any]:
    bl = _benchlib()
    return [bl.FileSpec("big/file.bin", mib * bl.MiB, seed=7, kind="random")]


def _status(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def _soak(root: Path) -> int:
    bl = _benchlib()
    paths = [os.path.join(top, f) for top, _, fs in os.walk(root) for f in fs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return sum(pool.map(bl.read_file, map(Path, paths), chunksize=256))


def daemon_run(
    image: Path, src: Path, work: Path, soak: bool, remount: bool = False
) -> dict[str, float]:
    """One fresh mount (fresh cache) of ``image`` by the lazyfs in ``src``; with ``remount``,
    then a second mount that finds the TOCs in the cache (what a restart pays)."""
    from lazyfs.fs.daemon import Daemon, spawn

    bl = _benchlib()
    cache, mnt = work / "cache", work / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(parents=True, exist_ok=True)
    def mount() -> Daemon:  # the same mount both times: only the TOC cache differs
        return spawn(
            f"oci:{image}",
            mnt,
            ["--read-only", "--cache", str(cache)],
            log=work / "mnt.log",
            timeout=300,
            cwd=src,
        )

    t0 = time.perf_counter()
    d = mount()
    try:
        out = {"mount s": time.perf_counter() - t0}
        bl.walk_lstat(mnt)
        s = _status(d.pid)
        out |= {"RSS after walk MiB": s["VmRSS"], "peak after walk MiB": s["VmHWM"]}
        if soak:
            t1 = time.perf_counter()
            _soak(mnt)
            s = _status(d.pid)
            out |= {
                "soak s": time.perf_counter() - t1,
                "RSS after soak MiB": s["VmRSS"],
                "peak after soak MiB": s["VmHWM"],
            }
    finally:
        d.stop()
        if not remount:
            shutil.rmtree(cache, ignore_errors=True)
    if remount:
        t0 = time.perf_counter()
        d = mount()
        try:
            out["remount s"] = time.perf_counter() - t0
            bl.walk_lstat(mnt)
            s = _status(d.pid)
            out |= {"remount: RSS after walk MiB": s["VmRSS"], "remount: peak MiB": s["VmHWM"]}
        finally:
            d.stop()
            shutil.rmtree(cache, ignore_errors=True)
    return out


def breakdown(image: Path, cache: Path, top: int) -> str:
    """In this process: open the image (TOC cached by a first open) and build the tree,
    then the live heap by allocation site, largest first."""
    import tracemalloc
    from inspect import signature

    import trio

    from lazyfs.fs.tree import Tree
    from lazyfs.opener import open_image

    lines: list[str] = []

    async def run() -> None:
        async with open_image(f"oci:{image}", cache_dir=cache):
            pass  # fills the TOC cache: the measured open below reads it as a remount does
        tracemalloc.start()
        # As the mount daemon opens it (a baseline's open_image may not know the option).
        opts = {"entry_tables": True} if "entry_tables" in signature(open_image).parameters else {}
        async with open_image(f"oci:{image}", cache_dir=cache, **opts) as img:
            opened = tracemalloc.take_snapshot()
            tree = Tree.from_layers([ol.toc for ol in img.layers])
            built = tracemalloc.take_snapshot()
            total = sum(s.size for s in built.statistics("filename"))
            lines.append(f"live heap after open + tree: {total / 2**20:.1f} MiB")
            for what, snap, base in (("open", opened, None), ("tree", built, opened)):
                stats = snap.compare_to(base, "lineno") if base else snap.statistics("lineno")
                for st in stats[:top]:
                    size = st.size_diff if base else st.size
                    count = st.count_diff if base else st.count
                    if size < 256 * 1024:
                        continue
                    frame = st.traceback[0]
                    where = f"{Path(frame.filename).name}:{frame.lineno}"
                    mib, each = size / 2**20, size / max(count, 1)
                    lines.append(f"| {what} | {where} | {mib:.1f} | {count:,} | {each:.0f} |")
            del tree

    trio.run(run)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="a directory holding another lazyfs package")
    p.add_argument("--no-soak", action="store_true")
    p.add_argument("--big-mib", type=int, default=0, help="also read one file of this size")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--remount", action="store_true", help="also a remount (TOCs cached)")
    p.add_argument(
        "--_breakdown", nargs=3, metavar=("SRC", "IMAGE", "CACHE"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args._breakdown:
        sys.path.insert(0, args._breakdown[0])
        print(breakdown(Path(args._breakdown[1]), Path(args._breakdown[2]), 14))
        return 0
    bl = _benchlib()
    bl.sigterm_as_interrupt()
    n = args.files
    image = bl.lazy_image(f"tree-{n}", lambda: files(n))
    big_mib = args.big_mib
    big = bl.lazy_image(f"big-{big_mib}m", lambda: big_file(big_mib)) if big_mib else None
    trees = {"this tree": bl.ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    heaps: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        for name, src in trees.items():
            bl.log(f"heap breakdown: {name}")
            heaps[name] = subprocess.run(
                [sys.executable, __file__, "--_breakdown", str(src), str(image), str(work / "hc")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            shutil.rmtree(work / "hc", ignore_errors=True)
        for rep in range(args.reps):  # alternate the trees: load drifts, both see it
            for name, src in trees.items():
                bl.log(f"rep {rep + 1}: {name}")
                for k, v in daemon_run(
                    image, src.resolve(), work, not args.no_soak, args.remount
                ).items():
                    results[name].setdefault(k, []).append(v)
                if big is not None:  # its "soak" is the one read of the big file
                    for k, v in daemon_run(big, src.resolve(), work, True).items():
                        if "soak" in k:
                            k = k.replace("soak", f"reading one {big_mib} MiB file")
                            results[name].setdefault(k, []).append(v)
    body = [f"### Daemon memory at {n:,} files\n"]
    keys = list(next(iter(results.values())).keys())
    header = ["what", *(f"{name} (median, min–max)" for name in trees)]
    rows: list[list[object]] = []
    for k in keys:
        row: list[object] = [k]
        for name in trees:
            s = bl.summarize(results[name][k])
            row.append(bl.fmt_range(s, "{:.2f}" if k.endswith(" s") else "{:.0f}"))
        rows.append(row)
    body.append(bl.md_table(header, rows))
    for name, text in heaps.items():
        first, *rest = text.splitlines()
        body.append(f"\nHeap by allocation site, {name} ({first}):\n")
        table = bl.md_table(["phase", "site", "MiB", "objects", "B each"], [])
        body.append(table + "\n" + "\n".join(rest))
    body.append(f"\n1-min load average {os.getloadavg()[0]:.1f} at the end (2 CPUs, shared).\n")
    text = "\n".join(body)
    print(text)
    out: dict[str, Any] = {"results": results, "heaps": heaps}
    bl.write_json("bench_memory", out)
    if not args.no_markdown:
        bl.append_markdown("Issue 13: daemon memory", bl.machine_info(), bl.command_line(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
