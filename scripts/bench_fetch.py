# ruff: noqa: RUF001, RUF002, RUF003  (×, – and µ in Markdown output are intended)
"""Cold fetch from a loopback docker-registry.

- throughput of a ~200 MB incompressible lazy layer: ``curl`` of the blob (the ceiling),
  ``LayerStore.fetch_all`` on a fresh cache (what ``lazyfs pull`` does), and a cold ``cat`` of
  the file through a fresh lazy mount;
- requests needed to read 2000 small files (4–64 KiB), with range merging on (default) and
  off (``merge_gap=-1``), for per-file reads and for one bulk ``prefetch``.

Run from the repo root: ``.venv/bin/python scripts/bench_fetch.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl
import msgspec
from benchlib import FileSpec, MiB


def big_files(size: int) -> list[FileSpec]:
    return [FileSpec("data/big.bin", size, seed=7, kind="random")]


def small_files(n: int) -> list[FileSpec]:
    rng = random.Random(11)
    return [
        FileSpec(f"s{i // 100:02d}/f{i:05d}.bin", rng.randint(4096, 65536), seed=50_000 + i)
        for i in range(n)
    ]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


async def _open(host: str, repo: str, cache_dir: Path, **store_kw: Any) -> tuple[Any, ...]:
    from lazyfs.remote.registry import RegistrySource
    from lazyfs.store import ChunkCache, LayerStore
    from lazyfs.store.tocs import load_tocs

    fsync = store_kw.pop("fsync", True)
    source = RegistrySource(host, repo, plain_http=True)
    image = await load_tocs(source, "latest")
    store = LayerStore(ChunkCache(cache_dir, fsync=fsync), **store_kw)
    li = image.layers[0]
    layer = store.add_layer(li.descriptor.digest, source, li.toc)
    return source, store, layer


def pull_once(host: str, repo: str, cache_dir: Path, *, fsync: bool = True) -> dict[str, Any]:
    import trio

    async def run() -> dict[str, Any]:
        source, store, layer = await _open(host, repo, cache_dir, fsync=fsync)
        try:
            t0 = time.perf_counter()
            await store.fetch_all(layer)
            dt = time.perf_counter() - t0
            await store.aclose()
            return {
                "seconds": dt,
                "requests": layer.stats.requests,
                "bytes_fetched": layer.stats.bytes_fetched,
            }
        finally:
            await source.aclose()

    return trio.run(run)


def small_reads_once(host: str, repo: str, cache_dir: Path, mode: str, merge_gap: int) -> dict:
    import trio

    async def run() -> dict[str, Any]:
        source, store, layer = await _open(host, repo, cache_dir, merge_gap=merge_gap)
        try:
            entries = [e for e in layer.toc.entries if e.type == "reg" and e.size]
            before = source.stats.requests
            t0 = time.perf_counter()
            if mode == "read":
                for e in entries:
                    data = await store.read(layer, e, 0, e.size)
                    assert len(data) == e.size
            else:
                await store.prefetch(layer, entries)
            dt = time.perf_counter() - t0
            await store.aclose()
            return {
                "seconds": dt,
                "requests": layer.stats.requests,
                "http_requests": source.stats.requests - before,
                "bytes_fetched": layer.stats.bytes_fetched,
                "files": len(entries),
            }
        finally:
            await source.aclose()

    return trio.run(run)


def mount_stats(mnt: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "stats", str(mnt), "--json"],
        capture_output=True,
        check=True,
        cwd=bl.ROOT,
    ).stdout
    report = msgspec.json.decode(out)
    s = report["layers"][0]["stats"]
    return {k: s[k] for k in ("requests", "bytes_fetched", "cache_misses", "wait_ns", "reads")}


def main() -> int:
    from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout

    p = bl.bench_parser(__doc__)
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    big_size = (20 if args.quick else 200) * MiB
    n_small = 300 if args.quick else 2000
    bl.sigterm_as_interrupt()
    machine = bl.machine_info()
    t_start = time.perf_counter()

    big = bl.lazy_image(f"fetch-big-{big_size // MiB}m", lambda: big_files(big_size))
    small = bl.lazy_image(f"fetch-small-{n_small}", lambda: small_files(n_small))
    big_digest, big_blob = bl.layer_blob(big)
    small_blob = bl.layer_blob(small)[1]
    work = bl.work_dir("fetch")
    res: dict[str, Any] = {"big_file_bytes": big_size, "big_blob_bytes": big_blob}
    try:
        with RegistryInstance(work / "registry") as reg:
            bl.log(f"registry on {reg.host}; pushing")
            push_oci_layout(big, f"{reg.host}/big:latest")
            push_oci_layout(small, f"{reg.host}/small:latest")
            url = f"{reg.url}/v2/big/blobs/{big_digest}"

            # (a) the ceiling: one plain GET of the whole blob.
            def curl() -> None:
                subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)

            bl.log("curl")
            curl()  # registry's own page cache warm for everyone
            t_curl = bl.repeat(curl, reps)

            # (b) LayerStore.fetch_all into a fresh cache (default fsync, then without).
            pulls: dict[str, list[dict[str, Any]]] = {"fsync": [], "nofsync": []}
            for label, fsync in (("fsync", True), ("nofsync", False)):
                bl.log(f"fetch_all {label}")
                for _ in range(reps):
                    pulls[label].append(
                        pull_once(reg.host, "big", fresh(work / "cache"), fsync=fsync)
                    )
            t_pull = bl.summarize([r["seconds"] for r in pulls["fsync"]])
            t_pull_nf = bl.summarize([r["seconds"] for r in pulls["nofsync"]])

            # (c) cold cat of the big file through a fresh mount.
            cats: list[dict[str, Any]] = []
            bl.log("cold cat through mount")
            for _ in range(reps):
                with bl.lazyfs_mount(
                    f"{reg.host}/big:latest", work / "mnt", fresh(work / "cache"), "--plain-http"
                ) as m:
                    t0 = time.perf_counter()
                    subprocess.run(
                        ["cat", str(m.mountpoint / "data/big.bin")],
                        stdout=subprocess.DEVNULL,
                        check=True,
                    )
                    dt = time.perf_counter() - t0
                    cats.append({"seconds": dt, **mount_stats(m.mountpoint), **m.rss_kib()})
            t_cat = bl.summarize([r["seconds"] for r in cats])

            # Small files: request counts, merge on/off.
            small_res: dict[str, list[dict[str, Any]]] = {}
            for mode in ("read", "prefetch"):
                for label, gap in (("merge on", 64 * 1024), ("merge off", -1)):
                    key = f"{mode} / {label}"
                    bl.log(f"small files: {key}")
                    small_res[key] = [
                        small_reads_once(reg.host, "small", fresh(work / "cache"), mode, gap)
                        for _ in range(reps)
                    ]
            bl.log("small files through mount")
            mount_small: list[dict[str, Any]] = []
            for _ in range(reps):
                with bl.lazyfs_mount(
                    f"{reg.host}/small:latest", work / "mnt", fresh(work / "cache"), "--plain-http"
                ) as m:
                    files = sorted(
                        p for p in m.mountpoint.rglob("*") if p.is_file() and not p.is_symlink()
                    )
                    t0 = time.perf_counter()
                    for f in files:
                        bl.read_file(f)
                    dt = time.perf_counter() - t0
                    mount_small.append({"seconds": dt, **mount_stats(m.mountpoint)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mbps(s: bl.Summary) -> bl.Summary:
        return bl.throughput(big_size, s)

    ceil = mbps(t_curl).median
    rows = [
        [
            "`curl -o /dev/null` of the blob",
            bl.fmt_range(t_curl, "{:.2f}"),
            bl.fmt_range(mbps(t_curl)),
            "1.00×",
            1,
        ],
        [
            "`LayerStore.fetch_all`, fresh cache (default, fsync)",
            bl.fmt_range(t_pull, "{:.2f}"),
            bl.fmt_range(mbps(t_pull)),
            bl.ratio(mbps(t_pull).median, ceil),
            pulls["fsync"][0]["requests"],
        ],
        [
            "`LayerStore.fetch_all`, fresh cache, `ChunkCache(fsync=False)`",
            bl.fmt_range(t_pull_nf, "{:.2f}"),
            bl.fmt_range(mbps(t_pull_nf)),
            bl.ratio(mbps(t_pull_nf).median, ceil),
            pulls["nofsync"][0]["requests"],
        ],
        [
            "cold `cat` through a fresh mount",
            bl.fmt_range(t_cat, "{:.2f}"),
            bl.fmt_range(mbps(t_cat)),
            bl.ratio(mbps(t_cat).median, ceil),
            cats[0]["requests"],
        ],
    ]
    small_rows = []
    for key, runs in small_res.items():
        t = bl.summarize([r["seconds"] for r in runs])
        small_rows.append(
            [
                f"in-process `store.{key.split(' / ')[0]}`, {key.split(' / ')[1]}",
                runs[0]["requests"],
                runs[0]["http_requests"],
                f"{runs[0]['bytes_fetched'] / 1e6:.1f}",
                bl.fmt_ms(t),
            ]
        )
    t_ms = bl.summarize([r["seconds"] for r in mount_small])
    small_rows.append(
        [
            "read every file through a fresh mount (merge on)",
            mount_small[0]["requests"],
            "",
            f"{mount_small[0]['bytes_fetched'] / 1e6:.1f}",
            bl.fmt_ms(t_ms),
        ]
    )
    body = (
        f"### Cold fetch of a {big_size // MiB} MiB incompressible file "
        f"(blob {big_blob / 1e6:.1f} MB, {reps} runs)\n\n"
        + bl.md_table(
            ["method", "seconds", "MB/s of file content", "vs curl", "range requests"], rows
        )
        + "\n\nHow to read this: docker-registry on 127.0.0.1 (filesystem storage, blob in "
        "the page cache); MB/s = uncompressed file bytes / wall time (blob ≈ file size).  "
        "curl is the ceiling for one HTTP stream.  `fetch_all` excludes image open (manifest + "
        "TOC); the mount row times only the `cat` (128 KiB reads), cache dir fresh each run.  "
        "Cache on the same disk as the registry storage.\n\n"
        f"### Reading {n_small} small files (4–64 KiB, blob {small_blob / 1e6:.1f} MB, "
        f"{reps} runs)\n\n"
        + bl.md_table(
            ["how", "range requests", "HTTP requests", "MB fetched", "ms"],
            small_rows,
        )
        + "\n\nHow to read this: requests are `LayerStats.requests` (range GETs for content); "
        "HTTP requests also count redirects/retries (from `RegistrySource.stats`).  "
        "`store.read` reads every file once, in blob order, one at a time (like `cat` of each); "
        "`store.prefetch` asks for all files at once.  Merge off = `LayerStore(merge_gap=-1)`.  "
        "Request counts were identical in every run.\n"
    )
    res.update(
        {
            "curl_s": t_curl.as_dict(),
            "fetch_all": pulls,
            "cat": cats,
            "small": small_res,
            "small_mount": mount_small,
            "elapsed_s": time.perf_counter() - t_start,
        }
    )
    result = {"machine": machine, "command": bl.command_line(), **res}
    bl.publish("fetch", "Cold fetch", result, body, machine, quick=args.quick,
               markdown=not args.no_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
