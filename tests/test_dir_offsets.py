"""A listing's offsets (lazyfs.fs.ops: positions in hash order, with room for collisions) and
directories without handles: pure logic, no mount (tests/test_kernel_cache.py mounts)."""

from __future__ import annotations

import bisect
import itertools
import os
import types
from pathlib import Path

import pytest
import trio

from lazyfs.fs import ops
from lazyfs.fs.tree import Node, Tree
from lazyfs.fs.upper import Upper


def directory(names: list[str]) -> tuple[ops.Operations, Node]:
    tree = Tree()
    tree.finish()
    d = tree.new_node(tree.root, "d", None, -1)
    d.children = {}
    assert tree.root.children is not None
    tree.root.children["d"] = d
    for name in names:
        d.children[name] = tree.new_node(d, name, None, -1)
    return ops.Operations(tree, None, [], None), d  # type: ignore[arg-type]


def read_in_parts(o: ops.Operations, d: Node, size: int) -> list[str]:
    """What readdir hands the kernel, ``size`` entries a call, each resumed at the offset of
    the last entry of the one before."""
    got: list[str] = []
    offset = 0
    while True:
        positions, entries = o._listing(d)
        first = bisect.bisect_left(positions, offset)
        part = list(range(first, min(first + size, len(entries))))
        if not part:
            return got
        got += [entries[i][0].decode() for i in part]
        offset = positions[part[-1]] + 1


def test_offsets_are_unique_and_increasing() -> None:
    names = [f"n{i}" for i in range(500)]
    o, d = directory(names)
    positions, entries = o._listing(d)
    assert all(a < b for a, b in itertools.pairwise(positions))
    assert positions[0] >= 0 and positions[-1] + 1 < 2**31  # a 32-bit caller's off_t
    assert sorted(e[0].decode() for e in entries) == sorted(names)
    assert sorted(read_in_parts(o, d, 7)) == sorted(names)


@pytest.mark.parametrize("bits", [0, 2])
def test_names_whose_hashes_collide_each_come_once(
    monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    """Every name in one or four hash buckets: a listing read in parts of three, split inside
    each group of colliding names, still lists each name once."""
    monkeypatch.setattr(ops, "_HASH_BITS", bits)
    names = [f"name-{i}" for i in range(60)]
    o, d = directory(names)
    got = read_in_parts(o, d, 3)
    assert sorted(got) == sorted(names)


def test_a_change_between_parts_takes_the_listing_afresh() -> None:
    names = [f"n{i}" for i in range(100)]
    o, d = directory(names)
    positions, entries = o._listing(d)
    assert d.children is not None
    gone = entries[50][0].decode()
    del d.children[gone]
    o._changed(d)  # what every handler that adds or removes a name does
    again, _ = o._listing(d)
    assert len(again) == 99 and positions[50] not in again


def test_without_the_patch_opendir_answers_the_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpatched pyfuse3 hands readdir only the ``fh`` opendir answered: then the inode,
    and no ENOSYS (readdir would get ``fh`` 0 and could not tell directories apart)."""
    monkeypatch.setattr(ops, "patched_pyfuse3", lambda: None)
    o, d = directory(["a"])
    assert not o.no_opendir
    fh = trio.run(o.opendir, d.ino, None)
    assert fh == ops.INO_FH | d.ino and o.listed_dir(fh) is d


def test_changes_elsewhere_keep_a_listing_in_progress(tmp_path: Path) -> None:
    """Names created, renamed and removed in another directory between two parts of a
    listing do not make it sorted again (once per part: quadratic in a big directory read
    while anything anywhere changes); a change of the directory itself does, through the
    same handlers."""
    names = [f"n{i}" for i in range(100)]
    o, d = directory(names)
    tree = o.tree
    other = tree.new_node(tree.root, "other", None, -1)
    other.children = {}
    assert tree.root.children is not None
    tree.root.children["other"] = other
    for node in (tree.root, d, other):
        node.upper = True
    (tmp_path / "upper" / "d").mkdir(parents=True)
    (tmp_path / "upper" / "other").mkdir()
    ctx = types.SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o22)

    async def changes(parent: Node) -> None:
        await o.mkdir(parent.ino, b"sub", 0o755, ctx)  # type: ignore[arg-type]
        await o.symlink(parent.ino, b"ln", b"sub", ctx)  # type: ignore[arg-type]
        await o.rename(parent.ino, b"ln", parent.ino, b"ln2", 0, ctx)  # type: ignore[arg-type]
        await o.unlink(parent.ino, b"ln2", ctx)  # type: ignore[arg-type]
        await o.rmdir(parent.ino, b"sub", ctx)  # type: ignore[arg-type]

    with Upper(tmp_path / "upper") as upper:
        o.upper = upper
        kept, _ = o._listing(d)
        trio.run(changes, other)
        assert o._listing(d)[0] is kept
        trio.run(changes, d)
        assert o._listing(d)[0] is not kept
