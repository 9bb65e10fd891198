"""lazyfs.fs.daemon: spawn a real mount daemon, attach to it from its mount point alone (as a
restarted snapshotter would), ask it, and stop it by PID without the Popen that started it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyfs.errors import LazyfsError
from lazyfs.fs.daemon import attach, spawn
from lazyfs.fs.unmount import is_mounted, is_stale
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes

DATA = seeded_bytes(200_000, 5)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("daemon-image")
    return f"oci:{make_lazy_layout(d / 'lazy', [make_tar([Item('f', data=DATA)])])}:v1"


def test_spawn_attach_stop_without_the_popen(image: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")],
                    log=tmp_path / "log", timeout=60)  # fmt: skip
    try:
        assert (mnt / "f").read_bytes() == DATA
        d = attach(mnt, expect_pid=started.pid)  # what a restarted process has recorded
        with pytest.raises(LazyfsError, match="served by pid"):
            attach(mnt, expect_pid=started.pid + 1)
        assert d.pid == started.pid and d.proc is None and d.alive()
        assert d.info()["mountpoint"] == os.fspath(mnt)
        assert d.stats()["layers"][0]["stats"]["bytes_fetched"] > 0
        d.stop()
        assert not d.alive()
        assert not is_mounted(os.fspath(mnt)) and not is_stale(os.fspath(mnt))
    finally:
        started.stop()  # a no-op when the test got this far
    assert started.proc is not None and started.proc.poll() is not None
    with pytest.raises(LazyfsError, match="no lazyfs daemon answers"):
        attach(mnt)


def test_a_killed_daemon_leaves_nothing_after_stop(image: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")], timeout=60)
    d.kill()
    assert is_stale(os.fspath(mnt))
    d.stop()
    assert not is_mounted(os.fspath(mnt))


def test_spawn_reports_the_daemons_error(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(LazyfsError, match="not an OCI image layout"):
        spawn(f"oci:{tmp_path / 'nothing'}", mnt, ["--read-only"], timeout=60)
    assert not is_mounted(os.fspath(mnt))


def test_readiness_is_read_from_a_descriptor_above_1024() -> None:
    """select() refuses descriptors past FD_SETSIZE; a snapshotter with many files open hands
    read_ready such a pipe."""
    import fcntl
    import resource

    from lazyfs.fs.daemon import read_ready

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    r, w = os.pipe()
    high = fcntl.fcntl(r, fcntl.F_DUPFD, 2000)
    try:
        os.write(w, b"ready\n")
        assert read_ready(high, timeout=5.0) is not None
    finally:
        for fd in (r, w, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
