"""Prometheus metrics from mount daemons' stats: the pure builder (lazyfs.fs.prometheus), and
``lazyfs stats --prometheus`` on a real mount, parsed back and checked against ``--json``."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lazyfs.errors import LazyfsError
from lazyfs.fs.control import LayerReport, StatsReport
from lazyfs.fs.prefetch import PrefetchStats
from lazyfs.fs.prometheus import DaemonStats, daemon_families, exposition, latency_buckets
from lazyfs.store.chunkcache import CacheUsage
from lazyfs.store.stats import LATENCY_BUCKETS, LayerStats
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run, wait_written

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and label set (parsed by prometheus_client)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(ss: Samples, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in ss.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, f"{name} {labels}: {len(matches)} series"
    return matches[0]


def layer_stats(blob: str, reads: list[tuple[int, bool]], **counters: int) -> LayerStats:
    s = msgspec.structs.replace(LayerStats(blob=blob), **counters)
    for ns, waited in reads:
        s.record_read(ns, waited=waited)
    return s


def report(pid: int, mnt: str, layers: list[LayerStats], **kw: Any) -> dict[str, Any]:
    r = StatsReport(
        image="oci:/img:v1",
        manifest="sha256:" + "m" * 64,
        mountpoint=mnt,
        files=7,
        layers=[LayerReport(s.blob, 3, msgspec.to_builtins(s)) for s in layers],
        pid=pid,
        **kw,
    )
    built: dict[str, Any] = msgspec.to_builtins(r)
    return built


def test_latency_buckets_are_cumulative_seconds() -> None:
    counts = [0] * LATENCY_BUCKETS
    counts[0], counts[3], counts[-1] = 2, 5, 1
    b = latency_buckets(counts)
    assert len(b) == LATENCY_BUCKETS
    assert b[0] == (repr(1e-6), 2.0)
    assert float(b[3][0]) == pytest.approx(8e-6) and b[3][1] == 7.0
    assert b[-2][1] == 7.0 and b[-1] == ("+Inf", 8.0)


def test_families_from_stats_values() -> None:
    a = layer_stats("sha256:" + "a" * 64, [(500, False), (3_000_000, True)],
                    requests=4, bytes_fetched=1000, cache_hits=1, cache_misses=2,
                    bytes_total=500, bytes_ready=100, chunks_total=5, chunks_ready=1)  # fmt: skip
    b = layer_stats("sha256:" + "b" * 64, [])
    cache = CacheUsage(dir="/c", chunks=3, bytes=300, max_bytes=1000, pinned=0, layer_maps=1)
    prefetch = PrefetchStats(group="web", entries=9, skipped=1, prefetch_total=400,
                             prefetch_bytes=100, error="boom")  # fmt: skip
    r1 = report(11, "/m1", [a, b, a], rss_bytes=4096, cache=cache, prefetch=prefetch,
                handler_errors=2)  # fmt: skip
    smaller = msgspec.structs.replace(cache, bytes=10)
    r2 = report(12, "/m2", [b], cache=smaller)
    names = ["daemon", "chain"]
    ds = [DaemonStats({"daemon": "11", "chain": "c1"}, r1),
          DaemonStats({"daemon": "12", "chain": "c2"}, r2)]  # fmt: skip
    ss = samples(exposition(daemon_families(ds, names)).decode())

    one = {"daemon": "11", "chain": "c1", "layer": a.blob}
    assert value(ss, "lazyfs_layer_fetched_bytes_total", **one) == 1000
    assert value(ss, "lazyfs_layer_requests_total", **one) == 4
    assert value(ss, "lazyfs_layer_reads_total", **one) == 2
    assert value(ss, "lazyfs_layer_cache_hits_total", **one) == 1
    assert value(ss, "lazyfs_layer_cache_misses_total", **one) == 2
    assert value(ss, "lazyfs_layer_read_wait_seconds_total", **one) == pytest.approx(3e-3)
    assert value(ss, "lazyfs_layer_ready_bytes", **one) == 100
    assert value(ss, "lazyfs_layer_size_bytes", **one) == 500
    assert value(ss, "lazyfs_layer_read_latency_seconds_count", **one) == 2
    assert value(ss, "lazyfs_layer_read_latency_seconds_sum", **one) == pytest.approx(3.0005e-3)
    assert value(ss, "lazyfs_layer_read_latency_seconds_bucket", le="1e-06", **one) == 1
    assert value(ss, "lazyfs_layer_read_latency_seconds_bucket", le="+Inf", **one) == 2
    # The duplicated layer of r1 is one series; layer b appears once per daemon.
    assert sum(1 for n, ls in ss if n == "lazyfs_layer_reads_total") == 3

    d11 = {"daemon": "11", "chain": "c1"}
    assert value(ss, "lazyfs_daemon_info", image="oci:/img:v1", mountpoint="/m1", **d11) == 1
    assert value(ss, "lazyfs_daemon_resident_bytes", **d11) == 4096
    assert value(ss, "lazyfs_daemon_files", **d11) == 7
    assert value(ss, "lazyfs_daemon_handler_errors_total", **d11) == 2
    assert value(ss, "lazyfs_daemon_handler_errors_total", daemon="12") == 0
    rss = [ls for n, ls in ss if n == "lazyfs_daemon_resident_bytes"]
    assert rss == [frozenset(d11.items())]  # 12 did not say its RSS: no series, not a zero
    assert value(ss, "lazyfs_prefetch_size_bytes", group="web", **d11) == 400
    assert value(ss, "lazyfs_prefetch_done_bytes", group="web", **d11) == 100
    assert value(ss, "lazyfs_prefetch_entries", group="web", **d11) == 9
    assert value(ss, "lazyfs_prefetch_skipped_entries", group="web", **d11) == 1
    assert value(ss, "lazyfs_prefetch_done", group="web", **d11) == 0
    assert value(ss, "lazyfs_prefetch_failed", group="web", **d11) == 1
    # One cache shared by both daemons: one series, the larger view.
    assert value(ss, "lazyfs_cache_bytes", dir="/c") == 300
    assert value(ss, "lazyfs_cache_max_bytes", dir="/c") == 1000
    assert value(ss, "lazyfs_cache_chunks", dir="/c") == 3


def test_no_daemons_still_describes_the_families() -> None:
    text = exposition(daemon_families([], ["daemon"])).decode()
    assert "# TYPE lazyfs_layer_fetched_bytes_total counter" in text
    assert samples(text) == {}


# ------------------------------------------------------------------------- on a real mount

DATA = seeded_bytes(300_000, 21)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("metrics-image")
    layers = [make_tar([Item("a", data=DATA)]), make_tar([Item("b", data=DATA[::-1])])]
    make_lazy_layout(d / "lazy", layers)
    return f"oci:{d / 'lazy'}:v1"


def test_stats_prometheus_equals_the_json_stats(image: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "--read-only", "--no-prefetch", "--cache", str(tmp_path / "c")) as m:
        assert (mnt / "a").read_bytes() == DATA
        with open(mnt / "b", "rb") as f:
            assert f.read(1000) == DATA[::-1][:1000]
        wait_written(mnt)  # what the reads fetched is cached when they pause: then it is quiet
        res = run(*lazyfs_cmd("stats", str(mnt), "--prometheus"))
        assert res.returncode == 0, res.stderr
        js = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True).stdout)
        ss = samples(res.stdout)
        # Nothing reads between the two requests: the counters must agree.
        assert js["pid"] == m.pid
        daemon = {"daemon": str(m.pid), "mountpoint": str(mnt)}
        assert value(ss, "lazyfs_daemon_info", image=image, **daemon) == 1
        assert value(ss, "lazyfs_daemon_files", **daemon) == js["files"]
        assert value(ss, "lazyfs_daemon_handler_errors_total", **daemon) == js["handler_errors"]
        assert 0 < value(ss, "lazyfs_daemon_resident_bytes", **daemon) < 1 << 32
        assert len(js["layers"]) == 2
        for layer in js["layers"]:
            s, lv = layer["stats"], {**daemon, "layer": layer["digest"]}
            assert s["reads"] > 0 and s["bytes_fetched"] > 0
            assert value(ss, "lazyfs_layer_fetched_bytes_total", **lv) == s["bytes_fetched"]
            assert value(ss, "lazyfs_layer_requests_total", **lv) == s["requests"]
            assert value(ss, "lazyfs_layer_cache_hits_total", **lv) == s["cache_hits"]
            assert value(ss, "lazyfs_layer_cache_misses_total", **lv) == s["cache_misses"]
            assert value(ss, "lazyfs_layer_ready_bytes", **lv) == s["bytes_ready"]
            assert value(ss, "lazyfs_layer_unwritten_bytes", **lv) == s["bytes_unwritten"] == 0
            assert value(ss, "lazyfs_layer_read_wait_seconds_total", **lv) == pytest.approx(
                s["wait_ns"] / 1e9
            )
            assert value(ss, "lazyfs_layer_read_latency_seconds_count", **lv) == s["reads"]
            assert value(ss, "lazyfs_layer_read_latency_seconds_sum", **lv) == pytest.approx(
                s["read_ns"] / 1e9
            )
        cache = js["cache"]
        assert cache["dir"] == str(tmp_path / "c") and cache["bytes"] > 0
        assert value(ss, "lazyfs_cache_bytes", dir=cache["dir"]) == cache["bytes"]
        assert value(ss, "lazyfs_cache_max_bytes", dir=cache["dir"]) == cache["max_bytes"]


def test_stats_prometheus_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    res = run(*lazyfs_cmd("stats", str(tmp_path), "--prometheus"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "no lazyfs daemon answers" in res.stderr


def test_a_client_that_gives_up_or_talks_nonsense_never_ends_the_mount(
    image: str, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "--read-only", "--no-prefetch", "--cache", str(tmp_path / "c")) as m:
        os.kill(m.pid, signal.SIGSTOP)  # the request waits in the socket's backlog
        try:
            with pytest.raises(LazyfsError, match="timed out"):
                m.stats(timeout=0.5)
        finally:
            os.kill(m.pid, signal.SIGCONT)  # then the reply meets a closed socket
        for line in (b"[1, 2]\n", b'"stats"\n', b"\xff\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(m.control))
                s.sendall(line)
                reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(m.control))
            s.sendall(b'{"cmd": "stats"}\n')  # and hang up before the answer
        assert m.stats()["pid"] == m.pid and m.alive()
        assert (mnt / "a").read_bytes() == DATA


def test_the_control_socket_listens_before_its_task_runs(tmp_path: Path) -> None:
    """The daemon binds its control socket without a checkpoint (it says it is ready at once,
    not after a pass of every other task): a client that connects before the server task
    has run waits in the backlog and is answered once it does; the socket goes with it."""
    import trio

    from lazyfs.fs.control import control_listener, control_server

    path = tmp_path / "run" / "ctl.sock"
    asked: list[dict[str, object]] = []

    def handler(request: dict[str, object]) -> object:
        asked.append(request)
        return {"pid": 7}

    async def main() -> None:
        listener = control_listener(path)  # no await: nothing else has run
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # accepted into the backlog already
        client.sendall(b'{"cmd": "stats"}\n')
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control_server, listener, path, handler)
            reply = await trio.to_thread.run_sync(client.makefile("rb").readline)
            client.close()
            nursery.cancel_scope.cancel()
        assert json.loads(reply) == {"ok": True, "result": {"pid": 7}}
        assert asked == [{"cmd": "stats"}]

    trio.run(main)
    assert not path.exists()
