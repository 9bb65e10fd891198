"""zstd:chunked, as containers/storage writes it.

Layout of a blob::

    [zstd frame: tar headers (+ padding of the previous member)]
    [zstd frame: chunk 0 of file A] [zstd frame: chunk 1 of file A] ...
    [zstd frame: padding + next headers] ...
    [zstd frame: end-of-archive blocks]
    [skippable frame: zstd-compressed TOC JSON]
    [skippable frame: 64-byte footer]

Skippable frames are ignored by every zstd decoder, so ``zstd -dc blob`` gives back the exact
source tar.  Footer (little-endian u64s): TOC offset, compressed length, uncompressed length,
manifest type (1 = TOC), tar-split offset, compressed and uncompressed length, then the magic
``GNUlInUx``.  The older 40-byte footer stops after the manifest type and ends in ``GnUlInUx``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import BinaryIO

import msgspec
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError
from lazyfs.formats.tarstream import TarReader
from lazyfs.formats.toc import Chunk, Entry, encode_toc

MAGIC = b"GNUlInUx"
MAGIC_OLD = b"GnUlInUx"
FOOTER_SIZE = 64
FOOTER_SIZE_OLD = 40
MANIFEST_TYPE_TOC = 1
SKIPPABLE_MAGIC = 0x184D2A50
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
LEVEL = 3


class Footer(msgspec.Struct, frozen=True):
    offset: int
    length: int
    length_uncompressed: int
    manifest_type: int
    tarsplit_offset: int = 0
    tarsplit_length: int = 0
    tarsplit_length_uncompressed: int = 0


def skippable_frame(payload: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(payload)) + payload


def encode_footer(f: Footer) -> bytes:
    return (
        struct.pack(
            "<7Q",
            f.offset,
            f.length,
            f.length_uncompressed,
            f.manifest_type,
            f.tarsplit_offset,
            f.tarsplit_length,
            f.tarsplit_length_uncompressed,
        )
        + MAGIC
    )


def parse_footer(tail: bytes) -> Footer | None:
    """Parse the footer from the last bytes of a blob; None if it is not zstd:chunked."""
    if len(tail) >= FOOTER_SIZE and tail[-8:] == MAGIC:
        return Footer(*struct.unpack("<7Q", tail[-FOOTER_SIZE:-8]))
    if len(tail) >= FOOTER_SIZE_OLD and tail[-8:] == MAGIC_OLD:
        return Footer(*struct.unpack("<4Q", tail[-FOOTER_SIZE_OLD:-8]))
    return None


def parse_position(value: str) -> Footer:
    """The ``manifest-position`` annotation: ``offset:length:lengthUncompressed:type``."""
    try:
        parts = [int(p) for p in value.split(":")]
    except ValueError as e:
        raise FormatError(f"bad zstd:chunked manifest-position {value!r}") from e
    if len(parts) != 4 or min(parts) < 0:
        raise FormatError(f"bad zstd:chunked manifest-position {value!r}")
    return Footer(*parts)


class LayerResult(msgspec.Struct):
    """What a writer produced: enough to write the OCI descriptor and the config diff_id."""

    digest: str
    size: int
    diff_id: str
    media_type: str
    annotations: dict[str, str]
    toc_digest: str
    entries: int


class _Out:
    """Counts, hashes and writes output bytes."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.pos = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.dst.write(data)
        self.sha.update(data)
        self.pos += len(data)


def write_layer(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    where: str = "layer",
) -> LayerResult:
    """Recompress the uncompressed tar stream ``src`` into zstd:chunked on ``dst``.

    Memory is bounded by ``chunk_size`` plus the TOC: file content is streamed chunk by chunk.
    """
    if chunk_size <= 0:
        raise FormatError("chunk size must be positive")
    out = _Out(dst)
    # One multi-threaded compressor for big chunks (both cores) and a plain one for headers;
    # zstd's multi-threaded output does not depend on the worker count, so digests are stable.
    big = zstandard.ZstdCompressor(level=LEVEL, threads=2, write_content_size=True)
    small = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    diff = hashlib.sha256()
    reader = TarReader(src, where=where)
    entries: list[Entry] = []
    meta = bytearray()  # headers and padding waiting for the next metadata frame

    def flush_meta() -> None:
        if meta:
            out.write(small.compress(bytes(meta)))
            meta.clear()

    for member in reader:
        diff.update(member.header)
        meta += member.header
        entry = member.entry
        if member.size and entry.type == "reg":
            flush_meta()
            chunks: list[Chunk] = []
            file_sha = hashlib.sha256()
            pos = 0
            while pos < member.size:
                data = reader.read(min(chunk_size, member.size - pos))
                diff.update(data)
                file_sha.update(data)
                start = out.pos
                comp = big if len(data) >= (1 << 20) else small
                out.write(comp.compress(data))
                chunks.append(
                    Chunk(
                        file_offset=pos,
                        size=len(data),
                        offset=start,
                        end=out.pos,
                        digest="sha256:" + hashlib.sha256(data).hexdigest(),
                        zeros=data == bytes(len(data)),
                    )
                )
                pos += len(data)
            entry.digest = "sha256:" + file_sha.hexdigest()
            entry.chunks = tuple(chunks)
        elif member.size:
            # Content on a non-regular member (rare): keep it in the stream, not in the TOC.
            while data := reader.read(1 << 20):
                diff.update(data)
                meta += data
        pad = reader.take_padding()
        diff.update(pad)
        meta += pad
        entries.append(entry)
    diff.update(reader.trailer)
    meta += reader.trailer
    flush_meta()

    toc_json = encode_toc(entries, flavour="zstd:chunked")
    toc_comp = small.compress(toc_json)
    out.write(struct.pack("<II", SKIPPABLE_MAGIC, len(toc_comp)))
    toc_offset = out.pos
    out.write(toc_comp)
    footer = Footer(toc_offset, len(toc_comp), len(toc_json), MANIFEST_TYPE_TOC)
    out.write(skippable_frame(encode_footer(footer)))
    toc_digest = oci.sha256_digest(toc_comp)
    position = f"{toc_offset}:{len(toc_comp)}:{len(toc_json)}:{MANIFEST_TYPE_TOC}"
    return LayerResult(
        digest="sha256:" + out.sha.hexdigest(),
        size=out.pos,
        diff_id="sha256:" + diff.hexdigest(),
        media_type=oci.MT_LAYER_ZSTD,
        annotations={oci.ANN_ZSTD_CHECKSUM: toc_digest, oci.ANN_ZSTD_POSITION: position},
        toc_digest=toc_digest,
        entries=len(entries),
    )
