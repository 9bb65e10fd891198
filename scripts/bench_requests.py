# ruff: noqa: RUF001, RUF003  (× and µ in Markdown output are intended)
"""What one warm FUSE round trip costs: ``isatty()`` (a FUSE_IOCTL the kernel always sends) and
``open(dir)`` + ``close`` (OPENDIR + RELEASEDIR) on a file and directory of the sample, in
µs per call: native disk, lazyfs, fuse-overlayfs and (``--before DIR``) the lazyfs of another
checkout, every contender in turn, round after round, medians.  Issue 13's warm rows are
~250 such requests (python start-up) and ~660 (``find`` + ``du``).  Run from the repo root:
``.venv/bin/python scripts/bench_requests.py [--reps N] [--calls N] [--before DIR]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import bench_speed as bs
import benchlib as bl

FILE = "usr/lib/python3.11/json/__init__.py"
DIR = "usr/lib"


def isatty_us(root: Path, calls: int) -> float:
    fd = os.open(root / FILE, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            os.isatty(fd)
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        os.close(fd)


def opendir_us(root: Path, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        os.close(os.open(root / DIR, os.O_RDONLY | os.O_DIRECTORY))
    return (time.perf_counter() - t0) / calls * 1e6


def _fmt(us: list[float]) -> str:
    return f"{statistics.median(us):.1f} ({min(us):.1f}–{max(us):.1f})"


def main() -> int:
    p = bl.bench_parser(__doc__)
    p.add_argument("--calls", type=int, default=3000, help="calls per contender per round")
    p.add_argument("--before", type=Path, metavar="DIR", help="also the lazyfs of this checkout")
    args = p.parse_args()
    reps = args.reps or 7
    bl.sigterm_as_interrupt()
    bl.byte_compiled()
    machine = bl.machine_info()
    work = bl.work_dir("requests")
    lazy = bs._sample_with_tree(6000)
    native = bl.extract_tar(lazy.parent / "layer.tar", lazy.parent / "rootfs")
    from lazyfs.fs.daemon import spawn

    roots: dict[str, Path] = {"native disk": native}
    with ExitStack() as stack:
        m = stack.enter_context(
            bl.lazyfs_mount(f"oci:{lazy}", work / "mnt", work / "cache", upper=work / "upper")
        )
        roots["lazyfs"] = m.mountpoint
        if args.before is not None:
            for d in ("mnt-before", "cache-before"):
                (work / d).mkdir()
            before_args = [
                "--upper",
                str(work / "upper-before"),
                "--cache",
                str(work / "cache-before"),
            ]
            d = spawn(f"oci:{lazy}", work / "mnt-before", before_args, log=work / "before.log",
                      timeout=120, cwd=args.before)  # fmt: skip
            stack.callback(d.stop)
            roots["before: lazyfs"] = work / "mnt-before"
        o = stack.enter_context(bl.overlay_mount(native, work / "ovl", work / "o"))
        roots["fuse-overlayfs"] = o.mountpoint
        for root in roots.values():  # warm: looked up, attributes cached
            isatty_us(root, 10)
            opendir_us(root, 10)
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in roots}
        for _ in range(reps):
            for name, root in roots.items():
                times[name][0].append(isatty_us(root, args.calls))
                times[name][1].append(opendir_us(root, args.calls))
    rows = []
    for name, (tty, dirs) in times.items():
        rows.append([name, _fmt(tty), _fmt(dirs)])
    body = (
        f"### One warm request, µs per call ({reps} rounds of {args.calls} calls)\n\n"
        + bl.md_table(["tree", "isatty() (IOCTL)", "open+close dir (OPENDIR+RELEASEDIR)"], rows)
        + f"\n\n1-min load average {machine['loadavg_start']} at start, "
        f"{os.getloadavg()[0]:.1f} at end (2 CPUs, shared).\n"
    )
    result = {"machine": machine, "command": bl.command_line(), "us": times}
    bl.publish("requests", "Issue 13: the cost of one warm FUSE request", result, body, machine,
               markdown=not args.no_markdown)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
