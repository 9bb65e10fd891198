"""The daemon keeps one descriptor per upper file (by inode, MAX_UPPER_FDS of them, an unlinked
file's until the kernel forgets it): it must follow the file's mode for a daemon the mode binds
(no CAP_DAC_OVERRIDE), survive the LRU closing it and the descriptor limit, and never leave a
request with EBADF or a handler error."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
from pathlib import Path

import pytest

from lazyfs.fs.ops import MAX_UPPER_FDS
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar
from lazyfs.testing.mounts import Mount, mounted

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def drop_dac_override() -> None:
    """In the daemon before it starts: root without the capabilities that skip mode checks
    (root's capabilities after exec are its bounding set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def effective_caps(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def uncached(fd: int) -> int:
    """``fd``, its pages dropped: the next read asks the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def errno_of(fn: object, *args: object) -> int:
    assert callable(fn)
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno is not None
    return ei.value.errno


def image(tmp: Path, items: list[Item]) -> str:
    make_lazy_layout(tmp / "img", [make_tar(items)])
    return f"oci:{tmp / 'img'}:v1"


def rw_args(tmp: Path) -> tuple[str, ...]:
    return ("--upper", str(tmp / "upper"), "--cache", str(tmp / "cache"), "--no-prefetch")


def no_errors(m: Mount) -> None:
    assert m.stats()["handler_errors"] == 0


def test_descriptors_follow_the_mode_for_a_daemon_the_mode_binds(tmp_path: Path) -> None:
    names = ("ro", "wo", "gone", "closed")
    lower = [
        Item("f", "dir", mode=0o755),
        *(Item(f"f/{n}", data=f"lower {n}".encode(), mode=0o644) for n in names),
    ]
    with mounted(
        image(tmp_path, lower), tmp_path / "mnt", *rw_args(tmp_path), preexec_fn=drop_dac_override
    ) as m:
        assert not effective_caps(m.pid) & (1 << _CAP_DAC_OVERRIDE | 1 << _CAP_DAC_READ_SEARCH)
        f = m.mountpoint / "f"

        # read-only when first read, then made writable: the write reopens (was EBADF)
        os.chmod(f / "ro", 0o444)
        fd = os.open(f / "ro", os.O_RDWR)  # the caller is root: the kernel lets it
        try:
            assert os.pread(uncached(fd), 64, 0) == b"lower ro"
            assert errno_of(os.pwrite, fd, b"X", 0) == errno.EACCES  # the daemon may not
            os.chmod(f / "ro", 0o644)
            assert os.pwrite(fd, b"UPPER", 0) == 5
            assert os.pread(uncached(fd), 64, 0) == b"UPPER ro"
        finally:
            os.close(fd)

        # write-only: written through a write-only descriptor (was EACCES), unreadable until
        # a chmod lets the daemon read it
        os.chmod(f / "wo", 0o200)
        fd = os.open(f / "wo", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"W", 0) == 1
            assert errno_of(os.pread, uncached(fd), 64, 0) == errno.EACCES
            os.chmod(f / "wo", 0o600)
            assert os.pread(uncached(fd), 64, 0) == b"Wower wo"
        finally:
            os.close(fd)

        # unlinked while its kept descriptor is read-only: a chmod through the caller's
        # descriptor, then a write reopens the very inode (no name leads to it)
        os.chmod(f / "gone", 0o444)
        fd = os.open(f / "gone", os.O_RDWR)
        try:
            assert os.pread(uncached(fd), 64, 0) == b"lower gone"
            os.unlink(f / "gone")
            os.fchmod(fd, 0o644)
            assert os.pwrite(fd, b"G", 0) == 1
            assert os.pread(uncached(fd), 64, 0) == b"Gower gone"
            assert os.fstat(fd).st_size == len(b"Gower gone")
        finally:
            os.close(fd)

        # unlinked with a mode that lets the daemon open nothing: an O_PATH handle is kept,
        # and a chmod lets it be reopened
        os.chmod(f / "closed", 0o000)
        fd = os.open(f / "closed", os.O_RDWR)
        try:
            os.unlink(f / "closed")
            assert os.fstat(fd).st_size == len(b"lower closed")
            assert errno_of(os.pread, uncached(fd), 64, 0) == errno.EACCES
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 5)
            assert os.pwrite(fd, b"C", 0) == 1
            assert os.pread(uncached(fd), 64, 0) == b"Cower"
        finally:
            os.close(fd)

        # whiteouts (mode 0) are made and recognised by a daemon the mode binds
        (f / "gone").write_bytes(b"again")  # over its whiteout
        assert (f / "gone").read_bytes() == b"again"
        os.unlink(f / "gone")
        no_errors(m)
    with mounted(
        image(tmp_path, lower), tmp_path / "mnt", *rw_args(tmp_path), preexec_fn=drop_dac_override
    ) as m:
        assert sorted(os.listdir(m.mountpoint / "f")) == ["ro", "wo"]
        no_errors(m)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def holds(pid: int, path: Path) -> bool:
    """Whether the process has a descriptor open on ``path``."""
    fds = Path(f"/proc/{pid}/fd")
    targets = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.add(os.readlink(fds / fd))
    return str(path) in targets


def test_descriptors_at_the_lru_and_the_descriptor_limit(tmp_path: Path) -> None:
    many = MAX_UPPER_FDS + 40
    # Left by an earlier mount: upper files with no descriptor kept yet.
    (tmp_path / "upper" / "d").mkdir(parents=True)
    for name in ("pinned", "other"):
        (tmp_path / "upper" / "d" / name).write_bytes(name.encode())
    with mounted(image(tmp_path, [Item("d", "dir", mode=0o755)]), tmp_path / "mnt",
                 *rw_args(tmp_path)) as m:  # fmt: skip
        d = m.mountpoint / "d"
        limit = resource.prlimit(m.pid, resource.RLIMIT_NOFILE)

        # At the limit with nothing to shed (the one kept descriptor is an unlinked file's):
        # the open's own errno, and the mount goes on.
        pinned = os.open(d / "pinned", os.O_RDWR)
        try:
            os.unlink(d / "pinned")
            os.stat(d / "other")  # looked up before the limit
            resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (open_fds(m.pid), limit[1]))
            try:
                assert errno_of((d / "other").read_bytes) == errno.EMFILE
                assert os.pread(uncached(pinned), 64, 0) == b"pinned"
            finally:
                resource.prlimit(m.pid, resource.RLIMIT_NOFILE, limit)
            assert (d / "other").read_bytes() == b"other"
        finally:
            os.close(pinned)

        (d / "held").write_bytes(b"held")
        held = os.open(d / "held", os.O_RDWR)
        assert holds(m.pid, tmp_path / "upper" / "d" / "held")
        (d / "unlinked").write_bytes(b"unlinked")
        gone = os.open(d / "unlinked", os.O_RDWR)
        try:
            os.unlink(d / "unlinked")
            for i in range(many):  # each create keeps a descriptor: the LRU closes the oldest
                (d / f"n{i}").write_bytes(b"%d" % i)
            assert open_fds(m.pid) < MAX_UPPER_FDS + 64
            assert not holds(m.pid, tmp_path / "upper" / "d" / "held")
            # the LRU closed "held"'s descriptor under its reader: reopened by path
            assert os.pread(uncached(held), 64, 0) == b"held"
            assert os.pwrite(held, b"H", 0) == 1
            assert os.pread(uncached(held), 64, 0) == b"Held"
            # an unlinked file's descriptor is never trimmed: it is the only way back
            assert os.pread(uncached(gone), 64, 0) == b"unlinked"
            assert os.pwrite(gone, b"U", 0) == 1
            assert os.pread(uncached(gone), 64, 0) == b"Unlinked"

            # At the descriptor limit: opening sheds kept descriptors and tries again.
            resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (open_fds(m.pid) + 1, limit[1]))
            try:
                for i in range(40):  # long closed by the LRU: each read opens one
                    with open(d / f"n{i}", "rb") as r:
                        assert os.pread(uncached(r.fileno()), 64, 0) == b"%d" % i
                for i in range(40, 60):
                    with open(d / f"n{i}", "r+b") as w:
                        w.write(b"w")
                for i in range(10):
                    (d / f"late{i}").write_bytes(b"late")  # create keeps one too
                assert os.pread(uncached(gone), 64, 0) == b"Unlinked"
            finally:
                resource.prlimit(m.pid, resource.RLIMIT_NOFILE, limit)
            assert (d / "n45").read_bytes()[:1] == b"w"
            assert (d / "late9").read_bytes() == b"late"
        finally:
            os.close(held)
            os.close(gone)
        no_errors(m)
        assert "Traceback" not in m.log.read_text() if m.log else True
