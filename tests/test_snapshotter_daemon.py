"""The lazyfs-snapshotter process: socket handling, sd_notify, errors that must not kill it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from lazyfs_snapshotter.api import snapshots_pb2
from lazyfs_snapshotter.testing import Client, SnapshotterProcess


@pytest.fixture
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lzs-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_socket_dir_stale_socket_and_clean_stop(base_dir: Path) -> None:
    sp = SnapshotterProcess(base_dir)
    Path(sp.address).parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sp.address)  # bound, never listening: what a killed daemon leaves
    stale.close()
    with sp:
        assert stat.S_IMODE(os.stat(Path(sp.address).parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sp.address).st_mode) == 0o600
        c = Client(sp.address)
        assert c.list() == []
        c.close()
        assert sp.stop() == 0  # SIGTERM: a clean exit
    assert not os.path.exists(sp.address)


def test_refuses_a_live_socket_and_a_used_root(base_dir: Path) -> None:
    with SnapshotterProcess(base_dir / "a") as sp:
        argv = [sys.executable, "-m", "lazyfs_snapshotter.cli"]
        res = subprocess.run([*argv, "--address", sp.address, "--root", str(base_dir / "b")],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "already listening" in res.stderr
        res = subprocess.run(
            [*argv, "--address", str(base_dir / "b.sock"), "--root", str(sp.root)],
            capture_output=True, text=True, timeout=30,
        )
        assert res.returncode == 2 and "uses this root" in res.stderr
        assert res.stderr.count("\n") == 1


def test_sd_notify_ready(base_dir: Path) -> None:
    notify = base_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(notify))
        s.settimeout(20)
        with SnapshotterProcess(base_dir / "sn", env={"NOTIFY_SOCKET": str(notify)}) as sp:
            assert s.recv(100) == b"READY=1"
            sp.stop()
            assert s.recv(100) == b"STOPPING=1"


def test_an_unexpected_error_is_internal_and_the_daemon_keeps_serving(base_dir: Path) -> None:
    with SnapshotterProcess(base_dir) as sp:
        c = Client(sp.address)
        c.prepare("a")
        fs = sp.root / "snapshots" / "1" / "fs"
        shutil.rmtree(fs)
        fs.write_text("not a directory")  # Usage walks it: NotADirectoryError
        with pytest.raises(grpc.RpcError) as e:
            c.call("Usage", snapshots_pb2.UsageRequest(key="a"))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert c.stat("a").name == "a"
        c.close()
        assert "Traceback" in sp.log_text() and sp.proc is not None
        assert sp.proc.poll() is None


def test_systemd_unit() -> None:
    unit = (Path(__file__).parent.parent / "snapshotter" / "lazyfs-snapshotter.service")
    lines = {line.strip() for line in unit.read_text().splitlines()}
    for needed in ("Type=notify", "Before=containerd.service", "KillMode=process"):
        assert needed in lines
    exec_start = next(x for x in lines if x.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0].endswith("/lazyfs-snapshotter")


def test_a_corrupt_metadata_store_is_a_one_line_error(base_dir: Path) -> None:
    root = base_dir / "root"
    root.mkdir()
    (root / "metadata.db").write_bytes(b"this is not sqlite" * 100)
    res = subprocess.run(
        [sys.executable, "-m", "lazyfs_snapshotter.cli", "--address", str(base_dir / "s.sock"),
         "--root", str(root)], capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 2 and "metadata.db" in res.stderr
    assert res.stderr.count("\n") == 1


def test_a_start_that_fails_after_the_fork_server_stops_it_at_once(base_dir: Path) -> None:
    with socket.socket() as taken:  # held: the metrics address cannot be bound
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "lazyfs_snapshotter.cli", "--address", str(base_dir / "s.sock"),
             "--root", str(base_dir / "root"), "--log-level", "debug",
             "--metrics-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1].startswith("lazyfs-snapshotter: metrics address")
    m = re.search(r"fork server pid (\d+) on (\S+)", res.stderr)
    assert m is not None, res.stderr
    # Stopped (and reaped) by the snapshotter before it exited, not a second later by itself.
    assert not os.path.exists(f"/proc/{m.group(1)}")
    assert not os.path.exists(m.group(2))
