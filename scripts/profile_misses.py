"""The blob requests of a cold start without groups, one by one (BENCHMARKS.md, issue 13,
"fewer serial misses"): which file's read sent each, where its range lies in the blob, how
far it is from the previous one, and how much of what it brought the start-up read.

``.venv/bin/python scripts/profile_misses.py [--runs N] [--work-dir DIR] [--lazyfs DIR]...``

The Debian image of the WAN harness (built once, as ``bench_speed.py --image debian`` does) is
pushed to a loopback ``docker-registry`` behind the fault proxy, which records every range
asked for; a daemon (a new process, ``--trace``) serves a fresh cache; the start-up runs
chrooted in the mount.  ``--lazyfs DIR`` (repeatable): the checkouts whose daemons run,
alternating in each of the N runs (e.g. this one and main, archived); the first run of each
prints its requests and waits; medians of start-up, readiness, requests and MiB follow.
``--delay-ms MS``: the proxy answers every request that much later (a round trip's stand-in).
``--keep-trace FILE``: the first run's trace (files read, when, how long each waited).
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
from benchwan import images
from benchwan.state import State

from lazyfs.formats.toc import TOC
from lazyfs.trace.schema import Trace


@dataclass(frozen=True)
class Piece:
    """One stored chunk of a file, where it lies in the blob."""

    offset: int
    end: int
    path: str


def pieces(toc: TOC) -> list[Piece]:
    out = [
        Piece(c.offset, c.end, e.name)
        for e in toc.entries
        if e.type == "reg"
        for c in e.chunks
        if not c.zeros
    ]
    out.sort(key=lambda p: p.offset)
    return out


def _ranges(header: str) -> list[tuple[int, int]]:
    out = []
    for part in header.removeprefix("bytes=").split(","):
        a, b = part.strip().split("-")
        out.append((int(a), int(b) + 1))
    return out


def load_toc(layout: Path, work: Path) -> TOC:
    from lazyfs.opener import open_image

    async def go() -> TOC:
        async with open_image(f"oci:{layout}:{images.TAG}", cache_dir=work / "toc-cache") as img:
            return img.layers[0].toc

    import trio

    return trio.run(go)


def one_run(
    layout: Path,
    work: Path,
    root: Path,
    toc_pieces: list[Piece],
    show: bool,
    delay: float,
    keep_trace: Path | None = None,
) -> dict:
    from lazyfs.fs.daemon import spawn
    from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
    from lazyfs.testing.faultproxy import FaultProxy

    startup = ("/usr/bin/python3", "-c", images.WORKLOAD)
    with RegistryInstance(work / "registry") as reg, FaultProxy(reg.url) as proxy:
        push_oci_layout(layout, f"{reg.host}/cold/lazy:{images.TAG}", tag=images.TAG)
        cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        trace = work / "trace.json"
        proxy.reset()
        proxy.delay = delay or None  # each request's answer this much later: a round trip
        t0 = time.monotonic()
        d = spawn(f"{proxy.host}/cold/lazy:{images.TAG}", mnt,
                  ["--read-only", "--plain-http", "--cache", str(cache), "--trace", str(trace)],
                  log=work / "mnt.log", timeout=120, cwd=root)  # fmt: skip
        ready = time.monotonic()
        try:
            subprocess.run(["chroot", str(mnt), *startup], check=True, capture_output=True)
            done = time.monotonic()
        finally:
            d.stop()
        got = msgspec.json.decode(trace.read_bytes(), type=Trace)
        if keep_trace is not None:
            keep_trace.write_bytes(trace.read_bytes())
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        ins = [(path, t) for kind, path, t in proxy.events if kind == "in"]
        reqs = [
            (t, path, rng)
            for (path, t), rng in zip(ins, proxy.ranges, strict=True)
            if "/blobs/" in path and rng
        ]
    read = {f.path: f.ranges for f in got.files}
    waited = {f.path for f in got.files if f.wait_ns}
    starts = [p.offset for p in toc_pieces]
    rows = []
    prev_end = None
    for t, _, rng in reqs:
        for a, b in _ranges(rng):
            i = bisect.bisect_left(starts, a)
            inside = [p for p in toc_pieces[i:bisect.bisect_left(starts, b)] if p.end <= b]
            files = sorted({p.path for p in inside}, key=lambda f: (f not in waited, f))
            used = sum(p.end - p.offset for p in inside if p.path in read)
            gap = None if prev_end is None else a - prev_end
            rows.append((t - ready, a, b, gap, len(files), used, files))
            prev_end = b
    if show:
        print(f"ready {ready - t0:.3f} s, start-up {done - ready:.3f} s, {len(reqs)} requests")
        print("| # | t ms | blob MiB | KiB | gap KiB | files | used KiB | first file |")
        print("|---|---|---|---|---|---|---|---|")
        for n, (t, a, b, gap, nf, used, files) in enumerate(rows):
            g = "" if gap is None else f"{gap / 1024:+.0f}"
            first = files[0] if files else ""
            print(f"| {n} | {t * 1e3:.0f} | {a / 2**20:.2f} | {(b - a) / 1024:.0f} | {g} | {nf} "
                  f"| {used / 1024:.0f} | {first} |")  # fmt: skip
    if show:
        print("\n| file waited for | first read ms | waited ms | size KiB |")
        print("|---|---|---|---|")
        for f in sorted((f for f in got.files if f.wait_ns), key=lambda f: f.first_read_ns):
            print(f"| {f.path} | {f.first_read_ns / 1e6:.0f} | {f.wait_ns / 1e6:.1f} "
                  f"| {f.size / 1024:.0f} |")  # fmt: skip
    total = sum(b - a for _, a, b, *_ in rows)
    used = sum(r[5] for r in rows)
    return {"startup": done - ready, "ready": ready - t0, "requests": len(reqs),
            "waited": sum(f.wait_ns for f in got.files) / 1e9,
            # the first file waited for: the program itself, its first chunk (the exec)
            "first wait": min(((f.first_read_ns, f.wait_ns) for f in got.files if f.wait_ns),
                              default=(0, 0))[1] / 1e9,
            "MiB": total / 2**20, "used MiB": used / 2**20,
            "read files": len(read)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added to every request")
    ap.add_argument("--keep-trace", type=Path, help="the first run's trace, written here")
    ap.add_argument(
        "--lazyfs", type=Path, action="append", help="checkouts whose daemons alternate (repeat)"
    )
    args = ap.parse_args()
    img = images.build_all(["debian"], State())["debian"]
    layout = img.layout("zstd")
    work = Path(tempfile.mkdtemp(dir=args.work_dir, prefix="misses-"))
    try:
        toc_pieces = pieces(load_toc(layout, work))
        roots = args.lazyfs or [bl.ROOT]
        out: dict[Path, list[dict]] = {r: [] for r in roots}
        for i in range(args.runs):
            for r in roots:
                if i == 0:
                    print(f"\n## {r}")
                keep = args.keep_trace if i == 0 and r == roots[0] else None
                out[r].append(
                    one_run(layout, work, r, toc_pieces, i == 0, args.delay_ms / 1e3, keep)
                )
        for r, runs in out.items():
            print(f"\n{r}, each run's start-up and wait: " + ", ".join(
                f"{o['startup']:.3f}/{o['waited']:.3f}" for o in runs))
            print(f"{r}, medians of {len(runs)}: " + ", ".join(
                f"{k} {statistics.median(o[k] for o in runs):.3f}" for k in runs[0]))  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
