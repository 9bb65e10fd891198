"""Map file reads to compressed ranges, and turn fetched ranges into verified chunk bytes.

Pure and synchronous: the store calls :func:`decode_chunk` through ``trio.to_thread`` because
decompression and hashing are CPU work (zstandard and hashlib release the GIL).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.formats.toc import Chunk, Compression, Entry


def chunks_for_range(entry: Entry, offset: int, length: int) -> Sequence[Chunk]:
    """The chunks of ``entry`` that overlap ``[offset, offset + length)``, in file order."""
    if length <= 0 or offset >= entry.size:
        return ()
    chunks = entry.chunks
    starts = [c.file_offset for c in chunks] if len(chunks) > 8 else None
    if starts is None:
        end = offset + length
        return tuple(c for c in chunks if c.file_offset < end and c.file_offset + c.size > offset)
    first = max(0, bisect.bisect_right(starts, offset) - 1)
    last = bisect.bisect_left(starts, offset + length)
    return chunks[first:last]


_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    # One decompression context per worker thread: creating one per chunk showed in profiles.
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


# Decompressed output is gathered in pieces of at most this size, so a stream that inflates
# past its limit costs at most the limit plus one piece before it is stopped.
_PIECE = 1 << 20


def _zstd_decompress(raw: bytes, limit: int) -> list[bytes]:
    dctx = _dctx()
    try:
        # The common case, and the fast one: the range is exactly one frame (lazyfs and
        # containers/storage write each chunk as its own frame) that declares its size.
        # decompress() trusts a declared size over max_output_size, so check it first: a
        # hostile frame must not make us allocate more than the chunk needs.
        declared = zstandard.frame_content_size(raw)
        if 0 <= declared <= limit:
            # allow_extra_data=False: success means this one frame is all there is.
            return [dctx.decompress(raw, max_output_size=limit, allow_extra_data=False)]
    except zstandard.ZstdError:
        pass  # several frames, or no content size: take the general path
    # Several frames may make up one range (headers and content); read across them, but never
    # inflate past what the chunk needs (a hostile blob cannot make us allocate more).
    reader = dctx.stream_reader(raw, read_across_frames=True)
    pieces: list[bytes] = []
    got = 0
    try:
        while got < limit:
            piece = reader.read(min(limit - got, _PIECE))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"corrupt zstd data: {e}") from e
    return pieces


def _gzip_decompress(raw: bytes, limit: int) -> list[bytes]:
    pieces: list[bytes] = []
    got = 0
    data = raw
    try:
        while data and got < limit:
            d = zlib.decompressobj(wbits=31)
            while got < limit:
                piece = d.decompress(data, min(limit - got, _PIECE))
                pieces.append(piece)
                got += len(piece)
                data = d.unconsumed_tail
                if d.eof or not (piece or data):
                    break
            if not d.eof:
                break  # at the limit inside this member, or the member is truncated
            data = d.unused_data
    except zlib.error as e:
        raise IntegrityError(f"corrupt gzip data: {e}") from e
    return pieces


def _pieces(compression: Compression, raw: bytes, limit: int) -> list[bytes]:
    if compression == "zstd":
        return _zstd_decompress(raw, limit)
    if compression == "gzip":
        return _gzip_decompress(raw, limit)
    if compression == "none":
        return [raw[:limit]]
    raise FormatError(f"unknown compression {compression!r}")


def inflate(compression: Compression, raw: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of the decompressed stream ``raw`` (frames or members read
    across), however large the stream claims or turns out to be.  The one way lazyfs
    decompresses data it fetched: chunks and TOCs alike."""
    pieces = _pieces(compression, raw, limit)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def inflate_whole(compression: Compression, raw: bytes, limit: int, what: str) -> bytes:
    """All of the decompressed stream ``raw``, or FormatError naming ``what`` if it holds more
    than ``limit`` bytes: refused at ``limit`` plus one piece, before anything is joined.
    Corrupt data stays an IntegrityError: most likely damage in transit, worth a refetch."""
    try:
        pieces = _pieces(compression, raw, limit + 1)
    except IntegrityError as e:
        raise IntegrityError(f"{what} does not decompress: {e}") from e
    if sum(map(len, pieces)) > limit:
        raise FormatError(f"{what} inflates past {limit} bytes")
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def decode_chunk(compression: Compression, raw: bytes, chunk: Chunk) -> bytes:
    """Decompress the compressed range of ``chunk`` and verify it.  Raises IntegrityError for
    anything that does not hash to ``chunk.digest``: unverified bytes never leave here."""
    if chunk.zeros:
        return bytes(chunk.size)
    need = chunk.inner + chunk.size
    plain = inflate(compression, raw, need)
    data = plain[chunk.inner : need] if chunk.inner else plain
    if len(data) != chunk.size:
        raise IntegrityError(
            f"chunk {chunk.digest} decompressed to {len(data)} of {chunk.size} bytes"
        )
    check_chunk(data, chunk.digest)
    return data


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _zstd_stream(src: Readable, limit: int) -> Iterator[bytes]:
    # Any object with read() will do as the source, though the stubs say IO[bytes].
    reader = _dctx().stream_reader(src, read_size=_PIECE, read_across_frames=True)  # type: ignore[arg-type]
    got = 0
    try:
        while got < limit:
            piece = reader.read(min(limit - got, _PIECE))
            if not piece:
                return
            got += len(piece)
            yield piece
    except zstandard.ZstdError as e:
        raise IntegrityError(f"corrupt zstd data: {e}") from e


def _gzip_stream(src: Readable, limit: int) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=31)
    data = b""
    got = 0
    try:
        while got < limit:
            if not data:
                data = src.read(_PIECE)
                if not data:
                    return
            piece = d.decompress(data, min(limit - got, _PIECE))
            data = d.unconsumed_tail
            if d.eof:  # the next member, if any, starts in what is left
                data = d.unused_data
                d = zlib.decompressobj(wbits=31)
            if piece:
                got += len(piece)
                yield piece
    except zlib.error as e:
        raise IntegrityError(f"corrupt gzip data: {e}") from e


def decode_chunk_into(compression: Compression, src: Readable, chunk: Chunk, out: BinaryIO) -> None:
    """:func:`decode_chunk` for a chunk too big to hold in memory: the compressed range is
    pulled from ``src`` and the content written to ``out`` in pieces of at most 1 MiB, hashed
    on the way.  Decompression stops at the size the TOC declares, whatever the stream says.
    Raises IntegrityError unless ``out`` received exactly the chunk's verified bytes."""
    if compression == "zstd":
        pieces = _zstd_stream(src, chunk.inner + chunk.size)
    elif compression == "gzip":
        pieces = _gzip_stream(src, chunk.inner + chunk.size)
    else:
        raise FormatError(f"unknown compression {compression!r}")
    sha = hashlib.sha256()
    skip, got = chunk.inner, 0
    for piece in pieces:
        if skip:
            cut = min(skip, len(piece))
            skip -= cut
            piece = piece[cut:]
        if piece:
            sha.update(piece)
            out.write(piece)
            got += len(piece)
    if got != chunk.size:
        raise IntegrityError(f"chunk {chunk.digest} decompressed to {got} of {chunk.size} bytes")
    algo, _, want = chunk.digest.partition(":")
    if algo != "sha256":
        raise IntegrityError(f"unsupported chunk digest {chunk.digest!r}")
    if sha.hexdigest() != want:
        raise IntegrityError(f"chunk {chunk.digest} failed verification")


def check_chunk(data: bytes, digest: str) -> None:
    algo, _, want = digest.partition(":")
    if algo != "sha256":
        raise IntegrityError(f"unsupported chunk digest {digest!r}")
    if hashlib.sha256(data).hexdigest() != want:
        raise IntegrityError(f"chunk {digest} failed verification")
