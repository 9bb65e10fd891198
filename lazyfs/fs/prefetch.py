"""Prefetch a workload group's files into the cache, in rank order, behind on-demand reads.

The driver runs in the mount's nursery once the mount is ready (it never delays readiness).
Entries of a :class:`~lazyfs.trace.schema.Group` are matched to the mounted layers by layer
digest and path; each tier is cut, in rank order, into batches of about ``batch_bytes``
compressed bytes, and each batch becomes one ``LayerStore.prefetch`` call per layer so the
store can merge neighbouring chunks into large range requests.  Prefetch requests take
PREFETCH slots: on-demand reads have reserved slots and boost any chunk they wait for, so
they always overtake.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from pathlib import Path

import trio

from lazyfs.errors import LazyfsError
from lazyfs.formats.chunkio import chunks_for_range
from lazyfs.formats.toc import TOC, Chunk, Entry, EntryTable
from lazyfs.fs.control import PrefetchStats
from lazyfs.remote.base import REQUEST_SENT
from lazyfs.store.bigchunk import is_big
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.store.plan import bundle, plan_fetch
from lazyfs.store.provider import ChunkProvider
from lazyfs.trace.schema import (
    Group,
    PrefetchGroups,
    Range,
    RankedEntry,
    Tier,
    decode_groups,
)

log = logging.getLogger(__name__)

# One batch: big enough that the store merges it into a few large requests, small enough that
# the highest-ranked files land first (the store orders a batch by blob offset, not by rank).
BATCH_BYTES = 16 * 1024 * 1024


# How long a reader that misses the cache waits for the prefetch's first requests to be sent
# (the groups may still be looked up in the registry) before it asks for its chunks itself.
GATE_WAIT = 1.0

# The least a reader waits for a lookup of stored groups still under way (a request's time
# measured on a loaded machine can be a few milliseconds, less than a lookup's on loopback).
LOOKUP_WAIT_MIN = 0.05

# Set in the prefetch's task (its children inherit it): the gate lets its calls through.
_PREFETCHING: ContextVar[bool] = ContextVar("lazyfs_prefetching", default=False)


class PrefetchGate:
    """The store's chunk provider from readiness until the prefetch's first requests are
    under way: an on-demand miss waits (until ``wait`` seconds after the first miss) so that,
    when the group covers its chunks, it joins the group's request instead of sending its own.
    While what to prefetch is still being looked up (``known`` not set), the miss waits for
    that only ``lookup_wait`` seconds (about what its own request costs): a slow lookup must
    not hold a reader that could have had its bytes meanwhile.  ``inner`` (binary deltas, or
    None) is asked as before."""

    def __init__(
        self,
        inner: ChunkProvider | None,
        wait: float = GATE_WAIT,
        *,
        known: trio.Event | None = None,
        lookup_wait: float = GATE_WAIT,
    ) -> None:
        self.inner = inner
        self.wait = wait
        self.opened = trio.Event()
        self.known = known
        self.lookup_wait = lookup_wait
        self._deadline: float | None = None  # one wait for all readers, not one each

    def open(self) -> None:
        self.opened.set()

    async def _hold(self) -> None:
        now = trio.current_time()
        if self._deadline is None:
            self._deadline = now + self.wait
            if self.known is not None and not self.known.is_set():
                with trio.move_on_after(self.lookup_wait):
                    await self.known.wait()
                if not self.known.is_set():
                    self.open()  # the lookup is slower than a request: nobody waits for it
                    return
        with trio.move_on_at(self._deadline):
            await self.opened.wait()

    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        prefetching = _PREFETCHING.get()
        if not prefetching and not self.opened.is_set():
            await self._hold()
        got = await self.inner.provide(layer, chunks, slot) if self.inner is not None else {}
        if prefetching and not got:
            # The store registers this batch's chunks as in flight before its next
            # checkpoint, so the readers woken here find them and wait for them.
            self.open()
        return got


# A batch of at least RANK_SPLIT_BYTES goes as one request per layer for each share here, cut
# in rank order and sent at once: a stream sends its ranges in blob order, so a reader of the
# first-ranked files would otherwise wait behind the bytes of every later-ranked file before
# them in the blob (or overtake the stream with a request of its own).
RANK_SHARES = (1, 2, 4)
RANK_SPLIT_BYTES = 4 * 1024 * 1024
#: The same for the requests a groups document carries (``first_requests``): a cold mount
#: sends them one after another in rank order (:mod:`lazyfs.store.earlyrange`), each at the
#: link's whole rate, so more parts cost no rate, and each part's blob order delays a
#: reader of its first-ranked file by less (at most MAX_EARLY_REQUESTS per layer).  Four:
#: with the TOC's request and one more, a one-layer start-up stays within six blob requests
#: (six parts made eight on the Debian image, loopback).
EARLY_RANK_SHARES = (1, 1, 1, 1)


def by_rank(
    items: Sequence[tuple[Layer, list[Chunk]]],
    min_bytes: int = RANK_SPLIT_BYTES,
    shares: Sequence[int] = RANK_SHARES,
) -> list[dict[Layer, list[Chunk]]]:
    """``items`` (rank order) cut into consecutive parts of about ``RANK_SHARES`` of their
    compressed bytes, each part's chunks by layer; one part below ``min_bytes`` or when each
    layer's chunks already lie in rank order (a re-laid-out layer: its stream is in order)."""
    spans = [sum(c.end - c.offset for c in chunks) for _, chunks in items]
    total = sum(spans)
    last: dict[Layer, int] = {}
    in_order = True
    for layer, chunks in items:
        for c in chunks:
            in_order = in_order and c.offset >= last.get(layer, 0)
            last[layer] = c.offset
    cuts: list[float] = []
    if total >= min_bytes and not in_order:
        acc = 0
        for share in shares[:-1]:
            acc += share
            cuts.append(total * acc / sum(shares))
    out: list[dict[Layer, list[Chunk]]] = [{}]
    done = 0
    for (layer, chunks), span in zip(items, spans, strict=True):
        if cuts and done >= cuts[0]:
            cuts.pop(0)
            out.append({})
        out[-1].setdefault(layer, []).extend(chunks)
        done += span
    return out


def load_group(path: str, name: str | None) -> tuple[PrefetchGroups, Group]:
    """Read and validate a groups document; raises LazyfsError with a one-line message."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise LazyfsError(f"cannot read prefetch groups {path}: {e.strerror}") from None
    doc = decode_groups(data, what=f"prefetch groups {path}")
    return doc, doc.group(name)


def landmark_group(layers: Sequence[Layer], *, startup: bool = True) -> Group | None:
    """The prefetch set that re-laid-out layers carry in themselves: every file before a
    ``.prefetch.landmark``, in blob order (which is rank order).  Without one, and with
    ``startup``, the files any dynamically linked start-up reads first
    (:func:`startup_group`); None if neither."""
    entries: list[RankedEntry] = []
    for layer in layers:
        end = layer.toc.prefetch_end
        if not end:
            continue
        entries += [
            RankedEntry(layer=layer.blob_digest, path=e.name, digest=e.digest, size=e.size)
            for e in layer.toc.files_before(end)
        ]
    if not entries:
        return startup_group(layers) if startup else None
    return Group(name="landmark", runs=0, tiers=[Tier(name="always", entries=entries)])


# Without groups a start-up's first misses come one after another: the program, then the ELF
# interpreter the kernel loads, the loader's cache, libc, libm, then the locale and iconv
# files glibc reads when a program sets its locale (Debian's Python start-up: 9 requests in
# series before the first module import; BENCHMARKS.md, issue 13, "fewer serial misses").
# Every glibc program needs the first of these, and the paths are the ones the loader and
# glibc open, so they are known before anything runs (stargz's "landmark" idea, without a
# re-laid-out layer): fetched once the mount is ready (not before: their decoding delayed
# the tree), low priority, readers overtake them.  Only the files themselves: taking what a
# miss of each would have brought too (512 KiB of neighbours) cost 6 MiB more to decode and
# cache beside the program's own first chunks, and the start-up was slower for it
# (BENCHMARKS.md, issue 13, "fewer serial misses").
STARTUP_GROUP = "startup-landmarks"
STARTUP_INTERPRETERS = (
    "lib64/ld-linux-x86-64.so.2",
    "lib/ld-linux-aarch64.so.1",
    "lib/ld-musl-x86_64.so.1",
    "lib/ld-musl-aarch64.so.1",
)
STARTUP_LIB_DIRS = ("lib/x86_64-linux-gnu", "lib64", "lib/aarch64-linux-gnu")
STARTUP_LIBS = ("libc.so.6", "libm.so.6", "gconv/gconv-modules.cache")
# etc/localtime: glibc's tzset reads it (Python's time module at every start-up; any
# localtime()): a miss of its own in series otherwise, 750 KiB of zoneinfo neighbours read
# for a 118-byte file (BENCHMARKS.md, issue 13, H64).
STARTUP_FILES = ("etc/ld.so.cache", "usr/lib/locale/C.utf8/LC_CTYPE", "etc/localtime")
# Where etc/localtime's link leads: the resolution's names are indexed under it.
ZONEINFO = "usr/share/zoneinfo/"
# A file larger than this is no start-up landmark (a locale archive is 200+ MiB).
STARTUP_FILE_MAX = 8 * 1024 * 1024
_MAX_LINKS = 16


def _mentions(toc: TOC, text: str) -> bool:
    """Whether some name of ``toc`` may hold ``text`` (a table answers without a scan)."""
    if isinstance(toc.entries, EntryTable):
        return toc.entries.mentions(text)
    return True


def _resolve(
    layers: Sequence[Layer], files: Callable[[Layer], Mapping[str, Entry]], path: str
) -> tuple[Layer, Entry] | None:
    """The regular file ``path`` names in the merged layers (top-most layer first), its
    symbolic links followed, or None."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part in (".", ".."):
            if part == ".." and done:
                done.pop()
            continue
        name = "/".join([*done, part])
        found = next(
            ((layer, e) for layer in reversed(layers) if (e := files(layer).get(name))), None
        )
        if found is None:
            return None
        layer, entry = found
        if entry.type == "symlink":
            links += 1
            if links > _MAX_LINKS:
                return None
            target = entry.link_name
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = []
            continue
        if entry.type == "hardlink" and not parts:
            entry = files(layer).get(entry.link_name.strip("/"))  # type: ignore[assignment]
            return (layer, entry) if entry is not None and entry.type == "reg" else None
        if parts and entry.type != "dir":
            return None
        if not parts:
            return (layer, entry) if entry.type == "reg" else None
        done.append(name.rsplit("/", 1)[-1])
    return None


def startup_group(layers: Sequence[Layer]) -> Group | None:
    """The start-up landmarks present in ``layers`` (see STARTUP_INTERPRETERS), as a group;
    None if there are none (not a glibc or musl image)."""
    wanted = [*STARTUP_INTERPRETERS, STARTUP_FILES[0]]
    for lib in STARTUP_LIBS:
        wanted += [f"{d}/{lib}" for d in STARTUP_LIB_DIRS]
    wanted += STARTUP_FILES[1:]
    # Only the names a resolution can pass through are indexed: a layer of 100,000 files
    # without them costs one scan of its names, not an index of all of them.
    parts = {p for path in [*wanted, ZONEINFO] for p in path.split("/")} | {"usr"}
    if not any(_mentions(x.toc, "ld-linux") or _mentions(x.toc, "ld-musl") for x in layers):
        return None

    def keep(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return (
            base in parts or base.startswith(("ld-", "libc-", "libm-")) or name.startswith(ZONEINFO)
        )

    names: dict[str, Mapping[str, Entry]] = {}

    def files(layer: Layer) -> Mapping[str, Entry]:
        if layer.blob_digest not in names:
            names[layer.blob_digest] = layer.toc.by_name(keep)
        return names[layer.blob_digest]

    entries: list[RankedEntry] = []
    seen: set[tuple[str, str]] = set()
    for path in wanted:
        found = _resolve(layers, files, path)
        if found is None:
            continue
        layer, e = found
        if (layer.blob_digest, e.name) in seen or not 0 < e.size <= STARTUP_FILE_MAX:
            continue
        seen.add((layer.blob_digest, e.name))
        entries.append(
            RankedEntry(layer=layer.blob_digest, path=e.name, digest=e.digest, size=e.size)
        )
    if not any(e.path.rsplit("/", 1)[-1].startswith("ld-") for e in entries):
        return None  # no ELF interpreter: nothing here is known to be read first
    return Group(name=STARTUP_GROUP, runs=0, tiers=[Tier(name="always", entries=entries)])


def _entry_chunks(entry: Entry, ranked: RankedEntry) -> list[Chunk]:
    if not ranked.ranges:
        return [c for c in entry.chunks if not c.zeros]
    out: list[Chunk] = []
    for start, end in ranked.ranges:
        out.extend(c for c in chunks_for_range(entry, start, end - start) if not c.zeros)
    return out


def _same_file(
    layers: Sequence[Layer],
    files: Callable[[Layer], Mapping[str, Entry]],
    path: str,
    digest: str,
) -> tuple[Layer | None, Entry | None]:
    for layer in reversed(layers):
        entry = files(layer).get(path)
        if entry is not None:
            if entry.type == "reg" and digest and entry.digest == digest:
                return layer, entry
            return None, None  # the top-most one is what the mount shows: another file
    return None, None


class Prefetcher:
    def __init__(
        self,
        store: LayerStore,
        layers: Sequence[Layer],
        group: Group,
        *,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.store = store
        self.batch_bytes = batch_bytes
        self.stats = PrefetchStats(group=group.name)
        # Set once each task of the first batch has sent a request (its headers are
        # written) or ended: what a mount waits for before a stretch of CPU.
        self.sent = trio.Event()
        # Resolve every entry now (cheap, in memory) so stats show the plan from the start.
        by_digest = {layer.blob_digest: layer for layer in layers}
        names: dict[str, Mapping[str, Entry]] = {}
        seen: set[str] = set()
        # tiers -> ordered (layer, chunks of one entry)
        self._plan: list[list[tuple[Layer, list[Chunk]]]] = []
        paths = {r.path.strip("/") for tier in group.tiers for r in tier.entries}

        def files(layer: Layer) -> Mapping[str, Entry]:
            if layer.blob_digest not in names:
                names[layer.blob_digest] = layer.toc.by_name(paths.__contains__)
            return names[layer.blob_digest]

        for tier in group.tiers:
            items: list[tuple[Layer, list[Chunk]]] = []
            for ranked in tier.entries:
                path = ranked.path.strip("/")
                found = by_digest.get(ranked.layer)
                entry = files(found).get(path) if found is not None else None
                if found is None:
                    # Another image of the same files (re-laid out by these very groups, or
                    # converted again): the file at that path in the top-most layer holding
                    # it, if its content is the one traced.
                    found, entry = _same_file(layers, files, path, ranked.digest)
                if found is None or entry is None or entry.type != "reg":
                    log.debug("prefetch: %s is not a file of %s", ranked.path, ranked.layer)
                    self.stats.skipped += 1
                    continue
                layer = found
                chunks = [c for c in _entry_chunks(entry, ranked) if c.digest not in seen]
                seen.update(c.digest for c in chunks)
                self.stats.entries += 1
                self.stats.prefetch_total += sum(c.size for c in chunks)
                if chunks:
                    items.append((layer, chunks))
            self._plan.append(items)

    def _batches(self, shares: Sequence[int] = RANK_SHARES) -> list[list[dict[Layer, list[Chunk]]]]:
        """Cut each tier, in rank order, into batches (tiers never share one); each batch is
        a few requests per layer, sent at once (see :func:`by_rank`)."""
        out: list[list[dict[Layer, list[Chunk]]]] = []
        for items in self._plan:
            batch: list[tuple[Layer, list[Chunk]]] = []
            span = 0
            for layer, chunks in items:
                batch.append((layer, chunks))
                span += sum(c.end - c.offset for c in chunks)
                if span >= self.batch_bytes:
                    out.append(by_rank(batch, shares=shares))
                    batch, span = [], 0
            if batch:
                out.append(by_rank(batch, shares=shares))
        return out

    def first_requests(self, merge_gap: int, max_request: int) -> dict[str, list[list[Range]]]:
        """The requests (blob ranges per layer) this prefetch's first batch sends on a cold
        cache from a source that sends several ranges in one request, planned as the store
        plans a stream (``merge_gap``, ``max_request``: the store's): what a groups document
        carries (``Group.requests``).  Big chunks are left out (each is fetched alone)."""
        out: dict[str, list[list[Range]]] = {}
        batches = self._batches(EARLY_RANK_SHARES)
        for part in batches[0] if batches else []:
            for layer, chunks in part.items():
                want = [c for c in chunks if not c.zeros and not is_big(c)]
                planned = plan_fetch(
                    layer, want, merge_gap, max_request, is_big, streamed=True, multirange=True
                )
                for request in bundle(planned):
                    runs = [(start, end) for start, end, _ in request]
                    out.setdefault(layer.blob_digest, []).append(runs)
        return out

    async def run(self) -> None:
        """Fetch everything planned; errors are logged and counted, never raised."""
        token = _PREFETCHING.set(True)  # the tasks started below inherit it
        t0 = trio.current_time()
        try:
            for n, requests in enumerate(self._batches()):
                tasks = [item for request in requests for item in request.items()]
                marks = _all_called(len(tasks), self.sent) if n == 0 else [None] * len(tasks)
                async with trio.open_nursery() as nursery:
                    for (layer, chunks), sent in zip(tasks, marks, strict=True):
                        nursery.start_soon(self._one, layer, chunks, sent)
        finally:
            _PREFETCHING.reset(token)
            self.sent.set()
        self.stats.prefetch_done = True
        self.stats.elapsed_ns = int((trio.current_time() - t0) * 1e9)
        log.info(
            "prefetch of group %s done: %d entries, %d bytes in %.2fs",
            self.stats.group,
            self.stats.entries,
            self.stats.prefetch_bytes,
            self.stats.elapsed_ns / 1e9,
        )

    async def _one(
        self, layer: Layer, chunks: list[Chunk], sent: Callable[[], None] | None
    ) -> None:
        # The first request this task's fetch sends counts it as sent; ending (everything
        # cached, provided, or failed) does too.
        REQUEST_SENT.set(sent)
        try:
            await self.store.prefetch(layer, chunks, hold=True)  # readers take them from memory
        except (LazyfsError, OSError) as e:
            log.warning("prefetch from %s: %s", layer.blob_digest, e)
            if not self.stats.error:
                self.stats.error = str(e)
        finally:
            if sent is not None:
                sent()
        self.stats.prefetch_bytes += sum(c.size for c in chunks)


def _all_called(n: int, event: trio.Event) -> list[Callable[[], None]]:
    """``n`` callables; ``event`` is set once each of them has been called (at least once)."""
    left = set(range(n))

    def called(i: int) -> None:
        left.discard(i)
        if not left:
            event.set()

    return [functools.partial(called, i) for i in range(n)]
