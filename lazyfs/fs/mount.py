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
import stat
from collections.abc import Callable
from pathlib import Path

import msgspec
import pyfuse3
import trio

from lazyfs.errors import LazyfsError
from lazyfs.fs.ops import Operations
from lazyfs.fs.prefetch import Prefetcher, PrefetchStats, landmark_group, load_group
from lazyfs.fs.tree import OPAQUE, WHITEOUT, Node, Tree
from lazyfs.fs.upper import Upper
from lazyfs.image import open_image
from lazyfs.remote.base import Source
from lazyfs.remote.image import open_source
from lazyfs.remote.referrers import find_groups
from lazyfs.store import ChunkCache, LayerStore
from lazyfs.store.atomic import atomic_write
from lazyfs.store.blobs import CachingSource
from lazyfs.store.cache import DEFAULT_MAX_BYTES
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
    # Set-id bits and device nodes of the image take effect only when asked (root only).
    suid: bool = False
    dev: bool = False
    copy_up_max: int | None = None  # bytes one copy-up may write; None: free space decides
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
    handler_errors: int = 0  # FUSE requests that failed unexpectedly (logged; answered EIO)


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


# ---------------------------------------------------------------------------- upper merge


def apply_upper(tree: Tree, upper: Upper) -> None:
    """Merge an existing upper directory (from an earlier mount) into the tree: whiteouts and
    opaque markers hide lower entries, everything else is an upper entry."""
    inodes: dict[tuple[int, int], Node] = {}
    stack: list[Node] = [tree.root]
    # An empty upper directory (a fresh one) has nothing to say about the root: it keeps the
    # image's metadata until something promotes it.
    if upper.listdir(()):
        tree.root.upper = True
        tree.root.entry = None
    while stack:
        dir_node = stack.pop()
        path = dir_node.path()
        assert dir_node.children is not None
        names = upper.listdir(path)
        if OPAQUE in names:
            for name, child in list(dir_node.children.items()):
                if not child.upper:
                    del dir_node.children[name]
                    tree.unlink_name(child, dir_node, name)
        for name in names:
            if Upper.is_temp(name):
                upper.unlink((*path, name))  # an interrupted copy-up: the lower entry stands
            elif name.startswith(WHITEOUT) and name != OPAQUE:
                hidden = name[len(WHITEOUT) :]
                child = dir_node.children.pop(hidden, None)
                if child is not None:
                    tree.unlink_name(child, dir_node, hidden)
        for name in names:
            if Upper.is_marker(name) or Upper.is_temp(name):
                continue
            cst = upper.lstat((*path, name))
            if cst is None:
                continue
            old = dir_node.children.get(name)
            if upper.is_whiteout((*path, name)):  # hides the lower entry of its own name
                if old is not None:
                    del dir_node.children[name]
                    tree.unlink_name(old, dir_node, name)
                continue
            is_dir = stat.S_ISDIR(cst.st_mode)
            if old is not None and old.is_dir and is_dir:
                old.upper = True
                old.entry = None
                stack.append(old)
                continue
            if old is not None:
                del dir_node.children[name]
                tree.unlink_name(old, dir_node, name)
            key = (cst.st_dev, cst.st_ino)
            if not is_dir and cst.st_nlink > 1 and key in inodes:
                tree.add_link(inodes[key], dir_node, name)
                continue
            node = tree.new_node(dir_node, name, None, -1)
            if not is_dir:
                node.children = None
            node.upper = True
            dir_node.children[name] = node
            inodes[key] = node
            if is_dir:
                stack.append(node)


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
    source, ref = open_source(opts.image, plain_http=opts.plain_http, insecure=opts.insecure)
    try:
        cache = ChunkCache(opts.cache, opts.cache_max_bytes)
        source = CachingSource(source, cache.dir / "documents")
        image = await open_image(source, ref, platform=opts.platform, toc_dir=cache.dir / "tocs")
        store = LayerStore(cache)
        layers = [
            store.add_layer(li.descriptor.digest, source, li.toc, li.descriptor.size)
            for li in image.layers
        ]
        tree = Tree.from_layers([li.toc for li in image.layers])
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

        ops = Operations(
            tree, store, layers, upper, listener=recorder, copy_up_max=opts.copy_up_max
        )

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
                            li.descriptor.digest,
                            len(li.toc.entries),
                            msgspec.to_builtins(layer.stats),
                        )
                        for li, layer in zip(image.layers, layers, strict=True)
                    ],
                    prefetch=prefetcher.stats if prefetcher is not None else None,
                    handler_errors=ops.handler_errors,
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
        # An image's set-id binaries and device nodes would serve any host user who can
        # reach the mount: off unless asked for (a container runtime asks).
        fuse_options.add("suid" if opts.suid else "nosuid")
        fuse_options.add("dev" if opts.dev else "nodev")
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
            with trio.CancelScope(shield=True):
                await store.aclose()
            if upper is not None:
                upper.close()
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


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
