"""A fetched TOC's decode, as a mount's start-up pays it (issue 13): every layer of an OCI
layout decoded from its TOC's bytes, each run in a fresh process (a mount decodes once),
wall and CPU time; this tree and optionally another (``--before DIR``, a directory holding
another ``lazyfs`` package) alternating in the same run.  What is timed is what the tree's
``load_layer`` does with a fetched TOC before the tree is built: ``decode_layer_table`` where
it exists, else ``decode_layer_toc`` (and ``pack_toc_table`` where that exists), after the
tree's ``start_up_thresholds`` where that exists and its daemon decodes the TOC in a worker,
as the daemon pays it.  ``--stages``:
this tree's decode step by step (medians of in-process repeats).

Run from the repo root: ``.venv/bin/python scripts/bench_toc_decode.py [--layout DIR]``
(default: the Debian image ``bench_speed.py --image debian`` builds, zstd:chunked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAYOUT = ROOT / ".bench" / "images" / "debian" / "zstd"


def layer_tocs(layout: Path) -> list[tuple[Any, Any, bytes]]:
    """Each layer's descriptor, TOC location and TOC bytes (as a fetch reads them), with the
    lazyfs imported (bench_ready_cpu's children use it too)."""
    from lazyfs.formats.layer import TAIL_SIZE, locate_toc, toc_by_annotations
    from lazyfs.ocilayout import Layout

    lay = Layout(layout)
    out = []
    for d in lay.manifest().layers:
        data = lay.read_blob(d.digest)
        loc = toc_by_annotations(d.annotations, d.size) or locate_toc(
            data[-TAIL_SIZE:], d.size, d.annotations
        )
        out.append((d, loc, data[loc.start : loc.end]))
    return out


def decodes_in_worker(raws: list[bytes]) -> bool:
    """Whether the imported lazyfs's daemon decodes one of these TOCs in a worker thread."""
    from lazyfs.store import tocs

    on_loop = getattr(tocs, "DECODE_ON_LOOP_BYTES", None)
    return on_loop is None or any(len(raw) > on_loop for raw in raws)


def child(src: Path, layout: Path) -> dict[str, Any]:
    """In a fresh process importing ``src``'s lazyfs: decode every layer's TOC once."""
    sys.path.insert(0, str(src))
    from lazyfs import heap
    from lazyfs.formats import layer, toc

    tocs = layer_tocs(layout)
    pin = getattr(heap, "start_up_thresholds", None)
    # As the mount daemon does before a decode in a worker (H61; since H82 a large TOC's).
    if pin is not None and decodes_in_worker([raw for _, _, raw in tocs]):
        pin()
    table = getattr(layer, "decode_layer_table", None)
    pack_table = getattr(toc, "pack_toc_table", None)
    wall = cpu = 0.0
    entries = 0
    for _, loc, raw in tocs:
        w0, c0 = time.perf_counter(), time.thread_time()
        if table is not None:
            _, got = table(loc, raw)
        else:
            got = layer.decode_layer_toc(loc, raw)
            if pack_table is not None:
                _, got = pack_table(got)
        wall += time.perf_counter() - w0
        cpu += time.thread_time() - c0
        entries += len(got.entries)
    return {"wall": wall, "cpu": cpu, "entries": entries, "lazyfs": str(Path(toc.__file__))}


def stages(layout: Path, reps: int) -> str:
    """This tree's decode step by step (medians of ``reps`` in-process runs)."""
    import msgspec

    from lazyfs.formats import estargz
    from lazyfs.formats import toc as T
    from lazyfs.formats.layer import toc_json

    lines = []
    for _, loc, raw in layer_tocs(layout):
        times: dict[str, list[float]] = {}

        def timed(name: str, fn: Any, *args: Any, times: dict[str, list[float]] = times) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        for _ in range(reps):
            js = timed("inflate + verify", toc_json, loc, raw)
            wire = timed("JSON to wire structs (msgspec)", T._wire_decoder.decode, js)
            del js
            packed = timed(
                "wire structs to columns, checked",
                T._wire_columns,
                wire.entries,
                "zstd",
                loc.data_end,
                estargz.RESERVED_NAMES,
                estargz.PREFETCH_LANDMARK,
            )
            del wire
            data = timed("columns packed (msgpack)", msgspec.msgpack.encode, packed)
            timed("EntryTable of the packed bytes", T.EntryTable, data)
        lines.append(f"{loc.format} TOC, {len(packed.names):,} entries:")
        for name, values in times.items():
            lines.append(f"  {name:36s} {statistics.median(values) * 1e3:7.1f} ms")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT)
    p.add_argument("--before", type=Path, help="a directory holding another lazyfs package")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--stages", action="store_true")
    p.add_argument("--_child", nargs=2, metavar=("SRC", "LAYOUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(Path(args._child[0]), Path(args._child[1]))))
        return 0
    if not (args.layout / "index.json").exists():
        raise SystemExit(f"no OCI layout at {args.layout} (run bench_speed.py --image debian)")
    if args.stages:
        print(stages(args.layout, args.reps))
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    import benchlib as bl  # the parent only: it imports this checkout's lazyfs

    runs = bl.alternate_children(__file__, trees, [str(args.layout)], args.reps)
    for name, rs in runs.items():
        wall = sorted(r["wall"] * 1e3 for r in rs)
        cpu = sorted(r["cpu"] * 1e3 for r in rs)
        print(
            f"{name}: {rs[0]['entries']:,} entries; wall ms median {statistics.median(wall):.1f} "
            f"({wall[0]:.1f}-{wall[-1]:.1f}), CPU ms median {statistics.median(cpu):.1f} "
            f"({cpu[0]:.1f}-{cpu[-1]:.1f})"
        )
    print(f"1-min load {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
