# ruff: noqa: RUF001, RUF003  (× and – in Markdown output are intended)
"""What recording an access trace costs: the same reads and walks with and without --trace.

For each of several alternating repetitions, on a fresh mount over a warm chunk cache (so the
network is out of the picture and the recorder's own cost shows): (a) a sequential read of a
256 MiB file (chunk cache warm, page cache cold), (b) reading every file of a 10k-file image,
(c) an ``os.walk`` + ``lstat`` of the same tree.  Reports medians and the traced/untraced ratio.

Run from the repo root: ``.venv/bin/python scripts/bench_trace.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import benchlib as bl
from benchlib import FileSpec, MiB


def _files(n: int) -> list[FileSpec]:
    return [FileSpec(f"d{i // 100:04d}/f{i:06d}", 200 + i % 4096, seed=i) for i in range(n)]


def _read_all(root: Path) -> int:
    total = 0
    for p in sorted(root.rglob("f*")):
        total += len(p.read_bytes())
    return total


def _measure(image: str, cache: Path, mnt: Path, work: Path, traced: bool, what: str) -> float:
    extra = ["--no-prefetch"]
    if traced:
        extra += ["--trace", str(work / "trace.json"), "--group", "bench"]
    with bl.lazyfs_mount(image, mnt, cache, *extra):
        t0 = time.perf_counter()
        if what == "read":
            bl.read_file(mnt / "data/big.bin")
        elif what == "files":
            _read_all(mnt)
        else:
            bl.walk_lstat(mnt)
        return time.perf_counter() - t0


def bench(reps: int, big: int, nfiles: int, work: Path) -> tuple[dict[str, Any], str]:
    images = {
        "read": bl.lazy_image(
            f"trace-big-{big // MiB}m",
            lambda: [FileSpec("data/big.bin", big, seed=5, kind="random")],
        ),
        "files": bl.lazy_image(f"trace-tree-{nfiles}", lambda: _files(nfiles)),
    }
    images["walk"] = images["files"]
    rows = []
    out: dict[str, Any] = {}
    for what, layout in images.items():
        cache = work / f"cache-{what}"
        mnt = work / "mnt"
        # Fill the chunk cache once, so every measured run reads from local disk.
        _measure(f"oci:{layout}", cache, mnt, work, False, "files" if what == "walk" else what)
        plain: list[float] = []
        traced: list[float] = []
        for _ in range(reps):  # alternate, so drift hits both alike
            plain.append(_measure(f"oci:{layout}", cache, mnt, work, False, what))
            traced.append(_measure(f"oci:{layout}", cache, mnt, work, True, what))
        sp, st = bl.summarize(plain), bl.summarize(traced)
        out[what] = {"untraced": sp.as_dict(), "traced": st.as_dict()}
        label = {
            "read": f"sequential read of {big // MiB} MiB",
            "files": f"read {nfiles} small files",
            "walk": f"walk + lstat {nfiles} files",
        }[what]
        rows.append([label, bl.fmt_ms(sp), bl.fmt_ms(st), bl.ratio(st.median, sp.median)])
    body = bl.md_table(["workload", "untraced (ms)", "--trace (ms)", "traced / untraced"], rows)
    note = (
        "\nHow to read this: medians (min–max) of alternating runs on fresh mounts over a warm "
        "chunk cache, so the recorder's own cost is not hidden behind the network. A ratio "
        "near 1.00× means recording is free for that workload.\n"
    )
    return out, body + note


def main() -> int:
    p = bl.bench_parser(__doc__)
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    bl.sigterm_as_interrupt()
    machine = bl.machine_info()
    work = bl.work_dir("trace")
    try:
        result, body = bench(
            reps, (32 if args.quick else 256) * MiB, 1_000 if args.quick else 10_000, work
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(machine=machine, command=bl.command_line())
    bl.publish("trace", "Tracing overhead", result, body, machine, quick=args.quick,
               markdown=not args.no_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
