"""The snapshotter's Prometheus endpoint, scraped from a real running lazyfs-snapshotter: its
own counters over plain snapshots, then the series of a real mount daemon recorded in its
``daemons`` table, and a dead daemon that is skipped and counted, never a failed scrape."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from lazyfs_snapshotter.metadata import MetadataStore
from lazyfs_snapshotter.testing import Client, SnapshotterProcess
from prometheus_client.parser import text_string_to_metric_families

from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import Mount, mounted, wait_written
from tests.test_metrics import Samples, samples, value

DATA = seeded_bytes(200_000, 33)
CHAIN = "sha256:" + "c" * 64


@pytest.fixture
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lzm-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("snap-metrics-image")
    return f"oci:{make_lazy_layout(d / 'lazy', [make_tar([Item('f', data=DATA)])])}:v1"


def metrics_port(sp: SnapshotterProcess) -> int:
    """The port the snapshotter was given for ``127.0.0.1:0``: chosen by its own bind, so no
    other process can take it between a choice and the bind."""
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", sp.this_run_log())
    assert m is not None, sp.this_run_log()
    return int(m.group(1))


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    return text, samples(text)


def record(sp: SnapshotterProcess, m: Mount, image: str, chain: str = CHAIN) -> None:
    """Put a daemon in the snapshotter's daemons table, as its lazy layers do."""
    store = MetadataStore(sp.root / "metadata.db")
    try:
        with store.transaction() as tx:
            tx.add_daemon(m.pid, str(m.mountpoint), str(m.control), image, chain)
    finally:
        store.close()


def test_endpoint_from_config_counts_calls_snapshots_and_daemons(
    base_dir: Path, image: str
) -> None:
    config = base_dir / "config.toml"
    config.write_text('[metrics]\naddress = "127.0.0.1:0"\n')
    with SnapshotterProcess(base_dir / "sn", args=("--config", str(config))) as sp:
        port = metrics_port(sp)
        c = Client(sp.address)
        c.prepare("k1")
        c.commit("c1", "k1")
        c.prepare("k2", parent="c1")
        with pytest.raises(grpc.RpcError):
            c.stat("missing")
        assert len(c.list()) == 2
        c.close()

        text, ss = scrape(port)
        calls = "lazyfs_snapshotter_grpc_calls_total"
        assert value(ss, calls, method="Prepare", code="OK") == 2
        assert value(ss, calls, method="Commit", code="OK") == 1
        assert value(ss, calls, method="Stat", code="NOT_FOUND") == 1
        assert value(ss, calls, method="List", code="OK") == 1
        assert value(ss, "lazyfs_snapshotter_snapshots", kind="committed") == 1
        assert value(ss, "lazyfs_snapshotter_snapshots", kind="active") == 1
        assert value(ss, "lazyfs_snapshotter_snapshots", kind="view") == 0
        assert value(ss, "lazyfs_snapshotter_daemons") == 0
        # Plain layers only: the daemon families are described, with no series.
        assert "# TYPE lazyfs_layer_fetched_bytes_total counter" in text
        assert not [n for n, _ in ss if n.startswith("lazyfs_layer_")]

        mnt = base_dir / "mnt"
        with mounted(image, mnt, "--read-only", "--no-prefetch",
                     "--cache", str(base_dir / "cache")) as m:  # fmt: skip
            assert (mnt / "f").read_bytes() == DATA
            wait_written(mnt)  # the chunks a read fetched are cached once reads pause
            record(sp, m, image)
            store = MetadataStore(sp.root / "metadata.db")
            try:
                with store.transaction() as tx:
                    # Recorded, then gone: its mount point has no daemon any more.
                    tx.add_daemon(m.pid + 100_000, str(base_dir / "gone"),
                                  str(base_dir / "gone.sock"), image, "sha256:" + "d" * 64)
            finally:
                store.close()
            stats = m.stats()
            _, ss = scrape(port)
            daemon = {"daemon": str(m.pid), "chain": CHAIN}
            assert value(ss, "lazyfs_daemon_info", image=image, mountpoint=str(mnt),
                         **daemon) == 1  # fmt: skip
            assert value(ss, "lazyfs_daemon_resident_bytes", **daemon) > 0
            layer = stats["layers"][0]
            lv = {**daemon, "layer": layer["digest"]}
            assert layer["stats"]["bytes_fetched"] > 0
            assert value(ss, "lazyfs_layer_fetched_bytes_total", **lv) == (
                layer["stats"]["bytes_fetched"]
            )
            assert value(ss, "lazyfs_layer_reads_total", **lv) == layer["stats"]["reads"]
            assert value(ss, "lazyfs_cache_bytes", dir=str(base_dir / "cache")) > 0
            assert value(ss, "lazyfs_snapshotter_daemons") == 2
            assert value(ss, "lazyfs_snapshotter_daemons_unreachable") == 1
            assert value(ss, "lazyfs_snapshotter_daemon_scrape_failures_total") == 1
            assert not [ls for n, ls in ss if ("chain", "sha256:" + "d" * 64) in ls]
            _, ss = scrape(port)
            assert value(ss, "lazyfs_snapshotter_daemon_scrape_failures_total") == 2
        # The daemon is gone now too: still a good scrape.
        _, ss = scrape(port)
        assert value(ss, "lazyfs_snapshotter_daemons_unreachable") == 2
        assert not [n for n, _ in ss if n.startswith("lazyfs_layer_")]
        assert sp.proc is not None and sp.proc.poll() is None


def test_a_hung_daemon_costs_the_scrape_seconds_not_the_scrape(
    base_dir: Path, image: str
) -> None:
    flag = ("--metrics-address", "127.0.0.1:0")
    with SnapshotterProcess(base_dir / "sn", args=flag) as sp, \
            mounted(image, base_dir / "mnt", "--read-only", "--no-prefetch",
                    "--cache", str(base_dir / "cache")) as m:  # fmt: skip
        port = metrics_port(sp)
        record(sp, m, image)
        os.kill(m.pid, signal.SIGSTOP)  # its control socket accepts, nothing answers
        try:
            t0 = time.monotonic()
            _, ss = scrape(port)
            assert time.monotonic() - t0 < 8
        finally:
            os.kill(m.pid, signal.SIGCONT)
        assert value(ss, "lazyfs_snapshotter_daemons_unreachable") == 1
        _, ss = scrape(port)  # running again: its series are back
        assert value(ss, "lazyfs_snapshotter_daemons_unreachable") == 0
        assert value(ss, "lazyfs_daemon_files", daemon=str(m.pid), chain=CHAIN) > 0


def test_metrics_address_flag_and_its_errors(base_dir: Path) -> None:
    with SnapshotterProcess(base_dir / "a", args=("--metrics-address", "127.0.0.1:0")) as sp:
        port = metrics_port(sp)
        text, _ = scrape(port)
        assert "lazyfs_snapshotter_snapshots" in text
        argv = [sys.executable, "-m", "lazyfs_snapshotter.cli", "--root", str(base_dir / "b"),
                "--address", str(base_dir / "b.sock")]  # fmt: skip
        used = subprocess.run([*argv, "--metrics-address", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert used.returncode == 2 and used.stderr.count("\n") == 1
        assert f"metrics address 127.0.0.1:{port}" in used.stderr
    bad = subprocess.run([*argv, "--metrics-address", "no-port"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--metrics-address: expected HOST:PORT" in bad.stderr


def test_families_parse_with_the_prometheus_parser(base_dir: Path) -> None:
    # On IPv6 loopback: the logged address is a URL that works (the host in brackets).
    with SnapshotterProcess(base_dir, args=("--metrics-address", "[::1]:0")) as sp:
        m = re.search(r"metrics on (http://\[::1\]:\d+/metrics)", sp.this_run_log())
        assert m is not None, sp.this_run_log()
        with urllib.request.urlopen(m.group(1), timeout=30) as r:
            text = r.read().decode()
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["lazyfs_snapshotter_grpc_calls"] == "counter"
    assert kinds["lazyfs_layer_read_latency_seconds"] == "histogram"
    assert kinds["lazyfs_daemon_resident_bytes"] == "gauge"
