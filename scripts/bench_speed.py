# ruff: noqa: RUF001, RUF003  (×, – and µ in Markdown output are intended)
"""Issue 13's local rows, each against its yardstick in the same run.

(1) ``find`` + ``du -s`` over a whole rootfs, warm: lazyfs vs native disk vs fuse-overlayfs over
    the extracted tree (the embedded sample image: this machine's Python 3 and its stdlib, plus
    a synthetic tree of ``--files`` small files so the walk has a Debian-sized entry count);
(2) the sample's Python start-up chrooted into each, warm;
(3) ``lazyfs mount`` until ready (spawn → ready), TOC cached and not, vs the interpreter's own
    start-up and ``lazyfs --help``; ``ready``: process start → mount point usable, the command
    and ``spawn`` each with and without a fork server (``lazyfs serve-forks``);
(4) daemon RSS after a walk of a ``--rss-files``-file image;
(5) ``cold``: a cold start (mount + the sample's Python start-up, chrooted) from Debian's
    docker-registry on 127.0.0.1 behind a counting proxy: lazyfs with no groups, lazyfs with
    groups traced from that start-up and stored beside the image, lazyfs on the image re-laid
    out by those groups (``convert --prefetch``: prefetch up to the landmark), and the
    yardstick, a full pull of the gzip layer + extract + the same start-up: seconds, blob
    requests and bytes; ``--image debian``: the same on the WAN harness's Debian image;
    ``--chunking 1m 256k+4m ...``: the lazyfs contenders once per way of cutting files into
    chunks (each its own converted image, cached beside the image), in the same run.

Every run uses fresh directories (on ext4 a large ``rm -rf`` slows file creation for seconds
afterwards) and deletes them at the end.  Run from the repo root:
``.venv/bin/python scripts/bench_speed.py [--reps N] [--only walk|python|mount|ready|rss|cold]
[--image sample|debian] [--chunking SIZE|HEAD+SIZE ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import benchlib as bl
from benchlib import FileSpec

from lazyfs.testing.sample import PYTHON, WORKLOAD, build_sample_image

IMPORTS = "import json, sqlite3, asyncio, email, http.client"


def _sample_with_tree(n: int) -> Path:
    """The sample image's layer plus ``n`` small files under /srv, as one lazy layer (cached)."""
    name = f"sample-tree-{n}"
    base = bl.BENCH_DIR / "data" / name
    lazy = base / "lazy"
    if (lazy / "index.json").exists():
        return lazy
    from lazyfs_tools.convert import convert

    from lazyfs.ocilayout import Layout

    src = build_sample_image(bl.BENCH_DIR / "data" / "sample")
    layer = Layout(src).manifest().layers[0].digest.split(":")[1]
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    tar = base / "layer.tar"
    bl.log(f"building {name}")
    with (
        tarfile.open(src / "blobs/sha256" / layer, "r:gz") as old,
        tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in old:
            out.addfile(member, old.extractfile(member) if member.isfile() else None)
        for d in range(n // 100 + 1):
            info = tarfile.TarInfo(f"srv/d{d:04d}" if d else "srv")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            out.addfile(info)
        for i in range(n):
            spec = FileSpec(f"srv/d{i // 100 + 1:04d}/f{i:06d}", i % 1024, seed=i)
            info = tarfile.TarInfo(spec.name)
            info.size, info.mode = spec.size, 0o644
            out.addfile(info, io.BytesIO(spec.data()))
    bl.write_tar_layout(base / "plain", tar)
    convert(f"oci:{base / 'plain'}", f"oci:{lazy}")
    return lazy


def _med(fn: Callable[[], Any], reps: int) -> bl.Summary:
    vals = []
    for _ in range(reps):
        t0 = time.perf_counter()
        try:
            fn()
            vals.append(time.perf_counter() - t0)
        finally:
            while _UNDO:  # clean-up a timed step left (not timed)
                _UNDO.pop()()
    return bl.summarize(vals)


def _find_du(root: Path) -> None:
    subprocess.run(["find", str(root)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["du", "-s", str(root)], check=True, stdout=subprocess.DEVNULL)


def _python(root: Path) -> None:
    subprocess.run(["chroot", str(root), PYTHON, "-c", IMPORTS], check=True)


def bench_tree(
    lazy: Path, native: Path, reps: int, work: Path, what: str, before: Path | None = None
) -> dict[str, bl.Summary]:
    """Every contender mounted side by side and timed in turn, round after round (the load
    moves more between minutes than between contenders); medians.  ``before``: the lazyfs of
    that checkout too, in its own mount."""
    from contextlib import ExitStack

    from lazyfs.fs.daemon import spawn

    fn = _find_du if what == "walk" else _python
    roots: dict[str, Path] = {"native disk": native}
    with ExitStack() as stack:
        # Writable, as a container's root is (and as fuse-overlayfs is here): Python writes
        # the byte code it compiles on the first run, and reads it on the next.
        m = stack.enter_context(
            bl.lazyfs_mount(
                f"oci:{lazy}", work / f"mnt-{what}", work / f"cache-{what}",
                upper=work / f"upper-{what}",
            )
        )  # fmt: skip
        roots["lazyfs"] = m.mountpoint
        if before is not None:
            mnt = work / f"mnt-before-{what}"
            mnt.mkdir()
            (work / f"cache-before-{what}").mkdir()
            args = ["--upper", str(work / f"upper-before-{what}")]
            args += ["--cache", str(work / f"cache-before-{what}")]
            # ``python -m lazyfs.cli`` run in ``before`` imports that checkout's lazyfs.
            d = spawn(f"oci:{lazy}", mnt, args, log=work / "before.log", timeout=120, cwd=before)
            stack.callback(d.stop)
            roots["before: lazyfs"] = mnt
        o = stack.enter_context(bl.overlay_mount(native, work / f"ovl-{what}", work / f"o-{what}"))
        roots["fuse-overlayfs"] = o.mountpoint
        for root in roots.values():
            fn(root)  # warm; and the sample's byte code is rewritten for its fixed tar mtimes
        times: dict[str, list[float]] = {k: [] for k in roots}
        for _ in range(reps):
            for name, root in roots.items():
                t0 = time.perf_counter()
                fn(root)
                times[name].append(time.perf_counter() - t0)
    return {k: bl.summarize(v) for k, v in times.items()}


def bench_mount(lazy: Path, reps: int, work: Path) -> dict[str, bl.Summary]:
    out: dict[str, bl.Summary] = {}
    out["python3 -c pass"] = _med(lambda: subprocess.run([sys.executable, "-c", "pass"]), reps)
    out["lazyfs --help"] = _med(
        lambda: subprocess.run(
            [sys.executable, "-m", "lazyfs.cli", "--help"], capture_output=True, check=True
        ),
        reps,
    )
    mnt = work / "mnt"
    cold, warm = [], []
    for i in range(reps):
        cache = work / f"cache-mount-{i}"
        cache.mkdir()
        with bl.lazyfs_mount(f"oci:{lazy}", mnt, cache) as m:
            cold.append(m.ready_s)
        with bl.lazyfs_mount(f"oci:{lazy}", mnt, cache) as m:
            warm.append(m.ready_s)
    out["lazyfs mount, TOC not cached"] = bl.summarize(cold)
    out["lazyfs mount, TOC cached"] = bl.summarize(warm)
    out["`lazyfs mount` command (daemonizes), TOC cached"] = _med(
        lambda: _cli_mount(f"oci:{lazy}", mnt, work / "cache-mount-0"), reps
    )
    return out


def bench_ready(lazy: Path, reps: int, work: Path) -> dict[str, bl.Summary]:
    """Process start → mount point usable (a stat of it answered by the mount), TOC cached,
    contenders alternating within each repetition: the interpreter floors; ``lazyfs mount`` as
    a shell runs it, forking its own daemon or asking a ``lazyfs serve-forks``; and
    ``spawn``, what the snapshotter calls, as a new process or forked by a fork server."""
    from lazyfs.fs.daemon import spawn
    from lazyfs.fs.forkserver import SOCKET_ENV, ForkServer

    image = f"oci:{lazy}"
    mnt = work / "mnt-ready"
    mnt.mkdir()
    cache = work / "cache-ready"
    cache.mkdir()
    args = ["--read-only", "--cache", str(cache)]
    with bl.lazyfs_mount(image, mnt, cache):
        pass  # the TOC is cached from here on
    server = ForkServer.start(work / "forks.sock", log=work / "forks.log")
    try:
        env_server = {**os.environ, SOCKET_ENV: str(server.socket)}
        env_none = {**os.environ, SOCKET_ENV: str(work / "no-server.sock")}

        def cli(env: dict[str, str]) -> Callable[[], None]:
            return lambda: _cli_mount(image, mnt, cache, env=env, usable=True)

        def spawned(forkserver: Path | None) -> Callable[[], None]:
            def once() -> None:
                d = spawn(image, mnt, args, timeout=60, cwd=bl.ROOT, forkserver=forkserver)
                _usable(mnt)
                _UNDO.append(d.stop)

            return once

        contenders: dict[str, Callable[[], object]] = {
            "python3 -c pass": lambda: subprocess.run([sys.executable, "-c", "pass"]),
            "python3 -c 'import trio, pyfuse3'": lambda: subprocess.run(
                [sys.executable, "-c", "import trio, pyfuse3"]
            ),
            "`lazyfs mount` (forks its daemon)": cli(env_none),
            "`lazyfs mount` with `lazyfs serve-forks` running": cli(env_server),
            "spawn(): a new process (the snapshotter before)": spawned(None),
            "spawn(forkserver=) (the snapshotter now)": spawned(server.socket),
        }
        runs: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(reps):
            for name, fn in contenders.items():
                runs[name].append(_med(fn, 1).median)
    finally:
        server.stop()
    return {k: bl.summarize(v) for k, v in runs.items()}


def _usable(mnt: Path) -> None:
    """Until a stat of the mount point is answered by the mount (not the directory under)."""
    if os.stat(mnt).st_dev == os.stat(mnt.parent).st_dev:
        raise RuntimeError(f"{mnt} is not mounted")


def _cli_mount(
    image: str,
    mnt: Path,
    cache: Path,
    *,
    env: dict[str, str] | None = None,
    usable: bool = False,
) -> None:
    """``lazyfs mount`` as a user runs it: timed until it returns (the mount is ready then;
    ``usable``: and a stat of it answered), then unmounted and its daemon stopped by PID
    (outside the time: see ``_med``)."""
    from lazyfs.fs.daemon import unmount_and_wait
    from lazyfs.process import stop_process

    argv = [sys.executable, "-m", "lazyfs.cli", "mount", image, str(mnt), "--read-only"]
    res = subprocess.run([*argv, "--cache", str(cache)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"lazyfs mount failed: {res.stderr}")
    if usable:
        _usable(mnt)
    pid = int(res.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))
    _UNDO.append(lambda: (unmount_and_wait(mnt), stop_process(pid, 10.0)))


_UNDO: list[Callable[[], object]] = []


def bench_rss(n: int, reps: int, work: Path) -> dict[str, bl.Summary]:
    lazy = bl.lazy_image(
        f"tree-{n}",
        lambda: [FileSpec(f"d{i // 100:04d}/f{i:06d}", i % 1024, seed=i) for i in range(n)],
    )
    rss, hwm, ready = [], [], []
    cache = work / "cache-rss"
    cache.mkdir()
    for _ in range(reps):
        with bl.lazyfs_mount(f"oci:{lazy}", work / "mnt", cache) as m:
            ready.append(m.ready_s)
            bl.walk_lstat(m.mountpoint)
            r = m.rss_kib()
            rss.append(r.get("VmRSS", 0) / 1024)
            hwm.append(r.get("VmHWM", 0) / 1024)
    return {
        "mount s (TOC cached after the first)": bl.summarize(ready),
        "RSS after walk MiB": bl.summarize(rss),
        "peak RSS MiB": bl.summarize(hwm),
    }


def trace_groups(ref: str, startup: Sequence[str], work: Path) -> Path:
    """Trace ``startup`` on a mount of ``ref``, rank it into groups and push them beside the
    image (as a user would); the groups document's path."""
    from lazyfs.testing.mounts import lazyfs_cmd

    trace, groups = work / "trace.json", work / "groups.json"
    for argv in (
        lazyfs_cmd("trace", "run", ref, "--group", "startup", "--out", str(trace),
                   "--plain-http", "--", *startup),
        lazyfs_cmd("optimize", str(trace), "--out", str(groups), "--push", ref, "--plain-http"),
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True)
    return groups


#: How a writer cuts files: (chunk size, head chunk size), framing.chunk_cuts.
Chunking = tuple[int, int]


def parse_chunking(text: str) -> Chunking:
    """``1m`` → 1 MiB chunks; ``256k+4m`` → a 256 KiB head, then 4 MiB chunks."""
    from lazyfs.cli.common import parse_size

    head, _, size = text.rpartition("+")
    return parse_size(size), parse_size(head) if head else 0


def chunking_name(c: Chunking) -> str:
    def size(n: int) -> str:
        return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n >> 10} KiB"

    return f"{size(c[1])} head + {size(c[0])}" if c[1] else size(c[0])


def chunked_image(src: Path, lazy: Path, tag: str, chunking: Chunking) -> Path:
    """``lazy`` (the default cut) or ``src`` converted with ``chunking``, cached beside
    ``lazy``'s directory."""
    from lazyfs_tools.convert import convert

    from lazyfs.formats.framing import DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_SIZE

    if chunking == (DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_SIZE):
        return lazy
    out = lazy.parent / f"{lazy.name}-chunks-{chunking[1]}-{chunking[0]}"
    if not (out / "index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        convert(f"oci:{src}:{tag}", f"oci:{out}:{tag}", chunk_size=chunking[0],
                head_size=chunking[1])  # fmt: skip
    return out


def cold_image(name: str, work: Path) -> tuple[Path, Path, str, tuple[str, ...], str]:
    """The cold rows' image: gzip layout, zstd:chunked layout, their tag, the start-up run
    chrooted in it and what it prints.  ``sample``: the demo's (this machine's python3);
    ``debian``: the WAN harness's Debian bookworm minbase + python3 and its start-up
    (scripts/benchwan/images.py builds it from the apt mirror, once, cached in .bench/images)."""
    from lazyfs_tools.convert import convert

    if name == "debian":
        from benchwan import images
        from benchwan.state import State

        img = images.build_all(["debian"], State())["debian"]
        if str(img.meta["source"]).startswith("FALLBACK"):
            raise SystemExit("the Debian image could not be built here (see the log)")
        startup = ("/usr/bin/python3", "-c", images.WORKLOAD)
        return img.layout("gzip"), img.layout("zstd"), images.TAG, startup, "1"
    src = build_sample_image(bl.BENCH_DIR / "data" / "sample")
    lazy = work / "cold-lazy"
    convert(f"oci:{src}:sample", f"oci:{lazy}:sample")
    return src, lazy, "sample", (PYTHON, "-c", WORKLOAD), "started"


def bench_cold(
    reps: int,
    work: Path,
    before: Path | None,
    image: str = "sample",
    keep: Sequence[str] = (),
    chunkings: Sequence[Chunking] = (),
    link: tuple[float, float] | None = None,
) -> tuple[dict[str, dict[str, bl.Summary]], int]:
    """Cold starts from a loopback registry: per contender, seconds, blob requests and bytes
    (counted at the proxy from the start until the start-up has printed), alternating
    contenders, each repetition with a fresh cache or directory.  ``before``: a checkout of
    an older lazyfs whose daemon runs the lazyfs contenders again, in the same run.  The
    lazyfs contenders start their daemon as the snapshotter does (``spawn``), forked by a
    fork server (``lazyfs serve-forks``) and, for groups, also as a new process.  ``keep``:
    only the contenders whose names contain one of these (and the full pull, the yardstick).
    ``chunkings``: every lazyfs contender once per way of cutting files (its name ends in
    ``[that cut]``), on an image converted so; none: the image as it is.  ``link``: (Mbit/s,
    ms) the proxy answers each request at, after that delay (a crude WAN: per request, not a
    shared link; scripts/benchwan emulates a real one)."""
    from unittest import mock

    import httpx
    from lazyfs_tools.convert import convert

    from lazyfs.fs import forkserver
    from lazyfs.fs.forkserver import ForkServer
    from lazyfs.ocilayout import Layout
    from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
    from lazyfs.testing.faultproxy import FaultProxy

    src, lazy, tag, startup, says = cold_image(image, work)

    def run_startup(root: Path) -> None:
        out = subprocess.run(["chroot", str(root), *startup], check=True, capture_output=True,
                             text=True)  # fmt: skip
        if says not in out.stdout:
            raise RuntimeError(f"the start-up did not start: {out.stdout} {out.stderr}")

    gz = Layout(src).manifest(tag).layers[0]
    cuts: dict[str, Chunking | None] = (
        {f" [{chunking_name(c)}]": c for c in chunkings} if chunkings else {"": None}
    )
    with contextlib.ExitStack() as stack:
        forks = stack.enter_context(ForkServer.start(work / "forks.sock", log=work / "forks.log"))
        # The before checkout's own fork server: its daemons forked as this tree's are.
        before_forks = None if before is None else stack.enter_context(
            ForkServer.start(work / "forks-before.sock", log=work / "forks-before.log", cwd=before))
        reg = stack.enter_context(RegistryInstance(work / "registry"))
        proxy = stack.enter_context(FaultProxy(reg.url))
        push_oci_layout(src, f"{reg.host}/cold/gzip:{tag}", tag=tag)
        for i, cut in enumerate(cuts.values()):
            mine = lazy if cut is None else chunked_image(src, lazy, tag, cut)
            for repo in ("lazy", "groups"):
                push_oci_layout(mine, f"{reg.host}/cold/{repo}{i}:{tag}", tag=tag)
            groups = trace_groups(f"{reg.host}/cold/groups{i}:{tag}", startup, work)
            # Re-laid out: the group first in the layer, up to a landmark a mount prefetches.
            relaid = work / f"cold-relaid{i}"
            more = {} if cut is None else {"chunk_size": cut[0], "head_size": cut[1]}
            convert(f"oci:{src}:{tag}", f"oci:{relaid}:{tag}", prefetch=str(groups), **more)
            push_oci_layout(relaid, f"{reg.host}/cold/relaid{i}:{tag}", tag=tag)

        def pull_extract(i: int) -> None:
            root = work / f"cold-root-{i}"
            root.mkdir()
            blob = work / f"cold-blob-{i}"
            url = f"{proxy.url}/v2/cold/gzip/blobs/{gz.digest}"
            with httpx.stream("GET", url) as resp, open(blob, "wb") as f:
                for piece in resp.iter_bytes():
                    f.write(piece)
            subprocess.run(["tar", "-xzf", str(blob), "-C", str(root)], check=True)
            run_startup(root)

        def lazyfs_start(
            repo: str, root: Path = bl.ROOT, *, forked: bool = True
        ) -> Callable[[int], None]:
            def once(i: int) -> None:
                from lazyfs.fs.daemon import spawn

                image = f"{proxy.host}/cold/{repo}:{tag}"
                cache = work / f"cold-cache-{repo}-{root.name}-{forked}-{i}"
                cache.mkdir()
                mnt = work / "mnt"
                mnt.mkdir(exist_ok=True)
                # ``python -m lazyfs.cli`` run in ``root`` imports that checkout's lazyfs.
                args = ["--read-only", "--plain-http", "--cache", str(cache)]
                server = forks if root == bl.ROOT else before_forks
                # The before checkout's fork server forks only for a client of its own code
                # (forkserver.origin): this process asks as that checkout would.
                mine = f"{sys.executable} {os.path.abspath(root / 'lazyfs')}"
                asks_as = (
                    mock.patch.object(forkserver, "origin", lambda: mine)
                    if server is before_forks
                    else contextlib.nullcontext()
                )
                with asks_as:
                    d = spawn(image, mnt, args, log=work / "mnt.log", timeout=120, cwd=root,
                              forkserver=server.socket if forked and server else None)
                ready_s.append(time.perf_counter() - t0)
                try:
                    run_startup(mnt)
                    # The start-up is done here; the daemon's stop (unmount, exit) is no
                    # part of it, as the full pull's time has none.
                    ended.append(time.perf_counter())
                    counts.append((len(proxy.served), proxy.blob_bytes))
                finally:
                    d.stop()

            return once

        contenders: dict[str, Callable[[int], None]] = {
            "full pull + extract + start-up": pull_extract,
        }
        for i, sfx in enumerate(cuts):
            contenders |= {
                f"lazyfs, no groups{sfx}": lazyfs_start(f"lazy{i}"),
                f"lazyfs + groups{sfx}": lazyfs_start(f"groups{i}"),
                f"lazyfs, re-laid out (landmark){sfx}": lazyfs_start(f"relaid{i}"),
                # as "before: lazyfs, re-laid out" starts its daemon
                f"lazyfs, re-laid out, daemon a new process{sfx}": lazyfs_start(
                    f"relaid{i}", forked=False
                ),
                f"lazyfs + groups, daemon a new process{sfx}": lazyfs_start(
                    f"groups{i}", forked=False
                ),
                # as the "before" contenders start theirs
                f"lazyfs, no groups, daemon a new process{sfx}": lazyfs_start(
                    f"lazy{i}", forked=False
                ),
            }
            if before is not None:
                for repo, name in (("lazy", "no groups"), ("groups", "+ groups")):
                    contenders[f"before: lazyfs {name}{sfx}"] = lazyfs_start(
                        f"{repo}{i}", before, forked=False
                    )
                    contenders[f"before: lazyfs {name}, forked{sfx}"] = lazyfs_start(
                        f"{repo}{i}", before
                    )
                contenders[f"before: lazyfs, re-laid out{sfx}"] = lazyfs_start(
                    f"relaid{i}", before, forked=False
                )
        if keep:
            contenders = {
                k: fn
                for k, fn in contenders.items()
                if k.startswith("full pull") or any(w in k for w in keep)
            }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        ready: dict[str, list[float]] = {k: [] for k in contenders}
        after: dict[str, list[float]] = {k: [] for k in contenders}  # the start-up once ready
        reqs: dict[str, list[float]] = {k: [] for k in contenders}
        mib: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(reps):
            for name, fn in contenders.items():
                proxy.reset()
                if link is not None:
                    proxy.rate, proxy.delay = link[0] * 1e6 / 8, link[1] / 1e3
                counts: list[tuple[int, int]] = []
                ready_s: list[float] = []
                ended: list[float] = []
                t0 = time.perf_counter()
                fn(i)
                times[name].append((ended[0] if ended else time.perf_counter()) - t0)
                ready[name].extend(ready_s)
                after[name].extend(times[name][-1] - r for r in ready_s)
                n, b = counts[0] if counts else (len(proxy.served), proxy.blob_bytes)
                reqs[name].append(n)
                mib[name].append(b / 2**20)
    entries = len(json.loads(groups.read_text())["groups"][0]["tiers"][0]["entries"])
    return {
        k: {
            "seconds": bl.summarize(times[k]),
            "requests": bl.summarize(reqs[k]),
            "MiB": bl.summarize(mib[k]),
            **({"mount ready": bl.summarize(ready[k])} if ready[k] else {}),
            **({"after ready": bl.summarize(after[k])} if after[k] else {}),
        }
        for k in contenders
    }, entries


def _row(name: str, s: bl.Summary, base: float | None, unit: str = "s") -> list[object]:
    if unit == "MiB":
        return [name, bl.fmt_range(s, "{:.0f}"), ""]
    return [
        name,
        f"{s.median:.3f} ({s.min:.3f}–{s.max:.3f})",
        bl.ratio(s.median, base) if base else "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--files", type=int, default=6000, help="synthetic files added to the sample")
    p.add_argument("--rss-files", type=int, default=100_000)
    p.add_argument(
        "--only", choices=("walk", "python", "mount", "ready", "rss", "cold"), action="append"
    )
    p.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="walk, python, cold: also run the lazyfs of this checkout (e.g. a worktree of main)",
    )
    p.add_argument(
        "--image",
        choices=("sample", "debian"),
        default="sample",
        help="cold: the demo's sample, or the WAN harness's Debian image (built once from the "
        "apt mirror by scripts/benchwan/images.py)",
    )
    p.add_argument(
        "--contenders",
        action="append",
        metavar="WORDS",
        help="cold: only the contenders whose names contain WORDS (repeatable), and the full pull",
    )
    p.add_argument(
        "--chunking",
        nargs="+",
        type=parse_chunking,
        metavar="SIZE|HEAD+SIZE",
        help="cold: the lazyfs contenders once per way of cutting files into chunks (e.g. 4m "
        "1m 256k+4m: a 256 KiB head, then 4 MiB chunks), on images converted so (cached)",
    )
    p.add_argument(
        "--link",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        metavar="MBIT,MS",
        help="cold: every blob request answered at MBIT Mbit/s after MS ms (per request)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="where the run's files live (caches, mounts), default .bench; file creation under "
        "the repository costs 0.7-1 ms a file on some machines (BENCHMARKS.md, H42)",
    )
    p.add_argument("--label", default="", help="a word for the section title (before/after)")
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args()
    only = set(args.only or ("walk", "python", "mount", "ready", "rss", "cold"))
    bl.sigterm_as_interrupt()
    bl.byte_compiled()
    machine = bl.machine_info()
    load0 = os.getloadavg()[0]
    # fresh every run: see the docstring
    work = (args.work_dir or bl.BENCH_DIR) / f"work-speed-{os.getpid()}"
    work.mkdir(parents=True)
    lazy = _sample_with_tree(args.files)
    native = bl.extract_tar(lazy.parent / "layer.tar", lazy.parent / "rootfs")
    entries = sum(1 + len(d) + len(f) for _, d, f in os.walk(native)) - 0
    bodies = []
    result: dict[str, Any] = {"machine": machine, "command": bl.command_line()}
    try:
        if "walk" in only:
            bl.log("walk")
            s = bench_tree(lazy, native, args.reps, work, "walk", args.before)
            result["walk"] = {k: v.as_dict() for k, v in s.items()}
            base = s["native disk"].median
            rows = [_row(k, v, base) for k, v in s.items()]
            rows.append(
                [
                    "lazyfs vs fuse-overlayfs",
                    "",
                    bl.ratio(s["lazyfs"].median, s["fuse-overlayfs"].median),
                ]
            )
            bodies.append(
                f"### `find` + `du -s`, warm, {entries:,} entries ({args.reps} runs)\n\n"
                + bl.md_table(["tree", "seconds", "vs native"], rows)
            )
        if "python" in only:
            bl.log("python")
            s = bench_tree(lazy, native, args.reps, work, "python", args.before)
            result["python"] = {k: v.as_dict() for k, v in s.items()}
            base = s["native disk"].median
            bodies.append(
                f"### `chroot ROOT python3 -c '{IMPORTS}'`, warm ({args.reps} runs)\n\n"
                + bl.md_table(
                    ["tree", "seconds", "vs native"], [_row(k, v, base) for k, v in s.items()]
                )
            )
        if "mount" in only:
            bl.log("mount")
            s = bench_mount(lazy, args.reps, work)
            result["mount"] = {k: v.as_dict() for k, v in s.items()}
            base = s["python3 -c pass"].median
            bodies.append(
                f"### `lazyfs mount` until ready, {entries:,} entries ({args.reps} runs)"
                "\n\n"
                + bl.md_table(
                    ["what", "seconds", "vs python3 -c pass"],
                    [_row(k, v, base) for k, v in s.items()],
                )
            )
        if "ready" in only:
            bl.log("ready")
            s = bench_ready(lazy, args.reps, work)
            result["ready"] = {k: v.as_dict() for k, v in s.items()}
            base = s["python3 -c pass"].median
            bodies.append(
                f"### Process start → mount point usable, TOC cached, {entries:,} entries "
                f"({args.reps} runs, contenders alternating)\n\n"
                + bl.md_table(
                    ["what", "seconds", "vs python3 -c pass"],
                    [_row(k, v, base) for k, v in s.items()],
                )
            )
        if "rss" in only:
            bl.log("rss")
            s = bench_rss(args.rss_files, max(2, args.reps // 2), work)
            result["rss"] = {k: v.as_dict() for k, v in s.items()}
            bodies.append(
                f"### Daemon at {args.rss_files:,} files (after an lstat walk)\n\n"
                + bl.md_table(
                    ["what", "value", ""],
                    [_row(k, v, None, "MiB" if "MiB" in k else "s") for k, v in s.items()],
                )
            )
        if "cold" in only:
            bl.log("cold")
            cold, n_group = bench_cold(
                args.reps, work, args.before, args.image, args.contenders or (),
                args.chunking or (),
                args.link,
            )
            result["cold"] = {k: {m: v.as_dict() for m, v in d.items()} for k, d in cold.items()}
            base = cold["full pull + extract + start-up"]["seconds"].median
            rows = [
                [
                    k,
                    f"{d['seconds'].median:.3f} ({d['seconds'].min:.3f}–{d['seconds'].max:.3f})",
                    bl.ratio(d["seconds"].median, base),
                    f"{d['requests'].median:.0f} ({d['requests'].min:.0f}–{d['requests'].max:.0f})",
                    f"{d['MiB'].median:.1f}",
                    f"{d['mount ready'].median:.3f} ({d['mount ready'].min:.3f}–"
                    f"{d['mount ready'].max:.3f})" if "mount ready" in d else "",
                    f"{d['after ready'].median:.3f} ({d['after ready'].min:.3f}–"
                    f"{d['after ready'].max:.3f})" if "after ready" in d else "",
                ]
                for k, d in cold.items()
            ]
            bodies.append(
                f"### Cold start from a loopback registry, {args.image} image ({args.reps} "
                f"runs; groups: {n_group} files traced from the start-up)\n\n"
                + bl.md_table(
                    [
                        "contender",
                        "seconds",
                        "vs full pull",
                        "blob requests",
                        "MiB",
                        "mount ready",
                        "start-up once ready",
                    ],
                    rows,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()[0]
    body = "\n\n".join(bodies) + (
        f"\n\n1-min load average {load0:.1f} at start, {load1:.1f} at end (2 CPUs, shared).\n"
    )
    print(body)
    bl.write_json("speed", result)
    if not args.no_markdown:
        title = "Issue 13 rows" + (f" ({args.label})" if args.label else "")
        bl.append_markdown(title, machine, bl.command_line(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
