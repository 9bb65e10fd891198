"""Prometheus metric families from mount daemons' ``stats`` replies: pure, no I/O.

``lazyfs stats --prometheus`` renders one daemon, the snapshotter's endpoint every daemon it
runs (beside its own counters).  Both hand over the control socket's JSON as it came, so the
names, labels and units are defined here once.  Series are labelled by who the daemon is
(``daemon_labels``: PID and mount point for the CLI, PID and chain for the snapshotter) and,
per layer, by the layer's digest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

NS = 1e-9

# (metric name, LayerStats field, help, scale): counters of one layer, ever increasing.
_LAYER_COUNTERS = (
    ("lazyfs_layer_fetched_bytes", "bytes_fetched",
     "Compressed bytes received for the layer, merge gaps included", 1.0),
    ("lazyfs_layer_requests", "requests", "Range requests sent for the layer", 1.0),
    ("lazyfs_layer_multirange_requests", "multirange_requests",
     "Of those, requests for several ranges at once", 1.0),
    ("lazyfs_layer_overtakes", "overtakes",
     "Requests of readers that would have waited too long behind a stream", 1.0),
    ("lazyfs_layer_reads", "reads", "Reads served from the layer", 1.0),
    ("lazyfs_layer_cache_hits", "cache_hits", "Chunks reads found in the local cache", 1.0),
    ("lazyfs_layer_cache_misses", "cache_misses",
     "Chunks reads had to wait for the network for", 1.0),
    ("lazyfs_layer_read_wait_seconds", "wait_ns", "Time reads spent waiting for the network", NS),
    ("lazyfs_layer_retries", "retries", "Chunk re-fetches after a failed verification", 1.0),
    ("lazyfs_layer_integrity_errors", "integrity_errors", "Chunks that failed verification",
     1.0),
    ("lazyfs_layer_patch_bytes", "patch_bytes", "Binary patch bytes fetched instead of chunks",
     1.0),
    ("lazyfs_layer_patched_chunks", "provided_chunks", "Chunks made from binary patches", 1.0),
    ("lazyfs_layer_patch_fallbacks", "patch_fallbacks",
     "Files whose patch could not be used (fetched as chunks instead)", 1.0),
)  # fmt: skip
# Readiness of one layer (unique chunks that are not holes).
_LAYER_GAUGES = (
    ("lazyfs_layer_size_bytes", "bytes_total", "Uncompressed bytes of the layer's chunks"),
    ("lazyfs_layer_ready_bytes", "bytes_ready", "Of those, bytes in the local cache"),
    ("lazyfs_layer_chunks", "chunks_total", "Chunks of the layer"),
    ("lazyfs_layer_ready_chunks", "chunks_ready", "Of those, chunks in the local cache"),
    ("lazyfs_layer_held_bytes", "bytes_held", "Compressed bytes cached when the image opened"),
    ("lazyfs_layer_unwritten_bytes", "bytes_unwritten",
     "Fetched bytes served from memory that wait for their cache write"),
)
# Prefetch progress (lazyfs.fs.prefetch.PrefetchStats), labelled by group.
_PREFETCH_GAUGES = (
    ("lazyfs_prefetch_entries", "entries", "Entries of the prefetch group this image has"),
    ("lazyfs_prefetch_skipped_entries", "skipped", "Entries of the group this image lacks"),
    ("lazyfs_prefetch_size_bytes", "prefetch_total", "Content bytes the prefetch covers"),
    ("lazyfs_prefetch_done_bytes", "prefetch_bytes", "Of those, bytes fetched or found cached"),
)


@dataclass(frozen=True)
class DaemonStats:
    """One daemon's ``stats`` reply (``StatsReport`` as builtins) and who it is."""

    labels: Mapping[str, str]  # values for every name in the scrape's ``daemon_labels``
    report: Mapping[str, Any]


def latency_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """``LayerStats.latency_log2_us`` as cumulative buckets in seconds: bucket i counts reads
    under 2**i us, and the last one everything slower (+Inf)."""
    out: list[tuple[str, float]] = []
    total = 0
    for i, n in enumerate(counts):
        total += n
        last = i == len(counts) - 1
        out.append(("+Inf" if last else repr(2**i / 1e6), float(total)))
    return out


def daemon_families(daemons: Iterable[DaemonStats], daemon_labels: Sequence[str]) -> list[Metric]:
    """Every family for these daemons; with none, the families are there without samples."""
    names = list(daemon_labels)
    layer_names = [*names, "layer"]
    counters = {
        field: (CounterMetricFamily(name, doc, labels=layer_names), scale)
        for name, field, doc, scale in _LAYER_COUNTERS
    }
    gauges = {
        field: GaugeMetricFamily(name, doc, labels=layer_names)
        for name, field, doc in _LAYER_GAUGES
    }
    latency = HistogramMetricFamily(
        "lazyfs_layer_read_latency_seconds",
        "Time each read took, waits for the network included",
        labels=layer_names,
    )
    info_names = [n for n in ("image", "manifest", "mountpoint") if n not in names]
    info = GaugeMetricFamily(
        "lazyfs_daemon_info", "The image a daemon serves (always 1)", labels=[*names, *info_names]
    )
    rss = GaugeMetricFamily("lazyfs_daemon_resident_bytes", "Resident memory", labels=names)
    files = GaugeMetricFamily("lazyfs_daemon_files", "Inodes of the merged tree", labels=names)
    errors = CounterMetricFamily(
        "lazyfs_daemon_handler_errors",
        "FUSE requests that failed unexpectedly (answered EIO, logged)",
        labels=names,
    )
    group_names = [*names, "group"]
    prefetch = {
        field: GaugeMetricFamily(name, doc, labels=group_names)
        for name, field, doc in _PREFETCH_GAUGES
    }
    prefetch_done = GaugeMetricFamily(
        "lazyfs_prefetch_done", "1 once the prefetch has finished", labels=group_names
    )
    prefetch_failed = GaugeMetricFamily(
        "lazyfs_prefetch_failed", "1 if a prefetch fetch failed (best effort)", labels=group_names
    )
    caches: dict[str, Mapping[str, Any]] = {}

    for d in daemons:
        values = [str(d.labels[n]) for n in names]
        r = d.report
        info.add_metric([*values, *(str(r.get(n, "")) for n in info_names)], 1.0)
        if r.get("rss_bytes"):
            rss.add_metric(values, float(r["rss_bytes"]))
        files.add_metric(values, float(r.get("files", 0)))
        errors.add_metric(values, float(r.get("handler_errors", 0)))
        seen: set[str] = set()
        for layer in r.get("layers", ()):
            digest = str(layer["digest"])
            if digest in seen:  # the same blob twice in one manifest: one store layer
                continue
            seen.add(digest)
            s = layer["stats"]
            lv = [*values, digest]
            for field, (family, scale) in counters.items():
                family.add_metric(lv, float(s.get(field, 0)) * scale)
            for field, gauge in gauges.items():
                gauge.add_metric(lv, float(s.get(field, 0)))
            read_ns = s.get("read_ns")
            latency.add_metric(
                lv, latency_buckets(s["latency_log2_us"]),
                None if read_ns is None else read_ns * NS,
            )  # fmt: skip
        p = r.get("prefetch")
        if p:
            gv = [*values, str(p.get("group", ""))]
            for field, gauge in prefetch.items():
                gauge.add_metric(gv, float(p.get(field, 0)))
            prefetch_done.add_metric(gv, 1.0 if p.get("prefetch_done") else 0.0)
            prefetch_failed.add_metric(gv, 1.0 if p.get("error") else 0.0)
        cache = r.get("cache")
        if cache:
            # Daemons sharing a cache each know their own scan and writes: the largest view
            # is the closest to the truth.
            known = caches.get(cache["dir"])
            if known is None or cache["bytes"] > known["bytes"]:
                caches[cache["dir"]] = cache

    cache_families = [
        GaugeMetricFamily("lazyfs_cache_bytes", "Bytes of chunks in the cache", labels=["dir"]),
        GaugeMetricFamily("lazyfs_cache_max_bytes", "The cache's bound", labels=["dir"]),
        GaugeMetricFamily("lazyfs_cache_chunks", "Chunks in the cache", labels=["dir"]),
    ]
    for cache_dir, c in sorted(caches.items()):
        for cache_family, field in zip(
            cache_families, ("bytes", "max_bytes", "chunks"), strict=True
        ):
            cache_family.add_metric([cache_dir], float(c[field]))

    return [
        info, rss, files, errors,
        *(family for family, _ in counters.values()), *gauges.values(), latency,
        *prefetch.values(), prefetch_done, prefetch_failed, *cache_families,
    ]  # fmt: skip


class Families(Collector):
    """A collector over families made beforehand."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(families: Iterable[Metric]) -> bytes:
    """The Prometheus text format of these families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(families))
    return generate_latest(registry)
