"""Writing to a registry: small blobs (monolithic upload) and manifests.

Only what prefetch-group artifacts need: every body fits in memory.  Requests go through
:meth:`RegistrySource.request`, so auth (with a push scope), retries and hosts.toml endpoints
with the ``push`` capability apply as for reads.
"""

from __future__ import annotations

import httpx

from lazyfs import oci
from lazyfs.errors import NotFoundError, RemoteError
from lazyfs.remote.registry import RegistrySource


async def blob_exists(source: RegistrySource, digest: str) -> bool:
    oci.check_digest(digest)
    try:
        await source.request("HEAD", f"blobs/{digest}", capability="pull", what=f"blob {digest}")
    except NotFoundError:
        return False
    return True


async def push_blob(source: RegistrySource, data: bytes, media_type: str) -> oci.Descriptor:
    """Upload ``data`` unless the repository has it: POST a session, PUT the bytes (the
    distribution spec's monolithic upload, which every registry implements)."""
    digest = oci.sha256_digest(data)
    desc = oci.Descriptor(mediaType=media_type, digest=digest, size=len(data))
    if await blob_exists(source, digest):
        return desc
    status, headers, _ = await source.request(
        "POST", "blobs/uploads/", headers={"Content-Length": "0"}, what="blob upload session"
    )
    location = headers.get("location")
    if status != 202 or not location:
        raise RemoteError(f"{source.name}: upload session answered {status} without a Location")
    # The Location keeps its own query (the upload state); the digest is added to it.
    url = httpx.URL(location).copy_merge_params({"digest": digest})
    status, headers, _ = await source.request(
        "PUT",
        str(url),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        body=data,
        what=f"blob {digest}",
    )
    if status != 201:
        raise RemoteError(f"{source.name}: blob upload of {digest} answered {status}")
    return desc


async def push_manifest(
    source: RegistrySource, ref: str, data: bytes, media_type: str
) -> tuple[str, httpx.Headers]:
    """PUT a manifest or index under ``ref`` (a tag or its digest); returns its digest and the
    response headers (a registry with the referrers API answers ``OCI-Subject``)."""
    digest = oci.sha256_digest(data)
    status, headers, _ = await source.request(
        "PUT",
        f"manifests/{ref}",
        headers={"Content-Type": media_type},
        body=data,
        what=f"manifest {ref}",
    )
    if status != 201:
        raise RemoteError(f"{source.name}: manifest {ref} answered {status}")
    got = headers.get("docker-content-digest")
    if got and got != digest:
        raise RemoteError(f"{source.name}: manifest {ref} stored as {got}, sent {digest}")
    return digest, headers
