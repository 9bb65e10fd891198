"""The mount widens the kernel's read-ahead (lazyfs.fs.serve.READ_AHEAD_KB): a file read
cold through it comes in requests of up to 1 MiB, not 128 KiB, and byte for byte."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
from pathlib import Path

from lazyfs_tools.convert import convert

from lazyfs.fs.serve import READ_AHEAD_KB
from lazyfs.fs.unmount import abort_connection, fuse_device, is_mounted, mount_device
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted

MIB = 1 << 20


def test_a_cold_file_is_read_in_large_requests(tmp_path: Path) -> None:
    big, mapped = seeded_bytes(4 * MIB, 1), seeded_bytes(3 * MIB, 2)
    lower = [Item("big", data=big), Item("mapped", data=mapped)]
    make_layout(tmp_path / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'img'}:v1")
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(f"oci:{tmp_path / 'img'}:v1", tmp_path / "mnt", *args) as m:
        dev = os.stat(m.mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert int(bdi.read_text()) == READ_AHEAD_KB
        got = bytearray()
        with open(m.mountpoint / "big", "rb", buffering=0) as f:
            while piece := f.read(64 * 1024):  # what a small-buffered reader asks
                got += piece
        assert got == big
        reads = mount_stats(m.mountpoint)["requests"]["read"]
        # 128 KiB windows would take 32 requests; 1 MiB windows ramp up to it: about 6.
        assert reads <= 10, reads
        # Page faults of a mapping read ahead (around the fault) as widely.
        with open(m.mountpoint / "mapped", "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:  # fmt: skip
            assert all(
                mm[i : i + 4096] == mapped[i : i + 4096] for i in range(0, len(mapped), 4096)
            )
        faulted = mount_stats(m.mountpoint)["requests"]["read"] - reads
        assert faulted <= 8, faulted


def test_only_a_fuse_mount_on_top_gives_the_device_written_to() -> None:
    """The read-ahead (and a hung daemon's abort) is written by device number: the topmost
    mount at the path, and only when it is FUSE (a disk's 8:16 is not FUSE connection 16)."""
    fuse = "40 30 0:52 / /m\\040x rw,nosuid shared:7 - fuse.lazyfs lazyfs rw,user_id=0\n"
    plain = "41 30 0:53 / /m\\040x rw - fuse lazyfs rw\n"
    disk = "42 40 8:16 / /m\\040x rw master:1 - ext4 /dev/sdb rw\n"
    other = "43 30 0:54 / /n rw - fuse.lazyfs lazyfs rw\n"
    assert fuse_device([fuse, other], "/m x") == (0, 52)
    assert fuse_device([fuse, plain], "/m x") == (0, 53)  # the topmost of two
    assert fuse_device([fuse, disk], "/m x") is None  # mounted over it: not ours to widen
    assert fuse_device([disk], "/m x") is None
    assert fuse_device([disk, fuse], "/m x") == (0, 52)
    assert fuse_device([other], "/m x") is None


def test_a_hung_daemon_under_another_mount_is_cut_by_its_own_device(tmp_path: Path) -> None:
    """A spawned daemon keeps its connection's number: at stop, the path's topmost mount may
    be another (here a tmpfs over it), and only the recorded number reaches the hung one."""
    make_layout(tmp_path / "src", [make_tar([Item("f", data=b"x")])], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'img'}:v1")
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    connections = "/sys/fs/fuse/connections"
    own_fusectl = not os.listdir(connections) and not is_mounted(connections)
    if own_fusectl:  # where the abort files live; systemd mounts it, a bare machine may not
        subprocess.run(["mount", "-t", "fusectl", "none", connections], check=True)
    with contextlib.ExitStack() as stack:
        if own_fusectl:
            stack.callback(subprocess.run, ["umount", connections], check=True)
        m = stack.enter_context(mounted(f"oci:{tmp_path / 'img'}:v1", tmp_path / "mnt", *args))
        mnt = os.fspath(m.mountpoint)
        assert m.device is not None and m.device == mount_device(mnt)
        subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
        try:
            assert mount_device(mnt) is None  # the path's top is not FUSE now
            os.kill(m.pid, signal.SIGSTOP)  # hung: nothing it serves would be answered
            abort_connection(mnt, m.device)
        finally:
            subprocess.run(["umount", mnt], check=True)
            os.kill(m.pid, signal.SIGCONT)
        try:
            os.stat(mnt)
            raise AssertionError("the connection was not aborted")
        except OSError as e:
            assert e.errno == 107, e  # ENOTCONN: cut, so no reader waits on the hung daemon
        assert is_mounted(mnt)  # stale until the stop clears it
