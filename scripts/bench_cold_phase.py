# ruff: noqa: RUF001, RUF003  (×, – and µ in Markdown output are intended)
"""Where a cold start's time after readiness goes (issue 13's cold rows): the start-up chrooted
in a fresh mount of the Debian image with groups stored beside it (``--no-groups``: none), from
Debian's docker-registry on 127.0.0.1, in four settings, alternating, medians:

- ``cold``: a fresh chunk cache (as bench_speed.py's "lazyfs + groups");
- ``cache warm``: a fresh mount over the cache the cold run filled: the kernel knows nothing,
  the chunks are on disk (the FUSE path's own cost, no network);
- ``native``: the extracted tree after ``echo 2 > /proc/sys/vm/drop_caches`` (dentries and
  inodes cold, file pages warm, as the warm chunk cache's are): the floor;
- ``fuse-overlayfs, fresh mount``: a kernel-backed C FUSE filesystem freshly mounted over that
  tree just after the native run (the kernel knows nothing of the mount, the lower tree's
  dentries and pages are warm): what any FUSE filesystem pays for this start-up, against which
  lazyfs's "cache warm" is its own FUSE path's cost.

For each: the start-up's seconds from ready to done, and what it asked the daemon by opcode
(count, summed latency, from the kernel's fuse tracepoints, see bench_startup_requests.py),
plus the start-up's own CPU time and page faults (its rusage), the time at least one request
was outstanding, the daemon's CPU over the start-up (its threads' schedstat), its event loop's
thread's own CPU and the time that thread was runnable but waited for a CPU (its schedstat: on
a shared 2-CPU machine a cold start-up's loop waited 80-190 ms so, a warm one's 15-40;
BENCHMARKS.md, issue 13, H91) and how many requests the C reader answered through the fast path.
``--pyspy DIR``: also one more round of each lazyfs setting with py-spy recording the daemon
(speedscope files in DIR).  Run from the
repo root: ``.venv/bin/python scripts/bench_cold_phase.py [--reps N] [--before DIR]
[--work-dir DIR] [--chunking SIZE|HEAD+SIZE]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bench_speed as bs
import benchlib as bl
from bench_startup_requests import connection, fuse_events, fuse_requests

OVERLAY = "fuse-overlayfs, fresh mount"
WAITED = 0.005  # a READ this slow waited for something (a fetch, a queue), not only its copy


class Phase:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.count: collections.Counter[str] = collections.Counter()
        self.latency: collections.Counter[str] = collections.Counter()  # seconds, summed
        self.reply_bytes: collections.Counter[str] = collections.Counter()
        self.busy = 0.0  # seconds with at least one request outstanding
        self.cpu = 0.0  # the daemon's CPU seconds (all threads) over the start-up
        # Its main thread's (the event loop's): seconds on a CPU, and seconds it could have
        # run but waited for one (the scheduler's run queue), over the start-up.
        self.loop_cpu = 0.0
        self.loop_queued = 0.0
        self.fast: int | None = None  # requests the C reader answered through the fast path
        self.reads: list[float] = []  # each READ's latency, seconds
        self.timeline: list[tuple[float, float, str, int]] = []  # sent, latency, op, reply
        self.program_cpu = 0.0  # the start-up's own CPU seconds (user + system)
        self.faults = 0  # its page faults (minor: each a page mapped, from the page cache)


def _cpu(pid: int) -> float:
    """A process's CPU seconds so far, summed over its threads now alive (schedstat: ns, not
    the 10 ms ticks of /proc/PID/stat; trio's worker threads live on for seconds idle)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def thread_sched(pid: int, tid: int | None = None) -> tuple[float, float]:
    """Seconds thread ``tid`` of process ``pid`` (its main thread by default) has run on a CPU,
    and seconds it was runnable but waited for one: the first two fields of its schedstat."""
    fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def _events(inst: Path, conn: int, phase: Phase) -> None:
    spans: list[tuple[float, float]] = []
    for r in fuse_requests((inst / "trace").read_text(), conn):
        phase.count[r.op] += 1
        if r.took is None:
            continue
        phase.latency[r.op] += r.took
        phase.reply_bytes[r.op] += r.reply_bytes
        if r.op == "READ":
            phase.reads.append(r.took)
        phase.timeline.append((r.sent, r.took, r.op, r.reply_bytes))
        spans.append((r.sent, r.sent + r.took))
    end = -1.0
    for a, b in sorted(spans):
        if b > end:
            phase.busy += b - max(a, end)
            end = b


def big_reads(
    lazies: dict[str, Path], tag: str, native: Path, work: Path, reps: int
) -> list[list[object]]:
    """The image's three largest files read whole (128 KiB reads) on a fresh mount over a
    warm chunk cache, the mount's read-ahead set to the kernel's 128 KiB default or to
    lazyfs's READ_AHEAD_KB (written to its bdi after the mount, alternating): what the wider
    window does where it should, sequential reads; and at READ_AHEAD_KB over a fresh cache
    (fetched from the local layout: the chunks' fetch, decode and write).  ``lazies``: the
    image's layouts by label (e.g. cut into chunks differently), alternating too."""
    from lazyfs.fs.daemon import spawn
    from lazyfs.fs.serve import READ_AHEAD_KB
    from lazyfs.testing.mounts import mount_stats

    files = sorted(
        (p for p in native.rglob("*") if p.is_file() and not p.is_symlink()),
        key=lambda p: p.stat().st_size,
    )[-3:]
    total = sum(p.stat().st_size for p in files)
    mnt = work / "mnt-big"
    mnt.mkdir(exist_ok=True)
    settings = {"128 KiB": (128, False), f"{READ_AHEAD_KB} KiB": (READ_AHEAD_KB, False),
                f"{READ_AHEAD_KB} KiB, cold cache": (READ_AHEAD_KB, True)}  # fmt: skip
    got: dict[str, list[tuple[float, int]]] = {
        cut + name: [] for cut in lazies for name in settings
    }

    def once(lazy: Path, cache: Path, kb: int) -> tuple[float, int]:
        opts = ["--read-only", "--no-prefetch", "--cache", str(cache)]
        d = spawn(f"oci:{lazy}:{tag}", mnt, opts, log=work / "big.log", timeout=120)
        try:
            dev = os.stat(mnt).st_dev
            Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(
                str(kb)
            )
            for f in files:
                os.stat(mnt / f.relative_to(native))
            t0 = time.perf_counter()
            for f in files:
                with open(mnt / f.relative_to(native), "rb", buffering=0) as fh:
                    while fh.read(128 * 1024):
                        pass
            return time.perf_counter() - t0, mount_stats(mnt)["requests"].get("read", 0)
        finally:
            d.stop()

    caches = {cut: work / f"cache-big-{n}" for n, cut in enumerate(lazies)}
    for cut, lazy in lazies.items():
        once(lazy, caches[cut], 128)  # fills the cache
    for i in range(reps):
        for cut, lazy in lazies.items():
            for name, (kb, cold) in settings.items():
                cache = work / f"cache-big-cold-{i}" if cold else caches[cut]
                got[cut + name].append(once(lazy, cache, kb))
                if cold:
                    shutil.rmtree(cache)
    return [
        [
            name,
            f"{statistics.median(t for t, _ in runs) * 1e3:.0f} "
            f"({min(t for t, _ in runs) * 1e3:.0f}–{max(t for t, _ in runs) * 1e3:.0f})",
            f"{total / statistics.median(t for t, _ in runs) / 1e6:.0f}",
            f"{statistics.median(n for _, n in runs):.0f}",
        ]
        for name, runs in got.items()
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--before", type=Path, metavar="DIR", help="also the lazyfs of this checkout")
    p.add_argument("--work-dir", type=Path, metavar="DIR", help="default .bench")
    p.add_argument("--pyspy", type=Path, metavar="DIR", help="profile the daemon into DIR")
    p.add_argument("--big-reps", type=int, default=8, help="sequential-read rounds (0: none)")
    p.add_argument(
        "--forked",
        action="store_true",
        help="this tree's daemon forked by a fork server (else a new process, as --before's)",
    )
    p.add_argument(
        "--no-groups",
        action="store_true",
        help="no groups stored beside the image (bench_speed.py's \"no groups\" contenders)",
    )
    p.add_argument(
        "--timeline", type=Path, metavar="FILE", help="every request of every run, as TSV"
    )
    p.add_argument(
        "--chunking",
        nargs="+",
        type=bs.parse_chunking,
        metavar="SIZE|HEAD+SIZE",
        help="the lazyfs settings once per way of cutting files into chunks, alternating, each "
        "on the image converted so (bench_speed.py --chunking), cached",
    )
    args = p.parse_args()
    bl.sigterm_as_interrupt()
    bl.byte_compiled()
    from lazyfs.fs.daemon import spawn
    from lazyfs.fs.forkserver import ForkServer
    from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
    from lazyfs.testing.mounts import mount_stats

    work = (args.work_dir or bl.BENCH_DIR) / f"work-coldphase-{os.getpid()}"
    work.mkdir(parents=True)
    if args.pyspy is not None:
        args.pyspy.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    phases: dict[str, list[Phase]] = collections.defaultdict(list)
    try:
        src, lazy, tag, startup, says = bs.cold_image("debian", work)
        lazies = {f"[{bs.chunking_name(c)}] ": bs.chunked_image(src, lazy, tag, c)
                  for c in args.chunking or ()} or {"": lazy}  # fmt: skip
        native = src.parent / "rootfs"

        def run_startup(root: Path) -> Phase:
            """The start-up chrooted in ``root``: its seconds, CPU and page faults."""
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            out = subprocess.run(["chroot", str(root), *startup], check=True,
                                 capture_output=True, text=True)  # fmt: skip
            phase = Phase(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if says not in out.stdout:
                raise RuntimeError(f"the start-up did not start: {out.stdout} {out.stderr}")
            phase.program_cpu = (after.ru_utime + after.ru_stime
                                 - before.ru_utime - before.ru_stime)  # fmt: skip
            phase.faults = (after.ru_minflt + after.ru_majflt
                            - before.ru_minflt - before.ru_majflt)  # fmt: skip
            return phase

        with ForkServer.start(work / "forks.sock", log=work / "forks.log") as forks, \
                RegistryInstance(work / "registry") as reg, fuse_events() as inst:  # fmt: skip
            images = {}
            for n, (cut, layout) in enumerate(lazies.items()):
                images[cut] = f"{reg.host}/cold/groups{n}:{tag}"
                push_oci_layout(layout, images[cut], tag=tag)
                if not args.no_groups:
                    bs.trace_groups(images[cut], startup, work)

            def traced(pid: int, mnt: Path) -> Phase:
                """The start-up chrooted in ``mnt``, its FUSE requests traced, the CPU of
                daemon ``pid`` over it."""
                (inst / "trace").write_text("")
                (inst / "events/fuse/enable").write_text("1")
                cpu0 = _cpu(pid)
                loop0 = thread_sched(pid)
                phase = run_startup(mnt)
                phase.cpu = _cpu(pid) - cpu0
                loop = thread_sched(pid)
                phase.loop_cpu, phase.loop_queued = loop[0] - loop0[0], loop[1] - loop0[1]
                (inst / "events/fuse/enable").write_text("0")
                _events(inst, connection(mnt), phase)
                return phase

            def mounted(
                name: str, cache: Path, root: Path, profile: Path | None, image: str
            ) -> Callable[[], None]:
                def once() -> None:
                    cache.mkdir(exist_ok=True)
                    mnt = work / "mnt"
                    mnt.mkdir(exist_ok=True)
                    opts = ["--read-only", "--plain-http", "--cache", str(cache)]
                    d = spawn(image, mnt, opts, log=work / "mnt.log", timeout=120, cwd=root,
                              forkserver=forks.socket if root == bl.ROOT and args.forked
                              else None)  # fmt: skip
                    spy = None
                    try:
                        if profile is not None:
                            spy = subprocess.Popen(
                                [str(Path(sys.executable).parent / "py-spy"), "record",
                                 "--pid", str(d.pid), "--rate", "1000", "--threads",
                                 "--format", "chrometrace", "--idle", "-o", str(profile)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            )  # fmt: skip
                            time.sleep(0.05)  # py-spy attaches (it misses the first moments)
                        phase = traced(d.pid, mnt)
                        phase.fast = mount_stats(mnt).get("c_requests", {}).get("fast")
                        if profile is None:
                            phases[name].append(phase)
                    finally:
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)
                            spy.wait(30)
                        d.stop()

                return once

            def native_start() -> None:
                Path("/proc/sys/vm/drop_caches").write_text("2")
                phases["native, dentries cold"].append(run_startup(native))

            def overlay_start() -> None:
                # Just after native_start: the lower tree's dentries and pages are as warm as
                # that run left them; the fresh FUSE mount's are cold, as lazyfs's are.
                with bl.overlay_mount(native, work / "ovl", work / "mnt-ovl") as o:
                    phases[OVERLAY].append(traced(o.pid, o.mountpoint))

            trees = {"": bl.ROOT}
            if args.before is not None:
                trees["before: "] = args.before
            for i in range(args.reps + (1 if args.pyspy else 0)):
                prof = args.pyspy if i == args.reps else None
                for (cut, image), (label, root) in itertools.product(
                    images.items(), trees.items()
                ):
                    cache = work / f"cache-{label[:1]}{i}"
                    for name in ("cold", "cache warm"):
                        out = prof / f"{label[:-2] or 'after'}-{name.replace(' ', '-')}.json" \
                            if prof else None  # fmt: skip
                        mounted(cut + label + name, cache, root, out, image)()
                    shutil.rmtree(cache)
                if prof is None:
                    native_start()
                    overlay_start()
        big = big_reads(lazies, tag, native, work, args.big_reps) if args.big_reps else []
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if args.timeline is not None:
        with args.timeline.open("w") as f:
            for name, ps in phases.items():
                for i, q in enumerate(ps):
                    t0 = q.timeline[0][0] if q.timeline else 0.0
                    for t, lat, op, n in sorted(q.timeline):
                        f.write(f"{name}\t{i}\t{(t - t0) * 1e3:.2f}\t{lat * 1e3:.3f}\t{op}\t{n}\n")
    print(f"1-min load {load0:.1f} → {os.getloadavg()[0]:.1f} (2 CPUs, shared); "
          f"work dir {args.work_dir or '.bench'}\n")  # fmt: skip
    rows = []
    for name, ps in phases.items():
        ops: collections.Counter[str] = sum((q.count for q in ps), collections.Counter())
        lat: collections.Counter[str] = sum((q.latency for q in ps), collections.Counter())
        rb: collections.Counter[str] = sum((q.reply_bytes for q in ps), collections.Counter())
        n = len(ps)
        rows.append([
            name,
            f"{statistics.median(q.seconds for q in ps):.3f} "
            f"({min(q.seconds for q in ps):.3f}–{max(q.seconds for q in ps):.3f})",
            f"{statistics.median(q.program_cpu for q in ps) * 1e3:.0f}; "
            f"{statistics.median(q.faults for q in ps):.0f}",
            f"{statistics.median(sum(q.count.values()) for q in ps):.0f}" if ops else "",
            f"{statistics.median(q.busy for q in ps) * 1e3:.0f}" if ops else "",
            f"{statistics.median(q.cpu for q in ps) * 1e3:.0f}" if ops else "",
            f"{statistics.median(q.loop_cpu for q in ps) * 1e3:.0f}; "
            f"{statistics.median(q.loop_queued for q in ps) * 1e3:.0f}" if ops else "",
            f"{statistics.median(q.fast for q in ps if q.fast is not None):.0f}"
            if any(q.fast is not None for q in ps) else "",
            f"{statistics.median(statistics.median(q.reads) for q in ps) * 1e3:.2f}; "
            f"{statistics.median(sum(r for r in q.reads if r > WAITED) for q in ps) * 1e3:.0f}"
            if ops else "",
            "; ".join(
                f"{op} {c / n:.0f} ({lat[op] / n * 1e3:.0f} ms"
                + (f", {rb[op] / c / 1024:.0f} KiB avg" if op == "READ" else "")
                + ")"
                for op, c in ops.most_common()
            ),
        ])  # fmt: skip
    print(bl.md_table(["setting", "start-up s", "its CPU ms; page faults", "requests", "busy ms",
                       "daemon CPU ms", "event loop's thread: CPU; waited for a CPU, ms", "fast",
                       f"READ median ms; ms in READs over {WAITED * 1e3:.0f} ms",
                       "by opcode (mean count, summed latency)"], rows))  # fmt: skip
    if big:
        print(f"\nThe image's three largest files read whole, fresh mount ({args.big_reps} "
              f"rounds, alternating):\n")  # fmt: skip
        print(bl.md_table(["read-ahead", "ms", "MB/s", "READ requests"], big))
    return 0


if __name__ == "__main__":
    sys.exit(main())
