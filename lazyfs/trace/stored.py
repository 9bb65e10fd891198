"""Prefetch groups stored in the registry beside the image they were made for."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import FormatError, LazyfsError
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import find_artifact, push_artifact
from lazyfs.remote.registry import RegistrySource
from lazyfs.trace.schema import GROUPS_ARTIFACT_TYPE, Group, decode_groups

log = logging.getLogger(__name__)

#: How long a mount looks for stored groups before prefetching by landmarks instead.
STORED_GROUPS_TIMEOUT = 10.0


async def push_groups(
    source: RegistrySource,
    image_manifest_desc: oci.Descriptor,
    groups_bytes: bytes,
    *,
    created: str | None = None,
) -> str:
    """Store a prefetch-groups document as an artifact referring to the image; returns the
    artifact manifest's digest.  Idempotent for identical groups."""
    return await push_artifact(
        source, image_manifest_desc, groups_bytes, GROUPS_ARTIFACT_TYPE, created=created
    )


async def find_groups(source: Source, manifest_digest: str) -> bytes | None:
    """The newest prefetch groups stored for ``manifest_digest`` that decode and are made for
    that manifest, or None."""

    def check(data: bytes) -> None:
        if decode_groups(data, "stored prefetch groups").manifest != manifest_digest:
            raise FormatError("groups are for another manifest")

    return await find_artifact(source, manifest_digest, GROUPS_ARTIFACT_TYPE, check)


def _cached_path(cache_dir: Path, manifest_digest: str) -> Path:
    return cache_dir / f"groups-of-{oci.check_digest(manifest_digest)}"


def cached_group(cache_dir: Path, manifest_digest: str, name: str | None) -> Group | None:
    """The group ``name`` of the groups an earlier mount found stored beside the image (kept
    in ``cache_dir``), or None.  Read before the mount is ready, so its prefetch starts with
    it; a document that no longer decodes is dropped."""
    path = _cached_path(cache_dir, manifest_digest)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        doc = decode_groups(data, "cached prefetch groups")
        if doc.manifest != manifest_digest:
            raise FormatError("groups are for another manifest")
    except LazyfsError as e:
        log.info("dropping the cached prefetch groups: %s", e)
        path.unlink(missing_ok=True)
        return None
    try:
        return doc.group(name)
    except LazyfsError as e:
        log.info("not using the cached prefetch groups: %s", e)
        return None


async def find_group(
    source: Source, manifest_digest: str, name: str | None, cache_dir: Path | None = None
) -> Group | None:
    """The group ``name`` (default: the first) of the groups stored beside the image, or None
    when there are none, they are unusable, or the registry takes too long to say.  Found
    groups are kept in ``cache_dir`` for :func:`cached_group`."""
    try:
        with trio.move_on_after(STORED_GROUPS_TIMEOUT):
            data = await find_groups(source, manifest_digest)
            if data is not None:
                doc = decode_groups(data, "prefetch groups stored with the image")
                log.info("prefetching with the groups stored beside %s", manifest_digest)
                if cache_dir is not None:
                    try:
                        atomic_write(_cached_path(cache_dir, manifest_digest), data, fsync=False)
                    except OSError as e:
                        log.warning("could not keep the prefetch groups: %s", e)
                return doc.group(name)
    except LazyfsError as e:
        log.info("no usable prefetch groups in the registry: %s", e)
    return None
