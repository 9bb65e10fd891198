"""The OCI image model: media types, descriptors, manifests, indexes, configs.

msgspec Structs validated at the edge; unknown fields are kept out of the model but the raw
bytes of every document are what gets hashed and stored, so nothing is lost on round trips.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import msgspec

from lazyfs.errors import FormatError, IntegrityError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_TYPES = {
    MT_LAYER_TAR: "tar",
    MT_LAYER_GZIP: "gzip",
    MT_LAYER_ZSTD: "zstd",
    MT_DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)

# Layer annotations written by the lazy formats.
ANN_ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ANN_ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ANN_ZSTD_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ANN_ZSTD_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ANN_ZSTD_CHECKSUM_OLD = "io.containers.zstd-chunked.manifest-checksum"
ANN_ZSTD_POSITION_OLD = "io.containers.zstd-chunked.manifest-position"
ANN_ZSTD_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
# lazyfs' own: sha256 of the uncompressed tar stream, so a reader can check diff_ids cheaply.
ANN_LAZYFS_FORMAT = "dev.lazyfs.layer.format"
# lazyfs convert --prefetch: ``OFFSET:LENGTH`` of a re-laid-out layer's prefetched files (they
# come first), so a cold open can request them beside the TOC (lazyfs.store.earlyrange).
ANN_LAZYFS_PREFETCH_RANGE = "dev.lazyfs.prefetch-range"


class Platform(msgspec.Struct, omit_defaults=True):
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = msgspec.field(default=None, name="os.version")

    def matches(self, want: str) -> bool:
        """``want`` is ``os/arch[/variant]``."""
        parts = want.split("/")
        if len(parts) < 2 or parts[0] != self.os or parts[1] != self.architecture:
            return False
        return len(parts) < 3 or (self.variant or "") == parts[2]

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


class Descriptor(msgspec.Struct, omit_defaults=True):
    mediaType: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    urls: list[str] | None = None
    artifactType: str | None = None
    #: the content itself, base64 (image-spec: an embedding a reader may use instead of
    #: fetching it, once checked against ``digest`` and ``size``); see :func:`embedded`
    data: str | None = None


class Manifest(msgspec.Struct, omit_defaults=True):
    schemaVersion: int
    config: Descriptor
    layers: list[Descriptor]
    mediaType: str | None = None
    annotations: dict[str, str] | None = None
    subject: Descriptor | None = None
    artifactType: str | None = None


class Index(msgspec.Struct, omit_defaults=True):
    schemaVersion: int
    manifests: list[Descriptor]
    mediaType: str | None = None
    annotations: dict[str, str] | None = None


class RootFS(msgspec.Struct):
    type: str
    diff_ids: list[str]


class ImageConfig(msgspec.Struct):
    """Only the part of the config lazyfs reads; the rest is carried as raw JSON."""

    rootfs: RootFS
    architecture: str = ""
    os: str = ""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Validate a digest string; return its hex part.  Only sha256 is accepted."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise FormatError(f"unsupported or malformed digest {digest!r}")
    return hexpart


def verify(data: bytes, digest: str, what: str = "blob") -> bytes:
    check_digest(digest)
    got = sha256_digest(data)
    if got != digest:
        raise IntegrityError(f"{what} {digest} has digest {got}")
    return data


def embedded(desc: Descriptor, limit: int) -> bytes | None:
    """The content ``desc`` embeds (its ``data``), or None when it embeds none.  Checked as
    fetched content is: a size above ``limit`` or other than ``desc.size``, bad base64 or a
    digest that is not ``desc.digest`` raise (FormatError, IntegrityError), and the caller
    fetches the content instead."""
    if desc.data is None:
        return None
    if not 0 <= desc.size <= limit:
        raise FormatError(f"embedded {desc.digest}: {desc.size} bytes, more than {limit}")
    if len(desc.data) != 4 * ((desc.size + 2) // 3):  # before decoding: a bound, not a hope
        raise FormatError(f"embedded {desc.digest}: not {desc.size} bytes of base64")
    try:
        data = base64.b64decode(desc.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"embedded {desc.digest}: bad base64: {e}") from None
    if len(data) != desc.size:
        raise FormatError(f"embedded {desc.digest}: {len(data)} bytes, not {desc.size}")
    return verify(data, desc.digest, "embedded content")


def embed(data: bytes) -> str:
    """``data`` as a descriptor's ``data`` field."""
    return base64.b64encode(data).decode("ascii")


def decode_manifest(data: bytes) -> Manifest:
    try:
        return msgspec.json.decode(data, type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise FormatError(f"bad image manifest: {e}") from e


def decode_index(data: bytes) -> Index:
    try:
        return msgspec.json.decode(data, type=Index)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise FormatError(f"bad image index: {e}") from e


def decode_config(data: bytes) -> ImageConfig:
    try:
        return msgspec.json.decode(data, type=ImageConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise FormatError(f"bad image config: {e}") from e


def sniff_media_type(data: bytes, declared: str | None = None) -> str:
    """The media type of a manifest document: declared, or from its ``mediaType`` field, or by
    shape (an index has ``manifests``)."""
    if declared and declared not in ("application/json", "application/octet-stream"):
        return declared
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise FormatError(f"manifest is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise FormatError("manifest is not a JSON object")
    mt = raw.get("mediaType")
    if isinstance(mt, str):
        return mt
    return MT_OCI_INDEX if "manifests" in raw else MT_OCI_MANIFEST
