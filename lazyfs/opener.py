"""Open an image: the one place that puts source, chunk cache, TOCs and layer store together.

The mount daemon, ``lazyfs pull``, ``lazyfs trace`` and the snapshotter all open images here,
so every caller gets the same rules: manifests and configs come from the document cache when
their digest is known, TOCs from the TOC cache, and every layer is registered with its blob
size (which a registry that ignores Range needs, or each read downloads the prefix again).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from lazyfs import oci
from lazyfs.formats.layer import TocLocation
from lazyfs.formats.toc import TOC
from lazyfs.remote.base import Source
from lazyfs.remote.registry import RegistrySource, RetryPolicy
from lazyfs.remote.resolve import ResolvedImage, open_source
from lazyfs.store import ChunkCache, Layer, LayerStore
from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES
from lazyfs.store.documents import CachingSource
from lazyfs.store.tocs import load_tocs
from lazyfs.store.wholelayer import WholeFetch, WholeLayers


@dataclass(frozen=True, slots=True)
class OpenedLayer:
    """One manifest layer: its descriptor, its TOC and the store's view of its blob (shared by
    every manifest entry naming the same blob)."""

    descriptor: oci.Descriptor
    location: TocLocation
    toc: TOC
    layer: Layer


@dataclass(frozen=True, slots=True)
class OpenedImage:
    image: str  # as the caller named it
    resolved: ResolvedImage
    layers: list[OpenedLayer]  # manifest order
    source: Source
    cache: ChunkCache
    store: LayerStore
    whole: WholeLayers  # the layers without a TOC, and their downloads

    @property
    def manifest(self) -> str:
        return self.resolved.manifest_digest

    def plain_layers(self) -> list[OpenedLayer]:
        """The layers without a TOC (fetched whole), in manifest order."""
        return [ol for ol in self.layers if ol.descriptor.digest in self.whole.sources]

    def store_layers(self) -> list[Layer]:
        """The store's layers in manifest order (a blob listed twice appears twice)."""
        return [ol.layer for ol in self.layers]

    def unique_layers(self) -> list[Layer]:
        """Each blob once, in order of first appearance."""
        seen: dict[str, Layer] = {}
        for ol in self.layers:
            seen.setdefault(ol.layer.blob_digest, ol.layer)
        return list(seen.values())


@asynccontextmanager
async def open_image(
    image: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size: int = DEFAULT_MAX_BYTES,
    plain_http: bool = False,
    insecure: bool = False,
    platform: str = "linux/amd64",
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | os.PathLike[str] | None = None,
    retry: RetryPolicy | None = None,
    layer_count: int | None = None,
    progress: Callable[[WholeFetch], None] | None = None,
) -> AsyncIterator[OpenedImage]:
    """Resolve ``image`` (a registry reference or ``oci:DIR[:TAG]``) and read every layer's
    TOC; on exit write the readiness maps and close the source.  ``hosts_dir``,
    ``docker_config`` and ``retry`` reach the registry source (mirrors, credentials, how long
    a fetch may take).  ``layer_count``: open only the lowest N layers (``layers`` then holds
    N; ``resolved`` is still the whole image), which is how the snapshotter mounts a chain of
    lazy layers.  ``progress`` hears of each whole-layer download as it starts and ends."""
    source, ref = open_source(
        image,
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
        docker_config=docker_config,
        retry=retry,
    )
    try:
        # The start-up scan stats every cached chunk: keep it off the event loop.
        cache = await trio.to_thread.run_sync(ChunkCache, cache_dir, cache_size)
        if isinstance(source, RegistrySource):
            source.spool_dir = cache.blobs_dir  # blobs a mirror sends whole, downloaded once
        source = CachingSource(source, cache.documents_dir)
        # Layers without a TOC are fetched whole and indexed once; their chunks are read
        # through a source of their own (the local tar).
        whole = WholeLayers(source, cache, progress)
        try:
            tocs = await load_tocs(
                source,
                ref,
                platform=platform,
                toc_dir=cache.tocs_dir,
                whole=whole,
                layer_count=layer_count,
            )
            store = LayerStore(cache)
            try:
                layers = [
                    OpenedLayer(
                        li.descriptor,
                        li.location,
                        li.toc,
                        store.add_layer(
                            li.descriptor.digest,
                            whole.sources.get(li.descriptor.digest, source),
                            li.toc,
                            li.descriptor.size,
                        ),
                    )
                    for li in tocs.layers
                ]
                yield OpenedImage(image, tocs.resolved, layers, source, cache, store, whole)
            finally:
                with trio.CancelScope(shield=True):
                    await store.aclose()  # readiness maps: the next open starts warm
        finally:
            with trio.CancelScope(shield=True):
                await whole.aclose()  # the local tars; their chunks stay in the cache
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
