"""eStargz (and legacy stargz): a gzip stream of many members, each file chunk its own member.

Layout of a blob::

    [gzip member: tar headers (+ padding of the previous member)]
    [gzip member: chunk 0 of file A] ...
    [gzip member: tar header of ``stargz.index.json`` + TOC JSON + end-of-archive]
    [51-byte footer: an empty gzip member whose header's extra field holds the TOC offset]

The footer's extra field is the subfield ``SG`` carrying ``%016xSTARGZ`` (the TOC offset in
hex); the legacy 47-byte stargz footer has the same 22 bytes as a bare extra field.  The layer
annotation ``containerd.io/snapshot/stargz/toc.digest`` is the sha256 of the TOC JSON.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from typing import BinaryIO

from lazyfs import oci
from lazyfs.errors import FormatError
from lazyfs.formats.chunkio import inflate_whole
from lazyfs.formats.framing import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_HEAD_SIZE,
    FrameWriter,
    LayerResult,
    frame_tar,
)
from lazyfs.formats.tarstream import BLOCK, Member, TarReader
from lazyfs.formats.toc import MAX_TOC_BYTES, encode_toc

FOOTER_SIZE = 51
FOOTER_SIZE_LEGACY = 47
TOC_NAME = "stargz.index.json"
# Files the eStargz writer may add at the root; they are not part of the image's tree.
PREFETCH_LANDMARK = ".prefetch.landmark"  # ends the prefetch region of a layer
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"  # first in a layer with nothing to prefetch
LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENT = b"\x0f"  # one byte, as ctr-remote writes it
RESERVED_NAMES = frozenset({TOC_NAME, *LANDMARKS})
LEVEL = 6


def _gzip_member(data: bytes, level: int = LEVEL, extra: bytes | None = None) -> bytes:
    # Hand-built header: fixed mtime 0 and OS 255 so output is byte-for-byte deterministic.
    flags = 0x04 if extra is not None else 0
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0\0\xff"
    if extra is not None:
        header += struct.pack("<H", len(extra)) + extra
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    body = comp.compress(data) + comp.flush()
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + body + trailer


def encode_footer(toc_offset: int) -> bytes:
    payload = b"%016xSTARGZ" % toc_offset
    return _gzip_member(b"", level=0, extra=b"SG" + struct.pack("<H", len(payload)) + payload)


def parse_footer(tail: bytes) -> tuple[int, int] | None:
    """``(toc_offset, footer_size)`` from the last bytes of a blob, or None."""
    for size, extra_len, skip in ((FOOTER_SIZE, 26, 4), (FOOTER_SIZE_LEGACY, 22, 0)):
        if len(tail) < size:
            continue
        f = tail[-size:]
        if f[:4] != b"\x1f\x8b\x08\x04" or struct.unpack("<H", f[10:12])[0] != extra_len:
            continue
        extra = f[12 : 12 + extra_len]
        if skip and (extra[:2] != b"SG" or struct.unpack("<H", extra[2:4])[0] != 22):
            continue
        payload = extra[skip:]
        if payload[16:] != b"STARGZ":
            continue
        try:
            return int(payload[:16], 16), size
        except ValueError:
            continue
    return None


def extract_toc_json(member: bytes) -> bytes:
    """The TOC JSON from the gzip-compressed tar that holds ``stargz.index.json``."""
    # The tar around the JSON adds a header, padding and the end-of-archive blocks.
    plain = inflate_whole("gzip", member, MAX_TOC_BYTES + 4 * BLOCK, "eStargz TOC")
    try:
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tf:
            for info in tf:
                if info.name == TOC_NAME and info.isfile():
                    f = tf.extractfile(info)
                    if f is not None:
                        return f.read()
    except tarfile.TarError as e:
        raise FormatError(f"eStargz TOC tar is malformed: {e}") from e
    raise FormatError(f"eStargz TOC has no {TOC_NAME}")


def write_layer(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_size: int = DEFAULT_HEAD_SIZE,
    where: str = "layer",
    landmarks: bool = False,
) -> LayerResult:
    """Recompress the uncompressed tar stream ``src`` into eStargz on ``dst``.

    The tar stream changes (the TOC becomes its last member), so the diff_id is recomputed.
    ``landmarks``: ``src`` was reordered for prefetch and carries a (no-)prefetch landmark.
    ``chunk_size``, ``head_size``: how files are cut (framing.chunk_cuts).
    """

    def check(member: Member) -> None:
        name = member.entry.name
        if name in RESERVED_NAMES and not (landmarks and name in LANDMARKS):
            raise FormatError(f"{where}: source layer already contains {name!r}")

    out = FrameWriter(dst, _gzip_member)
    reader = TarReader(src, where=where)
    entries = frame_tar(
        reader, out, chunk_size, keep_trailer=False, head_size=head_size, check=check
    )

    toc_json = encode_toc(entries, flavour="estargz")
    info = tarfile.TarInfo(TOC_NAME)
    info.size = len(toc_json)
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    toc_tar = (
        info.tobuf(format=tarfile.USTAR_FORMAT)
        + toc_json
        + bytes(-len(toc_json) % BLOCK)
        + bytes(2 * BLOCK)
    )
    toc_offset = out.pos
    out.frame(toc_tar)
    out.raw(encode_footer(toc_offset))
    toc_digest = oci.sha256_digest(toc_json)
    return LayerResult(
        digest=out.digest,
        size=out.pos,
        diff_id=out.diff_id,
        media_type=oci.MT_LAYER_GZIP,
        annotations={
            oci.ANN_ESTARGZ_TOC_DIGEST: toc_digest,
            oci.ANN_ESTARGZ_UNCOMPRESSED_SIZE: str(out.plain),
        },
        toc_digest=toc_digest,
        entries=len(entries),
    )
