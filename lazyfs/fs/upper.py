"""The writable upper layer of a mount: safe filesystem primitives over one directory.

Every path is a tuple of components relative to the upper root.  Each operation walks the
components one at a time from the root fd with ``O_PATH | O_DIRECTORY | O_NOFOLLOW`` and acts on
the last component relative to its parent's fd (``*at`` calls, ``follow_symlinks=False``), so a
symlink planted in the upper directory - by the image or by a user of the mount - can never
make lazyfs read or write outside it.  Components are validated before any syscall.

A deleted lower entry leaves a whiteout of the same name (an empty mode-0 file marked with
``user.lazyfs.whiteout``: as overlayfs does, so that every legal name has one; the ``.wh.NAME``
files of earlier versions are still honoured), and a directory hiding its lower contents holds
``.wh..wh..opq``.  :mod:`lazyfs.fs.layertar` writes the directory out as an OCI layer tar.

Errors are :class:`OSError` with the errno the kernel (or the check) produced, so the FUSE layer
can turn them into ``FUSEError(e.errno)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence

UpperPath = Sequence[str]  # a tuple of components; "()" is the upper root itself

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE

_UTIME_OMIT = (1 << 30) - 2
_AT_SYMLINK_NOFOLLOW = 0x100

# Intermediate components: a directory handle that cannot be read or written through, and
# O_DIRECTORY|O_NOFOLLOW makes a symlink (even one to a directory) fail with ENOTDIR.
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A handle on the last component itself (symlink, device, fifo...) without opening it.
_PIN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# A readable directory (listdir, fsync); O_DIRECTORY is checked before any device is opened.
_RDIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Newly created temp and marker files: never follow a symlink that raced into the name.
_PIN_CREATE = os.O_NOFOLLOW | os.O_CLOEXEC

NAME_MAX = 255
# Marks a whiteout in the upper directory.  In the user namespace so that an unprivileged
# daemon can write it too; users of the mount may not set it (see reserved_xattr).
WHITEOUT_XATTR = "user.lazyfs.whiteout"
_OWN_XATTRS = "user.lazyfs."


def reserved_xattr(name: str) -> bool:
    """xattrs that only lazyfs itself may set in the upper directory."""
    return name.startswith(_OWN_XATTRS)


def host_xattr(name: str) -> bool:
    """xattrs of an image that copy-up must not write into the host's upper directory, where
    the daemon runs as root: ``trusted.*`` (overlayfs and other host services keep their state
    there), ``security.*`` other than file capabilities (SELinux, IMA and EVM labels belong to
    the host's policy) and lazyfs's own.  They are still shown while the file is lower."""
    if name.startswith("trusted."):
        return True
    if name.startswith("security."):
        return name != "security.capability"
    return reserved_xattr(name)


def is_whiteout_at(pin: int) -> bool:
    """True if the entry ``pin`` (an O_PATH handle) is a whiteout: an empty mode-0 regular
    file carrying WHITEOUT_XATTR.  As overlayfs, the whiteout has the name it hides, so every
    legal name has one."""
    st = os.fstat(pin)
    if not (stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0):
        return False
    # Listed, not read: reading a user.* xattr needs read permission, which mode 0 denies a
    # daemon without CAP_DAC_OVERRIDE; listing needs none (and the value is empty anyway).
    try:
        return WHITEOUT_XATTR in os.listxattr(_proc_fd(pin))
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return False
        raise


def _xattr_name(name: str) -> str:
    if not name or "\0" in name:
        raise OSError(errno.EINVAL, "invalid xattr name", name)
    return name


_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "i686": 353, "armv7l": 382}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str, name: str | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)


def _renameat2(sfd: int, sname: str, dfd: int, dname: str, flags: int) -> None:
    s, d = os.fsencode(sname), os.fsencode(dname)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        ret = fn(sfd, s, dfd, d, ctypes.c_uint(flags))
    else:  # glibc < 2.28: the raw syscall
        nr = _SYSCALL_RENAMEAT2.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available on this machine")
        ret = _libc.syscall(ctypes.c_long(nr), sfd, s, dfd, d, ctypes.c_uint(flags))
    _check(ret, "renameat2", sname)


def _proc_fd(fd: int) -> str:
    # /proc/self/fd/N is a "magic link": the kernel resolves it to the very inode the fd holds,
    # not by re-walking a path name, so nothing renamed or planted since the fd was opened can
    # redirect it.  It is how Linux lets O_PATH handles reach calls that take only a path.
    return f"/proc/self/fd/{fd}"


def validate_component(name: object) -> str:
    """Return ``name`` if it is one safe path component, else raise EINVAL."""
    if not isinstance(name, str):
        raise OSError(errno.EINVAL, f"path component must be str, not {type(name).__name__}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, "invalid path component", name)
    return name


def _components(path: UpperPath) -> tuple[str, ...]:
    # A plain string would iterate as characters: "etc" would become ("e", "t", "c").
    if isinstance(path, str | bytes):
        raise TypeError("an upper path is a tuple of components, not a string")
    return tuple(validate_component(c) for c in path)


class Upper:
    """The upper directory of one mount.  Thread-safe: it holds nothing but the root fd."""

    WHITEOUT_PREFIX = ".wh."
    OPAQUE = ".wh..wh..opq"
    # Temporary names used while promoting; the mount scan deletes leftovers and commit_layer
    # skips them.  Not a marker, so ordinary open/unlink/rename accept them.
    TEMP_PREFIX = ".lazyfs-copyup."
    # Exactly the names lazyfs gives its temporary files: an image may hold any other name
    # with that prefix, and it must survive clean-ups and commits.
    _TEMP_NAME = re.compile(r"\.lazyfs-copyup\.\d+\.[0-9a-f]+")

    @classmethod
    def is_temp(cls, name: str) -> bool:
        return cls._TEMP_NAME.fullmatch(name) is not None

    @classmethod
    def temp_name(cls, ino: int) -> str:
        """A fresh temporary name for copying up inode ``ino`` (crash leftovers are removed by
        the next mount and never committed)."""
        return f"{cls.TEMP_PREFIX}{ino}.{secrets.token_hex(4)}"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o755)
        # O_NOFOLLOW: the root itself must not be a symlink someone swapped in either.
        self.root_fd: int = os.open(root, _RDIR)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Upper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ walking

    def _walk(self, comps: Sequence[str]) -> int:
        """A new O_PATH fd on directory ``comps`` (validated components)."""
        cur = os.dup(self.root_fd)
        try:
            for c in comps:
                nxt = os.open(c, _WALK, dir_fd=cur)
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        return cur

    @contextlib.contextmanager
    def _at(self, path: UpperPath, *, user: bool = True) -> Iterator[tuple[int, str]]:
        """Yield ``(parent_fd, last_name)`` for a non-root path.  ``user`` paths may not name a
        whiteout marker: only the marker methods below create or remove those."""
        comps = _components(path)
        if not comps:
            raise OSError(errno.EBUSY, "operation not allowed on the upper root")
        if user and any(self.is_marker(c) for c in comps):
            raise OSError(errno.EPERM, "whiteout names are reserved", comps[-1])
        fd = self._walk(comps[:-1])
        try:
            yield fd, comps[-1]
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _pinned(self, path: UpperPath) -> Iterator[int]:
        """Yield an O_PATH|O_NOFOLLOW fd on the entry itself (symlinks are not followed)."""
        if not _components(path):
            yield self.root_fd
            return
        with self._at(path) as (dfd, name):
            fd = os.open(name, _PIN, dir_fd=dfd)
        try:
            yield fd
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def lstat(self, path: UpperPath) -> os.stat_result | None:
        comps = _components(path)
        try:
            if not comps:
                return os.fstat(self.root_fd)
            with self._at(comps, user=False) as (dfd, name):
                return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, path: UpperPath) -> list[str]:
        comps = _components(path)
        if not comps:
            return sorted(os.listdir(self.root_fd))
        with self._at(comps, user=False) as (dfd, name):
            fd = os.open(name, _RDIR, dir_fd=dfd)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def open_dir(self, path: UpperPath, *, at: int | None = None) -> int:
        """A new O_PATH handle on directory ``path``: walked from the root, or, with ``at``
        (a handle on a directory), ``path`` is one name in it.  The caller closes it."""
        if at is None:
            return self._walk(_components(path))
        (name,) = _components(path)
        return os.open(name, _WALK, dir_fd=at)

    def scan_dir(self, dfd: int) -> list[tuple[str, os.stat_result | None, bool]]:
        """Every entry of the directory handle ``dfd``, sorted by name, with its lstat (None
        if it vanished meanwhile) and whether it is a whiteout: one open for the directory
        instead of a walk from the root per entry."""
        fd = os.open(".", _RDIR, dir_fd=dfd)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        out: list[tuple[str, os.stat_result | None, bool]] = []
        for name in names:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                out.append((name, None, False))
                continue
            whiteout = False
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0:
                try:
                    pin = os.open(name, _PIN, dir_fd=dfd)
                except FileNotFoundError:
                    out.append((name, None, False))
                    continue
                try:
                    whiteout = is_whiteout_at(pin)
                finally:
                    os.close(pin)
            out.append((name, st, whiteout))
        return out

    def readlink(self, path: UpperPath) -> str:
        with self._at(path) as (dfd, name):
            return os.readlink(name, dir_fd=dfd)

    def open(self, path: UpperPath, flags: int, mode: int = 0o644) -> int:
        """Open a regular file or directory; returns a new fd the caller must close.

        The final component is never followed (ELOOP on a symlink).  Special files are refused
        with EACCES without being opened: a fifo would block us and a device node would hand
        the daemon's privileges to whoever made it; the kernel serves those itself on a FUSE
        mount, so lazyfs never needs to open one.  A newly created file gets exactly ``mode``
        (the process umask is not applied: FUSE has applied the caller's already).
        """
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if not _components(path):
            return os.open(".", flags & ~(os.O_CREAT | os.O_EXCL), dir_fd=self.root_fd)
        with self._at(path) as (dfd, name):
            if flags & os.O_CREAT and flags & os.O_EXCL:
                return self._create(dfd, name, flags, mode)
            while True:
                try:
                    pin = os.open(name, _PIN, dir_fd=dfd)
                except FileNotFoundError:
                    if not flags & os.O_CREAT:
                        raise
                    try:
                        return self._create(dfd, name, flags | os.O_EXCL, mode)
                    except FileExistsError:
                        continue  # raced with another creator: open theirs
                try:
                    return self._reopen(pin, name, flags)
                finally:
                    os.close(pin)

    @staticmethod
    def _create(dfd: int, name: str, flags: int, mode: int) -> int:
        fd = os.open(name, flags, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, stat.S_IMODE(mode))
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def reopen(fd: int, flags: int) -> int:
        """A new descriptor of the file ``fd`` holds, an unlinked one too, opened with
        ``flags`` and checked against the file's mode as open(2) checks it."""
        return Upper._reopen(fd, "", flags | os.O_CLOEXEC)

    @staticmethod
    def _reopen(pin: int, name: str, flags: int) -> int:
        st = os.fstat(pin)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "refusing to follow a symlink in the upper layer", name)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.EACCES, "lazyfs does not open special files", name)
        if flags & os.O_PATH:
            return os.dup(pin)
        # The magic link is itself a symlink, so O_NOFOLLOW must go; it still cannot leave
        # the inode we just checked (see _proc_fd).
        return os.open(_proc_fd(pin), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))

    # ------------------------------------------------------------------ creating

    def mkdir(self, path: UpperPath, mode: int) -> None:
        with self._at(path) as (dfd, name):
            os.mkdir(name, 0o700, dir_fd=dfd)
            # Exact mode (no umask); set-gid/sticky bits are not honoured by mkdir(2) alone.
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd, follow_symlinks=False)

    def mknod(self, path: UpperPath, mode: int, rdev: int) -> None:
        """Create a fifo, socket, character or block device (or an empty regular file)."""
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK, stat.S_IFREG, 0):
            raise OSError(errno.EINVAL, "mknod cannot create this file type")
        with self._at(path) as (dfd, name):
            os.mknod(name, (kind or stat.S_IFREG) | 0o600, rdev, dir_fd=dfd)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd, follow_symlinks=False)

    def symlink(self, path: UpperPath, target: str) -> None:
        # The target is data: stored verbatim, never resolved by lazyfs.
        if "\0" in target:
            raise OSError(errno.EINVAL, "symlink target contains NUL")
        with self._at(path) as (dfd, name):
            os.symlink(target, name, dir_fd=dfd)

    def link(self, src: UpperPath, dst: UpperPath) -> None:
        # linkat without AT_SYMLINK_FOLLOW: linking a symlink links the symlink itself.
        with self._at(src) as (sfd, sname), self._at(dst) as (dfd, dname):
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    # ------------------------------------------------------------------ removing and renaming

    def unlink(self, path: UpperPath) -> None:
        with self._at(path) as (dfd, name):
            os.unlink(name, dir_fd=dfd)

    def rmdir(self, path: UpperPath) -> None:
        with self._at(path) as (dfd, name):
            os.rmdir(name, dir_fd=dfd)

    def rmtree(self, path: UpperPath) -> None:
        """Remove ``path`` and everything under it; a non-directory is simply unlinked.

        Iterative (no recursion limit) and fd-relative throughout: a child is entered only
        through ``O_DIRECTORY|O_NOFOLLOW``, so a symlink is unlinked, never descended.  Holds
        one fd per level of depth.
        """
        with self._at(path) as (dfd, name):
            _rmtree_at(dfd, name)

    def rename(self, src: UpperPath, dst: UpperPath, flags: int = 0) -> None:
        """renameat, or renameat2 with RENAME_NOREPLACE / RENAME_EXCHANGE."""
        if flags & ~_RENAME_FLAGS:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        with self._at(src) as (sfd, sname), self._at(dst) as (dfd, dname):
            if flags:
                _renameat2(sfd, sname, dfd, dname, flags)
            else:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    # ------------------------------------------------------------------ metadata

    def chmod(self, path: UpperPath, mode: int) -> None:
        if not _components(path):
            os.fchmod(self.root_fd, stat.S_IMODE(mode))
            return
        with self._at(path) as (dfd, name):
            try:
                os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd, follow_symlinks=False)
            except (NotImplementedError, ValueError):
                # CPython reports fchmodat's EOPNOTSUPP (the target is a symlink: Linux has
                # no symlink modes) as "dir_fd and follow_symlinks unavailable".
                raise OSError(errno.EOPNOTSUPP, "cannot chmod a symlink", name) from None

    def chown(self, path: UpperPath, uid: int, gid: int) -> None:
        """-1 leaves the id unchanged.  A symlink's own owner is changed (lchown)."""
        if not _components(path):
            os.fchown(self.root_fd, uid, gid)
            return
        with self._at(path) as (dfd, name):
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

    def utimens(self, path: UpperPath, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set times; ``None`` leaves that time unchanged (UTIME_OMIT).  Symlinks: their own."""
        times = (_Timespec * 2)()
        for ts, ns in zip(times, (atime_ns, mtime_ns), strict=True):
            if ns is None:
                ts.tv_sec, ts.tv_nsec = 0, _UTIME_OMIT
            else:
                ts.tv_sec, ts.tv_nsec = divmod(ns, 1_000_000_000)
        if not _components(path):
            _check(_libc.futimens(self.root_fd, times), "futimens")
            return
        with self._at(path) as (dfd, name):
            if atime_ns is None and mtime_ns is None:
                # The kernel returns early without a lookup; still report a missing name.
                os.stat(name, dir_fd=dfd, follow_symlinks=False)
                return
            ret = _libc.utimensat(dfd, os.fsencode(name), times, _AT_SYMLINK_NOFOLLOW)
            _check(ret, "utimensat", name)

    def truncate(self, path: UpperPath, size: int) -> None:
        fd = self.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    # Python's *xattr functions take no dir_fd, so they go through /proc/self/fd of an
    # O_PATH|O_NOFOLLOW handle: safe because the magic link names the pinned inode itself (a
    # symlink's xattrs are the symlink's own), and O_PATH never opens a fifo or device.

    def getxattr(self, path: UpperPath, name: str) -> bytes:
        with self._pinned(path) as fd:
            return os.getxattr(_proc_fd(fd), _xattr_name(name))

    def listxattr(self, path: UpperPath) -> list[str]:
        with self._pinned(path) as fd:
            return os.listxattr(_proc_fd(fd))

    def setxattr(self, path: UpperPath, name: str, value: bytes, flags: int = 0) -> None:
        with self._pinned(path) as fd:
            os.setxattr(_proc_fd(fd), _xattr_name(name), value, flags)

    def removexattr(self, path: UpperPath, name: str) -> None:
        with self._pinned(path) as fd:
            os.removexattr(_proc_fd(fd), _xattr_name(name))

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_fd)

    # ------------------------------------------------------------------ whiteouts

    @staticmethod
    def is_marker(name: str) -> bool:
        """True for names in the ``.wh.`` namespace: OCI gives them a meaning in a layer tar
        (and upper directories of earlier versions hold ``.wh.NAME`` whiteouts), so users may
        not create them."""
        return name.startswith(Upper.WHITEOUT_PREFIX)

    def is_whiteout(self, path: UpperPath) -> bool:
        """True if ``path`` is a whiteout (see :func:`is_whiteout_at`)."""
        if not _components(path):
            return False
        try:
            with self._at(path, user=False) as (dfd, name):
                pin = os.open(name, _PIN, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            return is_whiteout_at(pin)
        finally:
            os.close(pin)

    def _legacy_marker(self, path: UpperPath) -> tuple[str, ...] | None:
        """Where an upper dir of an earlier version keeps the ``.wh.NAME`` whiteout of
        ``path`` (None when such a name cannot exist)."""
        comps = _components(path)
        if not comps:
            raise OSError(errno.EBUSY, "the upper root cannot be whited out")
        if any(self.is_marker(c) for c in comps):
            raise OSError(errno.EPERM, "a marker cannot be whited out", comps[-1])
        marker = self.WHITEOUT_PREFIX + comps[-1]
        if len(os.fsencode(marker)) > NAME_MAX:
            return None
        return (*comps[:-1], marker)

    def whiteout(self, path: UpperPath) -> None:
        """Hide the lower entry at ``path`` (idempotent).  The parent must exist in the upper
        directory.  A non-directory already at ``path`` is replaced in one rename, so a copy
        that is being deleted never disappears before its whiteout exists (a directory must
        be removed first: EISDIR otherwise)."""
        legacy = self._legacy_marker(path)
        comps = _components(path)
        with self._at(comps, user=False) as (dfd, name):
            tmp = self.temp_name(0)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _PIN_CREATE, 0o600, dir_fd=dfd)
            try:
                # The xattr before mode 0: setting a user.* xattr needs write permission, which
                # mode 0 denies a daemon without CAP_DAC_OVERRIDE.
                os.setxattr(fd, WHITEOUT_XATTR, b"")
                os.fchmod(fd, 0)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            finally:
                os.close(fd)
        if legacy is not None:
            self._unlink_legacy(legacy)

    def _unlink_legacy(self, marker: tuple[str, ...]) -> None:
        with self._at(marker, user=False) as (dfd, name), contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)

    def remove_whiteout(self, path: UpperPath) -> None:
        """Drop the whiteout of ``path`` (absent is fine; any other entry there stays).
        Re-creating a *directory* over a whiteout: set_opaque on the new directory first, or
        lower contents reappear."""
        legacy = self._legacy_marker(path)
        if legacy is not None:
            self._unlink_legacy(legacy)
        if self.is_whiteout(path):
            with self._at(path, user=False) as (dfd, name):
                os.unlink(name, dir_fd=dfd)

    def has_whiteout(self, path: UpperPath) -> bool:
        legacy = self._legacy_marker(path)
        if legacy is not None and self.lstat(legacy) is not None:
            return True
        return self.is_whiteout(path)

    def _touch(self, dir_comps: tuple[str, ...], marker: str) -> None:
        fd = self._walk(dir_comps)
        try:
            try:
                os.close(
                    os.open(
                        marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _PIN_CREATE, 0o644, dir_fd=fd
                    )
                )
            except FileExistsError:
                st = os.stat(marker, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise
        finally:
            os.close(fd)

    def set_opaque(self, dir_path: UpperPath) -> None:
        """Mark ``dir_path`` so no lower layer's contents show through it (idempotent)."""
        comps = _components(dir_path)
        if any(self.is_marker(c) for c in comps):
            raise OSError(errno.EPERM, "whiteout names are reserved")
        self._touch(comps, self.OPAQUE)

    def is_opaque(self, dir_path: UpperPath) -> bool:
        return self.lstat((*_components(dir_path), self.OPAQUE)) is not None

    # ------------------------------------------------------------------ copy-up

    def ensure_dir(
        self,
        path: UpperPath,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        xattrs: dict[str, bytes],
    ) -> bool:
        """Create directory ``path`` with this metadata if missing; True if created.

        Parents must already exist (each has its own lower metadata).  For the root,
        ensure_dir(()) applies the metadata to the existing directory.  An existing
        non-directory is EEXIST.
        """
        comps = _components(path)
        if not comps:
            # The root always exists; promoting it means giving it the image's metadata.
            self._set_meta(self.root_fd, uid, gid, mode, xattrs, mtime_ns)
            os.fsync(self.root_fd)
            return True
        with self._at(comps) as (dfd, name):
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise
                return False
            fd = os.open(name, _RDIR, dir_fd=dfd)
            try:
                self._set_meta(fd, uid, gid, mode, xattrs, mtime_ns)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(dfd)
            return True

    @staticmethod
    def _set_meta(
        fd: int, uid: int, gid: int, mode: int, xattrs: dict[str, bytes], mtime_ns: int
    ) -> None:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, stat.S_IMODE(mode))
        for k, v in xattrs.items():
            os.setxattr(fd, k, v)
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    # ------------------------------------------------------------------ durability

    def fsync(self, path: UpperPath) -> None:
        fd = self.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self) -> None:
        _check(_libc.syncfs(self.root_fd), "syncfs")


def _fsync_dir(fd: int) -> None:
    # Make a rename or mkdir durable; the O_PATH walk fd cannot be fsynced, so reopen it.
    d = os.open(_proc_fd(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(d)
    finally:
        os.close(d)


def _rmtree_at(dfd: int, name: str) -> None:
    try:
        top = os.open(name, _RDIR, dir_fd=dfd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=dfd)  # not a directory (a symlink to one included)
        return
    # Each frame: (directory fd, names still to remove in it, parent fd, its name).
    stack: list[tuple[int, list[str], int, str]] = []
    try:
        stack.append((top, os.listdir(top), dfd, name))
    except BaseException:
        os.close(top)
        raise
    try:
        while stack:
            fd, names, parent, dname = stack[-1]
            if names:
                child = names.pop()
                try:
                    cfd = os.open(child, _RDIR, dir_fd=fd)
                except NotADirectoryError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(child, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                try:
                    stack.append((cfd, os.listdir(cfd), fd, child))
                except BaseException:
                    os.close(cfd)
                    raise
            else:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=parent)  # parent is the frame below, still open
    finally:
        for fd, *_ in stack:
            os.close(fd)
