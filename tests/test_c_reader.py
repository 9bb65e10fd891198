"""The patched pyfuse3's C reader thread (scripts/pyfuse3_cache_dir.py, scripts/pyfuse3_reader.c):
requests that need no Python are answered without waking the daemon's trio loop, and however
the mount ends, the daemon goes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import os
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pyfuse3
import pytest
from lazyfs_tools.convert import convert

from lazyfs.fs import ops
from lazyfs.fs.unmount import abort_connection, is_mounted, unmount
from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import Mount, mount_stats, mounted, start_mount

REPO = Path(__file__).resolve().parent.parent


def image(tmp: Path) -> str:
    lower = [Item("d", "dir", mode=0o755), Item("d/f", data=b"lower file")]
    make_layout(tmp / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
    return f"oci:{tmp / 'img'}:v1"


def counts(mnt: Path) -> tuple[dict[str, int], int]:
    """The reader's counts, and the requests that reached Python handlers."""
    stats = mount_stats(mnt)
    return stats["c_requests"], sum(stats["requests"].values())


def test_isatty_is_answered_in_c_and_opendir_not_asked(tmp_path: Path) -> None:
    n = 300
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(image(tmp_path), tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        fd = os.open(d / "f", os.O_RDONLY)
        try:
            os.listdir(d)  # warm: looked up, listed
            before, python_before = counts(m.mountpoint)
            for _ in range(n):
                assert not os.isatty(fd)
            with pytest.raises(OSError) as e:
                fcntl.ioctl(fd, termios.TCGETS, bytes(64))
            assert e.value.errno == errno.ENOTTY
            for _ in range(n):
                os.close(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
            after, python_after = counts(m.mountpoint)
        finally:
            os.close(fd)
        # every ioctl in C; no OPENDIR or RELEASEDIR at all (the first OPENDIR answered ENOSYS:
        # the kernel's no_opendir); nothing handed to trio, no handler run
        assert 2 * n >= after["answered"] - before["answered"] >= n + 1
        assert after["handed"] == before["handed"]
        assert python_after == python_before


def _busy(mnt: Path) -> tuple[threading.Thread, threading.Event]:
    """A thread that keeps the reader answering (isatty in a loop) until the mount goes."""
    stop = threading.Event()

    def loop() -> None:
        try:
            fd = os.open(mnt / "d" / "f", os.O_RDONLY)
        except OSError:
            return
        try:
            while not stop.is_set():
                try:
                    os.isatty(fd)
                    os.listdir(mnt / "d")
                except OSError:
                    return  # ENOTCONN/ENOENT: the mount is gone
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the connection is gone
                os.close(fd)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t, stop


def _umount(m: Mount) -> None:
    unmount(os.fspath(m.mountpoint), lazy=True)  # busy (the thread's fd): detached


def _sigterm(m: Mount) -> None:
    os.kill(m.proc.pid, signal.SIGTERM)


FUSECTL = Path("/sys/fs/fuse/connections")


def _abort(m: Mount) -> None:
    # The connections' control files live in fusectl, which this machine may not mount.
    mounted_here = not os.path.ismount(FUSECTL)
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=True)
    try:
        abort_connection(os.fspath(m.mountpoint))
    finally:
        if mounted_here:
            subprocess.run(["umount", str(FUSECTL)], check=True)


# A version-2 file capability (cap_net_raw permitted): the kernel checks the format.
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)


def test_a_write_asks_no_capability_while_no_file_has_one(tmp_path: Path) -> None:
    """The kernel asks for security.capability before every write(2) (file_remove_privs): the
    reader answers ENODATA in C while no file can have one, and hands the question to Python
    again once one is set (or when a lower file has one, or an earlier upper is there)."""
    lower = [
        Item("d", "dir", mode=0o755),
        Item("d/f", data=b"lower file"),
        Item("d/ping", data=b"ping", xattrs={"security.capability": CAP.decode()}),
    ]

    def writes(m: Mount, path: Path, n: int) -> int:
        """GETXATTRs that reached Python for ``n`` writes to ``path``."""
        before = mount_stats(m.mountpoint)["requests"].get("getxattr", 0)
        with open(path, "r+b", buffering=0) as f:
            for _ in range(n):
                f.write(b"w")
        return int(mount_stats(m.mountpoint)["requests"].get("getxattr", 0) - before)

    for case, items in (("plain", lower[:2]), ("capable", lower)):
        make_layout(tmp_path / case / "src", [make_tar(items)], tag="v1")
        convert(f"oci:{tmp_path / case / 'src'}:v1", f"oci:{tmp_path / case / 'img'}:v1")
    args = ("--cache", str(tmp_path / "c"), "--no-prefetch")
    plain, capable = (f"oci:{tmp_path / c / 'img'}:v1" for c in ("plain", "capable"))
    mnt = tmp_path / "mnt"
    with mounted(plain, mnt, "--upper", str(tmp_path / "up"), *args) as m:
        assert writes(m, mnt / "d" / "f", 50) == 0
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "d" / "f", "security.capability")
        assert e.value.errno == errno.ENODATA
        os.setxattr(mnt / "d" / "f", "security.capability", CAP)  # from now on Python answers
        assert os.getxattr(mnt / "d" / "f", "security.capability") == CAP
        assert writes(m, mnt / "d" / "f", 5) >= 5
        assert m.stats()["handler_errors"] == 0
    with mounted(plain, mnt, "--upper", str(tmp_path / "up"), *args) as m:  # an earlier upper
        assert writes(m, mnt / "d" / "f", 5) >= 5
    with mounted(capable, mnt, "--upper", str(tmp_path / "up2"), *args) as m:
        assert os.getxattr(mnt / "d" / "ping", "security.capability") == CAP
        assert writes(m, mnt / "d" / "f", 5) >= 5


@pytest.mark.parametrize("end", [_umount, _sigterm, _abort], ids=["umount", "sigterm", "abort"])
def test_the_daemon_ends_however_the_mount_does(
    tmp_path: Path, end: Callable[[Mount], None]
) -> None:
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    m = start_mount(image(tmp_path), tmp_path / "mnt", *args)
    try:
        t, stop = _busy(m.mountpoint)
        deadline = time.monotonic() + 10
        while mount_stats(m.mountpoint)["c_requests"]["answered"] < 100:  # it is busy
            assert time.monotonic() < deadline
            time.sleep(0.01)
        end(m)
        assert m.wait(10), "the daemon did not exit"
        stop.set()
        t.join(10)
        assert not t.is_alive()
        assert m.proc.returncode is not None
        if end is not _abort:  # an aborted connection leaves a stale mount (m.stop clears it)
            assert not is_mounted(os.fspath(m.mountpoint))
    finally:
        m.stop()


def _patcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pyfuse3_cache_dir", REPO / "scripts" / "pyfuse3_cache_dir.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_patch_is_idempotent() -> None:
    patcher = _patcher()
    pkg = Path(pyfuse3.__file__).parent
    installed = (pkg / "__init__.c").read_text()
    assert patcher.READER_MARK in installed
    assert patcher.patch_source(installed) == installed
    # made from the original kept beside it, which no patch touched
    original = (pkg / patcher.PRISTINE).read_text()
    assert not any(mark in original for mark in (*patcher.MARKS, *patcher.OLD_MARKS))
    assert patcher.patch_source(original) == installed
    # the reader's two stop calls (before unmount and before destroy), its receive; fh 0 as
    # the inode in every callback that gets a handle, readdirplus too; nothing of the old
    # C table of directories
    assert installed.count("lazyfs_reader_stop(); ") == 2
    assert installed.count("lazyfs_receive_buf(__pyx_v_7pyfuse3_session, ") == 1
    assert installed.count(f"{patcher.INO_FH_MARK}\n  if (__pyx_v_fi->fh == 0)") == len(
        patcher.FH_CALLBACKS
    )
    assert "readdirplus" in patcher.FH_CALLBACKS
    assert "lazyfs_cached_dirs" not in installed


def test_an_unpatched_pyfuse3_needs_no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """What lazyfs does when the extension lacks the patch: no reader."""
    monkeypatch.setattr(ops, "patched_pyfuse3", lambda: None)
    assert ops.start_c_reader() is False
    assert ops.c_reader_counts() == {}
