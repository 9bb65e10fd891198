# ruff: noqa: F811  (pytest fixtures imported by name are redefined as parameters)
"""The fault proxy (lazyfs/testing/faultproxy.py) adds no delay of its own: benchmarks time the
daemon through it."""

from __future__ import annotations

import http.client
import statistics
import time

from lazyfs.testing.dockerregistry import RegistryInstance
from lazyfs.testing.faultproxy import FaultProxy
from tests.support.fixtures import registry  # noqa: F401


def test_small_answers_on_a_kept_alive_connection_are_not_held(registry: RegistryInstance) -> None:
    """An answer leaves the proxy in two writes (headers, body); with Nagle's algorithm on,
    the body of a small one waited for the client's delayed ACK (>= 40 ms on Linux) once the
    connection was past its first exchanges: every such request of a cold start through the
    proxy was charged 40-50 ms that no registry costs."""
    with FaultProxy(registry.url) as proxy:
        conn = http.client.HTTPConnection(proxy.host, timeout=10)
        try:
            took = []
            for _ in range(30):
                t0 = time.monotonic()
                conn.request("GET", "/v2/")
                resp = conn.getresponse()
                resp.read()
                took.append(time.monotonic() - t0)
        finally:
            conn.close()
    assert proxy.requests == 30  # one connection, kept alive throughout
    assert statistics.median(took) < 0.02, [round(t * 1000, 1) for t in took]
    assert sum(t >= 0.035 for t in took) <= 3, [round(t * 1000, 1) for t in took]
