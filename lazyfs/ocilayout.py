"""OCI image layouts on disk: read blobs and manifests, write blobs and indexes atomically.

The one layout reader/writer of the project: ``lazyfs convert`` and the test, demo and
benchmark image builders all write layouts through :class:`Layout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import FormatError, NotFoundError

LAYOUT_FILE = '{"imageLayoutVersion":"1.0.0"}'


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / oci.check_digest(digest)

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: missing blob {digest}") from None
        return oci.verify(data, digest, f"{self.root}: blob")

    def index(self) -> oci.Index:
        try:
            return oci.decode_index((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: not an OCI layout (no index.json)") from None

    def find(self, tag: str | None) -> oci.Descriptor:
        """The top-level descriptor for ``tag`` (or the only one when no tag is given)."""
        manifests = self.index().manifests
        if tag is None:
            if len(manifests) != 1:
                raise FormatError(f"{self.root}: {len(manifests)} images in the layout; name a tag")
            return manifests[0]
        for d in manifests:
            if (d.annotations or {}).get(oci.ANN_REF_NAME) == tag:
                return d
        raise NotFoundError(f"{self.root}: no image tagged {tag!r}")

    @contextmanager
    def open_blob(self, digest: str) -> Iterator[BinaryIO]:
        try:
            f = self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: missing blob {digest}") from None
        with f:
            yield f

    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text(LAYOUT_FILE)

    def write_blob(self, data: bytes) -> oci.Descriptor:
        digest = oci.sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write(path, data)
        return oci.Descriptor(mediaType="", digest=digest, size=len(data))

    @contextmanager
    def blob_writer(self) -> Iterator[PendingBlob]:
        """A temporary file in the blob directory, removed unless committed under its digest."""
        fd, name = tempfile.mkstemp(dir=self.root / "blobs" / "sha256", prefix=".tmp-")
        pending = PendingBlob(os.fdopen(fd, "w+b"), Path(name), self)
        try:
            yield pending
        finally:
            pending.file.close()
            pending.path.unlink(missing_ok=True)

    def put_json(self, doc: Mapping[str, Any]) -> tuple[str, int]:
        """Store a JSON document (keys sorted: the same document, the same digest)."""
        d = self.write_blob(json.dumps(doc, sort_keys=True).encode())
        return d.digest, d.size

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a file as a blob, hard-linked when the filesystem allows (big layers)."""
        h = hashlib.sha256()
        with path.open("rb") as f:
            while data := f.read(4 << 20):
                h.update(data)
        digest = "sha256:" + h.hexdigest()
        target = self.blob_path(digest)
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
        return digest, path.stat().st_size

    def write_top(self, descriptors: Sequence[Mapping[str, Any]]) -> None:
        """Write ``index.json`` listing ``descriptors`` (JSON as given, keys sorted)."""
        doc = {"schemaVersion": 2, "manifests": list(descriptors)}
        atomic_write(self.root / "index.json", json.dumps(doc, sort_keys=True).encode())

    def manifest(self, tag: str | None = None) -> oci.Manifest:
        """The image manifest ``tag`` names (or the only one)."""
        return oci.decode_manifest(self.read_blob(self.find(tag).digest))

    def write_index(self, index: oci.Index) -> None:
        atomic_write(self.root / "index.json", msgspec.json.encode(index))


@dataclass
class PendingBlob:
    file: BinaryIO
    path: Path
    layout: Layout

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self, digest: str) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        os.replace(self.path, self.layout.blob_path(digest))


class HashingReader:
    """Wraps a file; hashes what is read so the source blob is verified in one pass."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()
