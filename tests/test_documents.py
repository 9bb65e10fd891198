"""The document cache (store/documents.py): written without fsync, safe because every load
checks the document against its digest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from lazyfs import oci
from lazyfs.store.documents import CachingSource
from tests.test_store import MemSource

DOC = b'{"schemaVersion": 2, "config": "a document"}'
DIGEST = oci.sha256_digest(DOC)


class _Counting(MemSource):
    def __init__(self) -> None:
        super().__init__({DIGEST: DOC})
        self.fetches = 0

    async def get_blob(self, digest: str) -> bytes:
        self.fetches += 1
        return await super().get_blob(digest)


def test_documents_are_kept_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold mount keeps five documents on its way to readiness, on the event loop: an fsync
    each cost 1-90 ms here, for files the digest check makes safe without one."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    inner = _Counting()
    src = CachingSource(inner, tmp_path)
    assert trio.run(src.get_blob, DIGEST) == DOC
    assert (tmp_path / oci.check_digest(DIGEST)).read_bytes() == DOC
    assert synced == []
    assert trio.run(src.get_blob, DIGEST) == DOC
    assert inner.fetches == 1  # the kept copy served the second


@pytest.mark.parametrize("damage", ["torn", "flipped", "empty"])
def test_a_damaged_kept_document_is_fetched_again(tmp_path: Path, damage: str) -> None:
    """What an fsync would have prevented after a power loss (a file with its name but not
    all of its bytes) is caught by the digest and fetched again, never served."""
    inner = _Counting()
    src = CachingSource(inner, tmp_path)
    trio.run(src.get_blob, DIGEST)
    path = tmp_path / oci.check_digest(DIGEST)
    data = {"torn": DOC[: len(DOC) // 2], "flipped": DOC.replace(b"a", b"b", 1), "empty": b""}
    path.write_bytes(data[damage])
    assert trio.run(src.get_blob, DIGEST) == DOC
    assert inner.fetches == 2
    assert path.read_bytes() == DOC  # kept again, whole
