"""The C reader answers LOOKUP, GETATTR, READLINK and READ from memory itself, through a Python
function, while trio waits for I/O (lazyfs.fs.fastpath): the answers are the queued handlers'
(bytes, errors, lookup counts), and trio's thread holds the lock whenever it runs a task."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
from lazyfs_tools.convert import convert

from lazyfs.fs import fastpath
from lazyfs.fs.ops import patched_pyfuse3
from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import Mount, mount_stats, mounted

N = 40


def image(tmp: Path) -> str:
    lower = [
        Item("d", "dir", mode=0o755),
        *(Item(f"d/f{i}", data=f"file {i} ".encode() * (i + 1)) for i in range(N)),
        Item("d/link", "symlink", link="f1", mode=0o777),
    ]
    make_layout(tmp / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
    return f"oci:{tmp / 'img'}:v1"


def content(i: int) -> bytes:
    return f"file {i} ".encode() * (i + 1)


def fast(m: Mount) -> int:
    return int(mount_stats(m.mountpoint)["c_requests"]["fast"])


def read_uncached(path: Path) -> bytes:
    """The file's bytes, asked of the daemon (its cached pages dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_lookups_attributes_links_and_reads_from_memory_are_answered_in_the_reader(
    tmp_path: Path,
) -> None:
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(image(tmp_path), tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        for i in range(N):  # fetched: their chunks are in memory from now on
            assert read_uncached(d / f"f{i}") == content(i)
        time.sleep(0.2)  # the fetches' writes done: trio waits for I/O
        before = fast(m)
        for i in range(N):
            assert (d / f"f{i}").stat().st_size == len(content(i))
        assert os.readlink(d / "link") == "f1"
        for i in range(N):
            assert read_uncached(d / f"f{i}") == content(i)
        # answered as the queued handlers answer: errors too
        with pytest.raises(OSError) as e:
            os.stat(d / "f1" / "x")
        assert e.value.errno == errno.ENOTDIR
        with pytest.raises(OSError) as e:
            os.stat(d / ("x" * 300))
        assert e.value.errno == errno.ENAMETOOLONG
        assert not (d / "absent").exists()
        stats = mount_stats(m.mountpoint)
        # N lookups, the symlink's, N reads: on a quiet machine nearly all in the reader; on a
        # loaded one the OS may pause trio's thread while it holds the lock, and they queue
        assert stats["c_requests"]["fast"] - before >= 1
        assert stats["handler_errors"] == 0
    # the reader ends cleanly (its Python thread state goes with it), the daemon with it
    assert m.proc.returncode == 0, m.log_text()


def test_listings_are_answered_in_the_reader(tmp_path: Path) -> None:
    """READDIRPLUS packed in Python as libfuse packs it: every name once (a big directory in
    many replies), each entry's attributes and type right, and its dentry made (no LOOKUP
    after it), its lookup counted."""
    big = 3000
    lower = [
        Item("d", "dir", mode=0o755),
        Item("d/sub", "dir", mode=0o700),
        Item("d/link", "symlink", link="f1", mode=0o777),
        *(Item(f"d/f{i}", data=b"x" * i, mode=0o640) for i in range(N)),
        Item("big", "dir", mode=0o755),
        *(Item(f"big/a-rather-long-name-{i:05}", data=b"") for i in range(big)),
    ]
    make_layout(tmp_path / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'img'}:v1")
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(f"oci:{tmp_path / 'img'}:v1", tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        d.stat()
        time.sleep(0.2)
        before = mount_stats(m.mountpoint)
        with os.scandir(d) as it:
            entries = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it}
        assert entries == {
            "sub": (True, False),
            "link": (False, True),
            **{f"f{i}": (False, False) for i in range(N)},
        }
        for i in range(N):
            st = os.lstat(d / f"f{i}")
            assert (st.st_size, st.st_mode & 0o777) == (i, 0o640)
        assert os.lstat(d / "sub").st_mode & 0o777 == 0o700
        assert os.readlink(d / "link") == "f1"
        names = os.listdir(m.mountpoint / "big")
        assert sorted(names) == [f"a-rather-long-name-{i:05}" for i in range(big)]
        after = mount_stats(m.mountpoint)
        # The listing made every dentry: no name was looked up but "big" (without the
        # dentries, each of the N + 2 lstats above would be a LOOKUP).  A kernel short of
        # memory may reclaim an unused dentry meanwhile, so a stray one or two are let by (one
        # full-suite run under heavy load saw one).
        looked_up = after["requests"].get("lookup", 0) - before["requests"].get("lookup", 0)
        assert 1 <= looked_up <= 3
        assert after["requests"]["readdir"] - before["requests"].get("readdir", 0) >= 3
        assert after["c_requests"]["fast"] - before["c_requests"]["fast"] >= 1  # (loaded: fewer)
        assert after["handler_errors"] == 0
    assert m.proc.returncode == 0, m.log_text()


def test_reads_of_cached_chunks_are_answered_in_the_reader(tmp_path: Path) -> None:
    """Over a warm chunk cache (a new mount: nothing in memory), small chunks are read from
    their cache files in the reader, hashed at their first read as the trio thread would."""
    img = image(tmp_path)
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(img, tmp_path / "mnt", *args) as m:
        for i in range(N):
            assert read_uncached(m.mountpoint / "d" / f"f{i}") == content(i)
    with mounted(img, tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        for i in range(N):
            (d / f"f{i}").stat()
        time.sleep(0.2)
        before = mount_stats(m.mountpoint)
        for i in range(N):
            assert read_uncached(d / f"f{i}") == content(i)
        after = mount_stats(m.mountpoint)
        assert after["c_requests"]["fast"] - before["c_requests"]["fast"] >= 1  # (as above)
        assert sum(la["stats"]["cache_misses"] for la in after["layers"]) == 0
        assert m.stats()["handler_errors"] == 0
    assert m.proc.returncode == 0, m.log_text()


def test_lookups_counted_in_the_reader_keep_an_unlinked_open_file(tmp_path: Path) -> None:
    """An upper file looked up by the fast path is open; unlinked, it stays readable and
    writable (its lookup was counted, so the daemon keeps a descriptor), and a name made again
    shows the new file, not the cached old one."""
    img = image(tmp_path)
    args = ("--upper", str(tmp_path / "up"), "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(img, tmp_path / "mnt", *args) as m:  # upper files, for the next mount
        for i in range(N):
            (m.mountpoint / "d" / f"u{i}").write_bytes(b"upper %d" % i)
    with mounted(img, tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        time.sleep(0.2)
        before = fast(m)
        fds = [os.open(d / f"u{i}", os.O_RDWR) for i in range(N)]
        try:
            assert fast(m) - before >= 1  # most, unless the machine is loaded (see above)
            for i in range(N):
                os.unlink(d / f"u{i}")
                (d / f"u{i}").write_bytes(b"new")
            for i, fd in enumerate(fds):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, 100, 0) == b"upper %d" % i
                os.pwrite(fd, b"U", 0)
                assert os.fstat(fd).st_nlink == 0
                assert (d / f"u{i}").read_bytes() == b"new"
        finally:
            for fd in fds:
                os.close(fd)
        # and a lower file changed (copied up): its new attributes show
        os.chmod(d / "f3", 0o600)
        assert (d / "f3").stat().st_mode & 0o777 == 0o600
        assert read_uncached(d / "f3") == content(3)
        assert m.stats()["handler_errors"] == 0


def test_trio_holds_the_lock_while_it_runs_tasks() -> None:
    """The invariant the fast path rests on: the reader (here a thread trying the same lock)
    gets it only while trio waits for I/O, never while a task runs."""
    lib = patched_pyfuse3()
    assert lib is not None
    try_lock = ctypes.CDLL(lib._name).lazyfs_trio_try_enter
    unlock = ctypes.CDLL(lib._name).lazyfs_trio_leave
    seen: list[tuple[str, bool]] = []

    def probe(label: str) -> None:
        got = bool(try_lock())
        if got:
            unlock()
        seen.append((label, got))

    async def main() -> None:
        lock = fastpath._TrioLock(ctypes.CDLL(lib._name), ctypes.PyDLL(lib._name))
        lock.enter()
        trio.lowlevel.add_instrument(lock)
        try:
            # a task running (no checkpoint): a thread cannot take the lock
            t = threading.Thread(target=probe, args=("task",))
            t.start()
            t.join()
            # trio sleeping (waiting for I/O): it can
            t = threading.Thread(target=lambda: (time.sleep(0.1), probe("waiting")))
            t.start()
            await trio.sleep(0.3)
            t.join()
        finally:
            trio.lowlevel.remove_instrument(lock)
            lock._leave()

    trio.run(main)
    assert seen == [("task", False), ("waiting", True)]


def test_replies_are_laid_out_as_the_kernel_reads_them() -> None:
    assert fastpath._ATTR.size == 88  # struct fuse_attr
    assert fastpath._ENTRY.size == 128  # struct fuse_entry_out
    assert fastpath._ATTR_OUT.size == 104  # struct fuse_attr_out
    assert pyfuse3.ROOT_INODE == 1
