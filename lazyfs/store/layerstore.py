"""The layer store: on-demand reads, prefetch and pulls, on top of the chunk cache.

Every chunk a task needs is first looked for locally (cache index or readiness map), then
joined if some task is already fetching it (single flight: one ``_Flight`` per digest, shared
by all layers), and otherwise planned into range requests: the missing chunks sorted by blob
offset, merged while the gap is at most ``merge_gap`` and the request at most ``max_request``,
plus any chunk lying wholly inside a request's range (those bytes come anyway).

Requests take a slot from :class:`PrioritySlots`; decoding and hashing run in worker threads;
verified chunks are handed to waiters first and written to the cache after, so only the task
that started a fetch pays for the write.  A chunk too big for memory is the exception: it goes
alone, decoded straight into the cache (``store.bigchunk``), and its waiters read it there.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import logging
import math
import operator
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import NoReturn

import trio

from lazyfs.atomic import atomic_write
from lazyfs.errors import IntegrityError, LazyfsError, RemoteError
from lazyfs.formats.chunkio import check_chunk, chunks_for_range, decode_chunk
from lazyfs.formats.toc import TOC, Chunk, Entry
from lazyfs.heap import trim_heap
from lazyfs.remote.base import REQUEST_SENT, RangesSink, Source
from lazyfs.store import plan
from lazyfs.store.bigchunk import BIG_CHUNK_BYTES, decode_to_cache, is_big
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.chunkmap import ChunkMap, indexed_chunks
from lazyfs.store.earlyrange import EarlyRange
from lazyfs.store.hot import DEFAULT_HOT_BYTES, HotChunks
from lazyfs.store.layerstate import Layer, WholeBlob, read_span
from lazyfs.store.provider import ChunkProvider
from lazyfs.store.slots import BACKGROUND, ONDEMAND, PREFETCH, PrioritySlots, Ticket
from lazyfs.store.stats import LayerStats, StreamStats

log = logging.getLogger(__name__)

# Cache reads up to this size run on the trio thread: from the page cache they take
# microseconds, less than handing them to a worker thread.  A chunk not yet verified in this
# process is read and hashed whole, so it counts at its whole size (hashing 256 KiB takes
# ~0.2 ms; the hop cost a fresh mount over a warm cache 0.3-0.5 ms on every file's first
# read: BENCHMARKS.md, issue 13, "the cold start's own time after readiness").  Larger reads
# of verified chunks run there too when their bytes are all in the page cache (a 1 MiB copy
# takes ~0.1 ms, a hop 0.1-0.5 ms on a loaded machine).
INLINE_READ_BYTES = 256 * 1024
# A prefetch hashes the cached chunks it is given about this many bytes at a time per worker
# thread (see _verify): few hops, and an unmount waits for one batch at most (~6 ms).
VERIFY_BATCH = 4 * 1024 * 1024
# ... and keeps the bytes of those up to this size in memory (``_hot``, bounded), as if just
# fetched: their first READ then opens, stats and reads no cache file (~90 of its ~150 us on
# a fresh mount over a warm cache: BENCHMARKS.md, issue 13, H75).  The Debian group's 129
# chunks up to 64 KiB hold 2.1 MiB; its 38 larger ones (19.3 MiB) are read in slices.
KEEP_VERIFIED_BYTES = 64 * 1024
# Decoded in batches of about this many compressed bytes (a thread hop per chunk costs more
# than decoding a small one), at most DECODE_TASKS batches at once: the stream waits beyond.
STREAM_BATCH = 256 * 1024
DECODE_TASKS = 2
# A chunk a reader waits for, up to this size compressed and plain, is decoded on the trio
# thread as soon as its bytes are in, alone: a miss waited ~13 ms for a worker thread to
# decode the ~256 KiB batch around its chunk (GIL and cores shared with the stream and the
# cache writes), where its own chunk takes tens of microseconds, at most ~1 ms (BENCHMARKS.md,
# issue 13, "the cost of each miss").  A larger one goes to a worker thread alone, ahead of
# its neighbours' batch.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PLAIN = 1024 * 1024
# A reader waiting on a chunk this far ahead in a stream that has no measured speed yet
# fetches it itself (the old prefetch request size: what a reader used to wait behind).
OVERTAKE_BYTES = 1024 * 1024
# ... and one with a measured speed, when it would wait longer than twice the round trip a
# request of its own costs, and at least this long (a request costs the daemon CPU too).
OVERTAKE_MIN_WAIT = 0.02
MAP_FLUSH_CHANGES = 256
MAP_FLUSH_SECONDS = 2.0
# A miss's request also takes this much of what lies before it in the blob: a package's
# files are not read in the path order the layer is laid out in (no-groups cold start: Debian
# 39 -> 28 requests for 18.0 -> 20.2 MiB, the sample 54 -> 28 for 16.4 -> 17.2 MiB).  The
# amplify window may grow to AMPLIFY_MAX while its read-ahead gets read; by default it does
# not: on Debian a 4 MiB cap took 22 requests and 26.6 MiB and no measurable time off a
# loaded 2-CPU machine, where decoding and caching every extra byte costs the daemon CPU
# (BENCHMARKS.md, issue 13, "cold start without prefetch groups").
AMPLIFY_MAX = 512 * 1024
AMPLIFY_BEHIND = 256 * 1024
# The background fill only issues a request after on-demand reads were quiet this long.
BACKGROUND_IDLE_SECONDS = 0.25
# What readers' requests bring is written to the cache once on-demand reads have been quiet
# as long (readers are served from memory meanwhile; see _hold), WRITE_DEFER_SECONDS after it
# came at the latest, and at the store's close: a no-groups cold start writes ~2,200 chunk
# files, whose creation took the CPUs and GIL the start-up waited for (BENCHMARKS.md, issue
# 13, "the cost of each miss").  At most WRITE_HOLD_BYTES (decoded) wait; a reader's chunks
# beyond that are written at once, as before.  A start-up's prefetch (``prefetch(hold=True)``:
# groups, the libraries an ELF file needs, a Python's modules, an early range; not a reader's
# read-ahead) is held the same way, in the same WRITE_HOLD_BYTES.  Chunks of any size held in
# memory wait, a reader's as a prefetch's: a file's bytes cost CPU too (this machine's ext4: a
# put takes 0.4 ms of CPU at 16 KiB, 8 ms at 1 MiB, 32 ms at 4 MiB; BENCHMARKS.md, H69).  The
# Debian start-up without groups holds ~30 MiB: the landmarks 4.5, the program's first chunk
# 4, its modules 12, the extension modules' libraries 7; with 16 MiB and a reader's chunks
# over 64 KiB written at once, 14 MiB were written during it, ~75 ms of the daemon's CPU in
# that time (BENCHMARKS.md, issue 13, H80).  The Debian group brings 21.4 MiB.
# WRITE_BATCH chunks (at most WRITE_BATCH_BYTES) go to a thread at a time, so a read that
# comes meanwhile shares the CPUs with one batch at most before the writes pause again.
WRITE_IDLE_SECONDS = BACKGROUND_IDLE_SECONDS
WRITE_DEFER_SECONDS = 5.0
WRITE_HOLD_BYTES = 32 * 1024 * 1024
WRITE_HOLD_CHUNK = BIG_CHUNK_BYTES
WRITE_HOLD_PREFETCH_CHUNK = BIG_CHUNK_BYTES
WRITE_BATCH = 32
WRITE_BATCH_BYTES = 1024 * 1024

ProgressCallback = Callable[[LayerStats], None]


class _Abandoned(Exception):
    """The task fetching a chunk was cancelled first: its waiters fetch the chunk themselves."""


class _Flight:
    """One chunk being fetched; every task that needs it waits on the same event."""

    __slots__ = ("data", "error", "event", "group", "in_cache", "ticket", "waiting", "written")

    def __init__(self, ticket: Ticket, group: _Group) -> None:
        self.data = b""
        self.error: BaseException | None = None
        self.in_cache = False  # a big chunk: its waiters read it from the cache file
        self.event = trio.Event()
        self.ticket = ticket  # boosted when an on-demand reader starts waiting
        self.group = group  # the request bringing it: where its stream is
        self.waiting = False  # an on-demand reader waits: decode it without delay
        # Made when the chunk is handed over (in memory), set once its cache write is done
        # or given up: LayerStore.prefetch waits for it.  None: failed, or a big chunk.
        self.written: trio.Event | None = None

    def succeed(self, data: bytes) -> None:
        self.data = data
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class _Group:
    """One planned request (one range, or several in a multi-range request) and the chunks it
    brings."""

    __slots__ = (
        "arrived",
        "chunks",
        "end",
        "first_at",
        "flights",
        "got",
        "hold_up_to",
        "hurry",
        "pos",
        "runs",
        "sent_at",
        "start",
        "ticket",
    )

    def __init__(
        self, start: int, end: int, chunks: list[Chunk], runs: list[tuple[int, int]] | None = None
    ) -> None:
        self.start = start
        self.end = end
        self.runs = runs or [(start, end)]  # the ranges asked for, in blob order
        self.got = 0  # bytes received
        self.chunks = chunks
        self.flights: dict[str, _Flight] = {}
        self.ticket = Ticket(BACKGROUND)
        # The stream's progress: bytes [start, pos) are in; sent_at / first_at (trio time)
        # when the request got its slot and when its first byte came, None until then.
        self.pos = start
        self.sent_at: float | None = None
        self.first_at: float | None = None
        # The largest of its chunks whose cache write may wait (LayerStore._hold); 0: none.
        self.hold_up_to = 0
        # An adopted early range: the blob offset its bytes have come up to (ahead of ``pos``
        # while the TOC decoded); None for a request of the store's own.
        self.arrived: Callable[[], int] | None = None
        # While the stream runs: hand the complete chunks it keeps for a batch to a decoder
        # now (a reader began to wait for one of them after its bytes came).
        self.hurry: Callable[[], None] | None = None

    def far(self, c: Chunk, now: float) -> bool:
        """Whether a reader of ``c`` should ask for it alone rather than wait for the bytes
        before it in this stream (its own bytes it waits for either way)."""
        if self.arrived is not None and c.end <= self.arrived():
            return False  # here already, waiting to be handed over: no request is sooner
        ahead = self._ahead(c.offset)
        if self.first_at is None or self.sent_at is None or now <= self.first_at:
            return ahead > OVERTAKE_BYTES
        rate = self.got / (now - self.first_at)
        latency = self.first_at - self.sent_at
        return rate > 0 and ahead / rate > max(2 * latency, OVERTAKE_MIN_WAIT)

    def _ahead(self, offset: int) -> int:
        """The bytes this stream sends before blob ``offset``: its gaps never come."""
        if len(self.runs) == 1:
            return offset - self.pos
        return sum(max(0, min(end, offset) - max(start, self.pos)) for start, end in self.runs)


class _Window:
    """A layer's amplify budget (:func:`plan.amplify`): the cap at a miss whose previous
    miss's neighbours were read meanwhile (a start-up walking directories laid out by path),
    halved down to the base at one whose were not (first reads all over the layer)."""

    __slots__ = ("brought", "size", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self.brought: set[str] = set()  # what the last miss's request took beyond its reads
        self.used = False  # a read wanted one of those since

    def budget(self, asked: Sequence[Chunk], base: int, cap: int) -> int:
        """The budget for a read of ``asked``, should it miss."""
        self.used = self.used or any(c.digest in self.brought for c in asked)
        return cap if self.used else max(self.size // 2, base)

    def missed(self, brought: set[str], budget: int) -> None:
        self.size, self.brought, self.used = budget, brought, False


def _inline(c: Chunk) -> bool:
    """Whether ``c`` is small enough to decode on the trio thread."""
    return c.end - c.offset <= INLINE_DECODE_BYTES and c.size <= INLINE_DECODE_PLAIN


def _reraise(error: BaseException) -> NoReturn:
    # Each waiter raises its own copy: one shared exception object would pile up the
    # tracebacks of every task that raised it.
    if isinstance(error, LazyfsError):
        try:
            copy = type(error)(*error.args)
        except TypeError:
            raise error from None
        raise copy from error
    raise error


class LayerStore:
    """Reads layer content through the chunk cache, fetching what is missing.

    ``readahead`` (compressed bytes): the first read of a file whose chunks total at most this
    much fetches the whole file in the same request; a read that continues where the previous
    read of the file ended also takes the file's next chunks up to this much.  ``amplify``
    (compressed bytes, 0 to disable): such a first or sequential read also takes the chunks
    that follow in the blob, as Nydus' amplify_io does, and ``behind`` bytes of those before
    it; the budget is ``amplify_max`` while what it brought gets read (:class:`_Window`).
    Readahead only rides along in a request that is made anyway; it never causes a request of
    its own.
    """

    def __init__(
        self,
        cache: ChunkCache,
        *,
        merge_gap: int = 64 * 1024,
        max_request: int = 8 * 1024 * 1024,
        concurrency: int = 8,
        readahead: int = 512 * 1024,
        amplify: int = 512 * 1024,
        amplify_max: int = AMPLIFY_MAX,
        behind: int = AMPLIFY_BEHIND,
        pipeline: int = 8 * 1024 * 1024,
        hot_bytes: int = DEFAULT_HOT_BYTES,
    ) -> None:
        self.cache = cache
        self.merge_gap = merge_gap
        self.max_request = max_request
        self.readahead = readahead
        self.amplify = amplify
        self.amplify_max = amplify_max
        self.behind = behind
        self._windows: dict[str, _Window] = {}
        self.pipeline = pipeline
        self._hot = HotChunks(hot_bytes)
        self._nursery: trio.Nursery | None = None
        # A quarter of the slots (at least one, when there are two) only serve on-demand reads.
        reserved = 0 if concurrency <= 1 else max(1, concurrency // 4)
        self._slots = PrioritySlots(concurrency, reserved)
        self._layers: dict[str, Layer] = {}
        self._inflight: dict[str, _Flight] = {}
        # Per layer, on-demand requests planned but not yet sent (waiting for a slot): misses
        # that come meanwhile join them in one multi-range request.
        self._unsent: dict[str, list[_Group]] = {}
        self._dirty: set[Layer] = set()
        self._last_ondemand = -math.inf
        # Verified chunks whose cache write waits (_hold), oldest first, with when they came;
        # their flights stay in _inflight, resolved: readers take them from there (a hit) and
        # nobody fetches them again.
        self._held: dict[str, tuple[Layer, _Flight, float]] = {}
        self._held_bytes = 0
        self._writer_wake = trio.Event()
        self._bg_scope: trio.CancelScope | None = None
        self._draining = False  # see drain: no new request leaves
        self._layer_added = trio.Event()
        #: tried before the network for missing chunks (see lazyfs.store.provider)
        self.provider: ChunkProvider | None = None

    @property
    def layers(self) -> list[Layer]:
        return list(self._layers.values())

    # ------------------------------------------------------------------------------- layers

    def add_layer(self, blob_digest: str, source: Source, toc: TOC, size: int = 0) -> Layer:
        """Register a layer (idempotent per blob digest) and reconcile its readiness map with
        the cache: bits for chunks present (also via another layer) are set, bits for chunks
        gone are cleared, so readiness and stats are right from the start."""
        layer = self._layers.get(blob_digest)
        if layer is not None:
            return layer
        chunks, index = indexed_chunks(toc)
        path = self.cache.layer_map_path(blob_digest)
        cmap = ChunkMap.load(path, blob_digest, chunks.digest_view)
        # Reconciled before the layer exists, so its stats start right; one pass over flags
        # rather than a set/clear call per chunk (a mount waits for this).
        cache = self.cache
        now = bytearray(len(chunks))
        # A fresh cache and no kept map (a cold mount): no chunk to look for.
        if cmap.ready or cache.holds_chunks():
            was = cmap.flags()
            for i, d in enumerate(chunks.digests()):
                # A set bit the index does not know costs one stat (another process may have
                # written the chunk); unset bits cost only a dict lookup.
                if d in cache or (was[i] and cache.probe(d)):
                    now[i] = 1
        cmap.set_flags(now)
        layer = Layer(blob_digest, source, toc, cmap, (chunks, index))
        layer.size = size  # known from the manifest; lets a Range-less registry be handled
        if cmap.changes:
            self._dirty.add(layer)
        if cmap.ready:
            layer.stats.bytes_held = sum(
                itertools.compress(map(operator.sub, chunks.ends, chunks.offsets), now)
            )
        self._layers[blob_digest] = layer
        self._layer_added.set()
        return layer

    # ------------------------------------------------------------------------------- reads

    async def read(self, layer: Layer, entry: Entry, offset: int, size: int) -> bytes:
        """The bytes ``[offset, offset + size)`` of ``entry``; short only at end of file.
        Raises IntegrityError when a chunk fails verification twice, and whatever the source
        raises (RemoteError, NotFoundError) when it cannot deliver."""
        data, _ = await self.read_waited(layer, entry, offset, size)
        return data

    async def read_waited(
        self, layer: Layer, entry: Entry, offset: int, size: int
    ) -> tuple[bytes, int]:
        """:meth:`read`, and the nanoseconds it waited for the network (0 when served from
        the cache), for a listener that records waits with the read itself."""
        if offset < 0 or size < 0:
            raise ValueError(f"bad read: offset={offset}, size={size}")
        end = min(offset + size, entry.size)
        if offset >= end:
            await trio.lowlevel.checkpoint()
            return b"", 0
        t0 = time.perf_counter_ns()
        self._last_ondemand = trio.current_time()
        chunks = chunks_for_range(entry, offset, end - offset)
        needs = [
            (
                c,
                max(offset, c.file_offset) - c.file_offset,
                min(end, c.file_offset + c.size) - c.file_offset,
            )
            for c in chunks
        ]
        prev = layer.note_read(entry.name, end)
        extra: list[Chunk] = []
        budget = 0
        amplified: Callable[[], list[Chunk]] | None = None
        if prev is None or prev == offset:  # a first or sequential read, not random access
            extra = plan.readahead(entry, chunks, prev is None, self.readahead)
            budget = self._window(layer).budget(chunks, self.amplify, self.amplify_max)
            asked = [*chunks, *extra]
            # Planned only if the read misses: a read served here does not need it.
            amplified = functools.partial(
                plan.amplify, layer, asked, budget, self._is_local(layer), self.behind
            )
            if prev == offset or offset == 0:
                self._read_ahead_of(layer, entry, asked, first=prev is None)
        parts, waited = await self._obtain(layer, needs, extra, budget, amplified)
        ns = time.perf_counter_ns() - t0
        layer.stats.record_read(ns, waited=waited)
        return (parts[0] if len(parts) == 1 else b"".join(parts)), ns if waited else 0

    def read_now(
        self, layer: Layer, entry: Entry, offset: int, size: int, now: float
    ) -> bytes | None:
        """:meth:`read`'s answer without awaiting, when every chunk it needs is in memory
        (kept hot, or fetched and not yet written) or cached and readable on this thread as
        :meth:`_read_cached` would, and it would start no read-ahead: what :meth:`read_waited`
        would do then, done here; else None, and nothing changed (but the hot set's order and
        the cache's recency).  For a caller outside trio's run (lazyfs.fs.fastpath), between
        two of its steps: ``now`` is trio's clock."""
        if offset < 0 or size < 0:
            return None
        end = min(offset + size, entry.size)
        if offset >= end:
            return b""
        t0 = time.perf_counter_ns()
        chunks = chunks_for_range(entry, offset, end - offset)
        parts: list[bytes | None] = []
        local: list[tuple[Chunk, int, int]] = []
        for c in chunks:
            lo = max(offset, c.file_offset) - c.file_offset
            hi = min(end, c.file_offset + c.size) - c.file_offset
            if c.zeros:
                parts.append(bytes(hi - lo))
                continue
            data = self._hot.get(c.digest)
            if data is None:
                data = self._resolved(c.digest)
            if data is not None:
                parts.append(data if (lo, hi) == (0, c.size) else data[lo:hi])
            elif c.digest not in self._inflight and self._maybe_cached(layer, c):
                parts.append(None)
                local.append((c, lo, hi))
            else:
                return None  # to fetch, or on its way
        prev = layer.read_pos.get(entry.name)
        if (prev == offset or (prev is None and offset == 0)) and self._nursery is not None:
            extra = plan.readahead(entry, chunks, prev is None, self.readahead)
            ahead = plan.ahead_in_file(
                entry,
                [*chunks, *extra],
                self.pipeline,
                lambda c: self._maybe_cached(layer, c),
                lambda c: c.digest in self._inflight,
            )
            if ahead:
                return None  # read-ahead to start: a task's work (as in read_waited)
        if local:
            got = self._read_inline(local)
            if got is None:
                return None
            it = iter(got)
            parts = [next(it) if p is None else p for p in parts]
            for c, _, _ in local:
                self._mark_ready(c.digest)
        if prev is None or prev == offset:
            self._window(layer).budget(chunks, self.amplify, self.amplify_max)
        layer.note_read(entry.name, end)
        self._last_ondemand = now
        layer.stats.cache_hits += sum(1 for c in chunks if not c.zeros)
        layer.stats.record_read(time.perf_counter_ns() - t0, waited=False)
        return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]

    def _read_inline(self, todo: list[tuple[Chunk, int, int]]) -> list[bytes] | None:
        """Slices of cached chunks read on this thread, where :meth:`_read_cached` would
        read them inline; None if one needs a worker thread, or is not validly cached."""
        nowait = self._inline(todo)
        if nowait is None:
            return None
        digests = [c.digest for c, _, _ in todo]
        self.cache.pin(digests)
        try:
            got: list[bytes] = []
            for c, lo, hi in todo:
                data = self.cache.read(c.digest, c.size, lo, hi, nowait=nowait)
                if data is None:
                    return None  # read again by read(), which forgets it
                got.append(data)
            return got
        except BlockingIOError:
            return None
        finally:
            self._evicted(self.cache.unpin(digests))

    def _resolved(self, digest: str) -> bytes | None:
        """A chunk verified and handed over but not cached yet (held for a deferred write, or
        being written): a hit, not a network wait."""
        f = self._inflight.get(digest)
        if f is None or not f.event.is_set() or f.error is not None or f.in_cache:
            return None
        return f.data

    def _window(self, layer: Layer) -> _Window:
        w = self._windows.get(layer.blob_digest)
        if w is None:
            w = self._windows[layer.blob_digest] = _Window(self.amplify)
        return w

    def _is_local(self, layer: Layer) -> plan.IsLocal:
        return lambda c: c.digest in self._inflight or self._maybe_cached(layer, c)

    def _read_ahead_of(
        self, layer: Layer, entry: Entry, asked: list[Chunk], *, first: bool = False
    ) -> None:
        """A sequential reader of a big file will want the next chunks soon: start fetching
        them now, in the background, so a ``cat`` overlaps its network with its reads instead
        of waiting for one chunk after another.  The reader joins (and boosts) these flights
        when it gets there.  ``first``: the file's first read (an exec's: the rest of the
        program, which its loader maps at once)."""
        if self._nursery is None:
            return
        nxt = plan.ahead_in_file(
            entry,
            asked,
            self.pipeline,
            lambda c: self._maybe_cached(layer, c),
            lambda c: c.digest in self._inflight,
        )
        if nxt:
            self._nursery.start_soon(self._quiet_prefetch, layer, nxt, first)

    async def _quiet_prefetch(self, layer: Layer, chunks: list[Chunk], hold: bool) -> None:
        try:
            # Held only after a file's first read (at most ``pipeline`` bytes: python3.11's
            # second chunk, 2.6 MiB, cost ~20 ms of CPU as the loader started): a long
            # sequential read's read-ahead would keep WRITE_HOLD_BYTES of large chunks in
            # memory while it lasts.
            await self.prefetch(layer, chunks, hold=hold)
        except (LazyfsError, OSError) as e:
            log.debug("read-ahead of %s failed: %s", layer.blob_digest, e)  # the reader retries

    def _maybe_cached(self, layer: Layer, c: Chunk) -> bool:
        if c.digest in self.cache:
            return True
        i = layer.index.get(c.digest)
        return i is not None and layer.map[i]

    def _hashed(self, chunks: list[Chunk]) -> list[bytes | None]:
        """Each cached chunk hashed if not verified yet: None if it is not valid (it is
        deleted), its bytes if it is at most KEEP_VERIFIED_BYTES (read whole to be hashed
        anyway), else b"" (a read of no bytes verifies the whole chunk)."""
        return [
            self.cache.read(c.digest, c.size, 0, c.size if c.size <= KEEP_VERIFIED_BYTES else 0)
            for c in chunks
        ]

    def _read_local(self, needs: list[tuple[Chunk, int, int]]) -> list[bytes | None]:
        return [self.cache.read(c.digest, c.size, lo, hi) for c, lo, hi in needs]

    def _inline(self, todo: list[tuple[Chunk, int, int]]) -> bool | None:
        """Whether these cached slices are read on the calling thread (see _read_cached):
        None if a worker thread reads them, else whether only from the page cache (nowait)."""
        hashed = total = 0
        for c, lo, hi in todo:
            if self.cache.is_verified(c.digest):
                total += hi - lo
            else:
                hashed += c.size
        total += hashed
        if hashed > INLINE_READ_BYTES or (
            total > INLINE_READ_BYTES and not self.cache.nowait_reads
        ):
            return None
        return total > INLINE_READ_BYTES

    async def _read_cached(self, todo: list[tuple[Chunk, int, int]]) -> list[bytes | None]:
        """Slices of cached chunks (None: not validly cached).  Read on the trio thread when
        that is quicker than a worker thread's hop: small reads, and larger ones of verified
        chunks whose bytes are all in the page cache (RWF_NOWAIT says so without waiting).
        A worker thread reads what must be hashed first beyond INLINE_READ_BYTES, and what
        the disk must bring."""
        cache = self.cache
        nowait = self._inline(todo)
        if nowait is None:
            return await trio.to_thread.run_sync(self._read_local, todo)
        # No checkpoint: a READ served from memory or the page cache is answered at once; a
        # trip through the run queue waited behind the prefetch's stream and decode tasks.
        got: list[bytes | None] = []
        later: list[int] = []
        for c, lo, hi in todo:
            try:
                got.append(cache.read(c.digest, c.size, lo, hi, nowait=nowait))
            except BlockingIOError:
                later.append(len(got))
                got.append(None)
        if later:
            rest = await trio.to_thread.run_sync(self._read_local, [todo[j] for j in later])
            for j, data in zip(later, rest, strict=True):
                got[j] = data
        return got

    async def _obtain(
        self,
        layer: Layer,
        needs: list[tuple[Chunk, int, int]],
        extra: list[Chunk],
        budget: int,
        amplified: Callable[[], list[Chunk]] | None = None,
    ) -> tuple[list[bytes], bool]:
        """The ``[lo, hi)`` slices of the needed chunks, and whether the network was waited
        for.  Pins the chunks meanwhile so a concurrent put cannot evict them.  ``budget``:
        the amplify budget ``extra`` was planned with, kept as the layer's if it misses;
        ``amplified()`` plans the rest of ``extra`` then."""
        parts: list[bytes | None] = [None] * len(needs)
        for i, (c, lo, hi) in enumerate(needs):
            if c.zeros:
                parts[i] = bytes(hi - lo)
        digests = [c.digest for c, _, _ in needs if not c.zeros]
        if not digests:
            await trio.lowlevel.checkpoint()
            return parts, False  # type: ignore[return-value]  # every part is filled here
        waited = False
        missed: set[int] = set()
        rejoined: set[int] = set()
        self.cache.pin(digests)
        try:
            while True:
                pending = [i for i, p in enumerate(parts) if p is None]
                for i in pending:
                    c, lo, hi = needs[i]
                    hot = self._hot.get(c.digest)
                    if hot is None:
                        hot = self._resolved(c.digest)
                    if hot is not None:
                        parts[i] = hot if (lo, hi) == (0, c.size) else hot[lo:hi]
                        layer.stats.cache_hits += 1
                pending = [i for i in pending if parts[i] is None]
                local = [
                    i
                    for i in pending
                    if needs[i][0].digest not in self._inflight
                    and (
                        self._maybe_cached(layer, needs[i][0])
                        # Before a miss, one stat: another daemon sharing the cache (the
                        # snapshotter's chains) may have written it since this one started.
                        or (not missed and self.cache.probe(needs[i][0].digest))
                    )
                ]
                if local:
                    got = await self._read_cached([needs[i] for i in local])
                    for i, data in zip(local, got, strict=True):
                        digest = needs[i][0].digest
                        if data is None:
                            self._forget(digest)  # the map was wrong, or the file was bad
                        else:
                            parts[i] = data
                            # A big chunk's waiter reads it here too: a miss, not a hit.
                            layer.stats.cache_hits += i not in missed
                            self._mark_ready(digest)
                    pending = [i for i in pending if parts[i] is None]
                if not pending:
                    break
                if self.provider is not None and not missed:
                    made = await self._provided(layer, [needs[i][0] for i in pending], ONDEMAND)
                    for i in pending:
                        c, lo, hi = needs[i]
                        data = made.get(c.digest)
                        if data is not None:
                            parts[i] = data if (lo, hi) == (0, c.size) else data[lo:hi]
                            waited = True
                    pending = [i for i in pending if parts[i] is None]
                    if not pending:
                        break
                layer.stats.cache_misses += len(set(pending) - missed)
                missed.update(pending)
                waited = True
                if amplified is not None:
                    extra, amplified = [*extra, *amplified()], None
                groups = self._start(layer, [needs[i][0] for i in pending], extra, ONDEMAND)
                for g in groups:
                    # Without the store's nursery the reader waits for the write itself.
                    g.hold_up_to = WRITE_HOLD_CHUNK if self._nursery is not None else 0
                mine = {d for g in groups for d in g.flights}
                if budget and groups:
                    asked = {needs[i][0].digest for i in pending}
                    self._window(layer).missed(mine - asked, budget)
                extra = []  # readahead is attempted once
                flights: dict[str, _Flight] = {}
                far: list[Chunk] = []
                now = trio.current_time()
                for i in pending:
                    c = needs[i][0]
                    f = self._inflight.get(c.digest)
                    if f is not None:
                        flights[c.digest] = f
                        f.waiting = True
                        self._slots.boost(f.ticket, ONDEMAND)  # never wait behind prefetch
                        if f.group.hurry is not None:
                            f.group.hurry()
                        if c.digest not in mine and not is_big(c) and f.group.far(c, now):
                            far.append(c)
                if far:
                    await self._overtake(layer, far)
                if not flights and self._draining:
                    # Nothing on its way for them and nothing may be sent (drain): without
                    # this the loop would go round for ever without a checkpoint.
                    raise RemoteError(f"{layer.blob_digest}: not fetched, the mount is going")
                senders = self._senders(layer, groups)
                if senders and self._nursery is not None:
                    # Readers wait for their chunks' flights, which resolve when the chunks
                    # are decoded; writing them to the cache happens behind their backs.
                    for send in senders:
                        self._nursery.start_soon(send)
                elif senders:
                    async with trio.open_nursery() as nursery:
                        for send in senders:
                            nursery.start_soon(send)
                for f in flights.values():
                    await f.event.wait()
                for i in pending:
                    c, lo, hi = needs[i]
                    f = flights.get(c.digest)
                    if f is None or isinstance(f.error, _Abandoned):
                        continue  # cached meanwhile, or its fetcher was cancelled: go again
                    if f.error is not None and c.digest not in mine and i not in rejoined:
                        # A read-ahead or prefetch this reader joined failed: the reader
                        # still gets an attempt of its own before an error.
                        rejoined.add(i)
                        continue
                    if f.error is not None:
                        _reraise(f.error)
                    if f.in_cache:
                        continue  # decoded to disk, too big to hand over: read it there
                    parts[i] = f.data if (lo, hi) == (0, c.size) else f.data[lo:hi]
        finally:
            self._evicted(self.cache.unpin(digests))
        return parts, waited  # type: ignore[return-value]  # every part is filled by now

    # ------------------------------------------------------------------------------- planning

    def _start(
        self, layer: Layer, chunks: list[Chunk], extra: list[Chunk], priority: int
    ) -> list[_Group]:
        """Plan requests for the chunks nobody is fetching yet and register their flights.
        Runs without a checkpoint, so no other task can register the same chunk meanwhile."""
        if self._draining:
            return []  # the mount is gone: nothing new is fetched (drain)
        seen: set[str] = set()
        want: list[Chunk] = []
        needed = {c.digest for c in chunks}
        out: list[_Group] = []
        for c in (*chunks, *extra):
            d = c.digest
            if c.zeros or d in seen or d in self._inflight or d in self.cache:
                continue
            seen.add(d)
            if not is_big(c):
                want.append(c)
            elif d in needed:  # alone, streamed to disk (store.bigchunk); never read-ahead
                out.append(self._register(_Group(c.offset, c.end, [c]), priority))
        streamed = priority != ONDEMAND
        # A stream from a source that sends several ranges in one request leaves gaps out; a
        # reader's request is one range, decoded whole (capped by max_request).
        multi = streamed and layer.source.multirange(layer.blob_digest)
        planned = plan.plan_fetch(
            layer,
            want,
            self.merge_gap,
            self.max_request,
            self._here,
            streamed=streamed,
            multirange=multi,
        )
        for bundle in plan.bundle(planned) if multi else [[p] for p in planned]:
            runs = [
                (s, e, [c for c in cs if c.digest not in self._inflight]) for s, e, cs in bundle
            ]
            runs = [r for r in runs if r[2]]
            chunks = [c for _, _, cs in runs for c in cs]
            if not any(c.digest in needed for c in chunks):
                continue  # readahead alone never costs a request
            g = _Group(runs[0][0], runs[-1][1], chunks, [(s, e) for s, e, _ in runs])
            out.append(self._register(g, priority))
        return out

    def _senders(self, layer: Layer, groups: list[_Group]) -> list[Callable[[], Awaitable[None]]]:
        """What sends a reader's planned requests.  From a source that sends several ranges
        in one request, they join the layer's requests not yet sent, if any (then the reader
        sends nothing itself), or become them; a big chunk goes alone, as does everything
        from any other source."""
        alone = [g for g in groups if is_big(g.chunks[0])]
        joining = [g for g in groups if not is_big(g.chunks[0])]
        out: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self._run_group, layer, g, None) for g in alone
        ]
        if not joining:
            return out
        if not layer.source.multirange(layer.blob_digest):
            return out + [functools.partial(self._run_group, layer, g, None) for g in joining]
        unsent = self._unsent.get(layer.blob_digest)
        if unsent is not None:
            unsent.extend(joining)
            return out
        self._unsent[layer.blob_digest] = joining
        return [*out, functools.partial(self._send_misses, layer, joining)]

    async def _send_misses(self, layer: Layer, unsent: list[_Group]) -> None:
        """Wait for a slot, then send every miss of the layer gathered meanwhile (``unsent``
        grows while this waits) in as few multi-range requests as the bundle caps allow.  Each
        reader still gets its chunks as soon as they are verified: the stream resolves them
        as its bytes come."""
        ticket = Ticket(ONDEMAND)
        try:
            await self._slots.acquire(ticket)  # checkpoints: misses dispatched now join
        finally:
            if self._unsent.get(layer.blob_digest) is unsent:
                del self._unsent[layer.blob_digest]  # from here, misses start anew
        try:
            merged = self._merge(unsent)
            merged[0].ticket = ticket  # the slot already held
            for g in merged:
                for f in g.flights.values():
                    f.group, f.ticket = g, g.ticket
            layer.stats.batched_misses += len(unsent) - len(merged)
            async with trio.open_nursery() as nursery:
                for g in merged:
                    nursery.start_soon(self._run_group, layer, g, None)
        finally:
            self._slots.release(ticket)  # a no-op once its request released it
            for g in unsent:  # a cancelled send: waiters fetch their chunks afresh
                for d, f in g.flights.items():
                    if not f.event.is_set():
                        self._fail(d, f, _Abandoned())

    def _merge(self, groups: list[_Group]) -> list[_Group]:
        """One-range requests of one layer gathered into multi-range requests (their ranges
        never overlap: a plan does not cross a chunk in flight)."""
        if len(groups) == 1:
            return groups
        groups = sorted(groups, key=lambda g: g.start)
        out: list[_Group] = []
        for bundle in plan.bundle([(g.start, g.end, g.chunks) for g in groups], self.max_request):
            taken, groups = groups[: len(bundle)], groups[len(bundle) :]
            runs: list[tuple[int, int]] = []
            for g in taken:
                if runs and runs[-1][1] == g.start:
                    runs[-1] = (runs[-1][0], g.end)  # adjacent: one range
                else:
                    runs.append((g.start, g.end))
            merged = _Group(runs[0][0], runs[-1][1], [c for g in taken for c in g.chunks], runs)
            merged.ticket = Ticket(ONDEMAND)
            merged.hold_up_to = min(g.hold_up_to for g in taken)
            merged.flights = {d: f for g in taken for d, f in g.flights.items()}
            out.append(merged)
        return out

    def _here(self, c: Chunk) -> bool:
        """Whether a planned request must neither add ``c`` nor cross it: cached, on its way,
        or big (fetched alone)."""
        return is_big(c) or c.digest in self._inflight or c.digest in self.cache

    def _register(self, g: _Group, priority: int) -> _Group:
        g.ticket = Ticket(priority)
        g.chunks.sort(key=lambda c: (c.offset, c.end))  # the stream's order
        for c in g.chunks:
            f = _Flight(g.ticket, g)
            g.flights[c.digest] = f
            self._inflight[c.digest] = f
        return g

    # ------------------------------------------------------------------------------- provider

    async def _provided(self, layer: Layer, chunks: list[Chunk], priority: int) -> dict[str, bytes]:
        """Ask the provider for chunks nobody is fetching; keep only what verifies, cache it,
        and return it.  A provider's failure only means the network is used instead."""
        want = [c for c in chunks if not c.zeros and c.digest not in self._inflight]
        if self.provider is None or not want:
            return {}
        try:
            got = await self.provider.provide(
                layer, want, lambda: self._slots.hold(Ticket(priority))
            )
        except Exception as e:  # a provider's bug must cost a fetch, never a read
            log.warning("chunk provider failed for %s: %s", layer.blob_digest, e)
            return {}
        known = {d: data for d, data in got.items() if self._bits(d)}
        if not known:
            return {}

        def verify_and_store() -> tuple[dict[str, bytes], list[str]]:
            ok: dict[str, bytes] = {}
            for d, data in known.items():
                try:
                    check_chunk(data, d)
                except IntegrityError:
                    continue
                ok[d] = data
            return ok, self._put_many(list(ok.items()))

        try:
            ok, evicted = await trio.to_thread.run_sync(verify_and_store)
        except OSError as e:
            log.warning("could not cache provided chunks of %s: %s", layer.blob_digest, e)
            return {}
        layer.stats.provider_rejected += len(known) - len(ok)
        layer.stats.provided_chunks += len(ok)
        for d, data in ok.items():
            self._hot.put(d, data)
            self._mark_ready(d)
        self._evicted(evicted)
        return ok

    # ------------------------------------------------------------------------------- fetching

    async def _fetch(self, layer: Layer, start: int, end: int, ticket: Ticket | None) -> bytes:
        """The bytes ``start:end`` of the layer's blob, in a request slot of ``ticket``'s
        priority; ``None``: the caller holds a slot already."""
        if layer.size and not layer.source.ranges_supported():
            return await self._from_whole_blob(layer, start, end, ticket)
        async with self._held_or(ticket):
            if self._draining:
                raise _Abandoned()  # unmounted: no request starts (drain)
            raw = await layer.source.read_range(layer.blob_digest, start, end)
        layer.stats.requests += 1
        layer.stats.bytes_fetched += len(raw)
        if len(raw) != end - start:
            raise RemoteError(
                f"{getattr(layer.source, 'name', 'source')}: asked for {end - start} bytes "
                f"at {start} of {layer.blob_digest}, got {len(raw)}"
            )
        return raw

    async def _from_whole_blob(
        self, layer: Layer, start: int, end: int, ticket: Ticket | None
    ) -> bytes:
        """A registry that ignores Range sends the whole blob for every read: fetch it once
        (single flight), verified against the layer digest, and serve ranges from the copy."""
        whole = layer.whole
        if whole is None:
            # Private to this process (another mount may download the same blob), removed
            # at aclose once its chunks are cached.
            name = f"{layer.blob_digest[7:]}.{os.getpid()}"
            whole = layer.whole = WholeBlob(self.cache.blobs_dir / name)
            tmp = whole.path.with_name(whole.path.name + ".partial")
            try:
                whole.path.parent.mkdir(parents=True, exist_ok=True)
                async with self._held_or(ticket):
                    with open(tmp, "wb") as f:
                        await layer.source.download(layer.blob_digest, layer.size, f)
                tmp.replace(whole.path)
                layer.stats.requests += 1
                layer.stats.bytes_fetched += layer.size
            except BaseException as e:
                whole.error = e
                layer.whole = None  # a later read tries again
                tmp.unlink(missing_ok=True)
                raise
            finally:
                whole.done.set()
        else:
            await whole.done.wait()
            if whole.error is not None:
                raise RemoteError(f"{layer.blob_digest}: download failed: {whole.error}")
        return await trio.to_thread.run_sync(read_span, whole.path, start, end)

    async def _stream(self, layer: Layer, g: _Group, sink: RangesSink) -> None:
        """Stream the group's ranges into ``sink``, noting the stream's progress in ``g``."""
        if layer.size and not layer.source.ranges_supported():
            for start, end in g.runs:
                await sink(start, await self._from_whole_blob(layer, start, end, g.ticket))
            return
        want = sum(end - start for start, end in g.runs)
        report = StreamStats(
            priority=g.ticket.priority, start=g.start, end=g.end, ranges=len(g.runs), bytes=want
        )

        # Where a range ends and another follows: a source that sends one range per request
        # asks for the next one there.
        follows = {end for _, end in g.runs[:-1]}

        async def counted(at: int, piece: bytes) -> None:
            now = trio.current_time()
            if g.first_at is None:
                g.first_at = now
            g.got += len(piece)
            report.received = g.got
            if now > g.first_at:
                report.bytes_per_s = int(g.got / (now - g.first_at))
            layer.stats.bytes_fetched += len(piece)
            await sink(at, piece)
            if (
                self._draining
                and at + len(piece) in follows
                and not layer.source.multirange(layer.blob_digest)
            ):
                # Unmounted: the next range would be a new request (drain).  What came is
                # used; the rest is abandoned, as a group that never got its slot.
                raise _Abandoned()

        async with self._slot(g.ticket):
            if self._draining:
                raise _Abandoned()  # its slot came after the unmount: not sent (drain)
            g.sent_at = trio.current_time()
            layer.stats.requests += 1
            layer.stats.multirange_requests += len(g.runs) > 1
            layer.stats.streams.append(report)
            try:
                await layer.source.stream_ranges(layer.blob_digest, g.runs, counted)
            finally:
                layer.stats.streams.remove(report)
        if g.got != want:
            raise RemoteError(
                f"{getattr(layer.source, 'name', 'source')}: asked for {want} bytes in "
                f"{len(g.runs)} ranges from {g.start} of {layer.blob_digest}, got {g.got}"
            )

    def _held_or(self, t: Ticket | None) -> contextlib.AbstractAsyncContextManager[None]:
        """A slot held for ``t``, or nothing when the caller holds one (``t`` is None)."""
        return contextlib.nullcontext() if t is None else self._slots.hold(t)

    @contextlib.asynccontextmanager
    async def _slot(self, t: Ticket) -> AsyncIterator[None]:
        """Hold a request slot for ``t``; one granted already (a batch of misses waited for
        it) is only released at the end."""
        if not t.granted:
            await self._slots.acquire(t)
        try:
            yield
        finally:
            self._slots.release(t)

    async def _run_group(
        self,
        layer: Layer,
        g: _Group,
        done: Callable[[], None] | None = None,
        stream: Callable[[Layer, _Group, RangesSink], Awaitable[None]] | None = None,
    ) -> None:
        """Stream one request; as each chunk's bytes are in, decode and verify it (in
        batches, in worker threads), resolve its flight and cache it.  Never raises (except
        Cancelled): errors go to the flights, whose waiters raise them."""
        if len(g.chunks) == 1 and is_big(g.chunks[0]):
            await self._run_big(layer, g, done)
            return
        chunks = g.chunks  # in blob order (_register)
        buf = bytearray()  # the bytes from buf_start up to g.pos
        buf_start = g.start
        nxt = 0  # the first chunk not yet complete
        ready: list[tuple[Chunk, bytes]] = []
        ready_bytes = 0
        decoders = trio.Semaphore(DECODE_TASKS)
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def flush() -> None:
                    nonlocal ready, ready_bytes
                    if ready:
                        batch, ready, ready_bytes = ready, [], 0
                        await decoders.acquire()
                        nursery.start_soon(self._decode_batch, layer, g, batch, decoders, done)

                def hurry() -> None:
                    if ready:
                        nursery.start_soon(flush)

                g.hurry = hurry

                async def sink(at: int, piece: bytes) -> None:
                    nonlocal buf_start, nxt, ready_bytes
                    if at != g.pos:
                        # The next range of a multi-range request: the gap never comes, and
                        # every chunk before it must be complete by now.
                        if at < g.pos or (nxt < len(chunks) and chunks[nxt].offset < at):
                            raise RemoteError(
                                f"{layer.blob_digest}: stream jumped from {g.pos} to {at}"
                            )
                        buf.clear()
                        g.pos = buf_start = at
                    buf.extend(piece)
                    g.pos += len(piece)
                    # Chunks readers wait for, decoded first: small ones here, larger ones
                    # each alone.
                    waited: list[tuple[Chunk, bytes]] = []
                    alone: list[tuple[Chunk, bytes]] = []
                    while nxt < len(chunks) and chunks[nxt].end <= g.pos:
                        c = chunks[nxt]
                        nxt += 1
                        f = g.flights.get(c.digest)
                        if f is None or f.event.is_set():
                            continue  # overtaken
                        raw = bytes(buf[c.offset - buf_start : c.end - buf_start])
                        if not f.waiting:
                            ready.append((c, raw))
                            ready_bytes += c.end - c.offset
                        elif _inline(c):
                            waited.append((c, raw))
                        else:
                            alone.append((c, raw))
                    urgent = bool(waited or alone)  # their neighbours go now too, after them
                    if waited:
                        nursery.start_soon(self._decode_batch, layer, g, waited, None, done)
                    for one in alone:
                        await decoders.acquire()
                        nursery.start_soon(self._decode_batch, layer, g, [one], decoders, done)
                    keep = chunks[nxt].offset if nxt < len(chunks) else g.pos
                    if keep > buf_start:
                        del buf[: min(keep, g.pos) - buf_start]
                        buf_start = min(keep, g.pos)
                    if urgent or ready_bytes >= STREAM_BATCH:
                        await flush()

                try:
                    await (stream or self._stream)(layer, g, sink)
                except Exception as e:
                    error = e
                finally:
                    # Before the body is left, cut off too: the nursery closes with a turn
                    # to spare, and a reader's hurry then could not start its flush.
                    g.hurry = None
                await flush()  # complete chunks are used even when the rest failed
            if error is None and nxt < len(chunks):
                error = RemoteError(f"{layer.blob_digest}: stream ended at {g.pos} of {g.end}")
            if error is not None:
                for d, f in list(g.flights.items()):
                    if not f.event.is_set():
                        self._fail(d, f, error)
        finally:
            # Resolved ones left here are an overtaking reader's: it writes them (_overtake).
            for d, f in g.flights.items():
                f.fail(_Abandoned())  # no-op for resolved flights
                if self._inflight.get(d) is f:
                    del self._inflight[d]
        if done is not None:
            done()
        await self._flush_due()

    async def _run_big(self, layer: Layer, g: _Group, done: Callable[[], None] | None) -> None:
        """:meth:`_run_group` for a big chunk: decoded into the cache (store.bigchunk), then
        its waiters read the ranges they need from there."""
        c = g.chunks[0]
        f = g.flights[c.digest]

        async def fetch(start: int, end: int) -> bytes:
            return await self._fetch(layer, start, end, None)

        try:
            for attempt in (1, 2):
                try:
                    # One slot for the whole chunk, windows and decoding: it bounds how many
                    # big chunks hold a decoder thread and their windows at once.  (Unbounded,
                    # a cold read of a 512 MiB file started 40 of them, every thread trio
                    # lends, and their windows' reads then waited for a thread forever.)
                    f.ticket = Ticket(f.ticket.priority)  # one per attempt; keeps a boost
                    async with self._slots.hold(f.ticket):
                        evicted = await decode_to_cache(
                            self.cache, layer.toc.compression, c, fetch
                        )
                except IntegrityError as e:
                    layer.stats.integrity_errors += 1
                    if attempt == 2:
                        raise
                    layer.stats.retries += 1
                    log.warning("chunk %s of %s: %s; retrying", c.digest, layer.blob_digest, e)
                else:
                    break
        except Exception as e:
            log.warning("big chunk %s of %s: %s", c.digest, layer.blob_digest, e)
            self._fail(c.digest, f, e)
        else:
            self._evicted(evicted)
            if c.digest in self.cache:
                self._mark_ready(c.digest)
            if self._inflight.get(c.digest) is f:
                del self._inflight[c.digest]  # before waking waiters: they read the cache
            f.in_cache = True
            f.succeed(b"")
        finally:
            f.fail(_Abandoned())  # no-op once resolved
            if self._inflight.get(c.digest) is f:
                del self._inflight[c.digest]
        if done is not None:
            done()
        await self._flush_due()

    async def _decode_batch(
        self,
        layer: Layer,
        g: _Group,
        batch: list[tuple[Chunk, bytes]],
        decoders: trio.Semaphore | None,
        done: Callable[[], None] | None,
    ) -> None:
        """Decode and verify complete chunks of a stream, resolve their flights and cache
        them, then let go of them (their waiters hold the data they need).  ``done`` hears
        of each batch: a pull's progress moves while a large request streams.  ``decoders``:
        the semaphore the caller acquired for a worker thread; None decodes here, on the
        trio thread (small chunks a reader waits for)."""
        comp = layer.toc.compression
        chunks = [c for c, _ in batch]

        def decode_all() -> list[bytes | Exception]:
            out: list[bytes | Exception] = []
            for c, raw in batch:
                try:
                    out.append(decode_chunk(comp, raw, c))
                except Exception as e:  # handed to the chunk's waiters below
                    out.append(e)
            return out

        stored: list[tuple[str, bytes]] = []
        try:
            if decoders is None:
                results = decode_all()
            else:
                results = await trio.to_thread.run_sync(decode_all)
            batch.clear()  # the compressed bytes are spent
            for c, result in zip(chunks, results, strict=True):
                f = g.flights[c.digest]
                if f.event.is_set():
                    continue  # a reader overtook the stream for it
                if isinstance(result, IntegrityError):
                    await self._retry_chunk(layer, c, f, stored, result)
                elif isinstance(result, Exception):
                    self._fail(c.digest, f, result)
                else:
                    self._succeed(c, f, result, stored)
            del results
        except BaseException:
            # Cut off (cancelled) before their write: forgotten, their write's waiters go on.
            self._written([(d, g.flights.pop(d)) for d, _ in stored])
            raise
        finally:
            if decoders is not None:
                decoders.release()
        # Out of the group now: its end forgets its flights, these stay until written.
        flights = [(d, g.flights.pop(d)) for d, _ in stored]
        # A held prefetch's chunks may come before the store runs (a mount's early prefetch):
        # the writer writes them once it does, after a pause in reads, or aclose does.
        hold = g.hold_up_to
        now: list[tuple[str, bytes]] = []
        now_flights: list[tuple[str, _Flight]] = []
        for (d, data), (_, f) in zip(stored, flights, strict=True):
            if len(data) <= hold and self._held_bytes < WRITE_HOLD_BYTES:
                self._hold(layer, d, f, len(data))
            else:
                now.append((d, data))
                now_flights.append((d, f))
        if now:
            try:
                await self._cache_stored(layer, now)
            finally:
                self._written(now_flights)
        if done is not None:
            done()

    # ------------------------------------------------------------------------------- held writes

    def _written(self, flights: Iterable[tuple[str, _Flight]]) -> None:
        """Handed-over chunks are cached now (or their write failed): later readers look in
        the cache, and those waiting for the write go on."""
        for d, f in flights:
            if self._inflight.get(d) is f:
                del self._inflight[d]
            if f.written is not None:
                f.written.set()

    def _hold(self, layer: Layer, digest: str, f: _Flight, size: int) -> None:
        """Keep a reader's (or a held prefetch's) verified chunk in memory (its flight stays
        in ``_inflight``) until the writer task caches it (WRITE_IDLE_SECONDS)."""
        if self._inflight.get(digest) is not f or digest in self._held:
            self._written([(digest, f)])  # forgotten meanwhile: nothing else can find it
            return
        if not self._held:
            self._writer_wake.set()
        self._held[digest] = (layer, f, trio.current_time())
        self._held_bytes += size
        layer.stats.bytes_unwritten += size

    async def _writer(self) -> None:
        """Write held chunks once on-demand reads pause, a batch at a time; when the store
        stops running (``_nursery`` None), write them all and return."""
        while self._held or self._nursery is not None:
            if not self._held:
                self._writer_wake = trio.Event()
                await self._writer_wake.wait()
                continue
            if self._nursery is not None:
                due = next(iter(self._held.values()))[2] + WRITE_DEFER_SECONDS
                wake = min(self._last_ondemand + WRITE_IDLE_SECONDS, due)
                if wake > trio.current_time():
                    self._writer_wake = trio.Event()
                    with trio.move_on_at(wake):
                        await self._writer_wake.wait()
                    continue
            batch: list[tuple[str, _Flight]] = []
            size = 0
            for d, (_, f, _) in self._held.items():
                batch.append((d, f))
                size += len(f.data)
                if len(batch) == WRITE_BATCH or size >= WRITE_BATCH_BYTES:
                    break
            await self._write_held(batch)
            if not self._held:
                # The held chunks' bytes are freed; glibc keeps their blocks mapped until asked.
                await trio.to_thread.run_sync(trim_heap)

    async def _write_held(self, flights: Iterable[tuple[str, _Flight]]) -> None:
        """Write those of these handed-over chunks that are held to the cache now, and wait
        for the others' writes.  A write that fails (or is cancelled) loses only the copy: the
        flight is forgotten, and a later reader fetches the chunk again."""
        mine: list[tuple[str, Layer, _Flight]] = []
        theirs: list[trio.Event] = []
        for d, f in flights:
            held = self._held.get(d)
            if held is not None and held[1] is f:
                del self._held[d]
                mine.append((d, held[0], f))
            elif f.written is not None and not f.written.is_set():
                theirs.append(f.written)
        if mine:
            stored = [(d, f.data) for d, _, f in mine]
            try:
                evicted = await trio.to_thread.run_sync(self._put_many, stored)
            except OSError as e:
                log.warning("could not cache chunks of %s: %s", mine[0][1].blob_digest, e)
            else:
                for d, _ in stored:
                    self._mark_ready(d)
                self._evicted(evicted)
            finally:
                for _, layer, f in mine:
                    self._held_bytes -= len(f.data)
                    layer.stats.bytes_unwritten -= len(f.data)
                self._written((d, f) for d, _, f in mine)
        for written in theirs:
            await written.wait()

    async def _cache_stored(self, layer: Layer, stored: list[tuple[str, bytes]]) -> None:
        if not stored:
            return
        try:
            evicted = await trio.to_thread.run_sync(self._put_many, stored)
        except OSError as e:
            log.warning("could not cache chunks of %s: %s", layer.blob_digest, e)
        else:
            for d, _ in stored:
                self._mark_ready(d)
            self._evicted(evicted)

    async def _overtake(self, layer: Layer, chunks: list[Chunk]) -> None:
        """A reader fetches chunks a stream would bring too late, on its own and alone, and
        resolves their flights (the stream then skips them).  Failure is quiet: the reader
        keeps waiting for the stream."""
        stored: list[tuple[str, bytes]] = []
        flights: list[tuple[str, _Flight]] = []
        try:
            for start, end, cs in plan.plan_requests(
                layer, chunks, self.merge_gap, self.max_request, lambda c: True, blocked=self._here
            ):
                try:
                    layer.stats.overtakes += 1
                    raw = await self._fetch(layer, start, end, Ticket(ONDEMAND))
                    for c in cs:
                        f = self._inflight.get(c.digest)
                        if f is None or f.event.is_set():
                            continue
                        piece = raw[c.offset - start : c.end - start]
                        comp = layer.toc.compression
                        data = await trio.to_thread.run_sync(decode_chunk, comp, piece, c)
                        if not f.event.is_set():
                            self._succeed(c, f, data, stored)
                            flights.append((c.digest, f))
                except (LazyfsError, OSError, _Abandoned) as e:
                    # _Abandoned: the store drains and sends nothing new; the stream comes.
                    log.debug("overtaking a stream of %s: %r", layer.blob_digest, e)
            await self._cache_stored(layer, stored)
        finally:
            self._written(flights)  # the stream skips them

    def _fail(self, digest: str, f: _Flight, error: BaseException) -> None:
        """Fail a flight and forget it at once: a reader that comes later must try afresh,
        not inherit this failure while the rest of its request is still being handled."""
        f.fail(error)
        if self._inflight.get(digest) is f:
            del self._inflight[digest]

    def _succeed(self, c: Chunk, f: _Flight, data: bytes, stored: list[tuple[str, bytes]]) -> None:
        f.written = trio.Event()  # the caller writes ``stored``, then sets it (_written)
        f.succeed(data)
        stored.append((c.digest, data))
        self._hot.put(c.digest, data)

    async def _retry_chunk(
        self,
        layer: Layer,
        c: Chunk,
        f: _Flight,
        stored: list[tuple[str, bytes]],
        error: IntegrityError,
    ) -> None:
        # Most likely damage in transit: fetch the chunk alone once more before failing.
        layer.stats.integrity_errors += 1
        layer.stats.retries += 1
        log.warning("chunk %s of %s: %s; retrying", c.digest, layer.blob_digest, error)
        f.ticket = Ticket(f.ticket.priority)
        try:
            raw = await self._fetch(layer, c.offset, c.end, f.ticket)
            data = await trio.to_thread.run_sync(decode_chunk, layer.toc.compression, raw, c)
        except IntegrityError as e2:
            layer.stats.integrity_errors += 1
            self._fail(c.digest, f, e2)
            return
        except Exception as e2:
            self._fail(c.digest, f, e2)
            return
        self._succeed(c, f, data, stored)

    def _put_many(self, stored: list[tuple[str, bytes]]) -> list[str]:
        evicted: list[str] = []
        for digest, data in stored:
            # decode_chunk just verified the bytes: no second hash.
            evicted += self.cache.put(digest, data, verified=True)
        return evicted

    # ------------------------------------------------------------------------------- readiness

    def _bits(self, digest: str) -> list[tuple[Layer, int]]:
        """The readiness bits of ``digest`` in every layer.  Asked of each layer's index, not
        kept in a table of its own: that table cost ~200 B per chunk (20 MiB at 100k files)."""
        found = ((la, la.index.get(digest)) for la in self._layers.values())
        return [(la, i) for la, i in found if i is not None]

    def _mark_ready(self, digest: str) -> None:
        for layer, i in self._bits(digest):
            if layer.set_ready(i):
                self._dirty.add(layer)

    def _forget(self, digest: str) -> None:
        for layer, i in self._bits(digest):
            if layer.clear_ready(i):
                self._dirty.add(layer)

    def _evicted(self, digests: Iterable[str]) -> None:
        for d in digests:
            self._forget(d)

    async def _flush_due(self) -> None:
        due = [
            layer
            for layer in self._dirty
            if layer.map.due(max_changes=MAP_FLUSH_CHANGES, max_age=MAP_FLUSH_SECONDS)
        ]
        for layer in due:
            await self._flush(layer)

    async def _flush(self, layer: Layer) -> None:
        m = layer.map
        while m.flushing:  # let a running write finish, then write what changed since
            await trio.sleep(0.005)
        if not m.changes:
            return
        data = m.snapshot()
        self._dirty.discard(layer)
        m.flushing = True
        try:
            await trio.to_thread.run_sync(atomic_write, m.path, data)
        except OSError as e:
            log.warning("could not save the chunk map of %s: %s", layer.blob_digest, e)
            m.changes += 1
            self._dirty.add(layer)
        finally:
            m.flushing = False

    # ------------------------------------------------------------------------------- bulk

    async def prefetch(
        self,
        layer: Layer,
        entries_or_chunks: Iterable[Entry | Chunk],
        priority: int = PREFETCH,
        *,
        hold: bool = False,
    ) -> None:
        """Bring the given files' or chunks' content into the cache at ``priority``.  Raises
        the first error after trying everything.  ``hold``: return once the chunks are
        verified; their cache writes may wait in memory, served to readers from there, for
        a pause in on-demand reads while the store runs (``_hold``), else for ``aclose``.
        A caller that reads the chunks from the cache itself (copy-up) leaves it off."""
        chunks: list[Chunk] = []
        for item in entries_or_chunks:
            if isinstance(item, Entry):
                chunks.extend(item.chunks)
            else:
                chunks.append(item)
        cache = self.cache
        unverified = [
            c
            for c in chunks
            if not c.zeros and c.digest in cache and not cache.is_verified(c.digest)
        ]
        if not unverified:
            await self._ensure(layer, chunks, priority, hold=hold)
            return
        if all(c.zeros or c.digest in cache for c in chunks):
            # No request will leave: one waiting for this prefetch's requests to be sent (a
            # mount, before its tree's stretch of CPU) need not wait for the hashing.
            sent = REQUEST_SENT.get()
            if sent is not None:
                sent()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._verify, layer, unverified, priority)
            await self._ensure(layer, chunks, priority, hold=hold)

    def adopt(self, layer: Layer, early: EarlyRange) -> Callable[[], Awaitable[None]] | None:
        """Take ``early`` (ranges requested before the layer's TOC was known) as a request
        of the store's: the chunks wholly inside it that nobody has or fetches are in flight
        from now on (a prefetch or reader joins them), and the returned task streams them
        from it, verified as any request's.  None (and ``early`` dropped) if it brings none."""
        unique: dict[str, Chunk] = {}
        for start, end in early.runs:
            lo = bisect.bisect_left(layer.offsets, start)
            hi = bisect.bisect_left(layer.offsets, end)
            for c in layer.by_offset[lo:hi]:
                if (
                    c.end <= end
                    and not c.zeros
                    and not is_big(c)
                    and c.digest not in self._inflight
                    and c.digest not in self.cache
                ):
                    unique.setdefault(c.digest, c)  # the first copy: blob order stays
        if not unique:
            early.drop()
            return None
        mine = list(unique.values())
        lo, hi = mine[0].offset, mine[-1].end
        runs = [(max(s, lo), min(e, hi)) for s, e in early.runs if lo < e and s < hi]
        g = self._register(_Group(lo, hi, mine, runs), PREFETCH)
        g.hold_up_to = WRITE_HOLD_PREFETCH_CHUNK
        g.arrived = lambda: early.reached

        async def stream(layer: Layer, g: _Group, sink: RangesSink) -> None:
            # Its times are the request's (a reader deciding whether to overtake it uses
            # them), not the feed's, which starts with what came while the TOC decoded.
            g.sent_at = early.sent_at or trio.current_time()
            layer.stats.requests += 1
            layer.stats.multirange_requests += len(early.runs) > 1

            async def counted(at: int, piece: bytes) -> None:
                if g.first_at is None:
                    g.first_at = early.first_at or trio.current_time()
                    # One that waited for the request ranked before it left after adoption.
                    g.sent_at = early.sent_at or g.sent_at
                g.got += len(piece)
                await sink(at, piece)

            hurry = g.hurry  # _run_group's: a reader waits for one of its chunks

            def wanted() -> None:
                early.want()  # a request still waiting for the one ranked before goes now
                if hurry is not None:
                    hurry()

            g.hurry = wanted
            try:
                await early.feed(g.start, g.end, counted)
            except Exception as e:
                # Cut short or failed: its waiters fetch the chunks themselves, not fail.
                log.info("%s", e)
                raise _Abandoned() from e
            finally:
                layer.stats.bytes_fetched += early.received

        return functools.partial(self._run_group, layer, g, None, stream)

    async def _verify(self, layer: Layer, chunks: list[Chunk], priority: int) -> None:
        """Hash cached chunks not yet verified in this process, in a worker thread, in the
        order given, so their readers need not: over a warm cache a prefetch group's chunks
        are all there, and each reader's first read of one hashed it on the way (4 MiB:
        ~3 ms; a third of the Debian start-up's READ time in the store).  The small ones,
        read whole to be hashed, stay in memory (``_hot``, bounded) for their readers.  A
        chunk that fails is fetched again."""
        bad: list[Chunk] = []
        batch: list[Chunk] = []
        size = 0
        for n, c in enumerate(chunks, 1):
            batch.append(c)
            size += c.size
            if size < VERIFY_BATCH and n < len(chunks):
                continue
            got = await trio.to_thread.run_sync(self._hashed, batch)
            for c, data in zip(batch, got, strict=True):
                if data is None:
                    bad.append(c)
                elif data:
                    self._hot.put(c.digest, data)  # its reader needs no file read
            batch, size = [], 0
        for c in bad:
            self._forget(c.digest)
        if bad:
            await self._ensure(layer, bad, priority)

    async def peek(self, layer: Layer, entry: Entry, offset: int, size: int) -> bytes:
        """The bytes ``[offset, offset + size)`` of ``entry`` for the mount's own look (an
        ELF file's dynamic section): fetched at PREFETCH priority if missing, and, unlike
        :meth:`read`, no read-ahead and no reader's position noted."""
        end = min(offset + size, entry.size)
        if offset < 0 or offset >= end:
            await trio.lowlevel.checkpoint()
            return b""
        chunks = chunks_for_range(entry, offset, end - offset)
        await self.prefetch(layer, chunks, hold=True)  # _obtain takes held chunks from memory
        needs = [
            (c, max(offset - c.file_offset, 0), min(end - c.file_offset, c.size)) for c in chunks
        ]
        parts, _ = await self._obtain(layer, needs, [], 0)
        return b"".join(parts)

    async def fetch_all(self, layer: Layer, progress_cb: ProgressCallback | None = None) -> None:
        """``lazyfs pull``: every chunk of the layer into the cache; ``progress_cb(stats)`` is
        called after each request completes."""
        done = (lambda: progress_cb(layer.stats)) if progress_cb is not None else None
        await self._ensure(layer, layer.by_offset, PREFETCH, done)
        await self._flush(layer)

    async def _ensure(
        self,
        layer: Layer,
        chunks: Iterable[Chunk],
        priority: int,
        done: Callable[[], None] | None = None,
        *,
        hold: bool = False,
    ) -> None:
        todo = [c for c in chunks if not c.zeros]
        error: BaseException | None = None
        await trio.lowlevel.checkpoint()
        if self.provider is not None and todo and not self._draining:
            made = await self._provided(
                layer, [c for c in todo if c.digest not in self.cache], priority
            )
            todo = [c for c in todo if c.digest not in made]
        while todo:
            todo = [c for c in todo if c.digest not in self.cache]
            groups = self._start(layer, todo, [], priority)
            if not groups:
                # Nothing to send (on its way already, e.g. an adopted early range): one
                # waiting for this task's requests to leave need not wait for the bytes.
                sent = REQUEST_SENT.get()
                if sent is not None:
                    sent()
            flights: dict[str, _Flight] = {}
            for c in todo:
                f = self._inflight.get(c.digest)
                if f is not None:
                    flights[c.digest] = f
                    self._slots.boost(f.ticket, priority)
            if groups:
                async with trio.open_nursery() as nursery:
                    for g in groups:
                        # A start-up's prefetch decodes while readers wait for the CPU: its
                        # chunk files' creation waits for a pause, as a reader's.
                        g.hold_up_to = WRITE_HOLD_PREFETCH_CHUNK if hold else 0
                        nursery.start_soon(self._run_group, layer, g, done)
            for f in flights.values():
                await f.event.wait()
            if not hold:
                # A reader's chunks it joined may wait for their cache write: the caller
                # wants them in the cache (copy-up reads them there), so they go there now.
                await self._write_held(
                    (d, f) for d, f in flights.items() if f.written is not None
                )
            again: list[Chunk] = []
            for c in todo:
                f = flights.get(c.digest)
                if f is None:
                    continue  # cached by the time we looked
                if isinstance(f.error, _Abandoned):
                    again.append(c)
                elif f.error is not None and error is None:
                    error = f.error
            todo = again
        if error is not None:
            _reraise(error)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Within this block, fetches started by readers (and their read-ahead) run in a
        nursery of the store's own, so a reader returns as soon as its chunks are verified
        instead of also waiting for them to be written to disk, and those writes wait for a
        pause in on-demand reads (``_hold``).  Leaving the block waits for those fetches and
        writes to finish, so a clean unmount keeps everything it fetched."""
        # The writer apart from the fetches: drain may cut those off, never a write.
        async with trio.open_nursery() as writing, trio.open_nursery() as nursery:
            self._nursery = nursery
            # A mount's first reads come as it starts serving: what a prefetch brought
            # before waits for a pause, as if a read had just come.
            self._last_ondemand = max(self._last_ondemand, trio.current_time())
            writing.start_soon(self._writer)
            try:
                yield
            finally:
                self._nursery = None
                self._writer_wake.set()  # held chunks are written now, all of them

    def background(self, nursery: trio.Nursery) -> None:
        """Fill the cache with every layer's remaining chunks at the lowest priority, one
        request at a time and only while on-demand reads are quiet.  Stops at ``aclose``."""
        nursery.start_soon(self._background)

    async def _background(self) -> None:
        with trio.CancelScope() as scope:
            self._bg_scope = scope
            while True:
                self._layer_added = trio.Event()
                for layer in list(self._layers.values()):
                    await self._fill(layer)
                await self._layer_added.wait()

    async def _fill(self, layer: Layer) -> None:
        batch: list[Chunk] = []
        span = 0
        for i, d in enumerate(layer.by_offset.digests()):
            if d in self.cache:
                continue
            c = layer.by_offset[i]
            batch.append(c)
            span += c.end - c.offset
            if span >= self.max_request:
                await self._fill_batch(layer, batch)
                batch, span = [], 0
        if batch:
            await self._fill_batch(layer, batch)

    async def _fill_batch(self, layer: Layer, batch: list[Chunk]) -> None:
        while trio.current_time() - self._last_ondemand < BACKGROUND_IDLE_SECONDS:
            await trio.sleep(BACKGROUND_IDLE_SECONDS)
        try:
            await self._ensure(layer, batch, BACKGROUND)
        except (LazyfsError, OSError) as e:
            log.warning("background fetch for %s: %s", layer.blob_digest, e)

    async def drain(self, timeout: float) -> None:
        """From now on start no request (nor the background fill), and wait up to ``timeout``
        seconds for the chunks on their way to arrive, verified as ever, before the caller
        cancels what is left.  An unmounted daemon calls it: a start-up's prefetch cut off
        half-way would otherwise be fetched again, whole, by the next mount of the cache
        (a snapshotter stops a daemon as soon as containerd removes its snapshot)."""
        self._draining = True
        if self._bg_scope is not None:
            self._bg_scope.cancel()
        with trio.move_on_after(timeout):
            while True:
                on_way = next((f for f in self._inflight.values() if not f.event.is_set()), None)
                if on_way is None:
                    return
                await on_way.event.wait()
        # What readers started (their misses, their read-ahead) runs in the store's own
        # nursery, which the caller's cancel does not reach: cut off too, or a slow one would
        # keep the daemon past the bound (and the snapshotter's STOP_WAIT).
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop the background fill, write the chunks still held (a prefetch's, when the
        store never ran) and every changed readiness map."""
        if self._bg_scope is not None:
            self._bg_scope.cancel()
        if self._held:
            await self._write_held([(d, f) for d, (_, f, _) in self._held.items()])
        for layer in self._layers.values():
            if layer.whole is not None:  # its chunks are cached by now; the copy is spare
                layer.whole.path.unlink(missing_ok=True)
        for layer in list(self._layers.values()):
            await self._flush(layer)
