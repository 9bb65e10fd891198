"""Daemon memory while reading 4 KiB of a file that is one big chunk.

Builds (once, under .bench/data) a zstd:chunked image whose only file is SIZE incompressible
bytes cut as a single chunk (as containers/storage's rolling hash does for content it cannot
split), mounts it from the local OCI layout with a fresh cache, reads 4 KiB from the middle,
and prints the daemon's peak RSS (VmHWM) before and after; then the same on a fresh mount
over the now-filled cache (the first read re-hashes the cached chunk).

Run from the repo root: ``.venv/bin/python scripts/bench_bigchunk.py [--size-mib N]``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import benchlib as bl
from benchlib import FileSpec, MiB


def image(size: int) -> Path:
    base = bl.BENCH_DIR / "data" / f"bigchunk-{size // MiB}m"
    lazy = base / "lazy"
    if (lazy / "index.json").exists():
        return lazy
    from lazyfs_tools.convert import convert

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    bl.log(f"building {base.name}")
    bl.write_tar(base / "layer.tar", [FileSpec("big.bin", size, seed=5, kind="random")])
    bl.write_tar_layout(base / "plain", base / "layer.tar")
    convert(f"oci:{base / 'plain'}", f"oci:{lazy}", chunk_size=size)
    return lazy


def read_4k(mnt: Path, size: int) -> float:
    t0 = time.perf_counter()
    with open(mnt / "big.bin", "rb") as f:
        f.seek(size // 2)
        assert len(f.read(4096)) == 4096
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args()
    size = args.size_mib * MiB
    lazy = image(size)
    work = bl.BENCH_DIR / "work-bigchunk"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "cache"
    print(f"file: one chunk of {size // MiB} MiB, zstd:chunked, local OCI layout")
    print("| case | seconds | daemon peak RSS before | after |")
    print("|---|---|---|---|")
    for case in ("cold cache (fetch, decode, verify)", "fresh mount, chunk cached"):
        with bl.lazyfs_mount(f"oci:{lazy}", work / "mnt", cache, "--no-prefetch") as d:
            before = d.rss_kib()["VmHWM"] // 1024
            seconds = read_4k(work / "mnt", size)
            after = d.rss_kib()["VmHWM"] // 1024
        print(f"| {case} | {seconds:.2f} | {before} MiB | {after} MiB |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
