"""Recognise a lazy layer and decode its TOC: the two-step protocol every reader follows.

1. :func:`locate_toc` looks at the blob's last :data:`TAIL_SIZE` bytes (and the descriptor's
   annotations) and says which format it is and which byte range holds the TOC.
2. :func:`decode_layer_toc` turns those bytes into a validated :class:`~lazyfs.formats.toc.TOC`
   after checking them against the digest the manifest promised, when it promised one.

No I/O here: the caller fetches the two ranges through whatever source it has.
"""

from __future__ import annotations

import gzip
from collections.abc import Collection
from typing import BinaryIO, Literal, TypedDict

import msgspec
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.formats import estargz, zstdchunked
from lazyfs.formats.chunkio import inflate_whole
from lazyfs.formats.toc import (
    MAX_TOC_BYTES,
    TOC,
    Compression,
    Steps,
    TocBudget,
    decode_toc,
    decode_toc_table,
    decode_toc_table_steps,
)

TAIL_SIZE = 64  # the largest footer of any supported format

# "tar": a layer without a TOC, fetched whole and indexed locally (lazyfs.store.wholelayer).
LayerFormat = Literal["estargz", "zstd:chunked", "tar"]


class TocLocation(msgspec.Struct, frozen=True):
    format: LayerFormat
    start: int  # TOC bytes are blob[start:end]
    end: int
    data_end: int  # file content never reaches past this
    expected_digest: str | None  # from the manifest annotations, if any
    uncompressed_size: int = 0  # zstd:chunked only


def expected_toc_digest(annotations: dict[str, str] | None, fmt: LayerFormat) -> str | None:
    """The TOC digest the manifest promises for a layer of format ``fmt``, if any."""
    ann = annotations or {}
    if fmt == "zstd:chunked":
        return ann.get(oci.ANN_ZSTD_CHECKSUM) or ann.get(oci.ANN_ZSTD_CHECKSUM_OLD)
    return ann.get(oci.ANN_ESTARGZ_TOC_DIGEST)


def tail_start_hint(annotations: dict[str, str] | None, blob_size: int, guess: int) -> int:
    """Where to start reading so that one request brings the footer and the TOC: exactly the
    TOC's start when the manifest gives zstd:chunked's position, else ``guess`` bytes from the
    end (most TOCs are smaller)."""
    ann = annotations or {}
    position = ann.get(oci.ANN_ZSTD_POSITION) or ann.get(oci.ANN_ZSTD_POSITION_OLD)
    if position:
        try:
            start = zstdchunked.parse_position(position).offset
        except FormatError:
            start = -1
        if 0 <= start < blob_size and blob_size - start <= MAX_TOC_BYTES:  # bounded read
            return start
    return max(0, blob_size - guess)


def toc_by_annotations(annotations: dict[str, str] | None, blob_size: int) -> TocLocation | None:
    """The zstd:chunked TOC's range from the manifest alone, when it gives both the TOC's
    position and its digest (the digest vouches for the bytes, so no footer is needed), else
    None.  Reading just that range leaves out the tar-split and footer after it, which a mount
    never uses."""
    ann = annotations or {}
    position = ann.get(oci.ANN_ZSTD_POSITION) or ann.get(oci.ANN_ZSTD_POSITION_OLD)
    checksum = expected_toc_digest(ann, "zstd:chunked")
    if not position or not checksum:
        return None
    try:
        p = zstdchunked.parse_position(position)
        if p.manifest_type != zstdchunked.MANIFEST_TYPE_TOC or p.offset < 8:
            return None
        loc = TocLocation(
            "zstd:chunked", p.offset, p.offset + p.length, p.offset - 8, checksum,
            p.length_uncompressed,
        )  # fmt: skip
        return _checked(loc, blob_size)
    except FormatError:
        return None  # the footer decides


def locate_toc(tail: bytes, blob_size: int, annotations: dict[str, str] | None) -> TocLocation:
    """Identify the format from the footer; raise FormatError if the blob is not lazy."""
    ann = annotations or {}
    zf = zstdchunked.parse_footer(tail)
    if zf is not None:
        checksum = expected_toc_digest(ann, "zstd:chunked")
        if zf.manifest_type != zstdchunked.MANIFEST_TYPE_TOC:
            raise FormatError(f"zstd:chunked manifest type {zf.manifest_type} is not a TOC")
        return _checked(
            TocLocation(
                "zstd:chunked",
                zf.offset,
                zf.offset + zf.length,
                zf.offset - 8,
                checksum,
                zf.length_uncompressed,
            ),
            blob_size,
        )
    ef = estargz.parse_footer(tail)
    if ef is not None:
        offset, footer_size = ef
        return _checked(
            TocLocation(
                "estargz",
                offset,
                blob_size - footer_size,
                offset,
                expected_toc_digest(ann, "estargz"),
            ),
            blob_size,
        )
    raise FormatError("not a lazy layer: no eStargz or zstd:chunked footer")


def _checked(loc: TocLocation, blob_size: int) -> TocLocation:
    if not (0 <= loc.data_end <= loc.start < loc.end <= blob_size):
        raise FormatError(
            f"TOC range {loc.start}..{loc.end} lies outside the {blob_size}-byte blob"
        )
    if loc.end - loc.start > MAX_TOC_BYTES or loc.uncompressed_size > MAX_TOC_BYTES:
        raise FormatError(f"TOC of {loc.end - loc.start} bytes is over the size cap")
    return loc


def toc_json(loc: TocLocation, raw: bytes) -> bytes:
    """Check ``raw`` (the TOC range) against the promised digest; return the TOC JSON."""
    if loc.format == "zstd:chunked":
        # zstd:chunked's digest covers the compressed frame: checked before inflating it.
        if loc.expected_digest:
            _verify(raw, loc.expected_digest)
        # Bounded whatever size the frame declares (a 3 GiB claim allocates nothing).
        limit = loc.uncompressed_size or MAX_TOC_BYTES
        try:
            return inflate_whole("zstd", raw, limit, "zstd:chunked TOC")
        except IntegrityError as e:
            if loc.expected_digest:  # the bytes are the promised ones: the image is bad
                raise FormatError(str(e)) from None
            raise
    # eStargz's digest covers the TOC JSON, so it can only be checked after inflating, which
    # extract_toc_json bounds.
    data = estargz.extract_toc_json(raw)
    if loc.expected_digest:
        _verify(data, loc.expected_digest)
    return data


def decode_layer_toc(loc: TocLocation, raw: bytes, budget: TocBudget | None = None) -> TOC:
    # In a list: freed in the decode (see decode_toc).
    return decode_toc([toc_json(loc, raw)], **_decode_options(loc), budget=budget)


def decode_layer_table(
    loc: TocLocation, raw: bytes, budget: TocBudget | None = None
) -> tuple[bytes, TOC]:
    """:func:`decode_layer_toc` with its entries an EntryTable, and their packed bytes (what
    a mount keeps, and keeps in its TOC cache): see :func:`decode_toc_table`."""
    return decode_toc_table([toc_json(loc, raw)], **_decode_options(loc), budget=budget)


def decode_layer_table_steps(
    loc: TocLocation, raw: bytes, budget: TocBudget
) -> Steps[tuple[bytes, TOC]]:
    """:func:`decode_layer_table` in steps (see :func:`~lazyfs.formats.toc.run_steps`): the
    TOC checked and inflated, then :func:`~lazyfs.formats.toc.decode_toc_table_steps`; the
    caller holds ``budget.decoding`` throughout."""
    json = toc_json(loc, raw)
    del raw
    yield
    return (yield from decode_toc_table_steps([json], **_decode_options(loc), budget=budget))


class _DecodeOptions(TypedDict):
    compression: Compression
    blob_size: int
    data_end: int
    reserved: Collection[str]
    landmark: str


def _decode_options(loc: TocLocation) -> _DecodeOptions:
    # The writers' own files (eStargz's TOC entry, the prefetch landmarks that ctr-remote adds
    # to both formats) are not part of the image's tree; a landmark's position is kept.
    return _DecodeOptions(
        compression="zstd" if loc.format == "zstd:chunked" else "gzip",
        blob_size=loc.end,
        data_end=loc.data_end,
        reserved=estargz.RESERVED_NAMES,
        landmark=estargz.PREFETCH_LANDMARK,
    )


def _verify(data: bytes, digest: str) -> None:
    try:
        oci.verify(data, digest, "TOC")
    except IntegrityError:
        raise
    except FormatError as e:
        raise IntegrityError(str(e)) from e


def decompressing(f: BinaryIO, media_type: str) -> BinaryIO:
    """A reader of the tar inside a layer blob of ``media_type``."""
    kind = oci.LAYER_TYPES.get(media_type)
    if kind is None:
        raise FormatError(f"unknown layer media type {media_type!r}")
    if kind == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]  # a GzipFile reads as a BinaryIO
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return reader
    return f
