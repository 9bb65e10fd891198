"""Traces → prefetch groups: a pure, deterministic ranking of what a workload needs first.

For every group (``Trace.group``) the runs are merged file by file, keyed by *content digest*
(one entry per digest across layers: the copy that was needed earliest).  Only files whose
content was read count; a file that was opened but never read needs nothing from the network.

Ranking (lower score = fetched earlier)::

    score = median(first-read rank / (n - 1) over the runs that read it)
            + MISS_WEIGHT * (1 - runs that read it / runs of the group)
            - WAIT_WEIGHT * (its mean wait per run / the largest mean wait in the group)

The first-read rank is the file's position in its run ordered by first read (first open when
the read time is missing); normalising by the run's length makes short and long runs
comparable, and the median ignores one odd run.  Ties are broken by longer wait, then path,
layer and digest, so the output depends only on the set of traces, never on their order.

Tiers: ``always`` = read by every run of the group and first needed inside the start-up window
by at least one run; ``sometimes`` = read by some runs, likewise inside the window; ``rest`` =
first read after the start-up window (``window_ns`` after the mount was ready) in every run that
read it — whatever the run did once started, fetched last.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from lazyfs.errors import FormatError
from lazyfs.trace.schema import (
    FileAccess,
    Group,
    PrefetchGroups,
    RankedEntry,
    Tier,
    Trace,
    encode,
)

MISS_WEIGHT = 0.5
WAIT_WEIGHT = 0.1
#: a file read to more than this fraction is fetched whole (one request beats many)
WHOLE_FILE_FRACTION = 0.5
DEFAULT_WINDOW_NS = 30 * 1_000_000_000
SCORE_DIGITS = 6


def _when(f: FileAccess) -> int:
    return f.first_read_ns if f.first_read_ns >= 0 else f.first_open_ns


def _was_read(f: FileAccess) -> bool:
    return f.size > 0 and (f.reads > 0 or f.bytes_read > 0 or bool(f.ranges))


def _key(f: FileAccess) -> str:
    # Content digest is the dedup key; a file without one (should not happen) stays distinct.
    return f.digest or f"{f.layer}\0{f.path}"


def merge_ranges(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorted, clamped to ``[0, size)``, overlapping and touching ranges joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((max(0, s), min(size, e)) for s, e in ranges):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class _Acc:
    """What the runs of one group say about one content digest."""

    def __init__(self) -> None:
        self.ranks: list[float] = []
        self.wait_ns = 0
        self.early = False  # first read inside the start-up window in some run
        self.ranges: list[tuple[int, int]] = []
        self.whole = False
        # (normalised rank, layer position, path, layer, size): the earliest-needed copy wins
        self.copies: list[tuple[float, int, str, str, int]] = []


def _run_order(trace: Trace) -> list[FileAccess]:
    """The run's read files, one per digest, ordered by first need."""
    seen: dict[str, tuple[int, int, FileAccess]] = {}
    for i, f in enumerate(trace.files):
        if not _was_read(f):
            continue
        when = _when(f)
        k = (when if when >= 0 else 1 << 62, i)
        old = seen.get(_key(f))
        if old is None or k < old[:2]:
            seen[_key(f)] = (*k, f)
    return [f for _, _, f in sorted(seen.values(), key=lambda t: t[:2])]


def _group(name: str, runs: Sequence[Trace], layers: list[str], window_ns: int) -> Group:
    accs: dict[str, _Acc] = {}
    for trace in runs:
        order = _run_order(trace)
        n = len(order)
        for pos, f in enumerate(order):
            acc = accs.setdefault(_key(f), _Acc())
            rank = pos / (n - 1) if n > 1 else 0.0
            acc.ranks.append(rank)
            acc.wait_ns += max(0, f.wait_ns)
            when = _when(f)
            acc.early |= 0 <= when <= window_ns or when < 0
            layer_pos = layers.index(f.layer) if f.layer in layers else len(layers)
            acc.copies.append((rank, layer_pos, f.path, f.layer, f.size))
            if f.ranges:
                acc.ranges.extend((int(s), int(e)) for s, e in f.ranges)
            else:
                acc.whole = True  # read, but the recorder kept no ranges: take it all
    max_wait = max((a.wait_ns for a in accs.values()), default=0)
    total = len(runs)
    ranked: list[tuple[float, int, str, str, str, str, RankedEntry]] = []
    for key, acc in accs.items():
        _, _, path, layer, size = min(acc.copies)
        score = statistics.median(acc.ranks) + MISS_WEIGHT * (1 - len(acc.ranks) / total)
        if max_wait:
            score -= WAIT_WEIGHT * acc.wait_ns / max_wait
        score = round(score, SCORE_DIGITS)
        ranges = [] if acc.whole else merge_ranges(acc.ranges, size)
        if sum(e - s for s, e in ranges) > WHOLE_FILE_FRACTION * size:
            ranges = []
        tier = "rest" if not acc.early else "always" if len(acc.ranks) == total else "sometimes"
        entry = RankedEntry(
            layer=layer,
            path=path,
            digest=key if "\0" not in key else "",
            size=size,
            ranges=ranges,
            score=score,
        )
        ranked.append((score, -acc.wait_ns, path, layer, key, tier, entry))
    ranked.sort(key=lambda r: r[:5])
    tiers = [
        Tier(name=t, entries=[r[6] for r in ranked if r[5] == t])
        for t in ("always", "sometimes", "rest")
    ]
    return Group(name=name, runs=total, tiers=tiers)


def optimize(traces: Sequence[Trace], *, window_ns: int = DEFAULT_WINDOW_NS) -> PrefetchGroups:
    """Merge traces of one image into prefetch groups (one per ``Trace.group``, sorted)."""
    if not traces:
        raise FormatError("no traces to optimize")
    manifests = sorted({t.manifest for t in traces})
    if len(manifests) > 1:
        raise FormatError(
            f"traces are of {len(manifests)} different images (manifests "
            f"{', '.join(m[:19] for m in manifests)}); optimize one image at a time"
        )
    layer_lists = {tuple(t.layers) for t in traces}
    if len(layer_lists) > 1:
        raise FormatError(f"traces of manifest {manifests[0]} disagree on its layers")
    layers = list(next(iter(layer_lists)))
    # Canonical run order: sums and medians are then the same whatever the argument order.
    runs = sorted(traces, key=encode)
    by_group: dict[str, list[Trace]] = {}
    for t in runs:
        by_group.setdefault(t.group, []).append(t)
    return PrefetchGroups(
        image=min(t.image for t in traces),
        manifest=manifests[0],
        layers=layers,
        groups=[_group(g, by_group[g], layers, window_ns) for g in sorted(by_group)],
    )
