"""A layer's chunks kept as columns (formats/chunklist.py) and what the store builds on them
(store/chunkmap.py: layer_chunks, DigestIndex, fingerprint; store/layerstate.py: Layer)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from lazyfs.formats.chunklist import ChunkList
from lazyfs.formats.toc import TOC, Chunk, Entry, pack_toc, table_toc
from lazyfs.store import plan
from lazyfs.store.chunkmap import ChunkMap, DigestIndex, fingerprint, layer_chunks
from lazyfs.store.layerstate import Layer


def _sha(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def _chunks(n: int, seed: int = 1) -> list[Chunk]:
    rnd = random.Random(seed)
    out, at = [], 0
    for i in range(n):
        size = rnd.choice([1, 300, 70_000, 5 * 2**30])
        stored = rnd.randint(1, 2**20)
        inner = rnd.choice([0, 0, 17])
        out.append(Chunk(rnd.choice([0, 2**20]), size, at, at + stored, _sha(i), inner=inner))
        at += stored + rnd.choice([0, 0, 5])
    return out


@pytest.mark.parametrize("spelling", ["sha256", "other"])
def test_a_chunk_list_gives_back_the_chunks_it_was_made_of(spelling: str) -> None:
    """Chunks made from the columns equal the originals, by index (either end), slice and
    iteration; digests as bytes, or as strings when one is not a lower-case sha256."""
    chunks = _chunks(300)
    chunks.append(Chunk(0, 4096, 0, 0, "", zeros=True))  # a hole, without a digest
    if spelling == "other":
        chunks[5] = Chunk(0, 1, 5, 6, "sha512:" + "ab" * 64)
    cl = ChunkList.of(chunks)
    assert len(cl) == len(chunks) and list(cl) == chunks
    assert all(cl[i] == c and cl[i - len(cl)] == c for i, c in enumerate(chunks))
    assert list(cl[10:20]) == chunks[10:20] and list(cl[::-7]) == chunks[::-7]
    assert list(cl.digests()) == [c.digest for c in chunks] == list(cl.digest_view)
    assert [cl.digest(i) for i in range(len(cl))] == [c.digest for c in chunks]
    assert list(cl.offsets) == [c.offset for c in chunks]
    assert list(cl.sizes) == [c.size for c in chunks]  # 5 GiB needs 8 bytes: kept
    assert cl.has_holes and [i for i in range(len(cl)) if cl.is_hole(i)] == [300]
    rows = [0, 7, 299, 300]
    assert list(cl.select(rows)) == [chunks[i] for i in rows]
    assert list(cl.without(rows)) == [c for i, c in enumerate(chunks) if i not in rows]
    with pytest.raises(IndexError):
        cl[len(cl)]
    assert list(ChunkList.of([])) == [] and not ChunkList.of([]).has_holes


def test_the_digest_index_answers_as_a_dict_even_when_keys_collide() -> None:
    """Digests sharing their first 8 bytes (the index's key) are told apart by the rest; a
    digest spelt otherwise (upper case, another algorithm) is not found."""
    chunks = _chunks(200)
    twin = "sha256:" + chunks[3].digest[7:23] + "f" * 48  # chunk 3's key, another digest
    chunks.append(Chunk(0, 1, 10**9, 10**9 + 1, twin))
    index = DigestIndex(ChunkList.of(chunks))
    assert all(index[c.digest] == i for i, c in enumerate(chunks))
    assert index.get("sha256:" + chunks[3].digest[7:23] + "e" * 48) is None
    assert index.get(chunks[0].digest.upper()) is None and chunks[0].digest.upper() not in index
    assert index.get("sha256:zz") is None and index.get("") is None
    assert index.repeats() == []
    strings = DigestIndex(ChunkList.of([*chunks, Chunk(0, 1, 0, 1, "md5:x")]))
    assert strings["md5:x"] == len(chunks) and strings[twin] == len(chunks) - 1


def _entries(chunks: list[list[Chunk]]) -> list[Entry]:
    out = [Entry(name="", type="dir", mode=0o755)]
    for i, cs in enumerate(chunks):
        size = sum(c.size for c in cs)
        digest = cs[0].digest if len(cs) == 1 else _sha(10_000 + i)
        out.append(Entry(name=f"f{i}", type="reg", size=size, digest=digest, chunks=tuple(cs)))
        out.append(Entry(name=f"d{i}", type="dir", mode=0o755))
    return out


def test_layer_chunks_are_the_first_of_each_digest_without_holes() -> None:
    """The map's bit order: repeats and holes dropped, first occurrences kept in TOC order,
    from a list of entries and from a table alike; a hole's digest does not take the place
    of the chunk that really holds it."""
    a, b, c = (Chunk(0, 10, 10 * i, 10 * i + 10, _sha(i)) for i in range(3))
    hole = Chunk(10, 5, 0, 0, c.digest, zeros=True)
    files = [[a], [Chunk(0, 10, 10, 20, b.digest), hole], [a], [c], [b]]
    toc = TOC(compression="zstd", entries=_entries(files), data_end=100)
    want = [a, Chunk(0, 10, 10, 20, b.digest), c]
    assert list(layer_chunks(toc)) == want
    assert list(layer_chunks(table_toc(pack_toc(toc)))) == want
    # One chunk a file: the table's file digests are shared, not copied.
    toc = TOC(compression="zstd", entries=_entries([[a], [b], [a], [c]]), data_end=100)
    table = table_toc(pack_toc(toc))
    assert list(layer_chunks(table)) == [a, b, c] == list(layer_chunks(toc))
    assert DigestIndex(layer_chunks(table))[c.digest] == 2
    # Many repeats: the rows kept are picked rather than the others cut.
    many = [[Chunk(0, 1, i % 3, i % 3 + 1, _sha(i % 3))] for i in range(600)]
    toc = TOC(compression="zstd", entries=_entries(many), data_end=10)
    assert [x.digest for x in layer_chunks(table_toc(pack_toc(toc)))] == [_sha(i) for i in range(3)]


def test_a_tables_few_chunks_of_their_own_take_slots_after_the_files_digests() -> None:
    """A table whose files have one chunk each but for one file of several (chunks with
    digests of their own): its chunk list keeps the files' digests and those few after them,
    each chunk's slot its file's, not a copy of a digest per chunk; the same chunks, digest
    lines, index and map order as the entries give."""
    ones = [[Chunk(0, 10, 10 * i, 10 * i + 10, _sha(i))] for i in range(40)]
    several = [Chunk(0, 4, 400, 404, _sha(100)), Chunk(4, 6, 404, 410, _sha(101))]
    toc = TOC(compression="zstd", entries=_entries([*ones[:20], several, *ones[20:]]), data_end=500)
    table = table_toc(pack_toc(toc))
    cl = table.entries.chunks()  # type: ignore[attr-defined]
    want = [c for e in toc.entries for c in e.chunks]
    assert list(cl) == want and list(cl.digests()) == [c.digest for c in want]
    assert cl._slots is not None and len(cl._raw) == 32 * (len(toc.entries) + 2)
    assert fingerprint(cl.digest_view) == fingerprint([c.digest for c in want])
    index = DigestIndex(cl)
    assert all(index[c.digest] == i for i, c in enumerate(want))
    assert list(layer_chunks(table)) == want


def test_the_fingerprint_is_the_one_maps_were_written_with() -> None:
    """Fed in batches, the map's fingerprint is still sha256 over the digests, each followed
    by a newline: maps persisted before stay valid."""
    for n in (0, 1, 4096, 9000):
        digests = [_sha(i) for i in range(n)]
        text = "\n".join(digests) + "\n" if digests else ""
        assert fingerprint(digests) == hashlib.sha256(text.encode()).hexdigest()[:32]


def test_a_layer_out_of_blob_order_plans_from_sorted_columns(tmp_path: Path) -> None:
    """A TOC whose chunks are not in blob order: the layer's offset order is sorted, bisect
    and the planners walk it, and its stats come from the columns."""
    chunks = _chunks(50, seed=3)
    shuffled = chunks[:]
    random.Random(4).shuffle(shuffled)
    toc = TOC(compression="zstd", entries=_entries([[c] for c in shuffled]), data_end=2**40)
    digests = [c.digest for c in shuffled]
    layer = Layer("sha256:" + "a" * 64, None, toc, ChunkMap(tmp_path / "m", "x", digests))  # type: ignore[arg-type]
    assert list(layer.chunks) == shuffled and list(layer.by_offset) == chunks
    assert list(layer.offsets) == [c.offset for c in chunks]
    assert layer.stats.bytes_total == sum(c.size for c in chunks)
    layer.set_ready(0)
    assert layer.stats.bytes_ready == shuffled[0].size
    got = plan.plan_requests(layer, [chunks[10]], 2**30, 2**62, lambda c: False)
    # A range's chunks are its own plus every one wholly inside it, in blob order.
    assert got == [(chunks[10].offset, chunks[10].end, [chunks[10]])]
    wide = plan.plan_requests(layer, [chunks[10], chunks[12]], 2**30, 2**62, lambda c: False)
    assert wide[0][2] == [chunks[10], chunks[12], chunks[11]]
    after = plan.amplify(layer, [chunks[10]], chunks[13].end - chunks[10].end, lambda c: False)
    assert after == chunks[11:14]
    behind = plan.amplify(layer, [chunks[10]], 1, lambda c: False, chunks[10].offset)
    assert behind == chunks[9::-1]


def test_a_chunk_lists_digest_lines_are_what_the_fingerprint_hashes() -> None:
    """The fingerprint of a chunk list's view (its text made at once) is the one fed digest
    by digest, for digests as bytes, picked by slot (a table's), spelt otherwise, or with a
    hole's empty digest among them."""
    chunks = _chunks(300)
    cl = ChunkList.of(chunks)
    hole = ChunkList.of([*chunks[:5], Chunk(0, 4096, 0, 0, "", zeros=True)])
    other = ChunkList.of([*chunks[:5], Chunk(0, 1, 5, 6, "sha512:" + "ab" * 64)])
    picked = cl.select([4, 4, 0, 299, 7])  # shares the digests' bytes, picked by slot
    for view in (cl, hole, other, picked, cl.without([0, 299]), ChunkList.of([])):
        text = "".join(d + "\n" for d in view.digests())
        assert view.digest_lines() == text
        assert fingerprint(view.digest_view) == fingerprint(iter(list(view.digests())))
        assert fingerprint(view.digest_view) == hashlib.sha256(text.encode()).hexdigest()[:32]


class _Counted(list[str]):
    """Digests that count how often they are walked."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().__iter__()


def test_a_map_not_kept_does_not_walk_the_digests(tmp_path: Path) -> None:
    """A cold mount loads a map that does not exist: its fingerprint (a pass over every
    digest) waits until the map is written, and is the same then."""
    digests = _Counted(_sha(i) for i in range(50))
    m = ChunkMap.load(tmp_path / "m", "x", digests)
    assert digests.walks == 0 and m.count == 50
    m.set(3)
    (tmp_path / "m").write_bytes(m.snapshot())
    assert digests.walks == 1 and m.fingerprint == fingerprint(list(digests))
    again = ChunkMap.load(tmp_path / "m", "x", _Counted(digests))
    assert again[3] and again.ready == 1


def test_an_index_without_some_rows_is_the_index_made_afresh() -> None:
    """``DigestIndex.without``: the repeats' rows dropped from an index (what a layer's map
    keeps) give the index a fresh sort would, whether or not the rows' bits shrink."""
    for n, rows in ((300, [0, 5, 6, 299]), (257, [3]), (5, [0, 1, 2, 3, 4]), (40, [])):
        cl = ChunkList.of(_chunks(n))
        kept = cl.without(rows)
        got = DigestIndex(cl).without(rows, kept)
        assert list(got._sorted) == list(DigestIndex(kept)._sorted)
        assert all(got[kept.digest(i)] == i for i in range(len(kept)))
