"""FUSE served before the tree is whole: a mount whose layers without a TOC are still on their way.

Such a pending layer may add, replace or hide any name of the layers below it, but nothing the
layers above it settle.  Those are known (their TOCs are), so the tree starts from them
(:meth:`Tree.add_beneath`) and answers at once whatever no pending layer can change:

- a name the layers above have as a file, symlink or device, or as a directory with an entry
  of its own (the topmost entry wins): its lookup, attributes, xattrs, link target and data;
- a name they hide (a whiteout, an opaque directory, a file over a directory): ENOENT;
- the listing of a directory they make opaque.

Everything else waits until the pending layers are indexed and added beneath the same tree:
the lookup of a name the layers above do not have (a pending layer may add it), a listing
they may add to, a directory implied only by a path (a pending layer may have its entry), a
hardlink whose target is beneath.  Inode numbers handed out early stay: the lower layers only
add nodes.  The kernel learns inode numbers only from answers, so every inode it asks about
was answered early, or is the root (see ``_provisional_root``).  Changes wait too, all of
them (simplest, and rare before a container has started): an upper layer's whiteouts and
copy-ups need the whole tree, and an upper directory left by an earlier mount turns early
answers off altogether.

``statfs`` answers at once.  Once the tree is whole the real handlers are installed on this
object itself, so pyfuse3 calls them directly from then on.  A failed layer answers EIO to its
waiters (never a guess) while early answers go on; the next request tries it again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from lazyfs.errors import LazyfsError
from lazyfs.fs.ops import HANDLERS, WRITE_FLAGS, Operations
from lazyfs.fs.tree import ROOT_INO, Node

log = logging.getLogger(__name__)

# Answered without the tree: nothing before it has an inode to forget.
_AT_ONCE = frozenset({"statfs", "forget"})
# Handlers that only use a handle an early answer gave (or answer nothing of the tree).
_HANDLE_ONLY = frozenset({"read", "release", "releasedir", "flush", "fsync", "access"})


class PendingOperations(pyfuse3.Operations):
    """Stands in for :class:`Operations` until ``build`` (which waits for the layers and
    completes the tree) returns them.  ``early``: the same operations over the tree of the
    layers above the pending ones, for the requests those settle (None: everything waits)."""

    supports_dot_lookup = Operations.supports_dot_lookup
    enable_writeback_cache = Operations.enable_writeback_cache
    enable_acl = Operations.enable_acl

    def __init__(
        self, build: Callable[[], Awaitable[Operations]], early: Operations | None = None
    ) -> None:
        super().__init__()
        self._build = build
        self.early = early
        self.ops: Operations | None = None
        self.answered_early = 0  # requests answered from the layers above the pending ones
        self.waited = 0  # requests that waited for the pending layers

    def init(self) -> None:
        if self.early is not None:
            self.early.init()

    async def _operations(self) -> Operations:
        if self.ops is not None:
            return self.ops
        self.waited += 1
        try:
            ops = await self._build()
        except LazyfsError as e:  # logged once by the layer's download; here per request
            log.debug("a request waited for a layer that failed: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # no exception may leave a handler
            log.exception("building the tree failed")
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.ops is None:
            self.ops = ops
            for name in HANDLERS:  # from now on pyfuse3 calls the real handlers
                setattr(self, name, getattr(ops, name))
        return ops

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        if self.ops is not None:
            return await self.ops.statfs(ctx)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Any) -> None:
        ops = self.ops or self.early
        if ops is not None:
            await ops.forget(inode_list)

    # -- what the layers above the pending ones settle ----------------------------------------

    def _settled(self, name: str, args: tuple[Any, ...]) -> bool:
        """Whether request ``name`` with ``args`` can be answered from the early tree."""
        try:
            return self._settled_by_tree(name, args)
        except Exception:  # no exception may leave a handler: wait instead
            log.exception("deciding whether %s can be answered early failed", name)
            return False

    def _settled_by_tree(self, name: str, args: tuple[Any, ...]) -> bool:
        ops = self.early
        if ops is None:
            return False
        if name in _HANDLE_ONLY:
            return True
        tree = ops.tree
        if name == "getattr" and args[0] == ROOT_INO:
            return True  # provisionally if need be: see _provisional_root
        if name in ("getattr", "readlink", "getxattr", "listxattr", "opendir", "open"):
            node = tree.nodes.get(args[0])
            if name == "open" and args[1] & WRITE_FLAGS:
                return False  # a copy-up: changes wait
            return node is not None and tree.known(node)
        if name == "lookup":
            parent = tree.nodes.get(args[0])  # its own attributes do not matter here
            if parent is None:
                return False
            raw: bytes = args[1]
            if raw in (b".", b".."):
                node = parent if raw == b"." else parent.parent or parent
                return tree.known(node)
            if parent.children is None:
                return True  # ENOTDIR: a non-directory above is final
            child = parent.children.get(os.fsdecode(raw))
            if child is None:
                return tree.absent_known(parent, os.fsdecode(raw))
            return tree.known(child)
        if name == "readdir":
            node = ops.listed_dir(args[0])
            return node is None or _listing_settled(ops, node)
        return False  # changes wait (and whatever is not listed here)


def _provisional_root(
    name: str, args: tuple[Any, ...], answer: pyfuse3.EntryAttributes
) -> pyfuse3.EntryAttributes:
    """The kernel asks for the root's attributes before it walks any path (its permission
    check): while no layer above has the root's own entry (buildkit and docker layers seldom
    do) they are answered provisionally, as the tree holds them now, and never cached, so
    that the pending layer's entry (its mtime, say) shows as soon as it lands.  The one
    early answer that may change; without it every path would wait."""
    if name == "getattr" and args[0] == ROOT_INO:
        answer.attr_timeout = 0
    return answer


def _listing_settled(ops: Operations, node: Node) -> bool:
    """Readdirplus hands out every child's attributes with its name."""
    tree = ops.tree
    if not tree.listing_known(node):
        return False
    return all(tree.known(c) for c in (node.children or {}).values())


def _waiting(name: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: PendingOperations, *args: Any) -> Any:
        if self.ops is None and self._settled(name, args):
            assert self.early is not None
            self.answered_early += 1
            answer = await getattr(self.early, name)(*args)
            if name == "getattr" and not self.early.tree.known(self.early.tree.root):
                return _provisional_root(name, args, answer)
            return answer
        ops = await self._operations()
        return await getattr(ops, name)(*args)

    handler.__name__ = name
    return handler


for _name in HANDLERS - _AT_ONCE:
    setattr(PendingOperations, _name, _waiting(_name))
