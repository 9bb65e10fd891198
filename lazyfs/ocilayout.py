"""OCI image layouts on disk, for the offline tools: read blobs, write blobs atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from lazyfs import oci
from lazyfs.errors import FormatError, NotFoundError

LAYOUT_FILE = '{"imageLayoutVersion":"1.0.0"}'


def parse_oci_ref(ref: str) -> tuple[Path, str | None]:
    """``oci:DIR[:TAG]`` → (DIR, TAG or None)."""
    if not ref.startswith("oci:"):
        raise FormatError(f"{ref!r} is not an OCI layout reference (oci:DIR[:TAG])")
    rest = ref[4:]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        return Path(rest), None
    return Path(path), tag


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
            _atomic_write(path, data)
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

    def write_index(self, index: oci.Index) -> None:
        _atomic_write(self.root / "index.json", msgspec.json.encode(index))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


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
