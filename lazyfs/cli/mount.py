"""``lazyfs mount``, ``umount`` and ``stats``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from lazyfs.errors import LazyfsError, first_error

if TYPE_CHECKING:
    from lazyfs.fs.serve import MountOptions
    from lazyfs.store.wholelayer import WholeFetch

from .common import (
    add_cache_args,
    add_registry_args,
    not_lazy_line,
    parse_size,
    whole_fetch_line,
)

# Where a mount without --prefetch looks for what to prefetch (the snapshotter's policies too).
PREFETCH_SOURCES = ("auto", "groups", "landmark")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mount", help="mount an image lazily")
    p.add_argument("image", metavar="IMAGE", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    p.add_argument("--upper", metavar="DIR", help="writable upper directory (a layer diff)")
    add_cache_args(p)
    add_registry_args(p)
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--read-only", action="store_true", help="no upper layer; EROFS on writes")
    p.add_argument("--suid", action="store_true", help="honour the image's set-id bits")
    p.add_argument("--dev", action="store_true", help="let the image's device nodes work")
    p.add_argument(
        "--copy-up-limit",
        type=parse_size,
        metavar="SIZE",
        help="refuse (EFBIG) to copy up a file with more data than this (default: free space)",
    )
    p.add_argument(
        "--background-fetch", action="store_true", help="fetch the rest of every layer when idle"
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="record every file read; write the trace (JSON) to FILE when the mount ends",
    )
    p.add_argument(
        "--group",
        metavar="NAME",
        help="workload label of the trace, and the group --prefetch fetches (default: first)",
    )
    p.add_argument(
        "--prefetch",
        metavar="GROUPS.json",
        help="fetch a prefetch group's files in rank order, in the background, once mounted "
        "(default: the groups stored beside the image in its registry, else the layers' "
        "prefetch landmarks)",
    )
    p.add_argument(
        "--prefetch-from",
        choices=PREFETCH_SOURCES,
        default="auto",
        help="without --prefetch: fetch the group stored beside the image (groups), up to the "
        "layers' landmarks (landmark), or the first of these there is (auto, the default)",
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="fetch nothing before it is read (no stored groups, no landmarks)",
    )
    p.add_argument(
        "--no-deltas",
        action="store_true",
        help="do not look for binary patches stored beside the image (fetch chunks only)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a read whose registry sends nothing gets EIO within S seconds (default 30)",
    )
    p.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help="mount only the image's lowest N layers (IMAGE best given by digest)",
    )
    p.add_argument("--docker-config", metavar="FILE", help="registry credentials (config.json)")
    p.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    p.add_argument(
        "--log",
        metavar="FILE",
        help="daemon log file, kept under 2 x 4 MiB by rotation (default: beside the mount's "
        "control socket; `lazyfs stats` shows where)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=mount_cmd)

    p = sub.add_parser("umount", help="unmount (also cleans a mount whose daemon died)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a lazyfs mount point")
    p.add_argument("--lazy", action="store_true", help="detach even if busy")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")
    p.set_defaults(handler=umount_cmd)

    p = sub.add_parser("commit", help="write a mount's upper layer as an OCI layer tar")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a lazyfs mount with --upper")
    p.add_argument("out", metavar="OUT.tar", help="the layer tar to write (atomically)")
    p.set_defaults(handler=commit_cmd)

    p = sub.add_parser("stats", help="per-layer fetch statistics of a mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a lazyfs mount point")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument(
        "--prometheus", action="store_true", help="Prometheus text format (what the snapshotter "
        "serves for each of its daemons)",
    )  # fmt: skip
    p.set_defaults(handler=stats_cmd)


def _options(args: argparse.Namespace) -> MountOptions:
    from lazyfs.fs.serve import MountOptions

    return MountOptions(
        image=args.image,
        mountpoint=args.mountpoint,
        upper=args.upper,
        cache=args.cache,
        cache_max_bytes=args.cache_size,
        plain_http=args.plain_http,
        insecure=args.insecure,
        hosts_dir=args.hosts_dir,
        platform=args.platform,
        allow_other=args.allow_other,
        read_only=args.read_only,
        suid=args.suid,
        dev=args.dev,
        copy_up_max=args.copy_up_limit,
        background_fetch=args.background_fetch,
        auto_prefetch=not args.no_prefetch,
        deltas=not args.no_deltas,
        trace=os.path.abspath(args.trace) if args.trace else None,
        group=args.group,
        prefetch=args.prefetch,
        prefetch_from=args.prefetch_from,
        layer_count=args.layers,
        docker_config=args.docker_config,
        read_timeout=args.read_timeout,
        log=os.path.abspath(args.log) if args.log else None,
    )


def mount_cmd(args: argparse.Namespace) -> int:
    if not args.read_timeout > 0:
        raise LazyfsError("--read-timeout takes a number of seconds > 0")
    if args.prefetch and args.no_prefetch:
        raise LazyfsError("--prefetch and --no-prefetch contradict each other: give one of them")
    if args.upper and args.read_only:  # the daemon refuses it too; say so before spawning
        raise LazyfsError("--upper and --read-only contradict each other: give one of them")
    if args.foreground or args.ready_fd is not None:
        return _serve(args)
    if args.log is None:
        from lazyfs.fs.runtime import log_path

        log = log_path(args.mountpoint)
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        args.log = str(log)
    # Daemonize by forking, before trio or any thread exists: the child serves in a new
    # session and reports readiness or its one-line error through a pipe, so errors before
    # the mount is ready come from this command.  A fork, not a second interpreter: starting
    # Python and importing lazyfs again was half of a mount's time.
    from lazyfs.fs.daemon import DaemonFailed, read_ready

    sys.stdout.flush()
    sys.stderr.flush()  # or the child writes the parent's pending output again
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os._exit(_child(args, write_fd))
    os.close(write_fd)
    try:
        report = read_ready(read_fd, None, _print_progress)
    except DaemonFailed as e:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        raise LazyfsError(str(e) or f"daemon exited ({code})") from None
    finally:
        os.close(read_fd)
    if report.plain:
        consequence = (
            "fetched whole in the background, what needs them waits (once: the cache keeps "
            "them; `lazyfs stats` shows the download)"
        )
        print(not_lazy_line(args.image, report.layers, report.plain, consequence), file=sys.stderr)
    print(f"{args.mountpoint}: mounted {args.image} (pid {pid})")
    return 0


def _print_progress(fetch: WholeFetch) -> None:
    print(whole_fetch_line(fetch), file=sys.stderr, flush=True)


def detach(log: str, keep_fd: int) -> None:
    """Make a forked process a daemon: its own session, stdin from /dev/null, output
    appended to ``log``, and no descriptor but ``keep_fd`` (the readiness pipe) left open."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    # Nothing else the caller handed us stays open for the daemon's lifetime (a pipe held
    # open here would keep a caller reading it waiting), as a new process's would not.
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _child(args: argparse.Namespace, ready_fd: int) -> int:
    """The forked daemon: detached, then serving."""
    try:
        detach(args.log or os.devnull, ready_fd)
        args.ready_fd = ready_fd
        return _serve(args)
    except BaseException as e:  # the parent has the one line through the pipe; log the rest
        with contextlib.suppress(OSError):
            print(f"lazyfs: {first_error(e)}", file=sys.stderr, flush=True)
        return 1


def _serve(args: argparse.Namespace) -> int:
    import trio

    from lazyfs.fs.control import ReadyReport, progress_line, ready_line
    from lazyfs.fs.serve import serve

    ready_fd = args.ready_fd
    if args.log:
        _log_to(args.log, daemon=args.ready_fd is not None)

    def ready(report: ReadyReport) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, ready_line(report))
            os.close(ready_fd)
            ready_fd = None
        elif report.plain:  # --foreground: the terminal is ours
            consequence = "fetched whole in the background, what needs them waits"
            print(not_lazy_line(args.image, report.layers, report.plain, consequence),
                  file=sys.stderr)  # fmt: skip

    def progress(fetch: WholeFetch) -> None:
        if ready_fd is not None:  # only until ready: the fd is closed (and its number reused)
            os.write(ready_fd, progress_line(fetch))
        elif args.foreground:
            _print_progress(fetch)

    try:
        trio.run(serve, _options(args), ready, progress)
    except BaseException as e:
        err = first_error(e)
        if ready_fd is not None:
            if isinstance(err, LazyfsError):
                text = str(err)
            elif isinstance(err, OSError):
                text = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
            else:
                text = f"{type(err).__name__}: {err}"
            os.write(ready_fd, f"error: {text}\n".encode())
            os.close(ready_fd)
        if err is not e and isinstance(err, LazyfsError | OSError):
            raise err from None
        raise
    return 0


# The daemon's log is bounded: it runs for as long as its container does.
LOG_MAX_BYTES = 4 << 20


def _log_to(path: str, *, daemon: bool) -> None:
    """Send logging to ``path``, rotated at LOG_MAX_BYTES with one old file kept.  A daemon's
    stdout and stderr (where a crash's traceback goes) follow the current file."""
    import logging.handlers

    class Handler(logging.handlers.RotatingFileHandler):
        def doRollover(self) -> None:
            super().doRollover()
            self._redirect()

        def _redirect(self) -> None:
            if daemon and self.stream is not None:
                for fd in (1, 2):
                    os.dup2(self.stream.fileno(), fd)

    handler = Handler(path, maxBytes=LOG_MAX_BYTES, backupCount=1)
    handler.setFormatter(
        logging.Formatter("%(asctime)s lazyfs: %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    handler._redirect()


def umount_cmd(args: argparse.Namespace) -> int:
    from lazyfs.fs.daemon import unmount_and_wait

    unmount_and_wait(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    return 0


def commit_cmd(args: argparse.Namespace) -> int:
    from lazyfs.fs.control import control_request
    from lazyfs.fs.layertar import commit_layer

    info = control_request(args.mountpoint, {"cmd": "info"})
    assert isinstance(info, dict)
    if not info.get("upper"):
        raise LazyfsError(f"{args.mountpoint} is mounted read-only: there is no upper layer")
    try:
        commit_layer(info["upper"], args.out)
    except (OSError, ValueError) as e:
        raise LazyfsError(f"cannot write {args.out}: {e}") from None
    print(f"{args.out}: layer written from {info['upper']}")
    return 0


def stats_cmd(args: argparse.Namespace) -> int:
    from lazyfs.fs.control import control_request
    from lazyfs.progress import human_bytes

    report = control_request(args.mountpoint, {"cmd": "stats"})
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
        return 0
    assert isinstance(report, dict)
    if args.prometheus:
        from lazyfs.fs.prometheus import DaemonStats, daemon_families, exposition

        labels = {"daemon": str(report.get("pid", "")), "mountpoint": report["mountpoint"]}
        families = daemon_families([DaemonStats(labels, report)], list(labels))
        sys.stdout.write(exposition(families).decode())
        return 0
    print(f"{report['image']} ({report['manifest'][:19]}) on {report['mountpoint']}")
    if report.get("log"):
        print(f"log: {report['log']}")
    print(
        f"{'LAYER':<20} {'FETCHED':>12} {'READY':>21} {'REQS':>6} {'HITS':>7} {'MISSES':>7} "
        f"{'WAIT':>8}"
    )
    for layer in report["layers"]:
        s = layer["stats"]
        print(
            f"{layer['digest'][7:19]:<20} {human_bytes(s['bytes_fetched']):>12} "
            f"{human_bytes(s['bytes_ready']) + '/' + human_bytes(s['bytes_total']):>21} "
            f"{s['requests']:>6} {s['cache_hits']:>7} {s['cache_misses']:>7} "
            f"{s['wait_ns'] / 1e9:>7.2f}s"
        )
        if whole := layer.get("whole"):  # no TOC: this mount downloads it whole
            if whole.get("error"):
                took = f"failed ({whole['error']}); the next access tries again"
            elif whole["seconds"] is None:
                took = "downloading in the background"
                if whole.get("received") is not None:
                    took += f", {human_bytes(whole['received'])} so far"
            else:
                took = f"in {whole['seconds']:.1f}s"
            print(f"  {'':<18} fetched whole: {human_bytes(whole['size'])} {took}")
    print(_requests_line([layer["stats"] for layer in report["layers"]]))
    held = sum(layer["stats"].get("bytes_held", 0) for layer in report["layers"])
    patches = sum(layer["stats"].get("patch_bytes", 0) for layer in report["layers"])
    if held or patches:
        print(f"held when opened: {human_bytes(held)}; patches fetched: {human_bytes(patches)}")
    if early := report.get("answered_early", 0):  # what no layer being downloaded could change
        print(f"answered at once: {early}; waited for layers: {report['waited_for_layers']}")
    return 0


def _requests_line(stats: list[dict[str, Any]]) -> str:
    """What the requests were, over all layers: multi-range ones (a prefetch batch each),
    readers' overtakes of a stream, and the streams under way now."""
    from lazyfs.progress import human_bytes

    multi = sum(s.get("multirange_requests", 0) for s in stats)
    overtakes = sum(s.get("overtakes", 0) for s in stats)
    streams = [st for s in stats for st in s.get("streams", [])]
    line = f"requests: {multi} multi-range, {overtakes} overtakes; {len(streams)} streaming now"
    if streams:
        got = sum(st["received"] for st in streams)
        want = sum(st["bytes"] for st in streams)
        line += f" ({human_bytes(got)} of {human_bytes(want)})"
    return line

