"""Merge an upper directory left by an earlier mount into the tree built from the layers."""

from __future__ import annotations

import stat

from lazyfs.fs.tree import OPAQUE, WHITEOUT, Node, Tree
from lazyfs.fs.upper import Upper


def apply_upper(tree: Tree, upper: Upper) -> None:
    """Merge an existing upper directory (from an earlier mount) into the tree: whiteouts and
    opaque markers hide lower entries, everything else is an upper entry."""
    inodes: dict[tuple[int, int], Node] = {}
    stack: list[Node] = [tree.root]
    # An empty upper directory (a fresh one) has nothing to say about the root: it keeps the
    # image's metadata until something promotes it.
    if upper.listdir(()):
        tree.root.upper = True
        tree.root.entry = None
    while stack:
        dir_node = stack.pop()
        path = dir_node.path()
        assert dir_node.children is not None
        names = upper.listdir(path)
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
        for name in names:
            if Upper.is_marker(name) or Upper.is_temp(name):
                continue
            cst = upper.lstat((*path, name))
            if cst is None:
                continue
            old = dir_node.children.get(name)
            if upper.is_whiteout((*path, name)):  # hides the lower entry of its own name
                if old is not None:
                    del dir_node.children[name]
                    tree.unlink_name(old, dir_node, name)
                continue
            is_dir = stat.S_ISDIR(cst.st_mode)
            if old is not None and old.is_dir and is_dir:
                old.upper = True
                old.entry = None
                stack.append(old)
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
                stack.append(node)
