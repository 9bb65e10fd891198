"""Snapshot semantics over the metadata store and ``ROOT/snapshots/ID/{fs,work}``.

Plain layers behave as with containerd's overlayfs snapshotter.  Directory changes are
ordered around the metadata transaction so that a crash anywhere leaves nothing the
metadata does not explain, except directories :meth:`Snapshotter.cleanup` removes:
Prepare builds its directory under a temporary name and renames it to the new ID inside the
transaction; Remove deletes the directory only after the transaction commits.

Lazy layers (a :class:`LayerFS`) are committed as remote snapshots at Prepare and always form
the bottom of a chain: a layer above a plain one is pulled normally.  So an active snapshot's
lowerdirs are its plain parents' ``fs`` directories, then ONE directory for all its lazy
parents, the chain mount the LayerFS serves.  Snapshots whose mounts use a chain mount point
at its daemon (``daemon_id``); when the last one goes, the daemon is stopped.  Each chain has
its own lock (:class:`~lazyfs_snapshotter.locks.ChainLocks`): a chain's slow start or stop
holds up only the calls that need that chain.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError
from lazyfs.fs.daemon import attach
from lazyfs.fs.runtime import canonical
from lazyfs.fs.unmount import detach, mounts_under

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .filters import match_any, parse_filters
from .locks import ChainLocks
from .metadata import Kind, MetadataStore, SnapshotRow, Tx
from .remote import (
    REMOTE_LABEL,
    TARGET_LABEL,
    Chain,
    LayerFS,
    PlainLayers,
    SourceError,
    parse_source,
)

log = logging.getLogger(__name__)

# Test hook: the named step pauses (marker file ROOT/paused-STEP, then sleeps until killed)
# inside its transaction, so tests can SIGKILL the daemon at the worst moment.
PAUSE_ENV = "LAZYFS_SNAPSHOTTER_TEST_PAUSE"
_TMP_PREFIX = "new-"
# Where a LayerFS mounts its chains (ROOT/mnt/HASH, its log HASH.log): what cleanup sweeps.
MOUNTS_DIR = "mnt"
STRAY_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Info:
    name: str
    parent: str
    kind: Kind
    labels: dict[str, str]
    created_ns: int
    updated_ns: int


def _info(row: SnapshotRow) -> Info:
    return Info(row.key, row.parent_key, row.kind, row.labels, row.created_ns, row.updated_ns)


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under *path*, hard links counted once, as containerd does."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        st = os.lstat(top)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        with os.scandir(top) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                est = entry.stat(follow_symlinks=False)
                if (est.st_dev, est.st_ino) not in seen:
                    seen.add((est.st_dev, est.st_ino))
                    size += est.st_blocks * 512
    return size, len(seen)


def _overlay_index_off() -> bool:
    # containerd passes index=off when the kernel knows the option, so upper dirs stay
    # usable after their lowers are re-created (the index ties them to lower inodes).
    return os.path.exists("/sys/module/overlay/parameters/index")


class Snapshotter:
    def __init__(self, root: Path, layers: LayerFS | None = None) -> None:
        self.root = root
        self.dir = root / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = MetadataStore(root / "metadata.db")
        self.layers: LayerFS = layers if layers is not None else PlainLayers()
        # A chain's, held from starting its daemon to recording its user (and by the LayerFS
        # from finding the daemon unused to forgetting it): never stopped under a new user.
        self.chains = ChainLocks()
        self._pause = os.environ.get(PAUSE_ENV, "")
        self._index_off = _overlay_index_off()
        # Temporary directories belong to Prepare calls that died with the last process.
        for entry in self.dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        self.layers.start(self.store, self.chains)

    def close(self, *, unmount: bool = False) -> None:
        """Stop serving; chain mounts stay for running containers unless ``unmount``."""
        self.layers.close(unmount)
        self.store.close()

    def check(self) -> None:
        """Notice chain daemons that died (called periodically)."""
        self.layers.check()

    def _hook(self, step: str) -> None:
        if self._pause == step:
            (self.root / f"paused-{step}").write_text(str(os.getpid()))
            while True:
                time.sleep(3600)

    def _path(self, snap_id: int) -> Path:
        return self.dir / str(snap_id)

    # -- mounts ----------------------------------------------------------------------
    def _lazy_chain(self, tx: Tx, chain: list[SnapshotRow]) -> Chain | None:
        """The lazy layers in *chain* (nearest first): the first remote one is their top."""
        for p in chain:
            if REMOTE_LABEL in p.labels:
                record = tx.remote(p.id)
                if record is None:
                    raise FailedPrecondition(f"remote snapshot {p.key!r} has no layer record")
                return Chain(p.key, record, tuple(tx.remote_refs(p.id)),
                             tuple(tx.pending_refs(p.id)), p.id)
        return None

    def _chain_under(self, ns: str, parent: str) -> Chain | None:
        """The lazy layers under a new snapshot on *parent* (None: none)."""
        if not parent:
            return None
        with self.store.transaction() as tx:
            prow = tx.get(ns, parent)
            if prow is None:
                return None  # the create's own transaction says NOT_FOUND
            return self._lazy_chain(tx, [prow, *tx.chain(prow)])

    def _holding(self, lazy: Chain | None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if lazy is None else self.chains.hold(lazy.chain_id)

    def _mounts(self, tx: Tx, row: SnapshotRow, lazy: Path | None) -> list[Mount]:
        chain = tx.chain(row)
        here = self._path(row.id)
        if not chain:
            ro = "ro" if row.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(here / "fs"), (ro, "rbind"))]
        # Remote parents are the bottom of the chain; their one mount is the lowest lowerdir.
        lowers = [str(self._path(p.id) / "fs") for p in chain if REMOTE_LABEL not in p.labels]
        if lazy is not None:
            lowers.append(str(lazy))
        if row.kind == Kind.ACTIVE:
            options = ["index=off"] if self._index_off else []
            options += [f"workdir={here / 'work'}", f"upperdir={here / 'fs'}"]
            options.append("lowerdir=" + ":".join(lowers))
            return [Mount("overlay", "overlay", tuple(options))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(lowers),))]

    # -- operations --------------------------------------------------------------------
    def _need(self, tx: Tx, ns: str, key: str) -> SnapshotRow:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        row = tx.get(ns, key)
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    def prepare(
        self, ns: str, key: str, parent: str, labels: dict[str, str]
    ) -> list[Mount]:
        if TARGET_LABEL in labels:
            self._try_remote(ns, key, parent, labels)
        return self._create(ns, key, parent, labels, Kind.ACTIVE)

    def view(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(ns, key, parent, labels, Kind.VIEW)

    def _try_remote(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> None:
        """Commit the target as a remote snapshot and raise AlreadyExists if a LayerFS
        serves the layer lazily; return (pull normally) otherwise."""
        try:
            source = parse_source(labels)
        except SourceError as e:
            log.info("prepare %s: pulling normally: %s", key, e)
            return
        if source is None:
            return
        with self.store.transaction() as tx:
            existing = tx.get(ns, source.target)
            if existing is None:
                prow = tx.get(ns, parent) if parent else None
                below = [prow, *tx.chain(prow)] if prow is not None else []
            elif (REMOTE_LABEL in existing.labels
                  and source.known_ref() not in tx.remote_refs(existing.id)):  # fmt: skip
                # This image can mount the chain too.  Checking that costs a registry round
                # trip, which a Prepare of a layer held already (every layer of a re-pull,
                # every shared base) must not wait on: it is done if the chain ever needs it.
                tx.add_pending_ref(existing.id, source.pending())
        if existing is not None:
            raise AlreadyExists(f"target snapshot {source.target!r} already exists")
        plain = next((p.key for p in below if REMOTE_LABEL not in p.labels), None)
        if plain is not None:
            # One mount holds a chain's lazy layers, below every plain one (whiteouts in a
            # lazy layer could not hide files of a plain layer under it).
            log.info("prepare %s: %s: pulling normally: above plain layer %s", key,
                     source.layer_digest, plain)
            return
        ready = self.layers.prepare(source, len(below) + 1)
        if not ready.lazy or ready.record is None:
            log.info("prepare %s: %s: pulling normally: %s", key, source.layer_digest,
                     ready.reason)
            return
        log.info("prepare %s: %s is lazy (%s labels): committed as %s", key,
                 source.layer_digest, source.label_set, source.target)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.dir))
        try:
            (tmp / "fs").mkdir()
            remote_labels = {**labels, REMOTE_LABEL: self.layers.name}
            with self.store.transaction() as tx:
                parent_id = self._parent_id(tx, ns, parent)
                if tx.get(ns, source.target) is not None:
                    raise AlreadyExists(f"target snapshot {source.target!r} already exists")
                snap_id = tx.insert(ns, source.target, parent_id, Kind.COMMITTED, remote_labels)
                tx.set_remote(snap_id, ready.record)
                self._place(tmp, snap_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        raise AlreadyExists(f"target snapshot {source.target!r} already exists (remote)")

    def _parent_id(self, tx: Tx, ns: str, parent: str) -> int | None:
        if not parent:
            return None
        prow = tx.get(ns, parent)
        if prow is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if prow.kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return prow.id

    def _place(self, tmp: Path, snap_id: int) -> None:
        """Move a built directory to its ID (a leftover from a rolled-back ID goes first)."""
        dest = self._path(snap_id)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)

    def _create(
        self, ns: str, key: str, parent: str, labels: dict[str, str], kind: Kind
    ) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        lazy = self._chain_under(ns, parent)
        with self._holding(lazy):
            mounted = None if lazy is None else self.layers.mount(lazy)
            try:
                return self._create_row(ns, key, parent, labels, kind, mounted)
            except BaseException:
                if mounted is not None:
                    self.layers.release(mounted[0])  # started for nothing: let it go
                raise

    def _create_row(
        self,
        ns: str,
        key: str,
        parent: str,
        labels: dict[str, str],
        kind: Kind,
        mounted: tuple[int, Path] | None,
    ) -> list[Mount]:
        placed: Path | None = None
        tmp: Path | None = None
        try:
            with self.store.transaction() as tx:
                if tx.get(ns, key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                parent_id = self._parent_id(tx, ns, parent)
                tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.dir))
                os.chmod(tmp, 0o700)
                (tmp / "fs").mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir(mode=0o700)
                if parent_id is not None:
                    # The new upper gets the owner of the layer below, as containerd does.
                    st = os.stat(self._path(parent_id) / "fs")
                    os.chown(tmp / "fs", st.st_uid, st.st_gid)
                snap_id = tx.insert(ns, key, parent_id, kind, labels)
                if mounted is not None:
                    tx.set_daemon_id(snap_id, mounted[0])
                self._place(tmp, snap_id)
                placed, tmp = self._path(snap_id), None
                row = tx.get_id(snap_id)
                assert row is not None
                mounts = self._mounts(tx, row, mounted[1] if mounted is not None else None)
                self._hook("prepare")
        except BaseException:
            for leftover in (tmp, placed):
                if leftover is not None:
                    shutil.rmtree(leftover, ignore_errors=True)
            raise
        return mounts

    def mounts(self, ns: str, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            row = self._need(tx, ns, key)
            if row.kind == Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is committed and has no mounts")
            lazy = self._lazy_chain(tx, tx.chain(row))
        with self._holding(lazy):
            # A dead daemon is noticed here and replaced: a (re)started container gets a mount.
            mounted = self.layers.mount(lazy) if lazy is not None else None
            with self.store.transaction() as tx:
                row = self._need(tx, ns, key)
                if mounted is not None and row.daemon_id != mounted[0]:
                    tx.set_daemon_id(row.id, mounted[0])
                return self._mounts(tx, row, mounted[1] if mounted is not None else None)

    def commit(self, ns: str, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise InvalidArgument("commit name must not be empty")
        with self.store.transaction() as tx:
            row = self._check_commit(tx, ns, name, key)
        # Measured outside the transaction: a big layer's du must not stall other calls.
        # Nobody writes to a snapshot containerd is committing.
        size, inodes = disk_usage(self._path(row.id) / "fs")
        with self.store.transaction() as tx:
            if self._check_commit(tx, ns, name, key).id != row.id:
                raise FailedPrecondition(f"snapshot {key!r} changed during commit")
            tx.commit_active(row.id, name, labels, size, inodes)
            self._hook("commit")
        if row.daemon_id is not None:
            self.layers.release(row.daemon_id)
        # The work dir is only overlay's scratch space; a committed layer needs none.
        shutil.rmtree(self._path(row.id) / "work", ignore_errors=True)

    def _check_commit(self, tx: Tx, ns: str, name: str, key: str) -> SnapshotRow:
        row = self._need(tx, ns, key)
        if row.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if tx.get(ns, name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        return row

    def remove(self, ns: str, key: str) -> None:
        with self.store.transaction() as tx:
            row = self._need(tx, ns, key)
            if tx.has_children(row.id):
                raise FailedPrecondition(f"snapshot {key!r} has children")
            tx.delete(row.id)
            self._hook("remove")
        self._release(row)
        shutil.rmtree(self._path(row.id), ignore_errors=True)

    def _release(self, row: SnapshotRow) -> None:
        """Stop the chain daemon *row* used or was the top of, if nothing else uses it."""
        daemon_ids = [row.daemon_id] if row.daemon_id is not None else []
        if REMOTE_LABEL in row.labels:
            with self.store.transaction() as tx:
                d = tx.daemon(row.key)
            daemon_ids += [d.id] if d is not None else []
        for daemon_id in daemon_ids:
            try:
                self.layers.release(daemon_id)
            except Exception:
                log.exception("remove %s: stopping its daemon failed; cleanup retries", row.key)

    def stat(self, ns: str, key: str) -> Info:
        with self.store.transaction() as tx:
            return _info(self._need(tx, ns, key))

    def update(
        self, ns: str, name: str, labels: dict[str, str], fieldpaths: Sequence[str]
    ) -> Info:
        with self.store.transaction() as tx:
            row = self._need(tx, ns, name)
            new = dict(row.labels)
            if not fieldpaths:
                new = dict(labels)
            for path in fieldpaths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    if labels.get(label):
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {name!r}")
            # Our own remote mark is not the client's to take away.
            if REMOTE_LABEL in row.labels:
                new[REMOTE_LABEL] = row.labels[REMOTE_LABEL]
            tx.set_labels(row.id, new)
            updated = tx.get_id(row.id)
            assert updated is not None
            return _info(updated)

    def usage(self, ns: str, key: str) -> tuple[int, int]:
        with self.store.transaction() as tx:
            row = self._need(tx, ns, key)
        if row.kind == Kind.ACTIVE:
            try:
                return disk_usage(self._path(row.id) / "fs")
            except FileNotFoundError:
                raise NotFound(f"snapshot {key!r} was removed") from None
        return row.size, row.inodes

    def list(self, ns: str, filters: Sequence[str]) -> list[Info]:
        parsed = parse_filters(filters)
        with self.store.transaction() as tx:
            rows = tx.all(ns)
        infos = [_info(r) for r in rows]

        def field(info: Info, path: Sequence[str]) -> str | None:
            head, rest = path[0], ".".join(path[1:])
            if head == "labels" and rest:
                return info.labels.get(rest)
            if rest:
                return None
            if head == "name":
                return info.name
            if head == "parent":
                return info.parent
            if head == "kind":
                return info.kind.name.lower()
            return None

        return [i for i in infos if match_any(parsed, functools.partial(field, i))]

    def cleanup(self) -> None:
        """Remove directories no snapshot owns (left by a crash or a failed remove)."""
        with self.store.transaction() as tx:
            known = tx.ids()
            orphans = [
                e for e in self.dir.iterdir()
                if e.name.isdigit() and int(e.name) not in known
            ]
            # Inside the transaction: a concurrent Prepare cannot be placing one of these.
            for orphan in orphans:
                log.info("cleanup: removing orphaned snapshot directory %s", orphan.name)
                shutil.rmtree(orphan, ignore_errors=True)
            unused = [d.id for d in tx.daemons() if tx.daemon_users(d.id) == 0]
        # Daemons nothing uses (a Remove that failed half-way, or their chain is gone).
        for daemon_id in unused:
            self.layers.release(daemon_id)
        self._sweep_mounts()

    @staticmethod
    def _owned(tx: Tx) -> tuple[set[Path], Callable[[Path], bool]]:
        """The mount points the daemon rows own, as given; and whether a mount (as mountinfo
        has it: symlinks resolved) is one of them or under one."""
        owned = {Path(d.mountpoint) for d in tx.daemons()}
        real = {Path(canonical(o)) for o in owned}
        return owned, lambda mp: mp in real or any(o in mp.parents for o in real)

    def _sweep_mounts(self) -> None:
        """Stop daemons, unmount and remove what is under ROOT/mnt that no daemon row owns:
        left by a crash between a daemon's start and its record (or before its directory
        went).  A mount's daemon is found by its control socket and stopped by that PID.

        A LayerFS records a daemon's row before it mounts anything and deletes it only after
        the daemon is gone, so what no row owns inside one transaction is no starting or
        stopping daemon's: only those quick steps (detaching a stray mount without a look at
        it, removing stray entries) hold the store.  Asking a daemon its PID and waiting for
        it to exit (seconds, when it has files open or hangs) happen outside, through a
        pidfd: every other call goes on meanwhile, and a PID that is reused meanwhile is
        never signalled."""
        mnt_dir = self.root / MOUNTS_DIR
        if not mnt_dir.is_dir():
            return
        with self.store.transaction() as tx:
            _, is_owned = self._owned(tx)
        found: dict[Path, tuple[int, int] | None] = {}  # stray mount -> (pid, pidfd)
        for mp in map(Path, mounts_under(str(mnt_dir))):
            if is_owned(mp):
                continue
            try:
                pid = attach(mp, timeout=2.0).pid
                found[mp] = (pid, os.pidfd_open(pid))
            except (LazyfsError, OSError):
                found[mp] = None  # no daemon answers (or it just went): detached below
        stopping: list[tuple[Path, int, int]] = []
        try:
            with self.store.transaction() as tx:
                _, is_owned = self._owned(tx)  # again: a Prepare may have started it since
                for mp, daemon in found.items():
                    if is_owned(mp):
                        continue  # a new daemon's; the stray it replaced was detached then
                    if daemon is None:
                        log.info("cleanup: detaching stray mount %s (no daemon answers)", mp)
                    else:
                        log.info("cleanup: stopping stray daemon pid %d on %s", daemon[0], mp)
                        stopping.append((mp, *daemon))
                    with contextlib.suppress(OSError):  # gone already
                        detach(str(mp))  # a detached daemon exits once its files close
            for mp, pid, pidfd in stopping:
                _end_detached(mp, pid, pidfd)
        finally:
            for daemon in found.values():
                if daemon is not None:
                    os.close(daemon[1])
        with self.store.transaction() as tx:
            owned, _ = self._owned(tx)
            for entry in mnt_dir.iterdir():
                if entry.with_suffix("") in owned or entry in owned:
                    continue
                log.info("cleanup: removing stray %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    with contextlib.suppress(OSError):  # never rmtree: it might be mounted again
                        os.rmdir(entry)
                else:
                    entry.unlink(missing_ok=True)


def _end_detached(mp: Path, pid: int, pidfd: int) -> None:
    """Wait for a daemon whose mount was detached to exit; SIGTERM, then SIGKILL it if it
    lingers (a file still open in it, or a hang).  Signals go through its pidfd."""
    # poll, not select: a snapshotter with a raised descriptor limit may get a pidfd past
    # select's 1024, and select then raises ValueError (out of the Cleanup call).
    exited = select.poll()
    exited.register(pidfd, select.POLLIN)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            log.info("cleanup: stray daemon pid %d of %s still runs: %s", pid, mp, sig.name)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
        if exited.poll(STRAY_STOP_TIMEOUT * 1000):
            return
    log.warning("cleanup: stray daemon pid %d of %s did not exit", pid, mp)
