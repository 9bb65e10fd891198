"""Request slots shared by all priorities, handed out best priority first.

A fixed number of requests may be in flight.  Waiters queue by (priority, arrival); lower
priorities may hold at most ``total - reserved`` slots, so an on-demand read finds a free slot
even while prefetch saturates its share, and a waiting on-demand request is always granted
before any queued prefetch.  A queued ticket can be boosted when an on-demand reader starts
waiting for the chunks it will bring.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

ONDEMAND = 0
PREFETCH = 1
BACKGROUND = 2


class Ticket:
    """One request's claim on a slot.  Created per request, used once."""

    __slots__ = ("cancelled", "event", "granted", "low", "priority", "seq")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.seq = 0
        self.granted = False
        self.cancelled = False
        self.low = False  # counted against the low-priority share
        self.event = trio.Event()


class PrioritySlots:
    def __init__(self, total: int, reserved: int) -> None:
        if total < 1 or not 0 <= reserved < total:
            raise ValueError(f"bad slot counts: total={total}, reserved={reserved}")
        self.total = total
        self.low_limit = total - reserved
        self.in_use = 0
        self.low_in_use = 0
        self._heap: list[tuple[int, int, Ticket]] = []
        self._seq = itertools.count(1)  # 0 means "never queued"

    def _eligible(self, priority: int) -> bool:
        if self.in_use >= self.total:
            return False
        return priority == ONDEMAND or self.low_in_use < self.low_limit

    def _grant(self, t: Ticket) -> None:
        t.granted = True
        t.low = t.priority != ONDEMAND
        self.in_use += 1
        self.low_in_use += t.low
        t.event.set()

    def _dispatch(self) -> None:
        while self._heap:
            prio, _, t = self._heap[0]
            if t.granted or t.cancelled or prio != t.priority:
                heapq.heappop(self._heap)  # stale entry (boosted, granted or gone)
                continue
            if not self._eligible(prio):
                break  # everything behind it is the same or a lower priority
            heapq.heappop(self._heap)
            self._grant(t)

    async def acquire(self, t: Ticket) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        # Waiters still queued are never eligible (dispatch runs on every release), so a
        # newcomer that is eligible does not jump ahead of anyone it should not.
        if self._eligible(t.priority):
            self._grant(t)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        t.seq = next(self._seq)
        heapq.heappush(self._heap, (t.priority, t.seq, t))
        try:
            await t.event.wait()
        except BaseException:
            if t.granted:
                self.release(t)
            else:
                t.cancelled = True
            raise

    def release(self, t: Ticket) -> None:
        if not t.granted:
            return
        t.granted = False
        t.cancelled = True  # a ticket is used once
        self.in_use -= 1
        self.low_in_use -= t.low
        self._dispatch()

    def boost(self, t: Ticket, priority: int) -> None:
        """Raise a queued ticket's priority (no effect once granted)."""
        if t.granted or t.cancelled or priority >= t.priority:
            return
        t.priority = priority
        if t.seq:
            heapq.heappush(self._heap, (priority, t.seq, t))
            self._dispatch()

    @asynccontextmanager
    async def hold(self, t: Ticket) -> AsyncIterator[None]:
        await self.acquire(t)
        try:
            yield
        finally:
            self.release(t)
