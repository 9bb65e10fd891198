"""What to fetch: read-ahead policy and request planning, as pure functions.

The store asks these which chunks to add to a read (``readahead``, ``amplify``), which to
fetch ahead of a sequential reader (``ahead_in_file``), and how to merge missing chunks into
range requests (``plan_requests``).  ``is_local(chunk)`` says whether a chunk is already here
or on its way; nothing here does I/O or touches the store's state.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from lazyfs.formats.toc import Chunk, Entry
from lazyfs.remote.multipart import split_ranges
from lazyfs.store.layerstate import Layer

IsLocal = Callable[[Chunk], bool]


def _span(chunks: Sequence[Chunk]) -> int:
    return sum(c.end - c.offset for c in chunks if not c.zeros)


def _after(entry: Entry, file_offset: int) -> Sequence[Chunk]:
    """The chunks of ``entry`` that start after the chunk at ``file_offset``."""
    i = bisect.bisect_right(entry.chunks, file_offset, key=lambda c: c.file_offset)
    return entry.chunks[i:]


def readahead(entry: Entry, asked: Sequence[Chunk], first: bool, budget: int) -> list[Chunk]:
    """The first read of a file whose chunks total at most ``budget`` compressed bytes takes
    all of it; a sequential read takes the file's next chunks up to ``budget``."""
    if budget <= 0 or not asked:
        return []
    if first and _span(entry.chunks) <= budget:
        return [c for c in entry.chunks if not c.zeros]  # a small file: all of it
    out: list[Chunk] = []
    for c in _after(entry, asked[-1].file_offset):
        if c.zeros:
            continue
        budget -= c.end - c.offset
        if budget < 0:
            break
        out.append(c)
    return out


def amplify(
    layer: Layer, chunks: Sequence[Chunk], budget: int, is_local: IsLocal, behind: int = 0
) -> list[Chunk]:
    """The chunks that follow in blob order, growing the request by at most ``budget`` bytes
    (gaps included), and those just before it up to ``behind`` bytes, each side stopping at
    the first one already here.  A layer is laid out by path (or by prefetch rank), so the
    files a start-up reads next are mostly the neighbours of the one it reads now: one larger
    request saves round trips, which dominate on a real network (as Nydus' amplify_io)."""
    stored = [c for c in chunks if not c.zeros]
    if budget <= 0 or not stored:
        return []
    anchor = max(c.end for c in stored)
    out: list[Chunk] = []
    chunks_by_offset, ends = layer.by_offset, layer.by_offset.ends
    # Chunks are made from the columns one at a time, only as far as the walk goes.
    for i in range(bisect.bisect_left(layer.offsets, anchor), len(chunks_by_offset)):
        if ends[i] - anchor > budget:
            break
        c = chunks_by_offset[i]
        if c.zeros:
            continue
        if is_local(c):
            break
        out.append(c)
    first = min(c.offset for c in stored)
    i = bisect.bisect_left(layer.offsets, first)
    while behind > 0 and i > 0:
        i -= 1
        if first - layer.offsets[i] > behind:
            break
        c = chunks_by_offset[i]
        if c.zeros:
            continue
        if is_local(c):
            break
        out.append(c)
    return out


def ahead_in_file(
    entry: Entry, asked: Sequence[Chunk], budget: int, is_cached: IsLocal, in_flight: IsLocal
) -> list[Chunk]:
    """For a sequential reader: the file's next chunks to fetch in the background while it
    reads, keeping at most ``budget`` compressed bytes (at least one chunk) ahead of it that
    are not cached yet.  Chunks already on their way count against the budget, so reads
    that stay within one chunk do not push the window further out at every call."""
    if budget <= 0 or not asked:
        return []
    out: list[Chunk] = []
    ahead = 0
    for c in _after(entry, max(c.file_offset for c in asked)):
        if c.zeros or is_cached(c):
            continue
        budget -= c.end - c.offset
        if budget < 0 and ahead:
            break
        ahead += 1
        if not in_flight(c):
            out.append(c)
    return out


# Prefetch (and the background fill) ask for large ranges and stream them: each chunk is
# verified, handed to its waiters and cached as soon as its bytes are in, so a reader waiting
# on a chunk early in a request does not wait for the rest of it, and memory holds only the
# chunks being decoded.  Gaps are merged across as for readers: on a traced group of an image
# laid out by path (BENCHMARKS.md, issue 13), 64 KiB took 42 requests and 11.4 MiB, 256 KiB
# 19 and 14.1 MiB, 1 MiB 10 and 18.5 MiB; the extra bytes are decoded and cached too, while
# streams run side by side.  Few requests come from a re-laid-out image: 5, 10.0 MiB.
PREFETCH_REQUEST = 64 * 1024 * 1024

# A source that asks for several ranges in one request (HTTP multi-range) pays about a part
# header (~150 bytes) per range instead of a round trip, so a stream's ranges merge only
# across gaps about that small: a prefetch group on an image laid out by path then costs the
# bytes of its chunks in a request or two instead of 42 requests (or 10 requests and 60 %
# more bytes merging across 1 MiB gaps; BENCHMARKS.md, issue 13).
MULTI_MERGE_GAP = 2048

# A request's chunks are decoded in memory together: their decompressed total is capped too,
# or a well-compressed 8 MiB range could stand for gigabytes (README "Memory").
MAX_REQUEST_PLAIN = 32 * 1024 * 1024


def _gap_blocked(layer: Layer, start: int, end: int, blocked: IsLocal) -> bool:
    """Whether a chunk in the blob's bytes ``[start, end)`` must not be fetched again."""
    offsets = layer.offsets
    i = bisect.bisect_left(offsets, start)
    while i < len(offsets) and offsets[i] < end:
        c = layer.by_offset[i]
        if not c.zeros and blocked(c):
            return True
        i += 1
    return False


def plan_requests(
    layer: Layer,
    want: list[Chunk],
    merge_gap: int,
    max_request: int,
    is_local: IsLocal,
    *,
    max_plain: int = MAX_REQUEST_PLAIN,
    blocked: IsLocal | None = None,
) -> list[tuple[int, int, list[Chunk]]]:
    """Merge chunks into ``(start, end, chunks)`` range requests in blob order: neighbours at
    most ``merge_gap`` apart, each request at most ``max_request`` compressed and
    ``max_plain`` decompressed bytes (a single chunk may be larger).  Chunks lying wholly
    inside a request's range come for free and are added while the cap allows.  A gap that
    holds a chunk ``blocked`` says is here already (cached, on its way, or made by a chunk
    provider) is never merged across: those bytes would cross the network again for nothing,
    which is what an update pays least for (a patched file amid unchanged ones)."""
    want = sorted(want, key=lambda c: (c.offset, c.end))
    plans: list[tuple[int, int, list[Chunk]]] = []
    plain: list[int] = []
    for c in want:
        if plans:
            start, end, chunks = plans[-1]
            if (
                c.offset - end <= merge_gap
                and max(end, c.end) - start <= max_request
                and plain[-1] + c.size <= max_plain
                and not (blocked is not None and _gap_blocked(layer, end, c.offset, blocked))
            ):
                chunks.append(c)
                plans[-1] = (start, max(end, c.end), chunks)
                plain[-1] += c.size
                continue
        plans.append((c.offset, c.end, [c]))
        plain.append(c.size)
    for (start, end, chunks), total in zip(plans, plain, strict=True):
        have = {c.digest for c in chunks}
        offsets, ends = layer.offsets, layer.by_offset.ends
        i = bisect.bisect_left(offsets, start)
        while i < len(offsets) and offsets[i] < end:
            i += 1
            if ends[i - 1] > end:
                continue
            c = layer.by_offset[i - 1]
            if c.digest not in have and not is_local(c):
                if total + c.size > max_plain:
                    break
                total += c.size
                have.add(c.digest)
                chunks.append(c)
    return plans


def plan_fetch(
    layer: Layer,
    want: list[Chunk],
    merge_gap: int,
    max_request: int,
    here: IsLocal,
    *,
    streamed: bool,
    multirange: bool = False,
) -> list[tuple[int, int, list[Chunk]]]:
    """The ranges the store asks for ``want`` (chunks nobody fetches yet; a big chunk is
    fetched alone, not planned here), never adding nor crossing a chunk ``here``.  A reader's
    request is decoded in memory whole, so it is capped; a stream (prefetch, pull, background
    fill) holds only the chunks being decoded, so it may be far larger, and from a source that
    sends several ranges in one request (``multirange``) it merges only tiny gaps: its ranges
    then go out in the requests :func:`bundle` makes.  ``lazyfs diff`` plans with this too:
    its numbers are the bytes and requests a pull makes."""
    if not streamed:
        return plan_requests(layer, want, merge_gap, max_request, here, blocked=here)
    return plan_requests(
        layer,
        want,
        min(merge_gap, MULTI_MERGE_GAP) if multirange else merge_gap,
        max(max_request, PREFETCH_REQUEST),
        here,
        max_plain=PREFETCH_REQUEST << 8,  # each chunk's own size is checked
        blocked=here,
    )


Plan = tuple[int, int, list[Chunk]]


def bundle(plans: list[Plan], max_bytes: int = PREFETCH_REQUEST) -> list[list[Plan]]:
    """Planned ranges (in blob order) gathered into multi-range requests: consecutive ranges
    while the request's bytes stay within ``max_bytes`` and its ``Range`` header within
    what a source sends in one request (``split_ranges``)."""
    out: list[list[Plan]] = []
    i = 0
    for part in split_ranges([(start, end) for start, end, _ in plans]):
        taken, i = plans[i : i + len(part)], i + len(part)
        size = max_bytes  # a new header part starts a new request
        for p in taken:
            if size + p[1] - p[0] > max_bytes:
                out.append([])
                size = 0
            out[-1].append(p)
            size += p[1] - p[0]
    return out
