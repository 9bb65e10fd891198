"""Test helpers: a private ``lazyfs-snapshotter`` process and a typed gRPC client for it.

The process is started with its own socket and root and stopped by PID (SIGTERM, wait,
SIGKILL) whatever happens inside the ``with``; :meth:`SnapshotterProcess.kill` is the crash.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from lazyfs.testing.server import ServerProcess

from .api import snapshots_pb2, snapshots_pb2_grpc
from .service import NAMESPACE_KEY


class SnapshotterProcess(ServerProcess):
    name = "snapshotter"
    stop_timeout = 10.0

    def __init__(
        self,
        base: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        start_timeout: float = 20.0,
    ) -> None:
        self.base = base
        self.address = str(base / "run" / "lazyfs.sock")
        self.root = base / "root"
        self.log_path = base / "snapshotter.log"
        self.extra_env = env or {}
        self.args = args
        self.start_timeout = start_timeout

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "lazyfs_snapshotter.cli",
            "--address", self.address, "--root", str(self.root), "--log-level", "debug",
            *self.args,
        ]

    def start(self) -> SnapshotterProcess:
        self.base.mkdir(parents=True, exist_ok=True)
        self.spawn(self.argv(), self.log_path, env={**os.environ, **self.extra_env},
                   new_session=True)
        return self

    def ready(self) -> bool:
        # The log is appended to across restarts: readiness is judged on this run's part.
        return "listening on" in self.this_run_log()

    def kill(self) -> None:
        """SIGKILL by PID: the crash the metadata store must survive."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Client:
    """A thin typed client for one namespace (what containerd's proxy does, by hand)."""

    def __init__(self, address: str, namespace: str = "test") -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)  # type: ignore[no-untyped-call]
        self.md = ((NAMESPACE_KEY, namespace),)

    def call(self, method: str, request: object, timeout: float = 30.0) -> object:
        fn = getattr(self.stub, method)
        return fn(request, metadata=self.md, timeout=timeout)

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None
                ) -> snapshots_pb2.PrepareSnapshotResponse:
        req = snapshots_pb2.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {})
        res = self.call("Prepare", req)
        assert isinstance(res, snapshots_pb2.PrepareSnapshotResponse)
        return res

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.call("Commit", snapshots_pb2.CommitSnapshotRequest(
            name=name, key=key, labels=labels or {}))

    def stat(self, key: str) -> snapshots_pb2.Info:
        res = self.call("Stat", snapshots_pb2.StatSnapshotRequest(key=key))
        assert isinstance(res, snapshots_pb2.StatSnapshotResponse)
        return res.info

    def list(self, *filters: str) -> list[snapshots_pb2.Info]:
        req = snapshots_pb2.ListSnapshotsRequest(filters=list(filters))
        stream: Iterator[snapshots_pb2.ListSnapshotsResponse] = self.stub.List(
            req, metadata=self.md, timeout=30)
        return [i for page in stream for i in page.info]

    def close(self) -> None:
        self.channel.close()
