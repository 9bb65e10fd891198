"""Registry ends of ``lazyfs convert``: fetch an image into an OCI layout, push one back.

``convert`` itself works layout to layout; a registry source is first copied into a temporary
layout (every blob verified), and a registry destination is pushed from the layout the
converter wrote.  The push sends exactly the blobs written, by digest, so no client-side
cache can swap a lazy layer for a gzip one with the same diff_id (what containers/image does
without ``--preserve-digests``).
"""

from __future__ import annotations

import os

import httpx
import trio

from lazyfs import oci
from lazyfs.errors import FormatError, NotFoundError, RemoteError
from lazyfs.ocilayout import Layout
from lazyfs.remote.push import blob_exists, push_blob, push_manifest
from lazyfs.remote.reference import parse_reference
from lazyfs.remote.registry import RegistrySource

DOCKER_PREFIX = "docker://"
PIECE = 8 << 20  # an upload PATCH: bounded memory for layers of any size


def is_registry_ref(ref: str) -> bool:
    return not ref.startswith("oci:")


def registry_name(ref: str) -> str:
    """``docker://host/repo:tag`` (skopeo's spelling) or ``host/repo:tag`` → the latter."""
    return ref[len(DOCKER_PREFIX) :] if ref.startswith(DOCKER_PREFIX) else ref


HostsDir = str | os.PathLike[str] | None


def _source(
    ref: str, plain_http: bool, insecure: bool, hosts_dir: HostsDir
) -> tuple[RegistrySource, str]:
    """The registry of ``ref``, with its mirrors from ``hosts_dir`` as every command reads
    them (pulls try the mirrors first; a push goes to the endpoints that may push)."""
    parsed = parse_reference(registry_name(ref))
    source = RegistrySource(
        parsed.host,
        parsed.repository,
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
    )
    return source, parsed.ref


def select_platform(index: oci.Index, platform: str, where: str) -> oci.Descriptor:
    for d in index.manifests:
        if d.platform is not None and d.platform.matches(platform):
            return d
    have = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
    raise NotFoundError(f"no {platform} image in {where} (available: {', '.join(have) or 'none'})")


def fetch(
    ref: str,
    layout: Layout,
    *,
    plain_http: bool,
    insecure: bool,
    platform: str | None,
    hosts_dir: HostsDir = None,
) -> oci.Descriptor:
    """Copy ``ref`` (one platform when ``platform`` is given) into ``layout``; returns the
    top-level descriptor (also written to the layout's index.json)."""
    return trio.run(_fetch, ref, layout, plain_http, insecure, platform, hosts_dir)


async def _fetch(
    ref: str,
    layout: Layout,
    plain_http: bool,
    insecure: bool,
    platform: str | None,
    hosts_dir: HostsDir,
) -> oci.Descriptor:
    source, tag = _source(ref, plain_http, insecure, hosts_dir)
    layout.init()
    try:
        data, media_type, digest = await source.get_manifest(tag)
        if media_type in oci.INDEX_TYPES and platform is not None:
            child = select_platform(oci.decode_index(data), platform, registry_name(ref))
            data, media_type, digest = await source.get_manifest(child.digest)
        top = oci.Descriptor(mediaType=media_type, digest=digest, size=len(data))
        await _fetch_tree(source, layout, data, media_type)
        layout.write_index(oci.Index(schemaVersion=2, mediaType=oci.MT_OCI_INDEX, manifests=[top]))
        return top
    finally:
        await source.aclose()


async def _fetch_tree(source: RegistrySource, layout: Layout, data: bytes, media_type: str) -> None:
    layout.write_blob(data)
    if media_type in oci.INDEX_TYPES:
        for child in oci.decode_index(data).manifests:
            if child.mediaType in (*oci.INDEX_TYPES, *oci.MANIFEST_TYPES):
                cdata, ctype, _ = await source.get_manifest(child.digest)
                await _fetch_tree(source, layout, cdata, ctype)
            else:
                layout.write_blob(oci.verify(await source.get_blob(child.digest), child.digest))
        return
    if media_type not in oci.MANIFEST_TYPES:
        raise FormatError(f"unsupported manifest type {media_type}")
    manifest = oci.decode_manifest(data)
    cfg = manifest.config.digest
    layout.write_blob(oci.verify(await source.get_blob(cfg), cfg, "config"))
    for layer in manifest.layers:
        if layout.blob_path(layer.digest).exists():
            continue
        with layout.blob_writer() as out:
            await source.download(layer.digest, layer.size, out.file)  # verifies the digest
            out.commit(layer.digest)


def push(
    layout: Layout,
    top: oci.Descriptor,
    ref: str,
    *,
    plain_http: bool,
    insecure: bool,
    hosts_dir: HostsDir = None,
) -> str:
    """Push ``top`` (and everything it references) from ``layout`` to ``ref``; returns the
    pushed digest."""
    return trio.run(_push, layout, top, ref, plain_http, insecure, hosts_dir)


async def _push(
    layout: Layout,
    top: oci.Descriptor,
    ref: str,
    plain_http: bool,
    insecure: bool,
    hosts_dir: HostsDir,
) -> str:
    source, tag = _source(ref, plain_http, insecure, hosts_dir)
    try:
        await _push_tree(source, layout, top)
        digest, _ = await push_manifest(
            source, tag, layout.read_blob(top.digest), top.mediaType or oci.MT_OCI_MANIFEST
        )
        return digest
    finally:
        await source.aclose()


async def _push_tree(source: RegistrySource, layout: Layout, desc: oci.Descriptor) -> None:
    data = layout.read_blob(desc.digest)
    if desc.mediaType in oci.INDEX_TYPES:
        for child in oci.decode_index(data).manifests:
            if child.mediaType in (*oci.INDEX_TYPES, *oci.MANIFEST_TYPES):
                await _push_tree(source, layout, child)
                cdata = layout.read_blob(child.digest)
                await push_manifest(source, child.digest, cdata, child.mediaType)
            else:
                await push_blob(source, layout.read_blob(child.digest), child.mediaType)
        return
    manifest = oci.decode_manifest(data)
    await push_blob(source, layout.read_blob(manifest.config.digest), manifest.config.mediaType)
    for layer in manifest.layers:
        await _push_file(source, layout, layer)


async def _push_file(source: RegistrySource, layout: Layout, desc: oci.Descriptor) -> None:
    """Upload a layer blob in PATCH pieces (memory stays bounded), then close the session with
    its digest, which the registry checks."""
    if await blob_exists(source, desc.digest):
        return
    status, headers, _ = await source.request(
        "POST", "blobs/uploads/", headers={"Content-Length": "0"}, what="blob upload session"
    )
    location = headers.get("location")
    if status != 202 or not location:
        raise RemoteError(f"{source.name}: upload session answered {status} without a Location")
    sent = 0
    with layout.open_blob(desc.digest) as f:
        while piece := await trio.to_thread.run_sync(f.read, PIECE):
            status, headers, _ = await source.request(
                "PATCH",
                location,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(piece)),
                    "Content-Range": f"{sent}-{sent + len(piece) - 1}",
                },
                body=piece,
                what=f"blob {desc.digest}",
            )
            if status != 202 or not headers.get("location"):
                raise RemoteError(f"{source.name}: upload of {desc.digest} answered {status}")
            location = headers["location"]
            sent += len(piece)
    url = httpx.URL(location).copy_merge_params({"digest": desc.digest})
    status, _, _ = await source.request(
        "PUT", str(url), headers={"Content-Length": "0"}, what=f"blob {desc.digest}"
    )
    if status != 201:
        raise RemoteError(f"{source.name}: closing the upload of {desc.digest} answered {status}")
