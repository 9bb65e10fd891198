"""Lazy layers: TOCs at Prepare, one lazyfs mount daemon per chain of lazy layers.

Prepare of a layer whose labels name its image: the image's manifest is resolved (by digest
when the labels give one), the layer found in it, and the TOCs of every layer up to it read
through the opener's machinery (footer + TOC, cached beside the chunk cache); then the
snapshot is committed as remote.  What mounting it needs later (the image by manifest digest,
the layer's index, its descriptor) goes into the metadata, so no tag is ever looked up again.

A container's lazy layers are one read-only ``lazyfs mount HOST/REPO@DIGEST --layers N``
(the lowest N layers of that manifest, merged), the lowerdir under the container's own kernel
overlay upper.  Every container over the same chain shares that mount and its daemon.
Daemons are separate processes in their own session, started with :func:`lazyfs.fs.daemon.spawn`
and recorded in the ``daemons`` table; after a snapshotter restart they are found again with
:func:`lazyfs.fs.daemon.attach` (``expect_pid``: never another process).  A daemon that dies
is noticed (on use and by :meth:`LazyLayers.check`), its stale mount detached, and the next
user gets a new daemon on the same mount point.

Locks: a chain's start (registry lookups included) and stop run under that chain's own lock
(:class:`~lazyfs_snapshotter.locks.ChainLocks`, shared with the snapshotter), never under one
that other chains need; the metadata store's lock is held only for its quick transactions.
A chain used again while its old daemon is still stopping waits for that daemon to end and
then gets a new one: both on one mount point (and one control socket) would not do.  Any
chain's start waits (STOP_WAIT at most) for the daemons being stopped: they write what they
hold in memory to the shared cache as they go.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import trio

from lazyfs.errors import LazyfsError, first_error
from lazyfs.formats.toc import TocBudget
from lazyfs.fs.daemon import Daemon, attach, clear_mountpoint, spawn
from lazyfs.fs.forkserver import ForkServer
from lazyfs.fs.runtime import control_path, runtime_dir
from lazyfs.remote.reference import parse_reference
from lazyfs.remote.resolve import ResolvedImage, open_source, resolve_image
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.documents import CachingSource
from lazyfs.store.tocs import load_layer

from .config import Config
from .errors import FailedPrecondition
from .locks import ChainLocks
from .metadata import DaemonRow, MetadataStore, PendingRef, RemoteLayerRow
from .remote import Chain, Readiness, RemoteSource, by_digest, chain_id

log = logging.getLogger(__name__)

# Reading a layer's TOC (and those below it) must not hold containerd's unpack forever.
PREPARE_TIMEOUT = 60.0
# A daemon is ready once it has read its (cached) TOCs; this bounds a hung start.
SPAWN_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# A daemon writes the chunks it still holds in memory (a start-up prefetch's wait for a pause in
# reads: lazyfs.store.layerstore.WRITE_IDLE_SECONDS) to the shared cache as it stops.  A daemon
# started meanwhile would fetch them again: v2 of an image started as v1's container ends found
# neither v1's libraries nor the basis of its binary deltas.  So a start waits for the stops
# under way, this long at most: a hung one holds other chains up no longer.
STOP_WAIT = 2.0


def _one_line(e: BaseException) -> str:
    e = first_error(e)  # the cause, not trio's nursery group around it
    text = str(e).strip().splitlines()
    if isinstance(e, LazyfsError):
        return text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {text[0] if text else ''}"


class NotThisChain(LazyfsError):
    """The image the registry answered with does not hold the chain's layers where it must."""


class LazyLayers:
    """The :class:`~lazyfs_snapshotter.remote.LayerFS` that serves lazy layers with lazyfs."""

    name = "lazyfs"

    def __init__(self, root: Path, config: Config, hosts_dir: Path | None) -> None:
        self.root = root
        self.mnt_dir = root / "mnt"
        self.config = config
        self.hosts_dir = hosts_dir
        self.cache_dir = config.cache_path(root)
        self._store: MetadataStore | None = None
        self._live: dict[int, Daemon] = {}  # daemon row id → its live daemon
        # One start or stop of a chain at a time: two containers of one image must share one
        # daemon.  Replaced by the snapshotter's at start(), which it holds around its calls.
        self.chains = ChainLocks()
        self._cache: ChunkCache | None = None
        self._cache_lock = threading.Lock()  # a Prepare never waits for a spawn
        self._forks: ForkServer | None = None  # daemons are forked from it when it runs
        self._stops: set[threading.Event] = set()  # one per daemon being stopped, set once gone
        self._stops_lock = threading.Lock()

    # -- set-up ----------------------------------------------------------------------
    @property
    def store(self) -> MetadataStore:
        if self._store is None:
            raise RuntimeError("LazyLayers.start() was not called")
        return self._store

    def start(self, store: MetadataStore, chains: ChainLocks | None = None) -> None:
        self._store = store
        # Not ``chains or``: a ChainLocks holding nothing is falsy (its __len__).
        self.chains = chains if chains is not None else self.chains
        # Mount points are reachable by root only: ROOT is 0700, and so is this.
        self.mnt_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.mnt_dir, 0o700)
        self._start_fork_server()
        with store.transaction() as tx:
            rows = tx.daemons()
        for row in rows:
            if row.pid == 0:
                continue
            try:
                self._live[row.id] = attach(row.mountpoint, expect_pid=row.pid)
            except (LazyfsError, OSError) as e:
                log.warning("daemon of chain %s (pid %d) is gone: %s", row.chain_id, row.pid,
                            _one_line(e))
                self._forget(row)
            else:
                log.info("re-attached daemon pid %d on %s", row.pid, row.mountpoint)

    def _start_fork_server(self) -> None:
        """Start the daemons' fork server (no grpc, no threads: not this process forked).
        Without one, each daemon starts a new interpreter; nothing else changes."""
        if not self.config.fork_server:
            return
        # Under the runtime directory: a socket path must be short, ROOT may not be.
        key = hashlib.sha256(os.fsencode(os.path.abspath(self.root))).hexdigest()[:16]
        try:
            self._forks = ForkServer.start(runtime_dir() / f"forks-{key}.sock",
                                           log=self.root / "forks.log")  # fmt: skip
        except (LazyfsError, OSError) as e:
            log.warning("no fork server (daemons start as new processes): %s", _one_line(e))
        else:
            log.debug("fork server pid %d on %s", self._forks.pid, self._forks.socket)

    def _chunk_cache(self) -> ChunkCache:
        with self._cache_lock:
            if self._cache is None:
                self._cache = ChunkCache(self.cache_dir, self.config.cache_size)
            return self._cache

    def _registry_flags(self, image_ref: str) -> tuple[bool, bool]:
        host = parse_reference(image_ref).host
        reg = self.config.registry
        return host in reg.plain_http, host in reg.insecure

    # -- Prepare ---------------------------------------------------------------------
    def prepare(self, source: RemoteSource, depth: int) -> Readiness:
        try:
            record = trio.run(self._prepare, source, depth)
        except Exception as e:  # any failure means a normal pull, never a failed one
            return Readiness(False, _one_line(e))
        return Readiness(True, record=record)

    @contextlib.asynccontextmanager
    async def _source(self, source: RemoteSource) -> AsyncIterator[tuple[CachingSource, str]]:
        """The image's registry (documents through the cache) and the tag its reference names."""
        plain_http, insecure = self._registry_flags(source.image_ref)
        cache = await trio.to_thread.run_sync(self._chunk_cache)
        raw, tag = open_source(
            source.image_ref, plain_http=plain_http, insecure=insecure,
            hosts_dir=self.hosts_dir, docker_config=self.config.registry.docker_config,
        )
        src = CachingSource(raw, cache.documents_dir)
        try:
            yield src, tag
        finally:
            with trio.CancelScope(shield=True):
                await src.aclose()

    async def _resolve(
        self, src: CachingSource, tag: str, source: RemoteSource, depth: int
    ) -> tuple[ResolvedImage, int]:
        """The image's manifest and the layer's index in it, which must be ``depth - 1``."""
        # By digest when CRI gives it: the manifest then comes from the document cache.
        resolved = await resolve_image(src, source.manifest_digest or tag)
        digests = [d.digest for d in resolved.layers]
        if source.layer_digest not in digests:
            raise NotThisChain(f"layer {source.layer_digest} is not in "
                              f"{source.image_ref} ({resolved.manifest_digest})")
        index = digests.index(source.layer_digest)
        if index + 1 != depth:
            raise NotThisChain(f"layer {index + 1} of the image is layer {depth} of "
                              "its snapshot chain")
        return resolved, index

    def _by_digest(self, source: RemoteSource, resolved: ResolvedImage) -> str:
        return by_digest(source.image_ref, resolved.manifest_digest)

    async def _prepare(self, source: RemoteSource, depth: int) -> RemoteLayerRow:
        cache = await trio.to_thread.run_sync(self._chunk_cache)
        try:
            with trio.fail_after(PREPARE_TIMEOUT):
                async with self._source(source) as (src, tag):
                    resolved, index = await self._resolve(src, tag, source, depth)
                    # The chain's mount opens the lowest `depth` layers of this manifest, so
                    # every one of them must be lazy here (those below were read before: from
                    # cache).
                    budget = TocBudget()  # bounds the chain's TOCs together, as a mount does
                    async with trio.open_nursery() as nursery:
                        for desc in resolved.layers[:depth]:
                            nursery.start_soon(
                                functools.partial(load_layer, budget=budget), src, desc,
                                cache.tocs_dir)
        except trio.TooSlowError:
            raise LazyfsError(f"TOCs not read in {PREPARE_TIMEOUT:.0f}s") from None
        desc = resolved.layers[index]
        return RemoteLayerRow(
            image_ref=self._by_digest(source, resolved),
            manifest_digest=resolved.manifest_digest,
            layer_index=index,
            descriptor=msgspec.json.encode(desc).decode(),
        )

    def _looked_up(self, chain: Chain, pending: PendingRef) -> str | None:
        """``pending``'s image by digest, once its registry confirms it holds the chain's top
        layer at the chain's depth (recorded in remote_refs); None when it cannot say so."""
        source = RemoteSource(chain.chain_id, pending.image_ref, pending.layer_digest, (),
                              pending.manifest_digest or None, "pending")  # fmt: skip
        depth = chain.top.layer_index + 1

        async def by_digest() -> str:
            with trio.fail_after(PREPARE_TIMEOUT):
                async with self._source(source) as (src, tag):
                    resolved, _ = await self._resolve(src, tag, source, depth)
            # The same top layer is not enough: a tag looked up this late may name a rebuild
            # over another base, whose files the chain's name must not serve.
            if chain_id(resolved.config.rootfs.diff_ids[:depth]) != chain.chain_id:
                raise NotThisChain(f"its lowest {depth} layers are not the chain's")
            return self._by_digest(source, resolved)

        try:
            ref = trio.run(by_digest)
        except Exception as e:  # the next way to mount the chain is tried
            log.warning("cannot mount chain %s from %s: %s", chain.chain_id,
                        pending.image_ref, _one_line(e))  # fmt: skip
            if isinstance(e, NotThisChain):  # the registry said so: not worth asking again
                with self.store.transaction() as tx:
                    tx.drop_pending_ref(chain.snap_id, pending)
            return None
        with self.store.transaction() as tx:
            tx.add_remote_ref(chain.snap_id, ref)
            tx.drop_pending_ref(chain.snap_id, pending)
        return ref

    # -- mounts ----------------------------------------------------------------------
    def _mountpoint(self, chain_id: str) -> Path:
        return self.mnt_dir / hashlib.sha256(chain_id.encode()).hexdigest()[:16]

    def _alive(self, row: DaemonRow) -> bool:
        daemon = self._live.get(row.id)
        if row.pid == 0 or daemon is None or daemon.pid != row.pid:
            return False
        return daemon.alive()

    def mount(self, chain: Chain) -> tuple[int, Path]:
        with self.chains.hold(chain.chain_id):
            with self.store.transaction() as tx:
                row = tx.daemon(chain.chain_id)
            if row is not None and self._alive(row):
                return row.id, Path(row.mountpoint)
            if row is not None and row.pid != 0:
                log.warning("daemon of chain %s (pid %d) died; starting a new one",
                            chain.chain_id, row.pid)
            return self._start(chain, row)

    def _options(self, chain: Chain, image_ref: str = "") -> list[str]:
        """The daemon's flags to mount ``image_ref`` (``chain.top``'s by default)."""
        plain_http, insecure = self._registry_flags(image_ref or chain.top.image_ref)
        opts = [
            "--read-only",
            # The kernel overlay above reads it with the mounter's and the container's
            # credentials; host users cannot reach it (ROOT/mnt is 0700).
            "--allow-other",
            "--layers", str(chain.top.layer_index + 1),
            "--cache", str(self.cache_dir),
            "--cache-size", str(self.config.cache_size),
        ]
        if self.hosts_dir is not None:
            opts += ["--hosts-dir", str(self.hosts_dir)]
        if self.config.registry.docker_config:
            opts += ["--docker-config", self.config.registry.docker_config]
        if plain_http:
            opts.append("--plain-http")
        if insecure:
            opts.append("--insecure")
        if self.config.prefetch in ("groups", "landmark"):  # "auto" is the daemon's default
            opts += ["--prefetch-from", self.config.prefetch]
        if self.config.prefetch == "none":
            opts.append("--no-prefetch")
        if not self.config.deltas:
            opts.append("--no-deltas")
        return opts

    def _start(self, chain: Chain, row: DaemonRow | None) -> tuple[int, Path]:
        """Start the chain's daemon (its lock held); ``row``: the chain's row, a dead one."""
        mnt = self._mountpoint(chain.chain_id)
        # The refs to mount from: the image that committed the chain first; another that
        # shares it when that one cannot be mounted (deleted from its registry, say), looked
        # up now if need be.
        refs = chain.refs or (chain.top.image_ref,)
        # The row (pid 0 until the daemon is ready) owns the mount point before anything is
        # mounted there: Cleanup's sweep never takes a daemon being started for a stray.
        with self.store.transaction() as tx:
            daemon_id = tx.put_daemon(0, str(mnt), str(control_path(mnt)), refs[0],
                                      chain.chain_id)  # fmt: skip
        self._live.pop(daemon_id, None)
        self._await_stops(chain)
        try:
            daemon, image_ref = self._spawn(chain, refs, mnt)
        except BaseException:
            if row is None:  # a row made for this start only
                with self.store.transaction() as tx:
                    if tx.daemon_users(daemon_id) == 0:
                        tx.delete_daemon(daemon_id)
            raise
        try:
            with self.store.transaction() as tx:
                daemon_id = tx.put_daemon(daemon.pid, str(mnt), str(control_path(mnt)),
                                          image_ref, chain.chain_id)
        except BaseException:
            daemon.stop(STOP_TIMEOUT)
            raise
        self._live[daemon_id] = daemon
        return daemon_id, mnt

    def _await_stops(self, chain: Chain) -> None:
        """Wait (STOP_WAIT at most) for the daemons being stopped now to be gone."""
        with self._stops_lock:
            stops = list(self._stops)
        deadline = time.monotonic() + STOP_WAIT
        for gone in stops:
            if not gone.wait(max(0.0, deadline - time.monotonic())):
                log.info("starting chain %s while another daemon still stops", chain.chain_id)
                return

    def _spawn(self, chain: Chain, refs: tuple[str, ...], mnt: Path) -> tuple[Daemon, str]:
        """The chain's daemon on ``mnt``, from the first of its images that mounts."""
        clear_mountpoint(mnt)  # a dead daemon's stale mount: its users see ENOTCONN anyway
        mnt.mkdir(mode=0o755, exist_ok=True)
        t0 = time.monotonic()
        first: LazyfsError | None = None
        for image_ref in self._ways_to_mount(chain, refs):
            forks = self._forks  # once: check() may replace it meanwhile (None in between)
            try:
                daemon = spawn(image_ref, mnt, self._options(chain, image_ref),
                               log=mnt.with_suffix(".log"), timeout=SPAWN_TIMEOUT,
                               forkserver=forks.socket if forks else None)
            except LazyfsError as e:  # the daemon's own one line
                log.warning("cannot mount chain %s from %s: %s", chain.chain_id, image_ref, e)
                first = first or e
                clear_mountpoint(mnt)
                continue
            log.info("daemon pid %d mounted %s (%d layers) on %s in %.2fs", daemon.pid,
                     image_ref, chain.top.layer_index + 1, mnt, time.monotonic() - t0)
            return daemon, image_ref
        raise FailedPrecondition(f"cannot mount the lazy layers of {refs[0]}: {first}")

    def _ways_to_mount(self, chain: Chain, refs: tuple[str, ...]) -> Iterator[str]:
        """``refs``, then the pending images as each is confirmed (only as far as asked)."""
        yield from refs
        for pending in chain.pending:
            ref = self._looked_up(chain, pending)
            if ref is not None and ref not in refs:
                yield ref

    def release(self, daemon_id: int) -> None:
        with self.store.transaction() as tx:
            row = tx.daemon_by_id(daemon_id)
        if row is None:
            return
        # The stop (seconds, for a busy or hung mount) holds up only this chain's users.
        with self.chains.hold(row.chain_id):
            with self.store.transaction() as tx:
                row = tx.daemon_by_id(daemon_id)
                if row is None or tx.daemon_users(daemon_id) > 0:
                    return
            self._stop(row)
            with self.store.transaction() as tx:  # new users wait for the chain's lock
                if tx.daemon_users(daemon_id) == 0:
                    tx.delete_daemon(daemon_id)

    def _stop(self, row: DaemonRow) -> None:
        daemon = self._live.pop(row.id, None)
        if daemon is None and row.pid != 0:
            # Not attached (it died or never answered): stop only the PID the mount names.
            with contextlib.suppress(LazyfsError, OSError):
                daemon = attach(row.mountpoint, expect_pid=row.pid)
        if daemon is not None:
            log.info("stopping daemon pid %d of chain %s", daemon.pid, row.chain_id)
            gone = threading.Event()
            with self._stops_lock:
                self._stops.add(gone)
            try:
                daemon.stop(STOP_TIMEOUT)
            finally:
                gone.set()
                with self._stops_lock:
                    self._stops.discard(gone)
        clear_mountpoint(row.mountpoint)
        with contextlib.suppress(OSError):
            os.rmdir(row.mountpoint)
        # A daemon stopped on purpose leaves no log; a dead one's log stays until then.
        Path(row.mountpoint).with_suffix(".log").unlink(missing_ok=True)

    def _forget(self, row: DaemonRow) -> None:
        """A daemon that died: detach its stale mount; its row waits for the next user."""
        self._live.pop(row.id, None)
        clear_mountpoint(row.mountpoint)
        with self.store.transaction() as tx:
            tx.set_daemon_pid(row.id, 0)

    def check(self) -> None:
        if self._forks is not None and not self._forks.alive():
            log.warning("the fork server (pid %d) exited; starting another", self._forks.pid)
            self._forks = None
            self._start_fork_server()
        with self.store.transaction() as tx:
            rows = tx.daemons()
        for listed in rows:
            # A chain being started or stopped now is looked at next time: the periodic check
            # (and the snapshotter's signal handling after it) never waits for a slow one.
            with self.chains.hold_if_free(listed.chain_id) as held:
                if not held:
                    continue
                with self.store.transaction() as tx:  # as it is now its chain is held
                    row = tx.daemon_by_id(listed.id)
                    unused = row is not None and tx.daemon_users(row.id) == 0
                if row is None:
                    continue
                if row.pid != 0 and not self._alive(row):
                    log.warning("daemon of chain %s (pid %d) died; its mount is cleaned and "
                                "new containers get a new daemon", row.chain_id, row.pid)
                    self._forget(row)
                elif row.pid == 0 and unused:
                    self.release(row.id)

    def close(self, unmount: bool) -> None:
        if self._forks is not None:
            self._forks.stop()  # by PID; the daemons it forked are not its to stop
            self._forks = None
        if not unmount:
            return  # running containers keep reading through them
        with self.store.transaction() as tx:
            rows = tx.daemons()
        for row in rows:
            with self.chains.hold(row.chain_id):
                self._stop(row)
                with self.store.transaction() as tx:
                    tx.set_daemon_pid(row.id, 0)
