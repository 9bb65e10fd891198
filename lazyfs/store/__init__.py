"""The layer store: verified chunk cache, per-layer readiness maps, prioritised fetcher."""

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
