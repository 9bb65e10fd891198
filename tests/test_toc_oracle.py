"""An independent oracle for the TOC decode, a table's chunk list and the tree's build.

The reference here reads a TOC's JSON with the standard ``json`` module and applies the
format's rules entry by entry in plain Python (as the eStargz and zstd:chunked documents
describe them and lazyfs words its own choices), with no code shared with
``lazyfs.formats.toc``.  Whatever the columnar decode does to be quick, its entries, a
table's rows and chunk list, the chunk list with rows cut out, the layer's unique chunks and
the merged tree must all be what this reference gives, byte for byte, for the peer-made
layers, TOCs written by hand and many generated ones (names with ``.wh.`` inside, unicode,
repeats, entries out of order, chunk entries with their own digests, holes, numbers at the
edge of every array width).  Run as a script on layer blobs (``python -m
tests.test_toc_oracle BLOB...``), it checks theirs too (the bench images' layers).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from lazyfs.errors import FormatError
from lazyfs.formats.layer import TAIL_SIZE, locate_toc, toc_json
from lazyfs.formats.toc import (
    TOC,
    Chunk,
    Entry,
    TocBudget,
    decode_toc,
    decode_toc_table,
    table_toc,
    unpack_toc,
)
from lazyfs.fs.tree import Tree
from lazyfs.store.chunkmap import indexed_chunks

PEER = Path(__file__).parent / "data" / "peer"
RESERVED = frozenset({"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"})
LANDMARK = ".prefetch.landmark"

# A chunk as a tuple: file offset, size, blob offset, end, digest, inner offset, hole.
RefChunk = tuple[int, int, int, int, str, int, bool]


# The wire's numbers and their ranges (uid 2**32 - 1 means "no change" to chown).
BOUNDS = {
    "uid": 2**32 - 2,
    "gid": 2**32 - 2,
    "size": 2**62,
    "mode": 2**64,
    "devMajor": 2**12 - 1,
    "devMinor": 2**20 - 1,
    "offset": 2**62,
    "endOffset": 2**62,
    "innerOffset": 2**62,
    "chunkOffset": 2**62,
    "chunkSize": 2**62,
}


class Refused(Exception):
    """The reference refuses the TOC."""


# -- the reference decode ---------------------------------------------------------------------


def ref_name(name: str) -> str:
    """A layer path made relative and plain; refused if it is absolute or leaves the root."""
    if "\x00" in name or name.startswith("/"):
        raise Refused(name)
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise Refused(name)
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def ref_time(text: str | None) -> int:
    """RFC 3339 with up to nanoseconds, as nanoseconds since the epoch (0 for none)."""
    if not text:
        return 0
    date, _, rest = text.partition("T")
    clock, frac, zone = rest[:8], "", rest[8:]
    if zone.startswith("."):
        digits = len(zone) - len(zone[1:].lstrip("0123456789"))
        frac, zone = zone[1:digits], zone[digits:]
    if zone in ("Z", "z", ""):
        zone = "+00:00"
    try:
        when = dt.datetime.fromisoformat(f"{date}T{clock}{zone}")
    except ValueError:
        raise Refused(text) from None
    return int(when.timestamp()) * 10**9 + int((frac or "0").ljust(9, "0"))


def ref_xattrs(d: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in {**(d.get("xattrs") or {}), **(d.get("lazyfsXattrs") or {})}.items():
        if not key or len(key.encode()) > 255:
            raise Refused(key)
        out[key] = base64.b64decode(value, validate=True)
        if len(out[key]) > 65536:
            raise Refused(key)
    return out


def ref_decode(
    doc: bytes, data_end: int, reserved: frozenset[str] = frozenset(), landmark: str = ""
) -> tuple[list[dict[str, Any]], int]:
    """The entries (dicts with Entry's fields, chunks as tuples) and the prefetch end."""
    wire = json.loads(doc)["entries"]
    entries: list[dict[str, Any]] = []
    file: dict[str, Any] | None = None  # the file the next "chunk" entry may continue
    pending: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []  # entry, file, wire
    for w in wire:
        kind = w["type"]
        if kind == "chunk":
            for key, top in BOUNDS.items():
                if not 0 <= w.get(key, 0) <= top:
                    raise Refused(key)
            if file is None:
                raise Refused("a chunk entry not after a file with content")
            pending.append((file, w, w))
            continue
        if kind not in ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo"):
            raise Refused(kind)
        for key, top in BOUNDS.items():
            if not 0 <= w.get(key, 0) <= top:
                raise Refused(key)
        name = ref_name(w["name"])
        e: dict[str, Any] = {
            "name": name,
            "type": kind,
            "mode": w.get("mode", 0) & 0o7777,
            "uid": w.get("uid", 0),
            "gid": w.get("gid", 0),
            "uname": w.get("userName", ""),
            "gname": w.get("groupName", ""),
            "size": w.get("size", 0) if kind == "reg" else 0,
            "mtime_ns": ref_time(w.get("modtime")),
            "link_name": "",
            "dev_major": 0,
            "dev_minor": 0,
            "xattrs": ref_xattrs(w),
            "digest": w.get("digest", ""),
            "chunks": [],
        }
        link = w.get("linkName", "")
        e["link_name"] = ref_name(link) if kind == "hardlink" and link else link
        if kind in ("char", "block"):
            e["dev_major"], e["dev_minor"] = w.get("devMajor", 0), w.get("devMinor", 0)
        entries.append(e)
        file = e if kind == "reg" and e["size"] > 0 else None
        if file is not None:
            pending.append((e, w, w))
    # Each chunk's end: its file's endOffset for a file's last chunk where given, else the
    # next distinct chunk offset after its own, or where the data ends.
    starts = sorted({w.get("offset", 0) for _, w, _ in pending} | {data_end})
    for n, (e, w, _) in enumerate(pending):
        first = w["type"] != "chunk"
        last = n + 1 == len(pending) or pending[n + 1][1]["type"] != "chunk"
        head = (
            w
            if first
            else next(
                hw for he, hw, _ in reversed(pending[:n]) if he is e and hw["type"] != "chunk"
            )
        )
        offset = w.get("offset", 0)
        file_offset = w.get("chunkOffset", 0)
        size = w.get("chunkSize", 0) or e["size"] - file_offset
        zeros = w.get("chunkType", "") == "zeros"
        digest = w.get("chunkDigest", "") or (e["digest"] if size == e["size"] else "")
        if not digest and not zeros:
            raise Refused("a chunk without digest")
        end = head.get("endOffset", 0) if last else 0
        if not end and not zeros:
            later = [s for s in starts if s > offset]
            end = later[0] if later else 0
        e["chunks"].append((file_offset, size, offset, end, digest, w.get("innerOffset", 0), zeros))
    ref_validate(entries, data_end)
    prefetch_end = 0
    kept = []
    for e in entries:
        if e["name"] in reserved:
            if e["name"] == landmark and e["chunks"]:
                prefetch_end = e["chunks"][0][2]
            continue
        kept.append(e)
    for e in kept:
        e["chunks"] = tuple(e["chunks"])
    return kept, prefetch_end


def ref_validate(entries: list[dict[str, Any]], data_end: int) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for e in entries:
        raw = e["name"].encode("utf-8", "surrogateescape")
        if len(raw) >= 4096 or any(len(p) > 255 for p in raw.split(b"/")):
            raise Refused(e["name"][:50])
        if e["name"] == "" and e["type"] != "dir":
            raise Refused("root")
        pos = 0
        for fo, size, offset, end, _, inner, zeros in e["chunks"]:
            if fo != pos or size <= 0:
                raise Refused("tiling")
            if not zeros and not (0 <= offset < end <= data_end):
                raise Refused("outside")
            if not zeros and inner + size > 4 * 1024**3:
                raise Refused("chunk cap")
            pos += size
        if e["chunks"] and pos != e["size"]:
            raise Refused("coverage")
        if e["type"] == "hardlink":
            target = seen.get(e["link_name"])
            if target is not None and target["type"] == "dir":
                raise Refused("hardlink to a directory")
        seen[e["name"]] = e


def entry_dict(e: Entry) -> dict[str, Any]:
    return {
        "name": e.name,
        "type": e.type,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "uname": e.uname,
        "gname": e.gname,
        "size": e.size,
        "mtime_ns": e.mtime_ns,
        "link_name": e.link_name,
        "dev_major": e.dev_major,
        "dev_minor": e.dev_minor,
        "xattrs": dict(e.xattrs),
        "digest": e.digest,
        "chunks": tuple(map(as_tuple, e.chunks)),
    }


def as_tuple(c: Chunk) -> RefChunk:
    return (c.file_offset, c.size, c.offset, c.end, c.digest, c.inner, c.zeros)


# -- the reference tree -----------------------------------------------------------------------


class RefNode:
    """One inode of the reference tree: the entry it shows (None: an implicit directory)."""

    def __init__(self, entry: dict[str, Any] | None, is_dir: bool) -> None:
        self.entry = entry
        self.is_dir = is_dir


def ref_tree(layers: list[list[dict[str, Any]]]) -> dict[str, RefNode]:
    """The layers (bottom first) applied one on another as paths: each layer's whiteouts
    first (they act on the layers beneath), then its entries in order, a later one replacing
    an earlier at its path (a directory over a directory gives it its entry)."""
    paths: dict[str, RefNode] = {"": RefNode(None, True)}

    def remove(path: str, within: bool = False) -> None:
        for p in [p for p in paths if p and (p.startswith(path + "/") if path else True)]:
            del paths[p]
        if not within:
            paths.pop(path, None)

    def parents(path: str) -> None:
        parts = path.split("/")
        for k in range(1, len(parts)):
            p = "/".join(parts[:k])
            node = paths.get(p)
            if node is None or not node.is_dir:
                remove(p)
                paths[p] = RefNode(None, True)

    for entries in layers:
        for e in entries:
            dirname, _, base = e["name"].rpartition("/")
            if base.startswith(".wh."):
                if dirname:
                    parents(e["name"])
                    if not paths[dirname].is_dir:
                        remove(dirname)
                        paths[dirname] = RefNode(None, True)
                    if dirname not in paths:
                        paths[dirname] = RefNode(None, True)
                if base == ".wh..wh..opq":
                    remove(dirname, within=True)
                else:
                    gone = f"{dirname}/{base[4:]}" if dirname else base[4:]
                    remove(gone)
        for e in entries:
            name = e["name"]
            if name.rpartition("/")[2].startswith(".wh."):
                continue
            if name == "":
                paths[""].entry = e
                continue
            parents(name)
            old = paths.get(name)
            if e["type"] == "hardlink":
                target = paths.get(e["link_name"])
                if target is None or target.is_dir:
                    # lazyfs may still accept it (a layer above hiding the link): the
                    # reference has no word on such a stack.
                    raise Refused(f"hardlink {name!r} to missing {e['link_name']!r}")
                if old is target:
                    continue
                remove(name)
                paths[name] = target
                continue
            if old is not None and old.is_dir and e["type"] == "dir":
                old.entry = e
                continue
            remove(name)
            paths[name] = RefNode(e, e["type"] == "dir")
    return paths


def tree_shape(tree: Tree) -> dict[str, tuple[Any, ...]]:
    """Each path's entry (None for an implicit directory) and the first path of its inode."""
    first: dict[int, str] = {}
    out = {}
    for path, node in tree.walk():
        first.setdefault(node.ino, path)
        e = None if node.implicit() else node.entry
        out[path] = (node.is_dir, None if e is None else entry_dict(e), first[node.ino])
    return out


def ref_shape(paths: dict[str, RefNode]) -> dict[str, tuple[Any, ...]]:
    first: dict[int, str] = {}
    out = {}
    for path in sorted(paths, key=lambda p: tuple(p.split("/")) if p else ()):
        node = paths[path]
        first.setdefault(id(node), path)
        out[path] = (node.is_dir, node.entry, first[id(node)])
    return out


# -- the checks --------------------------------------------------------------------------------


def check_toc(
    doc: bytes, compression: Any, data_end: int, *, cut_seed: int = 0
) -> list[dict[str, Any]] | None:
    """``doc`` decoded every way lazyfs decodes it is what the reference reads, or refused
    by both.  The reference's entries (None if refused)."""
    try:
        want, prefetch_end = ref_decode(doc, data_end, RESERVED, LANDMARK)
    except (Refused, KeyError, ValueError, TypeError):
        want = None
    kw: dict[str, Any] = dict(
        compression=compression, blob_size=data_end, reserved=RESERVED, landmark=LANDMARK
    )
    if want is None:
        with pytest.raises(FormatError):
            decode_toc(doc, **kw)
        with pytest.raises(FormatError):
            decode_toc_table(doc, **kw)
        return None
    toc = decode_toc(doc, **kw)
    assert [entry_dict(e) for e in toc.entries] == want
    assert toc.prefetch_end == prefetch_end
    budget = TocBudget(max_bytes=1 << 30)
    packed, table_of = decode_toc_table([doc], **kw, budget=budget)
    # The bound charged before the decode given back: the wire's entries stay charged, and
    # a budget of exactly them is enough (one fewer is not).
    wire_count = len(json.loads(doc)["entries"])
    assert budget.entries == wire_count
    # (The bound the decode charges first when the JSON's length does not fit: its "{"s.)
    decode_toc_table(doc, **kw, budget=TocBudget(max_entries=doc.count(b"{")))
    with pytest.raises(FormatError, match="entries"):
        decode_toc_table(doc, **kw, budget=TocBudget(max_entries=wire_count - 1))
    for t in (table_of, table_toc(packed), unpack_toc(packed)):
        assert [entry_dict(e) for e in t.entries] == want
        assert t.prefetch_end == prefetch_end and t.data_end == data_end
    table = table_of.entries
    assert list(table.rows()) == [(e["name"], e["type"]) for e in want]  # type: ignore[attr-defined]
    chunks = [c for e in want for c in e["chunks"]]
    listed = table.chunks()  # type: ignore[attr-defined]
    assert [as_tuple(c) for c in listed] == chunks
    assert [listed.digest(i) for i in range(len(chunks))] == [c[4] for c in chunks]
    assert list(listed.digests()) == [c[4] for c in chunks]
    assert listed.digest_lines() == "".join(c[4] + "\n" for c in chunks)
    rnd = random.Random(cut_seed)
    for _ in range(3):
        rows = sorted(rnd.sample(range(len(chunks)), rnd.randint(0, min(len(chunks), 5))))
        cut = listed.without(rows)
        gone = set(rows)
        assert [as_tuple(c) for c in cut] == [c for i, c in enumerate(chunks) if i not in gone]
        assert list(cut.digests()) == [c[4] for i, c in enumerate(chunks) if i not in gone]
    # The layer's unique chunks: the first of each digest, holes left out.
    seen: set[str] = set()
    unique = []
    for c in chunks:
        if not c[6] and c[4] not in seen:
            seen.add(c[4])
            unique.append(c)
    for t in (toc, table_of):
        kept, index = indexed_chunks(t)
        assert [as_tuple(c) for c in kept] == unique
        assert all(index[c[4]] == i for i, c in enumerate(unique))
    return want


def check_tree(layers: list[TOC], want: list[list[dict[str, Any]]]) -> None:
    """The tree of ``layers`` (tables or lists) is the reference's of their entries."""
    expected = ref_shape(ref_tree(want))
    assert tree_shape(Tree.from_layers(layers)) == expected


# -- TOCs to check -----------------------------------------------------------------------------


def peer_tocs() -> list[tuple[str, bytes, Any, int]]:
    out = []
    for name in ("estargz", "zstdchunked"):
        blob = (PEER / f"{name}.layer").read_bytes()
        desc = json.loads((PEER / f"{name}.json").read_text())["descriptor"]
        loc = locate_toc(blob[-TAIL_SIZE:], len(blob), desc["annotations"])
        compression = "zstd" if loc.format == "zstd:chunked" else "gzip"
        out.append((name, toc_json(loc, blob[loc.start : loc.end]), compression, loc.data_end))
    return out


def _toc(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries)}).encode()


D = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32
D3 = "sha256:" + "ef" * 32
HAND: list[tuple[str, bytes]] = [
    ("empty", _toc()),
    ("root only", _toc({"type": "dir", "name": "./"})),
    ("one file", _toc({"type": "reg", "name": "a", "size": 3, "offset": 0, "digest": D})),
    ("empty file", _toc({"type": "reg", "name": "a", "size": 0, "digest": D})),
    ("no digest", _toc({"type": "reg", "name": "a", "size": 3, "offset": 0})),
    ("unknown type", _toc({"type": "sock", "name": "a"})),
    ("chunk first", _toc({"type": "chunk", "name": "a", "offset": 5})),
    (
        "chunk after an empty file",
        _toc({"type": "reg", "name": "a"}, {"type": "chunk", "name": "a"}),
    ),
    ("root a file", _toc({"type": "reg", "name": "./", "size": 1, "digest": D})),
    ("escape", _toc({"type": "reg", "name": "a/../../b"})),
    ("absolute", _toc({"type": "dir", "name": "/a"})),
    (
        "several chunks, own digests",
        _toc(
            {
                "type": "reg",
                "name": "f",
                "size": 10,
                "offset": 0,
                "chunkSize": 4,
                "chunkDigest": D2,
                "digest": D,
            },
            {
                "type": "chunk",
                "name": "f",
                "offset": 50,
                "chunkOffset": 4,
                "chunkSize": 6,
                "chunkDigest": D3,
            },
            {"type": "reg", "name": "g", "size": 2, "offset": 80, "digest": D2},
        ),
    ),
    (
        "a one-chunk file with a digest of its own chunk",
        _toc({"type": "reg", "name": "f", "size": 10, "offset": 0, "chunkDigest": D2, "digest": D}),
    ),
    (
        "zstd ends and a hole",
        _toc(
            {
                "type": "reg",
                "name": "f",
                "size": 10,
                "offset": 0,
                "endOffset": 30,
                "chunkSize": 4,
                "chunkDigest": D2,
                "digest": D,
            },
            {
                "type": "chunk",
                "name": "f",
                "offset": 0,
                "chunkOffset": 4,
                "chunkSize": 6,
                "chunkType": "zeros",
            },
        ),
    ),
    (
        "hardlinks and devices",
        _toc(
            {"type": "reg", "name": "a", "size": 1, "offset": 0, "digest": D},
            {"type": "hardlink", "name": "b", "linkName": "./a"},
            {"type": "char", "name": "null", "devMajor": 4095, "devMinor": 1048575},
            {"type": "block", "name": "sda"},
            {"type": "fifo", "name": "p", "devMajor": 3},
            {"type": "symlink", "name": "s", "linkName": "../x/y"},
        ),
    ),
    (
        "hardlink to a dir",
        _toc({"type": "dir", "name": "d"}, {"type": "hardlink", "name": "h", "linkName": "d"}),
    ),
    (
        "landmark",
        _toc(
            {"type": "reg", "name": "a", "size": 1, "offset": 7, "digest": D},
            {"type": "reg", "name": ".prefetch.landmark", "size": 1, "offset": 9, "digest": D2},
            {"type": "reg", "name": "stargz.index.json", "size": 0},
        ),
    ),
    ("type not a string", _toc({"type": 5, "name": "a"})),
    ("no name", _toc({"type": "dir"})),
    ("negative uid", _toc({"type": "dir", "name": "a", "uid": -1})),
    ("uid too large", _toc({"type": "dir", "name": "a", "uid": 2**32 - 1})),
    ("largest uid", _toc({"type": "dir", "name": "a", "uid": 2**32 - 2, "gid": 2**32 - 2})),
    ("minor too large", _toc({"type": "char", "name": "a", "devMinor": 2**20})),
]


def _digest(rnd: random.Random, upper: bool = False) -> str:
    text = rnd.randbytes(32).hex()
    return "sha256:" + (text.upper() if upper else text)


# Numbers at the edges of the arrays' widths (B, H, I, q).
EDGES = [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**32 - 2]
NAMES = ["a", "b", "été", "日本", "x.wh.y", "a.wh.", ".whx", "..a", "a..", ".a", "lib", "z" * 255]


def _time(rnd: random.Random) -> str:
    """A time as Go writes it (UTC), mostly, else with an offset; before 1970 too."""
    year, month, day = rnd.choice([1969, 1970, 2001, 2023, 2037]), rnd.randint(1, 12), 28
    clock = f"{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}"
    frac = rnd.choice(["", ".5", ".123456789", ".000001", ".1000"])
    zone = "Z" if rnd.random() < 0.9 else rnd.choice(["+01:00", "-07:30"])
    return f"{year}-{month:02d}-{day}T{clock}{frac}{zone}"


def random_toc(
    rnd: random.Random,
    zstd: bool,
    whiteouts: bool = True,
    most: int = 40,
    several: float = 0.4,
    links: bool = True,
) -> tuple[bytes, int]:
    """A wire TOC: files of zero, one or several chunks (some holes, some own digests),
    directories, links, devices, names repeated and out of order."""
    entries: list[dict[str, Any]] = []
    cursor = rnd.choice([0, 0, 2**32 - 300, 2**40])  # blob offsets of every array width
    paths: list[str] = []
    files: list[str] = []
    now: dict[str, str] = {}  # each name's latest type
    rare = min(1.0, 40 / max(most, 1))  # what refuses a TOC: about once a TOC however long
    # Now and then digests a table cannot keep as 32 bytes each (upper case): kept as text.
    upper = rnd.random() < 0.1
    for _ in range(rnd.randint(0, most)):
        depth = rnd.randint(1, 3)
        parts = [rnd.choice(NAMES) for _ in range(depth)]
        if whiteouts and rnd.random() < 0.08:
            parts[-1] = rnd.choice([".wh." + rnd.choice(NAMES[:-1]), ".wh..wh..opq"])
        name = "/".join(parts)
        if paths and rnd.random() < 0.15:
            name = rnd.choice(paths)  # a repeat
        style = rnd.random()
        spelt = "./" + name if style < 0.3 else name
        kind = rnd.choice(
            ["dir", "dir", "reg", "reg", "reg", "symlink", "hardlink", "char", "fifo"]
        )
        if kind == "hardlink" and (not links or not files or rnd.random() > rare):
            kind = "reg"
        e: dict[str, Any] = {
            "type": kind,
            "name": spelt + ("/" if kind == "dir" and style > 0.6 else ""),
        }
        e["mode"] = rnd.choice([0o755, 0o644, 0o4755, 0o100644, 0o777])
        if rnd.random() < 0.5:
            e["uid"], e["gid"] = rnd.choice(EDGES), rnd.choice(EDGES)
        if rnd.random() < 0.3:
            e["userName"], e["groupName"] = rnd.choice(["", "root", "üser"]), rnd.choice(["", "g"])
        if rnd.random() < 0.7:
            e["modtime"] = _time(rnd)
        if rnd.random() < 0.1:
            e["xattrs"] = {"user.a": base64.b64encode(rnd.randbytes(rnd.randint(0, 9))).decode()}
        if kind == "symlink":
            e["linkName"] = rnd.choice(["../a", "/etc/x", "b"])
        elif kind == "hardlink":
            # Mostly a name that is a file now (not one a directory took since).
            e["linkName"] = rnd.choice([f for f in files if now.get(f) == "reg"] or files)
            if name.startswith(e["linkName"] + "/"):  # a link beneath its own target
                e["type"], e["linkName"] = "fifo", ""
        elif kind == "char":
            e["devMajor"], e["devMinor"] = rnd.choice([0, 1, 4095]), rnd.choice([0, 3, 2**20 - 1])
        now[name] = e["type"]
        if e["type"] != "reg":
            entries.append(e)
            paths.append(name)
            continue
        size = rnd.choice(
            [0, 1, rnd.randint(2, 300), 255, 256, 65536, 2**32 + 5][
                : 6 if rnd.random() > 0.1 * rare else 7
            ]
        )
        e["size"] = size
        e["digest"] = _digest(rnd, upper)
        entries.append(e)
        paths.append(name)
        if size == 0:
            continue
        files.append(name)
        cuts = (
            []
            if size < 3 or rnd.random() >= several
            else sorted(rnd.sample(range(1, min(size, 300)), min(size - 1, rnd.randint(1, 3))))
        )
        pieces = list(zip([0, *cuts], [*cuts, size], strict=True))
        for n, (start, stop) in enumerate(pieces):
            c = e if n == 0 else {"type": "chunk", "name": spelt}
            hole = zstd and n > 0 and rnd.random() < 0.2
            c["offset"] = 0 if hole else cursor
            if n:
                c["chunkOffset"] = start
            if len(pieces) > 1:
                c["chunkSize"] = stop - start
                if not hole:
                    c["chunkDigest"] = _digest(rnd, upper)
            elif rnd.random() < 0.2:
                c["chunkDigest"] = rnd.choice([e["digest"], _digest(rnd, upper)])
            if hole:
                c["chunkType"] = "zeros"
            elif not zstd and rnd.random() < 0.2:
                c["innerOffset"] = rnd.choice([0, 1, 255, 65536])
            if not hole:
                cursor += rnd.choice([1, 2, 200, 70000])
            if n:
                entries.append(c)
        if zstd and rnd.random() < 0.7:
            e["endOffset"] = cursor
    if rnd.random() < 0.1 * rare and entries:
        rnd.shuffle(entries)  # chunk entries no longer after their files: refused
    return _toc(*entries), cursor + rnd.choice([0, 0, 5])


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["estargz", "zstdchunked"])
def test_peer_layers_decode_as_the_reference_reads_them(name: str) -> None:
    ((_, doc, compression, data_end),) = [t for t in peer_tocs() if t[0] == name]
    want = check_toc(doc, compression, data_end)
    assert want is not None and any(len(e["chunks"]) > 1 for e in want)
    toc = decode_toc_table(doc, compression=compression, blob_size=data_end, reserved=RESERVED)[1]
    check_tree([toc], [want])


@pytest.mark.parametrize("name", [name for name, _ in HAND])
def test_hand_written_tocs_decode_as_the_reference_reads_them(name: str) -> None:
    doc = dict(HAND)[name]
    check_toc(doc, "zstd", 1000)


def test_an_unknown_type_is_refused_with_its_entry_named() -> None:
    doc = _toc({"type": "dir", "name": "d"}, {"type": "sock", "name": "d/s"})
    for decode in (decode_toc, decode_toc_table):
        with pytest.raises(FormatError, match="unknown entry type 'sock' for 'd/s'"):
            decode(doc, compression="zstd", blob_size=10)


@pytest.mark.parametrize(
    ("most", "several", "count"),
    [
        (40, 0.4, 400),
        (700, 0.02, 40),
    ],  # small TOCs of everything; long ones, a few files of several chunks
)
def test_generated_tocs_decode_as_the_reference_reads_them(
    most: int, several: float, count: int
) -> None:
    rnd = random.Random(20261201 + most)
    accepted = 0
    for n in range(count):
        zstd = n % 2 == 0
        doc, data_end = random_toc(rnd, zstd, most=most, several=several)
        accepted += check_toc(doc, "zstd" if zstd else "gzip", data_end, cut_seed=n) is not None
    assert accepted > count // 2  # most are valid: the comparison is not of refusals only


@pytest.mark.parametrize(("most", "stacks", "links"), [(40, 200, True), (400, 20, False)])
def test_generated_layers_build_the_reference_tree(most: int, stacks: int, links: bool) -> None:
    """Stacks of generated layers (whiteouts, opaque directories, repeats, a non-directory
    over a directory and back, hardlinks to this layer or one beneath) merge as the
    reference applies them bottom up.  Stacks with a hardlink to a name not there (or a
    directory) when the link is made are left out: lazyfs accepts one a layer above hides,
    refuses others, and the reference does not model which."""
    rnd = random.Random(7 + most)
    built = 0
    for n in range(stacks):
        wants, tables, lists = [], [], []
        for layer in range(rnd.randint(1, 3)):
            doc, data_end = random_toc(rnd, True, whiteouts=layer > 0, most=most, links=links)
            try:
                want, _ = ref_decode(doc, data_end)
            except (Refused, ValueError):
                continue
            wants.append(want)
            kw: dict[str, Any] = dict(compression="zstd", blob_size=data_end)
            tables.append(decode_toc_table(doc, **kw)[1])
            lists.append(decode_toc(doc, **kw))
        if not wants:
            continue
        try:
            expected = ref_shape(ref_tree(wants))
        except Refused:
            continue  # a link to what is not there (when it is made): see the docstring
        for layers in (tables, lists):
            assert tree_shape(Tree.from_layers(layers)) == expected, n
        built += 1
    assert built > stacks // 2


def test_hardlinks_in_one_layer_share_their_target_in_the_tree() -> None:
    rnd = random.Random(11)
    checked = 0
    for _ in range(200):
        doc, data_end = random_toc(rnd, zstd=False, whiteouts=False)
        try:
            want, _ = ref_decode(doc, data_end)
        except (Refused, ValueError):
            continue
        table = decode_toc_table(doc, compression="gzip", blob_size=data_end)[1]
        try:
            ref = ref_shape(ref_tree([want]))
        except Refused:
            continue
        assert tree_shape(Tree.from_layers([table])) == ref
        checked += 1
    assert checked > 100


def check_blobs(paths: list[str]) -> None:
    """Check the TOCs of layer blobs (eStargz or zstd:chunked, found by their footers)
    against the reference: the bench images' layers, say."""
    for path in paths:
        blob = Path(path).read_bytes()
        loc = locate_toc(blob[-TAIL_SIZE:], len(blob), None)
        doc = toc_json(loc, blob[loc.start : loc.end])
        compression = "zstd" if loc.format == "zstd:chunked" else "gzip"
        want = check_toc(doc, compression, loc.data_end)
        assert want is not None, path
        kw: dict[str, Any] = dict(compression=compression, blob_size=loc.data_end)
        check_tree([decode_toc_table(doc, **kw, reserved=RESERVED)[1]], [want])
        chunks = sum(len(e["chunks"]) for e in want)
        print(f"{path}: {len(want)} entries, {chunks} chunks: as the reference")


if __name__ == "__main__":
    check_blobs(sys.argv[1:])
