"""Mount table queries and unmounting (umount2 through ctypes; fusermount3 when not root)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable

from lazyfs.errors import LazyfsError
from lazyfs.fs.runtime import canonical

MNT_DETACH = 2


def _umount2(target: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def is_stale(mountpoint: str) -> bool:
    """True when a FUSE daemon died and left its mount behind (every access says ENOTCONN)."""
    try:
        os.statvfs(mountpoint)  # never answered from the kernel's attribute cache, unlike stat
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def is_mounted(mountpoint: str) -> bool:
    real = canonical(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == real:
                return True
    return False


def mounts_under(directory: str) -> list[str]:
    """Mount points strictly below ``directory``, deepest first (from /proc/self/mountinfo)."""
    prefix = canonical(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        found = {
            mp
            for line in f
            if len(fields := line.split()) > 4 and (mp := _unescape(fields[4])).startswith(prefix)
        }
    return sorted(found, key=len, reverse=True)


def _unescape(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount; a stale mount is always detached (its daemon is gone)."""
    stale = is_stale(mountpoint)
    try:
        _umount2(mountpoint, MNT_DETACH if (lazy or stale) else 0)
    except OSError as e:
        if e.errno == errno.EPERM:
            # Not root: fusermount3 is setuid and unmounts our own FUSE mounts.
            import subprocess

            flag = "-uz" if (lazy or stale) else "-u"
            res = subprocess.run(["fusermount3", flag, mountpoint], capture_output=True, text=True)
            if res.returncode != 0:
                raise LazyfsError(f"cannot unmount {mountpoint}: {res.stderr.strip()}") from None
            return
        if e.errno == errno.EINVAL:
            raise LazyfsError(f"{mountpoint} is not mounted") from None
        if e.errno == errno.EBUSY:
            raise LazyfsError(f"{mountpoint} is busy (use --lazy to detach)") from None
        raise LazyfsError(f"cannot unmount {mountpoint}: {e.strerror}") from None


def detach(mountpoint: str) -> None:
    """Detach a mount (MNT_DETACH) without looking at it first: a stat of a hung daemon's
    mount would hang.  Raises OSError (EINVAL: nothing mounted there)."""
    _umount2(mountpoint, MNT_DETACH)


def abort_connection(mountpoint: str, device: tuple[int, int] | None = None) -> None:
    """Abort the FUSE connection behind ``mountpoint`` (``device``, the number it had when
    mounted, or else the topmost FUSE mount's there now), so a hung daemon's readers get
    ENOTCONN instead of waiting forever."""
    if device is None:
        device = mount_device(mountpoint)
    if device is not None:
        with (
            contextlib.suppress(OSError),
            open(f"/sys/fs/fuse/connections/{device[1]}/abort", "w") as a,
        ):
            a.write("1")


def mount_device(mountpoint: str) -> tuple[int, int] | None:
    """The device number (major, minor) of the FUSE mount at ``mountpoint`` (the topmost;
    None when the topmost is not FUSE), from /proc/self/mountinfo: without a stat, which a
    hung daemon's mount, or its own daemon before it serves, would never answer."""
    real = canonical(mountpoint)  # not realpath(): it stats
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return fuse_device(f, real)


def fuse_device(mountinfo: Iterable[str], real: str) -> tuple[int, int] | None:
    """In ``mountinfo``'s lines, the device of the topmost mount at ``real`` if it is a FUSE
    mount.  Its callers write to what the number names (a FUSE connection's abort file, a
    bdi's read-ahead): a disk mounted over the path, or found there once the FUSE mount is
    gone, may have a FUSE connection's minor number, and its bdi is the machine's."""
    found = None
    for line in mountinfo:
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == real:
            # After the optional fields, "-" and the filesystem type.
            kind = fields[fields.index("-", 5) + 1] if "-" in fields[5:-1] else ""
            major, minor = fields[2].split(":")
            fuse = kind == "fuse" or kind.startswith("fuse.")
            found = (int(major), int(minor)) if fuse else None
    return found
