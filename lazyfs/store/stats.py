"""Per-layer counters for ``lazyfs stats``: plain msgspec data, cheap to update in place."""

from __future__ import annotations

import msgspec

# Read latency buckets: bucket 0 is < 1 us, bucket i (i >= 1) holds [2**(i-1), 2**i) us, and
# the last bucket also takes everything slower (2**22 us is about 4 s).
LATENCY_BUCKETS = 24


def latency_bucket(ns: int) -> int:
    return min((max(ns, 0) // 1000).bit_length(), LATENCY_BUCKETS - 1)


def _empty_histogram() -> list[int]:
    return [0] * LATENCY_BUCKETS


class StreamStats(msgspec.Struct, kw_only=True):
    """One request streaming now (``lazyfs stats --json``: a layer's ``streams``)."""

    priority: int  # lazyfs.store.slots: 0 on demand, 1 prefetch, 2 background
    start: int  # blob offsets of its first and last byte + 1
    end: int
    ranges: int  # > 1: a multi-range request
    bytes: int  # to receive, gaps between ranges left out
    received: int = 0
    bytes_per_s: int = 0  # since its first byte


class LayerStats(msgspec.Struct, kw_only=True):
    """Live counters of one layer.  ``msgspec.to_builtins(stats)`` gives the JSON form."""

    blob: str
    source: str = ""
    # Readiness, from the layer's chunk map (unique non-hole chunks).
    chunks_total: int = 0
    chunks_ready: int = 0
    bytes_total: int = 0  # uncompressed bytes of those chunks
    bytes_ready: int = 0
    # On-demand reads.
    reads: int = 0
    cache_hits: int = 0  # chunks served from the local cache
    cache_misses: int = 0  # chunks a read had to wait for the network for
    wait_ns: int = 0  # total time reads spent waiting for the network
    read_ns: int = 0  # total time of all reads (the latency histogram's sum)
    latency_log2_us: list[int] = msgspec.field(default_factory=_empty_histogram)
    # Network, for every priority.
    requests: int = 0
    multirange_requests: int = 0  # of those, requests for several ranges at once
    overtakes: int = 0  # requests of readers that would wait too long behind a stream
    batched_misses: int = 0  # readers' requests that went in another reader's request
    bytes_fetched: int = 0  # compressed bytes received, merge gaps included
    retries: int = 0  # chunk re-fetches after a failed verification
    integrity_errors: int = 0  # chunks that failed verification (before and after retry)
    # Chunks already cached when the layer was opened (held from other images or layers):
    # the compressed bytes this mount or pull did not have to fetch.
    bytes_held: int = 0
    # Decoded bytes readers (or a start-up's prefetch) fetched that wait in memory for their
    # cache write (written when reads pause): 0 once the daemon is quiet.
    bytes_unwritten: int = 0
    # The chunk provider (binary deltas): chunks it made, chunks it made wrong (refused and
    # fetched instead), compressed patch bytes it fetched, files it fell back to chunks for.
    provided_chunks: int = 0
    provider_rejected: int = 0
    patch_bytes: int = 0
    patch_fallbacks: int = 0
    streams: list[StreamStats] = msgspec.field(default_factory=list)  # requests under way

    def record_read(self, ns: int, *, waited: bool) -> None:
        self.reads += 1
        self.read_ns += max(ns, 0)
        self.latency_log2_us[latency_bucket(ns)] += 1
        if waited:
            self.wait_ns += ns
