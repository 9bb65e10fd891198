"""Mount lifecycle: open the image, build the tree, serve FUSE, answer the control socket.

The daemon is ready (and says so through ``ready``) once manifests and TOCs are read; no file
content is fetched before a reader asks, unless ``--prefetch`` names a group to fetch in the
background from then on.  Layers without a TOC are fetched whole in the background from then
on too: the tree is built when the last of them is indexed, and requests wait for it
(:mod:`lazyfs.fs.pending`).  A small control socket per mount answers ``stats``, ``info`` and
``trace`` as one JSON line each way, so ``lazyfs stats`` needs no file inside the container's
rootfs.  With ``--trace FILE`` a recorder listens to opens and reads, and the trace is written
atomically when the mount ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pyfuse3
import trio

from lazyfs.atomic import atomic_write
from lazyfs.delta.provider import PendingDeltas, pending_deltas
from lazyfs.errors import LazyfsError
from lazyfs.fs.control import (
    LayerReport,
    MountInfo,
    ReadyReport,
    StatsReport,
    control_listener,
    control_server,
)
from lazyfs.fs.fastpath import FastPath
from lazyfs.fs.merge import apply_upper
from lazyfs.fs.neededlibs import NeededLibs
from lazyfs.fs.ops import Operations, c_reader_counts, cache_symlinks, start_c_reader
from lazyfs.fs.pending import PendingOperations
from lazyfs.fs.prefetch import (
    LOOKUP_WAIT_MIN,
    STARTUP_GROUP,
    Prefetcher,
    PrefetchGate,
    landmark_group,
    load_group,
)
from lazyfs.fs.runtime import control_path
from lazyfs.fs.tree import ROOT_INO, Tree
from lazyfs.fs.unmount import is_mounted, is_stale, mount_device, unmount
from lazyfs.fs.upper import Upper
from lazyfs.heap import serving_thresholds
from lazyfs.opener import OpenedImage, open_image
from lazyfs.process import rss_bytes
from lazyfs.remote.registry import RetryPolicy, receive_wide
from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES
from lazyfs.store.layerstate import Layer
from lazyfs.store.stats import LayerStats
from lazyfs.store.wholelayer import WholeFetch
from lazyfs.trace.recorder import Recorder
from lazyfs.trace.schema import Group, encode

log = logging.getLogger(__name__)

# The longest a mount whose prefetch group is known at open waits for the prefetch's first
# requests to be sent before it builds its tree (a synchronous stretch of CPU).
EARLY_SEND_WAIT = 0.05

# How long an unmounted daemon lets requests already on their way land (LayerStore.drain):
# below the snapshotter's STOP_WAIT, which a chain's start gives daemons being stopped.
UNMOUNT_DRAIN = 1.0

# How long after readiness the collector's full passes stay off (see _no_full_collections).
GC_HOLD = 10.0


class MountOptions(msgspec.Struct, kw_only=True):
    image: str
    mountpoint: str
    upper: str | None = None
    cache: str | None = None
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    plain_http: bool = False
    insecure: bool = False
    hosts_dir: str | None = None  # containerd-style hosts.toml directory: mirrors
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
    prefetch_from: str = "auto"  # auto prefetch's source: auto, groups or landmark
    # Without a document: look for groups stored beside the image in the registry, then for
    # landmarks in re-laid-out layers.  False fetches nothing before it is read.
    auto_prefetch: bool = True
    deltas: bool = True  # use binary patches stored beside the image against chunks held
    layer_count: int | None = None  # mount only the lowest N layers (a snapshotter chain)
    docker_config: str | None = None  # credentials file; None = the user's default
    read_timeout: float = 30.0  # a fetch that gets no bytes ends (EIO) within this
    log: str | None = None  # where the daemon logs (reported by stats)


# ---------------------------------------------------------------------------- serving


class _Mount:
    """What one mount holds while it serves, and the control requests it answers."""

    def __init__(
        self,
        opts: MountOptions,
        mountpoint: str,
        image: OpenedImage,
        upper: Upper | None,
        recorder: Recorder | None,
        prefetcher: Prefetcher | None,
        *,
        build: bool = True,
        follow: bool = False,
    ) -> None:
        self.opts = opts
        self.mountpoint = mountpoint
        self.image = image
        self.upper = upper
        self.recorder = recorder
        self.prefetcher = prefetcher
        self.group: Group | None = None  # the prefetch group, while layers are pending
        self.gate: PrefetchGate | None = None  # holds readers until the prefetch is sent
        self.deltas: PendingDeltas | None = None  # binary deltas being looked up, if any
        self.settled = False  # fetch_ahead is over: what start-up left behind is freed
        self.tree = Tree()
        # The libraries an ELF file read names, fetched before the loader asks (no groups).
        self.needed = NeededLibs(image.store, self.tree, []) if follow else None
        self.ops: Operations | None = None  # early ones (over part of the tree) until built
        self.pending: PendingOperations | None = None
        self._built = False
        self._broken: LazyfsError | None = None
        # The layers the tree holds are those from this index up (the rest come beneath).
        self._first = len(image.descriptors)
        if not image.is_complete:
            self._build_early()
        elif build:
            self._build()

    def _operations(self, layers: list[Layer]) -> Operations:
        ops = Operations(
            self.tree,
            self.image.store,
            layers,
            self.upper,
            listener=self.recorder,
            copy_up_max=self.opts.copy_up_max,
        )
        if self.needed is not None:
            self.needed.layers = ops.layers  # the same list: _build updates it in place
            ops.needed = self.needed
        return ops

    def _build_early(self) -> None:
        """The tree of the layers above the topmost pending one, and operations over it
        that answer what those layers settle (:mod:`lazyfs.fs.pending`)."""
        if self.upper is not None and self.upper.listdir(()):
            return  # an earlier mount's upper directory: its whiteouts need the whole tree
        above = self.image.layers_above_pending()
        if not above:
            return
        self._first = len(self.image.descriptors) - len(above)
        self.tree.add_beneath([ol.toc for ol in above], self._first)
        # No node of a layer below ``_first`` exists before they are added (and these slots
        # replaced): the top one stands in for them meanwhile.
        layers = [above[-1].layer] * self._first + [ol.layer for ol in above]
        self.ops = self._operations(layers)

    def _build(self) -> Operations:
        """The tree and its operations, once every layer is indexed: the layers not in the
        tree yet are added beneath it, so inode numbers handed out early stay."""
        if self._broken is not None:
            raise self._broken
        if not self._built:
            image = self.image
            early = self.tree.next_ino if self.ops is not None else 0
            try:
                self.tree.add_beneath([ol.toc for ol in image.layers[: self._first]], 0)
                self.tree.finish(lower_paths=self.upper is not None)
            except LazyfsError as e:
                # A lower layer's TOC is bad (a hardlink to nowhere): the tree is half built,
                # so nothing is answered from it any more, early or not.
                self._broken = e
                if self.pending is not None:
                    self.pending.early = None
                raise
            if self.upper is not None:
                apply_upper(self.tree, self.upper)
            layers = image.store_layers()
            if self.ops is None:
                self.ops = self._operations(layers)
            else:
                self.ops.layers[:] = layers
                if self.ops.copy is not None:
                    self.ops.copy.layers[:] = layers
                _forget_dir_attrs(self.tree, early)
            if self.pending is not None:  # serving already: pyfuse3 called the stand-in's init
                self.ops.init()
            self._built = True
        assert self.ops is not None
        return self.ops

    async def operations(self) -> Operations:
        """:meth:`_build` after waiting for the layers fetched in the background."""
        await self.image.complete()
        return self._build()

    def fuse_operations(self) -> Operations | PendingOperations:
        """What pyfuse3 serves: the operations, or their stand-in while layers are pending."""
        if self._built:
            assert self.ops is not None
            return self.ops
        self.pending = PendingOperations(self.operations, self.ops)
        return self.pending

    def hold_readers(self, deltas: PendingDeltas | None) -> None:
        """Before readiness: when something may be prefetched, readers that miss the cache
        wait (briefly) for its first requests, whose chunks they then join."""
        if self.prefetcher is None and self.group is None and not self.opts.auto_prefetch:
            return
        groups = self.image.groups
        if groups is not None and self.prefetcher is None and self.group is None:
            # Still looking for stored groups: a reader waits for that about one request.
            wait = max(groups.request_time, LOOKUP_WAIT_MIN)
            self.gate = PrefetchGate(deltas, known=groups.done, lookup_wait=wait)
        else:
            self.gate = PrefetchGate(deltas)
        self.image.store.provider = self.gate

    async def fetch_ahead(self, deltas: PendingDeltas | None) -> None:
        """After readiness (or, when the group is known at open, before the tree is built):
        look for binary deltas beside the image (readers that miss the cache meanwhile wait
        for the answer) and, at the same time, for what to prefetch; prefetch, using the
        deltas.  Readers wait for the prefetch's first requests (at most
        :data:`~lazyfs.fs.prefetch.GATE_WAIT`).  Then keep the fetched TOCs."""
        self.deltas = deltas
        try:
            await self._fetch_ahead()
        finally:
            deltas = self.deltas  # made by _fetch_ahead when the layers came in the background
            gate = self.gate
            if gate is not None:
                gate.open()
                if self.image.store.provider is gate:
                    self.image.store.provider = gate.inner
                    if deltas is not None and deltas.done.is_set():
                        self.image.store.provider = deltas.provider
        # Off the start's path (the prefetch is done, or there was none): the fetched TOCs
        # into the TOC cache, for the next mount.
        await self.image.save_tocs()
        self.settled = True

    async def _fetch_ahead(self) -> None:
        deltas = self.deltas
        if not self.image.is_complete:
            # Layers fetched in the background: deltas and prefetch need their TOCs.
            try:
                await self.operations()
            except LazyfsError:
                return  # the layer is fetched again on the next access; prefetch is a bonus
            deltas = self.deltas = pending_deltas(self.image) if self.opts.deltas else None
            if self.gate is not None:
                self.gate.inner = deltas
                self.image.store.provider = self.gate
            if self.group is not None:
                layers = self.image.store_layers()
                self.prefetcher = Prefetcher(self.image.store, layers, self.group)
        async with trio.open_nursery() as nursery:
            if deltas is not None:
                nursery.start_soon(deltas.look)
            if self.prefetcher is not None:
                nursery.start_soon(self._prefetch, self.prefetcher)
            elif self.opts.auto_prefetch:
                nursery.start_soon(self.auto_prefetch)

    async def _prefetch(self, prefetcher: Prefetcher) -> None:
        await self._run(prefetcher)
        if self.image.groups is not None:
            await self.image.groups.refresh()  # the kept groups, once old: off the start-up

    async def auto_prefetch(self) -> None:
        """Without a groups document: the group stored beside the image, else the layers'
        landmarks (``prefetch_from`` "auto"; "groups" or "landmark": only that one).  Runs
        after readiness; the stored groups were looked up beside the TOC fetch."""
        image, layers, source = self.image, self.image.store_layers(), self.opts.prefetch_from
        group = None
        if source in ("auto", "groups") and image.groups is not None:
            group = await image.groups.wait()  # looked up since the manifest came
        if group is None and source in ("auto", "landmark"):
            group = landmark_group(layers)
        if self.needed is not None and group is not None and group.name != STARTUP_GROUP:
            self.needed.stop()  # the group covers the start-up
        if group is None:
            if self.gate is not None:
                self.gate.open()  # nothing to wait for
            return
        self.prefetcher = Prefetcher(image.store, layers, group)
        await self._run(self.prefetcher)

    async def _run(self, prefetcher: Prefetcher) -> None:
        """Run the prefetch; readers the gate holds go once its first requests are on their
        way (chunks an adopted early range brings never ask the gate, which would open it)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            await prefetcher.sent.wait()
            if self.gate is not None:
                self.gate.open()

    def handle(self, request: dict[str, object]) -> object:
        """One control request (see :mod:`lazyfs.fs.control`)."""
        opts, image = self.opts, self.image
        if request.get("cmd") == "info":
            upper = os.path.abspath(opts.upper) if self.upper is not None and opts.upper else None
            return MountInfo(
                pid=os.getpid(),
                image=opts.image,
                mountpoint=self.mountpoint,
                manifest=image.manifest,
                upper=upper,
            )
        if request.get("cmd") == "stats":
            by_digest = {ol.descriptor.digest: ol for ol in image.layers}
            reports = []
            for desc in image.descriptors:
                ol = by_digest.get(desc.digest)  # None: still fetched in the background
                reports.append(
                    LayerReport(
                        desc.digest,
                        len(ol.toc.entries) if ol is not None else 0,
                        msgspec.to_builtins(
                            ol.layer.stats if ol is not None else LayerStats(blob=desc.digest)
                        ),
                        image.whole.report(desc.digest),
                    )
                )
            return StatsReport(
                image=opts.image,
                manifest=image.manifest,
                mountpoint=self.mountpoint,
                files=len(self.tree.nodes),
                layers=reports,
                prefetch=self.prefetcher.stats if self.prefetcher is not None else None,
                needed=self.needed.stats if self.needed is not None else None,
                handler_errors=self.ops.handler_errors if self.ops is not None else 0,
                pid=os.getpid(),
                rss_bytes=rss_bytes(os.getpid()) or 0,
                cache=image.cache.du(),
                requests=dict(self.ops.requests) if self.ops is not None else {},
                c_requests=c_reader_counts(),
                answered_early=self.pending.answered_early if self.pending is not None else 0,
                waited_for_layers=self.pending.waited if self.pending is not None else 0,
                settled=self.settled,
                log=opts.log,
            )
        if request.get("cmd") == "trace":
            if self.recorder is None:
                raise LazyfsError("this mount is not recording (mount it with --trace FILE)")
            return self.recorder.summary() if request.get("summary") else self.recorder.trace()
        raise LazyfsError(f"unknown command {request.get('cmd')!r}")

    def write_trace(self, path: Path) -> None:
        # At the end of the mount, so blocking here delays nothing a reader waits for.
        assert self.recorder is not None
        try:
            atomic_write(path, encode(self.recorder.trace()))
        except OSError as e:
            log.error("could not write the trace to %s: %s", path, e)
        else:
            log.info("trace of %d files written to %s", self.recorder.files, path)


def _forget_dir_attrs(tree: Tree, below: int) -> None:
    """Drop the kernel's attributes of the directories answered before the lower layers were
    added (inode numbers below ``below``): their link counts count subdirectories."""
    for ino in range(ROOT_INO, below):
        node = tree.nodes.get(ino)
        if node is not None and node.is_dir and (node.lookups > 0 or ino == ROOT_INO):
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, attr_only=True)


def _fuse_options(opts: MountOptions) -> set[str]:
    # The mount table shows fsname as the source: the image (commas would split the option).
    fsname = "".join("_" if c in ", \t\n\\" else c for c in opts.image)
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=lazyfs"}
    if opts.allow_other:
        options.add("allow_other")
    if opts.read_only:
        options.add("ro")
    # An image's set-id binaries and device nodes would serve any host user who can
    # reach the mount: off unless asked for (a container runtime asks).
    options.add("suid" if opts.suid else "nosuid")
    options.add("dev" if opts.dev else "nodev")
    return options


# The kernel reads ahead of a FUSE file at most what the mount's bdi allows, 128 KiB unless
# raised: an interpreter's or a library's pages then arrive in 128 KiB requests, each a round
# trip through the daemon.  A request can carry 1 MiB (libfuse's max_pages), so a window of
# that size costs one.
READ_AHEAD_KB = 1024


def _after_init(ops: Operations | PendingOperations, then: Callable[[], None]) -> None:
    """Call ``then`` once the kernel has taken the daemon's answer to its INIT request, before
    any other request is served: ``ops.init`` runs just before that answer is written (the
    kernel applies it in that write), and ``then`` runs as soon as the handler yields."""
    first = ops.init
    done = False

    def init() -> None:
        nonlocal done
        first()
        if not done:
            done = True
            trio.lowlevel.current_trio_token().run_sync_soon(then)

    ops.init = init  # type: ignore[method-assign]


def _widen_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead READ_AHEAD_KB on this mount.  After INIT: the kernel lowers
    the window to the daemon's max_readahead there, which libfuse caps at what the kernel
    offered, 128 KiB.  Needs root; without it, the default."""
    # A run_sync_soon callback that raises would take the whole loop down: nothing escapes.
    try:
        device = mount_device(mountpoint)
        if device is None:
            return
        with open(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except (OSError, ValueError) as e:
        log.debug("read-ahead left at the kernel's default: %s", e)


async def serve(
    opts: MountOptions,
    ready: Callable[[ReadyReport], None] | None = None,
    progress: Callable[[WholeFetch], None] | None = None,
) -> None:
    """Mount and serve until unmounted or signalled.  Raises LazyfsError before ``ready``.
    ``progress`` hears of the whole-layer downloads made before it."""
    thresholds = _no_full_collections()
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
    if not opts.read_only and opts.upper is None:
        raise LazyfsError("a writable mount needs --upper DIR (or use --read-only)")
    if opts.read_only and opts.upper is not None:
        raise LazyfsError("--upper and --read-only contradict each other: give one of them")
    tree_built = trio.Event()
    async with open_image(
        opts.image,
        cache_dir=opts.cache,
        cache_size=opts.cache_max_bytes,
        plain_http=opts.plain_http,
        insecure=opts.insecure,
        hosts_dir=opts.hosts_dir,
        platform=opts.platform,
        docker_config=opts.docker_config,
        layer_count=opts.layer_count,
        retry=RetryPolicy.within(opts.read_timeout),
        entry_tables=True,  # the tree keeps entry indices, not 100k entries
        progress=progress,
        background=True,
        stored_groups=groups is None
        and opts.auto_prefetch
        and opts.prefetch_from in ("auto", "groups"),
        group=opts.group,
        referrers=opts.deltas,  # the deltas lookup's listing, beside the TOC's fetch
        # A re-laid-out layer's start-up bytes, beside its TOC (prefetched unless told not).
        early_ranges=opts.auto_prefetch,
        # A groups document given: its group's byte ranges go beside the TOCs too.
        group_ranges=groups[1] if groups is not None else None,
        # What early ranges brought while the TOCs came is decoded once the tree is built:
        # no reader can ask for it sooner, and the two competed for the CPU (ready later).
        hold_early=tree_built,
    ) as image:
        if serving_thresholds():
            receive_wide()  # its large reads' buffers now stay in the heap
        upper = Upper(opts.upper) if not opts.read_only and opts.upper is not None else None
        if upper is not None:
            _lock_upper(upper, opts.upper)
        recorder: Recorder | None = None
        if trace_path is not None:
            digests = [d.digest for d in image.descriptors]
            recorder = Recorder(opts.image, image.manifest, digests, opts.group or "default")
        prefetcher: Prefetcher | None = None
        group: Group | None = None
        if groups is not None:
            doc, group = groups
            if doc.manifest and doc.manifest != image.manifest:
                log.info("prefetch groups were made for %s; matching by layer", doc.manifest)
        elif image.groups is not None and image.groups.done.is_set():
            # Groups an earlier mount found beside the image, or the lookup begun with the
            # manifest already answered: the prefetch starts with the mount.
            group = image.groups.group
        if (
            group is None
            and groups is None
            and image.is_complete
            and opts.auto_prefetch
            and opts.prefetch_from in ("auto", "landmark")
            and (image.groups is None or image.groups.done.is_set())
        ):
            # Nothing stored beside the image (its lookup has answered): a re-laid-out
            # layer's landmark, known from its TOC, is prefetched from the start as well.
            # The start-up landmarks wait for readiness: sent before it, their decoding
            # delayed the tree (ready +0.15-0.3 s at load 7) for files read only after the
            # program's own first miss.
            group = landmark_group(image.store_layers(), startup=False)
        if group is not None and image.is_complete:
            prefetcher = Prefetcher(image.store, image.store_layers(), group)
        # The group known, and every layer's TOC: the prefetch's requests go out before the
        # tree is built, and travel while it is (on a slow link the transfer is most of a
        # cold start; the tree takes tens of milliseconds of CPU).
        early = prefetcher is not None and image.side is not None
        follow = (
            group is None
            and groups is None
            and opts.auto_prefetch
            and opts.prefetch_from in ("auto", "landmark")
        )
        mount = _Mount(
            opts, mountpoint, image, upper, recorder, prefetcher, build=not early, follow=follow
        )
        mount.group = group if prefetcher is None else None
        deltas = pending_deltas(image) if opts.deltas else None
        early_scope = trio.CancelScope()
        if early:
            assert image.side is not None
            mount.hold_readers(deltas)

            async def fetch_early() -> None:
                with early_scope:  # ends with the mount, as the nursery's tasks below do
                    await mount.fetch_ahead(deltas)

            image.side.start_soon(fetch_early)
            assert prefetcher is not None
            await _until_sent(prefetcher)
            await mount.operations()  # the tree, built while those requests travel
        # Resolve the control socket path now: after init, touching the mount point from this
        # process would wait for a FUSE reply only this process can give (canonical() does
        # not touch it either, but the order keeps that property obvious).
        control = control_path(mountpoint)
        fuse_ops = mount.fuse_operations()
        fast = FastPath(fuse_ops)
        initialized = trio.Event()

        def after_init() -> None:
            _widen_read_ahead(mountpoint)
            fast.enable()  # after: no request is answered before the read-ahead is widened
            initialized.set()

        _after_init(fuse_ops, after_init)
        tree_built.set()
        cache_symlinks()
        if isinstance(fuse_ops, Operations):  # every layer in: what their files hold is known
            fuse_ops.no_capability(upper is None or not upper.listdir(()))
        pyfuse3.init(fuse_ops, mountpoint, _fuse_options(opts))
        closed = False
        try:
            start_c_reader()
            # Fetches started by readers live in their own nursery: at unmount the control
            # socket and background fill are cancelled, but chunks already on their way are
            # still verified and written to the cache.
            async with image.store.running(), trio.open_nursery() as nursery:
                # Bound here, served by a task: ready is said without a checkpoint between
                # (one lets every task run first: the prefetch's streams, the early ranges'
                # decodes), and a client's first request waits in the socket's backlog.
                listener = control_listener(control)
                nursery.start_soon(control_server, listener, control, mount.handle)
                if opts.background_fetch:
                    image.store.background(nursery)
                nursery.start_soon(_on_signals, lambda: not closed)
                image.start_background(nursery)  # layers without a TOC: fetched from now on
                if recorder is not None:
                    recorder.start()
                if mount.needed is not None:
                    nursery.start_soon(mount.needed.run)
                if not early:
                    mount.hold_readers(deltas)
                    nursery.start_soon(_after, initialized, mount.fetch_ahead, deltas)
                nursery.start_soon(_full_collections_after, GC_HOLD, thresholds)
                if ready is not None:
                    plain = [d.mediaType for d in image.plain_descriptors()]
                    ready(ReadyReport(len(image.descriptors), plain))
                with fast.serving():
                    await pyfuse3.main(min_tasks=4, max_tasks=64)
                # The mount goes before the drain: after a signal it was still up, and its
                # requests (a container's, say) waited through the drain for nothing, then
                # failed anyway.  Closing the FUSE device aborts the connection: they fail at
                # once (ENOTCONN), as they would have after an unmount.
                closed = True
                pyfuse3.close(unmount=True)
                # Unmounted: what is on its way lands in the cache for the next mount.
                await image.store.drain(UNMOUNT_DRAIN)
                nursery.cancel_scope.cancel()
        finally:
            early_scope.cancel()
            if not closed:
                pyfuse3.close(unmount=True)
            if trace_path is not None:
                mount.write_trace(trace_path)
            if upper is not None:
                upper.close()


def _no_full_collections() -> tuple[int, int, int]:
    """Keep the collector's full passes off the start (until :func:`_full_collections_after`);
    the thresholds to restore.

    Start-up makes tens of thousands of long-lived objects (the tree's nodes, trio's and
    httpx's state) and full passes went over all of them while the mount was built and while
    its first program started: 13 ms within the tree's build and 36 ms amid the start-up's
    reads on the Debian image (gc callbacks, traced).  Young generations are still collected,
    and nothing is frozen (a fork server's frozen imports stay as they are, shared)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
    return thresholds


async def _full_collections_after(delay: float, thresholds: tuple[int, int, int]) -> None:
    await trio.sleep(delay)
    gc.set_threshold(*thresholds)


async def _after(
    initialized: trio.Event,
    fn: Callable[[PendingDeltas | None], Awaitable[None]],
    deltas: PendingDeltas | None,
) -> None:
    """``fn(deltas)`` once the kernel has the answer to its INIT request.  What runs after
    readiness (the deltas' and groups' lookups, the start-up group: 10-20 ms of CPU on the
    Debian image) ran before pyfuse3 read INIT, and the mount's first request waited for it
    (the kernel sends none before INIT is answered).  A reader that misses the cache still
    waits for the prefetch's first requests (the gate), not for INIT."""
    await initialized.wait()
    await fn(deltas)


async def _until_sent(prefetcher: Prefetcher) -> None:
    """Return once the prefetch's first requests are on their way (their headers written),
    or after EARLY_SEND_WAIT: the deltas lookup it waits for, or a slow connection, must not
    delay the mount."""
    with trio.move_on_after(EARLY_SEND_WAIT):
        await prefetcher.sent.wait()


def _lock_upper(upper: Upper, path: str | None) -> None:
    """One mount per upper directory: two would disagree about what exists.  The lock is on
    the directory itself (no file in the layer diff) and goes with the daemon, even a killed
    one."""
    try:
        fcntl.flock(upper.root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        upper.close()
        raise LazyfsError(f"upper directory {path} is in use by another mount") from None


async def _on_signals(session_open: Callable[[], bool]) -> None:
    """The first signal ends the FUSE main loop.  One that comes once the session is closed
    (an unmounted daemon draining) is let be: the drain ends within its bound, and
    ``pyfuse3.terminate`` on a closed session dereferences its NULL session (SIGSEGV)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            if not session_open():
                log.info("signal received: unmounted already, the drain ends soon")
                return
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return
