"""FUSE served before the tree exists: a mount whose layers without a TOC are still on their way.

Such a layer may add, replace or hide any name below it, and (as an upper layer) any name of
the layers below it, so no name, attribute or listing is certain before it is indexed: an
answer given early could change later (an ENOENT that becomes a file).  Until the tree is
built every request that needs it waits here; the only inode the kernel knows meanwhile is
the root, so nothing else can be asked.  ``statfs`` answers at once (its numbers change
anyway).  Once the tree is built, the real handlers are installed on this object itself, so
pyfuse3 calls them directly from then on.  A failed layer answers EIO to its waiters (never
a guess); the next request tries it again.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from lazyfs.errors import LazyfsError
from lazyfs.fs.ops import HANDLERS, Operations

log = logging.getLogger(__name__)

# Answered without the tree: nothing before it has an inode to forget.
_AT_ONCE = frozenset({"statfs", "forget"})


class PendingOperations(pyfuse3.Operations):
    """Stands in for :class:`Operations` until ``build`` (which waits for the layers) returns
    them."""

    supports_dot_lookup = Operations.supports_dot_lookup
    enable_writeback_cache = Operations.enable_writeback_cache
    enable_acl = Operations.enable_acl

    def __init__(self, build: Callable[[], Awaitable[Operations]]) -> None:
        super().__init__()
        self._build = build
        self.ops: Operations | None = None

    async def _operations(self) -> Operations:
        if self.ops is not None:
            return self.ops
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
        if self.ops is not None:
            await self.ops.forget(inode_list)


def _waiting(name: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: PendingOperations, *args: Any) -> Any:
        ops = await self._operations()
        return await getattr(ops, name)(*args)

    handler.__name__ = name
    return handler


for _name in HANDLERS - _AT_ONCE:
    setattr(PendingOperations, _name, _waiting(_name))
