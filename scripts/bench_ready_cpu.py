"""The CPU a cold mount spends between its TOC's arrival and readiness, step by step (issue
13): every layer of an OCI layout decoded from its TOC's bytes, added to a layer store over a
fresh chunk cache (no map kept: a cold mount), and the tree built and finished as a read-only
mount builds it.  Each repetition runs in a fresh process (a mount does each step once), this
tree and optionally another (``--before DIR``, a directory holding another ``lazyfs``
package) alternating in the same run; CPU time of the thread doing the step (load moves wall
time far more than CPU time on a shared machine), medians.

Run from the repo root: ``.venv/bin/python scripts/bench_ready_cpu.py [--layout DIR]
[--before DIR] [--reps N]`` (default layout: the Debian image ``bench_speed.py --image
debian`` builds, zstd:chunked).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAYOUT = ROOT / ".bench" / "images" / "debian" / "zstd"
STEPS = ("TOC decode", "layers added to the store", "tree built", "tree finished", "total")


def child(src: Path, layout: Path) -> dict[str, float]:
    """In a fresh process importing ``src``'s lazyfs: each step once, CPU ms."""
    sys.path.insert(0, str(src))
    from bench_toc_decode import decodes_in_worker, layer_tocs  # no lazyfs import of its own

    from lazyfs import heap
    from lazyfs.formats.layer import decode_layer_table
    from lazyfs.fs.tree import Tree
    from lazyfs.store import ChunkCache, LayerStore

    tocs = layer_tocs(layout)
    # As the daemon runs its start: malloc thresholds held low (H61) where its TOCs decode
    # in a worker (since H82 only a large TOC's), no full gc pass (H70).
    pin = getattr(heap, "start_up_thresholds", None)
    if pin is not None and decodes_in_worker([raw for _, _, raw in tocs]):
        pin()
    gc.set_threshold(*gc.get_threshold()[:2], 1 << 30)
    # A read-only mount's tree keeps no lower paths where the tree can leave them out.
    finish_kw = (
        {"lower_paths": False} if "lower_paths" in inspect.signature(Tree.finish).parameters else {}
    )
    spent = dict.fromkeys(STEPS, 0.0)

    def timed(step: str, fn: Any, *args: Any, **kw: Any) -> Any:
        c0 = time.thread_time()
        out = fn(*args, **kw)
        spent[step] += (time.thread_time() - c0) * 1e3
        return out

    scratch = Path(tempfile.mkdtemp(prefix="bench-ready-cpu-"))
    try:
        store = LayerStore(ChunkCache(scratch / "cache", 1 << 30))
        decoded = [
            (d, timed("TOC decode", decode_layer_table, loc, raw)[1]) for d, loc, raw in tocs
        ]
        for d, toc in decoded:
            timed("layers added to the store", store.add_layer, d.digest, None, toc, d.size)
        tree = Tree()
        timed("tree built", tree.add_beneath, [toc for _, toc in decoded], 0)
        timed("tree finished", tree.finish, **finish_kw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    spent["total"] = sum(v for k, v in spent.items() if k != "total")
    return spent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT)
    p.add_argument("--before", type=Path, help="a directory holding another lazyfs package")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--_child", nargs=2, metavar=("SRC", "LAYOUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(Path(args._child[0]), Path(args._child[1]))))
        return 0
    if not (args.layout / "index.json").exists():
        raise SystemExit(f"no OCI layout at {args.layout} (run bench_speed.py --image debian)")
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    import benchlib as bl  # the parent only: it imports this checkout's lazyfs

    load0 = os.getloadavg()[0]
    runs = bl.alternate_children(__file__, trees, [str(args.layout.resolve())], args.reps)
    print(f"{args.reps} fresh processes each, alternating; 1-min load {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; CPU ms, median (min-max)")  # fmt: skip
    names = list(trees)
    print("| step | " + " | ".join(names) + (" | ratio |" if len(names) == 2 else " |"))
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    for step in STEPS:
        cells, medians = [], []
        for name in names:
            values = [r[step] for r in runs[name]]
            medians.append(statistics.median(values))
            cells.append(f"{medians[-1]:.1f} ({min(values):.1f}-{max(values):.1f})")
        ratio = (
            [f"{medians[0] / medians[1]:.2f}x" if medians[1] else "-"] if len(names) == 2 else []
        )
        print("| " + " | ".join([step, *cells, *ratio]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
