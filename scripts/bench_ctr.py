"""Through containerd and ``ctr``: full pull + run with containerd's overlayfs snapshotter vs
the lazyfs snapshotter (cold, and with prefetch groups stored in the registry), memory per
running container, and the snapshotter's restart time under N running containers.  Root.

    .venv/bin/python scripts/bench_ctr.py [--image debian|sample]
                                          [--profile loopback|lan|wan|edge] [--reps N]
                                          [--counts 1,5,10] [--restarts N] [--no-markdown]

``--image debian`` (default): the WAN harness's Debian bookworm minbase + python3 image
(scripts/benchwan/images.py: debootstrap from the machine's apt mirror, gzip and lazyfs
zstd:chunked layouts, cached in ``.bench/images/``); if debootstrap cannot work here the
harness falls back to the sample, and so does this (the report says which).  ``--image
sample``: the demo's sample (this machine's python3 and standard library, one layer).  Either
way the start-up is the demo's: ``python3 -c 'import json, email.parser, …; print("started")'``
(the harness's imports).
``loopback``: Debian's docker-registry on 127.0.0.1 behind a counting proxy (lazyfs.testing's
FaultProxy, which also sits in every contender's path); the other profiles: the WAN harness's
registry in a network namespace behind a shaped veth and the delaying relay (scripts/bench.sh),
bytes counted on the veth.  Every repetition of every contender gets a fresh containerd and
snapshotter (own root, state, sockets, cache), contenders alternate; medians are reported.
Everything started is stopped by PID, also on failure or Ctrl-C.  ``CtrStack`` is also what
scripts/demo.py runs its containerd part with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BENCH_DIR,
    ROOT,
    byte_compiled,
    command_line,
    log,
    machine_info,
    sigterm_as_interrupt,
)
from benchwan.state import unmount_all_under
from lazyfs_snapshotter.testing import SnapshotterProcess

from lazyfs.fs.daemon import Daemon
from lazyfs.testing.containerd import ContainerdInstance
from lazyfs.testing.sample import PYTHON, WORKLOAD

SN = "lazyfs"
STARTUP = (PYTHON, "-c", WORKLOAD)
# A container that does the start-up, says so in a file the host can see through
# /proc/PID/root, then stays: what the memory and restart measurements run N of.
RESIDENT = (
    PYTHON, "-c",
    WORKLOAD.replace("print('started')", "open('/tmp/ready', 'w').close(); import time; "
                     "time.sleep(3600)"),
)  # fmt: skip
# After a restart: modules the start-up never imported, so their bytes come from the network.
LATE_READ = (PYTHON, "-c", "import pydoc, ftplib, tarfile, smtplib; print('late ok')")


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class CtrStack(contextlib.AbstractContextManager["CtrStack"]):
    """A private containerd with the lazyfs snapshotter as a proxy plugin, both under *base*
    (keep it short: unix socket paths).  *registry_host* is plain HTTP to both.  On exit:
    containers removed, containerd and the snapshotter stopped, then every chain daemon the
    snapshotter recorded stopped by its PID, and anything still mounted under *base* unmounted.
    """

    def __init__(self, base: Path, registry_host: str, *, fork_server: bool = True) -> None:
        self.base = base
        self.registry_host = registry_host
        self.fork_server = fork_server
        self.names: list[str] = []
        self._stack = ExitStack()

    def __enter__(self) -> CtrStack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self.base / "snapshotter.toml"
        conf.write_text(f'[registry]\nplain_http = ["{self.registry_host}"]\n'
                        f"[daemons]\nfork_server = {str(self.fork_server).lower()}\n")
        self.sp = SnapshotterProcess(self.base / "sn", args=("--config", str(conf)))
        self._stack.callback(unmount_all_under, self.base)
        self._stack.callback(self.stop_daemons)
        self._stack.callback(self.sp.stop)
        self.sp.start()
        self.ctrd = self._stack.enter_context(
            ContainerdInstance(
                self.base / "ctrd",
                # In a namespace of its own (its runc state and cgroups removed at its stop).
                proxy_snapshotters={SN: self.sp.address},
            )
        )
        self._stack.callback(self.remove_containers)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # -- ctr ---------------------------------------------------------------------------------
    def ctr(self, *args: str, binary: str = "ctr", timeout: float = 600) -> str:
        return self.ctrd.ctr(*args, binary=binary, capture=True, timeout=timeout).stdout

    def pull_overlayfs(self, ref: str) -> None:
        """containerd's own pull and unpack, with its default (overlayfs) snapshotter."""
        self.ctr("images", "pull", "--plain-http", ref)

    def rpull(self, ref: str) -> None:
        """The lazy path (README, containerd snapshotter): ctr-remote sends the labels."""
        self.ctr("images", "rpull", "--plain-http", "--snapshotter", SN, ref, binary="ctr-remote")

    def run(self, ref: str, name: str, *cmd: str, snapshotter: str = SN) -> str:
        """``ctr run --rm``: returns the container's stdout once it has exited."""
        self.names.append(name)
        return self.ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, *cmd)

    def run_detached(self, ref: str, name: str, *cmd: str, snapshotter: str = SN) -> None:
        self.names.append(name)
        self.ctr("run", "-d", "--snapshotter", snapshotter, ref, name, *cmd)

    def task_pid(self, name: str) -> int:
        for line in self.ctr("task", "ls").splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == name:
                return int(parts[1])
        raise RuntimeError(f"no task {name}")

    def running(self) -> list[str]:
        return [
            line.split()[0]
            for line in self.ctr("task", "ls").splitlines()[1:]
            if line.split()[2:3] == ["RUNNING"]
        ]

    def remove_containers(self) -> None:
        for name in self.names:
            # -f kills a running task first; a name already gone (run --rm) just fails.
            self.ctrd.ctr("task", "rm", "-f", name, check=False, capture=True)
            self.ctrd.ctr("containers", "rm", name, check=False, capture=True)
        self.names.clear()

    # -- the snapshotter's chain daemons -----------------------------------------------------
    def daemons(self) -> list[tuple[int, str]]:
        """(pid, mountpoint) of every live chain daemon the snapshotter recorded."""
        db = self.sp.root / "metadata.db"
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT pid, mountpoint FROM daemons WHERE pid != 0").fetchall()
        return [(int(pid), str(mnt)) for pid, mnt in rows]

    def fetched(self) -> int:
        """Bytes the chain daemons fetched (their stats, summed over layers)."""
        total = 0
        for pid, mnt in self.daemons():
            stats = Daemon(pid, mnt).stats()
            total += sum(layer["stats"]["bytes_fetched"] for layer in stats["layers"])
        return total

    def stop_daemons(self) -> None:
        for pid, mnt in self.daemons():
            Daemon(pid, mnt).stop()

    def restart_snapshotter(self) -> tuple[float, float]:
        """``kill -9`` the snapshotter and start it again: (seconds until it listens,
        seconds until containerd's calls reach it again)."""
        t0 = time.perf_counter()
        self.sp.kill()
        self.sp.start()
        listening = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while True:
            # Prepare always reaches the snapshotter; ls may be answered by containerd alone.
            res = self.ctrd.ctr("snapshots", "--snapshotter", SN, "prepare", "probe",
                                check=False, capture=True)  # fmt: skip
            if res.returncode == 0:
                break
            if time.monotonic() > deadline or "unavailable" not in res.stderr:
                raise RuntimeError(f"containerd did not reconnect: {res.stderr.strip()}")
            time.sleep(0.02)
        reconnected = time.perf_counter() - t0
        self.ctr("snapshots", "--snapshotter", SN, "rm", "probe")
        return listening, reconnected


def started(out: str) -> None:
    if "started" not in out:
        raise RuntimeError(f"the start-up did not print 'started': {out!r}")


# -- the registry, on loopback or behind the WAN harness's link -----------------------------
@dataclass
class Wire:
    host: str  # what every measured client uses
    push_host: str  # unshaped, for set-up
    count: Callable[[], int]  # bytes over the wire so far
    describe: str
    # After set-up: shape the link and start the relay (profiles other than loopback).
    start_link: Callable[[], None] = lambda: None


@contextlib.contextmanager
def wire(profile_name: str, work: Path) -> Iterator[Wire]:
    if profile_name == "loopback":
        from lazyfs.testing.dockerregistry import RegistryInstance
        from lazyfs.testing.faultproxy import FaultProxy

        with RegistryInstance(work / "registry") as reg, FaultProxy(reg.url) as proxy:
            yield Wire(
                proxy.host,
                reg.host,
                lambda: proxy.blob_bytes,
                "docker-registry on 127.0.0.1 behind a counting HTTP proxy (blob bytes)",
            )
        return
    from benchwan import netns, registry
    from benchwan.state import State, run_lock, teardown

    profile = netns.PROFILES[profile_name]
    with run_lock():
        state = State()
        services = registry.NsServices(state, work)
        try:
            netns.create(state)
            services.start_registry()

            def start_link() -> None:
                netns.shape(profile)
                services.start_relay(profile.rtt_ms)

            yield Wire(
                services.host,
                services.registry_host,
                netns.veth_bytes,
                f"the WAN harness's link: tbf {profile.rate_mbit} Mbit/s both ways, relay RTT "
                f"{profile.rtt_ms} ms (scripts/benchwan); bytes = rx+tx on the host veth",
                start_link,
            )
        finally:
            services.stop()
            teardown(state)


# -- images -----------------------------------------------------------------------------------
@dataclass
class Images:
    gzip: str  # the image as built (gzip layer)
    lazy: str  # zstd:chunked, no stored groups
    groups: str  # the same zstd:chunked image in another repository, with stored groups
    layer_bytes: dict[str, int]


@dataclass
class Source:
    """The image's OCI layouts on disk: gzip and zstd:chunked, both tagged *tag*."""

    name: str  # "debian" or "sample"
    gzip: Path
    zstd: Path
    tag: str
    describe: str


SAMPLE_DESCRIBE = "the demo's sample (this machine's python3 and its standard library)"


def image_source(name: str, work: Path) -> Source:
    """Build (or take from the cache) the image's layouts: the WAN harness's builder for
    ``debian``, the demo's for ``sample``; a Debian build that fell back is the sample."""
    if name == "debian":
        from benchwan import images
        from benchwan.state import State

        img = images.build_all(["debian"], State())["debian"]
        if not str(img.meta["source"]).startswith("FALLBACK"):
            return Source(
                "debian",
                img.layout("gzip"),
                img.layout("zstd"),
                images.TAG,
                f"the WAN harness's Debian, {img.meta['source']}",
            )
        log("the Debian image could not be built here: using the demo's sample")
    from lazyfs_tools.convert import convert

    from lazyfs.testing.sample import build_sample_image

    cache = ROOT / ".demo"
    cache.mkdir(exist_ok=True)
    src = build_sample_image(cache / "sample")
    lazy = work / "sample-lazy"
    convert(f"oci:{src}:sample", f"oci:{lazy}:sample")
    return Source("sample", src, lazy, "sample", SAMPLE_DESCRIBE)


def prepare_images(
    w: Wire, work: Path, log_fn: Callable[[str], None], source: Source | None = None
) -> Images:
    from lazyfs.ocilayout import Layout
    from lazyfs.testing.dockerregistry import push_oci_layout
    from lazyfs.testing.mounts import lazyfs_cmd, run

    src_img = source or image_source("sample", work)
    src, lazy, tag = src_img.gzip, src_img.zstd, src_img.tag
    for layout, repo in ((src, "gzip"), (lazy, "lazy"), (lazy, "groups")):
        push_oci_layout(layout, f"{w.push_host}/bench/{repo}:{src_img.name}", tag=tag)
    # Groups: one traced cold start in a chroot on a lazy mount, optimized and stored in the
    # registry as an artifact referring to the image (what a plain mount and the snapshotter
    # look for).  Untimed set-up, on the unshaped registry.
    trace, groups = work / "trace.json", work / "groups.json"
    ref = f"{w.push_host}/bench/groups:{src_img.name}"
    for argv in (
        lazyfs_cmd("trace", "run", ref, "--group", "startup", "--out", str(trace),
                   "--plain-http", "--", *STARTUP),
        lazyfs_cmd("optimize", str(trace), "--out", str(groups), "--push", ref, "--plain-http"),
    ):  # fmt: skip
        res = run(*argv)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: {res.stderr.strip()}")
    doc = json.loads(groups.read_text())
    entries = sum(len(t["entries"]) for t in doc["groups"][0]["tiers"])
    log_fn(f"prefetch groups: {entries} entries from one traced start-up, pushed to {ref}")
    sizes = {
        "gzip": sum(x.size for x in Layout(src).manifest(tag).layers),
        "zstd:chunked": sum(x.size for x in Layout(lazy).manifest(tag).layers),
    }
    return Images(
        f"{w.host}/bench/gzip:{src_img.name}",
        f"{w.host}/bench/lazy:{src_img.name}",
        f"{w.host}/bench/groups:{src_img.name}",
        sizes,
    )


# -- the measurements -------------------------------------------------------------------------
@dataclass
class Sample:
    pull: float
    run: float
    bytes: int
    pull_bytes: int
    mount: float = 0.0  # the chain daemon's spawn → ready, from the snapshotter's log


def daemon_ready_s(log_text: str) -> float:
    """Seconds the snapshotter took to get its chain daemon ready ("daemon pid N mounted …
    in S s"): the part of ``ctr run`` a mount's start-up costs."""
    found = re.findall(r"daemon pid \d+ mounted .* in ([0-9.]+)s", log_text)
    return max((float(x) for x in found), default=0.0)


def pull_and_run(st: CtrStack, ref: str, snapshotter: str, count: Callable[[], int]) -> Sample:
    """One cold start through *st*: the pull (containerd's own for overlayfs, ``rpull`` for
    lazyfs), then ``ctr run --rm`` of the start-up; times and bytes over the wire."""
    b0 = count()
    t0 = time.perf_counter()
    if snapshotter == SN:
        st.rpull(ref)
    else:
        st.pull_overlayfs(ref)
    t1 = time.perf_counter()
    pull_bytes = count() - b0
    started(st.run(ref, "c", *STARTUP, snapshotter=snapshotter))
    t2 = time.perf_counter()
    mount = daemon_ready_s(st.sp.log_text()) if snapshotter == SN else 0.0
    return Sample(t1 - t0, t2 - t1, count() - b0, pull_bytes, mount)


def contender(label: str, images: Images, w: Wire) -> Callable[[Path], Sample]:
    ref, snapshotter = {
        "overlayfs": (images.gzip, "overlayfs"),
        "lazyfs cold": (images.lazy, SN),
        "lazyfs + groups": (images.groups, SN),
        NO_FORKS: (images.groups, SN),
    }[label]

    def once(base: Path) -> Sample:
        with CtrStack(base, w.host, fork_server=label != NO_FORKS) as st:
            return pull_and_run(st, ref, snapshotter, w.count)

    return once


# The same, with each chain daemon started as a new interpreter (before the fork server).
NO_FORKS = "lazyfs + groups, no fork server"
CONTENDERS = ("overlayfs", "lazyfs cold", "lazyfs + groups", NO_FORKS)


def startup(images: Images, w: Wire, reps: int, tmp: Path) -> dict[str, list[Sample]]:
    runs = {c: contender(c, images, w) for c in CONTENDERS}
    out: dict[str, list[Sample]] = {c: [] for c in CONTENDERS}
    for rep in range(reps):
        order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
        for c in order:
            s = runs[c](Path(tempfile.mkdtemp(prefix="lzc-", dir=tmp)))
            log(f"rep {rep + 1}/{reps} {c}: pull {s.pull:.2f}s run {s.run:.2f}s "
                f"{s.bytes / 2**20:.1f} MiB")  # fmt: skip
            out[c].append(s)
    return out


def wait_ready(st: CtrStack, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, OSError):
            if os.path.exists(f"/proc/{st.task_pid(name)}/root/tmp/ready"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"container {name} did not finish its start-up in {timeout}s")


def memory_and_restarts(
    images: Images, w: Wire, counts: list[int], restarts: int, tmp: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """N resident containers of the lazy image: RSS of the chain daemon(s), the snapshotter
    and one container's own process; then kill -9 + restart of the snapshotter under the
    largest N, each time checking every container still runs and reads new files."""
    mem: list[dict[str, Any]] = []
    rst: list[dict[str, Any]] = []
    with CtrStack(Path(tempfile.mkdtemp(prefix="lzm-", dir=tmp)), w.host) as st:
        st.rpull(images.lazy)
        n_run = 0
        for n in counts:
            while n_run < n:
                st.run_detached(images.lazy, f"m{n_run}", *RESIDENT)
                n_run += 1
            for i in range(n):
                wait_ready(st, f"m{i}")
            daemons = st.daemons()
            assert st.sp.proc is not None
            mem.append({
                "containers": n,
                "daemons": len(daemons),
                "daemon_rss_kib": sum(rss_kib(pid) for pid, _ in daemons),
                "snapshotter_rss_kib": rss_kib(st.sp.proc.pid),
                "container_rss_kib": rss_kib(st.task_pid("m0")),
            })  # fmt: skip
            log(f"memory at {n}: {mem[-1]}")
        n = counts[-1]
        for r in range(restarts):
            listening, reconnected = st.restart_snapshotter()
            alive = st.running()
            late = st.ctr("task", "exec", "--exec-id", f"late{r}", "m0", *LATE_READ)
            ok = len(alive) == n and "late ok" in late
            rst.append({"containers": n, "listening_s": listening,
                        "reconnected_s": reconnected, "all_running_and_reading": ok})  # fmt: skip
            log(f"restart {r + 1}/{restarts}: {rst[-1]}")
    return mem, rst


# -- report -------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"## containerd: `ctr` pull + run, lazyfs snapshotter vs overlayfs — {res['profile']}",
        "",
        f"`{res['command']}` ({res['machine']['date']}, {res['machine']['nproc']} CPUs, "
        f"commit {res['machine']['commit']}, load average at start "
        f"{res['machine']['loadavg_start']}, {res['seconds_total']:.0f} s in all).  "
        f"Registry: {res['wire']}.  Image: {res.get('image', SAMPLE_DESCRIBE)}; one layer: gzip "
        f"{res['layer_bytes']['gzip'] / 2**20:.1f} MiB, "
        f"zstd:chunked {res['layer_bytes']['zstd:chunked'] / 2**20:.1f} MiB; start-up "
        "`python3 -c 'import json, email.parser, http.client, sqlite3, decimal, asyncio, "
        "xml.etree.ElementTree, argparse, logging, unittest, csv, zipfile'`.  Each repetition: "
        "a fresh containerd + snapshotter (own root, state, sockets, cache), untimed; timed "
        "from the pull command to the `ctr run --rm` exiting after printing.  Medians of "
        f"{res['reps']} alternating repetitions.",
        "",
        "| contender | pull | `ctr run` | time to started (min-max, ratio) | bytes over the wire "
        "| of `ctr run`: chain daemon spawn → ready |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = med([s["pull"] + s["run"] for s in res["startup"]["overlayfs"]])
    for c, samples in res["startup"].items():
        pull = med([s["pull"] for s in samples])
        run_s = med([s["run"] for s in samples])
        totals = [s["pull"] + s["run"] for s in samples]
        total = med(totals)
        mib = med([s["bytes"] for s in samples]) / 2**20
        cmd = ("`ctr images pull` (overlayfs)" if c == "overlayfs"
               else f"`ctr-remote images rpull --snapshotter lazyfs` ({c})")  # fmt: skip
        spread = f"{min(totals):.2f}-{max(totals):.2f}"
        mounts = [s.get("mount", 0.0) for s in samples]
        ready = f"{med(mounts):.2f} s ({min(mounts):.2f}-{max(mounts):.2f})" if any(mounts) else ""
        lines.append(f"| {cmd} | {pull:.2f} s | {run_s:.2f} s | {total:.2f} s ({spread}, "
                     f"{total / base:.2f}x) | {mib:.1f} MiB | {ready} |")  # fmt: skip
    lines += [
        "",
        "lazyfs + groups: the image's repository holds a `lazyfs.prefetch-groups` artifact "
        "(one traced start-up, `lazyfs trace run` + `lazyfs optimize --push`); the chain "
        "daemon prefetches it in the background once mounted, so on a fast link it mostly "
        "races the start-up's own reads.",
    ]
    if res["memory"]:
        lines += [
            "",
            "Memory, N containers of the lazy image each running the start-up and then "
            "sleeping (`ctr run -d --snapshotter lazyfs`), RSS from /proc:",
            "",
            "| containers | FUSE daemons | daemon RSS | snapshotter RSS "
            "| one container's python3 |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in res["memory"]:
            lines.append(
                f"| {m['containers']} | {m['daemons']} | {m['daemon_rss_kib'] / 1024:.1f} MiB "
                f"| {m['snapshotter_rss_kib'] / 1024:.1f} MiB "
                f"| {m['container_rss_kib'] / 1024:.1f} MiB |"
            )
        first, last = res["memory"][0], res["memory"][-1]
        if last["containers"] > first["containers"]:
            per = (
                (last["daemon_rss_kib"] - first["daemon_rss_kib"])
                / (last["containers"] - first["containers"])
                / 1024
            )
            lines += [
                "",
                f"≈ {per:.2f} MiB of daemon RSS per extra container; each container's own "
                "storage is a kernel overlay (its upperdir on disk, no process), as with "
                "containerd's overlayfs snapshotter.",
            ]
    if res["restarts"]:
        rs = res["restarts"]
        ok = all(r["all_running_and_reading"] for r in rs)
        lines += [
            "",
            f"Snapshotter restart with {rs[0]['containers']} running containers (`kill -9`, "
            f"start again; {len(rs)} times): listening after "
            f"{med([r['listening_s'] for r in rs]):.2f} s, containerd's calls reach it after "
            f"{med([r['reconnected_s'] for r in rs]):.2f} s (medians; containerd's client "
            "reconnects with back-off). "
            + ("Every time, all containers were still running and one of them imported "
               "modules it had never read (`pydoc, ftplib, tarfile, smtplib`)."
               if ok else "NOT every container survived: see the JSON."),
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchwan.netns import PROFILES

    ap = argparse.ArgumentParser(prog="scripts/bench_ctr.py", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--image",
        choices=["debian", "sample"],
        default="debian",
        help="debian (the WAN harness's; the sample if it cannot be built here)",
    )
    ap.add_argument("--profile", choices=["loopback", *sorted(PROFILES)], default="loopback")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--counts", default="1,5,10", help="containers for memory (and restarts)")
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    counts = sorted({int(n) for n in args.counts.split(",") if n})
    sigterm_as_interrupt()
    byte_compiled()
    t_start = time.monotonic()
    res: dict[str, Any] = {
        "command": command_line() if argv is None else shlex.join(argv),
        "machine": machine_info(),
        "profile": args.profile,
        "reps": args.reps,
    }
    with tempfile.TemporaryDirectory(prefix="lzb-") as tmp_s:
        tmp = Path(tmp_s)
        # Built before the link exists, as scripts/bench.py does (debootstrap is minutes, once).
        source = image_source(args.image, tmp)
        res["image_name"], res["image"] = source.name, source.describe
        with wire(args.profile, tmp) as w:
            imgs = prepare_images(w, tmp, log, source)
            w.start_link()
            res["wire"] = w.describe
            res["layer_bytes"] = imgs.layer_bytes
            samples = startup(imgs, w, args.reps, tmp)
            res["startup"] = {c: [vars(s) for s in ss] for c, ss in samples.items()}
            mem, rst = (memory_and_restarts(imgs, w, counts, args.restarts, tmp)
                        if counts else ([], []))  # fmt: skip
            res["memory"], res["restarts"] = mem, rst
    res["seconds_total"] = time.monotonic() - t_start
    out_dir = BENCH_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"ctr-{res['image_name']}-{args.profile}-{stamp}.json"
    path.write_text(json.dumps(res, indent=1))
    log(f"results: {path}")
    md = markdown(res)
    print(md)
    if not args.no_markdown:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
