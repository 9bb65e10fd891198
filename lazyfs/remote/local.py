"""Local byte sources: an OCI image layout directory and a single layer blob file.

File reads run in a worker thread (``trio.to_thread``) so a slow disk never stalls the FUSE loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from lazyfs import oci
from lazyfs.errors import NotFoundError, RemoteError
from lazyfs.remote.base import STREAM_PIECE, Sink, Source


def _read_span(path: Path, start: int, end: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as e:
        raise RemoteError(f"cannot read {path}: {e}") from e
    if end is not None and len(data) != end - start:
        raise RemoteError(f"{path}: bytes {start}-{end} past the end ({start + len(data)})")
    return data


async def _stream_file(path: Path, start: int, end: int, sink: Sink) -> None:
    if start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end})")
    for pos in range(start, end, STREAM_PIECE):
        await sink(
            await trio.to_thread.run_sync(_read_span, path, pos, min(end, pos + STREAM_PIECE))
        )


class OCILayoutSource(Source):
    """An OCI image layout: ``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.name = f"oci:{self.root}"
        if not (self.root / "index.json").is_file():
            raise NotFoundError(f"{self.root} is not an OCI image layout (no index.json)")

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / oci.check_digest(digest)

    async def _index(self) -> oci.Index:
        data = await trio.to_thread.run_sync(_read_span, self.root / "index.json", 0, None)
        return oci.decode_index(data)

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        if ref.startswith("sha256:"):
            data = await self.get_blob(ref)
            return data, oci.sniff_media_type(data), ref
        index = await self._index()
        named = [d for d in index.manifests if (d.annotations or {}).get(oci.ANN_REF_NAME) == ref]
        if not named and ref in ("", "latest") and len(index.manifests) == 1:
            named = index.manifests  # an unnamed single image is what "latest" means here
        if not named:
            tags = sorted(
                t for d in index.manifests if (t := (d.annotations or {}).get(oci.ANN_REF_NAME))
            )
            raise NotFoundError(
                f"no manifest tagged {ref!r} in {self.root} (tags: {', '.join(tags) or 'none'})"
            )
        desc = named[0]
        data = await self.get_blob(desc.digest)
        return data, oci.sniff_media_type(data, desc.mediaType), desc.digest

    async def get_blob(self, digest: str) -> bytes:
        data = await trio.to_thread.run_sync(_read_span, self._blob_path(digest), 0, None)
        return oci.verify(data, digest)

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        return await trio.to_thread.run_sync(_read_span, self._blob_path(digest), start, end)

    async def stream_range(self, digest: str, start: int, end: int, sink: Sink) -> None:
        await _stream_file(self._blob_path(digest), start, end, sink)

    def multirange(self, digest: str) -> bool:
        return True  # scattered reads of a local file cost no round trips


class BlobFileSource(Source):
    """One layer blob in a plain file, e.g. ``lazyfs inspect layer.tar.gz``.  Any digest asks
    for this file unless ``digest`` is given, in which case others are NotFound."""

    def __init__(self, path: str | os.PathLike[str], digest: str | None = None) -> None:
        self.path = Path(path)
        self.digest = digest
        self.name = f"file:{self.path}"
        if digest is not None:
            oci.check_digest(digest)

    def _check(self, digest: str) -> None:
        if self.digest is not None and digest != self.digest:
            raise NotFoundError(f"{self.path} holds {self.digest}, not {digest}")

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        raise NotFoundError(f"{self.path} is a single blob: it has no manifest ({ref})")

    async def get_blob(self, digest: str) -> bytes:
        self._check(digest)
        data = await trio.to_thread.run_sync(_read_span, self.path, 0, None)
        return oci.verify(data, digest)

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        self._check(digest)
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        return await trio.to_thread.run_sync(_read_span, self.path, start, end)

    async def stream_range(self, digest: str, start: int, end: int, sink: Sink) -> None:
        self._check(digest)
        await _stream_file(self.path, start, end, sink)

    def multirange(self, digest: str) -> bool:
        return True  # scattered reads of a local file cost no round trips
