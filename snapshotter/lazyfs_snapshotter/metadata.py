"""Snapshot metadata in sqlite3 (WAL): one transaction per snapshot operation.

Rows are the truth; directories under ``ROOT/snapshots/ID`` follow them.  Every operation
runs inside :meth:`MetadataStore.transaction` (``BEGIN IMMEDIATE`` … ``COMMIT``), so a crash
at any point leaves either the old or the new state.  The ``daemons`` table is reserved for
lazy layers: which FUSE daemon (pid, mountpoint, control socket) serves which chain of lazy
layers (``chain_id``: the key of the chain's top remote snapshot); snapshots whose mounts use
it point at it through ``daemon_id``.  ``pid = 0`` means its daemon died and was cleaned up;
the next Prepare/Mounts that needs the chain starts a new one in the same row.  The shape of
``daemons`` is stable (the metrics read it).  ``remote_layers`` records, per remote snapshot,
what mounting it needs later without any tag lookup: the image by digest, the layer's index in
that manifest and its descriptor.  ``remote_refs`` adds the other images (``HOST/REPO@DIGEST``)
whose layers named the same snapshot since, in the order they came: a chain shared by two
images can still be mounted when the first image is deleted from its registry.
``pending_refs`` holds the images that named such a snapshot as their labels gave them (a tag,
perhaps), not yet checked: a Prepare of a layer held already asks no registry, so the image
is looked up (and moved to ``remote_refs``) only if the chain ever has to be mounted from it,
the most recently named first.
Both are created where missing, so a metadata file of an older snapshotter just gains them
(same schema version).  Both go with their snapshot (ON DELETE CASCADE); while it lives (a
shared base layer, for weeks) each keeps only its :data:`MAX_REFS` most recently named
images, so a stream of new builds over that base cannot grow them without end.

Namespaces: containerd 1.6 sends no ``containerd-namespace`` to proxy snapshotters (its keys
are already ``NS/ID/KEY``), and its garbage collector may call without one.  A call without a
namespace therefore sees every namespace; a call with one sees only its own.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
# Images kept per remote snapshot in each of remote_refs and pending_refs, the most recently
# named ones (an old image is the likeliest to have been deleted from its registry).
MAX_REFS = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS daemons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    mountpoint TEXT NOT NULL UNIQUE,
    control_socket TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    started_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    daemon_id INTEGER REFERENCES daemons(id),
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_daemon ON snapshots(daemon_id);
CREATE TABLE IF NOT EXISTS remote_layers (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    image_ref TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    layer_index INTEGER NOT NULL,
    descriptor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS remote_refs (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    image_ref TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, image_ref)
);
CREATE TABLE IF NOT EXISTS pending_refs (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    image_ref TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    layer_digest TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, image_ref, manifest_digest)
);
"""


class MetadataError(Exception):
    """The metadata store cannot be used; str() is the one-line reason."""


class Kind(enum.IntEnum):
    """Same numbers as the proto's Kind enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class RemoteLayerRow:
    """What a remote snapshot needs to be mounted again: ``image_ref`` is
    ``HOST/REPOSITORY@MANIFEST-DIGEST``; the layer is ``layer_index`` (0-based) of it."""

    image_ref: str
    manifest_digest: str
    layer_index: int
    descriptor: str  # the OCI descriptor as JSON (digest, size, mediaType, annotations)


@dataclass(frozen=True)
class PendingRef:
    """An image whose layer ``layer_digest`` named a remote snapshot, as its Prepare's labels
    gave it: ``image_ref`` maybe by tag, ``manifest_digest`` "" when they gave none."""

    image_ref: str
    manifest_digest: str
    layer_digest: str


@dataclass(frozen=True)
class DaemonRow:
    """A FUSE daemon the snapshotter started: found again after a restart by its mount point."""

    id: int
    pid: int  # 0: dead and cleaned; started again when next needed
    mountpoint: str
    control_socket: str
    image_ref: str
    chain_id: str
    started_ns: int


_DAEMON_COLUMNS = "id, pid, mountpoint, control_socket, image_ref, chain_id, started_ns"


def _daemon(r: tuple[Any, ...]) -> DaemonRow:
    return DaemonRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]),
                     int(r[6]))


@dataclass
class SnapshotRow:
    id: int
    namespace: str
    key: str
    parent_id: int | None
    kind: Kind
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    size: int = 0
    inodes: int = 0
    daemon_id: int | None = None
    parent_key: str = field(default="")


_COLUMNS = (
    "s.id, s.namespace, s.key, s.parent_id, s.kind, s.labels, s.created_ns, s.updated_ns, "
    "s.size, s.inodes, s.daemon_id, COALESCE(p.key, '')"
)
_SELECT = f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


def _row(r: tuple[Any, ...]) -> SnapshotRow:
    labels = json.loads(str(r[5]))
    return SnapshotRow(
        id=int(r[0]),
        namespace=str(r[1]),
        key=str(r[2]),
        parent_id=None if r[3] is None else int(r[3]),
        kind=Kind(r[4]),
        labels=labels,
        created_ns=int(r[6]),
        updated_ns=int(r[7]),
        size=int(r[8]),
        inodes=int(r[9]),
        daemon_id=None if r[10] is None else int(r[10]),
        parent_key=str(r[11]),
    )


def now_ns() -> int:
    return time.time_ns()


class Tx:
    """Queries inside one open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get(self, namespace: str, key: str) -> SnapshotRow | None:
        """The snapshot *key* in *namespace*; with no namespace, in any (own one first)."""
        cur = self.conn.execute(
            f"{_SELECT} WHERE s.key = ? AND (s.namespace = ? OR ? = '')"
            " ORDER BY s.namespace = ? DESC LIMIT 1",
            (key, namespace, namespace, namespace),
        )
        r = cur.fetchone()
        return None if r is None else _row(r)

    def get_id(self, snap_id: int) -> SnapshotRow | None:
        r = self.conn.execute(f"{_SELECT} WHERE s.id = ?", (snap_id,)).fetchone()
        return None if r is None else _row(r)

    def chain(self, row: SnapshotRow) -> list[SnapshotRow]:
        """The parents of *row*, nearest first."""
        out: list[SnapshotRow] = []
        parent = row.parent_id
        while parent is not None:
            p = self.get_id(parent)
            if p is None:  # foreign keys make this impossible; be loud if not
                raise RuntimeError(f"snapshot {row.key!r}: parent id {parent} missing")
            out.append(p)
            parent = p.parent_id
        return out

    def all(self, namespace: str) -> list[SnapshotRow]:
        cur = self.conn.execute(
            f"{_SELECT} WHERE s.namespace = ? OR ? = '' ORDER BY s.id", (namespace, namespace)
        )
        return [_row(r) for r in cur.fetchall()]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self.conn.execute("SELECT id FROM snapshots")}

    def has_children(self, snap_id: int) -> bool:
        r = self.conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snap_id,))
        return r.fetchone() is not None

    def insert(
        self,
        namespace: str,
        key: str,
        parent_id: int | None,
        kind: Kind,
        labels: dict[str, str],
    ) -> int:
        t = now_ns()
        cur = self.conn.execute(
            "INSERT INTO snapshots (namespace, key, parent_id, kind, labels, created_ns,"
            " updated_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, parent_id, int(kind), json.dumps(labels, sort_keys=True), t, t),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def commit_active(
        self, snap_id: int, name: str, labels: dict[str, str], size: int, inodes: int
    ) -> None:
        """Turn an active snapshot into a committed one named *name* (same id, same dirs);
        a committed snapshot has no mounts, so it uses no daemon."""
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?,"
            " updated_ns = ?, created_ns = ?, daemon_id = NULL WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                json.dumps(labels, sort_keys=True),
                size,
                inodes,
                now_ns(),
                now_ns(),
                snap_id,
            ),
        )

    def set_labels(self, snap_id: int, labels: dict[str, str]) -> None:
        self.conn.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(labels, sort_keys=True), now_ns(), snap_id),
        )

    def delete(self, snap_id: int) -> None:
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (snap_id,))

    # -- lazy layers -------------------------------------------------------------------
    def set_remote(self, snap_id: int, rl: RemoteLayerRow) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO remote_layers (snapshot_id, image_ref, manifest_digest,"
            " layer_index, descriptor) VALUES (?, ?, ?, ?, ?)",
            (snap_id, rl.image_ref, rl.manifest_digest, rl.layer_index, rl.descriptor),
        )

    def remote(self, snap_id: int) -> RemoteLayerRow | None:
        r = self.conn.execute(
            "SELECT image_ref, manifest_digest, layer_index, descriptor FROM remote_layers"
            " WHERE snapshot_id = ?", (snap_id,)).fetchone()
        return None if r is None else RemoteLayerRow(str(r[0]), str(r[1]), int(r[2]), str(r[3]))

    def add_remote_ref(self, snap_id: int, image_ref: str) -> None:
        """Another image (``HOST/REPO@DIGEST``) names the remote snapshot at the same depth
        (named again: it becomes the newest, the last to be dropped)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO remote_refs (snapshot_id, image_ref) VALUES (?, ?)",
            (snap_id, image_ref),
        )
        self._keep_newest("remote_refs", snap_id)

    def _keep_newest(self, table: str, snap_id: int) -> None:
        """Drop all but the snapshot's MAX_REFS newest rows of ``table`` (rowid order: a row
        replaced on a repeat gets a new, higher rowid)."""
        self.conn.execute(
            f"DELETE FROM {table} WHERE snapshot_id = ? AND rowid NOT IN"
            f" (SELECT rowid FROM {table} WHERE snapshot_id = ? ORDER BY rowid DESC LIMIT ?)",
            (snap_id, snap_id, MAX_REFS),
        )

    def remote_refs(self, snap_id: int) -> list[str]:
        """Every image that named the remote snapshot: its record's first, then the rest in
        the order they came."""
        rl = self.remote(snap_id)
        cur = self.conn.execute(
            "SELECT image_ref FROM remote_refs WHERE snapshot_id = ? ORDER BY rowid", (snap_id,))
        rest = [str(r[0]) for r in cur.fetchall()]
        first = [] if rl is None else [rl.image_ref]
        return first + [r for r in rest if r not in first]

    def add_pending_ref(self, snap_id: int, ref: PendingRef) -> None:
        """Another image named the remote snapshot; it is checked only when needed (named
        again: it becomes the newest)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO pending_refs (snapshot_id, image_ref, manifest_digest,"
            " layer_digest) VALUES (?, ?, ?, ?)",
            (snap_id, ref.image_ref, ref.manifest_digest, ref.layer_digest),
        )
        self._keep_newest("pending_refs", snap_id)

    def pending_refs(self, snap_id: int) -> list[PendingRef]:
        """The images not yet looked up, the most recently named first: the likeliest to
        still be in its registry, and so to mount from at the first try."""
        cur = self.conn.execute(
            "SELECT image_ref, manifest_digest, layer_digest FROM pending_refs"
            " WHERE snapshot_id = ? ORDER BY rowid DESC", (snap_id,))
        return [PendingRef(str(r[0]), str(r[1]), str(r[2])) for r in cur.fetchall()]

    def drop_pending_ref(self, snap_id: int, ref: PendingRef) -> None:
        """``ref`` was looked up: added to remote_refs by digest, or found unusable."""
        self.conn.execute(
            "DELETE FROM pending_refs WHERE snapshot_id = ? AND image_ref = ?"
            " AND manifest_digest = ?", (snap_id, ref.image_ref, ref.manifest_digest))

    def set_daemon_id(self, snap_id: int, daemon_id: int | None) -> None:
        self.conn.execute("UPDATE snapshots SET daemon_id = ? WHERE id = ?", (daemon_id, snap_id))

    def daemon_users(self, daemon_id: int) -> int:
        r = self.conn.execute("SELECT COUNT(*) FROM snapshots WHERE daemon_id = ?", (daemon_id,))
        return int(r.fetchone()[0])

    def daemons(self) -> list[DaemonRow]:
        cur = self.conn.execute(f"SELECT {_DAEMON_COLUMNS} FROM daemons ORDER BY id")
        return [_daemon(r) for r in cur.fetchall()]

    def daemon(self, chain_id: str) -> DaemonRow | None:
        r = self.conn.execute(
            f"SELECT {_DAEMON_COLUMNS} FROM daemons WHERE chain_id = ?", (chain_id,)).fetchone()
        return None if r is None else _daemon(r)

    def daemon_by_id(self, daemon_id: int) -> DaemonRow | None:
        r = self.conn.execute(
            f"SELECT {_DAEMON_COLUMNS} FROM daemons WHERE id = ?", (daemon_id,)).fetchone()
        return None if r is None else _daemon(r)

    def put_daemon(self, pid: int, mountpoint: str, control_socket: str, image_ref: str,
                   chain_id: str) -> int:
        """Record the daemon serving *chain_id* (replacing a dead one in its row)."""
        self.conn.execute(
            "INSERT INTO daemons (pid, mountpoint, control_socket, image_ref, chain_id,"
            " started_ns) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mountpoint) DO UPDATE SET"
            " pid = excluded.pid, control_socket = excluded.control_socket,"
            " image_ref = excluded.image_ref, chain_id = excluded.chain_id,"
            " started_ns = excluded.started_ns",
            (pid, mountpoint, control_socket, image_ref, chain_id, now_ns()),
        )
        r = self.conn.execute("SELECT id FROM daemons WHERE mountpoint = ?", (mountpoint,))
        return int(r.fetchone()[0])

    def set_daemon_pid(self, daemon_id: int, pid: int) -> None:
        self.conn.execute("UPDATE daemons SET pid = ? WHERE id = ?", (pid, daemon_id))

    def delete_daemon(self, daemon_id: int) -> None:
        self.conn.execute("UPDATE snapshots SET daemon_id = NULL WHERE daemon_id = ?",
                          (daemon_id,))
        self.conn.execute("DELETE FROM daemons WHERE id = ?", (daemon_id,))

    def count_kinds(self) -> dict[Kind, int]:
        """Snapshots of each kind, every namespace."""
        cur = self.conn.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind")
        return {Kind(k): int(n) for k, n in cur.fetchall()}

    def add_daemon(
        self, pid: int, mountpoint: str, control_socket: str, image_ref: str, chain_id: str
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO daemons (pid, mountpoint, control_socket, image_ref, chain_id,"
            " started_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (pid, mountpoint, control_socket, image_ref, chain_id, now_ns()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid


class MetadataStore:
    """One sqlite3 connection shared by the gRPC worker threads, one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per operation.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit acknowledged to containerd survives a power cut, not just a crash.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.executescript(_SCHEMA)
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise MetadataError(f"{path}: {e}") from None
        if version not in (0, SCHEMA_VERSION):
            self._conn.close()
            raise MetadataError(f"{path}: metadata schema {version}, expected {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction; rolled back if the block raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
