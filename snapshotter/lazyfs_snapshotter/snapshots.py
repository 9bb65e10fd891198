"""Snapshot semantics over the metadata store and ``ROOT/snapshots/ID/{fs,work}``.

Plain layers behave as with containerd's overlayfs snapshotter.  Directory changes are
ordered around the metadata transaction so that a crash anywhere leaves nothing the
metadata does not explain, except directories :meth:`Snapshotter.cleanup` removes:
Prepare builds its directory under a temporary name and renames it to the new ID inside the
transaction; Remove deletes the directory only after the transaction commits.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .filters import match_any, parse_filters
from .metadata import Kind, MetadataStore, SnapshotRow, Tx
from .remote import REMOTE_LABEL, TARGET_LABEL, LayerFS, PlainLayers, SourceError, parse_source

log = logging.getLogger(__name__)

# Test hook: the named step pauses (marker file ROOT/paused-STEP, then sleeps until killed)
# inside its transaction, so tests can SIGKILL the daemon at the worst moment.
PAUSE_ENV = "LAZYFS_SNAPSHOTTER_TEST_PAUSE"
_TMP_PREFIX = "new-"


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
        self._pause = os.environ.get(PAUSE_ENV, "")
        self._index_off = _overlay_index_off()
        # Temporary directories belong to Prepare calls that died with the last process.
        for entry in self.dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        self.store.close()

    def _hook(self, step: str) -> None:
        if self._pause == step:
            (self.root / f"paused-{step}").write_text(str(os.getpid()))
            while True:
                time.sleep(3600)

    def _path(self, snap_id: int) -> Path:
        return self.dir / str(snap_id)

    # -- mounts ----------------------------------------------------------------------
    def _lower(self, row: SnapshotRow) -> str:
        if REMOTE_LABEL in row.labels:
            return str(self.layers.mount(self._path(row.id)))
        return str(self._path(row.id) / "fs")

    def _mounts(self, tx: Tx, row: SnapshotRow) -> list[Mount]:
        chain = tx.chain(row)
        here = self._path(row.id)
        if not chain:
            ro = "ro" if row.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(here / "fs"), (ro, "rbind"))]
        lowers = [self._lower(p) for p in chain]
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
            if tx.get(ns, source.target) is not None:
                raise AlreadyExists(f"target snapshot {source.target!r} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.dir))
        try:
            (tmp / "fs").mkdir()
            ready = self.layers.prepare(source, tmp)
            if not ready.lazy:
                log.info("prepare %s: %s: pulling normally: %s", key, source.layer_digest,
                         ready.reason)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            remote_labels = {**labels, REMOTE_LABEL: self.layers.name}
            with self.store.transaction() as tx:
                parent_id = self._parent_id(tx, ns, parent)
                if tx.get(ns, source.target) is not None:
                    raise AlreadyExists(f"target snapshot {source.target!r} already exists")
                snap_id = tx.insert(ns, source.target, parent_id, Kind.COMMITTED, remote_labels)
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
                self._place(tmp, snap_id)
                placed, tmp = self._path(snap_id), None
                row = tx.get_id(snap_id)
                assert row is not None
                mounts = self._mounts(tx, row)
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
            return self._mounts(tx, row)

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
        path = self._path(row.id)
        if REMOTE_LABEL in row.labels:
            try:
                self.layers.unmount(path)
            except Exception:
                log.exception("remove %s: unmount failed; cleanup will retry the directory", key)
        shutil.rmtree(path, ignore_errors=True)

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
