"""The TOC cache: a remount reads the decoded TOC back (pack_toc's columns) and gets the
entries a fetch decodes; a damaged, foreign or older cache file is never trusted blindly."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
import trio

from lazyfs.errors import IntegrityError
from lazyfs.formats.layer import decode_layer_toc
from lazyfs.remote.local import OCILayoutSource
from lazyfs.remote.resolve import resolve_image
from lazyfs.store.tocs import LayerInfo, _CachedTOC, load_layer
from lazyfs.testing.layers import make_lazy_layout, make_tar, sample_items


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lazy_layout(
        tmp_path_factory.mktemp("toccache") / "lazy", [make_tar(sample_items())]
    )


def _load(layout: Path, tocs: Path | None, annotations: dict[str, str] | None = None) -> LayerInfo:
    async def main() -> LayerInfo:
        src = OCILayoutSource(str(layout))
        desc = (await resolve_image(src, "v1")).layers[0]
        if annotations is not None:
            desc = msgspec.structs.replace(desc, annotations=annotations)
        return await load_layer(src, desc, tocs)

    return trio.run(main)


def test_a_cached_toc_is_the_fetched_one(layout: Path, tmp_path: Path) -> None:
    fetched = _load(layout, None)
    first = _load(layout, tmp_path)
    (cached,) = tmp_path.iterdir()
    entry = msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC)
    assert entry.packed and not entry.raw
    again = _load(layout, tmp_path)
    assert first.toc == fetched.toc == again.toc
    assert cached.read_bytes() == msgspec.msgpack.encode(entry)  # read, not rewritten


def test_a_damaged_cache_is_refetched(
    layout: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fetched = _load(layout, tmp_path)
    (cached,) = tmp_path.iterdir()
    entry = msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC)
    packed = bytearray(entry.packed)
    packed[len(packed) // 2] ^= 1
    entry.packed = bytes(packed)
    cached.write_bytes(msgspec.msgpack.encode(entry))
    with caplog.at_level(logging.INFO, logger="lazyfs.store.tocs"):
        again = _load(layout, tmp_path)
    assert "does not match its digest" in caplog.text
    assert again.toc == fetched.toc
    assert msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC).packed != entry.packed


def test_an_older_cache_is_read_and_rewritten(layout: Path, tmp_path: Path) -> None:
    """A cache written before ``packed`` holds the TOC's JSON as fetched."""
    fetched = _load(layout, tmp_path)
    (cached,) = tmp_path.iterdir()
    entry = msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC)
    loc = entry.location
    layer_blob = layout / "blobs/sha256" / _load(layout, None).descriptor.digest.split(":")[1]
    raw = layer_blob.read_bytes()[loc.start : loc.end]
    assert decode_layer_toc(loc, raw).entries == fetched.toc.entries
    cached.write_bytes(msgspec.msgpack.encode({"location": loc, "raw": raw}))
    assert _load(layout, tmp_path).toc == fetched.toc
    assert msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC).packed


def test_a_cache_for_another_toc_digest_is_not_used(layout: Path, tmp_path: Path) -> None:
    fetched = _load(layout, tmp_path)
    other = {k: "sha256:" + "0" * 64 for k in fetched.descriptor.annotations or {}}
    # The manifest now promises another TOC: the cache is dropped, and the fetched TOC fails
    # that promise.
    with pytest.raises(IntegrityError, match="has digest"):
        _load(layout, tmp_path, other)
    assert not list(tmp_path.iterdir())
