"""The remote-snapshot seam: which layer a Prepare is about, and who may serve it lazily.

containerd's unpacker calls Prepare with ``containerd.io/snapshot.ref`` (the chain ID the
layer will be committed as) plus the labels its client added.  :func:`parse_source` reads
either label set clients send — stargz's (``ctr-remote image rpull``) or the CRI plugin's —
into one typed :class:`RemoteSource`.  :class:`LayerFS` is what the snapshotter asks about
that layer; :class:`PlainLayers` (every layer "not lazy": containerd downloads and unpacks
it through Prepare/Commit) is the only implementation until lazyfs plugs in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    label_set: str  # "stargz" or "cri"


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
    """A LayerFS's answer to prepare(): lazy (ready to mount) or not, and why not."""

    lazy: bool
    reason: str = ""


class LayerFS(Protocol):
    """What the snapshotter needs from a lazy-layer implementation.

    *layer_dir* is the snapshot's directory (``ROOT/snapshots/ID``), which the LayerFS may
    use for its own state.  Calls come from gRPC worker threads; an implementation on trio
    bridges with ``trio.from_thread.run`` to its own trio thread.
    """

    name: str

    def prepare(self, source: RemoteSource, layer_dir: Path) -> Readiness:
        """Decide whether the layer is served lazily; if so, get it ready (TOC read)."""
        ...

    def mount(self, layer_dir: Path) -> Path:
        """The directory to use as this layer's lowerdir (mounting it if needed)."""
        ...

    def check(self, layer_dir: Path) -> bool:
        """Whether the layer's mount is alive."""
        ...

    def unmount(self, layer_dir: Path) -> None:
        """Release the layer (its snapshot is being removed)."""
        ...


class PlainLayers:
    """No layer is lazy: containerd pulls and unpacks every layer itself."""

    name = "plain"

    def prepare(self, source: RemoteSource, layer_dir: Path) -> Readiness:
        return Readiness(False, "lazy layers are not enabled")

    def mount(self, layer_dir: Path) -> Path:
        return layer_dir / "fs"

    def check(self, layer_dir: Path) -> bool:
        return True

    def unmount(self, layer_dir: Path) -> None:
        return None
