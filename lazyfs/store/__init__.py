"""The layer store: verified chunk cache, per-layer readiness maps, prioritised fetcher.

Names are imported on first use: a command that only needs the cache's constants (the CLI's
``--help``, ``lazyfs cache du``) must not pay for trio and the fetcher at start-up."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazyfs.store.chunkcache import (
        DEFAULT_MAX_BYTES,
        CacheUsage,
        ChunkCache,
        PruneResult,
        default_cache_dir,
    )
    from lazyfs.store.chunkmap import ChunkMap, layer_chunks
    from lazyfs.store.layerstate import Layer
    from lazyfs.store.layerstore import LayerStore, ProgressCallback
    from lazyfs.store.slots import BACKGROUND, ONDEMAND, PREFETCH
    from lazyfs.store.stats import LATENCY_BUCKETS, LayerStats

_WHERE = {
    "DEFAULT_MAX_BYTES": "chunkcache",
    "CacheUsage": "chunkcache",
    "ChunkCache": "chunkcache",
    "PruneResult": "chunkcache",
    "default_cache_dir": "chunkcache",
    "ChunkMap": "chunkmap",
    "layer_chunks": "chunkmap",
    "Layer": "layerstate",
    "LayerStore": "layerstore",
    "ProgressCallback": "layerstore",
    "BACKGROUND": "slots",
    "ONDEMAND": "slots",
    "PREFETCH": "slots",
    "LATENCY_BUCKETS": "stats",
    "LayerStats": "stats",
}

__all__ = [
    "BACKGROUND",
    "DEFAULT_MAX_BYTES",
    "LATENCY_BUCKETS",
    "ONDEMAND",
    "PREFETCH",
    "CacheUsage",
    "ChunkCache",
    "ChunkMap",
    "Layer",
    "LayerStats",
    "LayerStore",
    "ProgressCallback",
    "PruneResult",
    "default_cache_dir",
    "layer_chunks",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
