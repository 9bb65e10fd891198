"""Issue 9 on real mounts: no request can end the daemon, whiteouts for every legal name, deep
trees, xattrs that stay off the host, sparse and bounded copy-up, nosuid/nodev, self-links."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from lazyfs.formats.toc import Chunk, Entry
from lazyfs.fs.copyup import CopyUp
from lazyfs.fs.ops import HANDLERS
from lazyfs.fs.unmount import is_mounted
from lazyfs.fs.upper import Upper
from lazyfs.store import ChunkCache, LayerStore
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import Mount, lazyfs_cmd, mounted, run

REPO = Path(__file__).resolve().parent.parent
LONG = "l" * 255
LONG2 = "m" * 255


def build(tmp: Path, layers: list[list[Item]], name: str = "img") -> str:
    make_lazy_layout(tmp / name, [make_tar(items) for items in layers])
    return f"oci:{tmp / name}:v1"


def rw_args(tmp: Path, *extra: str) -> tuple[str, ...]:
    return ("--upper", str(tmp / "upper"), "--cache", str(tmp / "cache"), "--no-prefetch", *extra)


def errno_of(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno is not None
    return ei.value.errno


def stats(mnt: Path) -> dict[str, object]:
    res = run(*lazyfs_cmd("stats", str(mnt), "--json"))
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


# ---------------------------------------------------------------------- no exception escapes


@contextlib.contextmanager
def faulty_mount(image: str, tmp: Path, flag: Path) -> Iterator[Mount]:
    mnt = tmp / "mnt"
    mnt.mkdir()
    log = tmp / "faulty.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.support.faultyops", str(flag)),
                *("-v", "mount", image, str(mnt), "--foreground", *rw_args(tmp)),
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    m = Mount(proc.pid, mnt, proc=proc, log=log)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(str(mnt)):
            assert proc.poll() is None and time.monotonic() < deadline, m.log_text()
            time.sleep(0.02)
        yield m
    finally:
        m.stop()


def test_an_exception_in_any_handler_is_eio_and_the_mount_stays(tmp_path: Path) -> None:
    image = build(tmp_path, [[Item("etc", "dir", mode=0o755), Item("etc/lower", data=b"low")]])
    flag = tmp_path / "flag"
    with faulty_mount(image, tmp_path, flag) as m:
        mnt = m.mountpoint
        rfd = os.open(mnt / "f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        os.write(rfd, b"data")
        (mnt / "d").mkdir()
        (mnt / "d2").mkdir()
        (mnt / "victim").write_bytes(b"v")
        os.symlink("f", mnt / "s")
        os.setxattr(mnt / "f", "user.a", b"1")
        tried: set[str] = set()

        def fails(name: str, op: Callable[[], object]) -> None:
            flag.write_text(name)
            try:
                with pytest.raises(OSError) as ei:
                    op()
                assert ei.value.errno == errno.EIO, (name, ei.value)
            finally:
                flag.write_text("")
            tried.add(name)
            assert (mnt / "f").read_bytes() == b"data", name  # still serving

        # First: only the first OPEN reaches the daemon (which then answers ENOSYS), and an
        # EIO does not end that.
        fails("open", lambda: os.open(mnt / "f", os.O_RDONLY))
        # Likewise only the first OPENDIR (then no RELEASEDIR ever: the kernel's no_opendir).
        fails("opendir", lambda: os.listdir(mnt / "d"))
        dfd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        fails("lookup", lambda: os.stat(mnt / "never-looked-up"))
        os.pwrite(rfd, b"d", 0)  # the same byte: a write drops the kernel's attributes
        fails("getattr", lambda: os.fstat(rfd))
        fails("setattr", lambda: os.chmod(mnt / "f", 0o600))
        fails("readlink", lambda: os.readlink(mnt / "s"))
        fails("mknod", lambda: os.mkfifo(mnt / "fifo"))
        fails("mkdir", lambda: os.mkdir(mnt / "newdir"))
        fails("unlink", lambda: os.unlink(mnt / "victim"))
        fails("rmdir", lambda: os.rmdir(mnt / "d2"))
        fails("symlink", lambda: os.symlink("x", mnt / "s2"))
        fails("rename", lambda: os.rename(mnt / "victim", mnt / "victim2"))
        fails("link", lambda: os.link(mnt / "f", mnt / "f2"))
        fails("create", lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644))
        fresh = os.open(mnt / "f", os.O_RDONLY)
        os.posix_fadvise(fresh, 0, 0, os.POSIX_FADV_DONTNEED)  # the next read asks the daemon
        fails("read", lambda: os.pread(fresh, 4, 0))
        os.close(fresh)
        fails("write", lambda: os.pwrite(rfd, b"DATA", 0))
        fails("fsync", lambda: os.fsync(rfd))
        fails("readdir", lambda: os.listdir(dfd))
        fails("fsyncdir", lambda: os.fsync(dfd))
        fails("statfs", lambda: os.statvfs(mnt))
        fails("getxattr", lambda: os.getxattr(mnt / "f", "user.a"))
        fails("listxattr", lambda: os.listxattr(mnt / "f"))
        fails("setxattr", lambda: os.setxattr(mnt / "f", "user.b", b"2"))
        fails("removexattr", lambda: os.removexattr(mnt / "f", "user.a"))
        # forget has no reply to fail: the mount just stays up.  Nor
        # is flush asked for again (answered ENOSYS at the first close): close just works.
        (mnt / "forgotten").write_bytes(b"x")
        for name, op in (
            ("flush", lambda: os.close(os.open(mnt / "f", os.O_RDONLY))),
            # Its last link gone, the kernel evicts the inode and sends FORGET at once: no
            # machine-wide drop_caches needed.
            ("forget", lambda: os.unlink(mnt / "forgotten")),
        ):
            flag.write_text(name)
            op()
            time.sleep(0.3)
            flag.write_text("")
            tried.add(name)
        os.close(dfd)
        os.close(rfd)
        # access is never sent (default_permissions: the kernel checks modes itself), nor
        # releasedir (no_opendir), nor release once OPEN answered ENOSYS (no_open), even for a
        # file created before that (this kernel, 6.18, sends none for it either)
        assert tried | {"access", "releasedir", "release"} == HANDLERS
        assert (mnt / "f").read_bytes() == b"data"
        assert sorted(os.listdir(mnt)) == ["d", "d2", "etc", "f", "s", "victim"]
        assert "injected into forget\n" in m.log_text()  # it really reached its handler
        errors = stats(mnt)["handler_errors"]
        assert isinstance(errors, int) and errors >= 25
        assert m.proc.poll() is None
    log = m.log_text()
    assert "RuntimeError: injected into read" in log and "Traceback" in log


# ---------------------------------------------------------------------- names up to NAME_MAX


def test_whiteouts_and_renames_for_every_legal_name(tmp_path: Path) -> None:
    image = build(
        tmp_path,
        [[Item("d", "dir", mode=0o755), Item(f"d/{LONG}", data=b"lower"), Item(f"d/{LONG2}")]],
    )
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, *rw_args(tmp_path)):
        assert os.statvfs(mnt).f_namemax == 255
        assert errno_of(os.stat, mnt / "d" / ("x" * 256)) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, mnt / ("x" * 256)) == errno.ENAMETOOLONG
        os.unlink(mnt / "d" / LONG)  # a lower file: its whiteout has room
        with open(mnt / "d" / LONG2, "ab") as f:  # promoted, appended, then deleted
            f.write(b"appended")
        os.unlink(mnt / "d" / LONG2)
        (mnt / "n").write_bytes(b"renamed")
        os.rename(mnt / "n", mnt / ("r" * 253))
        (mnt / ("c" * 255)).write_bytes(b"created")
        assert sorted(os.listdir(mnt / "d")) == []
    with mounted(image, mnt, *rw_args(tmp_path)):
        assert sorted(os.listdir(mnt / "d")) == []  # both stay deleted: no lost data returns
        assert (mnt / ("r" * 253)).read_bytes() == b"renamed"
        (mnt / "d" / LONG).write_bytes(b"again")  # re-created over its whiteout
        res = run(*lazyfs_cmd("commit", str(mnt), str(tmp_path / "diff.tar")))
        assert res.returncode == 0, res.stderr
    with tarfile.open(tmp_path / "diff.tar") as tar:
        names = tar.getnames()
    assert f"d/.wh.{LONG2}" in names and f"d/{LONG}" in names
    assert f"d/.wh.{LONG}" not in names


def test_old_upper_dirs_with_wh_files_still_work(tmp_path: Path) -> None:
    image = build(tmp_path, [[Item("a", data=b"a"), Item("b", data=b"b")]])
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / ".wh.a").write_bytes(b"")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, *rw_args(tmp_path)):
        assert os.listdir(mnt) == ["b"]
        (mnt / "a").write_bytes(b"new")  # the old marker goes with the new file
    assert not (tmp_path / "upper" / ".wh.a").exists()
    with mounted(image, mnt, *rw_args(tmp_path)):
        assert (mnt / "a").read_bytes() == b"new"


# ---------------------------------------------------------------------- deep trees, self-links


def test_write_a_thousand_directories_deep(tmp_path: Path) -> None:
    depth = 1000
    dirs = ["/".join(["a"] * i) for i in range(1, depth + 1)]
    items = [Item(d, "dir", mode=0o755) for d in dirs] + [Item(dirs[-1] + "/f", data=b"deep")]
    image = build(tmp_path, [items])
    mnt = tmp_path / "mnt"
    path = mnt.joinpath(*(["a"] * depth), "f")
    with mounted(image, mnt, *rw_args(tmp_path)):
        with open(path, "ab") as f:
            f.write(b"+write")
        assert path.read_bytes() == b"deep+write"
    try:
        with mounted(image, mnt, *rw_args(tmp_path)):
            assert path.read_bytes() == b"deep+write"
            os.unlink(path)
            assert os.listdir(path.parent) == []
    finally:
        # pytest's clean-up of old temp dirs recurses once per level: leave no deep tree.
        subprocess.run(["rm", "-rf", str(tmp_path / "upper")], check=True)


def test_self_hardlink_across_layers_leaves_no_ghost(tmp_path: Path) -> None:
    image = build(
        tmp_path,
        [[Item("a", data=b"content")], [Item("a", "hardlink", link="a")]],
    )
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "--read-only", "--cache", str(tmp_path / "cache"), "--no-prefetch"):
        assert os.listdir(mnt) == ["a"]
        assert (mnt / "a").read_bytes() == b"content"
        assert os.stat(mnt / "a").st_nlink == 1


# ---------------------------------------------------------------------- xattrs and copy-up


def test_copy_up_keeps_host_xattrs_off_the_host(tmp_path: Path) -> None:
    xattrs = {
        "trusted.overlay.opaque": "y",
        "security.selinux": "system_u:object_r:etc_t:s0",
        "user.lazyfs.whiteout": "",
        "user.keep": "kept",
    }
    image = build(tmp_path, [[Item("f", data=b"", mode=0o000, xattrs=xattrs)]])
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, *rw_args(tmp_path)):
        # served from the image while the file is lower
        assert os.getxattr(mnt / "f", "trusted.overlay.opaque") == b"y"
        os.chmod(mnt / "f", 0o644)  # copy-up
        assert errno_of(os.setxattr, mnt / "f", "user.lazyfs.whiteout", b"") == errno.EPERM
        assert (mnt / "f").read_bytes() == b""
    host = os.listxattr(tmp_path / "upper" / "f")
    assert host == ["user.keep"]
    with mounted(image, mnt, *rw_args(tmp_path)):
        assert os.listdir(mnt) == ["f"]  # an image's marker xattr does not make a whiteout


def test_xattr_names_with_nul_are_refused_before_mounting(tmp_path: Path) -> None:
    """A TOC can carry a name no kernel can hold: the layer is refused at the TOC edge with one
    line naming it, so no handler and no copy-up ever meets it (os.setxattr would raise
    ValueError)."""
    image = build(tmp_path, [[Item("f", data=b"x", xattrs={"user.a\0b": "1", "user.ok": "2"})]])
    (tmp_path / "mnt").mkdir()
    res = run(*lazyfs_cmd("mount", image, str(tmp_path / "mnt"), *rw_args(tmp_path)))
    assert res.returncode != 0
    assert "bad xattr name" in res.stderr and "ValueError" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not is_mounted(str(tmp_path / "mnt"))


def sparse_layers() -> list[list[Item]]:
    return [
        [
            Item("zeros", data=bytes(32 * 1024 * 1024)),
            Item("random", data=seeded_bytes(2 * 1024 * 1024, 5)),
            Item("mixed", data=bytes(1 << 20) + b"tail" + bytes(1 << 20)),
        ]
    ]


def test_copy_up_is_sparse_and_bounded(tmp_path: Path) -> None:
    image = build(tmp_path, sparse_layers())
    mnt = tmp_path / "mnt"
    upper = tmp_path / "upper"
    with mounted(image, mnt, *rw_args(tmp_path, "--copy-up-limit", "1M")):
        os.chmod(mnt / "zeros", 0o600)  # no data to write: within any limit
        os.chmod(mnt / "mixed", 0o600)
        assert errno_of(os.chmod, mnt / "random", 0o600) == errno.EFBIG
        assert (mnt / "mixed").read_bytes() == bytes(1 << 20) + b"tail" + bytes(1 << 20)
        before = stats(mnt)["layers"]
        assert isinstance(before, list)
        layer = before[0]["stats"]
        assert layer["reads"] == 0 and layer["cache_misses"] == 0  # copy-ups are no reads
    st = os.stat(upper / "zeros")
    assert st.st_size == 32 * 1024 * 1024 and st.st_blocks == 0
    assert os.stat(upper / "mixed").st_blocks * 512 <= 256 * 1024
    assert sorted(os.listdir(upper)) == ["mixed", "zeros"]  # no temp file left


def test_copy_up_refuses_what_the_upper_cannot_hold(tmp_path: Path) -> None:
    image = build(tmp_path, [[Item("big", data=seeded_bytes(12 * 1024 * 1024, 9))]])
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        mnt = tmp_path / "mnt"
        args = ("--upper", str(small / "upper"), "--cache", str(tmp_path / "cache"))
        with mounted(image, mnt, *args, "--no-prefetch"):
            assert errno_of(os.chmod, mnt / "big", 0o600) == errno.ENOSPC
            assert os.listdir(small / "upper") == []  # refused up front, nothing written
            (mnt / "small-file").write_bytes(b"still writable")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_copy_up_of_a_terabyte_of_zeros_writes_nothing(tmp_path: Path) -> None:
    """A TOC may declare any size; holes cost no disk and no fetch."""
    tib = 1 << 40
    entry = Entry(
        name="huge",
        type="reg",
        mode=0o644,
        size=tib,
        chunks=(Chunk(file_offset=0, size=tib, offset=0, end=0, digest="", zeros=True),),
    )

    async def copy(up: Upper) -> None:
        store = LayerStore(ChunkCache(tmp_path / "cache"))
        await CopyUp(store, [], up, max_bytes=0).regular(
            ("tmp",), 0, entry, tib, lambda: [("huge",)]
        )

    with Upper(tmp_path / "upper") as up:
        t0 = time.monotonic()
        trio.run(copy, up)
        assert time.monotonic() - t0 < 5
    st = os.stat(tmp_path / "upper" / "huge")
    assert st.st_size == tib and st.st_blocks == 0 and stat.S_IMODE(st.st_mode) == 0o644


# ---------------------------------------------------------------------- privilege


def privileged_items() -> list[Item]:
    return [
        Item("bin", "dir", mode=0o755),
        Item("bin/id", data=Path(shutil.which("id") or "/usr/bin/id").read_bytes(), mode=0o4755),
        Item("dev", "dir", mode=0o755),
        Item("dev/zero", "char", mode=0o666, major=1, minor=5),
    ]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's temp root is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="lazyfs-test-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "suid-dev"])
def test_nosuid_nodev_by_default(tmp_path: Path, public_dir: Path, opt_in: bool) -> None:
    image = build(tmp_path, [privileged_items()])
    mnt = public_dir / "mnt"
    extra = ("--suid", "--dev") if opt_in else ()
    cache = ("--cache", str(tmp_path / "cache"))
    with mounted(image, mnt, "--read-only", "--allow-other", "--no-prefetch", *cache, *extra):
        options = next(
            line.split()[5] for line in open("/proc/self/mountinfo") if f" {mnt} " in line
        )
        res = as_nobody(str(mnt / "bin" / "id"), "-u")
        assert res.returncode == 0, res.stderr
        dev = as_nobody("head", "-c", "4", str(mnt / "dev" / "zero"))
    if opt_in:
        assert res.stdout.strip() == "0"
        assert dev.returncode == 0 and dev.stdout == "\0" * 4
    else:
        assert "nosuid" in options and "nodev" in options
        assert res.stdout.strip() != "0"  # the set-uid bit gives nobody nothing
        assert dev.returncode != 0 and "Permission denied" in dev.stderr
