"""From an image name to manifest, config and layer list, whatever the source."""

from __future__ import annotations

import os

import msgspec

from lazyfs import oci
from lazyfs.errors import FormatError, NotFoundError
from lazyfs.remote.base import Source
from lazyfs.remote.local import OCILayoutSource
from lazyfs.remote.reference import parse_oci_ref, parse_reference
from lazyfs.remote.registry import RegistrySource, RetryPolicy


class ResolvedImage(msgspec.Struct):
    manifest_digest: str
    manifest: oci.Manifest
    manifest_bytes: bytes
    config_bytes: bytes
    config: oci.ImageConfig
    layers: list[oci.Descriptor]
    #: the index the manifest was picked from, when there was one
    index_digest: str | None = None


class ResolvedManifest(msgspec.Struct):
    digest: str
    manifest: oci.Manifest
    data: bytes
    index_digest: str | None = None

    def with_config(self, config_bytes: bytes) -> ResolvedImage:
        return ResolvedImage(
            manifest_digest=self.digest,
            manifest=self.manifest,
            manifest_bytes=self.data,
            config_bytes=config_bytes,
            config=oci.decode_config(config_bytes),
            layers=list(self.manifest.layers),
            index_digest=self.index_digest,
        )


async def resolve_image(source: Source, ref: str, platform: str = "linux/amd64") -> ResolvedImage:
    """Fetch ``ref``; if it is an index / manifest list, pick the ``platform`` entry."""
    m = await resolve_manifest(source, ref, platform)
    return m.with_config(await source.get_blob(m.manifest.config.digest))


async def resolve_manifest(
    source: Source, ref: str, platform: str = "linux/amd64"
) -> ResolvedManifest:
    """:func:`resolve_image` without the config (whose fetch a caller may overlap)."""
    data, media_type, digest = await source.get_manifest(ref)
    index_digest = None
    if media_type in oci.INDEX_TYPES:
        index = oci.decode_index(data)
        candidates = [
            d
            for d in index.manifests
            if d.platform is not None
            and d.platform.matches(platform)
            and d.mediaType in (*oci.MANIFEST_TYPES, None)
        ]
        if not candidates:
            have = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
            raise NotFoundError(
                f"no {platform} image in {source.name} {ref} "
                f"(available: {', '.join(have) or 'none'})"
            )
        index_digest = digest
        data, media_type, digest = await source.get_manifest(candidates[0].digest)
    if media_type not in oci.MANIFEST_TYPES:
        raise FormatError(f"{source.name} {ref}: unsupported manifest type {media_type}")
    return ResolvedManifest(digest, oci.decode_manifest(data), data, index_digest)


def open_source(
    image: str,
    *,
    plain_http: bool = False,
    insecure: bool = False,
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | os.PathLike[str] | None = None,
    retry: RetryPolicy | None = None,
) -> tuple[Source, str]:
    """``oci:DIR[:TAG]`` or a registry reference → ``(source, ref to resolve)``."""
    if image.startswith("oci:"):
        directory, tag = parse_oci_ref(image)
        return OCILayoutSource(directory), tag or "latest"
    ref = parse_reference(image)
    source = RegistrySource(
        ref.host,
        ref.repository,
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
        docker_config=docker_config,
        retry=retry,
    )
    return source, ref.ref
