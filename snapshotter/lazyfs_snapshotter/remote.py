"""The remote-snapshot seam: which layer a Prepare is about, and who may serve it lazily.

containerd's unpacker calls Prepare with ``containerd.io/snapshot.ref`` (the chain ID the
layer will be committed as) plus the labels its client added.  :func:`parse_source` reads
either label set clients send — stargz's (``ctr-remote image rpull``) or the CRI plugin's —
into one typed :class:`RemoteSource`.  :class:`LayerFS` is what the snapshotter asks about
that layer and, later, about the chain of lazy layers under a container; lazyfs's is
:class:`lazyfs_snapshotter.lazy.LazyLayers`, and :class:`PlainLayers` (every layer "not
lazy": containerd downloads and unpacks it through Prepare/Commit) is the one without.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lazyfs.errors import LazyfsError
from lazyfs.remote.reference import parse_reference

from .locks import ChainLocks
from .metadata import MetadataStore, PendingRef, RemoteLayerRow

TARGET_LABEL = "containerd.io/snapshot.ref"
# Set on a snapshot committed by a LayerFS instead of unpacked; its value names the LayerFS.
REMOTE_LABEL = "containerd.io/snapshot/remote"

STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"

_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")


class SourceError(ValueError):
    """Remote labels are present but unusable; the layer is pulled normally."""


@dataclass(frozen=True)
class RemoteSource:
    """One layer of one image, as the Prepare labels describe it."""

    target: str  # the chain ID containerd will look for once the layer is ready
    image_ref: str
    layer_digest: str
    # Layers of the image from this one on (what stargz/CRI send; truncated by CRI at 4 KiB,
    # so possibly incomplete): a hint for prefetching, never needed to read this layer.
    image_layers: tuple[str, ...]
    manifest_digest: str | None
    label_set: str  # "stargz" or "cri" ("pending": an image looked up only at a mount)

    def pending(self) -> PendingRef:
        """This image as a way to mount the snapshot its layer names, not yet checked."""
        return PendingRef(self.image_ref, self.manifest_digest or "", self.layer_digest)

    def known_ref(self) -> str | None:
        """The image as ``HOST/REPO@DIGEST`` when the labels or the reference pin its
        manifest; None when only a tag names it (only the registry can tell which manifest)."""
        try:
            ref = parse_reference(self.image_ref)
        except LazyfsError:
            return None
        digest = self.manifest_digest or ref.digest
        return None if digest is None else by_digest(self.image_ref, digest)


def chain_id(diff_ids: Sequence[str]) -> str:
    """containerd's chain ID of a stack of layers, bottom first: the key of the snapshot that
    holds them (``sha256(parent's chain ID + " " + diff_id)``, the first layer's diff_id)."""
    chain = ""
    for diff_id in diff_ids:
        chain = diff_id if not chain else "sha256:" + hashlib.sha256(
            f"{chain} {diff_id}".encode()).hexdigest()  # fmt: skip
    return chain


def by_digest(image_ref: str, manifest_digest: str) -> str:
    """``image_ref``'s repository pinned to ``manifest_digest``: how remote snapshots record
    their images, so that no tag is looked up again.  Raises FormatError on a bad reference."""
    ref = parse_reference(image_ref)
    return f"{ref.host}/{ref.repository}@{manifest_digest}"


def _digest(value: str, label: str) -> str:
    if not _DIGEST.match(value):
        raise SourceError(f"label {label}: not a digest: {value[:80]!r}")
    return value


def _layers(value: str, label: str) -> tuple[str, ...]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    # CRI cuts the list to fit 4 KiB and may leave a partial digest at the end: drop it.
    return tuple(p for p in parts if _DIGEST.match(p))


def parse_source(labels: dict[str, str]) -> RemoteSource | None:
    """The layer a Prepare's labels describe; None when they describe none.

    Raises SourceError when a label set is there but broken.  stargz's set wins when a
    client sends both (it is the one ``ctr-remote`` sends on purpose).
    """
    target = labels.get(TARGET_LABEL, "")
    if not target:
        return None
    if STARGZ_REF in labels or STARGZ_DIGEST in labels:
        ref_label, digest_label, layers_label, manifest_label = (
            STARGZ_REF, STARGZ_DIGEST, STARGZ_LAYERS, None)
        label_set = "stargz"
    elif CRI_IMAGE_REF in labels or CRI_LAYER_DIGEST in labels:
        ref_label, digest_label, layers_label, manifest_label = (
            CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_IMAGE_LAYERS, CRI_MANIFEST_DIGEST)
        label_set = "cri"
    else:
        return None
    image_ref = labels.get(ref_label, "").strip()
    if not image_ref:
        raise SourceError(f"label {ref_label} is missing or empty")
    digest = _digest(labels.get(digest_label, "").strip(), digest_label)
    manifest = None
    if manifest_label is not None and labels.get(manifest_label):
        manifest = _digest(labels[manifest_label].strip(), manifest_label)
    return RemoteSource(
        target=target,
        image_ref=image_ref,
        layer_digest=digest,
        image_layers=_layers(labels.get(layers_label, ""), layers_label),
        manifest_digest=manifest,
        label_set=label_set,
    )


@dataclass(frozen=True)
class Readiness:
    """A LayerFS's answer to prepare(): lazy (TOCs read, ready to mount) or not, and why not;
    ``record`` is what mounting it needs later, stored with the snapshot."""

    lazy: bool
    reason: str = ""
    record: RemoteLayerRow | None = None


@dataclass(frozen=True)
class Chain:
    """The lazy layers under a snapshot: the remote snapshots from the bottom up to the one
    keyed ``chain_id`` (whose ``top`` record names the image and its depth).  ``refs``: every
    image (``HOST/REPO@DIGEST``) that named that snapshot, ``top``'s first; each has the chain
    as its lowest ``top.layer_index + 1`` layers, so any of them can mount it; so may the
    ``pending`` ones, once the registry confirms the layer's place in them."""

    chain_id: str
    top: RemoteLayerRow
    refs: tuple[str, ...] = ()
    # Images that named the top snapshot since, not yet looked up: tried after ``refs``.
    pending: tuple[PendingRef, ...] = ()
    snap_id: int = 0  # the top snapshot's row


class LayerFS(Protocol):
    """What the snapshotter needs from a lazy-layer implementation.

    Lazy layers form a prefix of a snapshot's chain (a lazy layer is never put above a plain
    one); the whole prefix is ONE read-only mount, the lowerdir under each container's
    overlay upper.  Calls come from gRPC worker threads.
    """

    name: str

    def start(self, store: MetadataStore, chains: ChainLocks) -> None:
        """Find the daemons an earlier process left running (called once, at start).
        ``chains``: the snapshotter's locks, held around mount() to recording its user; a
        chain's start and stop must hold its lock too (and nothing else slow)."""
        ...

    def prepare(self, source: RemoteSource, depth: int) -> Readiness:
        """Whether the layer (the ``depth``-th of its chain, 1 = bottom) is served lazily;
        if so its TOC, and those of the layers below it, are read and cached."""
        ...

    def mount(self, chain: Chain) -> tuple[int, Path]:
        """The chain's mount (starting its daemon if none is alive): (daemon id, directory)."""
        ...

    def release(self, daemon_id: int) -> None:
        """No snapshot uses the daemon any more: stop it and forget it."""
        ...

    def check(self) -> None:
        """Notice daemons that died and clean their mounts (new users get a new daemon)."""
        ...

    def close(self, unmount: bool) -> None:
        """The snapshotter stops: leave the daemons running, or stop them all."""
        ...


class PlainLayers:
    """No layer is lazy: containerd pulls and unpacks every layer itself."""

    name = "plain"

    def start(self, store: MetadataStore, chains: ChainLocks) -> None:
        return None

    def prepare(self, source: RemoteSource, depth: int) -> Readiness:
        return Readiness(False, "lazy layers are not enabled")

    def mount(self, chain: Chain) -> tuple[int, Path]:
        raise RuntimeError("plain layers have no remote snapshots to mount")

    def release(self, daemon_id: int) -> None:
        return None

    def check(self) -> None:
        return None

    def close(self, unmount: bool) -> None:
        return None
