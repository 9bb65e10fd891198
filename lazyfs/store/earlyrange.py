"""A re-laid-out layer's start-up bytes, requested beside its TOC (before the TOC is known).

``lazyfs convert --prefetch`` puts a group's files first in a layer and writes where they end
as the layer annotation :data:`~lazyfs.oci.ANN_LAZYFS_PREFETCH_RANGE` (``OFFSET:LENGTH``).  On
a cold open that range is requested as soon as the TOC's request has left, instead of one
round trip plus the TOC's transfer and decode later.  Its bytes are held (at most
:data:`MAX_EARLY_BYTES`) until the TOC is decoded; then the store adopts the range as a
request of its own (``LayerStore.adopt``): every chunk lying wholly inside it is decoded and
verified against the TOC's digest as a streamed request's would be, and one that fails is
fetched again.  The annotation is a hint: one that is malformed, too large or past the blob
is ignored with a log line.

A prefetch-groups document may carry the same for a layer laid out by path: per layer, the
multi-range requests the mount's prefetch of a group would send first (``Group.requests``).
Once the group is known (given at open, or stored beside the image) and the layer's TOC is
on its way, each goes out as an early range of several runs (:func:`group_requests` checks
them: the document is a hint too), one after another in the document's order (rank order):
the next once those before have about :data:`LEAD_RTTS` round trips' worth of bytes left,
or at once when a reader waits for its bytes (:meth:`EarlyRange.fetch_after`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence

import trio

from lazyfs import oci
from lazyfs.errors import LazyfsError
from lazyfs.remote.base import REQUEST_SENT, RangesSink, Source

log = logging.getLogger(__name__)

#: A range larger than this is ignored, and so is one beyond it with the image's others (the
#: opener): its bytes wait in memory until the TOC is decoded.
MAX_EARLY_BYTES = 64 * 1024 * 1024
#: A layer's early requests from a groups document beyond these are refused (a document
#: naming more is not what ``lazyfs optimize`` writes): each run costs a part header, and the
#: requests a connection each.
MAX_EARLY_RUNS = 4096
MAX_EARLY_REQUESTS = 8
#: A group's requests for a layer go one after another, in rank order: the next once the
#: one before has at most this many round trips' worth of bytes left to come (its rate and
#: latency as measured so far), so its first bytes come as the other's last do and the link
#: never idles.  Sent at once instead, they shared the link: the first-ranked files (the
#: Debian start-up's python3.11, 2.5 MB) came at a third of its rate, and the start-up
#: waited for them (BENCHMARKS "H86").
LEAD_RTTS = 2.0
#: ... measured over at least this long (the first pieces come in a burst).
MIN_RATE_SAMPLE = 0.01

Run = tuple[int, int]  # [start, end) in bytes of the blob


class EarlyRangeError(LazyfsError):
    """The early range did not bring every byte asked for (its chunks are fetched again)."""


def early_range(desc: oci.Descriptor) -> tuple[int, int] | None:
    """The ``[start, end)`` the layer's annotation names, or None (none, or one to ignore)."""
    value = (desc.annotations or {}).get(oci.ANN_LAZYFS_PREFETCH_RANGE)
    if value is None:
        return None
    offset, sep, length = value.partition(":")
    try:
        start, size = int(offset), int(length)
    except ValueError:
        start = size = -1
    if not sep or start < 0 or size <= 0:
        log.info("layer %s: ignoring prefetch range %r: not OFFSET:LENGTH", desc.digest, value)
        return None
    if size > MAX_EARLY_BYTES or start + size > desc.size:
        log.info(
            "layer %s: ignoring prefetch range %r: %s",
            desc.digest,
            value,
            "too large" if size > MAX_EARLY_BYTES else f"past the blob's {desc.size} bytes",
        )
        return None
    return start, start + size


def group_requests(desc: oci.Descriptor, requests: Sequence[Sequence[Run]]) -> list[list[Run]]:
    """The requests a groups document names for the layer ``desc``, checked: runs past the
    blob are clipped (a damaged document: the digest fixes the blob's size), and requests
    that are not ascending, disjoint runs, or too many, refuse the layer's (a log line)."""
    out: list[list[Run]] = []
    clipped = 0
    if len(requests) > MAX_EARLY_REQUESTS or sum(map(len, requests)) > MAX_EARLY_RUNS:
        log.info("layer %s: ignoring the groups' byte ranges: too many", desc.digest)
        return []
    for runs in requests:
        kept: list[Run] = []
        for start, end in runs:
            if start < 0 or end <= start or (kept and start < kept[-1][1]):
                log.info(
                    "layer %s: ignoring the groups' byte ranges: not ascending, disjoint "
                    "ranges (%d, %d)",
                    desc.digest,
                    start,
                    end,
                )
                return []
            if end > desc.size:
                clipped += 1
                if start >= desc.size:
                    continue
                end = desc.size
            kept.append((start, end))
        if kept:
            out.append(kept)
    every = sorted(r for runs in out for r in runs)
    if any(a[1] > b[0] for a, b in itertools.pairwise(every)):
        log.info("layer %s: ignoring the groups' byte ranges: requests overlap", desc.digest)
        return []
    if clipped:
        log.info("layer %s: %d groups' byte ranges clipped to the blob", desc.digest, clipped)
    return out


class EarlyRange:
    """One layer's request in transit, of one range or several (``runs``, ascending): its
    pieces are kept, in order, until :meth:`feed` hands them over (then let go), or
    :meth:`drop`."""

    def __init__(self, digest: str, start: int, end: int, runs: list[Run] | None = None) -> None:
        self.digest = digest
        self.runs = runs or [(start, end)]
        self.start = self.runs[0][0]
        self.end = self.runs[-1][1]
        self.sent_at: float | None = None  # trio time the request was made
        self.first_at: float | None = None  # and its first byte came
        self.received = 0  # bytes
        self.reached = self.start  # the blob offset the bytes received come up to
        self._pieces: deque[tuple[int, bytes]] = deque()
        self._done = False
        self._error: BaseException | None = None
        self._changed = trio.Event()
        self._scope = trio.CancelScope()
        #: once adopted, its bytes are handed over only after this is set (the opener's
        #: caller has built what it needs first); None: at once
        self.hold: trio.Event | None = None
        #: the requests ranked before this one, while it waits for them (``fetch_after``)
        self._before: Sequence[EarlyRange] = ()
        self._followers: list[EarlyRange] = []  # those waiting for this one
        self._let_go = False  # handed over: the rest of the answer is read and dropped
        self._wanted = False

    async def fetch_after(self, source: Source, before: Sequence[EarlyRange]) -> None:
        """:meth:`fetch` once the requests ranked before it have at most :data:`LEAD_RTTS`
        round trips' worth of bytes left to come, at the rate they came at so far (on a
        fast link: at once), or have ended, or a reader waits for this one's bytes
        (:meth:`want`)."""
        self._before = before
        for e in before:
            e._followers.append(self)
        try:
            while not (self._wanted or self._ahead_is_short()):
                # Woken by every piece that comes to one of them, their ends and drops.
                await self._changed.wait()
        finally:
            for e in before:
                e._followers.remove(self)
            self._before = ()
        await self.fetch(source)

    def want(self) -> None:
        """A reader waits for bytes of this request: if it waits for others, it goes now."""
        self._wanted = True
        self._wake()

    def _ahead_is_short(self) -> bool:
        ahead = [e for e in self._before if not e._done and not e._scope.cancel_called]
        if not ahead:
            return True
        came = [e for e in self._before if e.first_at is not None and e.sent_at is not None]
        if not came:
            return False  # no byte yet: neither rate nor latency known
        elapsed = trio.current_time() - min(e.first_at or 0.0 for e in came)
        if elapsed < MIN_RATE_SAMPLE and all(e in ahead for e in came):
            return False  # the first pieces come in a burst: no rate yet
        # At least this rate (one that ended within the sample's time came faster).
        rate = sum(e.received for e in came) / max(elapsed, MIN_RATE_SAMPLE)
        latency = min((e.first_at or 0.0) - (e.sent_at or 0.0) for e in came)
        left = sum(e.size - e.received for e in ahead)
        return left <= rate * latency * LEAD_RTTS

    async def fetch(self, source: Source) -> None:
        """Request the range; never raises (a failure shows as :meth:`feed` ending short)."""
        REQUEST_SENT.set(None)  # inherited from the TOC's task: that one is the TOC's own
        try:
            with self._scope:
                self.sent_at = trio.current_time()
                await source.stream_ranges(self.digest, self.runs, self._put)
        except Exception as e:
            log.info("early range of %s: %s", self.digest, e)
            self._error = e
        finally:
            self._done = True
            self._wake()

    @property
    def size(self) -> int:
        return sum(end - start for start, end in self.runs)

    async def _put(self, at: int, piece: bytes) -> None:
        if self._scope.cancel_called or self._let_go:
            return  # dropped: nobody will take these bytes
        if self.first_at is None:
            self.first_at = trio.current_time()
        self._pieces.append((at, piece))
        self.received += len(piece)
        self.reached = at + len(piece)
        self._wake()
        await trio.lowlevel.checkpoint()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for e in self._followers:
            e._wake()

    def drop(self) -> None:
        """Nothing to adopt (the chunks are cached, or the TOC failed): stop the transfer
        and let its bytes go."""
        self._scope.cancel()
        self._pieces.clear()
        self._wake()  # a request waiting to follow this one goes

    async def feed(self, lo: int, hi: int, sink: RangesSink) -> None:
        """Hand ``sink`` the bytes of the runs within ``[lo, hi)`` in order, as a streamed
        request would, waiting for those not in yet; raises :class:`EarlyRangeError` if the
        transfer ended before ``hi``."""
        if self.hold is not None:
            await self.hold.wait()
        pos = self.start  # blob offset past the last piece handed over
        while pos < hi:
            if not self._pieces:
                if self._done:
                    why = f": {self._error}" if self._error is not None else ""
                    raise EarlyRangeError(f"early range of {self.digest} ended at {pos}{why}")
                await self._changed.wait()
                continue
            at, piece = self._pieces.popleft()
            if at >= hi:
                break  # the next run lies past ``hi``: everything asked for came
            pos = at + len(piece)
            if pos <= lo:
                continue
            a, b = max(lo, at), min(hi, pos)
            await sink(a, piece[a - at : b - at] if (a, b) != (at, pos) else piece)
        if self.reached < self.end:
            self.drop()  # what is left past ``hi`` is nobody's
        else:
            # Every byte asked for came: the answer's end (a multipart body's closing
            # boundary) is read, not cut off, or its connection closes and the next request
            # pays a new one's handshake (a round trip or two, traced on the WAN harness).
            self._let_go = True
            self._pieces.clear()
