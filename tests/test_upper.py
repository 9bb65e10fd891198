"""lazyfs.fs.upper: every primitive on a real directory, symlink-escape attempts, whiteouts,
atomic copy-up and the committed layer tar (read back by tarfile and GNU tar).  Runs as root."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lazyfs.fs.layertar import commit_layer
from lazyfs.fs.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, Upper


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside the upper dir that no operation may touch."""
    s = tmp_path / "outside"
    s.mkdir()
    (s / "secret").write_bytes(b"keep")
    os.chmod(s / "secret", 0o600)
    return s


def snapshot(d: Path) -> dict[str, tuple[int, int, int, int, bytes | str | None]]:
    out: dict[str, tuple[int, int, int, int, bytes | str | None]] = {}
    for p in [d, *sorted(d.rglob("*"))]:
        st = p.lstat()
        body: bytes | str | None = None
        if p.is_symlink():
            body = os.readlink(p)
        elif p.is_file():
            body = p.read_bytes()
        out[str(p)] = (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_nlink, body)
        out[str(p) + "#xattr"] = (0, 0, 0, 0, repr(sorted(os.listxattr(p, follow_symlinks=False))))
    return out


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Upper]:
    u = Upper(tmp_path / "upper")
    yield u
    u.close()


def root_of(tmp_path: Path) -> Path:
    return tmp_path / "upper"


def up_root(up: Upper) -> Path:
    return Path(f"/proc/self/fd/{up.root_fd}")


def errno_of(fn: Callable[..., object], *args: object, **kw: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno is not None
    return ei.value.errno


def write(u: Upper, path: tuple[str, ...], data: bytes, mode: int = 0o644) -> None:
    fd = u.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(u: Upper, path: tuple[str, ...]) -> bytes:
    fd = u.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- construction


def test_init_creates_root_and_refuses_symlinked_root(tmp_path: Path) -> None:
    u = Upper(tmp_path / "new")
    assert (tmp_path / "new").is_dir()
    u.close()
    u.close()  # idempotent
    again = Upper(tmp_path / "new")  # an existing directory is used as it is
    again.close()
    (tmp_path / "link").symlink_to(tmp_path / "new")
    with pytest.raises(OSError) as ei:
        Upper(tmp_path / "link")
    assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_context_manager_and_root_stat(tmp_path: Path) -> None:
    with Upper(tmp_path / "u") as u:
        st = u.lstat(())
        assert st is not None and stat.S_ISDIR(st.st_mode)
        assert u.listdir(()) == []
        assert u.statvfs().f_bsize > 0
    assert u.root_fd == -1


# ---------------------------------------------------------------------- component validation


@pytest.mark.parametrize(
    "bad",
    [("..",), (".",), ("a/b",), ("",), ("a\0b",), ("ok", ".."), ("/",), ("..", "etc")],
)
def test_bad_components_rejected(up: Upper, bad: tuple[str, ...]) -> None:
    assert errno_of(up.open, bad, os.O_RDONLY) == errno.EINVAL
    assert errno_of(up.mkdir, bad, 0o755) == errno.EINVAL
    assert errno_of(up.unlink, bad) == errno.EINVAL
    assert errno_of(up.lstat, bad) == errno.EINVAL
    assert errno_of(up.whiteout, bad) == errno.EINVAL
    assert errno_of(up.rename, ("x",), bad) == errno.EINVAL


def test_string_path_is_a_type_error(up: Upper) -> None:
    with pytest.raises(TypeError):
        up.lstat("etc")  # type: ignore[arg-type]


def test_marker_names_reserved_for_user_operations(up: Upper) -> None:
    for p in [(".wh.x",), (Upper.OPAQUE,), (".wh.d", "f")]:
        assert errno_of(up.open, p, os.O_WRONLY | os.O_CREAT) == errno.EPERM
        assert errno_of(up.mkdir, p, 0o755) == errno.EPERM
        assert errno_of(up.symlink, p, "t") == errno.EPERM
    write(up, ("f",), b"")
    assert errno_of(up.rename, ("f",), (".wh.f",)) == errno.EPERM
    assert errno_of(up.link, ("f",), (".wh.f",)) == errno.EPERM
    assert errno_of(up.whiteout, (".wh.f",)) == errno.EPERM
    assert errno_of(up.whiteout, (".wh.d", "f")) == errno.EPERM
    assert Upper.is_marker(".wh.f") and Upper.is_marker(Upper.OPAQUE)
    assert not Upper.is_marker("f.wh.") and not Upper.is_marker(Upper.TEMP_PREFIX + "1")


def test_root_cannot_be_removed_or_created(up: Upper) -> None:
    assert errno_of(up.unlink, ()) == errno.EBUSY
    assert errno_of(up.rmdir, ()) == errno.EBUSY
    assert errno_of(up.rename, (), ("x",)) == errno.EBUSY
    assert errno_of(up.whiteout, ()) == errno.EBUSY


# ---------------------------------------------------------------------- the operations


def test_open_create_read_write(up: Upper, tmp_path: Path) -> None:
    up.mkdir(("d",), 0o755)
    write(up, ("d", "f"), b"hello", 0o640)
    st = up.lstat(("d", "f"))
    assert st is not None and stat.S_IMODE(st.st_mode) == 0o640  # exact, no umask
    assert read(up, ("d", "f")) == b"hello"
    assert (root_of(tmp_path) / "d" / "f").read_bytes() == b"hello"
    assert errno_of(up.open, ("d", "f"), os.O_RDONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    fd = up.open(("d", "g"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    assert errno_of(up.open, ("d", "missing"), os.O_RDONLY) == errno.ENOENT
    assert errno_of(up.open, ("d", "f", "x"), os.O_RDONLY) == errno.ENOTDIR
    # O_TRUNC and O_APPEND survive the O_PATH re-open.
    fd = up.open(("d", "f"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.close(fd)
    assert read(up, ("d", "f")) == b"hello!"
    os.close(up.open(("d", "f"), os.O_WRONLY | os.O_TRUNC))
    assert read(up, ("d", "f")) == b""
    dfd = up.open(("d",), os.O_RDONLY | os.O_DIRECTORY)
    assert sorted(os.listdir(dfd)) == ["f", "g"]
    os.close(dfd)
    rfd = up.open((), os.O_RDONLY)
    assert os.listdir(rfd) == ["d"]
    os.close(rfd)
    pfd = up.open(("d", "f"), os.O_PATH)
    assert stat.S_ISREG(os.fstat(pfd).st_mode)
    os.close(pfd)


def test_open_refuses_special_files(up: Upper) -> None:
    up.mknod(("fifo",), stat.S_IFIFO | 0o644, 0)
    up.mknod(("null",), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # A fifo would block and a device would be opened with our privileges: both refused.
    assert errno_of(up.open, ("fifo",), os.O_RDONLY) == errno.EACCES
    assert errno_of(up.open, ("null",), os.O_RDWR) == errno.EACCES
    assert errno_of(up.truncate, ("null",), 0) == errno.EACCES


def test_lstat_and_listdir(up: Upper) -> None:
    assert up.lstat(("nope",)) is None
    assert up.lstat(("nope", "deeper")) is None
    write(up, ("f",), b"x")
    assert up.lstat(("f", "under-a-file")) is None  # ENOTDIR counts as absent
    up.symlink(("l",), "/etc/passwd")
    st = up.lstat(("l",))
    assert st is not None and stat.S_ISLNK(st.st_mode)
    up.whiteout(("gone",))
    up.set_opaque(())
    assert up.listdir(()) == sorted([".wh..wh..opq", "gone", "f", "l"])
    assert errno_of(up.listdir, ("f",)) == errno.ENOTDIR
    assert errno_of(up.listdir, ("l",)) == errno.ENOTDIR


def test_mkdir_mknod_symlink_readlink(up: Upper, tmp_path: Path) -> None:
    up.mkdir(("d",), 0o2775)
    st = up.lstat(("d",))
    assert st is not None and stat.S_IMODE(st.st_mode) == 0o2775
    assert errno_of(up.mkdir, ("d",), 0o755) == errno.EEXIST
    up.mknod(("d", "p"), stat.S_IFIFO | 0o640, 0)
    up.mknod(("d", "c"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
    up.mknod(("d", "b"), stat.S_IFBLK | 0o600, os.makedev(7, 0))
    up.mknod(("d", "s"), stat.S_IFSOCK | 0o755, 0)
    up.mknod(("d", "r"), stat.S_IFREG | 0o604, 0)
    kinds = {n: stat.S_IFMT(up.lstat(("d", n)).st_mode) for n in "pcbsr"}  # type: ignore[union-attr]
    assert kinds == {
        "p": stat.S_IFIFO,
        "c": stat.S_IFCHR,
        "b": stat.S_IFBLK,
        "s": stat.S_IFSOCK,
        "r": stat.S_IFREG,
    }
    c = up.lstat(("d", "c"))
    assert c is not None and c.st_rdev == os.makedev(1, 5) and stat.S_IMODE(c.st_mode) == 0o600
    assert errno_of(up.mknod, ("d", "x"), stat.S_IFDIR | 0o755, 0) == errno.EINVAL
    # The target is data: absolute, dotted, dangling, all stored verbatim and never resolved.
    for name, target in [("abs", "/etc/shadow"), ("up", "../../.."), ("dang", "no/such")]:
        up.symlink(("d", name), target)
        assert up.readlink(("d", name)) == target
        assert os.readlink(root_of(tmp_path) / "d" / name) == target
    assert errno_of(up.readlink, ("d", "r")) == errno.EINVAL
    assert errno_of(up.symlink, ("d", "bad"), "a\0b") == errno.EINVAL


def test_link_unlink_rmdir(up: Upper) -> None:
    write(up, ("f",), b"data")
    up.mkdir(("d",), 0o755)
    up.link(("f",), ("d", "g"))
    st = up.lstat(("f",))
    assert st is not None and st.st_nlink == 2
    up.symlink(("s",), "f")
    up.link(("s",), ("s2",))  # links the symlink itself
    s2 = up.lstat(("s2",))
    assert s2 is not None and stat.S_ISLNK(s2.st_mode)
    assert errno_of(up.link, ("d",), ("d2",)) == errno.EPERM
    up.unlink(("f",))
    assert up.lstat(("f",)) is None and read(up, ("d", "g")) == b"data"
    assert errno_of(up.unlink, ("d",)) in (errno.EISDIR, errno.EPERM)
    assert errno_of(up.rmdir, ("d",)) == errno.ENOTEMPTY
    up.unlink(("d", "g"))
    up.rmdir(("d",))
    assert up.lstat(("d",)) is None
    assert errno_of(up.unlink, ("d",)) == errno.ENOENT


def test_rmtree(up: Upper, tmp_path: Path, sentinel: Path) -> None:
    before = snapshot(sentinel)
    up.mkdir(("t",), 0o755)
    cur: tuple[str, ...] = ("t",)
    for i in range(40):  # deep enough to matter, cheap enough to be fast
        cur = (*cur, f"d{i}")
        up.mkdir(cur, 0o700)
        write(up, (*cur, "f"), b"x")
        up.symlink((*cur, "out"), str(sentinel))  # must be unlinked, never descended
    up.mknod(("t", "fifo"), stat.S_IFIFO | 0o600, 0)
    up.mkdir(("t", "ro"), 0o000)
    write(up, ("t", "ro", "f"), b"x")
    up.rmtree(("t",))
    assert up.lstat(("t",)) is None
    write(up, ("file",), b"x")
    up.rmtree(("file",))  # a non-directory is simply unlinked
    up.symlink(("ls",), str(sentinel))
    up.rmtree(("ls",))
    assert up.listdir(()) == []
    assert snapshot(sentinel) == before
    assert errno_of(up.rmtree, ("absent",)) == errno.ENOENT


def test_rename_plain_noreplace_exchange(up: Upper) -> None:
    write(up, ("a",), b"A")
    write(up, ("b",), b"B")
    up.mkdir(("d",), 0o755)
    assert errno_of(up.rename, ("a",), ("b",), RENAME_NOREPLACE) == errno.EEXIST
    up.rename(("a",), ("b",), RENAME_EXCHANGE)
    assert read(up, ("a",)) == b"B" and read(up, ("b",)) == b"A"
    up.rename(("a",), ("d", "c"), RENAME_NOREPLACE)
    assert up.lstat(("a",)) is None and read(up, ("d", "c")) == b"B"
    up.rename(("b",), ("d", "c"))  # plain rename replaces
    assert read(up, ("d", "c")) == b"A" and up.lstat(("b",)) is None
    assert errno_of(up.rename, ("nope",), ("x",), RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(up.rename, ("d",), ("x",), 4) == errno.EINVAL  # RENAME_WHITEOUT: not ours
    up.mkdir(("e",), 0o700)
    up.rename(("d",), ("e",), RENAME_EXCHANGE)  # directories swap too
    assert up.listdir(("e",)) == ["c"] and up.listdir(("d",)) == []


def test_chmod_chown_utimens(up: Upper) -> None:
    write(up, ("f",), b"")
    up.chmod(("f",), 0o4711)
    up.chown(("f",), 1234, 5678)
    st = up.lstat(("f",))
    assert st is not None and (st.st_uid, st.st_gid) == (1234, 5678)
    up.chmod(("f",), 0o4711)  # chown cleared set-uid; set it again
    up.chown(("f",), -1, 42)  # -1 keeps the uid (and clears set-uid again)
    st = up.lstat(("f",))
    assert st is not None and (st.st_uid, st.st_gid) == (1234, 42)
    up.utimens(("f",), 1_000_000_001, 2_000_000_002)
    st = up.lstat(("f",))
    assert st is not None and (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    up.utimens(("f",), None, 3_000_000_003)  # atime omitted
    st = up.lstat(("f",))
    assert st is not None and (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 3_000_000_003)
    up.utimens(("f",), 4, None)
    st = up.lstat(("f",))
    assert st is not None and (st.st_atime_ns, st.st_mtime_ns) == (4, 3_000_000_003)
    up.utimens(("f",), -1_500_000_000, None)  # before 1970
    st = up.lstat(("f",))
    assert st is not None and st.st_atime_ns == -1_500_000_000
    up.utimens(("f",), None, None)
    assert errno_of(up.utimens, ("gone",), None, None) == errno.ENOENT
    assert errno_of(up.utimens, ("gone",), 1, 1) == errno.ENOENT
    # A symlink: its own owner and times change; chmod is refused as the kernel does.
    up.symlink(("l",), "f")
    up.chown(("l",), 7, 8)
    up.utimens(("l",), 5, 6)
    ls, fs = up.lstat(("l",)), up.lstat(("f",))
    assert ls is not None and fs is not None
    assert (ls.st_uid, ls.st_mtime_ns) == (7, 6) and fs.st_uid == 1234
    assert errno_of(up.chmod, ("l",), 0o777) == errno.EOPNOTSUPP
    # The root itself.
    up.chmod((), 0o711)
    up.chown((), 3, 4)
    up.utimens((), None, 9_000_000_000)
    r = up.lstat(())
    assert r is not None and stat.S_IMODE(r.st_mode) == 0o711 and r.st_uid == 3
    assert r.st_mtime_ns == 9_000_000_000


def test_truncate_and_fsync(up: Upper) -> None:
    write(up, ("f",), b"0123456789")
    up.truncate(("f",), 4)
    assert read(up, ("f",)) == b"0123"
    up.truncate(("f",), 6)
    assert read(up, ("f",)) == b"0123\0\0"
    up.mkdir(("d",), 0o755)
    assert errno_of(up.truncate, ("d",), 0) == errno.EISDIR
    up.fsync(("f",))
    up.fsync(("d",))
    up.fsync(())
    up.syncfs()


def test_xattrs(up: Upper, tmp_path: Path) -> None:
    write(up, ("f",), b"")
    up.setxattr(("f",), "user.a", b"\x00\xffbinary")
    up.setxattr(("f",), "trusted.b", b"t")
    assert up.getxattr(("f",), "user.a") == b"\x00\xffbinary"
    assert sorted(up.listxattr(("f",))) == ["trusted.b", "user.a"]
    assert errno_of(up.setxattr, ("f",), "user.a", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(up.setxattr, ("f",), "user.c", b"x", os.XATTR_REPLACE) == errno.ENODATA
    up.removexattr(("f",), "user.a")
    assert errno_of(up.getxattr, ("f",), "user.a") == errno.ENODATA
    # A symlink's xattrs are its own: the target's stay untouched.
    up.symlink(("l",), "f")
    up.setxattr(("l",), "trusted.link", b"L")
    assert up.getxattr(("l",), "trusted.link") == b"L"
    assert os.getxattr(root_of(tmp_path) / "l", "trusted.link", follow_symlinks=False) == b"L"
    assert "trusted.link" not in up.listxattr(("f",))
    # Devices and fifos get xattrs without being opened.
    up.mknod(("p",), stat.S_IFIFO | 0o600, 0)
    up.setxattr(("p",), "trusted.p", b"1")
    assert up.getxattr(("p",), "trusted.p") == b"1"
    up.setxattr((), "trusted.root", b"r")
    assert up.getxattr((), "trusted.root") == b"r"


# ---------------------------------------------------------------------- whiteouts


def test_whiteout_and_opaque(up: Upper, tmp_path: Path) -> None:
    up.mkdir(("d",), 0o755)
    assert not up.has_whiteout(("d", "x"))
    up.whiteout(("d", "x"))
    up.whiteout(("d", "x"))  # idempotent
    wh = root_of(tmp_path) / "d" / "x"  # under the name it hides, as overlayfs
    st = wh.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0
    assert os.getxattr(wh, "user.lazyfs.whiteout") == b""
    assert up.has_whiteout(("d", "x")) and up.is_whiteout(("d", "x"))
    assert not up.has_whiteout(("nodir", "x"))
    up.remove_whiteout(("d", "x"))
    up.remove_whiteout(("d", "x"))  # absent is fine
    assert not up.has_whiteout(("d", "x")) and not wh.exists()
    assert errno_of(up.whiteout, ("nodir", "x")) == errno.ENOENT
    # An ordinary empty file is no whiteout, and remove_whiteout leaves it alone.
    write(up, ("d", "empty"), b"", 0o000)
    assert not up.has_whiteout(("d", "empty"))
    up.remove_whiteout(("d", "empty"))
    assert (root_of(tmp_path) / "d" / "empty").exists()
    assert not up.is_opaque(("d",))
    up.set_opaque(("d",))
    up.set_opaque(("d",))
    assert up.is_opaque(("d",)) and (root_of(tmp_path) / "d" / Upper.OPAQUE).is_file()
    assert not up.is_opaque(("missing",))
    assert errno_of(up.set_opaque, (".wh.d",)) == errno.EPERM


def test_whiteout_every_legal_name(up: Upper, tmp_path: Path) -> None:
    longest = "n" * 255  # ".wh." + this would not fit in a name
    up.whiteout((longest,))
    assert up.has_whiteout((longest,))
    up.remove_whiteout((longest,))
    assert not up.has_whiteout((longest,))


def test_whiteout_replaces_a_file_in_one_step(up: Upper, tmp_path: Path) -> None:
    write(up, ("f",), b"promoted copy")
    up.whiteout(("f",))  # no moment with neither the copy nor the whiteout
    assert up.is_whiteout(("f",))
    assert [n for n in up.listdir(()) if not Upper.is_temp(n)] == ["f"]
    up.mkdir(("d",), 0o755)
    assert errno_of(up.whiteout, ("d",)) == errno.EISDIR  # a directory is removed first
    # A symlink planted under the name is replaced, never followed.
    (root_of(tmp_path) / "l").symlink_to("/etc/passwd")
    up.whiteout(("l",))
    assert up.is_whiteout(("l",))


def test_legacy_whiteouts_are_honoured(up: Upper, tmp_path: Path) -> None:
    """Upper directories of earlier versions hold ``.wh.NAME`` files."""
    up.mkdir(("d",), 0o755)
    (root_of(tmp_path) / "d" / ".wh.x").write_bytes(b"")
    assert up.has_whiteout(("d", "x"))
    up.remove_whiteout(("d", "x"))
    assert not (root_of(tmp_path) / "d" / ".wh.x").exists()
    (root_of(tmp_path) / "d" / ".wh.y").write_bytes(b"")
    up.whiteout(("d", "y"))  # rewritten in the new form
    assert up.is_whiteout(("d", "y")) and not (root_of(tmp_path) / "d" / ".wh.y").exists()


# ---------------------------------------------------------------------- symlink escapes


@pytest.fixture
def planted(up: Upper, tmp_path: Path, sentinel: Path) -> Upper:
    """Symlinks in the upper dir pointing out of it, as an image or a user could plant them."""
    root = root_of(tmp_path)
    (root / "to_root").symlink_to("/")
    (root / "to_sentinel").symlink_to(sentinel)
    (root / "dotdot").symlink_to("../outside")
    (root / "file_link").symlink_to(sentinel / "secret")
    (root / "dangling").symlink_to(sentinel / "new")
    (root / "d").mkdir()
    (root / "d" / "up2").symlink_to("../../outside")
    return up


THROUGH = [("to_root", "tmp"), ("to_sentinel",), ("dotdot",), ("d", "up2"), ("to_sentinel", "x")]


@pytest.mark.parametrize("via", THROUGH)
def test_escape_through_directory_symlink(
    planted: Upper, tmp_path: Path, sentinel: Path, via: tuple[str, ...]
) -> None:
    up = planted
    before = snapshot(sentinel)
    bad = {errno.ENOTDIR, errno.ELOOP, errno.ENOENT, errno.EEXIST}
    inside = (*via, "secret")
    attempts = [
        lambda: up.open(inside, os.O_RDONLY),
        lambda: up.open((*via, "new"), os.O_WRONLY | os.O_CREAT),
        lambda: up.open((*via, "new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        lambda: up.mkdir((*via, "newdir"), 0o777),
        lambda: up.mknod((*via, "n"), stat.S_IFIFO | 0o600, 0),
        lambda: up.symlink((*via, "s"), "/"),
        lambda: up.chmod(inside, 0o777),
        lambda: up.chown(inside, 99, 99),
        lambda: up.utimens(inside, 1, 1),
        lambda: up.truncate(inside, 0),
        lambda: up.setxattr(inside, "user.evil", b"1"),
        lambda: up.getxattr(inside, "user.x"),
        lambda: up.removexattr(inside, "user.x"),
        lambda: up.unlink(inside),
        lambda: up.rmtree(inside),
        lambda: up.rename(inside, ("stolen",)),
        lambda: up.link(inside, ("stolen",)),
        lambda: up.readlink(inside),
        lambda: up.listdir(via),
        lambda: up.whiteout(inside),
        lambda: up.set_opaque(via),
        lambda: up.fsync(inside),
        lambda: up.ensure_dir((*via, "e"), mode=0o755, uid=0, gid=0, mtime_ns=0, xattrs={}),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno in bad, (i, ei.value)
    assert up.lstat(inside) is None
    assert snapshot(sentinel) == before
    assert not os.path.lexists("/tmp/secret")


def test_escape_through_final_symlink(planted: Upper, tmp_path: Path, sentinel: Path) -> None:
    up = planted
    before = snapshot(sentinel)
    for name in ["file_link", "dangling", "to_sentinel"]:
        p = (name,)
        assert errno_of(up.open, p, os.O_RDONLY) == errno.ELOOP
        assert errno_of(up.open, p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) == errno.ELOOP
        assert errno_of(up.truncate, p, 0) == errno.ELOOP
        assert errno_of(up.chmod, p, 0o777) == errno.EOPNOTSUPP
        assert errno_of(up.fsync, p) == errno.ELOOP
        assert errno_of(up.mkdir, p, 0o755) == errno.EEXIST
        # These act on the symlink itself, which lives inside the upper dir.
        up.chown(p, 5, 5)
        up.utimens(p, 1, 1)
        up.setxattr(p, "trusted.on_link", b"1")
        assert up.getxattr(p, "trusted.on_link") == b"1"
        assert (
            errno_of(up.ensure_dir, p, mode=0o755, uid=0, gid=0, mtime_ns=0, xattrs={})
            == errno.EEXIST
        )
    # Linking and renaming a symlink move the link, not its target.
    up.link(("dangling",), ("dangling2",))
    up.rename(("to_sentinel",), ("moved",))
    assert up.readlink(("moved",)) == str(sentinel)
    up.unlink(("moved",))
    up.rmtree(("to_root",))
    assert snapshot(sentinel) == before
    assert (sentinel / "secret").read_bytes() == b"keep"
    assert not (sentinel / "new").exists()


def test_symlinked_intermediate_swapped_in(up: Upper, tmp_path: Path, sentinel: Path) -> None:
    """A directory replaced by a symlink between operations is not followed later."""
    before = snapshot(sentinel)
    up.mkdir(("etc",), 0o755)
    write(up, ("etc", "conf"), b"mine")
    root = root_of(tmp_path)
    (root / "etc" / "conf").unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(sentinel)
    assert errno_of(write, up, ("etc", "conf"), b"evil") == errno.ENOTDIR
    assert errno_of(up.setxattr, ("etc", "secret"), "user.x", b"1") == errno.ENOTDIR
    assert up.lstat(("etc", "secret")) is None
    assert snapshot(sentinel) == before


# ---------------------------------------------------------------------- copy-up helpers


def test_ensure_dir(up: Upper, tmp_path: Path) -> None:
    meta = {
        "mode": 0o1775,
        "uid": 3,
        "gid": 4,
        "mtime_ns": 5_000_000_006,
        "xattrs": {"user.d": b"1"},
    }
    assert up.ensure_dir(("usr",), **meta) is True  # type: ignore[arg-type]
    st = up.lstat(("usr",))
    assert st is not None and stat.S_IMODE(st.st_mode) == 0o1775
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (3, 4, 5_000_000_006)
    assert up.getxattr(("usr",), "user.d") == b"1"
    assert up.ensure_dir(("usr",), mode=0o700, uid=0, gid=0, mtime_ns=0, xattrs={}) is False
    st2 = up.lstat(("usr",))
    assert st2 is not None and stat.S_IMODE(st2.st_mode) == 0o1775  # untouched
    assert (
        errno_of(up.ensure_dir, ("a", "b"), mode=0o755, uid=0, gid=0, mtime_ns=0, xattrs={})
        == errno.ENOENT
    )
    write(up, ("file",), b"")
    assert (
        errno_of(up.ensure_dir, ("file",), mode=0o755, uid=0, gid=0, mtime_ns=0, xattrs={})
        == errno.EEXIST
    )
    # The root always exists: ensure_dir(()) gives it the lower metadata (the mount calls it
    # once, when it promotes the root).
    assert up.ensure_dir((), mode=0o750, uid=1, gid=1, mtime_ns=7, xattrs={}) is True
    r = up.lstat(())
    assert r is not None and stat.S_IMODE(r.st_mode) == 0o750 and r.st_mtime_ns == 7


# ---------------------------------------------------------------------- commit_layer


def build_sample(up: Upper) -> None:
    up.mkdir(("etc",), 0o755)
    write(up, ("etc", "hosts"), b"127.0.0.1 localhost\n", 0o644)
    up.link(("etc", "hosts"), ("etc", "hosts.bak"))
    up.link(("etc", "hosts"), ("z-hardlink",))
    up.setxattr(("etc", "hosts"), "user.note", b"hi")
    up.setxattr(("etc", "hosts"), "trusted.bin", b"\x00\xff\xfe")
    up.utimens(("etc", "hosts"), 0, 1_600_000_000_500_000_000)
    up.whiteout(("etc", "passwd"))
    up.whiteout(("etc", "p" * 255))  # its tar name is longer than any file name
    # An earlier version's whiteout with a same-layer entry sorting before it.
    (up_root(up) / ".wh.-dash").write_bytes(b"")
    write(up, ("-dash",), b"recreated")
    up.mkdir(("var",), 0o700)
    up.set_opaque(("var",))
    up.mknod(("var", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    up.mknod(("var", "loop"), stat.S_IFBLK | 0o660, os.makedev(7, 1))
    up.mknod(("var", "fifo"), stat.S_IFIFO | 0o600, 0)
    up.mknod(("var", "sock"), stat.S_IFSOCK | 0o600, 0)
    up.symlink(("root-link",), "/")
    up.symlink(("var", "rel"), "../etc/hosts")
    up.chown(("var",), 1000, 1000)
    write(up, ("etc", Upper.TEMP_PREFIX + "42.0a1b2c3d"), b"leftover")


def test_commit_layer_contents(up: Upper, tmp_path: Path) -> None:
    build_sample(up)
    out = tmp_path / "layer.tar"
    commit_layer(root_of(tmp_path), out)
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == [
            ".wh.-dash",
            "-dash",
            "etc",
            "etc/.wh.passwd",
            "etc/.wh." + "p" * 255,
            "etc/hosts",
            "etc/hosts.bak",
            "root-link",
            "var",
            "var/.wh..wh..opq",
            "var/fifo",
            "var/loop",
            "var/null",
            "var/rel",
            "z-hardlink",
        ]  # markers first per directory; no socket, no temp file, no root entry
        by = {m.name: m for m in members}
        assert tar.format == tarfile.PAX_FORMAT
        hosts = by["etc/hosts"]
        assert hosts.isreg() and hosts.size == 20
        assert tar.extractfile(hosts).read() == b"127.0.0.1 localhost\n"  # type: ignore[union-attr]
        assert hosts.pax_headers["SCHILY.xattr.user.note"] == "hi"
        raw = hosts.pax_headers["SCHILY.xattr.trusted.bin"].encode("utf-8", "surrogateescape")
        assert raw == b"\x00\xff\xfe"
        assert hosts.pax_headers["mtime"] == "1600000000.500000000"
        for name in ("etc/hosts.bak", "z-hardlink"):
            assert by[name].islnk() and by[name].linkname == "etc/hosts"
        assert by["etc/.wh.passwd"].isreg() and by["etc/.wh.passwd"].size == 0
        assert not by["etc/.wh.passwd"].pax_headers.get("SCHILY.xattr.user.lazyfs.whiteout")
        assert by["var/.wh..wh..opq"].isreg()
        assert by["var"].isdir() and by["var"].mode == 0o700 and by["var"].uid == 1000
        null, loop = by["var/null"], by["var/loop"]
        assert null.ischr() and (null.devmajor, null.devminor) == (1, 3) and null.mode == 0o666
        assert loop.isblk() and (loop.devmajor, loop.devminor) == (7, 1)
        assert by["var/fifo"].isfifo()
        assert by["root-link"].issym() and by["root-link"].linkname == "/"
        assert by["var/rel"].linkname == "../etc/hosts"
        assert all(m.uname == "" and m.gname == "" for m in members)
    listing = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, text=True, check=True)
    assert listing.stderr == ""  # no "unknown keyword" warnings (no hdrcharset record)
    lines = listing.stdout.splitlines()
    assert any("etc/hosts.bak link to etc/hosts" in ln for ln in lines)
    assert any(ln.startswith("crw-rw-rw-") and "1,3" in ln and "var/null" in ln for ln in lines)
    assert any(ln.startswith("brw-rw----") and "var/loop" in ln for ln in lines)
    assert any(ln.startswith("p") and "var/fifo" in ln for ln in lines)
    assert any("root-link -> /" in ln for ln in lines)
    ex = tmp_path / "x"
    ex.mkdir()
    subprocess.run(
        # (a whiteout's OCI name can be longer than a file system allows)
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--exclude=.wh.ppp*",
            "-xf",
            str(out),
            "-C",
            str(ex),
        ],
        capture_output=True,
        check=True,
    )
    assert os.getxattr(ex / "etc" / "hosts", "trusted.bin") == b"\x00\xff\xfe"
    assert os.stat(ex / "etc" / "hosts").st_ino == os.stat(ex / "z-hardlink").st_ino
    assert (ex / "-dash").read_bytes() == b"recreated"


def test_commit_layer_deterministic_and_atomic(up: Upper, tmp_path: Path) -> None:
    build_sample(up)
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    commit_layer(root_of(tmp_path), a)
    commit_layer(root_of(tmp_path), b)
    assert a.read_bytes() == b.read_bytes()
    # A failure leaves neither the output nor a temp file.
    os.chmod(tmp_path / "upper" / "etc", 0o755)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError):
        commit_layer(tmp_path / "no-such-upper", tmp_path / "out" / "l.tar")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ValueError):
        commit_layer(root_of(tmp_path), root_of(tmp_path) / "etc" / "self.tar")


def test_commit_layer_does_not_follow_symlinks(up: Upper, tmp_path: Path, sentinel: Path) -> None:
    root = root_of(tmp_path)
    (root / "to_sentinel").symlink_to(sentinel)
    (root / "file_link").symlink_to(sentinel / "secret")
    out = tmp_path / "l.tar"
    commit_layer(root, out)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names == ["file_link", "to_sentinel"]
        assert all(m.issym() for m in tar.getmembers())
