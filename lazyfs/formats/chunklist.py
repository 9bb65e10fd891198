"""Chunks kept as columns: each :class:`Chunk` made when asked for.

A layer of 100k one-chunk files held its chunk list as ``Chunk`` objects with their digest
strings and offset ints: ~24 MiB resident for the mount's life (BENCHMARKS.md, issue 13).
Here the numbers are arrays in the narrowest type that holds them, a column of zeros is not
kept, and ``sha256:`` digests are 32 bytes each in one ``bytes``: ~4 MiB.  Code that walks
many chunks reads the columns (``offsets``, ``ends``, ``sizes``, :meth:`ChunkList.digest`);
a read or a prefetch gets ``Chunk`` objects, equal to the ones the TOC's entries hold.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import overload

from lazyfs.formats.columns import NO_DIGEST, SHA256_PREFIX, narrow, raw_sha256, sha256_text
from lazyfs.formats.toc import Chunk

_HEX_BATCH = 4096  # digests turned into strings at once by ChunkList.digests()


class ChunkList(Sequence[Chunk]):
    """Chunks as columns, in the order given; ``self[i]`` makes chunk ``i`` (equal each time,
    not the same object).  ``offsets``, ``ends``, ``sizes``: arrays to read (``bisect``
    works on ``offsets`` when the list is in blob order); never change them."""

    __slots__ = (
        "_count",
        "_file_offsets",
        "_inners",
        "_raw",
        "_slots",
        "_strs",
        "_zeros",
        "ends",
        "offsets",
        "sizes",
    )

    def __init__(
        self,
        *,
        file_offsets: array[int] | None,
        sizes: array[int],
        offsets: array[int],
        ends: array[int],
        inners: array[int] | None,
        zeros: array[int] | None,
        digests: bytes | list[str],
        slots: array[int] | None = None,
    ) -> None:
        """Columns of one length; None for a column of zeros; ``digests`` as
        :func:`~lazyfs.formats.columns.raw_sha256` packs them, or the strings.  ``slots``:
        which of the 32-byte digests each chunk has (None: the i-th), so a list can share
        another's bytes (a table's file digests: a one-chunk file's chunk has its file's)."""
        self._count = n = len(offsets)
        self._raw: bytes = digests if isinstance(digests, bytes) else b""
        self._strs: list[str] | None = None if isinstance(digests, bytes) else digests
        self._slots = slots if isinstance(digests, bytes) else None
        if self._slots is not None:
            length = len(self._slots)
            if self._slots and max(self._slots) >= len(digests) // 32:
                raise ValueError("a chunk's digest slot is out of range")
        else:
            length = len(digests) // 32 if isinstance(digests, bytes) else len(digests)
        columns = (file_offsets, sizes, ends, inners, zeros)
        if length != n or any(c is not None and len(c) != n for c in columns):
            raise ValueError("chunk columns differ in length")
        self._file_offsets = file_offsets if file_offsets and any(file_offsets) else None
        self._inners = inners if inners and any(inners) else None
        self._zeros = zeros if zeros and any(zeros) else None
        self.sizes, self.offsets, self.ends = sizes, offsets, ends

    @classmethod
    def of(cls, chunks: Iterable[Chunk]) -> ChunkList:
        """The columns of ``chunks``."""
        every = chunks if isinstance(chunks, Sequence) else list(chunks)
        strs = [c.digest for c in every]
        return cls(
            file_offsets=narrow(c.file_offset for c in every),
            sizes=narrow(c.size for c in every),
            offsets=narrow(c.offset for c in every),
            ends=narrow(c.end for c in every),
            inners=narrow(c.inner for c in every),
            zeros=array("B", [c.zeros for c in every]),
            digests=raw_sha256(strs) or strs,
        )

    def select(self, rows: Iterable[int]) -> ChunkList:
        """The chunks at ``rows``, in that order, as a list of their own (sharing the digest
        bytes)."""
        rows = rows if isinstance(rows, array | list | range) else list(rows)

        def pick(col: array[int] | None) -> array[int] | None:
            return None if col is None else array(col.typecode, map(col.__getitem__, rows))

        return self._like(pick)

    def without(self, rows: Sequence[int]) -> ChunkList:
        """The chunks but those at ``rows`` (ascending), as a list of their own: copies of the
        columns with a few rows cut out, quicker than :meth:`select` picking the rest."""
        # The runs between the rows, copied one after another: a del per row moved the rest
        # of the column each time (Debian's 144 repeats: ~1 ms of a mount's set-up).
        runs = list(zip([0, *(i + 1 for i in rows)], [*rows, None], strict=True))

        def cut(col: array[int] | None) -> array[int] | None:
            if col is None:
                return None
            out = array(col.typecode)
            for start, stop in runs:
                out += col[start:stop]
            return out

        return self._like(cut)

    def _like(self, change: Callable[[array[int] | None], array[int] | None]) -> ChunkList:
        """A list of these chunks' columns, each changed alike (rows picked or cut)."""
        digests: bytes | list[str]
        slots = None
        if self._strs is not None:
            rows = change(array("I", range(self._count)))
            assert rows is not None
            digests = [self._strs[i] for i in rows]
        else:
            digests = self._raw
            slots = change(self._slots if self._slots is not None else narrow(range(self._count)))
        return ChunkList(
            file_offsets=change(self._file_offsets),
            sizes=change(self.sizes),  # type: ignore[arg-type]  # not None in, not None out
            offsets=change(self.offsets),  # type: ignore[arg-type]
            ends=change(self.ends),  # type: ignore[arg-type]
            inners=change(self._inners),
            zeros=change(self._zeros),
            digests=digests,
            slots=slots,
        )

    def __len__(self) -> int:
        return self._count

    def _slot(self, i: int) -> int:
        return i if self._slots is None else self._slots[i]

    def digest(self, i: int) -> str:
        """Chunk ``i``'s digest, without making the chunk."""
        if self._strs is not None:
            return self._strs[i]
        at = 32 * self._slot(i)
        return sha256_text(self._raw[at : at + 32])

    def digests(self) -> Iterator[str]:
        """Every digest in order (made a batch at a time: one ``hex`` call per batch)."""
        if self._strs is not None:
            yield from self._strs
            return
        raw, slots, empty = memoryview(self._raw), self._slots, NO_DIGEST.hex()
        for start in range(0, self._count, _HEX_BATCH):
            if slots is None:
                hx = raw[32 * start : 32 * (start + _HEX_BATCH)].hex()
            else:
                part = slots[start : start + _HEX_BATCH]
                hx = b"".join([raw[32 * i : 32 * i + 32] for i in part]).hex()
            for k in range(0, len(hx), 64):
                h = hx[k : k + 64]
                yield "" if h == empty else SHA256_PREFIX + h

    def digest_lines(self) -> str:
        """Every digest followed by a newline, as one string (what a readiness map's
        fingerprint hashes), made in a few C passes over the bytes: no string per digest."""
        if self._strs is not None:
            return "".join(d + "\n" for d in self._strs)
        if not self._count:
            return ""
        hx = self._raw.hex("\n", -32)  # a newline after each 32 bytes but the last
        if NO_DIGEST.hex() in hx:  # a hole's digest, spelt "": rare, so each line is made
            return "".join(d + "\n" for d in self.digests())
        sep = "\n" + SHA256_PREFIX
        if self._slots is not None:  # each chunk's line picked from the digests' (in C)
            hx = sep.join(map(hx.split("\n").__getitem__, self._slots))
        else:
            hx = hx.replace("\n", sep)
        return SHA256_PREFIX + hx + "\n"

    @property
    def digest_view(self) -> DigestView:
        """The digests as a sequence of strings, each made when asked for."""
        return DigestView(self)

    @property
    def has_holes(self) -> bool:
        return self._zeros is not None

    def is_hole(self, i: int) -> bool:
        return bool(self._zeros and self._zeros[i])

    def keys(self) -> array[int]:
        """A number for each digest, equal for equal digests (the first 8 bytes of a sha256,
        else the string's hash), for an index sorted by them: see :meth:`key_of`."""
        if self._strs is not None:
            return array("q", map(hash, self._strs))
        words = array("q")
        words.frombytes(self._raw)
        first = words[::4]
        return first if self._slots is None else array("q", map(first.__getitem__, self._slots))

    def key_of(self, digest: str) -> tuple[int, bytes | str] | None:
        """``digest``'s key (as :meth:`keys`) and what :meth:`ident` gives for it, or None if
        no chunk here can have it."""
        if self._strs is not None:
            return hash(digest), digest
        if not digest:
            return int.from_bytes(NO_DIGEST[:8], sys.byteorder, signed=True), NO_DIGEST
        if len(digest) != 71 or not digest.startswith(SHA256_PREFIX):
            return None
        try:
            raw = bytes.fromhex(digest[7:])
        except ValueError:
            return None
        if raw.hex() != digest[7:] or raw == NO_DIGEST:
            return None  # spelt in a way no digest here is spelt
        return int.from_bytes(raw[:8], sys.byteorder, signed=True), raw

    def ident(self, i: int) -> bytes | str:
        """Chunk ``i``'s digest as :meth:`key_of` gives it, to compare."""
        if self._strs is not None:
            return self._strs[i]
        at = 32 * self._slot(i)
        return self._raw[at : at + 32]

    def _column(self, col: array[int] | None) -> Iterable[int]:
        return itertools.repeat(0, self._count) if col is None else col

    def __iter__(self) -> Iterator[Chunk]:
        return map(
            Chunk,
            self._column(self._file_offsets),
            self.sizes,
            self.offsets,
            self.ends,
            self.digests(),
            self._column(self._inners),
            map(bool, self._column(self._zeros)),
        )

    @overload
    def __getitem__(self, i: int) -> Chunk: ...
    @overload
    def __getitem__(self, i: slice) -> ChunkList: ...
    def __getitem__(self, i: int | slice) -> Chunk | ChunkList:
        if isinstance(i, slice):
            return self.select(range(*i.indices(self._count)))
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("chunk index out of range")
        return Chunk(
            self._file_offsets[i] if self._file_offsets else 0,
            self.sizes[i],
            self.offsets[i],
            self.ends[i],
            self.digest(i),
            self._inners[i] if self._inners else 0,
            bool(self._zeros and self._zeros[i]),
        )

    def __repr__(self) -> str:
        return f"<ChunkList of {self._count}>"


class DigestView(Sequence[str]):
    """A chunk list's digests (:attr:`ChunkList.digest_view`)."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: ChunkList) -> None:
        self._chunks = chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[str]:
        return self._chunks.digests()

    def lines(self) -> str:
        """:meth:`ChunkList.digest_lines`."""
        return self._chunks.digest_lines()

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("chunk index out of range")
        return self._chunks.digest(i)
