"""Without groups, fetch the libraries an ELF file names as soon as it is read.

A dynamically linked program's loader opens the libraries of its ``DT_NEEDED`` entries one
after another, and each one a cold mount has not fetched is a miss in series (Debian's
python3.11: libz, libexpat; the ``_ssl`` module: libssl, then libcrypto; BENCHMARKS.md,
issue 13, "cold start without groups").  Once a reader has read an ELF file's first bytes,
its dynamic section and string table name them all: they are looked up here the way the
loader would (the file's DT_RUNPATH, else DT_RPATH, then the default directories of its
machine, symbolic links followed in the mount's tree) and fetched together at PREFETCH
priority (a reader that gets there first joins and boosts the flight), then followed the
same way themselves, to FOLLOW_DEPTH.  Each file at most once per mount; small files only
(FILE_MAX), at most MOUNT_BYTES in all: every prefetched byte's decode and cache write
competes with the start-up for the CPU.  Best effort: errors are logged and counted.
An ELF file that is a Python interpreter also has its standard modules fetched
(:mod:`lazyfs.fs.stdmodules`)."""

from __future__ import annotations

import contextlib
import logging

import trio

from lazyfs.errors import LazyfsError
from lazyfs.formats import elf
from lazyfs.formats.chunkio import chunks_for_range
from lazyfs.formats.toc import Entry
from lazyfs.fs.control import NeededStats
from lazyfs.fs.stdmodules import INTERPRETER, StdModules
from lazyfs.fs.tree import Node, Tree
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore

log = logging.getLogger(__name__)

# The program (0), its libraries (1), theirs (2): Debian's deepest start-up chain is
# _ssl -> libssl -> libcrypto, and libcrypto is named by _ssl itself too.
FOLLOW_DEPTH = 3
# A library larger than this is left to its reader (it is mapped, and only touched pages are
# read); a loader's libraries are mostly read whole (libcrypto: 4.5 MiB, all of it).
FILE_MAX = 8 * 1024 * 1024
MOUNT_BYTES = 64 * 1024 * 1024
HEAD = 4096  # the bytes of a file's start kept to parse its headers
LOOK_WHOLE = 1024 * 1024  # a file up to this size in one chunk is read whole to be looked at
PHDRS_MAX = 64 * 1024  # program headers further in than this: not worth a read
STRINGS_MAX = 1024 * 1024  # the part of a string table read for the names
QUEUE = 64  # ELF files waiting to be looked at; more are dropped (the loader reads them)
# ELF files looked at at once: a task each would let a scan of /usr/lib (every file's start
# read) start thousands of look-ups and their fetches, all competing with the start-up.
WORKERS = 4
_MAX_LINKS = 16


def lower_file(tree: Tree, path: str) -> Node | None:
    """The lower regular file ``path`` names in the mount's tree (relative to its root),
    symbolic links followed as the kernel would; None for anything else (a file of the
    upper directory: no fetch needed)."""
    parts = [p for p in path.split("/") if p]
    node = tree.root
    links = 0
    while parts:
        part = parts.pop(0)
        children = node.children
        if children is None:
            return None
        if part == ".":
            continue
        if part == "..":
            node = node.parent or node
            continue
        child = children.get(part)
        if child is None or child.upper:
            return None
        entry = child.entry
        if entry is not None and entry.type == "symlink":
            links += 1
            if links > _MAX_LINKS:
                return None
            if entry.link_name.startswith("/"):
                node = tree.root
            parts = [p for p in entry.link_name.split("/") if p] + parts
            continue
        node = child
    entry = node.entry
    if node.children is not None or entry is None or entry.type != "reg":
        return None
    return node


class NeededLibs:
    """Noticed by the read path (:meth:`noticed`: O(1), no I/O); the work runs in
    :meth:`run`'s nursery.  ``layers`` is the operations' list (the same object)."""

    def __init__(self, store: LayerStore, tree: Tree, layers: list[Layer]) -> None:
        self.store = store
        self.tree = tree
        self.layers = layers
        self.stats = NeededStats()
        self.active = True
        self._seen: set[int] = set()  # inodes looked at or fetched
        self._left = MOUNT_BYTES
        self._send, self._recv = trio.open_memory_channel[tuple[Node, bytes]](QUEUE)
        # A Python's standard modules, fetched once the interpreter's start is read.
        self.modules = StdModules(store, self.stats)
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # set by run: see notice_soon

    def stop(self) -> None:
        """Nothing more is followed (a group covers the start-up)."""
        self.active = False

    def wants(self, node: Node, offset: int, data: bytes) -> bool:
        """Whether :meth:`noticed` would act on this read (reads only: any thread may ask)."""
        return not offset and self.active and data[:4] == elf.MAGIC and node.ino not in self._seen

    def can_notice_soon(self) -> bool:
        return self._token is not None

    def notice_soon(self, node: Node, entry: Entry, offset: int, data: bytes) -> None:
        """:meth:`noticed`, asked from another thread (the FUSE fast path's reader): it runs in
        trio's thread, soon, where it may start tasks.  Never raises."""

        def notice() -> None:
            try:
                self.noticed(node, entry, offset, data)
            except Exception:  # run_sync_soon would end trio's run with it
                log.exception("following %s", "/".join(node.path()))

        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(notice)

    def noticed(self, node: Node, entry: Entry, offset: int, data: bytes) -> None:
        """A reader got ``data`` at ``offset`` of the lower file ``node``."""
        if not self.wants(node, offset, data):
            return
        if self._nursery is not None and INTERPRETER.fullmatch(node.name):
            self._nursery.start_soon(self._modules, node)
        try:
            self._send.send_nowait((node, data[:HEAD]))
        except trio.WouldBlock:
            return  # busy: the loader reads it itself
        self._seen.add(node.ino)

    async def run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(WORKERS):
                nursery.start_soon(self._work)

    async def _modules(self, program: Node) -> None:
        self.stats.busy += 1
        try:
            await self.modules.fetch(program, self.layers, self.extensions)
        except Exception as e:  # best effort: a follow-up never ends the mount
            log.warning("modules of %s: %s", "/".join(program.path()), e)
            self.stats.error = self.stats.error or str(e) or type(e).__name__
        finally:
            self.stats.busy -= 1

    async def _work(self) -> None:
        async for node, head in self._recv:
            await self._guarded(node, head, 0)

    async def _guarded(self, node: Node, head: bytes | None, depth: int) -> None:
        self.stats.busy += 1
        try:
            await self._follow(node, head, depth)
        except Exception as e:  # best effort: a follow-up never ends the mount
            log.warning("libraries of %s: %s", "/".join(node.path()), e)
            self.stats.error = self.stats.error or str(e) or type(e).__name__
        finally:
            self.stats.busy -= 1

    def _where(self, node: Node) -> tuple[Layer, Entry] | None:
        entry = node.entry
        if node.upper or entry is None or not 0 <= node.layer < len(self.layers):
            return None
        return self.layers[node.layer], entry

    async def _follow(self, node: Node, head: bytes | None, depth: int) -> None:
        """Fetch the libraries ``node`` (an ELF file, ``head`` its first bytes) names."""
        found = await self._libraries(node, head, depth)
        if not found:
            return
        await self._fetch(found)
        await self._deeper(found, depth)

    async def _deeper(self, found: list[Node], depth: int) -> None:
        """Follow the libraries ``found`` at ``depth`` (fetched) one level down."""
        if depth + 1 < FOLLOW_DEPTH:
            async with trio.open_nursery() as nursery:
                for lib in found:
                    nursery.start_soon(self._guarded, lib, None, depth + 1)

    async def _libraries(self, node: Node, head: bytes | None, depth: int) -> list[Node]:
        """The libraries ``node`` (an ELF file, ``head`` its first bytes or None) names that
        this mount has not looked at yet, found as the loader would (and now seen)."""
        where = self._where(node)
        if where is None or not self.active:
            return []
        layer, entry = where
        # The chunks this look has charged (each once: its later reads find it cached); a
        # library (depth > 0) was charged whole when found, so its look is paid for.
        charged: set[int] | None = set() if depth == 0 else None

        async def look(offset: int, size: int) -> bytes:
            return await self._peek(layer, entry, offset, size, charged)

        # A small file in one chunk is looked at once (headers, dynamic section, strings), not
        # three times through the store: an extension module's is in memory already.
        whole = b""
        if head is None and 0 < entry.size <= LOOK_WHOLE and len(entry.chunks) == 1:
            whole = await look(0, entry.size)

        async def peek(offset: int, size: int) -> bytes:
            if not whole:
                return await look(offset, size)
            return whole[offset : offset + size] if offset >= 0 and size > 0 else b""

        if head is None:
            head = await peek(0, HEAD)
        h = elf.parse_header(head)
        if h is None or h.phdrs_end > PHDRS_MAX:
            return []
        if h.phdrs_end > len(head):
            head = await peek(0, h.phdrs_end)
        layout = elf.parse_layout(h, head)
        if layout is None or layout.dynamic is None:
            return []  # static, or not an executable or library
        self.stats.elf_files += 1
        dynamic = elf.parse_dynamic(h, await peek(*layout.dynamic))
        span = dynamic.string_span()
        if span is None or dynamic.strtab is None:
            return []
        at = layout.file_offset(dynamic.strtab + span[0])
        if at is None:
            return []
        table = await peek(at, min(span[1] - span[0], STRINGS_MAX))

        def string(offset: int | None) -> str | None:
            return None if offset is None else elf.string_at(table, offset - span[0])

        origin = "/".join(node.path()[:-1])
        runpath = string(dynamic.runpath)
        dirs = elf.search_dirs(runpath if runpath else string(dynamic.rpath), origin)
        dirs += elf.default_dirs(h)
        found: list[Node] = []
        for name in map(string, dynamic.needed):
            # Up to ~30 look-ups a name: let the FUSE requests waiting meanwhile in between.
            await trio.lowlevel.checkpoint()
            lib = self._find(name, dirs)
            if lib is not None:
                found.append(lib)
        return found

    def extensions(self, nodes: list[Node]) -> None:
        """A Python's extension modules, whose fetch is on its way (:class:`StdModules`):
        their libraries are looked up as their bytes land and fetched together, before the
        interpreter imports any of them (else each waits at its module's first read, in
        series: libssl and libcrypto behind ``_ssl``, libsqlite3 behind ``_sqlite3``)."""
        if self._nursery is not None and self.active:
            self.stats.busy += 1  # now: busy never reads 0 between the modules and this
            self._nursery.start_soon(self._extensions, nodes)

    async def _extensions(self, nodes: list[Node]) -> None:
        try:
            found: list[Node] = []
            limit = trio.CapacityLimiter(WORKERS)

            async def look(node: Node) -> None:
                async with limit:
                    if node.ino in self._seen or not self.active or self._held(node):
                        return
                    self._seen.add(node.ino)
                    try:
                        found.extend(await self._libraries(node, None, 0))
                    except Exception as e:  # best effort, as _guarded
                        log.warning("libraries of %s: %s", "/".join(node.path()), e)
                        self.stats.error = self.stats.error or str(e) or type(e).__name__

            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(look, node)
            # In blob order: one request per layer (no reader waits for them yet).
            found.sort(key=self._position)
            await self._fetch(found)
            # Their own libraries too (libssl's libcrypto), but no further: one module a
            # start-up seldom imports (nis) would bring a chain (libtirpc's Kerberos).
            await self._deeper(found, FOLLOW_DEPTH - 2)
        except Exception as e:  # best effort: a follow-up never ends the mount
            log.warning("libraries of extension modules: %s", e)
            self.stats.error = self.stats.error or str(e) or type(e).__name__
        finally:
            self.stats.busy -= 1

    def _held(self, node: Node) -> bool:
        """Whether the cache held all of ``node`` before this mount (fetched now, it is only
        in memory): a mount before fetched it, and what it needs then too, most likely.  Not
        looked at, it is followed at its first read as any ELF file (a warm start-up's look
        at every extension module cost the daemon ~20 ms of CPU for nothing)."""
        entry = node.entry
        cache = self.store.cache
        return entry is not None and all(c.digest in cache for c in entry.chunks if not c.zeros)

    def _position(self, node: Node) -> tuple[int, int]:
        entry = node.entry
        return node.layer, entry.chunks[0].offset if entry is not None and entry.chunks else 0

    async def _peek(
        self, layer: Layer, entry: Entry, offset: int, size: int, charged: set[int] | None
    ) -> bytes:
        """``store.peek``, its chunks not in ``charged`` (file offsets; None: all paid for)
        charged to the mount's budget (whether cached or not: a reader of many ELF files'
        starts, ``file /usr/lib/*``, must not fetch without bound); no bytes once the budget
        is spent."""
        if charged is not None:
            new = [
                c
                for c in chunks_for_range(entry, offset, max(size, 0))
                if c.file_offset not in charged
            ]
            cost = sum(c.size for c in new)
            if cost > self._left:
                return b""
            self._left -= cost
            charged.update(c.file_offset for c in new)
        return await self.store.peek(layer, entry, offset, size)

    def _find(self, name: str | None, dirs: list[str]) -> Node | None:
        """The library the loader would open for ``name``, if not looked at yet and small."""
        if not name or "/" in name:
            return None  # a path: the loader opens it as given, relative to the process
        for d in dirs:
            lib = lower_file(self.tree, f"{d}/{name}")
            if lib is None:
                continue
            entry = lib.entry
            assert entry is not None
            if lib.ino in self._seen or not 0 < entry.size <= min(FILE_MAX, self._left):
                return None
            self._seen.add(lib.ino)
            self._left -= entry.size
            return lib
        return None

    async def _fetch(self, libs: list[Node]) -> None:
        """``libs`` whole, at once: in one request while the loader's order (DT_NEEDED's) is
        the blob's, else one each.  A request's stream comes in blob order, so the loader,
        which wants them in its order, would wait behind a later library's bytes (libssl
        behind libcrypto's 1.8 MB), or overtake with a request of its own."""
        runs: list[tuple[Layer, list[Entry]]] = []
        last = (-1, -1)  # the previous library's layer and blob offset
        for lib in libs:
            w = self._where(lib)
            if w is None:
                continue
            layer, entry = w
            at = (lib.layer, entry.chunks[0].offset if entry.chunks else 0)
            if at[0] == last[0] and at[1] > last[1]:
                runs[-1][1].append(entry)
            else:
                runs.append((layer, [entry]))
            last = at

        async def one(layer: Layer, entries: list[Entry]) -> None:
            try:
                await self.store.prefetch(layer, entries, hold=True)
            except (LazyfsError, OSError) as e:
                log.warning("libraries from %s: %s", layer.blob_digest, e)
                self.stats.error = self.stats.error or str(e)
                return
            self.stats.libraries += len(entries)
            self.stats.bytes += sum(e.size for e in entries)

        async with trio.open_nursery() as nursery:
            for layer, entries in runs:
                nursery.start_soon(one, layer, entries)
