"""The snapshotter's Prometheus endpoint (``--metrics-address`` or ``[metrics].address``).

Its own series: gRPC calls by method and status code (counted by a server interceptor, so the
handlers stay as they are), snapshots by kind, and the FUSE daemons it records.  On each
scrape it asks every daemon in the metadata ``daemons`` table for its stats over the daemon's
control socket and renders them with :mod:`lazyfs.fs.prometheus`, labelled by daemon PID and
chain ID.  A daemon that does not answer (dead, or another process on its mount point) is
left out and counted; it never fails the scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lazyfs.fs.daemon import attach
from lazyfs.fs.prometheus import DaemonStats, daemon_families

from .metadata import DaemonRow, Kind, MetadataStore

log = logging.getLogger(__name__)

DAEMON_LABELS = ("daemon", "chain")
# Daemons asked at once, and how long each request may take: a hung daemon (two requests)
# costs one worker a few seconds, well inside Prometheus' default 10 s scrape timeout.
_ASK_WORKERS = 16
ASK_TIMEOUT = 2.0

Req = TypeVar("Req")
Res = TypeVar("Res")


class CallCounter(grpc.ServerInterceptor):
    """Counts every gRPC call by method and the status code it ended with."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "lazyfs_snapshotter_grpc_calls",
            "gRPC calls containerd made, by method and status code",
            ["method", "code"],
            registry=registry,
        )

    def _count(self, method: str, context: grpc.ServicerContext, default: grpc.StatusCode) -> None:
        # An aborted call has its code set on the context; a plain return leaves it unset.
        code = context.code() or default  # type: ignore[attr-defined]  # stubs lag grpcio
        self.calls.labels(method, code.name).inc()

    def _unary(
        self, method: str, fn: Callable[[Req, grpc.ServicerContext], Res]
    ) -> Callable[[Req, grpc.ServicerContext], Res]:
        def call(request: Req, context: grpc.ServicerContext) -> Res:
            try:
                response = fn(request, context)
            except Exception:
                self._count(method, context, grpc.StatusCode.UNKNOWN)
                raise
            self._count(method, context, grpc.StatusCode.OK)
            return response

        return call

    def _stream(
        self, method: str, fn: Callable[[Req, grpc.ServicerContext], Iterator[Res]]
    ) -> Callable[[Req, grpc.ServicerContext], Iterator[Res]]:
        def call(request: Req, context: grpc.ServicerContext) -> Iterator[Res]:
            try:
                yield from fn(request, context)
            except GeneratorExit:  # the client went away mid-stream
                self._count(method, context, grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                self._count(method, context, grpc.StatusCode.UNKNOWN)
                raise
            self._count(method, context, grpc.StatusCode.OK)

        return call

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rpartition("/")[2]
        codec: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), **codec
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), **codec
            )
        return handler  # the Snapshots service has no client-streaming methods


class DaemonsCollector(Collector):
    """On each scrape: snapshots by kind, and the stats of every recorded daemon."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(_ASK_WORKERS, thread_name_prefix="metrics")
        self._lock = threading.Lock()
        self.unreachable_total = 0

    def _ask(self, row: DaemonRow) -> DaemonStats | None:
        labels = {"daemon": str(row.pid), "chain": row.chain_id}
        try:
            # expect_pid: the recorded daemon, not whatever now answers on its mount point.
            daemon = attach(row.mountpoint, expect_pid=row.pid, timeout=ASK_TIMEOUT)
            report = daemon.stats(timeout=ASK_TIMEOUT)
        except Exception as e:  # a daemon's trouble is a skipped series, never a failed scrape
            log.info("metrics: daemon %s on %s skipped: %s", row.pid, row.mountpoint, e)
            return None
        return DaemonStats(labels, report)

    def collect(self) -> Iterator[Metric]:
        with self.store.transaction() as tx:
            kinds = tx.count_kinds()
            # pid 0: a daemon that died and was cleaned up; nothing to ask until restarted.
            rows = [row for row in tx.daemons() if row.pid != 0]
        # Outside the transaction: a daemon may take seconds to answer.
        answers = list(self.pool.map(self._ask, rows))
        alive = [a for a in answers if a is not None]
        with self._lock:
            self.unreachable_total += len(rows) - len(alive)
            unreachable_total = self.unreachable_total

        snapshots = GaugeMetricFamily(
            "lazyfs_snapshotter_snapshots", "Snapshots by kind, every namespace", labels=["kind"]
        )
        for kind in Kind:
            snapshots.add_metric([kind.name.lower()], float(kinds.get(kind, 0)))
        yield snapshots
        yield GaugeMetricFamily(
            "lazyfs_snapshotter_daemons", "FUSE daemons recorded", value=float(len(rows))
        )
        yield GaugeMetricFamily(
            "lazyfs_snapshotter_daemons_unreachable",
            "Recorded FUSE daemons that did not answer this scrape",
            value=float(len(rows) - len(alive)),
        )
        yield CounterMetricFamily(
            "lazyfs_snapshotter_daemon_scrape_failures",
            "Times a recorded FUSE daemon did not answer a scrape",
            value=float(unreachable_total),
        )
        yield from daemon_families(alive, DAEMON_LABELS)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Metrics:
    """The registry, the interceptor that counts calls, and the HTTP endpoint once started."""

    def __init__(self, store: MetadataStore) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.interceptor = CallCounter(self.registry)
        self.collector = DaemonsCollector(store)
        self.registry.register(self.collector)
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on HOST:PORT from a thread; the port it listens on (port 0: one
        the kernel chose).  OSError if it cannot listen."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.collector.close()
