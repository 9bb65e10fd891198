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
#: How long a reader that misses the cache waits for that answer before fetching chunks.
READER_WAIT = 2.0
#: Read-ahead of patches after an asked-for one, and the gap merged between two (bytes).
PATCH_AMPLIFY = 512 * 1024
PATCH_MERGE_GAP = 64 * 1024


class _File:
    """One file's patch being applied: readers of any of its chunks wait on the same one."""

    def __init__(self, fp: FilePatch, entry: Entry) -> None:
        self.fp = fp
        self.entry = entry
        self.done = trio.Event()
        self.chunks: dict[str, bytes] = {}


class DeltaProvider:
    """Patches are fetched as chunks are: the ones asked for plus, as read-ahead, the patches
    that follow them in the blob (NEW's layer order, so the files a start-up reads next) up to
    ``amplify`` bytes, in as few range requests as neighbours allow."""

    def __init__(
        self,
        index: DeltaIndex,
        source: Source,
        cache: ChunkCache,
        *,
        amplify: int = PATCH_AMPLIFY,
        merge_gap: int = PATCH_MERGE_GAP,
    ) -> None:
        self.index = index
        self.source = source
        self.cache = cache
        self.amplify = amplify
        self.merge_gap = merge_gap
        self._patches = index.by_digest()
        self._order = sorted(index.files, key=lambda f: f.offset)
        self._position = {f.digest: i for i, f in enumerate(self._order)}
        self._entries: dict[str, Entry] = {}  # new chunk digest -> a file patched to make it
        self._file_entries: dict[str, Entry] = {}  # new content digest -> its entry
        self._files: dict[str, _File] = {}
        self._failed: set[str] = set()  # file digests that fell back: chunks from now on

    def add_layer(self, layer: Layer) -> None:
        for e in layer.toc.entries:
            if e.type == "reg" and e.digest in self._patches and e.size <= MAX_PATCH_FILE:
                self._file_entries.setdefault(e.digest, e)
                for c in e.chunks:
                    if not c.zeros:
                        self._entries.setdefault(c.digest, e)

    async def provide(
        self,
        layer: Layer,
        chunks: Sequence[Chunk],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> dict[str, bytes]:
        wanted: dict[str, Entry] = {}
        for c in chunks:
            e = self._entries.get(c.digest)
            if e is not None and e.digest not in self._failed:
                wanted.setdefault(e.digest, e)
        waits: list[_File] = []
        mine: list[_File] = []
        for digest, e in wanted.items():
            f = self._files.get(digest)
            if f is not None:
                waits.append(f)
            elif self._usable(layer, self._patches[digest], e):
                mine.append(self._start(self._patches[digest], e))
        mine += self._neighbours(layer, mine)
        try:
            for group in self._plan(mine):
                await self._fetch(layer, group, slot)
        finally:  # cancelled: whoever waits on the rest fetches chunks instead
            for f in mine:
                if not f.done.is_set():
                    f.done.set()
                    self._files.pop(f.fp.digest, None)
        out: dict[str, bytes] = {}
        for f in waits:
            await f.done.wait()
        for f in (*mine, *waits):
            out.update(f.chunks)
        return out

    def _usable(self, layer: Layer, fp: FilePatch, entry: Entry) -> bool:
        """Whether the patch can be tried: sizes agree and the base is wholly cached."""
        if fp.size == entry.size and all(
            not c.digest or c.digest in self.cache for c in fp.base_chunks
        ):
            return True
        log.info("patch for %s not used: its base %s is not held", entry.name, fp.base_digest)
        self._fallback(layer, fp.digest)
        return False

    def _start(self, fp: FilePatch, entry: Entry) -> _File:
        f = self._files[fp.digest] = _File(fp, entry)
        return f

    def _fallback(self, layer: Layer, digest: str) -> None:
        self._failed.add(digest)
        layer.stats.patch_fallbacks += 1

    def _neighbours(self, layer: Layer, mine: list[_File]) -> list[_File]:
        """Read-ahead: the patches after each asked-for one, up to ``amplify`` bytes, of
        files not cached yet whose base is held."""
        out: list[_File] = []
        for f in list(mine):
            budget = self.amplify
            i = self._position[f.fp.digest] + 1
            while i < len(self._order) and budget > 0:
                fp = self._order[i]
                i += 1
                e = self._file_entries.get(fp.digest)
                if (
                    e is None
                    or fp.digest in self._files
                    or fp.digest in self._failed
                    or fp.length > budget
                    or fp.size != e.size
                    or all(c.zeros or c.digest in self.cache for c in e.chunks)
                    or not all(not c.digest or c.digest in self.cache for c in fp.base_chunks)
                ):
                    continue
                budget -= fp.length
                out.append(self._start(fp, e))
        return out

    def _plan(self, files: list[_File]) -> list[list[_File]]:
        """Patches merged into range requests: neighbours at most ``merge_gap`` apart."""
        groups: list[list[_File]] = []
        end = -1
        for f in sorted(files, key=lambda f: f.fp.offset):
            f_end = f.fp.offset + f.fp.length
            if groups and f.fp.offset - end <= self.merge_gap:
                groups[-1].append(f)
                end = max(end, f_end)
            else:
                groups.append([f])
                end = f_end
        return groups

    async def _fetch(
        self,
        layer: Layer,
        group: list[_File],
        slot: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        """One range request for the group's patches, then each applied; every file ends
        done, made or fallen back."""
        start = group[0].fp.offset
        end = max(f.fp.offset + f.fp.length for f in group)
        results: list[dict[str, bytes] | Exception] = []
        try:
            try:
                async with slot():
                    raw = await self.source.read_range(self.index.patches.digest, start, end)
                layer.stats.patch_bytes += len(raw)
                if len(raw) != end - start:
                    raise IntegrityError(f"patches: got {len(raw)} of {end - start} bytes")
            except (LazyfsError, OSError) as e:
                results = [e] * len(group)
            else:
                results = await trio.to_thread.run_sync(self._apply_all, group, raw, start)
        finally:
            for i, f in enumerate(group):
                result = results[i] if i < len(results) else None
                if isinstance(result, dict):
                    f.chunks = result
                elif result is not None:  # None: cancelled, so neither made nor refused
                    log.info("patch for %s not used: %s", f.entry.name, result)
                    self._fallback(layer, f.fp.digest)
                f.done.set()
                self._files.pop(f.fp.digest, None)  # made chunks are cached; failures remembered

    def _apply_all(
        self, group: list[_File], raw: bytes, start: int
    ) -> list[dict[str, bytes] | Exception]:
        out: list[dict[str, bytes] | Exception] = []
        for f in group:
            lo = f.fp.offset - start
            try:
                out.append(self._apply(f.entry, f.fp, raw[lo : lo + f.fp.length]))
            except (LazyfsError, OSError) as e:
                out.append(e)
        return out

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
    reader that misses the cache waits for the answer (at most ``READER_WAIT``), then uses
    the patches or the network.  Mounts install it before they are ready and look after, so
    readiness and cache hits never wait for the lookup."""

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
        with trio.move_on_after(READER_WAIT):
            await self.done.wait()
        if self.provider is None:  # none, or the registry is slow to say: chunks
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
    except Exception as e:  # deltas only save bytes: nothing here may take a mount down
        log.warning("looking for deltas failed: %s", e)
    return None
