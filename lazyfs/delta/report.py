"""``lazyfs diff``: what a node that holds OLD (every chunk of it cached) must fetch to run NEW.

Pure over TOCs and the store's layer view: chunks are deduplicated by digest across layers
and images, so a file that moved between layers or images costs nothing, and the report says
which layer of which image saved how much.  The bytes to fetch are planned by the store's own
planning for ``lazyfs pull`` (``plan.plan_fetch``: its merge gap, request cap, and no range
across a chunk held), so they are what the registry will serve, merge gaps included.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from lazyfs.formats.toc import TOC, Chunk, Entry
from lazyfs.store import plan
from lazyfs.store.bigchunk import is_big
from lazyfs.store.layerstate import Layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class ImageLayers:
    """One side of a diff: the image's label, manifest digest and layers in manifest order
    (``(compressed blob size, store layer)``)."""

    name: str
    manifest: str
    layers: Sequence[tuple[int, Layer]]


class LayerDiff(msgspec.Struct, kw_only=True):
    digest: str
    size: int  # the compressed blob: what a plain pull of this layer costs
    shared: bool  # OLD has this very blob
    chunks: int  # unique non-hole chunks
    chunk_bytes: int  # their compressed bytes
    held_chunks: int = 0
    held_bytes: int = 0
    fetch_chunks: int = 0
    fetch_chunk_bytes: int = 0
    fetch_bytes: int = 0  # what the registry serves: planned requests, merge gaps included
    requests: int = 0
    saved_by: dict[str, int] = {}  # "old:<layer digest>" / "new:<layer digest>" -> bytes
    files_unchanged: int = 0
    files_changed: int = 0
    files_new: int = 0
    changed_bytes: int = 0  # uncompressed content of changed and new files
    new_bytes: int = 0


class DiffReport(msgspec.Struct, kw_only=True):
    old: str
    new: str
    old_manifest: str
    new_manifest: str
    layers: list[LayerDiff]
    files_removed: int
    full_pull_bytes: int  # every NEW layer OLD does not have, whole
    fetch_bytes: int
    held_bytes: int
    saved_by: dict[str, int]


def merged_files(tocs: Iterable[TOC]) -> dict[str, Entry]:
    """The regular files of layers stacked bottom first, with overlay whiteouts applied."""
    files: dict[str, Entry] = {}
    for toc in tocs:
        gone: list[str] = []
        opaque: list[str] = []
        for e in toc.entries:
            d, base = posixpath.split(e.name)
            if base == OPAQUE:
                opaque.append(d)
            elif base.startswith(WHITEOUT):
                gone.append(posixpath.join(d, base[len(WHITEOUT) :]))
        for d in opaque:
            prefix = d + "/" if d else ""
            for name in [n for n in files if n.startswith(prefix)]:
                del files[name]
        for g in gone:
            files.pop(g, None)
            for name in [n for n in files if n.startswith(g + "/")]:
                del files[name]
        for e in toc.entries:
            if e.type == "reg" and not posixpath.basename(e.name).startswith(WHITEOUT):
                files[e.name] = e
            elif e.type != "hardlink":
                files.pop(e.name, None)  # a directory or link now stands there
    return files


def diff(old: ImageLayers, new: ImageLayers, merge_gap: int, max_request: int) -> DiffReport:
    """``merge_gap`` and ``max_request``: the store's (``LayerStore``) settings."""
    source_of: dict[str, str] = {}  # chunk digest -> the first layer that holds it
    for _, layer in old.layers:
        for c in layer.chunks:
            source_of.setdefault(c.digest, "old:" + layer.blob_digest)
    old_blobs = {layer.blob_digest for _, layer in old.layers}
    old_files = merged_files(layer.toc for _, layer in old.layers)
    old_by_path = {name: e.digest for name, e in old_files.items()}
    out: list[LayerDiff] = []
    seen_blobs: set[str] = set()
    full = 0
    for size, layer in new.layers:
        if layer.blob_digest in seen_blobs:
            continue  # listed twice in the manifest: fetched once
        seen_blobs.add(layer.blob_digest)
        shared = layer.blob_digest in old_blobs
        if not shared:
            full += size
        ld = LayerDiff(
            digest=layer.blob_digest,
            size=size,
            shared=shared,
            chunks=len(layer.chunks),
            chunk_bytes=sum(_span(c) for c in layer.chunks),
        )
        want: list[Chunk] = []
        saved: dict[str, int] = {}
        for c in layer.chunks:
            src = source_of.get(c.digest)
            if src is None:
                want.append(c)
                continue
            ld.held_chunks += 1
            ld.held_bytes += _span(c)
            saved[src] = saved.get(src, 0) + _span(c)
        # As the store's pull: a big chunk alone, the rest planned around what is held then.
        big = [c for c in want if is_big(c)]
        # A registry's pull asks for several ranges per request (multi-range).
        ranges = plan.plan_fetch(
            layer,
            [c for c in want if not is_big(c)],
            merge_gap,
            max_request,
            lambda c: is_big(c) or c.digest in source_of,
            streamed=True,
            multirange=True,
        )
        ld.requests = len(big) + len(plan.bundle(ranges))
        ld.fetch_bytes = sum(c.end - c.offset for c in big) + sum(e - s for s, e, _ in ranges)
        ld.fetch_chunks = len(want)
        ld.fetch_chunk_bytes = sum(_span(c) for c in want)
        ld.saved_by = saved
        for c in want:  # a later layer of NEW with the same chunk finds it fetched
            source_of.setdefault(c.digest, "new:" + layer.blob_digest)
        for e in layer.toc.entries:
            if e.type != "reg" or posixpath.basename(e.name).startswith(WHITEOUT):
                continue
            before = old_by_path.get(e.name)
            if before is None:
                ld.files_new += 1
                ld.new_bytes += e.size
            elif before == e.digest:
                ld.files_unchanged += 1
            else:
                ld.files_changed += 1
                ld.changed_bytes += e.size
        out.append(ld)
    new_files = merged_files(layer.toc for _, layer in new.layers)
    total_saved: dict[str, int] = {}
    for ld in out:
        for k, v in ld.saved_by.items():
            total_saved[k] = total_saved.get(k, 0) + v
    return DiffReport(
        old=old.name,
        new=new.name,
        old_manifest=old.manifest,
        new_manifest=new.manifest,
        layers=out,
        files_removed=len(old_files.keys() - new_files.keys()),
        full_pull_bytes=full,
        fetch_bytes=sum(ld.fetch_bytes for ld in out),
        held_bytes=sum(ld.held_bytes for ld in out),
        saved_by=total_saved,
    )


def _span(c: Chunk) -> int:
    return c.end - c.offset
