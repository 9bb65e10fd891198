"""Per-layer readiness bitmap, persisted under ``DIR/layers/<blob-hex>.map``.

Bit ``i`` says chunk ``i`` of the layer is (probably) in the chunk cache, where chunks are the
layer's unique non-hole chunk digests in TOC order (first occurrence).  That order depends only
on the TOC, which the blob digest pins, so it is stable across runs; a fingerprint of the
digest list still guards against a changed ordering rule.  The map is a hint: the cache file is
the truth, so a lost or stale map only costs a lookup, never wrong data.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path

import msgspec

from lazyfs.formats.toc import TOC, Chunk, EntryTable

MAP_VERSION = 1


class MapFile(msgspec.Struct, frozen=True):
    """On-disk form (msgpack): one bit per chunk, little-endian bit order within bytes."""

    version: int
    blob: str
    count: int
    fingerprint: str
    bits: bytes


_FROM_DIGITS = bytes.maketrans(b"01", b"\x00\x01")
_TO_DIGITS = bytes.maketrans(b"\x00\x01", b"01")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(MapFile)


def layer_chunks(toc: TOC) -> list[Chunk]:
    """The layer's unique non-hole chunks in TOC order: the map's bit order."""
    seen: set[str] = set()
    out: list[Chunk] = []
    entries = toc.entries
    # A table gives its chunks without making its entries (a mount of 100k files waits here).
    chunks = (
        entries.chunks()
        if isinstance(entries, EntryTable)
        else (c for e in entries for c in e.chunks)
    )
    for c in chunks:
        if not c.zeros and c.digest not in seen:
            seen.add(c.digest)
            out.append(c)
    return out


class DigestIndex:
    """Chunk digest -> its position in ``chunks`` (the map's bit order), as a dict would
    answer, in 12 bytes a chunk instead of ~70: the digests' hashes sorted beside their
    positions.  Every hit is checked against the chunk's own digest, so a hash collision can
    only cost a comparison, never a wrong answer."""

    __slots__ = ("_chunks", "_hashes", "_pos")

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        hashes = [hash(c.digest) for c in chunks]  # each digest hashed once, not per compare
        order = sorted(range(len(chunks)), key=hashes.__getitem__)
        self._chunks = chunks
        self._hashes = array("q", [hashes[i] for i in order])
        self._pos = array("I", order)

    def get(self, digest: str) -> int | None:
        h, hashes = hash(digest), self._hashes
        j = bisect_left(hashes, h)
        while j < len(hashes) and hashes[j] == h:
            i = self._pos[j]
            if self._chunks[i].digest == digest:
                return i
            j += 1
        return None

    def __contains__(self, digest: str) -> bool:
        return self.get(digest) is not None

    def __getitem__(self, digest: str) -> int:
        i = self.get(digest)
        if i is None:
            raise KeyError(digest)
        return i

    def __len__(self) -> int:
        return len(self._pos)


def fingerprint(digests: Sequence[str]) -> str:
    """sha256 over the digests, each followed by a newline (one hash call, not two each)."""
    text = "\n".join(digests) + "\n" if digests else ""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ChunkMap:
    """An in-memory bitmap plus what is needed to persist it in batches."""

    def __init__(self, path: Path, blob: str, digests: Sequence[str]) -> None:
        self.path = path
        self.blob = blob
        self.count = len(digests)
        self.fingerprint = fingerprint(digests)
        self.bits = bytearray((self.count + 7) // 8)
        self.ready = 0
        self.changes = 0  # changes since the last snapshot
        self.last_flush = time.monotonic()
        self.flushing = False

    @classmethod
    def load(cls, path: Path, blob: str, digests: Sequence[str]) -> ChunkMap:
        """Load the persisted map, or start empty if it is missing, corrupt or for another
        chunk order (all are harmless: the map is only a hint)."""
        m = cls(path, blob, digests)
        with contextlib.suppress(OSError, msgspec.DecodeError):
            f = _decoder.decode(path.read_bytes())
            if (
                f.version == MAP_VERSION
                and f.blob == blob
                and f.count == m.count
                and f.fingerprint == m.fingerprint
                and len(f.bits) == len(m.bits)
            ):
                m.bits[:] = f.bits
                m._clear_padding()
                m.ready = int.from_bytes(m.bits, "little").bit_count()
        return m

    def flags(self) -> bytes:
        """One byte per chunk, 1 where its bit is set: for ``itertools.compress`` and index
        tests without a method call per chunk (a mount's set-up asks for every chunk)."""
        if not self.count:
            return b""
        word = int.from_bytes(self.bits, "little") & ((1 << self.count) - 1)
        return format(word, f"0{self.count}b")[::-1].encode().translate(_FROM_DIGITS)

    def set_flags(self, flags: bytes | bytearray) -> None:
        """Replace every bit with ``flags`` (as :meth:`flags` gives them), counting each bit
        that changed as :meth:`set` and :meth:`clear` would."""
        if len(flags) != self.count:
            raise ValueError(f"{len(flags)} flags for {self.count} chunks")
        old = int.from_bytes(self.bits, "little")
        new = int(bytes(flags).translate(_TO_DIGITS)[::-1], 2) if flags else 0
        self.bits[:] = new.to_bytes(len(self.bits), "little")
        self.ready = new.bit_count()
        self.changes += (old ^ new).bit_count()

    def _clear_padding(self) -> None:
        if self.count % 8:
            self.bits[-1] &= (1 << (self.count % 8)) - 1

    def __getitem__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> bool:
        """Set bit ``i``; True if it changed."""
        mask = 1 << (i & 7)
        if self.bits[i >> 3] & mask:
            return False
        self.bits[i >> 3] |= mask
        self.ready += 1
        self.changes += 1
        return True

    def clear(self, i: int) -> bool:
        mask = 1 << (i & 7)
        if not self.bits[i >> 3] & mask:
            return False
        self.bits[i >> 3] &= ~mask & 0xFF
        self.ready -= 1
        self.changes += 1
        return True

    def due(self, *, max_changes: int, max_age: float) -> bool:
        """Whether a batched flush is due: enough changes, or changes old enough."""
        if not self.changes or self.flushing:
            return False
        return self.changes >= max_changes or time.monotonic() - self.last_flush >= max_age

    def snapshot(self) -> bytes:
        """Encode the current bits and mark them clean (taken in the event loop, written in a
        worker thread, so the bytes cannot change under the writer)."""
        self.changes = 0
        self.last_flush = time.monotonic()
        return _encoder.encode(
            MapFile(
                version=MAP_VERSION,
                blob=self.blob,
                count=self.count,
                fingerprint=self.fingerprint,
                bits=bytes(self.bits),
            )
        )
