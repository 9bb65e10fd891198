"""LOOKUP, GETATTR, READLINK, READDIRPLUS and READ answered in the C reader thread, without trio.

A request that reaches Python through the patched pyfuse3's queue (scripts/pyfuse3_reader.c)
costs two thread wake-ups (the reader, then the trio thread through an eventfd) and a trip
through trio's scheduler and pyfuse3's worker before its handler runs: ~70 us of a LOOKUP's
~90 on the Debian start-up (issue 13), whose 700 requests come one at a time.  While a fast
function is set, the reader calls it itself, under the GIL, and writes the reply it packs.
A READ is served so from memory (chunks kept hot or just fetched), from cached chunks the
trio thread would read itself (small, or in the page cache), or from an upper file.

Why that is safe: the trio thread holds the C lock ``lazyfs_trio_lock`` whenever it runs
tasks; it lets go only while it waits for I/O (the instrument below, before and after each
wait), and the reader serves a request only when it takes the lock at once.  So the function
runs between two of trio's steps, as a task would: every other task is parked at an await,
and a handler sees the tree as another handler would.  It must not call trio (no run context
in that thread) and must not wait: what needs either answers None, and the request is queued
as before.  Lookups are found and counted by the same code as the queued handler's
(``Operations.lookup_now``, ``looked_up_fields``), so FORGET stays right.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import struct
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from lazyfs.fs.ops import INO_FH, TIMEOUT, AttrFields, Operations, patched_pyfuse3
from lazyfs.fs.tree import Node

log = logging.getLogger(__name__)

LOOKUP, GETATTR, READLINK, READ, READDIRPLUS = 1, 3, 5, 15, 44
# struct fuse_read_in (READ and READDIRPLUS): fh, offset, size (then flags...).
_READ_IN = struct.Struct("<QQI")
# struct fuse_attr (linux/fuse.h, 7.9 on): ino, size, blocks, atime, mtime, ctime, their
# nanoseconds, mode, nlink, uid, gid, rdev, blksize, flags.
_ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
# struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nanoseconds, attr.
_ENTRY = struct.Struct("<QQQQII" + _ATTR.format[1:])
# struct fuse_attr_out: attr_valid, its nanoseconds, a dummy, attr.
_ATTR_OUT = struct.Struct("<QII" + _ATTR.format[1:])
_VALID = int(TIMEOUT)
# A negative entry: no inode, kept for TIMEOUT (as the queued lookup answers it).
_NEGATIVE = _ENTRY.pack(0, 0, _VALID, 0, 0, 0, *([0] * 16))
_NS = 1_000_000_000
# struct fuse_dirent, after a direntplus's fuse_entry_out: ino, off, namelen, type; the name
# follows, the record padded to 8 bytes.
_DIRENT = struct.Struct("<QQII")

Fast = Callable[[int, int, bytes], "bytes | int | None"]


def _attr(f: AttrFields) -> tuple[int, ...]:
    ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev = f
    a_s, a_ns = divmod(atime, _NS)
    m_s, m_ns = divmod(mtime, _NS)
    c_s, c_ns = divmod(ctime, _NS)
    # rdev as libfuse sends it: the dev_t cut to 32 bits.
    return (ino, size, blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, mode, nlink, uid, gid,
            rdev & 0xFFFFFFFF, 4096, 0)  # fmt: skip


def fast_function(ops: Operations, clock: trio.abc.Clock) -> Fast:
    """The function the reader calls: (opcode, nodeid, the request's body) -> the reply's body,
    an errno, or None (queue it).  Every exception is answered as the queued handler's guard
    would (:func:`lazyfs.fs.ops._guard`): a FUSEError's errno, an OSError's, else EIO logged."""
    requests = ops.requests

    def fast(op: int, ino: int, body: bytes) -> bytes | int | None:
        try:
            if op == LOOKUP:
                requests["lookup"] += 1
                node = ops.lookup_now(ino, body.split(b"\0", 1)[0])
                if node is None:
                    return _NEGATIVE
                fields = ops.looked_up_fields(node)
                return _ENTRY.pack(node.ino, 0, _VALID, _VALID, 0, 0, *_attr(fields))
            if op == GETATTR:
                requests["getattr"] += 1
                return _ATTR_OUT.pack(_VALID, 0, 0, *_attr(ops.getattr_now(ino)))
            if op == READLINK:
                requests["readlink"] += 1
                return ops.readlink_now(ino)
            if op == READDIRPLUS:
                requests["readdir"] += 1
                fh, off, size = _READ_IN.unpack_from(body)
                return _listing(ops, fh or INO_FH | ino, off, size)
            if op == READ:
                fh, off, size = _READ_IN.unpack_from(body)
                # The patched pyfuse3 turns the fh 0 of no_open into this (INO_FH).
                data = ops.read_now(fh or INO_FH | ino, off, size, clock.current_time())
                if data is not None:
                    requests["read"] += 1
                return data
            return None
        except pyfuse3.FUSEError as e:
            return e.errno
        except OSError as e:
            return e.errno or errno.EIO
        except Exception:
            ops.handler_errors += 1
            log.exception("FUSE fast path (opcode %d) failed", op)
            return errno.EIO

    return fast


def _listing(ops: Operations, fh: int, start: int, size: int) -> bytes:
    """A READDIRPLUS reply of at most ``size`` bytes, as libfuse's fuse_add_direntplus lays
    out each entry for pyfuse3's readdir_reply."""
    out: list[bytes] = []
    room = size

    def add(name: bytes, node: Node, off: int) -> bool:
        nonlocal room
        fields = ops.attr_fields(node)
        length = _ENTRY.size + _DIRENT.size + len(name)
        padded = (length + 7) & ~7
        if padded > room:
            return False
        room -= padded
        ino, mode = fields[0], fields[6]
        out.append(_ENTRY.pack(ino, 0, _VALID, _VALID, 0, 0, *_attr(fields)))
        out.append(_DIRENT.pack(ino, off, len(name), (mode & 0o170000) >> 12))
        out.append(name + bytes(padded - length))
        return True

    ops.readdir_now(fh, start, add)
    return b"".join(out)


class _TrioLock(trio.abc.Instrument):
    """Holds ``lazyfs_trio_lock`` while trio runs tasks, lets it go while trio waits for I/O."""

    def __init__(self, lib: ctypes.CDLL, pylib: ctypes.PyDLL) -> None:
        # CDLL calls let go of the GIL (the blocking enter must: the reader may need it to
        # finish); PyDLL ones keep it (cheaper: the lock is free almost every time).
        self._enter = lib.lazyfs_trio_enter
        self._try_enter = pylib.lazyfs_trio_try_enter
        self._leave = pylib.lazyfs_trio_leave

    def enter(self) -> None:
        if not self._try_enter():
            self._enter()

    def before_io_wait(self, timeout: float) -> None:
        self._leave()

    def after_io_wait(self, timeout: float) -> None:
        self.enter()


class FastPath:
    """The reader's fast function for ``ops``: :meth:`serving` around ``pyfuse3.main`` (in a
    trio task) holds the lock while trio runs tasks, and :meth:`enable`, called on trio's
    thread once the mount is set up (after INIT: the read-ahead widened before any request is
    answered, as when trio answered every one), lets the reader answer LOOKUP, GETATTR,
    READLINK, READDIRPLUS and (what it can of) READ.  Nothing without the patched pyfuse3, or
    for a stand-in of the tree's operations."""

    def __init__(self, ops: object) -> None:
        self._ops = ops if type(ops) is Operations else None
        self._lock: _TrioLock | None = None
        self._set: Callable[[object], None] | None = None
        self.enabled = False

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        lib = patched_pyfuse3()
        if lib is None or self._ops is None:
            yield
            return
        try:
            pylib = ctypes.PyDLL(lib._name)
            set_fast = pylib.lazyfs_set_fast
        except (OSError, AttributeError):
            yield  # patched before the fast path: setup.sh rebuilds it
            return
        set_fast.argtypes = [ctypes.py_object]
        set_fast.restype = None
        lock = _TrioLock(lib, pylib)
        lock.enter()
        try:
            trio.lowlevel.add_instrument(lock)
            self._lock, self._set = lock, set_fast
            try:
                yield
            finally:
                self._lock = self._set = None
                self.enabled = False
                set_fast(None)  # still holding the lock: the reader is not in it
                with contextlib.suppress(KeyError):  # trio drops an instrument that raised
                    trio.lowlevel.remove_instrument(lock)
        finally:
            lock._leave()

    def enable(self) -> None:
        """On trio's thread, within :meth:`serving` (the lock is held: a task or a callback
        runs): from now on the reader answers what it can."""
        if self._set is None or self._ops is None or self.enabled:
            return
        try:  # a run_sync_soon callback: nothing may escape (it would end trio's loop)
            self._set(fast_function(self._ops, trio.lowlevel.current_clock()))
        except Exception:
            log.exception("FUSE fast path not enabled: every request goes through trio")
            return
        self.enabled = True
