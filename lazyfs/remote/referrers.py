"""Documents stored beside their image as OCI artifacts, found through referrers.

An artifact is an image manifest (image-spec's artifact guidance): an ``artifactType``, the
empty config (``application/vnd.oci.empty.v1+json``, ``{}``), one layer holding the document
(of that same media type), and ``subject`` = the image manifest it describes.  What the
document means is the caller's business (prefetch groups: :mod:`lazyfs.trace.stored`).

Finding it (distribution-spec): ``GET /v2/<name>/referrers/<digest>``; a registry without that
API answers 404, and then the *referrers tag schema* applies: tag ``sha256-<hex>`` holds an OCI
index listing the subject's referrers, which the pusher updates read-modify-write.  Debian's
docker-registry 2.8 has no referrers API, so it exercises the fallback.

Round trips: a pushed artifact's listing entry embeds the artifact manifest, and that manifest
embeds the document (image-spec's descriptor ``data``), both when small (:data:`MAX_EMBEDDED`),
so the listing alone brings the document: a cold mount has its prefetch groups one round trip
after the image's manifest, beside the TOC.  Embedded bytes are checked against their
descriptor exactly as fetched bytes are; what does not check out is fetched instead.  A
registry with the referrers API builds the listing itself (no ``data``): the artifact
manifest is fetched, the document beside it.

Re-pushing an identical document is a no-op.  A new one of the same type for the same image
replaces earlier ones in the fallback index (other referrers, e.g. signatures, are kept); with
the referrers API the newest (``org.opencontainers.image.created``) wins.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import trio

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError, LazyfsError, NotFoundError
from lazyfs.remote.base import Source
from lazyfs.remote.push import push_blob, push_manifest
from lazyfs.remote.registry import RegistrySource

log = logging.getLogger(__name__)

#: How long a listing of an image's referrers is handed to the next lookup instead of asked
#: for again: a mount looks for prefetch groups and for deltas beside the image within
#: moments of each other, and each lookup would otherwise cost a round trip in series.
LISTING_REUSE = 30.0

#: The most a push embeds in a descriptor (the document in its artifact manifest, that
#: manifest in the fallback index's entry): a listing is fetched whole by every lookup, and
#: base64 in base64 carries 1.8 bytes a byte, so a large document is cheaper fetched.
MAX_EMBEDDED = 128 << 10
#: The most a reader takes embedded (a manifest may not be larger either).
MAX_EMBEDDED_READ = 4 << 20

MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
ANN_CREATED = "org.opencontainers.image.created"
#: sha256 of the document, so a re-push of the same one is recognised without fetching it.
#: (The key predates other artifact types; artifacts already pushed carry it.)
ANN_CONTENT_DIGEST = "dev.lazyfs.prefetch-groups.digest"


def referrers_tag(digest: str) -> str:
    """The fallback tag for ``digest``'s referrers: ``sha256-<hex>``."""
    return "sha256-" + oci.check_digest(digest)


async def subject_descriptor(source: Source, manifest_digest: str) -> oci.Descriptor:
    """The descriptor of an image manifest already in ``source``'s repository."""
    data, media_type, digest = await source.get_manifest(manifest_digest)
    return oci.Descriptor(mediaType=media_type, digest=digest, size=len(data))


def artifact_manifest(
    subject: oci.Descriptor,
    data: bytes,
    artifact_type: str,
    created: str,
    blobs: Sequence[tuple[bytes, str]] = (),
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """``blobs``: more layers after the document, as ``(data, media type)``; ``annotations``
    are added to the manifest's."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": MT_EMPTY, "digest": oci.sha256_digest(EMPTY), "size": 2},
        "layers": [
            {
                "mediaType": artifact_type,
                "digest": oci.sha256_digest(data),
                "size": len(data),
                **({"data": oci.embed(data)} if len(data) <= MAX_EMBEDDED else {}),
            },
            *({"mediaType": mt, "digest": oci.sha256_digest(b), "size": len(b)} for b, mt in blobs),
        ],
        "subject": {"mediaType": subject.mediaType, "digest": subject.digest, "size": subject.size},
        "annotations": {
            **(annotations or {}),
            ANN_CREATED: created,
            ANN_CONTENT_DIGEST: oci.sha256_digest(data),
        },
    }
    return msgspec.json.encode(doc)


async def list_referrers(source: Source, digest: str) -> tuple[list[oci.Descriptor], bool]:
    """``(descriptors, True)`` from the referrers API, else ``(descriptors, False)`` from the
    tag schema (empty when the tag does not exist).  Both are asked at once: a registry
    without the API answers 404, and asking for the tag only then would put a round trip in
    series on a cold mount's way; the tag's request is cancelled once the API answers.  An
    API that answers anything but an index (404 is the spec's "none", some registries say
    400 or 405) leaves the tag schema's answer, whose error is raised."""
    oci.check_digest(digest)
    registry = source.underlying()  # the document cache passes no referrers request on
    api: list[list[oci.Descriptor]] = []
    tag: list[list[oci.Descriptor] | LazyfsError] = []

    async def ask_api(registry: RegistrySource, cancel: trio.CancelScope) -> None:
        try:
            _, _, body = await registry.request(
                "GET",
                f"referrers/{digest}",
                headers={"Accept": oci.MT_OCI_INDEX},
                capability="pull",
                what=f"referrers of {digest}",
            )
            api.append(oci.decode_index(body).manifests)
        except NotFoundError:
            return  # no referrers API: the spec's signal to use the tag schema
        except LazyfsError as e:
            log.info("%s: the referrers API said %s; using the tag schema", source.name, e)
            return
        cancel.cancel()

    async def ask_tag() -> None:
        try:
            tag.append(await _tag_listing(source, digest))
        except LazyfsError as e:  # raised below, outside the nursery (no group)
            tag.append(e)

    if isinstance(registry, RegistrySource):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_api, registry, nursery.cancel_scope)
            nursery.start_soon(ask_tag)
    else:
        await ask_tag()
    if api:
        return api[0], True
    if isinstance(tag[0], LazyfsError):
        raise tag[0]
    return tag[0], False


async def _tag_listing(source: Source, digest: str) -> list[oci.Descriptor]:
    """The referrers the tag schema lists (none when the tag does not exist)."""
    try:
        data, media_type, _ = await source.get_manifest(referrers_tag(digest))
    except NotFoundError:
        return []
    if media_type != oci.MT_OCI_INDEX:
        raise FormatError(f"{source.name}: tag {referrers_tag(digest)} is not an OCI index")
    return oci.decode_index(data).manifests


class _Listing:
    """One image's referrers as one lookup fetched them (or is fetching them)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.refs: list[oci.Descriptor] | None = None  # None: not (yet) fetched
        self.at = 0.0


_listings: weakref.WeakKeyDictionary[Source, dict[str, _Listing]] = weakref.WeakKeyDictionary()


async def shared_referrers(source: Source, digest: str) -> list[oci.Descriptor]:
    """:func:`list_referrers`, once for lookups in quick succession (within LISTING_REUSE)
    through the same source: a lookup that comes while another's request is on its way
    waits for that answer.  A failed or cancelled fetch is not shared: the next lookup asks
    itself.  Pushes read the listing fresh (``list_referrers``), never this one."""
    memo = _listings.setdefault(source, {})
    while True:
        entry = memo.get(digest)
        if entry is None or (entry.done.is_set() and time.monotonic() - entry.at > LISTING_REUSE):
            break
        await entry.done.wait()
        if entry.refs is not None:
            return entry.refs
        # the fetching lookup failed or was cancelled: ask again, as one of the waiters
    entry = memo[digest] = _Listing()
    try:
        entry.refs = (await list_referrers(source, digest))[0]
        return entry.refs
    finally:
        entry.at = time.monotonic()
        if entry.refs is None and memo.get(digest) is entry:
            del memo[digest]
        entry.done.set()


async def _fallback_index(source: Source, digest: str) -> dict[str, Any]:
    """The raw tag-schema index (unknown fields kept), or a new empty one."""
    try:
        data, _, _ = await source.get_manifest(referrers_tag(digest))
    except NotFoundError:
        return {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": []}
    oci.decode_index(data)
    doc: dict[str, Any] = msgspec.json.decode(data)
    return doc


async def push_artifact(
    source: RegistrySource,
    image_manifest_desc: oci.Descriptor,
    data: bytes,
    artifact_type: str,
    *,
    created: str | None = None,
    blobs: Sequence[tuple[bytes, str]] = (),
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Store ``data`` as an ``artifact_type`` artifact referring to ``image_manifest_desc``;
    returns the artifact manifest's digest.  Idempotent for identical data (which should then
    name any ``blobs`` by digest).  ``blobs`` and ``annotations``: see artifact_manifest."""
    subject = image_manifest_desc
    content_digest = oci.sha256_digest(data)
    _listings.get(source, {}).pop(subject.digest, None)  # this source's next lookup sees it
    existing, api = await list_referrers(source, subject.digest)
    for d in existing:
        if (
            d.artifactType == artifact_type
            and (d.annotations or {}).get(ANN_CONTENT_DIGEST) == content_digest
            # An entry of the tag schema pushed before embedding is pushed again, embedded;
            # not one whose manifest is too big to embed (as its size says): it never would.
            and (api or d.data is not None or d.size > MAX_EMBEDDED)
        ):
            return d.digest
    await push_blob(source, EMPTY, MT_EMPTY)
    await push_blob(source, data, artifact_type)
    for blob, media_type in blobs:
        await push_blob(source, blob, media_type)
    created = created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = artifact_manifest(subject, data, artifact_type, created, blobs, annotations)
    # By digest: the artifact needs no tag of its own.
    digest, headers = await push_manifest(
        source, oci.sha256_digest(manifest), manifest, oci.MT_OCI_MANIFEST
    )
    if api or headers.get("oci-subject") == subject.digest:
        return digest  # the registry indexes referrers itself
    index = await _fallback_index(source, subject.digest)
    kept = [
        m
        for m in index.get("manifests", [])
        if m.get("digest") != digest and m.get("artifactType") != artifact_type
    ]
    kept.append(
        {
            "mediaType": oci.MT_OCI_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            **({"data": oci.embed(manifest)} if len(manifest) <= MAX_EMBEDDED else {}),
            "artifactType": artifact_type,
            "annotations": {
                **(annotations or {}),
                ANN_CREATED: created,
                ANN_CONTENT_DIGEST: content_digest,
            },
        }
    )
    index["manifests"] = kept
    index.setdefault("mediaType", oci.MT_OCI_INDEX)
    await push_manifest(
        source, referrers_tag(subject.digest), msgspec.json.encode(index), oci.MT_OCI_INDEX
    )
    return digest


async def find_artifact(
    source: Source,
    manifest_digest: str,
    artifact_type: str,
    check: Callable[[bytes], None] | None = None,
    asking: Callable[[], None] | None = None,
) -> bytes | None:
    """The newest ``artifact_type`` document stored for ``manifest_digest``, or None.  Tries
    the referrers API, then the tag schema; skips artifacts that do not check out (``check``
    raises FormatError for a document the caller cannot use).  ``asking`` hears when one is
    about to be fetched (its answer is then a round trip away)."""
    refs = await shared_referrers(source, manifest_digest)
    candidates = sorted(
        (d for d in refs if d.artifactType == artifact_type),
        key=lambda d: ((d.annotations or {}).get(ANN_CREATED, ""), d.digest),
        reverse=True,
    )
    for d in candidates:
        if asking is not None:
            asking()
        try:
            early: dict[str, bytes] = {}
            manifest = _embedded(source, d, "artifact manifest")
            if manifest is None:
                manifest = await _fetch_manifest(source, d, early)
            m = oci.decode_manifest(manifest)
            if m.subject is None or m.subject.digest != manifest_digest or not m.layers:
                raise FormatError(f"not an {artifact_type} artifact of this image")
            layer = m.layers[0]
            blob = (
                _embedded(source, layer, "document")
                or early.get(layer.digest)
                or await source.get_blob(layer.digest)
            )
            if check is not None:
                check(blob)
            return blob
        except (FormatError, IntegrityError, NotFoundError) as e:
            log.warning("%s: skipping artifact %s: %s", source.name, d.digest, e)
    return None


def _embedded(source: Source, desc: oci.Descriptor, what: str) -> bytes | None:
    """What ``desc`` embeds, checked; None (fetch it) when it embeds nothing or what does
    not check out (a log line: the fetched copy is checked in its turn)."""
    try:
        return oci.embedded(desc, MAX_EMBEDDED_READ)
    except (FormatError, IntegrityError) as e:
        log.warning("%s: embedded %s refused, fetching it: %s", source.name, what, e)
        return None


async def _fetch_manifest(source: Source, d: oci.Descriptor, early: dict[str, bytes]) -> bytes:
    """The artifact manifest ``d`` names, fetched; the document beside it into ``early``
    when the listing names its digest (our pushes do), a round trip sooner than after the
    manifest (which must then name it too)."""
    promised = (d.annotations or {}).get(ANN_CONTENT_DIGEST)
    got: list[bytes | LazyfsError] = []
    async with trio.open_nursery() as nursery:
        if promised:
            nursery.start_soon(_get_blob_into, source, promised, early)
        nursery.start_soon(_get_manifest_into, source, d.digest, got)
    if isinstance(got[0], LazyfsError):
        raise got[0]
    return got[0]


async def _get_manifest_into(source: Source, digest: str, out: list[bytes | LazyfsError]) -> None:
    try:
        out.append((await source.get_manifest(digest))[0])
    except LazyfsError as e:  # raised by the caller, outside the nursery (no group)
        out.append(e)


async def _get_blob_into(source: Source, digest: str, out: dict[str, bytes]) -> None:
    try:
        out[digest] = await source.get_blob(digest)
    except LazyfsError as e:  # the manifest decides what to fetch then
        log.info("%s: document %s not fetched early: %s", source.name, digest, e)
