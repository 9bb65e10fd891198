"""The ``containerd.services.snapshots.v1.Snapshots`` gRPC service over a Snapshotter.

Each handler translates messages and maps errors; nothing escapes: a SnapshotError becomes
its status code, anything else INTERNAL with the traceback logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from .snapshots import Info, Mount, Snapshotter

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace"
# containerd's List pages are this many infos a message, like its own proxy client expects.
_LIST_BATCH = 100

_CODES: dict[type[SnapshotError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}

T = TypeVar("T")


def namespace(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY and isinstance(value, str):
            return value
    return ""


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_ts(info.created_ns),
        updated_at=_ts(info.updated_ns),
        labels=info.labels,
    )


def _fail(context: grpc.ServicerContext, what: str, exc: Exception) -> NoReturn:
    if isinstance(exc, SnapshotError):
        code = next(c for t, c in _CODES.items() if isinstance(exc, t))
        log.debug("%s: %s: %s", what, code.name, exc)
        context.abort(code, str(exc))
    log.error("%s: unexpected error", what, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"{what}: internal error: {exc}")


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _run(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        log.debug("%s", what)
        try:
            return fn()
        except Exception as e:  # every error becomes a status; the daemon keeps serving
            _fail(context, what, e)

    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        ns = namespace(context)
        mounts = self._run(context, f"prepare {request.key}", lambda: self.sn.prepare(
            ns, request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        ns = namespace(context)
        mounts = self._run(context, f"view {request.key}", lambda: self.sn.view(
            ns, request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        ns = namespace(context)
        mounts = self._run(context, f"mounts {request.key}",
                           lambda: self.sn.mounts(ns, request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        ns = namespace(context)
        self._run(context, f"commit {request.key}", lambda: self.sn.commit(
            ns, request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        ns = namespace(context)
        self._run(context, f"remove {request.key}", lambda: self.sn.remove(ns, request.key))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        ns = namespace(context)
        info = self._run(context, f"stat {request.key}", lambda: self.sn.stat(ns, request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info(info))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        ns = namespace(context)
        paths = list(request.update_mask.paths)
        info = self._run(context, f"update {request.info.name}", lambda: self.sn.update(
            ns, request.info.name, dict(request.info.labels), paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        ns = namespace(context)
        infos = self._run(context, "list", lambda: self.sn.list(ns, list(request.filters)))
        for start in range(0, len(infos), _LIST_BATCH):
            batch = infos[start : start + _LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(i) for i in batch])

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        ns = namespace(context)
        size, inodes = self._run(context, f"usage {request.key}",
                                 lambda: self.sn.usage(ns, request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._run(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def add_to_server(service: SnapshotsService, server: grpc.Server) -> None:
    # The generated registration function is untyped; give it its real type here.
    add: Callable[[SnapshotsService, grpc.Server], None] = (
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server
    )
    add(service, server)
