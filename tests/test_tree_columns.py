"""The tree built from a layer's :class:`EntryTable` columns (entries made on demand) is the
tree built from the unpacked entries: same names, inodes, links and entries (equal, not the
same objects), whatever the layers' whiteouts, opaque markers and hardlinks, built at once
or above then beneath."""

from __future__ import annotations

import random

import pytest

from lazyfs.errors import FormatError
from lazyfs.formats.toc import TOC, EntryTable, pack_toc, unpack_toc
from lazyfs.fs.tree import Tree
from tests.test_background_layers import _LAYERS, _random_stack


def _as_table(toc: TOC) -> TOC:
    return TOC(compression=toc.compression, entries=EntryTable(pack_toc(toc)), data_end=0)


def _as_list(toc: TOC) -> TOC:
    return unpack_toc(pack_toc(toc))  # the same entries the table makes, as objects


def _shape(tree: Tree) -> dict[str, tuple[object, ...]]:
    groups: dict[int, str] = {}
    out = {}
    for path, node in tree.walk():
        groups.setdefault(node.ino, path)
        out[path] = (
            node.is_dir,
            node.entry,
            node.mode(),
            node.stat_fields() if node.entry is not None else None,
            node.nlink,
            groups[node.ino],
            node.ino,
        )
    return out


def _built(tocs: list[TOC], split: int) -> Tree:
    tree = Tree()
    tree.add_beneath(tocs[split:], split)
    tree.add_beneath(tocs[:split], 0)
    tree.finish()
    return tree


@pytest.mark.parametrize("split", [0, 1, 2])
def test_a_tree_of_tables_is_the_tree_of_their_entries(split: int) -> None:
    tables = [_as_table(t) for t in _LAYERS]
    tree = _built(tables, split)
    assert _shape(tree) == _shape(_built([_as_list(t) for t in _LAYERS], split))
    node = tree.find("etc/c")
    assert node is not None and node._row() is not None  # a table row, not an Entry
    assert node.entry is not node.entry and node.entry == node.entry


def test_random_stacks_of_tables_build_the_trees_of_their_entries() -> None:
    r = random.Random(47)
    checked = 0
    for _ in range(300):
        tocs = _random_stack(r)
        split = r.randrange(len(tocs))
        try:
            lists = [_as_list(t) for t in tocs]
        except FormatError:
            continue  # not a TOC unpack_toc accepts (a hardlink to nowhere in its layer)
        try:
            want = _shape(_built(lists, split))
        except FormatError as e:
            with pytest.raises(FormatError, match=str(e).split(":")[0]):
                _built([_as_table(t) for t in tocs], split)
            continue
        assert _shape(_built([_as_table(t) for t in tocs], split)) == want
        checked += 1
    assert checked > 200


def test_an_upper_edit_replaces_a_table_entry() -> None:
    tree = Tree.from_layers([_as_table(t) for t in _LAYERS])
    node = tree.find("etc/d")
    assert node is not None and node.entry is not None and node._row() is not None
    node.entry = None  # promoted: the upper copy is the truth
    assert node.entry is None and node._row() is None


def test_a_read_only_tree_keeps_no_lower_paths() -> None:
    """Only removing or renaming a name asks which paths the lower layers have: a tree
    finished without them (a read-only mount) does not walk itself to hash every path."""
    tables = [_as_table(t) for t in _LAYERS]
    kept, bare = Tree(), Tree()
    for tree in (kept, bare):
        tree.add_beneath(tables, 0)
    kept.finish()
    bare.finish(lower_paths=False)
    assert len(bare.lower_paths) == 0 and bare.final
    paths = [tuple(path.split("/")) for path, _ in kept.walk() if path]
    assert paths and all(map(kept.lower_has, paths))
    assert _shape(bare) == _shape(kept)


def test_a_table_nodes_attributes_are_read_without_making_its_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A LOOKUP's or a listing's attributes come from the row's columns: making the entry (its
    chunks and all) for five numbers cost most of a LOOKUP's Python time."""
    tree = Tree.from_layers([_as_table(t) for t in _LAYERS])
    want = {path: node.stat_fields() for path, node in tree.walk() if node._row() is not None}
    assert len(want) > 5

    def made(self: EntryTable, i: int) -> None:
        raise AssertionError("an entry was made")

    monkeypatch.setattr(EntryTable, "__getitem__", made)
    for path, node in tree.walk():
        if node._row() is not None:
            assert node.stat_fields() == want[path]
            node.mode()
