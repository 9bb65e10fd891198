"""The scenarios.  Every contender runs in the same run, alternating (the order rotates each
repetition), and every ratio is against that run's baseline.

A contender is a function returning ``{row: {metric: value}}`` for one repetition (one
function may yield several rows, e.g. a cold and then a warm read on the same cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    MiB,
    lazyfs_mount,
    log,
    overlay_mount,
    read_file,
    summarize,
    walk_lstat,
)

from . import netns, rtts
from .images import BIGFILE, BIGFILE_SIZE, Image

Rows = dict[str, dict[str, float]]
Contender = tuple[str, Callable[[], Rows]]

FORMATS = {"zstd:chunked": "zstd", "eStargz": "estargz"}


@dataclass
class Ctx:
    host: str  # the relay, host:port
    images: dict[str, Image]
    reps: int
    work: Path
    push: Callable[[Path, str, str], None]  # (layout, repo, tag) straight to the registry
    notes: list[str] = field(default_factory=list)
    relay_events: Path | None = None  # the relay's event log: each lazy run's requests tabled
    only: list[str] = field(default_factory=list)  # run the contenders naming one of these
    before: Path | None = None  # a checkout whose lazyfs runs as "before:" twins
    landmarks: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # per label

    def ref(self, img: Image, fmt_dir: str) -> str:
        return f"{self.host}/bench/{img.name}:{fmt_dir}"

    def fresh(self, name: str) -> Path:
        p = self.work / name
        shutil.rmtree(p, ignore_errors=True)
        return p


def alternate(contenders: list[Contender], reps: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for rep in range(reps):
        k = rep % len(contenders)
        for name, fn in contenders[k:] + contenders[:k]:
            log(f"  rep {rep + 1}/{reps}: {name}")
            for row, metrics in fn().items():
                for metric, value in metrics.items():
                    out.setdefault(row, {}).setdefault(metric, []).append(value)
    return out


def summaries(raw: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    return {
        row: {m: summarize(v).as_dict() for m, v in metrics.items()} for row, metrics in raw.items()
    }


def run_workload(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"workload {argv[:3]} failed: {res.stderr.strip()[-1500:]}")


def lazy_stats(mnt: Path) -> dict[str, float]:
    res = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "stats", str(mnt), "--json"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return {}
    layers = json.loads(res.stdout).get("layers", [])
    st = [layer.get("stats", {}) for layer in layers]
    return {
        "lazyfs_bytes_fetched": float(sum(s.get("bytes_fetched", 0) for s in st)),
        "lazyfs_requests": float(sum(s.get("requests", 0) for s in st)),
    }


def no_prefetch_args() -> tuple[str, ...]:
    """``--no-prefetch`` when this lazyfs has it: a plain lazy mount then fetches only what is
    read (newer lazyfs looks for stored groups and landmarks by default)."""
    _, mount_help = lazyfs_help()
    return ("--no-prefetch",) if "--no-prefetch" in mount_help else ()


def lazyfs_help(sub: str = "mount") -> tuple[str, str]:
    """``lazyfs --help`` and ``lazyfs SUB --help``."""

    def h(*a: str) -> str:
        cmd = [sys.executable, "-m", "lazyfs.cli", *a, "--help"]
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    return h(), h(sub)


# ----------------------------------------------------------------------------- startup


def _pull_extract(ctx: Ctx, img: Image) -> Rows:
    d = ctx.fresh("pull")
    d.mkdir(parents=True)
    c0 = netns.connections_opened()
    b0, t0 = netns.veth_bytes(), time.perf_counter()
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
         "--src-no-creds", f"docker://{ctx.ref(img, 'gzip')}", f"oci:{d / 'oci'}:x"],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    subprocess.run(
        ["umoci", "unpack", "--image", f"{d / 'oci'}:x", str(d / "bundle")],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    run_workload(img.workload(d / "bundle" / "rootfs"))
    secs, nbytes = time.perf_counter() - t0, netns.veth_bytes() - b0
    shutil.rmtree(d)
    conns = netns.connections_opened() - c0
    return {"pull+extract (gzip)": {"seconds": secs, "veth_bytes": nbytes, "connections": conns}}


def _lazy_start(
    ctx: Ctx,
    img: Image,
    label: str,
    fmt_dir: str,
    *extra: str,
    forks: Path | None = None,
    tree: Path | None = None,
) -> Rows:
    from unittest import mock

    from lazyfs.fs import forkserver

    cache, mnt = ctx.fresh("cache"), ctx.work / "mnt"
    c0 = netns.connections_opened()
    b0, t0, m0 = netns.veth_bytes(), time.perf_counter(), time.monotonic()
    with contextlib.ExitStack() as stack:
        if tree is not None and forks is not None:
            # The fork server refuses a client of other code: this one asks as the tree's.
            stack.enter_context(mock.patch.object(
                forkserver, "origin", lambda: f"{sys.executable} {tree / 'lazyfs'}"))  # fmt: skip
        d = stack.enter_context(lazyfs_mount(
            ctx.ref(img, fmt_dir), mnt, cache, "--plain-http", *extra, forkserver=forks,
            **({"tree": tree} if tree is not None else {}),
        ))  # fmt: skip
        mounted = time.perf_counter() - t0
        run_workload(img.workload(mnt))
        secs, nbytes = time.perf_counter() - t0, netns.veth_bytes() - b0
        _table_requests(ctx, label, m0, mounted, secs)
        conns = netns.connections_opened() - c0
        st = lazy_stats(mnt)
        rss = d.rss_kib().get("VmHWM", 0)
    shutil.rmtree(cache, ignore_errors=True)
    row = {
        "seconds": secs,
        "veth_bytes": nbytes,
        "mount_seconds": mounted,
        "rss_peak_kib": rss,
        "connections": conns,
    }
    return {label: {**row, **st}}


def _table_requests(ctx: Ctx, label: str, m0: float, mounted: float, secs: float) -> None:
    """The run's requests as the relay saw them, in ``ctx.work/rtts.md`` (appended)."""
    if ctx.relay_events is None or not ctx.relay_events.exists():
        return
    time.sleep(0.05)  # the relay's last lines
    reqs = rtts.requests_between(ctx.relay_events, m0, m0 + secs)
    ctx.landmarks.setdefault(label, []).append(rtts.landmarks(reqs))
    with open(ctx.work / "rtts.md", "a") as out:
        out.write(
            f"\n### {label}: mount {mounted * 1000:.0f} ms, done {secs * 1000:.0f} ms "
            f"(ms after the mount command)\n\n{rtts.table(reqs)}\n"
        )


def prefetch_contenders(
    ctx: Ctx, img: Image, forks: Path | None = None, before_forks: Path | None = None
) -> list[Contender]:
    """``lazyfs mount --prefetch GROUPS.json`` contenders, when this lazyfs has them.

    Set-up (untimed, once per run): mount the zstd:chunked image with ``--trace`` and a fresh
    cache, run the workload, unmount (the trace is written then), ``lazyfs optimize`` it into
    groups.  "lazy+prefetch" then mounts with ``--prefetch GROUPS --group startup`` and is
    timed exactly like the other lazy contenders.  "re-laid-out+prefetch" does the same on the
    image rewritten by ``lazyfs convert --prefetch GROUPS`` (group files first), pushed as
    ``:relaid``.  Each is skipped, with a note, when this lazyfs lacks the option.  ``forks``:
    a fork server's socket; both also run with their daemon forked from it (no interpreter
    start, no imports: how the snapshotter starts its daemons).
    """
    top, mount_help = lazyfs_help()
    if "--prefetch" not in mount_help or "optimize" not in top:
        ctx.notes.append(
            "startup: no prefetch contenders (this lazyfs has no `mount --prefetch` / "
            "`optimize`; hook: scenarios.prefetch_contenders)"
        )
        return []
    pdir = ctx.fresh("prefetch")
    pdir.mkdir(parents=True)
    trace, groups = pdir / "trace.json", pdir / "groups.json"
    try:
        with lazyfs_mount(
            ctx.ref(img, "zstd"), ctx.work / "mnt", pdir / "cache", "--plain-http",
            "--trace", str(trace), "--group", "startup",
        ):  # fmt: skip
            run_workload(img.workload(ctx.work / "mnt"))
        # The group's byte ranges too, from the image's TOCs, when this lazyfs writes them
        # (a cold mount then sends them beside the TOC); a --before tree ignores them.
        _, optimize_help = lazyfs_help("optimize")
        ranges = ("--ranges", ctx.ref(img, "zstd"), "--plain-http")
        res = subprocess.run(
            [sys.executable, "-m", "lazyfs.cli", "optimize", "--out", str(groups), str(trace),
             *(ranges if "--ranges" in optimize_help else ())],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip()[-500:])
    except Exception as e:
        ctx.notes.append(f"startup: prefetch set-up (trace + optimize) failed, skipped: {e}")
        return []
    shutil.rmtree(pdir / "cache", ignore_errors=True)
    ctx.notes.append(
        "startup: the prefetch contenders use groups from one traced cold run of the same "
        "workload (`lazyfs mount --trace` then `lazyfs optimize`), made before the timed runs"
    )
    args = ("--prefetch", str(groups), "--group", "startup")

    def with_groups(name: str, label: str, fmt_dir: str) -> list[Contender]:
        """The contender, and the same with its daemon forked when there is a fork server
        (and each again with the ``--before`` tree's lazyfs)."""
        both: list[Contender] = [(name, lambda: _lazy_start(ctx, img, label, fmt_dir, *args))]
        if forks is not None:
            both.append((f"{name}, forked", lambda: _lazy_start(
                ctx, img, f"{label}, daemon forked", fmt_dir, *args, forks=forks)))  # fmt: skip
        if ctx.before is not None:
            both.append((f"before: {name}", lambda: _lazy_start(
                ctx, img, f"before: {label}", fmt_dir, *args, tree=ctx.before)))  # fmt: skip
        if ctx.before is not None and before_forks is not None:
            both.append((f"before: {name}, forked", lambda: _lazy_start(
                ctx, img, f"before: {label}, daemon forked", fmt_dir, *args,
                forks=before_forks, tree=ctx.before)))  # fmt: skip
        return both

    out = with_groups("lazy+prefetch", "lazyfs zstd:chunked + prefetch", "zstd")
    # The same groups stored beside the image (referrers): what a plain mount finds by
    # itself, with the lookup's round trips on the link.  The other zstd contenders do not
    # look (--no-prefetch, or --prefetch FILE).
    res = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "optimize", "--out", str(pdir / "pushed.json"),
         str(trace), "--push", ctx.ref(img, "zstd"), "--plain-http"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if res.returncode != 0:
        ctx.notes.append(f"startup: no stored-groups contender: {res.stderr.strip()[-300:]}")
    else:
        ctx.notes.append(
            "startup: stored groups = the same groups pushed beside the zstd:chunked image "
            "(`lazyfs optimize --push`); a plain mount (no --prefetch) finds them"
        )
        # No --prefetch: each twin finds the pushed groups by itself.  Forked too: the
        # snapshotter's daemons are forked, and stored groups are what it gets.
        stored = "lazyfs zstd:chunked + stored groups"
        out.append(("lazy+stored groups", lambda: _lazy_start(ctx, img, stored, "zstd")))
        if forks is not None:
            out.append((
                "lazy+stored groups, forked",
                lambda: _lazy_start(ctx, img, f"{stored}, daemon forked", "zstd", forks=forks),
            ))  # fmt: skip
        if ctx.before is not None:
            out.append((
                "before: lazy+stored groups",
                lambda: _lazy_start(ctx, img, f"before: {stored}", "zstd", tree=ctx.before),
            ))  # fmt: skip
        if ctx.before is not None and before_forks is not None:
            out.append((
                "before: lazy+stored groups, forked",
                lambda: _lazy_start(ctx, img, f"before: {stored}, daemon forked", "zstd",
                                    forks=before_forks, tree=ctx.before),
            ))  # fmt: skip
    _, convert_help = lazyfs_help("convert")
    if "--prefetch" not in convert_help:
        ctx.notes.append("startup: no re-laid-out+prefetch (no `lazyfs convert --prefetch`)")
        return out
    relaid = pdir / "relaid"
    res = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "convert", f"oci:{img.layout('gzip')}:bench",
         f"oci:{relaid}:bench", "--prefetch", str(groups), "--group", "startup"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if res.returncode != 0:
        ctx.notes.append(f"startup: `lazyfs convert --prefetch` failed: {res.stderr[-300:]}")
        return out
    ctx.push(relaid, f"bench/{img.name}", "relaid")
    ctx.notes.append(
        "startup: re-laid-out = `lazyfs convert --prefetch GROUPS --group startup` of the gzip "
        "image (group files first, then a landmark), zstd:chunked"
    )
    out += with_groups("re-laid-out+prefetch", "lazyfs re-laid-out + prefetch", "relaid")
    return out


def startup(ctx: Ctx, image: str) -> dict[str, Any]:
    from lazyfs.fs.forkserver import ForkServer

    img = ctx.images[image]
    contenders: list[Contender] = [("pull+extract", lambda: _pull_extract(ctx, img))]
    pure = no_prefetch_args()
    for label, fmt_dir in FORMATS.items():
        contenders.append(
            (
                label,
                lambda label=label, f=fmt_dir: _lazy_start(ctx, img, f"lazyfs {label}", f, *pure),
            )
        )
    forks_dir = ctx.fresh("forks")
    forks_dir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        forks = stack.enter_context(
            ForkServer.start(forks_dir / "forks.sock", log=forks_dir / "forks.log")
        )
        before_forks = None
        if ctx.before is not None:
            # The server runs ``python -m lazyfs.cli`` in the current directory: the before
            # tree's lazyfs, and the daemons it forks.
            here = os.getcwd()
            os.chdir(ctx.before)
            try:
                before_forks = stack.enter_context(
                    ForkServer.start(forks_dir / "before.sock", log=forks_dir / "before.log")
                )
            finally:
                os.chdir(here)
        contenders += prefetch_contenders(
            ctx, img, forks.socket, before_forks.socket if before_forks else None
        )
        if ctx.only:  # the baseline always runs: every ratio is against it
            contenders = [
                c for c in contenders
                if c[0] == "pull+extract" or any(o in c[0] for o in ctx.only)
            ]  # fmt: skip
        raw = alternate(contenders, ctx.reps)
    if ctx.landmarks:
        with open(ctx.work / "rtts.md", "a") as out:
            out.write(f"\n### medians over the runs\n\n{rtts.medians(ctx.landmarks)}\n")
    return {
        "scenario": "startup",
        "image": image,
        "baseline": "pull+extract (gzip)",
        "primary": "seconds",
        "what": f"cold start to workload exit: {img.describe()}",
        "rows": summaries(raw),
    }


# ----------------------------------------------------------------------------- read


def _drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_read(path: Path) -> float:
    t0 = time.perf_counter()
    n = read_file(path)
    secs = time.perf_counter() - t0
    if n != BIGFILE_SIZE:
        raise RuntimeError(f"read {n} bytes of {path}, expected {BIGFILE_SIZE}")
    return secs


def _mbs(secs: float) -> float:
    return BIGFILE_SIZE / secs / 1e6


def _read_native(img: Image) -> Rows:
    path = img.rootfs / BIGFILE
    _drop_file_cache(path)
    cold = _timed_read(path)
    warm = _timed_read(path)
    return {
        "native disk, cold": {"seconds": cold, "MB_s": _mbs(cold), "veth_bytes": 0.0},
        "native disk, warm": {"seconds": warm, "MB_s": _mbs(warm), "veth_bytes": 0.0},
    }


def _read_curl(ctx: Ctx, img: Image) -> Rows:
    (blob,) = img.meta["blobs"]["zstd"]
    url = f"http://{ctx.host}/v2/bench/{img.name}/blobs/{blob['digest']}"
    b0, t0 = netns.veth_bytes(), time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True, timeout=1800)
    secs = time.perf_counter() - t0
    row = {"seconds": secs, "MB_s": _mbs(secs), "veth_bytes": netns.veth_bytes() - b0}
    return {"curl of the zstd:chunked blob": row}


def _read_lazy(ctx: Ctx, img: Image, label: str, fmt_dir: str) -> Rows:
    cache, mnt = ctx.fresh("cache"), ctx.work / "mnt"
    rows: Rows = {}
    for phase in ("cold", "warm"):
        with lazyfs_mount(ctx.ref(img, fmt_dir), mnt, cache, "--plain-http") as d:
            b0 = netns.veth_bytes()
            secs = _timed_read(mnt / BIGFILE)
            nbytes = netns.veth_bytes() - b0
            rows[f"lazyfs {label}, {phase} cache"] = {
                "seconds": secs,
                "MB_s": _mbs(secs),
                "veth_bytes": nbytes,
                "rss_peak_kib": d.rss_kib().get("VmHWM", 0),
                **lazy_stats(mnt),
            }
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def read(ctx: Ctx, image: str = "bigfile") -> dict[str, Any]:
    img = ctx.images[image]
    contenders: list[Contender] = [
        ("native", lambda: _read_native(img)),
        ("curl", lambda: _read_curl(ctx, img)),
    ]
    for label, fmt_dir in FORMATS.items():
        contenders.append((label, lambda label=label, f=fmt_dir: _read_lazy(ctx, img, label, f)))
    raw = alternate(contenders, ctx.reps)
    return {
        "scenario": "read",
        "image": image,
        "baseline": "curl of the zstd:chunked blob",
        "primary": "seconds",
        "what": f"sequential read of one {BIGFILE_SIZE // MiB} MiB incompressible file "
        "(1 MiB reads); lazyfs: mount not timed; warm = remount on the same chunk cache",
        "rows": summaries(raw),
    }


# ----------------------------------------------------------------------------- walk


def walk(ctx: Ctx, image: str = "syn10k") -> dict[str, Any]:
    img = ctx.images[image]
    expect = walk_lstat(img.rootfs)

    def timed_walk(root: Path) -> float:
        t0 = time.perf_counter()
        n = walk_lstat(root)
        secs = time.perf_counter() - t0
        if n != expect:
            raise RuntimeError(f"walk of {root} saw {n} entries, native has {expect}")
        return secs

    def native() -> Rows:
        return {"native disk": {"seconds": timed_walk(img.rootfs), "mount_seconds": 0.0}}

    def overlay() -> Rows:
        with overlay_mount(img.rootfs, ctx.fresh("ovl"), ctx.work / "mnt") as d:
            secs = timed_walk(ctx.work / "mnt")
        return {"fuse-overlayfs": {"seconds": secs, "mount_seconds": d.ready_s}}

    def lazy(label: str, fmt_dir: str) -> Rows:
        cache = ctx.fresh("cache")
        b0 = netns.veth_bytes()
        with lazyfs_mount(ctx.ref(img, fmt_dir), ctx.work / "mnt", cache, "--plain-http") as d:
            secs = timed_walk(ctx.work / "mnt")
            rss = d.rss_kib().get("VmHWM", 0)
        row = {"seconds": secs, "mount_seconds": d.ready_s, "rss_peak_kib": rss}
        return {f"lazyfs {label}": {**row, "veth_bytes": netns.veth_bytes() - b0}}

    contenders: list[Contender] = [("native", native), ("fuse-overlayfs", overlay)]
    for label, fmt_dir in FORMATS.items():
        contenders.append((label, lambda label=label, f=fmt_dir: lazy(label, f)))
    raw = alternate(contenders, ctx.reps)
    return {
        "scenario": "walk",
        "image": image,
        "baseline": "native disk",
        "primary": "seconds",
        "what": f"os.walk + lstat of {expect} entries (FUSE mounts fresh each run, not timed; "
        "native dentries warm)",
        "rows": summaries(raw),
    }


# ----------------------------------------------------------------------------- mount


def mount(ctx: Ctx, images: list[str]) -> dict[str, Any]:
    def one(img: Image, label: str, fmt_dir: str, *extra: str) -> Rows:
        cache = ctx.fresh("cache")
        b0 = netns.veth_bytes()
        mnt = ctx.work / "mnt"
        with lazyfs_mount(ctx.ref(img, fmt_dir), mnt, cache, "--plain-http", *extra) as d:
            nbytes = netns.veth_bytes() - b0
            rss_mounted = d.rss_kib().get("VmRSS", 0)
            walk_lstat(ctx.work / "mnt")
            rss_walked = d.rss_kib().get("VmHWM", 0)
        return {
            f"{label}, {img.meta['files']} files": {
                "seconds": d.ready_s,
                "veth_bytes": nbytes,
                "rss_mounted_kib": rss_mounted,
                "rss_peak_after_walk_kib": rss_walked,
            }
        }

    variants: list[tuple[str, str, tuple[str, ...]]] = [
        (label, fmt_dir, ()) for label, fmt_dir in FORMATS.items()
    ]
    if pure := no_prefetch_args():
        variants.insert(1, ("zstd:chunked --no-prefetch", "zstd", pure))
        ctx.notes.append(
            "mount: a default mount also looks for prefetch groups stored in the registry "
            "(referrers) and for landmarks; `--no-prefetch` skips that"
        )
    contenders: list[Contender] = []
    for name in images:
        img = ctx.images[name]
        for label, fmt_dir, extra in variants:
            contenders.append(
                (f"{label} {name}", lambda i=img, la=label, f=fmt_dir, x=extra: one(i, la, f, *x))
            )
    raw = alternate(contenders, ctx.reps)
    first = ctx.images[images[0]]
    return {
        "scenario": "mount",
        "image": ",".join(images),
        "baseline": f"zstd:chunked, {first.meta['files']} files",
        "primary": "seconds",
        "what": "`lazyfs mount` spawn to mounted (cold cache; manifests + TOCs over the link), "
        "daemon RSS once mounted and peak after a full os.walk + lstat",
        "rows": summaries(raw),
    }
