"""One lock per chain of lazy layers, so a slow chain holds up only its own users.

Starting a chain's daemon (a registry lookup, the daemon reading its TOCs) and stopping one
(a busy or hung mount: seconds) take long.  Under one lock for every chain, each of those
stalled every Prepare, Mounts and Remove of every image; under a chain's own lock, only the
calls that need that very chain wait, and they must (one daemon per chain, on one mount
point).  What the lock spans: from a chain's mount to recording its user, and from
finding its daemon unused to deleting its row, so a daemon is never stopped under a new user.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ChainLocks:
    """Re-entrant locks by chain ID, made on first use and dropped when nobody holds or
    waits for them (the table stays as small as the calls in flight)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.RLock, int]] = {}  # chain → (lock, users)

    @contextlib.contextmanager
    def hold(self, chain_id: str) -> Iterator[None]:
        with self._holding(chain_id, blocking=True):
            yield

    @contextlib.contextmanager
    def hold_if_free(self, chain_id: str) -> Iterator[bool]:
        """Hold the chain's lock if nobody else does (True), or go on without it (False)."""
        with self._holding(chain_id, blocking=False) as held:
            yield held

    @contextlib.contextmanager
    def _holding(self, chain_id: str, *, blocking: bool) -> Iterator[bool]:
        with self._guard:
            lock, users = self._locks.get(chain_id) or (threading.RLock(), 0)
            self._locks[chain_id] = (lock, users + 1)
        try:
            held = lock.acquire(blocking)
            try:
                yield held
            finally:
                if held:
                    lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[chain_id]
                if users == 1:
                    del self._locks[chain_id]
                else:
                    self._locks[chain_id] = (lock, users - 1)

    def __len__(self) -> int:
        """Chains held or waited for now."""
        with self._guard:
            return len(self._locks)
