"""Where a warm Python start-up's time goes on each FUSE tree: what it asks the daemon (requests
by opcode and their summed latency, from the kernel's own ``fuse_request_send`` /
``fuse_request_end`` tracepoints, so every contender is counted alike, C or Python) and what it
costs the process (wall, user and system time from ``wait4``), against the native disk: native,
lazyfs, fuse-overlayfs and (``--before DIR``) the lazyfs of another checkout, every contender in
turn, round after round, medians.  Issue 13's python row.  "CPU + waited" leaves out the time
the process sat runnable while other work had the CPUs, which dominates wall time under load.
Also per start-up: its voluntary context switches (one per request it waited for) and minor
page faults (``wait4``), and the CPU each FUSE daemon spent meanwhile (its threads' schedstat).
``--no-isatty``: every tree once more with ``isatty()`` answered in the start-up itself (a
one-line shim, built with ``cc`` and preloaded by the tree's ``env``), so that the kernel sends
no FUSE_IOCTL: what the rest of FUSE costs.  ``env`` and the shim cost every tree the same few
ms, so those rows are compared with the native disk's row run the same way.  Needs root and
tracefs (mounted at /sys/kernel/tracing for the run if it is not; unmounted after).  Run from
the repo root:
``.venv/bin/python scripts/bench_startup_requests.py [--reps N] [--before DIR] [--no-isatty]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import bench_speed as bs
import benchlib as bl

from lazyfs.testing.sample import PYTHON

TRACEFS = Path("/sys/kernel/tracing")
EVENT = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+) (.*)")


@contextmanager
def fuse_events() -> Iterator[Path]:
    """A tracing instance of our own (no other user's buffer touched) with the fuse events."""
    mounted = not (TRACEFS / "instances").is_dir()
    if mounted:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    inst = TRACEFS / "instances" / f"lazyfs-bench-{os.getpid()}"
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("8192")
        yield inst
    finally:
        (inst / "events/fuse/enable").write_text("0")
        inst.rmdir()
        if mounted:
            subprocess.run(["umount", str(TRACEFS)], check=False)


def connection(mnt: Path) -> int:
    """The FUSE connection's number in the tracepoints: the mount's device, as the kernel
    encodes it."""
    dev = os.stat(mnt).st_dev
    return os.major(dev) << 20 | os.minor(dev)


class Run:
    def __init__(self, wall: float, user: float, system: float) -> None:
        self.wall, self.user, self.system = wall, user, system
        self.ops: collections.Counter[str] = collections.Counter()
        self.latency = 0.0  # summed over requests: the time the process waited for daemons
        self.switches = 0  # voluntary context switches of the start-up (its sleeps)
        self.faults = 0  # its minor page faults
        self.daemon_cpu = 0.0  # seconds the tree's FUSE daemon ran meanwhile

    @property
    def needed(self) -> float:
        """What the start-up itself took: its CPU time and its waits for the daemon, without
        the time it sat runnable behind other work (on a loaded machine half the wall time,
        and unfair: a task that never sleeps, as on the native disk, waits longest)."""
        return self.user + self.system + self.latency


# Preloaded by --no-isatty: Python 3.11's open() asks isatty() of every file it opens (3.14
# no longer does for regular files); answered here, the kernel sends no FUSE_IOCTL.
NO_ISATTY_C = "#include <errno.h>\nint isatty(int fd) { (void)fd; errno = ENOTTY; return 0; }\n"
NO_ISATTY = "/.lazyfs-bench-no-isatty.so"  # in each tree's root, removed after the run


def build_no_isatty(work: Path) -> Path:
    src, lib = work / "no_isatty.c", work / "no_isatty.so"
    src.write_text(NO_ISATTY_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True)
    return lib


def task_cpu(pid: int | None) -> dict[str, int]:
    """Nanoseconds each live thread of the process has run (schedstat: not the clock ticks of
    /proc/PID/stat); empty without a process."""
    if pid is None:
        return {}
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


def cpu_between(before: dict[str, int], after: dict[str, int]) -> float:
    """Seconds the threads ran between two ``task_cpu`` readings (a thread that ended
    meanwhile is left out: an idle worker's exit must not count as negative time)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def start_up(
    root: Path, inst: Path | None, conn: int, daemon: int | None = None, shim: bool = False
) -> Run:
    if inst is not None:
        (inst / "trace").write_text("")
        (inst / "events/fuse/enable").write_text("1")
    # The shim is preloaded by env(1) in the tree: chroot(8) itself runs outside it.
    preload = ["/usr/bin/env", f"LD_PRELOAD={NO_ISATTY}"] if shim else []
    argv = ["chroot", str(root), *preload, PYTHON, "-c", bs.IMPORTS]
    cpu0 = task_cpu(daemon)
    t0 = time.perf_counter()
    pid = os.posix_spawnp("chroot", argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    run = Run(time.perf_counter() - t0, usage.ru_utime, usage.ru_stime)
    run.daemon_cpu = cpu_between(cpu0, task_cpu(daemon))
    run.switches, run.faults = usage.ru_nvcsw, usage.ru_minflt
    if status != 0:
        raise SystemExit(f"the start-up failed in {root}: status {status}")
    if inst is None:
        return run
    (inst / "events/fuse/enable").write_text("0")
    for r in fuse_requests((inst / "trace").read_text(), conn):
        run.ops[r.op] += 1
        run.latency += r.took or 0.0
    return run


class Request(NamedTuple):
    sent: float  # the trace's clock, seconds
    took: float | None  # None: no answer (FORGET), or its end fell outside the trace
    op: str  # "READ", "LOOKUP", ...
    reply_bytes: int  # what the answer carried (its "len"), 0 without one


def fuse_requests(trace: str, conn: int) -> Iterator[Request]:
    """Each request of FUSE connection ``conn`` in a trace's text (another mount's are left
    out: the machine is shared): the answered ones as their ends come, then the others."""
    sent: dict[int, tuple[float, str]] = {}
    for line in trace.splitlines():
        m = EVENT.search(line)
        if m is None or int(m.group(3)) != conn:
            continue
        at, req = float(m.group(1)), int(m.group(4))
        if m.group(2) == "send":
            op = re.search(r"\(FUSE_(\w+)\)", m.group(5))
            sent[req] = (at, op.group(1) if op else "?")
        elif req in sent:
            t, op = sent.pop(req)
            n = re.search(r"len (\d+)", m.group(5))
            yield Request(t, at - t, op, int(n.group(1)) if n else 0)
    for t, op in sent.values():
        yield Request(t, None, op, 0)


SHIM_LABEL = ", isatty() answered in the process"


def label(name: str, shim: bool) -> str:
    return name + SHIM_LABEL if shim else name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--files", type=int, default=6000, help="as bench_speed.py's --files")
    p.add_argument("--before", type=Path, metavar="DIR", help="also the lazyfs of this checkout")
    p.add_argument(
        "--no-isatty", action="store_true",
        help="every tree also with isatty() answered in the start-up (no FUSE_IOCTL)",
    )  # fmt: skip
    args = p.parse_args()
    bl.sigterm_as_interrupt()
    bl.byte_compiled()  # also lets the chrooted Python rewrite its byte code, as it would
    lazy = bs._sample_with_tree(args.files)
    native = bl.extract_tar(lazy.parent / "layer.tar", lazy.parent / "rootfs")
    work = bl.BENCH_DIR / f"work-startup-{os.getpid()}"  # fresh every run
    work.mkdir(parents=True)
    load0 = os.getloadavg()[0]
    roots: dict[str, Path] = {"native disk": native}
    daemons: dict[str, int] = {}
    try:
        with ExitStack() as stack:
            m = stack.enter_context(
                bl.lazyfs_mount(f"oci:{lazy}", work / "mnt", work / "cache", upper=work / "up")
            )
            roots["lazyfs"], daemons["lazyfs"] = m.mountpoint, m.pid
            if args.before is not None:
                from lazyfs.fs.daemon import spawn

                mnt = work / "mnt-before"
                mnt.mkdir()
                opts = ["--upper", str(work / "up-before"), "--cache", str(work / "c-before")]
                d = spawn(f"oci:{lazy}", mnt, opts, log=work / "before.log", timeout=120,
                          cwd=args.before)  # fmt: skip
                stack.callback(d.stop)
                roots["before: lazyfs"], daemons["before: lazyfs"] = mnt, d.pid
            o = stack.enter_context(bl.overlay_mount(native, work / "ovl", work / "o"))
            roots["fuse-overlayfs"], daemons["fuse-overlayfs"] = o.mountpoint, o.pid
            if args.no_isatty:
                lib = build_no_isatty(work)
                for root in roots.values():
                    # The native tree is the cached extraction: the shim leaves it after the run.
                    stack.callback((root / NO_ISATTY.lstrip("/")).unlink, missing_ok=True)
                    shutil.copy(lib, root / NO_ISATTY.lstrip("/"))
            inst = stack.enter_context(fuse_events())
            contenders = [(name, False) for name in roots]
            contenders += [(name, True) for name in roots] if args.no_isatty else []
            # Warm: the first start rewrites the byte code (the tar's mtimes), the second
            # reads it from the daemon once, the third refreshes the atimes that read dropped.
            for name, shim in contenders:
                for _ in range(3):
                    start_up(roots[name], None, 0, shim=shim)
            runs: dict[str, list[Run]] = {label(n, s): [] for n, s in contenders}
            for _ in range(args.reps):
                for name, shim in contenders:
                    root, daemon = roots[name], daemons.get(name)
                    run = start_up(root, inst if daemon else None, connection(root), daemon, shim)
                    runs[label(name, shim)].append(run)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    rows = []
    for name, rs in runs.items():
        # Against the native disk run the same way (with or without the shim).
        native_runs = runs[label("native disk", name.endswith(SHIM_LABEL))]
        base = statistics.median(r.wall for r in native_runs)
        base_needed = statistics.median(r.needed for r in native_runs)
        wall = statistics.median(r.wall for r in rs)
        needed = statistics.median(r.needed for r in rs)
        ops: collections.Counter[str] = sum((r.ops for r in rs), collections.Counter())
        rows.append([
            name, f"{wall * 1e3:.1f}", bl.ratio(wall, base),
            f"{statistics.median(r.user for r in rs) * 1e3:.1f}",
            f"{statistics.median(r.system for r in rs) * 1e3:.1f}",
            f"{statistics.median(sum(r.ops.values()) for r in rs):.0f}",
            f"{statistics.median(r.latency for r in rs) * 1e3:.2f}",
            f"{needed * 1e3:.1f}", bl.ratio(needed, base_needed),
            f"{statistics.median(r.switches for r in rs):.0f}",
            f"{statistics.median(r.faults for r in rs):.0f}",
            f"{sum(r.daemon_cpu for r in rs) / len(rs) * 1e3:.2f}",
            ", ".join(f"{op} {n / len(rs):.1f}" for op, n in ops.most_common()) or "—",
        ])  # fmt: skip
    print(
        f"`chroot ROOT python3 -c '{bs.IMPORTS}'`, warm, {args.reps} rounds, medians; "
        f"1-min load {load0:.1f} → {os.getloadavg()[0]:.1f} (2 CPUs, shared); "
        "cache and uppers under .bench\n"
    )
    head = ["tree", "wall ms", "vs native", "user ms", "sys ms", "requests", "waited ms",
            "CPU + waited ms", "vs native", "switches", "minor faults", "daemon CPU ms (mean)",
            "requests a start-up, by opcode (mean)"]  # fmt: skip
    print(bl.md_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
