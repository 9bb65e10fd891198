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
import itertools
import operator
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from lazyfs.formats.chunklist import ChunkList, DigestView
from lazyfs.formats.toc import TOC, EntryTable

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


def layer_chunks(toc: TOC) -> ChunkList:
    """The layer's unique non-hole chunks in TOC order: the map's bit order."""
    return indexed_chunks(toc)[0]


def indexed_chunks(toc: TOC) -> tuple[ChunkList, DigestIndex]:
    """:func:`layer_chunks` and their index (most layers repeat no chunk: then the index that
    found no repeat is the one kept, not built again)."""
    entries = toc.entries
    # A table gives its chunks as columns, without making its entries (a mount of 100k files
    # waits here) or chunks (the store keeps the columns for the mount's life).
    every = (
        entries.chunks()
        if isinstance(entries, EntryTable)
        else ChunkList.of([c for e in entries for c in e.chunks])
    )
    index = DigestIndex(every)
    drop = set(index.repeats())
    if every.has_holes:
        drop.update(i for i in range(len(every)) if every.is_hole(i))
    if not drop:
        return every, index  # sharing the table's columns
    rows = sorted(drop)
    if len(drop) <= _CUT_MAX:
        kept = every.without(rows)
    else:
        kept = every.select([i for i in range(len(every)) if i not in drop])
    return kept, index.without(rows, kept)


# Up to this many rows are cut out of copies of the columns (each cut moves the rest of a
# column); more, and the rows kept are picked one by one.
_CUT_MAX = 256


class DigestIndex:
    """Chunk digest -> its position in ``chunks`` (the map's bit order), as a dict would
    answer, in 8 bytes a chunk instead of ~70 and without a string per digest: each digest's
    key (:meth:`ChunkList.keys`) with its low bits replaced by the chunk's row, sorted (plain
    ints sort fast).  Every hit is checked against the chunk's own digest, so digests with
    one key can only cost a comparison, never a wrong answer."""

    __slots__ = ("_chunks", "_shift", "_sorted")

    def __init__(self, chunks: ChunkList) -> None:
        n = len(chunks)
        shift = max(n - 1, 0).bit_length()
        tops = map(operator.rshift, chunks.keys(), itertools.repeat(shift))
        rows = map(operator.or_, map(operator.lshift, tops, itertools.repeat(shift)), range(n))
        self._chunks = chunks
        self._shift = shift
        self._sorted: array[int] = array("q", sorted(rows))

    def without(self, rows: Sequence[int], kept: ChunkList) -> DigestIndex:
        """The index of ``kept``: these chunks but those at ``rows`` (ascending), in order.
        Taken from this one (the keys stay in order when rows are renumbered alike), not
        sorted again, unless the rows' bits shrink."""
        n = len(kept)
        shift = max(n - 1, 0).bit_length()
        if shift != self._shift or n + len(rows) != len(self._sorted):
            return DigestIndex(kept)
        mask = (1 << shift) - 1
        gone = bytearray(len(self._sorted))
        for r in rows:
            gone[r] = 1
        # How much each row's number drops: the rows before it that are gone.
        less = list(itertools.accumulate(gone))
        index = DigestIndex.__new__(DigestIndex)
        index._chunks, index._shift = kept, shift
        index._sorted = array("q", [v - less[v & mask] for v in self._sorted if not gone[v & mask]])
        return index

    def get(self, digest: str) -> int | None:
        probe = self._chunks.key_of(digest)
        if probe is None:
            return None
        key, ident = probe
        shift, found = self._shift, self._sorted
        top, mask = key >> shift, (1 << shift) - 1
        j = bisect_left(found, top << shift)
        while j < len(found) and found[j] >> shift == top:
            i = found[j] & mask
            if self._chunks.ident(i) == ident:
                return i
            j += 1
        return None

    def repeats(self) -> list[int]:
        """The rows whose digest a row before them holds (not a hole: a hole's digest leaves
        the chunk that really holds it its place)."""
        chunks, shift, found = self._chunks, self._shift, self._sorted
        mask = (1 << shift) - 1
        tops = array("q", map(operator.rshift, found, itertools.repeat(shift)))
        out: list[int] = []
        # Equal keys are next to one another, rows in order: compare only within such runs.
        for j in itertools.compress(
            range(1, len(tops)), map(operator.eq, tops, itertools.islice(tops, 1, None))
        ):
            i, ident = found[j] & mask, chunks.ident(found[j] & mask)
            k = j - 1
            while k >= 0 and tops[k] == tops[j]:
                before = found[k] & mask
                if not chunks.is_hole(before) and chunks.ident(before) == ident:
                    out.append(i)
                    break
                k -= 1
        return out

    def __contains__(self, digest: str) -> bool:
        return self.get(digest) is not None

    def __getitem__(self, digest: str) -> int:
        i = self.get(digest)
        if i is None:
            raise KeyError(digest)
        return i

    def __len__(self) -> int:
        return len(self._sorted)


_FINGERPRINT_BATCH = 4096


def fingerprint(digests: Iterable[str]) -> str:
    """sha256 over the digests, each followed by a newline (fed in batches: the digests may be
    made one by one from a chunk list's bytes, and need not all exist at once; a chunk list's
    view gives its text at once, made in C)."""
    if isinstance(digests, DigestView):
        return hashlib.sha256(digests.lines().encode()).hexdigest()[:32]
    h = hashlib.sha256()
    it = iter(digests)
    while batch := list(itertools.islice(it, _FINGERPRINT_BATCH)):
        h.update(("\n".join(batch) + "\n").encode())
    return h.hexdigest()[:32]


class ChunkMap:
    """An in-memory bitmap plus what is needed to persist it in batches."""

    def __init__(self, path: Path, blob: str, digests: Sequence[str]) -> None:
        self.path = path
        self.blob = blob
        self.count = len(digests)
        # Made when first asked for: a layer no map was kept for needs it only when its map
        # is written, and a mount waits for what add_layer does.
        self._digests: Sequence[str] | None = digests
        self._fingerprint = ""
        self.bits = bytearray((self.count + 7) // 8)
        self.ready = 0
        self.changes = 0  # changes since the last snapshot
        self.last_flush = time.monotonic()
        self.flushing = False

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the map's digests (safe from any thread: the digests do not
        change, and a race only computes it twice)."""
        digests = self._digests
        if digests is not None:
            self._fingerprint = fingerprint(digests)
            self._digests = None
        return self._fingerprint

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
