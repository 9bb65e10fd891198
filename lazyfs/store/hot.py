"""A small in-memory LRU of chunks just fetched.

A request usually brings more chunks than the read that caused it (merging, readahead,
amplification): the reads that follow ask for exactly those.  Serving them from memory saves a
file read and a thread hop each, which for small files costs more than the read itself.
Verified bytes only ever enter here (from ``decode_chunk``).

The bound counts each entry's own cost (digest key, bytes header, dict node) as well as its
data: a read soak of small files filled 64 MiB of data plus ~250 B per entry before (issue 13,
RSS under reads), while a cold start-up's fetched set is ~10 MiB.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_HOT_BYTES = 16 * 1024 * 1024
# What an entry costs beyond its data: the 71-char digest key, the bytes object, the dict slot.
ENTRY_OVERHEAD = 256


class HotChunks:
    def __init__(self, max_bytes: int = DEFAULT_HOT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4 or digest in self._items:
            return  # a huge chunk would flush everything else for one reader
        self._items[digest] = data
        self._bytes += len(data) + ENTRY_OVERHEAD
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old) + ENTRY_OVERHEAD

    def discard(self, digest: str) -> None:
        data = self._items.pop(digest, None)
        if data is not None:
            self._bytes -= len(data) + ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._items)
