"""The FUSE operations: the merged tree served read-only from the layer store, plus the upper
layer for everything that changes.

An entry is promoted (copied up, :mod:`lazyfs.fs.copyup`) on its first write or metadata
change, parents first.  Files have no per-open state: the daemon answers ENOSYS to the first
OPEN (the kernel's no_open; a ``--trace`` mount keeps OPEN so that the trace sees opens), so
the kernel opens and closes files without asking, and reads and writes arrive by inode.
Nor have directories: the first OPENDIR is answered ENOSYS too (no_opendir), the kernel caches
every listing, and readdir arrives by inode with offsets that survive changes (_HASH_BITS).
Deleting a lower entry leaves a whiteout in the upper directory.  The in-memory
:class:`~lazyfs.fs.tree.Tree` is the truth for names; the upper directory mirrors it so a
remount shows the same tree.

No exception leaves a handler: pyfuse3 would end the mount for every process using it.  Each
handler is wrapped once (:class:`_Guarded`): an OSError answers its errno, anything else is
logged with its traceback, counted in ``handler_errors`` and answers EIO.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import pyfuse3
import trio

from lazyfs.errors import LazyfsError
from lazyfs.formats.toc import Entry, has_xattr
from lazyfs.fs.copyup import CopyUp
from lazyfs.fs.neededlibs import NeededLibs
from lazyfs.fs.tree import ROOT_INO, Node, Tree
from lazyfs.fs.upper import NAME_MAX, Upper, _proc_fd, reserved_xattr
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore

log = logging.getLogger(__name__)

# How long the kernel may keep names and attributes, lower and upper alike: nothing changes
# either behind its back.  Every change reaches the upper directory through a request of this
# mount, after which the kernel drops what it held of what changed (the parent of a new or
# removed name, a written or renamed inode); what the daemon changes of its own accord (a
# copy-up's attributes) it invalidates itself.  A 1 s upper timeout cost a warm Python start
# ~115 LOOKUP, GETATTR and READDIRPLUS round trips (its byte code is upper), 19 ms of 98.
TIMEOUT = 3600.0
# Files and directories have no handles of their own: what a read, write, fsync or readdir
# needs is the inode.  Every open, create and opendir answers this bit with the inode as
# ``fh``; once open() or opendir() has answered ENOSYS (the kernel's no_open, no_opendir: no
# OPEN, OPENDIR, RELEASE or RELEASEDIR from then on), the kernel sends ``fh`` 0, which the
# patched pyfuse3 turns into the same.
INO_FH = 1 << 61
# A listing's offsets (d_off cookies) do not depend on the position of a name: the kernel
# resumes a listing it read in part, or served from its cache before a change, at the offset
# it was given.  A name sits at a 24-bit hash of it, shifted to leave room for names whose
# hashes collide (by name within the directory); an entry's offset is the position after it,
# and a listing resumed at offset C returns the names at positions >= C as the directory is
# now: one neither added nor removed since comes exactly once (as POSIX asks; a collision's
# companion added or removed mid-listing may shift the others by one place).  Offsets stay
# below 2**31, as ext4 keeps them for 32-bit callers: a 32-bit program in an old image that
# reads directories without large-file support would get EOVERFLOW from a larger one.
# "." and ".." come first, at offsets 1 and 2 (_DOTS), as every local filesystem lists them:
# a name's offset is its position + 1 + _DOTS.
_HASH_BITS, _GROUP_BITS = 24, 6
_DOTS = 2
# Upper files' descriptors kept open (by inode) for reads and writes; an unlinked file's
# descriptor is kept beyond this until the kernel forgets the inode (no RELEASE comes).
MAX_UPPER_FDS = 256
# What a request needs of a kept descriptor (a set of bits): to read, to write, or any open
# file (fsync, fchmod); an O_PATH handle (kept at unlink when nothing else opens) has none.
_READ, _WRITE, _OPENED = 1, 2, 4
# How a descriptor is opened, most useful first, and what it then serves: a daemon without
# CAP_DAC_OVERRIDE may open a 0444 file only for reading and a 0200 one only for writing.
_OPENINGS = (
    (os.O_RDWR, _READ | _WRITE | _OPENED),
    (os.O_RDONLY, _READ | _OPENED),
    (os.O_WRONLY, _WRITE | _OPENED),
    (os.O_PATH, 0),
)
# An open that may change the file: write access, or O_TRUNC, which Linux honours even with
# O_RDONLY (open(2) then needs write permission and truncates).  O_APPEND alone changes
# nothing: without write access nothing can be appended.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
BLKSIZE = 4096
# An inode's attributes: st_ino, size, blocks, atime, mtime and ctime (ns), mode, nlink, uid,
# gid, rdev.
AttrFields = tuple[int, int, int, int, int, int, int, int, int, int, int]


@functools.cache
def patched_pyfuse3() -> ctypes.CDLL | None:
    """The installed pyfuse3's extension if scripts/pyfuse3_cache_dir.py patched it (every
    patch of it: readdir's ``fh`` 0 is the inode too), else None: lazyfs then does without."""
    try:
        lib = ctypes.CDLL(pyfuse3.__file__)
        if ctypes.c_int.in_dll(lib, "lazyfs_ino_fh").value < 2:
            return None  # an older patch, without readdir: setup.sh rebuilds it
    except (OSError, ValueError):
        return None
    return lib


def cache_symlinks() -> bool:
    """Before ``pyfuse3.init``: ask the kernel to keep symlinks' targets in their page cache
    (FUSE_CAP_CACHE_SYMLINKS), so that a path walked through a symlink again costs no READLINK.
    A symlink's target never changes: a name given a new target leads to a new inode (lower
    and upper inode numbers are never reused), and a copy-up keeps the target.  Whether the
    installed pyfuse3 can (scripts/pyfuse3_cache_dir.py)."""
    lib = patched_pyfuse3()
    if lib is None:
        return False
    try:
        ctypes.c_int.in_dll(lib, "lazyfs_cache_symlinks").value = 1
    except ValueError:
        return False  # patched before this flag: setup.sh rebuilds it
    return True


CAPABILITY = "security.capability"


def answer_no_capability(on: bool) -> bool:
    """Whether the C reader thread answers GETXATTR of security.capability with ENODATA itself
    (the kernel asks before every write(2) to a file: a round trip per write): only while no
    file of the mount can have one.  Whether the installed pyfuse3 can."""
    lib = patched_pyfuse3()
    if lib is None:
        return False
    try:
        ctypes.c_int.in_dll(lib, "lazyfs_no_capability").value = int(on)
    except ValueError:
        return False  # patched before this flag: setup.sh rebuilds it
    return True


def start_c_reader() -> bool:
    """After ``pyfuse3.init``, before ``pyfuse3.main``: requests that need no Python are
    answered by the patched pyfuse3's reader thread from now on (``pyfuse3.close`` stops it).
    Whether it runs."""
    lib = patched_pyfuse3()
    if lib is None:
        return False
    err = lib.lazyfs_reader_start()
    if err:
        log.warning(
            "C reader thread not started (%s): every request goes through Python", os.strerror(-err)
        )
    return not err


def c_reader_counts() -> dict[str, int]:
    """Requests the reader thread answered in C, answered through the fast function
    (lazyfs.fs.fastpath) and handed to Python (empty without it)."""
    lib = patched_pyfuse3()
    if lib is None:
        return {}
    counts = {}
    for name in ("answered", "fast", "handed"):
        with contextlib.suppress(ValueError):  # "fast": a build from before it
            counts[name] = ctypes.c_ulong.in_dll(lib, f"lazyfs_reader_{name}").value
    return counts


class AccessListener(Protocol):
    """What the trace recorder hears from the read path, in plain values: the inode, the
    entry, the layer's index in the image, and ``path()`` for the path's components, to call
    only when the listener needs them (it costs the tree's depth), and the time the read
    waited for the network.  Only called when one is attached, and synchronously: an
    implementation must do O(1) in-memory work and no I/O."""

    def opened(
        self, ino: int, entry: Entry, layer: int, path: Callable[[], Sequence[str]]
    ) -> None: ...

    def read(
        self,
        ino: int,
        entry: Entry,
        layer: int,
        path: Callable[[], Sequence[str]],
        offset: int,
        size: int,
        wait_ns: int,
    ) -> None: ...


def _name(raw: bytes) -> str:
    if len(raw) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    name = os.fsdecode(raw)
    if name in ("", ".", "..") or "/" in name:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return name


def _errno(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


# Every request handler pyfuse3 may call.
HANDLERS = frozenset(
    {
        "access", "create", "flush", "forget", "fsync", "fsyncdir", "getattr", "getxattr",
        "link", "listxattr", "lookup", "mkdir", "mknod", "open", "opendir", "read", "readdir",
        "readlink", "release", "releasedir", "removexattr", "rename", "rmdir", "setattr",
        "setxattr", "statfs", "symlink", "unlink", "write",
    }
)  # fmt: skip

Handler = Callable[..., Awaitable[Any]]


def _guard(name: str, fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def guarded(self: _Guarded, *args: Any) -> Any:
        self.requests[name] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            log.debug("%s: %s", name, e)
            raise _errno(e) from None
        except Exception:
            self.handler_errors += 1
            log.exception("FUSE %s failed", name)
            if name == "forget":
                return None  # forget has no reply to carry an error
            raise pyfuse3.FUSEError(errno.EIO) from None

    guarded.__lazyfs_guarded__ = True  # type: ignore[attr-defined]
    return guarded


class _Guarded(pyfuse3.Operations):
    """Wraps every handler a subclass defines in :func:`_guard`."""

    handler_errors = 0
    requests: Counter[str]  # per handler, the requests that reached Python

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for name in HANDLERS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "__lazyfs_guarded__", False):
                setattr(cls, name, _guard(name, fn))


class Operations(_Guarded):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        tree: Tree,
        store: LayerStore,
        layers: Sequence[Layer],
        upper: Upper | None,
        *,
        listener: AccessListener | None = None,
        copy_up_max: int | None = None,
    ) -> None:
        super().__init__()
        self.requests = Counter()
        self.tree = tree
        self.store = store
        self.layers = list(layers)
        self.upper = upper
        self.listener = listener
        # Told of each lower read (fs/neededlibs.py): a mount without groups fetches the
        # libraries an ELF file names before its loader asks.
        self.needed: NeededLibs | None = None
        self.copy = (
            CopyUp(store, layers, upper, max_bytes=copy_up_max) if upper is not None else None
        )
        # Set while the C reader answers that no file has a security.capability xattr (see
        # no_capability): cleared before one is set.
        self.capability_free = False
        # inode -> an upper fd and what it serves (_READ...), least recently used first (see
        # MAX_UPPER_FDS)
        self._fds: dict[int, tuple[int, int]] = {}
        # A trace must see every open: then open() answers, else ENOSYS (the kernel's no_open).
        self.no_open = listener is None and patched_pyfuse3() is not None
        # Likewise for OPENDIR: then every directory's listing is cached by the kernel, which
        # drops it at every change made through it (create, unlink, rename...).
        self.no_opendir = patched_pyfuse3() is not None
        self._promoting: dict[int, trio.Event] = {}
        # Directories' listings in hash order (see _HASH_BITS) while the kernel reads them in
        # parts: inode -> (self._changes when taken, positions, names and nodes).  Dropped by
        # a change of that directory only (_changed): a listing of 100k names read in hundreds
        # of parts is sorted once, not again per part while names change elsewhere.
        self._sorted: dict[int, tuple[int, list[int], list[tuple[bytes, Node]]]] = {}
        self._changes = 0  # the whole tree changed (layers added beneath it): every listing stale

    def init(self) -> None:
        """Called by pyfuse3 before the first request, and again once layers without a TOC
        were added beneath the tree (lazyfs.fs.serve): listings taken before are stale."""
        self._changes += 1

    def _changed(self, *dirs: Node) -> None:
        """Names were added to or removed from ``dirs``: their sorted listings are stale (the
        kernel drops its cached ones itself: every such change comes through it)."""
        for d in dirs:
            self._sorted.pop(d.ino, None)

    # ------------------------------------------------------------------ helpers: nodes, attrs

    def _node(self, ino: int) -> Node:
        node = self.tree.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _child(self, parent: Node, name: str) -> Node:
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = parent.children.get(name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _path(self, node: Node) -> tuple[str, ...]:
        """Where ``node`` lives in the upper directory.  An unlinked node has no path: its
        old one may name another file by now."""
        if node.nlink <= 0 and node is not self.tree.root:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.path()

    def _upper_fd(self, node: Node, need: int) -> int:
        """A descriptor of ``node``'s upper file that serves ``need``, kept for the next
        request.  One that does not (opened before a chmod allowed more) is replaced by one
        opened through it: an unlinked file's kept descriptor is its only way back."""
        kept = self._fds.pop(node.ino, None)
        if kept is not None and kept[1] & need == need:
            self._fds[node.ino] = kept  # most recently used last
            return kept[0]
        try:
            if kept is None:
                fd, serves = self._open_upper(need, path=self._path(node))
            else:
                fd, serves = self._open_upper(need, held=kept[0])
        except BaseException:
            if kept is not None:
                self._fds[node.ino] = kept
            raise
        if kept is not None:
            os.close(kept[0])
        else:
            self._trim_fds()
        self._fds[node.ino] = (fd, serves)
        return fd

    def _open_upper(
        self, need: int, *, path: tuple[str, ...] | None = None, held: int | None = None
    ) -> tuple[int, int]:
        """A new descriptor of the upper file at ``path``, or of the one ``held`` (the very
        inode, by /proc), serving ``need`` and as much more as the file's mode lets the daemon
        have; EACCES if the mode does not allow ``need``."""
        upper = self._need_upper()

        def open_(flags: int) -> int:
            if held is not None:
                return Upper.reopen(held, flags)
            assert path is not None
            return upper.open(path, flags)

        denied: OSError | None = None
        for flags, serves in _OPENINGS:
            if serves & need != need:
                continue
            try:
                return self._opening(functools.partial(open_, flags)), serves
            except PermissionError as e:
                denied = e
        assert denied is not None  # O_RDWR serves every need
        raise denied

    def _opening(self, open_: Callable[[], int]) -> int:
        """``open_()``; at the descriptor limit (EMFILE, ENFILE), once more after closing
        kept descriptors that can be opened again."""
        try:
            return open_()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._trim_fds(shed=True):
                raise
        return open_()

    def _trim_fds(self, *, shed: bool = False) -> bool:
        """Close kept descriptors, least recently used first, until fewer than MAX_UPPER_FDS
        are kept (``shed``: half of those that can be closed); whether any was closed."""
        if not shed and len(self._fds) < MAX_UPPER_FDS:
            return False
        closable = [
            ino
            for ino in self._fds
            # an unlinked file's descriptor is its only way back
            if (node := self.tree.nodes.get(ino)) is None or node.nlink > 0
        ]
        n = max(1, len(closable) // 2) if shed else len(self._fds) - MAX_UPPER_FDS + 1
        for ino in closable[: max(n, 0)]:
            self._drop_fd(ino)
        return bool(closable) and n > 0

    def _drop_fd(self, ino: int) -> None:
        kept = self._fds.pop(ino, None)
        if kept is not None:
            os.close(kept[0])

    def _pin(self, node: Node, path: tuple[str, ...]) -> None:
        """Before the last name of an upper file goes: the kernel may hold it open, and POSIX
        keeps an unlinked open file readable and writable, so keep a descriptor until the
        kernel forgets the inode (afterwards the path leads nowhere, or to another file).
        Whatever the mode allows, an O_PATH handle at least: reopened through it, by /proc,
        once a chmod allows more."""
        if node.lookups > 0 and node.ino not in self._fds:
            st = self._need_upper().lstat(path)
            if st is not None and stat.S_ISREG(st.st_mode):  # the kernel serves the others
                try:
                    self._fds[node.ino] = self._open_upper(0, path=path)
                except OSError as e:  # the unlink still happens; a reader left sees ENOENT
                    log.warning("%s: no descriptor kept at unlink: %s", "/".join(path), e)

    def _upper_stat(self, node: Node) -> os.stat_result:
        kept = self._fds.get(node.ino) if node.nlink <= 0 else None
        if kept is not None:
            return os.fstat(kept[0])
        assert self.upper is not None
        st = self.upper.lstat(self._path(node))
        if st is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return st

    def attr_fields(self, node: Node) -> AttrFields:
        """``node``'s attributes, as :meth:`_attrs` answers them (the fast path packs these)."""
        if node.upper:
            st = self._upper_stat(node)
            mode, nlink, size = st.st_mode, st.st_nlink, st.st_size
            uid, gid, rdev, blocks = st.st_uid, st.st_gid, st.st_rdev, st.st_blocks
            atime, mtime, ctime = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        else:
            kind, uid, gid, size, mtime, major, minor, link = node.stat_fields()
            mode = node.mode()
            nlink = node.nlink
            rdev = os.makedev(major, minor)
            if kind == "symlink":
                size = len(os.fsencode(link))
            elif kind == "dir":
                size = 4096
            blocks = (size + 511) // 512
            atime = ctime = mtime
        if node.children is not None:
            # Directory link count: ".", the name in the parent, and each subdirectory's "..".
            nlink = 2 + sum(1 for c in node.children.values() if c.children is not None)
            if node.upper:
                size = 4096
        return node.ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev = self.attr_fields(
            node
        )
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid, a.st_gid = uid, gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blocks = blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = atime, mtime, ctime
        a.st_blksize = BLKSIZE
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self._attrs(node)
        node.lookups += 1
        return attrs

    def looked_up_fields(self, node: Node) -> AttrFields:
        """:meth:`_looked_up` for the fast path: counted once the attributes are known (a
        failure hands the kernel no reference)."""
        fields = self.attr_fields(node)
        node.lookups += 1
        return fields

    def no_capability(self, upper_empty: bool) -> bool:
        """Let the C reader answer GETXATTR of security.capability (ENODATA) while no file
        can have one: no lower entry has one, and the upper directory was empty at mount (or
        there is none); setxattr clears it before making one.  Whether it now does."""
        if not upper_empty or any(has_xattr(la.toc.entries, CAPABILITY) for la in self.layers):
            return False
        self.capability_free = answer_no_capability(True)
        return self.capability_free

    def _need_upper(self) -> Upper:
        if self.upper is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.upper

    # ------------------------------------------------------------------ promote (copy-up)

    async def _promote(self, node: Node, *, content: bool = True) -> None:
        """Make ``node`` and its parents exist in the upper directory with lower metadata,
        parents first.  A loop, not recursion: a tree may be deeper than Python's stack.
        ``content=False``: the caller is about to truncate, so copy none of it."""
        chain: list[Node] = []
        for parent, _ in list(self.tree.names(node)) if node.nlink > 0 else ():
            up: list[Node] = []
            cur: Node | None = parent
            while cur is not None and not cur.upper and cur not in chain:
                up.append(cur)
                cur = cur.parent
            chain.extend(reversed(up))
        for n in chain:
            await self._promote_one(n, content=True)
        await self._promote_one(node, content=content)

    async def _promote_one(self, node: Node, *, content: bool) -> None:
        """Copy ``node`` up, its parents being upper already.  One promotion per inode at a
        time; a waiter sees the first one's failure as EIO."""
        while not node.upper:
            busy = self._promoting.get(node.ino)
            if busy is None:
                break
            await busy.wait()
            if not node.upper:
                raise pyfuse3.FUSEError(errno.EIO)
        if node.upper:
            return
        self._need_upper()
        assert self.copy is not None
        done = self._promoting[node.ino] = trio.Event()
        try:
            e = node.entry
            assert e is not None
            if e.type == "dir":
                await self.copy.directory(() if node is self.tree.root else self._path(node), e)
            elif e.type == "reg" and node.nlink <= 0:
                # Unlinked while open: a copy no name leads to, kept by descriptor.
                length = e.size if content else 0
                tmp = (Upper.temp_name(node.ino),)
                fd = await self.copy.unlinked(tmp, node.layer, e, length)
                self._fds[node.ino] = (fd, _READ | _WRITE | _OPENED)
            elif e.type == "reg":
                path = self._path(node)
                await self.copy.regular(
                    (*path[:-1], Upper.temp_name(node.ino)),
                    node.layer,
                    e,
                    e.size if content else 0,
                    # The awaits let other operations run: land the copy where it is now.
                    lambda: (
                        [(*p.path(), n) for p, n in self.tree.names(node)] if node.nlink > 0 else []
                    ),
                )
            else:
                self.copy.special(self._path(node), e)
            node.upper = True
            node.entry = None
            # The kernel may hold the lower attributes for TIMEOUT; the upper copy's
            # differ (ctime, blocks; a directory's times once a copy-up wrote in it).  So
            # do those of every upper directory the copy was made in (its names' parents;
            # the root for an unlinked file's temporary name): their times changed, and no
            # request of the kernel's touched them.
            # Attributes only: no page lock is taken, so this is safe inside a handler.
            wrote_in = [p for p, _ in self.tree.names(node)] if node.nlink > 0 else []
            if e.type == "reg" and node.nlink <= 0:
                wrote_in.append(self.tree.root)
            for changed in (node, *wrote_in):
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(changed.ino, attr_only=True)
        except OSError as err:
            raise _errno(err) from err
        finally:
            del self._promoting[node.ino]
            done.set()

    # ------------------------------------------------------------------ lookups and reading

    def lookup_now(self, parent_inode: int, name: bytes) -> Node | None:
        """The node lookup answers, with nothing awaited (the fast path calls it too), or None
        for a name that does not exist.  Its lookup is not counted yet (:meth:`_looked_up`,
        :meth:`looked_up_fields`: once its attributes are)."""
        parent = self._node(parent_inode)
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        sname = _name(name)
        if parent.children is not None and sname not in parent.children:
            return None
        return self._child(parent, sname)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.lookup_now(parent_inode, name)
        if node is None:
            # A negative entry the kernel may keep (a program start probes many paths that do
            # not exist): every name created later goes through the kernel, which replaces it.
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = TIMEOUT
            return a
        return self._looked_up(node)

    def getattr_now(self, inode: int) -> AttrFields:
        return self.attr_fields(self._node(inode))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    def readlink_now(self, inode: int) -> bytes:
        node = self._node(inode)
        if node.upper:
            try:
                return os.fsencode(self._need_upper().readlink(self._path(node)))
            except OSError as e:
                raise _errno(e) from e
        if node.entry is None or node.entry.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.entry.link_name)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.readlink_now(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.no_opendir:
            # Once: the kernel then opens every directory itself, with its listing cached, and
            # sends neither OPENDIR nor RELEASEDIR, two round trips less per directory walked.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return INO_FH | node.ino

    def readdir_now(self, fh: int, start_id: int, add: Callable[[bytes, Node, int], bool]) -> None:
        """The listing from ``start_id`` on, handed to ``add(name, node, next offset)`` (False:
        the reply is full) until it is full; readdir and the fast path pack the replies.  A
        child whose attributes ``add`` cannot make (FUSEError) is left out."""
        node = self.listed_dir(fh)
        if node is None:
            return
        dots = ((b".", node), (b"..", node.parent or node))
        for offset in range(start_id, _DOTS):
            # The kernel makes no dentry of these and takes no reference: no lookup counted.
            name, which = dots[offset]
            if not add(name, which, offset + 1):
                return
        positions, entries = self._listing(node)
        start = max(start_id - _DOTS, 0)
        for i in range(bisect.bisect_left(positions, start), len(entries)):
            name, child = entries[i]
            try:
                if not add(name, child, positions[i] + 1 + _DOTS):
                    return
            except pyfuse3.FUSEError:
                continue
            child.lookups += 1  # readdirplus hands the kernel a reference
        self._sorted.pop(node.ino, None)  # read to the end: the kernel caches it

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def add(name: bytes, node: Node, off: int) -> bool:
            return bool(pyfuse3.readdir_reply(token, name, self._attrs(node), off))

        self.readdir_now(fh, start_id, add)

    def _listing(self, node: Node) -> tuple[list[int], list[tuple[bytes, Node]]]:
        """``node``'s listing in position order (see _HASH_BITS) and the positions: taken
        again after any change, kept for the next readdir (a big directory is read in
        hundreds of parts)."""
        kept = self._sorted.get(node.ino)
        if kept is not None and kept[0] == self._changes:
            return kept[1], kept[2]
        mask = (1 << _HASH_BITS) - 1
        # str's hash: cached in the name, and the same for as long as this process serves.
        by_hash = sorted((hash(n) & mask, n, c) for n, c in (node.children or {}).items())
        positions: list[int] = []
        entries: list[tuple[bytes, Node]] = []
        last, group = -1, 0
        for h, name, child in by_hash:
            group = group + 1 if h == last else 0
            last = h
            positions.append(h << _GROUP_BITS | min(group, (1 << _GROUP_BITS) - 1))
            entries.append((os.fsencode(name), child))
        while len(self._sorted) >= 64:  # listings read in parts at the same time: few
            del self._sorted[next(iter(self._sorted))]
        self._sorted[node.ino] = (self._changes, positions, entries)
        return positions, entries

    def listed_dir(self, fh: int) -> Node | None:
        """The directory ``fh`` lists."""
        node = self.tree.nodes.get(fh & ~INO_FH) if fh & INO_FH else None
        return node if node is not None and node.children is not None else None

    async def releasedir(self, fh: int) -> None:
        pass  # directories have no handles of their own

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.no_open:
            # Once: the kernel then opens every file itself (with keep_cache) and sends
            # neither OPEN nor RELEASE, a round trip less per open(2).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            # Only from an unpatched pyfuse3 (atomic O_TRUNC): else a SETATTR follows.  Also
            # with O_RDONLY: Linux truncates then too (see WRITE_FLAGS).
            await self._truncate(node)
        if not node.upper and self.listener is not None and node.entry is not None:
            self.listener.opened(node.ino, node.entry, node.layer, node.path)
        # Writes copy up at the first write or metadata change, not here: with no_open
        # there is no open to do it at.  Pages stay cached: every change goes through
        # the kernel, which updates them (a copy-up keeps the bytes).
        return pyfuse3.FileInfo(fh=INO_FH | node.ino, keep_cache=True)

    async def _truncate(self, node: Node) -> None:
        await self._promote(node, content=False)
        if node.nlink > 0:
            self._need_upper().truncate(self._path(node), 0)
        else:
            os.ftruncate(self._upper_fd(node, _WRITE), 0)

    def _file(self, fh: int) -> Node:
        node = self.tree.nodes.get(fh & ~INO_FH) if fh & INO_FH else None
        if node is None or node.children is not None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return node

    def read_now(self, fh: int, off: int, size: int, now: float) -> bytes | None:
        """What read answers, with nothing awaited (the fast path): an upper file's bytes, or
        a lower file's when the store has them in memory; else None (read must run).  ``now``:
        trio's clock."""
        node = self._file(fh)
        if node.upper:
            return os.pread(self._upper_fd(node, _READ), size, off)
        needed = self.needed
        if self.listener is not None or (needed is not None and not needed.can_notice_soon()):
            return None  # the trace's hooks run in trio's thread
        entry = node.entry
        assert entry is not None
        try:
            data = self.store.read_now(self.layers[node.layer], entry, off, size, now)
        except (LazyfsError, OSError) as err:  # as read() answers it
            log.error("read of %s at %d failed: %s", "/".join(node.path()), off, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if data is not None and needed is not None and needed.wants(node, off, data):
            needed.notice_soon(node, entry, off, data)  # an ELF file's start: followed in trio
        return data

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._file(fh)
        if node.upper:
            return os.pread(self._upper_fd(node, _READ), size, off)
        entry = node.entry
        assert entry is not None
        try:
            data, wait_ns = await self.store.read_waited(self.layers[node.layer], entry, off, size)
        except (LazyfsError, OSError) as err:
            # Never serve unverified or partial data: the reader sees EIO.
            log.error("read of %s at %d failed: %s", "/".join(node.path()), off, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.listener is not None:
            self.listener.read(node.ino, entry, node.layer, node.path, off, len(data), wait_ns)
        if self.needed is not None:
            self.needed.noticed(node, entry, off, data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._file(fh)
        if not node.upper:
            await self._promote(node)  # the first write copies up
        return os.pwrite(self._upper_fd(node, _WRITE), buf, off)

    async def flush(self, fh: int) -> None:
        # Nothing to do: writes go straight to the upper file and there are no locks.
        # ENOSYS tells the kernel so (no_flush): it asks no more.  The patched pyfuse3 also
        # answers every open with FOPEN_NOFLUSH; with no_open the kernel's default lacks it.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self._file(fh)
        if node.upper:
            # A copy: the kept one may be closed (trimmed) while the thread syncs.
            fd = os.dup(self._upper_fd(node, _OPENED))
            try:
                await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
            finally:
                os.close(fd)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.upper is not None:
            await trio.to_thread.run_sync(self.upper.syncfs)

    async def release(self, fh: int) -> None:
        pass  # descriptors are kept by inode, not per open

    # ------------------------------------------------------------------ xattrs

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        key = os.fsdecode(name)
        if node.upper:
            try:
                return self._need_upper().getxattr(self._path(node), key)
            except OSError as e:
                raise _errno(e) from e
        assert node.entry is not None
        value = node.entry.xattrs.get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        if node.upper:
            try:
                return [os.fsencode(n) for n in self._need_upper().listxattr(self._path(node))]
            except OSError as e:
                raise _errno(e) from e
        assert node.entry is not None
        # A name with a NUL cannot be listed (the list is NUL-separated): an image can hold
        # one, no kernel can.
        return [os.fsencode(k) for k in node.entry.xattrs if k and "\0" not in k]

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._node(inode)
        key = os.fsdecode(name)
        if key == CAPABILITY and self.capability_free:
            # Before the xattr exists: from now on every such GETXATTR comes here.
            answer_no_capability(False)
            self.capability_free = False
        if reserved_xattr(key):
            raise pyfuse3.FUSEError(errno.EPERM)  # marks whiteouts in the upper directory
        await self._promote(node)
        self._upper_call(self._need_upper().setxattr, self._path(node), key, value)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        key = os.fsdecode(name)
        if not node.upper and node.entry is not None and key not in node.entry.xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self._promote(node)
        self._upper_call(self._need_upper().removexattr, self._path(node), key)

    def _upper_call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise _errno(e) from e

    # ------------------------------------------------------------------ metadata changes

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        await self._promote(node, content=not (fields.update_size and attr.st_size == 0))
        upper = self._need_upper()
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        atime = attr.st_atime_ns if fields.update_atime else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        try:
            if node.nlink <= 0:
                # Only reachable by descriptor; fh does not matter (see INO_FH).
                if fields.update_size:
                    os.ftruncate(self._upper_fd(node, _WRITE), attr.st_size)
                # By /proc: the kept one may be an O_PATH handle (a mode that let the daemon
                # open nothing), and the magic link reaches the inode itself.
                fd = self._upper_fd(node, 0)
                if fields.update_uid or fields.update_gid:
                    os.chown(_proc_fd(fd), uid, gid)
                if fields.update_mode:
                    os.chmod(_proc_fd(fd), stat.S_IMODE(attr.st_mode))
                if atime is not None or mtime is not None:
                    st = os.fstat(fd)
                    os.utime(_proc_fd(fd), ns=(atime or st.st_atime_ns, mtime or st.st_mtime_ns))
            else:
                path = self._path(node)
                if fields.update_size:
                    upper.truncate(path, attr.st_size)
                if fields.update_uid or fields.update_gid:
                    upper.chown(path, uid, gid)
                if fields.update_mode:
                    upper.chmod(path, stat.S_IMODE(attr.st_mode))
                if atime is not None or mtime is not None:
                    upper.utimens(path, atime, mtime)
        except OSError as e:
            raise _errno(e) from e
        return self._attrs(node)

    # ------------------------------------------------------------------ creating names

    async def _prepare_new(self, parent_inode: int, raw: bytes) -> tuple[Node, str, bool]:
        """Promote the parent and clear a whiteout at ``name``; report whether there was one (a
        new directory there must then be opaque, so the deleted one's contents stay gone)."""
        upper = self._need_upper()
        parent = self._node(parent_inode)
        name = _name(raw)
        if Upper.is_marker(name) or Upper.is_temp(name):
            raise pyfuse3.FUSEError(errno.EPERM)  # reserved for the layer format
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in parent.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self._promote(parent)
        path = (*parent.path(), name)
        hidden = upper.has_whiteout(path)
        if hidden:
            upper.remove_whiteout(path)
        return parent, name, hidden

    def _attach(self, parent: Node, name: str, *, is_dir: bool = False) -> Node:
        node = self.tree.new_node(parent, name, None, -1)
        if not is_dir:
            node.children = None
        node.upper = True
        assert parent.children is not None
        parent.children[name] = node
        self._changed(parent)
        return node

    def _own(self, path: tuple[str, ...], ctx: pyfuse3.RequestContext) -> None:
        self._need_upper().chown(path, ctx.uid, ctx.gid)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent, sname, hidden = await self._prepare_new(parent_inode, name)
        path = (*parent.path(), sname)
        upper = self._need_upper()
        fd = None
        try:
            # Read-write whatever the caller asked: the kernel enforces its access mode,
            # and this descriptor serves every later open of the file.
            fd = self._opening(
                lambda: upper.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
            )
            self._own(path, ctx)
        except OSError as e:
            if fd is not None:  # created but not ours: take it back
                os.close(fd)
                upper.unlink(path)
            if hidden:
                upper.whiteout(path)
            raise _errno(e) from e
        node = self._attach(parent, sname)
        self._trim_fds()
        self._fds[node.ino] = (fd, _READ | _WRITE | _OPENED)
        # The kernel RELEASEs a created file's handle even under no_open; release ignores it.
        info = pyfuse3.FileInfo(fh=INO_FH | node.ino, keep_cache=True)
        return info, self._looked_up(node)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(upper: Upper, path: tuple[str, ...], hidden: bool) -> None:
            upper.mkdir(path, stat.S_IMODE(mode))
            if hidden:
                upper.set_opaque(path)  # the lower directory's contents stay deleted

        return await self._new_entry(parent_inode, name, ctx, make, is_dir=True)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._new_entry(
            parent_inode, name, ctx, lambda upper, path, _: upper.mknod(path, mode, rdev)
        )

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._new_entry(
            parent_inode,
            name,
            ctx,
            lambda upper, path, _: upper.symlink(path, os.fsdecode(target)),
        )

    async def _new_entry(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        make: Callable[[Upper, tuple[str, ...], bool], None],
        *,
        is_dir: bool = False,
    ) -> pyfuse3.EntryAttributes:
        """mkdir, mknod and symlink: make the entry in the upper layer, owned by the caller."""
        parent, sname, hidden = await self._prepare_new(parent_inode, name)
        path = (*parent.path(), sname)
        try:
            make(self._need_upper(), path, hidden)
            self._own(path, ctx)
        except OSError as e:
            raise _errno(e) from e
        return self._looked_up(self._attach(parent, sname, is_dir=is_dir))

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._promote(node)
        parent, sname, _ = await self._prepare_new(new_parent_inode, new_name)
        path = (*parent.path(), sname)
        try:
            self._need_upper().link(self._path(node), path)
        except OSError as e:
            raise _errno(e) from e
        self.tree.add_link(node, parent, sname)
        self._changed(parent)
        return self._looked_up(node)

    # ------------------------------------------------------------------ removing and renaming

    def _remove_name(self, parent: Node, name: str, node: Node) -> None:
        """Drop ``name`` from the upper directory and the tree; whiteout what a lower layer has."""
        upper = self._need_upper()
        path = (*parent.path(), name)
        lower = self.tree.lower_has(path)  # a lower layer has this name: hide it
        if node.upper:
            if node.children is not None:
                upper.rmtree(path)
            else:
                if node.nlink <= 1:
                    self._pin(node, path)
                if not lower:
                    upper.unlink(path)
        if lower:
            # Replaces a file's upper copy in one rename: a crash leaves either the copy or
            # the whiteout, never the lower content back.
            upper.whiteout(path)
        assert parent.children is not None
        del parent.children[name]
        self._changed(parent)
        self.tree.unlink_name(node, parent, name)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, directory=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, directory=True)

    async def _remove(self, parent_inode: int, raw: bytes, *, directory: bool) -> None:
        parent = self._node(parent_inode)
        name = _name(raw)
        self._child(parent, name)  # ENOENT before any copy-up
        await self._promote(parent)
        node = self._child(parent, name)  # again: the promotion awaited
        if directory and node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not directory and node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        try:
            self._remove_name(parent, name, node)
        except OSError as e:
            raise _errno(e) from e

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        upper = self._need_upper()
        old_parent = self._node(parent_inode_old)
        new_parent = self._node(parent_inode_new)
        old, new = _name(name_old), _name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # not needed by containers; kept simple
        if Upper.is_marker(new) or Upper.is_temp(new):
            raise pyfuse3.FUSEError(errno.EPERM)
        # Copy-ups await, and other operations run meanwhile: check, promote, and check again
        # until nothing moved, so the rename acts on what is there now.
        while True:
            node, target = self._rename_check(old_parent, old, new_parent, new, flags)
            if target is node:
                return
            if node.upper and old_parent.upper and new_parent.upper:
                break
            await self._promote(old_parent)
            await self._promote(new_parent)
            await self._promote(node)
        old_path = (*old_parent.path(), old)
        new_path = (*new_parent.path(), new)
        assert new_parent.children is not None  # _rename_check found it a directory
        try:
            hidden = self.tree.lower_has(new_path)
            if target is not None:
                # Replace: drop the target's upper copy but no whiteout (the new entry covers
                # the name); the rename below then lands on a free name.
                if target.upper:
                    if target.children is not None:
                        upper.rmtree(new_path)
                    else:
                        if target.nlink <= 1:
                            self._pin(target, new_path)
                        upper.unlink(new_path)
                assert new_parent.children is not None
                del new_parent.children[new]
                self._changed(new_parent)  # even if the rename below fails
                self.tree.unlink_name(target, new_parent, new)
            elif upper.has_whiteout(new_path):
                upper.remove_whiteout(new_path)
            upper.rename(old_path, new_path)
            if self.tree.lower_has(old_path):
                upper.whiteout(old_path)
            if hidden and node.children is not None:
                upper.set_opaque(new_path)  # what a lower layer has there stays hidden
        except OSError as e:
            raise _errno(e) from e
        assert old_parent.children is not None and new_parent.children is not None
        del old_parent.children[old]
        new_parent.children[new] = node
        self._changed(old_parent, new_parent)
        if node.parent is old_parent and node.name == old:
            node.parent, node.name = new_parent, new
        elif node.links:
            node.links = [
                (new_parent, new) if (p is old_parent and n == old) else (p, n)
                for p, n in node.links
            ]

    def _rename_check(
        self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int
    ) -> tuple[Node, Node | None]:
        node = self._child(old_parent, old)
        if new_parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        target = new_parent.children.get(new)
        if target is node:
            return node, target
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if node.children is not None:
            # As overlayfs without redirect_dir: a directory with lower content cannot move
            # in one step, so `mv` falls back to copy and delete.
            upper = self._need_upper()
            path = self._path(node)
            if not node.upper or (self.tree.lower_has(path) and not upper.is_opaque(path)):
                raise pyfuse3.FUSEError(errno.EXDEV)
            if self._has_lower_descendant(node):
                raise pyfuse3.FUSEError(errno.EXDEV)
        if target is not None:
            if (target.children is None) != (node.children is None):
                raise pyfuse3.FUSEError(
                    errno.EISDIR if target.children is not None else errno.ENOTDIR
                )
            if target.children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        return node, target

    def _has_lower_descendant(self, node: Node) -> bool:
        stack = [node]
        while stack:
            n = stack.pop()
            if n is not node and (not n.upper or self.tree.lower_has(n.path())):
                return True
            if n.children:
                stack.extend(n.children.values())
        return False

    # ------------------------------------------------------------------ the rest

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        if self.upper is not None:
            v = self.upper.statvfs()
            s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
            s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        else:
            s.f_bsize = s.f_frsize = 4096
            s.f_files = len(self.tree.nodes)
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.tree.nodes.get(ino)
            if node is not None and ino != ROOT_INO:
                self.tree.forget(node, n)
                if node.lookups <= 0:  # no descriptor can be open on it
                    self._drop_fd(ino)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks mode bits itself
