"""``lazyfs trace dump`` and ``lazyfs trace run``: access traces of a workload.

``trace run`` manages its own lazyfs daemon as a subprocess (stopped by PID) rather than
serving FUSE in this process: pyfuse3 keeps one global session per process, this process has
to block on the workload and the mount at once, and a separate daemon records exactly as a
user's ``lazyfs mount --trace`` does.  The workload runs chrooted into the mount inside its
own mount and PID namespaces, so /proc, /sys and /dev mounts vanish with it and nothing it
forks can outlive a kill.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from lazyfs.atomic import atomic_write
from lazyfs.errors import LazyfsError
from lazyfs.fs.unmount import is_mounted
from lazyfs.trace.schema import Trace, encode

if TYPE_CHECKING:
    from lazyfs.fs.daemon import Daemon

from .common import add_registry_args, registry_argv

READY_TIMEOUT = 300.0  # manifests and TOCs of a large image over a slow link
POLL_SECONDS = 0.1

# Runs as the namespace's PID 1 child: mounts the kernel filesystems into the lazy rootfs
# ($0), then becomes the workload.  Propagation is private, so none of it leaks to the host.
_ENTER = """set -e
root=$0
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
"""

RUN_HELP = """\
Mount IMAGE lazily with a fresh cache, run CMD chrooted into it (with /proc, /sys and /dev,
in private mount and PID namespaces), and record which files it reads.  A run ends when CMD
exits, after --timeout seconds, or when no new file was accessed for --idle seconds.  With
--runs 1 the trace is written to FILE; with --runs N > 1, to N files FILE.1.json ... FILE.N.json
(a trailing .json of FILE is kept once: out.json -> out.1.json), one lazyfs.trace document
each, ready for `lazyfs optimize`.  Needs root."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", help="record and dump access traces")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")

    d = tsub.add_parser("dump", help="print the trace a mount (--trace) has recorded so far")
    d.add_argument("mountpoint", metavar="MOUNTPOINT", help="a lazyfs mount made with --trace")
    d.add_argument("--out", metavar="FILE", help="write it atomically to FILE, not stdout")
    d.set_defaults(handler=dump_cmd)

    r = tsub.add_parser(
        "run",
        help="trace a command run in a lazily mounted image",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_options(r)
    # Options may also follow IMAGE; argparse cannot mix that with a trailing command, so
    # everything from IMAGE on is taken whole and parsed again in run_cmd.
    r.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="IMAGE [OPTION...] -- CMD [ARG...]",
        help="the image to mount, more options, and the command to run in it",
    )
    r.set_defaults(handler=run_cmd)


def _run_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--group", metavar="NAME", help="workload label (required)")
    r.add_argument("--out", metavar="FILE", help="trace file, see above (required)")
    r.add_argument("--runs", type=int, default=1, metavar="N", help="repeat N times (default 1)")
    r.add_argument("--timeout", type=float, default=0.0, metavar="S", help="stop after S seconds")
    r.add_argument(
        "--idle", type=float, default=0.0, metavar="S", help="stop after S seconds with no new file"
    )
    add_registry_args(r)


def _parse_run(args: argparse.Namespace) -> list[str]:
    """Parse ``IMAGE [OPTION...] -- CMD...`` into ``args``; return CMD."""
    rest = list(args.rest)
    if "--" in rest:
        i = rest.index("--")
        head, cmd = rest[:i], rest[i + 1 :]
    else:
        head, cmd = rest[:1], rest[1:]
    again = argparse.ArgumentParser(prog="lazyfs trace run")
    _run_options(again)
    again.add_argument("image", metavar="IMAGE")
    # Values given before IMAGE are already in args; parse_args keeps them.
    again.parse_args(head, namespace=args)
    for flag in ("group", "out"):
        if getattr(args, flag) is None:
            raise LazyfsError(f"trace run needs --{flag}")
    return cmd


# ---------------------------------------------------------------------------- dump


def dump_cmd(args: argparse.Namespace) -> int:
    from lazyfs.fs.control import control_request

    result = control_request(args.mountpoint, {"cmd": "trace"})
    try:
        trace = msgspec.convert(result, Trace)
    except msgspec.ValidationError as e:
        raise LazyfsError(f"{args.mountpoint}: the daemon sent a bad trace: {e}") from None
    data = encode(trace)
    if args.out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    _write(Path(args.out), data)
    print(f"{args.out}: trace of {len(trace.files)} files")
    return 0


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path.absolute(), data)
    except OSError as e:
        raise LazyfsError(f"cannot write {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------- run


def output_paths(out: str, runs: int) -> list[Path]:
    if runs == 1:
        return [Path(out)]
    stem = out.removesuffix(".json")
    return [Path(f"{stem}.{i}.json") for i in range(1, runs + 1)]


def run_cmd(args: argparse.Namespace) -> int:
    cmd = _parse_run(args)
    if not cmd:
        raise LazyfsError("trace run needs a command: lazyfs trace run IMAGE ... -- CMD [ARG...]")
    if args.runs < 1:
        raise LazyfsError(f"--runs must be at least 1, not {args.runs}")
    if args.timeout < 0 or args.idle < 0:
        raise LazyfsError("--timeout and --idle take a number of seconds >= 0")
    if os.geteuid() != 0:
        raise LazyfsError("trace run needs root (it mounts, chroots and unshares namespaces)")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise LazyfsError(f"trace run needs {tool} (util-linux/coreutils) on PATH")
    outs = output_paths(args.out, args.runs)
    for out in outs:
        if not out.absolute().parent.is_dir():
            raise LazyfsError(f"cannot write {out}: no such directory")
    for i, out in enumerate(outs, 1):
        trace, status, why = _one_run(args, cmd)
        _write(out, encode(trace))
        waited = sum(f.wait_ns for f in trace.files) / 1e9
        print(
            f"{out}: run {i}/{len(outs)}: {len(trace.files)} files, "
            f"{trace.duration_ns / 1e9:.2f}s, waited {waited:.2f}s ({why})"
        )
        if status not in (None, 0):
            print(f"lazyfs: run {i}: the command exited with status {status}", file=sys.stderr)
    return 0


def _one_run(args: argparse.Namespace, cmd: list[str]) -> tuple[Trace, int | None, str]:
    from lazyfs.fs.control import control_request

    tmp = Path(tempfile.mkdtemp(prefix="lazyfs-trace-"))
    mnt = tmp / "rootfs"
    mnt.mkdir()
    daemon: Daemon | None = None
    workload: subprocess.Popen[bytes] | None = None
    try:
        daemon = _start_daemon(args, tmp, mnt)
        for d in ("proc", "sys", "dev"):
            # Mount points for the kernel filesystems; made in the upper layer when the
            # image lacks them (a FUSE directory must exist to be mounted on).
            path = mnt / d
            if not path.is_dir():
                try:
                    path.mkdir(mode=0o755)
                except OSError as e:
                    raise LazyfsError(f"cannot create /{d} in the image: {e.strerror}") from None
        workload = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
                "--",
                "/bin/sh",
                "-c",
                _ENTER,
                str(mnt),
                *cmd,
            ],
            start_new_session=True,
        )
        status, why = _watch(workload, mnt, args.timeout, args.idle)
        if status is None:
            _stop_workload(workload)
        result = control_request(str(mnt), {"cmd": "trace"})
        return msgspec.convert(result, Trace), status, why
    finally:
        if workload is not None and workload.poll() is None:
            _stop_workload(workload)
        if daemon is not None:
            daemon.stop()
        # Never remove a tree that still has a mount in it: rmtree would descend into it.
        if is_mounted(str(mnt)):
            print(f"lazyfs: {mnt} is still mounted; leaving {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _start_daemon(args: argparse.Namespace, tmp: Path, mnt: Path) -> Daemon:
    from lazyfs.fs.daemon import clear_mountpoint, spawn

    options = [
        "--upper",
        str(tmp / "upper"),
        "--cache",
        str(tmp / "cache"),
        "--platform",
        args.platform,
        "--trace",
        str(tmp / "trace.json"),
        "--group",
        args.group,
        "--no-prefetch",  # a trace records what the workload needs, not what was prefetched
    ]
    options += registry_argv(args)
    try:
        return spawn(
            args.image,
            mnt,
            options,
            log=tmp / "mount.log",
            timeout=READY_TIMEOUT,
            verbose=args.verbose,
        )
    except BaseException:
        clear_mountpoint(mnt)  # a daemon killed before it was ready may leave its mount
        raise


def _watch(
    workload: subprocess.Popen[bytes], mnt: Path, timeout: float, idle: float
) -> tuple[int | None, str]:
    """Wait for the workload to exit, time out, or go idle; returns (exit status, why)."""
    from lazyfs.fs.control import control_request

    start = last_change = time.monotonic()
    files = -1
    while True:
        status = workload.poll()
        if status is not None:
            return status, "command exited"
        now = time.monotonic()
        if timeout and now - start >= timeout:
            return None, f"timeout after {timeout:g}s"
        if idle:
            summary = control_request(str(mnt), {"cmd": "trace", "summary": True})
            assert isinstance(summary, dict)
            if summary["files"] != files:
                files, last_change = summary["files"], now
            elif now - last_change >= idle:
                return None, f"idle for {idle:g}s"
        time.sleep(POLL_SECONDS)


def _stop_workload(workload: subprocess.Popen[bytes]) -> None:
    # unshare --kill-child takes the namespace's PID 1, and with it every process in it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(workload.pid, signal.SIGTERM)
    try:
        workload.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(workload.pid, signal.SIGKILL)
        workload.wait()
