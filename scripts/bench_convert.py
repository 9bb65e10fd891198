# ruff: noqa: RUF001, RUF003  (×, – and µ in Markdown output are intended)
"""Conversion throughput and TOC encode/decode cost.

- ``lazyfs convert`` of a ~300 MB synthetic uncompressed layer to zstd:chunked and eStargz,
  beside ``zstd -T0 -3`` and ``gzip -6`` of the same tar (MB/s of tar input, ratios).
- TOC encode (``encode_toc``) and decode (``decode_layer_toc``) for 10k and 100k entries, and
  the Python heap the decoded TOC holds.

Run from the repo root: ``.venv/bin/python scripts/bench_convert.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import gc
import io
import shlex
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import benchlib as bl
from benchlib import FileSpec, MiB


def convert_files(total: int) -> list[FileSpec]:
    """A deterministic mix: many small files, some medium, a few large (multi-chunk)."""
    import random

    rng = random.Random(42)
    files: list[FileSpec] = []
    used = 0
    i = 0
    buckets = [  # (share of bytes, min size, max size)
        (0.15, 512, 64 * 1024),
        (0.35, 64 * 1024, 2 * MiB),
        (0.50, 4 * MiB, 24 * MiB),
    ]
    for share, lo, hi in buckets:
        budget = int(total * share)
        spent = 0
        while spent < budget:
            size = min(rng.randint(lo, hi), budget - spent)
            files.append(FileSpec(f"d{i % 97:02d}/f{i:06d}.bin", size, seed=1000 + i))
            spent += size
            i += 1
        used += spent
    rng.shuffle(files)
    return files


def small_files(n: int) -> list[FileSpec]:
    return [FileSpec(f"dir{i // 100:04d}/file{i:06d}", 64 + i % 200, seed=i) for i in range(n)]


def bench_convert(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    total = (30 if args.quick else 300) * 1_000_000
    name = f"convert-{total // 1_000_000}mb"
    base = bl.BENCH_DIR / "data" / name
    tar = base / "layer.tar"
    if not (base / "plain" / "index.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        bl.log(f"building {tar}")
        bl.write_tar(tar, convert_files(total))
        bl.write_tar_layout(base / "plain", tar)
    tar_size = tar.stat().st_size
    nfiles = len(convert_files(total))
    bl.read_file(tar)  # page cache warm for everyone
    out = work / "out"
    sizes: dict[str, int] = {}

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)

    def lazyfs_convert(fmt: str) -> None:
        cmd = [sys.executable, "-m", "lazyfs.cli", "convert", f"oci:{base / 'plain'}"]
        cmd += [f"oci:{out}", "--format", fmt]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=bl.ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        _, size = bl.layer_blob(out)
        sizes[fmt] = size

    def shell(cmd: list[str], label: str) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        dst = out.with_suffix("." + label)
        with open(dst, "wb") as f:
            subprocess.run([*cmd, str(tar)], check=True, stdout=f)
        sizes[label] = dst.stat().st_size
        dst.unlink()

    results: dict[str, bl.Summary] = {}
    bl.log("zstd -T0 -3")
    results["zstd -T0 -3"] = bl.repeat(
        lambda: shell(["zstd", "-q", "-T0", "-3", "-c"], "zst"), args.reps
    )
    sizes["zstd -T0 -3"] = sizes.pop("zst")
    bl.log("gzip -6")
    results["gzip -6"] = bl.repeat(lambda: shell(["gzip", "-6", "-c"], "gz"), args.reps)
    sizes["gzip -6"] = sizes.pop("gz")
    for fmt in ("zstd:chunked", "estargz"):
        bl.log(f"lazyfs convert --format {fmt}")
        results[f"lazyfs convert --format {fmt}"] = bl.repeat(
            lambda fmt=fmt: lazyfs_convert(fmt), args.reps, setup=clean
        )
        sizes[f"lazyfs convert --format {fmt}"] = sizes.pop(fmt)
    clean()

    rates = {k: bl.throughput(tar_size, v) for k, v in results.items()}
    zb = rates["zstd -T0 -3"].median
    gb = rates["gzip -6"].median
    rows = []
    for k, r in rates.items():
        rows.append(
            [
                f"`{k}`",
                bl.fmt_range(results[k], "{:.2f}"),
                bl.fmt_range(r),
                bl.ratio(r.median, zb),
                bl.ratio(r.median, gb),
                f"{sizes[k] / tar_size:.1%}",
            ]
        )
    body = (
        f"### Conversion throughput ({tar_size / 1e6:.0f} MB tar, {nfiles} files, "
        f"{args.reps} runs)\n\n"
        + bl.md_table(
            [
                "tool",
                "seconds",
                "MB/s of tar input",
                "vs zstd -T0 -3",
                "vs gzip -6",
                "output/input",
            ],
            rows,
        )
        + "\n\nHow to read this: MB/s = uncompressed tar bytes / wall time (10^6 B/MB), tar in the "
        "page cache.  `lazyfs convert` runs as a CLI process (interpreter start-up, sha256 of the "
        "source blob, TOC, fsync of the output included); zstd and gzip just compress to a file "
        "without fsync.  zstd:chunked should be compared with zstd, eStargz with gzip.\n"
    )
    data = {
        "tar_bytes": tar_size,
        "files": nfiles,
        "seconds": {k: v.as_dict() for k, v in results.items()},
        "mb_per_s": {k: v.as_dict() for k, v in rates.items()},
        "output_bytes": sizes,
    }
    return data, body


def bench_toc(args: argparse.Namespace) -> tuple[dict, str]:
    from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc
    from lazyfs.formats.toc import encode_toc
    from lazyfs.formats.zstdchunked import write_layer

    counts = [2_000, 10_000] if args.quick else [10_000, 100_000]
    rows = []
    data: dict[str, dict] = {}
    for n in counts:
        tar = bl.BENCH_DIR / "data" / f"toc-{n}" / "layer.tar"
        if not tar.exists():
            tar.parent.mkdir(parents=True, exist_ok=True)
            bl.log(f"building {n}-file tar")
            bl.write_tar(tar, small_files(n))
        bl.log(f"write_layer {n}")
        blob = io.BytesIO()

        def write(blob: io.BytesIO = blob, tar: Path = tar) -> None:
            blob.seek(0)
            blob.truncate()
            with tar.open("rb") as f:
                write_layer(f, blob)

        t_write = bl.repeat(write, max(1, args.reps - 2))
        raw_blob = blob.getvalue()
        loc = locate_toc(raw_blob[-TAIL_SIZE:], len(raw_blob), None)
        raw = raw_blob[loc.start : loc.end]
        toc = decode_layer_toc(loc, raw)
        entries = toc.entries
        t_dec = bl.repeat(lambda loc=loc, raw=raw: decode_layer_toc(loc, raw), args.reps)
        t_enc = bl.repeat(lambda e=entries: encode_toc(e, flavour="zstd:chunked"), args.reps)
        json_len = len(encode_toc(entries, flavour="zstd:chunked"))
        del toc
        gc.collect()
        tracemalloc.start()
        kept = decode_layer_toc(loc, raw)
        heap, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        per_entry_us = t_dec.median / n * 1e6
        rows.append(
            [
                f"{n:,}",
                f"{len(raw) / 1e3:.0f} kB / {json_len / 1e6:.1f} MB",
                bl.fmt_ms(t_dec),
                f"{per_entry_us:.1f}",
                bl.fmt_ms(t_enc),
                bl.fmt_ms(t_write),
                f"{heap / 1e6:.1f} MB ({heap / n:.0f} B/entry), peak {peak / 1e6:.1f} MB",
            ]
        )
        data[str(n)] = {
            "toc_compressed_bytes": len(raw),
            "toc_json_bytes": json_len,
            "decode_s": t_dec.as_dict(),
            "encode_s": t_enc.as_dict(),
            "write_layer_s": t_write.as_dict(),
            "decoded_heap_bytes": heap,
            "decode_peak_heap_bytes": peak,
        }
    body = (
        f"### TOC encode/decode ({args.reps} runs; write_layer {max(1, args.reps - 2)})\n\n"
        + bl.md_table(
            [
                "entries",
                "TOC zstd / JSON",
                "decode_layer_toc ms",
                "µs/entry",
                "encode_toc ms",
                "write_layer ms (whole layer)",
                "heap held by decoded TOC",
            ],
            rows,
        )
        + "\n\nHow to read this: one small file (64–263 B) per entry, 100 per directory.  "
        "`decode_layer_toc` = zstd-decompress + msgspec decode + normalise + validate (what a "
        "mount does per layer at start, in a worker thread); `encode_toc` = the JSON the "
        "converter writes; `write_layer` = the whole in-memory conversion of that tar.  Heap "
        "measured with tracemalloc around one decode (peak includes the JSON and wire objects).\n"
    )
    return data, body


def main() -> int:
    p = bl.bench_parser(__doc__)
    args = p.parse_args()
    args.reps = args.reps or (2 if args.quick else 3)
    bl.sigterm_as_interrupt()
    machine = bl.machine_info()
    work = bl.BENCH_DIR / "work-convert"
    t0 = time.perf_counter()
    try:
        conv, conv_md = bench_convert(args, work)
        toc, toc_md = bench_toc(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine, "command": bl.command_line(), "convert": conv, "toc": toc}
    result["elapsed_s"] = time.perf_counter() - t0
    bl.publish("convert", "Conversion and TOC", result, conv_md + "\n" + toc_md, machine,
               quick=args.quick, markdown=not args.no_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
