"""Binary patches between two versions of a file, and the index that lists them.

A patch is one zstd frame compressed with the old content as a *raw-content dictionary*
("patch-from", as ``zstd --patch-from``), long-distance matching on and the window wide
enough to reach all of the old content: unchanged runs anywhere in the old file cost a few
bytes each.  Applying one is bounded by the new file's size, which comes from the verified
TOC, never from the patch: a frame that declares or inflates to more is refused.

The index (``lazyfs.deltas``, JSON) names the image it was made for, the base image, the blob
holding all patches end to end, and per new file content digest: its size, the base file's
digest and chunks (what a node must hold), and the patch's range in that blob, so a node
fetches one file's patch with one range request.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import zstandard

from lazyfs.errors import FormatError, IntegrityError

DELTAS_ARTIFACT_TYPE = "application/vnd.lazyfs.deltas.v1+json"
PATCHES_MEDIA_TYPE = "application/vnd.lazyfs.patches.v1"
#: On the artifact manifest: the manifest digest of the image the patches start from.
ANN_BASE = "dev.lazyfs.delta.base"
DELTAS_KIND = "lazyfs.deltas"
#: Files larger than this are not patched (old and new content are held in memory to apply).
MAX_PATCH_FILE = 256 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
DEFAULT_LEVEL = 19
_MIN_WINDOW_LOG = 10
_MAX_WINDOW_LOG = 31


class BaseChunk(msgspec.Struct, frozen=True, array_like=True):
    digest: str
    size: int


class FilePatch(msgspec.Struct, frozen=True, kw_only=True):
    digest: str  # the new content's sha256 (the TOC's entry digest)
    size: int  # the new content's size
    base_digest: str
    base_size: int
    base_chunks: list[BaseChunk]  # the base content, in file order (holes: digest "")
    offset: int  # the patch's range in the patches blob
    length: int
    path: str = ""  # for people: where NEW has it


class Blob(msgspec.Struct, frozen=True):
    digest: str
    size: int


class DeltaIndex(msgspec.Struct, kw_only=True):
    kind: Literal["lazyfs.deltas"] = "lazyfs.deltas"
    version: int = 1
    manifest: str  # NEW
    base_manifest: str  # OLD
    patches: Blob
    files: list[FilePatch]

    def by_digest(self) -> dict[str, FilePatch]:
        return {f.digest: f for f in self.files}


def window_log(base_size: int, new_size: int) -> int:
    """A window that reaches from the end of the new content back to the start of the base."""
    return max(_MIN_WINDOW_LOG, min(_MAX_WINDOW_LOG, (base_size + new_size).bit_length()))


def make_patch(base: bytes, new: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """``new`` as a zstd frame that needs ``base`` to decode."""
    d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window_log(len(base), len(new)), enable_ldm=True, source_size=len(new)
    )
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new)


def apply_patch(base: bytes, patch: bytes, new_size: int) -> bytes:
    """The new content, exactly ``new_size`` bytes, or IntegrityError: a patch for another
    base, truncated, or that inflates past ``new_size`` (checked as it decodes, so a size
    bomb costs at most ``new_size`` + one piece).  The caller still verifies the digests."""
    if new_size > MAX_PATCH_FILE:
        raise IntegrityError(f"patch target of {new_size} bytes is over the limit")
    try:
        declared = zstandard.frame_content_size(patch)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"not a patch: {e}") from None
    if declared not in (-1, new_size):
        raise IntegrityError(f"patch declares {declared} bytes, the file has {new_size}")
    d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    dctx = zstandard.ZstdDecompressor(
        dict_data=d, max_window_size=1 << window_log(len(base), new_size)
    )
    pieces: list[bytes] = []
    got = 0
    try:
        reader = dctx.stream_reader(patch)
        while got <= new_size:
            piece = reader.read(min(new_size + 1 - got, 1 << 20))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"corrupt patch: {e}") from None
    if got != new_size:
        raise IntegrityError(
            f"patch gives {'more than ' if got > new_size else ''}{got} bytes, "
            f"the file has {new_size}"
        )
    return b"".join(pieces)


def encode_index(index: DeltaIndex) -> bytes:
    return msgspec.json.encode(index)


def decode_index(data: bytes, where: str = "delta index") -> DeltaIndex:
    if len(data) > MAX_INDEX_BYTES:
        raise FormatError(f"{where}: {len(data)} bytes is over the limit")
    try:
        index = msgspec.json.decode(data, type=DeltaIndex)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise FormatError(f"{where}: {e}") from None
    if index.version != 1:
        raise FormatError(f"{where}: version {index.version} is not supported")
    for f in index.files:
        if (
            f.offset < 0
            or f.length <= 0
            or f.offset + f.length > index.patches.size
            or not 0 <= f.size <= MAX_PATCH_FILE
            or sum(c.size for c in f.base_chunks) != f.base_size
        ):
            raise FormatError(f"{where}: bad entry for {f.digest}")
    return index
