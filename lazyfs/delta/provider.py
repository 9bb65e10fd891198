"""Chunks made from binary patches: the store's chunk provider for an image with deltas.

When the store lacks a chunk of a file that the image's delta index has a patch for, and the
cache holds every chunk of the patch's base file, the provider fetches that one patch (a range
of the patches blob, in a fetch slot at the reader's priority, once per file however many
readers ask), applies it bounded by the file's size, checks the result against the file's
digest and returns all of the file's chunks; the store checks each against its chunk digest
before caching or serving it.  Anything else (no patch, a base not held, a patch that is
corrupt, truncated, for another base or inflates too far) leaves the chunks to the network
and counts a fallback in the layer's stats.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

import trio

from lazyfs.delta.patch import (
    DELTAS_ARTIFACT_TYPE,
    MAX_PATCH_FILE,
    DeltaIndex,
    FilePatch,
    apply_patch,
    decode_index,
)
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.formats.toc import Chunk, Entry
from lazyfs.opener import OpenedImage
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import find_artifact
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.layerstate import Layer

log = logging.getLogger(__name__)

#: How long opening an image waits for the registry to say whether it has deltas.
FIND_DELTAS_TIMEOUT = 10.0


class _File:
    """One file's patch being applied: readers of any of its chunks wait on the same one."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.chunks: dict[str, bytes] = {}


class DeltaProvider:
    def __init__(self, index: DeltaIndex, source: Source, cache: ChunkCache) -> None:
        self.index = index
        self.source = source
        self.cache = cache
        self._patches = index.by_digest()
        self._entries: dict[str, Entry] = {}  # new chunk digest -> a file patched to make it
        self._files: dict[str, _File] = {}
        self._failed: set[str] = set()  # file digests that fell back: chunks from now on

    def add_layer(self, layer: Layer) -> None:
        for e in layer.toc.entries:
            if e.type == "reg" and e.digest in self._patches and e.size <= MAX_PATCH_FILE:
                for c in e.chunks:
                    if not c.zeros:
                        self._entries.setdefault(c.digest, e)

    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        files: dict[str, Entry] = {}
        for c in chunks:
            e = self._entries.get(c.digest)
            if e is not None and e.digest not in self._failed:
                files.setdefault(e.digest, e)
        out: dict[str, bytes] = {}
        for e in files.values():
            out.update(await self._file(layer, e, slot))
        return out

    async def _file(
        self,
        layer: Layer,
        entry: Entry,
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        f = self._files.get(entry.digest)
        if f is not None:
            await f.done.wait()
            return f.chunks
        f = self._files[entry.digest] = _File()
        try:
            f.chunks = await self._make(layer, entry, self._patches[entry.digest], slot)
        except (LazyfsError, OSError) as e:
            log.info("patch for %s (%s) not used: %s", entry.name, entry.digest, e)
            self._failed.add(entry.digest)
            layer.stats.patch_fallbacks += 1
        finally:
            f.done.set()
            del self._files[entry.digest]  # made chunks are cached; a failure is remembered
        return f.chunks

    async def _make(
        self,
        layer: Layer,
        entry: Entry,
        fp: FilePatch,
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        if fp.size != entry.size:
            raise FormatError(f"the index says {fp.size} bytes, the TOC {entry.size}")
        if not all(not c.digest or c.digest in self.cache for c in fp.base_chunks):
            raise FormatError(f"base {fp.base_digest} is not held")
        async with slot():
            patch = await self.source.read_range(
                self.index.patches.digest, fp.offset, fp.offset + fp.length
            )
        layer.stats.patch_bytes += len(patch)
        if len(patch) != fp.length:
            raise IntegrityError(f"patch: got {len(patch)} of {fp.length} bytes")
        return await trio.to_thread.run_sync(self._apply, entry, fp, patch)

    def _apply(self, entry: Entry, fp: FilePatch, patch: bytes) -> dict[str, bytes]:
        parts: list[bytes] = []
        for bc in fp.base_chunks:
            if not bc.digest:
                parts.append(bytes(bc.size))
                continue
            data = self.cache.read(bc.digest, bc.size)
            if data is None:
                raise FormatError(f"base chunk {bc.digest} is no longer cached")
            parts.append(data)
        base = b"".join(parts)
        del parts
        if "sha256:" + hashlib.sha256(base).hexdigest() != fp.base_digest:
            raise IntegrityError(f"base content is not {fp.base_digest}")
        new = apply_patch(base, patch, entry.size)
        if entry.digest and "sha256:" + hashlib.sha256(new).hexdigest() != entry.digest:
            raise IntegrityError(f"patched content is not {entry.digest}")
        return {
            c.digest: new[c.file_offset : c.file_offset + c.size]
            for c in entry.chunks
            if not c.zeros
        }


async def find_deltas(source: Source, manifest: str, cache: ChunkCache) -> DeltaIndex | None:
    """The newest delta index stored beside ``manifest`` whose base this node holds (at
    least one patched file's base wholly cached), or None."""

    def check(data: bytes) -> None:
        index = decode_index(data, "stored delta index")
        if index.manifest != manifest:
            raise FormatError("the deltas are for another manifest")
        if not any(
            all(not c.digest or c.digest in cache for c in f.base_chunks) for f in index.files
        ):
            raise FormatError(f"this node holds none of the bases (image {index.base_manifest})")

    data = await find_artifact(source, manifest, DELTAS_ARTIFACT_TYPE, check)
    return None if data is None else decode_index(data, "stored delta index")


class PendingDeltas:
    """The store's provider while the registry is asked whether the image has deltas: a
    reader that misses the cache waits for the answer (bounded), then uses the patches or
    the network.  Mounts install it before they are ready and look after, so readiness and
    cache hits never wait for the lookup."""

    def __init__(self, img: OpenedImage) -> None:
        self.img = img
        self.done = trio.Event()
        self.provider: DeltaProvider | None = None

    async def look(self) -> DeltaProvider | None:
        try:
            self.provider = await _find_provider(self.img)
        finally:
            self.done.set()
            if self.img.store.provider is self:
                self.img.store.provider = self.provider
        return self.provider

    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        await self.done.wait()
        if self.provider is None:
            return {}
        return await self.provider.provide(layer, chunks, slot)


def pending_deltas(img: OpenedImage) -> PendingDeltas | None:
    """Install a :class:`PendingDeltas` in ``img``'s store when some chunk is missing (a warm
    node asks the registry nothing); the caller runs its ``look()``."""
    if all(layer.stats.chunks_ready == layer.stats.chunks_total for layer in img.unique_layers()):
        return None
    pending = PendingDeltas(img)
    img.store.provider = pending
    return pending


async def attach_deltas(img: OpenedImage) -> DeltaProvider | None:
    """Look for deltas beside ``img`` now and make its store use them (``lazyfs pull``)."""
    pending = pending_deltas(img)
    return None if pending is None else await pending.look()


async def _find_provider(img: OpenedImage) -> DeltaProvider | None:
    """Bounded in time; never raises for a registry that has no deltas or answers badly."""
    try:
        with trio.move_on_after(FIND_DELTAS_TIMEOUT):
            index = await find_deltas(img.source, img.manifest, img.cache)
            if index is None:
                return None
            provider = DeltaProvider(index, img.source, img.cache)
            for layer in img.unique_layers():
                provider.add_layer(layer)
            log.info(
                "using %d patches against %s for %s",
                len(index.files),
                index.base_manifest,
                img.manifest,
            )
            return provider
    except LazyfsError as e:
        log.info("no usable deltas in the registry: %s", e)
    return None
