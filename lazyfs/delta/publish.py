"""``lazyfs delta``: patches from OLD's files to NEW's, stored beside NEW.

A regular file of NEW gets a patch when OLD has a different file at the same path (or, failing
that, exactly one file in the same directory whose name differs only in its digits, as a
versioned library does), NEW's chunks of it are not all in OLD already, and the patch is
smaller than those chunks.  Patches are concatenated in NEW's layer and TOC order into one
blob; the index says where each one is.  The artifact's ``subject`` is NEW's manifest and its
``dev.lazyfs.delta.base`` annotation OLD's; nodes find it through referrers.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio

from lazyfs import oci
from lazyfs.delta.patch import (
    ANN_BASE,
    DEFAULT_LEVEL,
    DELTAS_ARTIFACT_TYPE,
    MAX_PATCH_FILE,
    PATCHES_MEDIA_TYPE,
    BaseChunk,
    Blob,
    DeltaIndex,
    FilePatch,
    encode_index,
    make_patch,
)
from lazyfs.delta.report import WHITEOUT, merged_files
from lazyfs.errors import LazyfsError
from lazyfs.formats.toc import Entry
from lazyfs.ocilayout import Layout
from lazyfs.opener import OpenedImage
from lazyfs.remote.referrers import (
    ANN_CREATED,
    EMPTY,
    artifact_manifest,
    push_artifact,
    referrers_tag,
    subject_descriptor,
)
from lazyfs.remote.registry import RegistrySource
from lazyfs.store.layerstate import Layer

_DIGITS = re.compile(r"[0-9]+")
#: Files read and patched at once (patching is CPU work; reading may wait on the network).
CONCURRENCY = 4


class Deltas(msgspec.Struct, kw_only=True):
    index: DeltaIndex
    patches: bytes
    files_considered: int  # NEW files with a base and chunks OLD lacks
    chunk_bytes: int  # compressed bytes of those files' chunks OLD lacks
    patch_bytes: int  # what the patches kept cost instead (len(patches))


@dataclass
class _Job:
    entry: Entry
    layer: Layer
    base: Entry
    base_layer: Layer
    chunk_bytes: int  # compressed bytes of the entry's chunks OLD does not hold


def _similar_key(name: str) -> tuple[str, str]:
    d, base = posixpath.split(name)
    return d, _DIGITS.sub("#", base)


def _plan(old: OpenedImage, new: OpenedImage) -> list[_Job]:
    old_layers = old.unique_layers()
    owner: dict[int, Layer] = {id(e): layer for layer in old_layers for e in layer.toc.entries}
    old_files = merged_files(layer.toc for layer in old_layers)
    old_chunks = {c.digest for layer in old_layers for c in layer.chunks}
    old_contents = {e.digest for e in old_files.values()}
    similar: dict[tuple[str, str], list[Entry]] = {}
    for name, e in old_files.items():
        similar.setdefault(_similar_key(name), []).append(e)
    jobs: list[_Job] = []
    seen: set[str] = set()
    for layer in new.unique_layers():
        for e in layer.toc.entries:
            if (
                e.type != "reg"
                or not 0 < e.size <= MAX_PATCH_FILE
                or not e.digest
                or e.digest in seen
                or e.digest in old_contents
                or posixpath.basename(e.name).startswith(WHITEOUT)
            ):
                continue
            missing = sum(
                c.end - c.offset for c in e.chunks if not c.zeros and c.digest not in old_chunks
            )
            if not missing:
                continue
            base = old_files.get(e.name)
            if base is None:
                candidates = similar.get(_similar_key(e.name), [])
                base = candidates[0] if len(candidates) == 1 else None
            if base is None or not 0 < base.size <= MAX_PATCH_FILE or not base.digest:
                continue
            seen.add(e.digest)
            jobs.append(_Job(e, layer, base, owner[id(base)], missing))
    return jobs


async def build_deltas(old: OpenedImage, new: OpenedImage, level: int = DEFAULT_LEVEL) -> Deltas:
    """Patches for NEW's changed files against OLD's (both images read through their stores,
    so the content is verified and cached as any read is)."""
    jobs = _plan(old, new)
    patches: list[bytes | None] = [None] * len(jobs)
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(i: int, job: _Job) -> None:
        async with limiter:
            base = await old.store.read(job.base_layer, job.base, 0, job.base.size)
            content = await new.store.read(job.layer, job.entry, 0, job.entry.size)
            patch = await trio.to_thread.run_sync(make_patch, base, content, level)
        if len(patch) < job.chunk_bytes:  # otherwise the chunks are cheaper
            patches[i] = patch

    async with trio.open_nursery() as nursery:
        for i, job in enumerate(jobs):
            nursery.start_soon(one, i, job)
    files: list[FilePatch] = []
    blob = bytearray()
    for job, patch in zip(jobs, patches, strict=True):
        if patch is None:
            continue
        files.append(
            FilePatch(
                digest=job.entry.digest,
                size=job.entry.size,
                base_digest=job.base.digest,
                base_size=job.base.size,
                base_chunks=[
                    BaseChunk("" if c.zeros else c.digest, c.size) for c in job.base.chunks
                ],
                offset=len(blob),
                length=len(patch),
                path=job.entry.name,
            )
        )
        blob += patch
    if not files:
        raise LazyfsError(
            f"no file of {new.image} is cheaper to send as a patch against {old.image}"
        )
    data = bytes(blob)
    index = DeltaIndex(
        manifest=new.manifest,
        base_manifest=old.manifest,
        patches=Blob(oci.sha256_digest(data), len(data)),
        files=files,
    )
    kept = {f.digest for f in files}
    return Deltas(
        index=index,
        patches=data,
        files_considered=len(jobs),
        chunk_bytes=sum(j.chunk_bytes for j in jobs if j.entry.digest in kept),
        patch_bytes=len(data),
    )


async def push_deltas(source: RegistrySource, deltas: Deltas) -> str:
    """Store the deltas in ``source``'s repository (NEW's) as an artifact referring to NEW."""
    subject = await subject_descriptor(source, deltas.index.manifest)
    return await push_artifact(
        source,
        subject,
        encode_index(deltas.index),
        DELTAS_ARTIFACT_TYPE,
        blobs=[(deltas.patches, PATCHES_MEDIA_TYPE)],
        annotations={ANN_BASE: deltas.index.base_manifest},
    )


def write_deltas(root: Path, deltas: Deltas, subject: oci.Descriptor, created: str) -> str:
    """Add the artifact to the OCI layout at ``root`` (NEW's own, or a new one) under the
    referrers tag of NEW's manifest, as the tag schema has it; returns its digest."""
    layout = Layout(root)
    if not (root / "index.json").exists():
        layout.init()
        layout.write_top([])
    data = encode_index(deltas.index)
    for blob in (EMPTY, data, deltas.patches):
        layout.write_blob(blob)
    manifest = artifact_manifest(
        subject,
        data,
        DELTAS_ARTIFACT_TYPE,
        created,
        [(deltas.patches, PATCHES_MEDIA_TYPE)],
        {ANN_BASE: deltas.index.base_manifest},
    )
    digest = layout.write_blob(manifest).digest
    tag = referrers_tag(subject.digest)
    top: list[Mapping[str, Any]] = [
        msgspec.to_builtins(d)
        for d in layout.index().manifests
        if (d.annotations or {}).get(oci.ANN_REF_NAME) != tag
    ]
    referrers = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_INDEX,
        "manifests": [
            {
                "mediaType": oci.MT_OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "artifactType": DELTAS_ARTIFACT_TYPE,
                "annotations": {ANN_CREATED: created, ANN_BASE: deltas.index.base_manifest},
            }
        ],
    }
    rd, rn = layout.put_json(referrers)
    top.append(
        {
            "mediaType": oci.MT_OCI_INDEX,
            "digest": rd,
            "size": rn,
            "annotations": {oci.ANN_REF_NAME: tag},
        }
    )
    layout.write_top(top)
    return digest
