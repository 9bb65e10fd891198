"""What both lazy writers share: cutting a tar stream into independently compressed frames.

Tar headers (and the padding before them) gather into one metadata frame; each regular file's
content is cut into ``chunk_size`` pieces (the first one ``head_size`` when that is set:
see :func:`chunk_cuts`), each its own frame, recorded as a :class:`Chunk` with its compressed
range and sha256.  The formats differ only in how a frame is compressed
(zstd frames or gzip members) and in what follows the last member, so each supplies a
:class:`FrameWriter` and finishes the blob itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import msgspec

from lazyfs.errors import FormatError
from lazyfs.formats.tarsplit import TarSplitWriter
from lazyfs.formats.tarstream import Member, TarReader
from lazyfs.formats.toc import Chunk, Entry

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
#: 0: a file's first chunk is as large as the others.
DEFAULT_HEAD_SIZE = 0


def chunk_cuts(size: int, chunk_size: int, head_size: int = 0) -> list[int]:
    """The sizes of the chunks a ``size``-byte file is cut into: ``chunk_size`` pieces, the
    first of them ``head_size`` when that is set and smaller.  A chunk is verified whole, so a
    reader waits for all of the chunk its read falls in: a small head lets the first read of
    a big file (an ELF or pyc header, read before anything else) be served sooner."""
    if chunk_size <= 0 or head_size < 0:
        raise FormatError(f"bad chunk sizes {chunk_size} (head {head_size}): must be positive")
    return list(_cuts(size, chunk_size, head_size))


def _cuts(size: int, chunk_size: int, head_size: int) -> Iterator[int]:
    """:func:`chunk_cuts`, one at a time: a member's size is its header's word, and a tar
    claiming more than it holds must fail at its end, not list the cuts of the claim first."""
    pos = 0
    while pos < size:
        step = head_size if pos == 0 and 0 < head_size < chunk_size else chunk_size
        cut = min(step, size - pos)
        yield cut
        pos += cut


class LayerResult(msgspec.Struct):
    """What a writer produced: enough to write the OCI descriptor and the config diff_id."""

    digest: str
    size: int
    diff_id: str
    media_type: str
    annotations: dict[str, str]
    toc_digest: str
    entries: int
    #: zstd:chunked: why the layer has no tar-split (containers/storage could not accept one
    #: for it, and pulls it whole); empty when it has one.
    no_tar_split: str = ""


class FrameWriter:
    """Writes frames to ``dst``, hashing the compressed output (the blob digest) and the
    uncompressed input (the diff_id) as it goes.  ``compress`` turns plain bytes into one
    self-contained frame."""

    def __init__(self, dst: BinaryIO, compress: Callable[[bytes], bytes]) -> None:
        self.dst = dst
        self.compress = compress
        self.pos = 0
        self.plain = 0
        self.sha = hashlib.sha256()
        self.diff = hashlib.sha256()

    def frame(self, plain: bytes) -> None:
        self.diff.update(plain)
        self.plain += len(plain)
        self.raw(self.compress(plain))

    def raw(self, data: bytes) -> None:
        """Bytes that are not part of the tar stream (skippable frames, footers)."""
        self.dst.write(data)
        self.sha.update(data)
        self.pos += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.diff.hexdigest()


def frame_tar(
    reader: TarReader,
    out: FrameWriter,
    chunk_size: int,
    *,
    keep_trailer: bool,
    head_size: int = DEFAULT_HEAD_SIZE,
    check: Callable[[Member], None] | None = None,
    split: TarSplitWriter | None = None,
) -> list[Entry]:
    """Frame every member of ``reader`` onto ``out``; return the TOC entries (content chunks
    filled in).  ``keep_trailer``: also emit the end-of-archive blocks (zstd:chunked keeps the
    exact source tar; eStargz appends its TOC member and its own end instead).  ``split``
    records the tar-split entries of the stream as it goes (zstd:chunked).  ``head_size``:
    see :func:`chunk_cuts`."""
    chunk_cuts(0, chunk_size, head_size)  # checks the sizes before anything is written
    entries: list[Entry] = []
    meta = bytearray()  # headers and padding waiting for the next metadata frame

    def flush_meta() -> None:
        if meta:
            out.frame(bytes(meta))
            meta.clear()

    for member in reader:
        if check is not None:
            check(member)
        meta += member.header
        if split is not None:
            split.header(member.header)
        entry = member.entry
        if member.size and entry.type == "reg":
            flush_meta()
            chunks: list[Chunk] = []
            file_sha = hashlib.sha256()
            pos = 0
            for cut in _cuts(member.size, chunk_size, head_size):  # checked above
                data = reader.read(cut)
                file_sha.update(data)
                if split is not None:
                    split.content(data)
                start = out.pos
                out.frame(data)
                chunks.append(
                    Chunk(
                        file_offset=pos,
                        size=len(data),
                        offset=start,
                        end=out.pos,
                        digest="sha256:" + hashlib.sha256(data).hexdigest(),
                        # A hole: readers make it up instead of fetching it.
                        zeros=data == bytes(len(data)),
                    )
                )
                pos += len(data)
            entry.digest = "sha256:" + file_sha.hexdigest()
            entry.chunks = tuple(chunks)
        elif member.size:
            # Content on a non-regular member (rare): keep it in the stream, not in the TOC.
            while data := reader.read(1 << 20):
                meta += data
                if split is not None:
                    split.content(data)
        padding = reader.take_padding()
        meta += padding
        if split is not None:
            split.end_member(member.tar, member.size, padding)
        entries.append(entry)
    if keep_trailer:
        meta += reader.trailer
    flush_meta()
    return entries
