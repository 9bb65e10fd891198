"""Prefetch groups stored in the registry beside the image they were made for."""

from __future__ import annotations

from lazyfs import oci
from lazyfs.errors import FormatError
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import find_artifact, push_artifact
from lazyfs.remote.registry import RegistrySource
from lazyfs.trace.schema import GROUPS_ARTIFACT_TYPE, decode_groups


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
