"""Mount lifecycle: open the image, build the tree, serve FUSE, answer the control socket.

The daemon is ready (and says so through ``ready``) once manifests and TOCs are read; no file
content is fetched before a reader asks, unless ``--prefetch`` names a group to fetch in the
background from then on.  A small control socket per mount answers ``stats``, ``info`` and
``trace`` as one JSON line each way, so ``lazyfs stats`` needs no file inside the container's
rootfs.  With ``--trace FILE`` a recorder listens to opens and reads, and the trace is written
atomically when the mount ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import pyfuse3
import trio

from lazyfs.atomic import atomic_write
from lazyfs.errors import LazyfsError
from lazyfs.fs.merge import apply_upper
from lazyfs.fs.ops import Operations
from lazyfs.fs.prefetch import Prefetcher, PrefetchStats, landmark_group, load_group
from lazyfs.fs.tree import Tree
from lazyfs.fs.upper import Upper
from lazyfs.opener import open_image
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import find_groups
from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES
from lazyfs.trace.recorder import Recorder
from lazyfs.trace.schema import Group, decode_groups, encode

log = logging.getLogger(__name__)

MNT_DETACH = 2
STORED_GROUPS_TIMEOUT = 10.0


class MountOptions(msgspec.Struct, kw_only=True):
    image: str
    mountpoint: str
    upper: str | None = None
    cache: str | None = None
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    plain_http: bool = False
    insecure: bool = False
    platform: str = "linux/amd64"
    allow_other: bool = False
    read_only: bool = False
    background_fetch: bool = False
    trace: str | None = None  # record accesses; write the trace here when the mount ends
    group: str | None = None  # workload label of the trace; the group --prefetch fetches
    prefetch: str | None = None  # a prefetch-groups document
    # Without a document: look for groups stored beside the image in the registry, then for
    # landmarks in re-laid-out layers.  False fetches nothing before it is read.
    auto_prefetch: bool = True


class MountInfo(msgspec.Struct):
    pid: int
    image: str
    mountpoint: str
    manifest: str
    upper: str | None


class LayerReport(msgspec.Struct):
    digest: str
    entries: int
    stats: dict[str, object]


class StatsReport(msgspec.Struct):
    image: str
    manifest: str
    mountpoint: str
    files: int
    layers: list[LayerReport]
    prefetch: PrefetchStats | None = None


# ---------------------------------------------------------------------------- runtime paths


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/lazyfs")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lazyfs-{os.getuid()}"
    return Path(base) / "lazyfs"


def canonical(mountpoint: str | os.PathLike[str]) -> str:
    """The absolute path with the parents' symlinks resolved but the mount point itself not
    touched: a stat of a mount whose daemon hangs would hang the caller too."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def control_path(mountpoint: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(os.fsencode(canonical(mountpoint))).hexdigest()[:16]
    return runtime_dir() / f"{key}.sock"


# ---------------------------------------------------------------------------- stale mounts


def _umount2(target: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def is_stale(mountpoint: str) -> bool:
    """True when a FUSE daemon died and left its mount behind (every access says ENOTCONN)."""
    try:
        os.statvfs(mountpoint)  # never answered from the kernel's attribute cache, unlike stat
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def is_mounted(mountpoint: str) -> bool:
    real = canonical(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == real:
                return True
    return False


def _unescape(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount; a stale mount is always detached (its daemon is gone)."""
    stale = is_stale(mountpoint)
    try:
        _umount2(mountpoint, MNT_DETACH if (lazy or stale) else 0)
    except OSError as e:
        if e.errno == errno.EPERM:
            # Not root: fusermount3 is setuid and unmounts our own FUSE mounts.
            import subprocess

            flag = "-uz" if (lazy or stale) else "-u"
            res = subprocess.run(["fusermount3", flag, mountpoint], capture_output=True, text=True)
            if res.returncode != 0:
                raise LazyfsError(f"cannot unmount {mountpoint}: {res.stderr.strip()}") from None
            return
        if e.errno == errno.EINVAL:
            raise LazyfsError(f"{mountpoint} is not mounted") from None
        if e.errno == errno.EBUSY:
            raise LazyfsError(f"{mountpoint} is busy (use --lazy to detach)") from None
        raise LazyfsError(f"cannot unmount {mountpoint}: {e.strerror}") from None


# ---------------------------------------------------------------------------- serving


async def _control_server(
    path: Path, handler: Callable[[dict[str, object]], object], task_status: trio.TaskStatus
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            with trio.move_on_after(10):
                while b"\n" not in buf and len(buf) < 65536:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
                try:
                    request = msgspec.json.decode(buf.strip() or b"{}")
                    reply: object = {"ok": True, "result": handler(request)}
                except (msgspec.DecodeError, LazyfsError, KeyError) as e:
                    reply = {"ok": False, "error": str(e)}
                await stream.send_all(msgspec.json.encode(reply) + b"\n")

    try:
        task_status.started()
        await trio.serve_listeners(serve_one, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def serve(opts: MountOptions, ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled.  Raises LazyfsError before ``ready``."""
    mountpoint = os.path.abspath(opts.mountpoint)
    if is_stale(mountpoint):
        log.warning("cleaning a stale mount at %s", mountpoint)
        unmount(mountpoint, lazy=True)
    if not os.path.isdir(mountpoint):
        raise LazyfsError(f"mount point {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise LazyfsError(f"{mountpoint} is already mounted")
    # Bad prefetch or trace arguments fail before anything is fetched or mounted.
    groups = load_group(opts.prefetch, opts.group) if opts.prefetch else None
    trace_path = Path(opts.trace).absolute() if opts.trace else None
    if trace_path is not None and not trace_path.parent.is_dir():
        raise LazyfsError(f"cannot write the trace to {opts.trace}: no such directory")
    async with open_image(
        opts.image,
        cache_dir=opts.cache,
        cache_size=opts.cache_max_bytes,
        plain_http=opts.plain_http,
        insecure=opts.insecure,
        platform=opts.platform,
    ) as image:
        source, store = image.source, image.store
        layers = image.store_layers()
        tree = Tree.from_layers([ol.toc for ol in image.layers])
        upper: Upper | None = None
        if not opts.read_only:
            if opts.upper is None:
                raise LazyfsError("a writable mount needs --upper DIR (or use --read-only)")
            upper = Upper(opts.upper)
            apply_upper(tree, upper)
        manifest = image.resolved.manifest_digest
        recorder: Recorder | None = None
        if trace_path is not None:
            recorder = Recorder(opts.image, manifest, layers, opts.group or "default")
            store.on_wait = recorder.waited
        prefetcher: Prefetcher | None = None
        if groups is not None:
            doc, group = groups
            if doc.manifest and doc.manifest != manifest:
                log.info("prefetch groups were made for %s; matching by layer", doc.manifest)
            prefetcher = Prefetcher(store, layers, group)

        async def auto_prefetch() -> None:
            # After readiness: looking in the registry costs a round trip or two.
            nonlocal prefetcher
            group = await _stored_group(source, manifest, opts.group) or landmark_group(layers)
            if group is not None:
                prefetcher = Prefetcher(store, layers, group)
                await prefetcher.run()

        ops = Operations(tree, store, layers, upper, listener=recorder)

        def handle(request: dict[str, object]) -> object:
            if request.get("cmd") == "info":
                return MountInfo(
                    pid=os.getpid(),
                    image=opts.image,
                    mountpoint=mountpoint,
                    manifest=image.resolved.manifest_digest,
                    upper=os.path.abspath(opts.upper) if upper is not None and opts.upper else None,
                )
            if request.get("cmd") == "stats":
                return StatsReport(
                    image=opts.image,
                    manifest=image.resolved.manifest_digest,
                    mountpoint=mountpoint,
                    files=len(tree.nodes),
                    layers=[
                        LayerReport(
                            ol.descriptor.digest,
                            len(ol.toc.entries),
                            msgspec.to_builtins(ol.layer.stats),
                        )
                        for ol in image.layers
                    ],
                    prefetch=prefetcher.stats if prefetcher is not None else None,
                )
            if request.get("cmd") == "trace":
                if recorder is None:
                    raise LazyfsError("this mount is not recording (mount it with --trace FILE)")
                return recorder.summary() if request.get("summary") else recorder.trace()
            raise LazyfsError(f"unknown command {request.get('cmd')!r}")

        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {"fsname=lazyfs", "subtype=lazyfs"}
        if opts.allow_other:
            fuse_options.add("allow_other")
        if opts.read_only:
            fuse_options.add("ro")
        if os.geteuid() == 0:
            fuse_options.add("dev")  # device nodes in a container rootfs must work
            fuse_options.add("suid")
        # Resolve the control socket path now: after init, touching the mount point from this
        # process would wait for a FUSE reply only this process can give (canonical() does
        # not touch it either, but the order keeps that property obvious).
        control = control_path(mountpoint)
        pyfuse3.init(ops, mountpoint, fuse_options)
        try:
            # Fetches started by readers live in their own nursery: at unmount the control
            # socket and background fill are cancelled, but chunks already on their way are
            # still verified and written to the cache.
            async with store.running(), trio.open_nursery() as nursery:
                await nursery.start(_control_server, control, handle)
                if opts.background_fetch:
                    store.background(nursery)
                nursery.start_soon(_on_signals, nursery.cancel_scope)
                if recorder is not None:
                    recorder.start()
                if prefetcher is not None:
                    nursery.start_soon(prefetcher.run)
                elif opts.auto_prefetch:
                    nursery.start_soon(auto_prefetch)
                if ready is not None:
                    ready()
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            if recorder is not None and trace_path is not None:
                _write_trace(recorder, trace_path)
            if upper is not None:
                upper.close()


def _write_trace(recorder: Recorder, path: Path) -> None:
    # At the end of the mount, so blocking here delays nothing a reader waits for.
    try:
        atomic_write(path, encode(recorder.trace()))
    except OSError as e:
        log.error("could not write the trace to %s: %s", path, e)
    else:
        log.info("trace of %d files written to %s", recorder.files, path)


async def _stored_group(source: Source, manifest: str, name: str | None) -> Group | None:
    """The prefetch group stored beside the image in its registry, if there is one."""
    try:
        with trio.move_on_after(STORED_GROUPS_TIMEOUT):
            data = await find_groups(source, manifest)
            if data is not None:
                doc = decode_groups(data, "prefetch groups stored with the image")
                log.info("prefetching with the groups stored beside %s", manifest)
                return doc.group(name)
    except LazyfsError as e:
        log.info("no usable prefetch groups in the registry: %s", e)
    return None


async def _on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return
