"""Snapshot metadata in sqlite3 (WAL): one transaction per snapshot operation.

Rows are the truth; directories under ``ROOT/snapshots/ID`` follow them.  Every operation
runs inside :meth:`MetadataStore.transaction` (``BEGIN IMMEDIATE`` … ``COMMIT``), so a crash
at any point leaves either the old or the new state.  The ``daemons`` table is reserved for
the lazy-layer part: which FUSE daemon (pid, mountpoint, control socket) serves which image
chain; snapshots point at it through ``daemon_id``.

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
"""


class MetadataError(Exception):
    """The metadata store cannot be used; str() is the one-line reason."""


class Kind(enum.IntEnum):
    """Same numbers as the proto's Kind enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


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


@dataclass
class DaemonRow:
    """A FUSE daemon the snapshotter started: found again after a restart by its mount point."""

    id: int
    pid: int
    mountpoint: str
    control_socket: str
    image_ref: str
    chain_id: str
    started_ns: int


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
        """Turn an active snapshot into a committed one named *name* (same id, same dirs)."""
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?,"
            " updated_ns = ?, created_ns = ? WHERE id = ?",
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

    def daemons(self) -> list[DaemonRow]:
        cur = self.conn.execute(
            "SELECT id, pid, mountpoint, control_socket, image_ref, chain_id, started_ns"
            " FROM daemons ORDER BY id"
        )
        return [DaemonRow(*r) for r in cur.fetchall()]


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
