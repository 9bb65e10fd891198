"""What a mount does after readiness waits for the kernel's INIT to be answered
(fs/serve.py ``_after``): the kernel sends no request before that answer, so work run
ahead of it (the start-up group's 10-20 ms of CPU) delayed the mount's first request."""

from __future__ import annotations

import trio
import trio.testing

from lazyfs.delta.provider import PendingDeltas
from lazyfs.fs.serve import _after


def test_post_readiness_work_waits_for_init() -> None:
    ran: list[object] = []

    async def work(deltas: PendingDeltas | None) -> None:
        ran.append(deltas)

    async def main() -> None:
        initialized = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_after, initialized, work, None)
            await trio.testing.wait_all_tasks_blocked()
            assert ran == []  # INIT not answered yet: nothing ran
            initialized.set()
        assert ran == [None]

    trio.run(main)
