"""TOC decode on random TOCs: what ``encode_toc`` writes, ``decode_toc`` reads back as the
same entries, in both formats, with the values it shares (one digest object for a one-chunk
file, one int for a chunk's end and the next chunk's offset) shared."""

from __future__ import annotations

import contextlib
import json
import random
import sys
from array import array
from typing import Literal

import msgspec
import pytest

from lazyfs.errors import FormatError
from lazyfs.formats import toc as toc_module
from lazyfs.formats.columns import RawDigests, narrow, raw_sha256
from lazyfs.formats.toc import (
    TOC,
    Chunk,
    Compression,
    Entry,
    EntryTable,
    TocBudget,
    decode_toc,
    decode_toc_table,
    encode_toc,
    has_xattr,
    pack_toc,
    table_toc,
    unpack_toc,
)

Flavour = Literal["estargz", "zstd:chunked"]


def _digest(rnd: random.Random) -> str:
    return "sha256:" + rnd.randbytes(32).hex()


def _chunks(
    rnd: random.Random, size: int, cursor: int, flavour: Flavour
) -> tuple[list[Chunk], int]:
    """Chunks tiling ``size`` bytes, laid out from ``cursor`` on in blob order (eStargz and
    zstd:chunked leave most ends implicit: the next chunk's offset)."""
    if size == 0:
        return [], cursor
    if rnd.random() < 0.6:
        return [Chunk(0, size, cursor, cursor + rnd.randint(1, 500), "")], 0
    cuts = sorted(rnd.sample(range(1, size), min(size - 1, rnd.randint(1, 4))))
    out: list[Chunk] = []
    for n, (start, end) in enumerate(zip([0, *cuts], [*cuts, size], strict=True)):
        if flavour == "zstd:chunked" and n and rnd.random() < 0.2:
            out.append(Chunk(start, end - start, 0, 0, "", zeros=True))  # a hole: nothing stored
            continue
        inner = rnd.randint(0, 100) if flavour == "estargz" and rnd.random() < 0.3 else 0
        stored = rnd.randint(1, 500)
        out.append(Chunk(start, end - start, cursor, cursor + stored, _digest(rnd), inner=inner))
        cursor += stored
    return out, cursor


def random_entries(seed: int, count: int, flavour: Flavour) -> tuple[list[Entry], int]:
    """``count`` random entries of every kind and the end of their data."""
    rnd = random.Random(seed)
    entries = [Entry(name="", type="dir", mode=0o755)]
    files: list[str] = []
    cursor = 0
    names = ["a", "b", "é", "lib", "x y", "日本"]
    for i in range(count):
        name = f"{rnd.choice(names)}{i}/{rnd.choice(names)}{i}"
        kind = rnd.choice(["dir", "reg", "reg", "reg", "symlink", "hardlink", "char", "fifo"])
        if kind == "hardlink" and not files:
            kind = "reg"
        common = {
            "mode": rnd.choice([0o644, 0o755, 0o4755, 0o1777, rnd.randint(0, 0o7777)]),
            "uid": rnd.choice([0, 0, 1000, 70_000, 2**32 - 2]),
            "gid": rnd.choice([0, 0, 1000, 65_534]),
            "uname": rnd.choice(["", "root", "user"]),
            "gname": rnd.choice(["", "root", "staff"]),
            "mtime_ns": rnd.choice([0, 1_700_000_000_000_000_000, rnd.randint(0, 2**62)]),
            "xattrs": {"user.k": rnd.randbytes(rnd.randint(0, 40))} if rnd.random() < 0.1 else {},
        }
        if kind == "reg":
            size = rnd.choice([0, rnd.randint(1, 100), rnd.randint(1, 10**7)])
            chunks, end = _chunks(rnd, size, cursor, flavour)
            if len(chunks) == 1 and not chunks[0].zeros:  # one chunk: the file's own digest
                digest = _digest(rnd)
                chunks = [Chunk(0, size, cursor, chunks[0].end, digest)]
                end = chunks[0].end
            else:
                digest = _digest(rnd) if size else ""
            cursor = max(cursor, end)
            reg = {"size": size, "digest": digest, "chunks": tuple(chunks)}
            entries.append(Entry(name=name, type="reg", **reg, **common))  # type: ignore[arg-type]
            files.append(name)
        elif kind == "symlink":
            link = rnd.choice(["../up", "/abs/target", "rel", "日本/x"])
            entries.append(Entry(name=name, type="symlink", link_name=link, **common))  # type: ignore[arg-type]
        elif kind == "hardlink":
            entries.append(Entry(name=name, type="hardlink", link_name=rnd.choice(files), **common))  # type: ignore[arg-type]
        elif kind == "char":
            dev = {"dev_major": rnd.randint(0, 4095), "dev_minor": rnd.randint(0, 2**20 - 1)}
            entries.append(Entry(name=name, type="char", **dev, **common))  # type: ignore[arg-type]
        else:
            entries.append(Entry(name=name, type=kind, **common))  # type: ignore[arg-type]
    return entries, cursor


@pytest.mark.parametrize("flavour", ["estargz", "zstd:chunked"])
@pytest.mark.parametrize("seed", range(6))
def test_random_tocs_decode_to_what_was_encoded(flavour: Flavour, seed: int) -> None:
    entries, data_end = random_entries(seed, 300, flavour)
    raw = encode_toc(entries, flavour=flavour)
    compression: Compression = "zstd" if flavour == "zstd:chunked" else "gzip"
    toc = decode_toc(raw, compression=compression, blob_size=data_end + 10, data_end=data_end)
    assert toc.entries == entries
    # Decoding twice gives equal entries again (the shared tables are per decode).
    again = decode_toc(raw, compression=compression, blob_size=data_end + 10, data_end=data_end)
    assert again.entries == entries
    by_offset = {}
    for e in toc.entries:
        if len(e.chunks) == 1:
            assert e.chunks[0].digest is e.digest  # one string for a one-chunk file
            assert e.chunks[0].size is e.size or e.size <= 256
        for c in e.chunks:
            if not c.zeros:
                by_offset[c.offset] = c.offset
    for e in toc.entries:
        for c in e.chunks:
            if not c.zeros and c.end in by_offset:
                assert c.end is by_offset[c.end]  # the end is the next chunk's offset object


@pytest.mark.parametrize("flavour", ["estargz", "zstd:chunked"])
@pytest.mark.parametrize("seed", range(6))
def test_packed_tocs_unpack_to_the_decoded_entries(flavour: Flavour, seed: int) -> None:
    """The TOC cache's columns give back what decoding the JSON gave, sharing alike."""
    entries, data_end = random_entries(seed, 300, flavour)
    compression: Compression = "zstd" if flavour == "zstd:chunked" else "gzip"
    raw = encode_toc(entries, flavour=flavour)
    toc = decode_toc(raw, compression=compression, blob_size=data_end + 10, data_end=data_end)
    toc.prefetch_end = data_end // 2
    budget = TocBudget()
    again = unpack_toc(pack_toc(toc), budget=budget)
    assert again == toc
    assert budget.entries == len(toc.entries)
    for e in again.entries:
        if len(e.chunks) == 1:
            assert e.chunks[0].digest is e.digest
        assert e.uname is sys.intern(e.uname)


def test_a_damaged_packed_toc_is_a_format_error() -> None:
    entries, data_end = random_entries(1, 50, "zstd:chunked")
    raw = encode_toc(entries, flavour="zstd:chunked")
    packed = pack_toc(decode_toc(raw, compression="zstd", blob_size=data_end))
    rnd = random.Random(2)
    budget = TocBudget()
    for _ in range(200):
        bad = bytearray(packed)
        for _ in range(rnd.randint(1, 4)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        with contextlib.suppress(FormatError):
            unpack_toc(bytes(bad), budget=budget)
    for cut in (0, 1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(FormatError, match="damaged"):
            unpack_toc(packed[:cut], budget=budget)


def test_entries_without_xattrs_share_one_empty_dict() -> None:
    entries, data_end = random_entries(3, 200, "zstd:chunked")
    toc = decode_toc(
        encode_toc(entries, flavour="zstd:chunked"), compression="zstd", blob_size=data_end
    )
    for t in (toc, unpack_toc(pack_toc(toc))):
        empty = {id(e.xattrs) for e in t.entries if not e.xattrs}
        assert len(empty) == 1


@pytest.mark.parametrize("flavour", ["estargz", "zstd:chunked"])
@pytest.mark.parametrize(("seed", "odd_digest"), [(0, ""), (1, ""), (2, "sha512:"), (3, "zero")])
def test_an_entry_table_makes_the_unpacked_entries_on_demand(
    flavour: Flavour, seed: int, odd_digest: str
) -> None:
    """Every entry made from the columns equals the unpacked one, each time it is asked for,
    from either end; whiteouts, opaque markers and hardlinks among them; digests kept as bytes
    or, when one is not a sha256 the bytes can spell, as strings."""
    entries, data_end = random_entries(seed, 300, flavour)
    if odd_digest:
        i = next(i for i, e in enumerate(entries) if len(e.chunks) == 1 and e.digest)
        e = entries[i]
        digest = "sha512:" + "ab" * 64 if odd_digest == "sha512:" else "sha256:" + "0" * 64
        chunk = msgspec.structs.replace(e.chunks[0], digest=digest)
        entries[i] = msgspec.structs.replace(e, digest=digest, chunks=(chunk,))
    target = next(e.name for e in reversed(entries) if e.type == "reg")
    entries += [
        Entry(name="lib0/.wh.gone", type="reg", mode=0o644),
        Entry(name="lib0/.wh..wh..opq", type="reg", mode=0o644),
        Entry(name="lib0/again", type="hardlink", link_name=target),
    ]
    compression: Compression = "zstd" if flavour == "zstd:chunked" else "gzip"
    raw = encode_toc(entries, flavour=flavour)
    toc = decode_toc(raw, compression=compression, blob_size=data_end + 10, data_end=data_end)
    packed = pack_toc(toc)
    table = EntryTable(packed)
    assert len(table) == len(toc.entries)
    assert list(table) == toc.entries == unpack_toc(packed).entries
    for i in random.Random(seed).sample(range(len(table)), 50):
        assert table[i] == table[i] == toc.entries[i]
        assert table[i] is not table[i]  # made on demand, not kept
        assert table[i - len(table)] == toc.entries[i]
    assert table[-3:] == toc.entries[-3:]
    with pytest.raises(IndexError):
        table[len(table)]
    # What a tree and a chunk list read without making the entries.
    assert list(table.rows()) == [(e.name, e.type) for e in toc.entries]
    assert [table.link_name(i) for i in range(len(table))] == [e.link_name for e in toc.entries]
    for key in ("user.k", "security.capability"):
        want = any(key in e.xattrs for e in toc.entries)
        assert has_xattr(table, key) == has_xattr(toc.entries, key) == want
    assert [table.stat_fields(i) for i in range(len(table))] == [
        (e.type, e.uid, e.gid, e.size, e.mtime_ns, e.dev_major, e.dev_minor) for e in toc.entries
    ]
    assert list(table.chunks()) == [c for e in toc.entries for c in e.chunks]
    assert table.mentions(".wh.") and not table.mentions("/nowhere/")
    # What a first mount keeps: the table decoded straight from the JSON, and the TOC cache's.
    data, tabled = decode_toc_table(
        raw, compression=compression, blob_size=data_end + 10, data_end=data_end
    )
    assert data == packed and isinstance(tabled.entries, EntryTable)
    assert list(tabled.entries) == toc.entries == list(table_toc(packed).entries)
    assert (tabled.compression, tabled.data_end) == (toc.compression, toc.data_end)


def test_an_entry_table_of_a_damaged_packed_toc_is_a_format_error() -> None:
    entries, data_end = random_entries(1, 50, "zstd:chunked")
    packed = pack_toc(
        decode_toc(
            encode_toc(entries, flavour="zstd:chunked"), compression="zstd", blob_size=data_end
        )
    )
    for cut in (0, 1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(FormatError, match="damaged"):
            EntryTable(packed[:cut])


# Hostile values for a wire entry's fields: each alone is refused (or accepted) by the decode.
_BAD_FIELDS: dict[str, list[object]] = {
    "name": [
        "",
        "/",
        "./",
        "a//b",
        "../x",
        "a/./b",
        "a/..",
        "x\x00y",
        "é/" * 200,
        "a" * 300,
        "...",
    ],
    "type": ["chunk", "bogus", "dir", "hardlink", "symlink", "char"],
    "size": [0, 1, 10**7, 2**62],
    "chunkSize": [1, 3, 10**9],
    "chunkOffset": [1, 7],
    "offset": [0, 10**6, 2**40],
    "endOffset": [1, 2**40],
    "innerOffset": [1, 2**33],
    "chunkDigest": ["", "md5:x"],
    "digest": ["", "sha256:" + "a" * 64],
    "linkName": ["", "/", "../a", "a" * 300, "x\x00"],
    "modtime": [
        "garbage",
        "9999-12-31T23:59:59Z",
        "2020-13-01T00:00:00Z",
        "2020-01-01T02:00:00+02:00",
    ],
    "xattrs": [{"": "AA=="}, {"user.a": "!!"}, {"user.b": "AAAA"}],
    "chunkType": ["zeros"],
    "devMajor": [1, 4095],
}


@pytest.mark.parametrize("seed", range(40))
def test_a_table_decodes_as_the_entries_do_whatever_the_toc_holds(seed: int) -> None:
    """A hostile field (or a stray chunk entry) in a random TOC: the table a mount decodes
    holds the entries the list decode gives, or both refuse the TOC with the same error; the
    budget is charged for what is kept and refunded for what is refused."""
    rnd = random.Random(seed)
    flavour: Flavour = rnd.choice(["estargz", "zstd:chunked"])
    entries, data_end = random_entries(seed, rnd.randint(5, 40), flavour)
    doc = json.loads(encode_toc(entries, flavour=flavour))
    for _ in range(12):
        wire = rnd.choice(doc["entries"])
        field = rnd.choice(list(_BAD_FIELDS))
        wire[field] = rnd.choice(_BAD_FIELDS[field])
        if rnd.random() < 0.2:
            at = rnd.randrange(len(doc["entries"]) + 1)
            doc["entries"].insert(at, {"type": "chunk", "name": "x", "chunkDigest": "sha256:"})
        raw = json.dumps(doc).encode()
        kw = {"compression": "zstd", "blob_size": data_end + 10, "data_end": data_end}
        budgets = TocBudget(), TocBudget()
        try:
            toc = decode_toc(raw, budget=budgets[0], **kw)  # type: ignore[arg-type]
        except FormatError as e:
            with pytest.raises(FormatError) as refused:
                decode_toc_table(raw, budget=budgets[1], **kw)  # type: ignore[arg-type]
            assert str(refused.value) == str(e)
            assert budgets[0].entries == budgets[1].entries == 0
            doc = json.loads(encode_toc(entries, flavour=flavour))  # start again from a good one
            continue
        packed, tabled = decode_toc_table(raw, budget=budgets[1], **kw)  # type: ignore[arg-type]
        assert list(tabled.entries) == toc.entries
        assert packed == pack_toc(toc)
        assert budgets[0].entries == budgets[1].entries > 0


@pytest.mark.parametrize("seed", range(12))
def test_rare_cases_decode_alike_one_by_one_and_by_column(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk ends to find and hardlinks to check take a step each when few, a column pass
    when many: a hostile TOC decodes to the same bytes, or the same error, either way."""
    rnd = random.Random(seed)
    flavour: Flavour = rnd.choice(["estargz", "zstd:chunked"])
    entries, data_end = random_entries(seed, 80, flavour)
    doc = json.loads(encode_toc(entries, flavour=flavour))
    for _ in range(4):
        wire = rnd.choice(doc["entries"])
        field = rnd.choice(["offset", "endOffset", "chunkOffset", "linkName", "type", "name"])
        wire[field] = rnd.choice(_BAD_FIELDS[field])
        raw = json.dumps(doc).encode()
        results: list[bytes | str] = []
        for few in (0, 10**9):
            monkeypatch.setattr(toc_module, "_FEW", few)
            try:
                results.append(
                    decode_toc_table(raw, compression="zstd", blob_size=data_end + 10)[0]
                )
            except FormatError as e:
                results.append(str(e))
        assert results[0] == results[1]


def test_a_table_is_decoded_without_making_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    entries, data_end = random_entries(5, 300, "estargz")
    entries.append(Entry(name="stargz.index.json", type="reg"))  # the writer's own: left out
    raw = encode_toc(entries, flavour="estargz")

    def no_entry(*args: object, **kwargs: object) -> None:
        raise AssertionError("an Entry was made")

    monkeypatch.setattr(toc_module, "Entry", no_entry)
    _, tabled = decode_toc_table(
        raw, compression="gzip", blob_size=data_end, reserved={"stargz.index.json"}
    )
    monkeypatch.undo()
    assert list(tabled.entries) == entries[:-1]


def test_a_tables_entries_by_name_are_made_only_when_looked_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A prefetch resolves a few hundred paths of a layer of thousands of entries.
    entries, data_end = random_entries(11, 300, "estargz")
    raw = encode_toc(entries, flavour="estargz")
    _, tabled = decode_toc_table(raw, compression="gzip", blob_size=data_end)
    made: list[object] = []
    real = toc_module.Entry

    def counted(*args: object, **kwargs: object) -> Entry:
        made.append(kwargs.get("name"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(toc_module, "Entry", counted)
    names = tabled.by_name()
    assert made == [] and len(names) == len({e.name for e in entries})
    last = {e.name: e for e in entries}
    some = entries[len(entries) // 2].name
    assert names[some] == last[some] and made == [some]
    assert "no/such/name" not in names and names.get("no/such/name") is None
    assert dict(names) == last


@pytest.mark.parametrize("seed", range(6))
def test_a_tables_files_before_an_offset_are_the_entries_files(seed: int) -> None:
    # A re-laid-out layer's prefetch set, found from the columns (only those entries made).
    entries, data_end = random_entries(seed, 200, "estargz")
    raw = encode_toc(entries, flavour="estargz")
    _, tabled = decode_toc_table(raw, compression="gzip", blob_size=data_end)
    listed = TOC(compression="gzip", entries=list(tabled.entries), data_end=tabled.data_end)
    for end in (0, 1, data_end // 3, data_end // 2, data_end + 1):
        assert tabled.files_before(end) == listed.files_before(end)


def test_times_parse_as_the_general_parser_does() -> None:
    rnd = random.Random(7)
    times = [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "2020-02-29T12:00:00Z",
        "2021-02-29T12:00:00Z",
        "2020-01-01T24:00:00Z",
        "2020-01-01T23:60:00Z",
        "2016-12-31T23:59:60Z",
        "2020-01-01T00:00:00.5Z",
        "2020-01-01T00:00:00.0123456789Z",
        "2020-01-01T00:00:00z",
        "2020-01-01T02:00:00+02:00",
        "1969-12-31T23:59:59.9Z",
        "",
        None,
    ]
    for _ in range(300):
        frac = "." + str(rnd.randint(0, 10**9 - 1)).zfill(9)[: rnd.randint(1, 9)]
        times.append(
            f"{rnd.randint(1, 9999):04d}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T"
            f"{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}"
            f"{frac if rnd.random() < 0.5 else ''}Z"
        )
    for s in times:
        try:
            want: int | str = toc_module._parse_time(s)
        except FormatError as e:
            want = str(e)
        try:
            got: int | str = toc_module._parse_times([s])[s]
        except FormatError as e:
            got = str(e)
        assert got == want, s


def test_columns_narrow_to_the_smallest_type_that_holds_them() -> None:
    rnd = random.Random(3)
    edges = [0, 1, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**62, -1, -(2**40)]
    for _ in range(200):
        values = [rnd.choice(edges) for _ in range(rnd.randint(0, 6))]
        values += [rnd.randint(0, rnd.choice([255, 65_535, 2**32 - 1])) for _ in range(5)]
        for code in ("q", "I"):
            if code == "I" and (min(values) < 0 or max(values) >= 2**32):
                continue
            got = narrow(array(code, values))
            assert got.tolist() == values
            fits = [
                c for c in "BHI" if min(values) >= 0 and max(values) < 1 << (8 * array(c).itemsize)
            ]
            want = fits[0] if fits and array(fits[0]).itemsize < array(code).itemsize else code
            assert got.typecode == want, values


def test_sha256_digests_pack_only_when_each_is_one() -> None:
    rnd = random.Random(4)
    good = ["sha256:" + rnd.randbytes(32).hex() for _ in range(5)]
    raw = raw_sha256(["", *good, ""])
    assert raw is not None
    table = RawDigests(raw)
    assert [table[i] for i in range(7)] == ["", *good, ""]
    assert raw_sha256([]) == b""
    for bad in (
        "sha256:" + "0" * 64,  # no digest spelt out
        good[0].upper(),
        "sha256:" + good[0][7:].upper(),  # the prefix as it should be, the hex not
        good[0][:-1],
        good[0] + "0",
        "sha512:" + good[0][7:],
        good[0][:20] + " " + good[0][21:],
        good[0][:20] + "é" + good[0][21:],
        "sha256:" + good[0][7:64] + "sha256:",  # a prefix inside the hex
        good[0][:-6] + "sha256",  # with the next one's ":" + 64 hex, the prefix lines up
    ):
        assert raw_sha256([good[1], bad, ":" + good[2][7:]]) is None, bad
