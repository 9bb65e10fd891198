"""Merge an upper directory left by an earlier mount into the tree built from the layers."""

from __future__ import annotations

import os
import stat

from lazyfs.fs.tree import OPAQUE, WHITEOUT, Node, Tree
from lazyfs.fs.upper import Upper

# Directory handles held for directories still to be scanned; beyond this many, a directory
# is reached by a walk from the root when its turn comes (a wide tree must not run out of fds).
HELD_DIRS = 64


def apply_upper(tree: Tree, upper: Upper) -> None:
    """Merge an existing upper directory (from an earlier mount) into the tree: whiteouts and
    opaque markers hide lower entries, everything else is an upper entry.  Each directory is
    opened relative to its parent's handle where possible: walking from the root for every
    directory made a remount quadratic in the tree's depth."""
    inodes: dict[tuple[int, int], Node] = {}
    stack: list[tuple[Node, int | None]] = [(tree.root, None)]
    # An empty upper directory (a fresh one) has nothing to say about the root: it keeps the
    # image's metadata until something promotes it.
    if upper.listdir(()):
        tree.root.upper = True
        tree.root.entry = None
    held = 0
    try:
        while stack:
            dir_node, dfd = stack.pop()
            if dfd is None:
                dfd = upper.open_dir(dir_node.path())
            else:
                held -= 1
            try:
                for child, name in _merge_dir(tree, upper, dir_node, dfd, inodes):
                    child_fd = None
                    if held < HELD_DIRS:
                        child_fd = upper.open_dir((name,), at=dfd)
                        held += 1
                    stack.append((child, child_fd))
            finally:
                os.close(dfd)
    finally:
        for _, fd in stack:
            if fd is not None:
                os.close(fd)


def _merge_dir(
    tree: Tree, upper: Upper, dir_node: Node, dfd: int, inodes: dict[tuple[int, int], Node]
) -> list[tuple[Node, str]]:
    """Merge one upper directory (handle ``dfd``) into ``dir_node``; returns the
    subdirectories to merge next, with their names."""
    path = dir_node.path()
    assert dir_node.children is not None
    entries = upper.scan_dir(dfd)
    names = [name for name, _, _ in entries]
    if OPAQUE in names:
        for name, child in list(dir_node.children.items()):
            if not child.upper:
                del dir_node.children[name]
                tree.unlink_name(child, dir_node, name)
    for name in names:
        if Upper.is_temp(name):
            upper.unlink((*path, name))  # an interrupted copy-up: the lower entry stands
        elif name.startswith(WHITEOUT) and name != OPAQUE:
            hidden = name[len(WHITEOUT) :]
            gone = dir_node.children.pop(hidden, None)
            if gone is not None:
                tree.unlink_name(gone, dir_node, hidden)
    subdirs: list[tuple[Node, str]] = []
    for name, cst, whiteout in entries:
        if Upper.is_marker(name) or Upper.is_temp(name) or cst is None:
            continue
        old = dir_node.children.get(name)
        if whiteout:  # hides the lower entry of its own name
            if old is not None:
                del dir_node.children[name]
                tree.unlink_name(old, dir_node, name)
            continue
        is_dir = stat.S_ISDIR(cst.st_mode)
        if old is not None and old.is_dir and is_dir:
            old.upper = True
            old.entry = None
            subdirs.append((old, name))
            continue
        if old is not None:
            del dir_node.children[name]
            tree.unlink_name(old, dir_node, name)
        key = (cst.st_dev, cst.st_ino)
        if not is_dir and cst.st_nlink > 1 and key in inodes:
            tree.add_link(inodes[key], dir_node, name)
            continue
        node = tree.new_node(dir_node, name, None, -1)
        if not is_dir:
            node.children = None
        node.upper = True
        dir_node.children[name] = node
        inodes[key] = node
        if is_dir:
            subdirs.append((node, name))
    return subdirs
