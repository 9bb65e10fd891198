"""The merged tree: all layers' TOCs applied with OCI/overlay semantics into one inode table.

Built once at mount time from the TOCs (bottom layer first).  Each layer's whiteouts act on the
layers below it only: ``.wh.NAME`` removes NAME, ``.wh..wh..opq`` hides everything the lower
layers put in that directory.  Hardlinks resolve to one shared :class:`Node` whose ``nlink``
counts its names.  The FUSE operations then mutate this same tree as the upper layer changes.
"""

from __future__ import annotations

import stat
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from lazyfs.errors import FormatError
from lazyfs.formats.toc import TOC, Entry

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ROOT_INO = 1

_FMT = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class Node:
    """One inode.  ``entry``/``layer`` describe the lower content it shows until promoted;
    ``upper`` is True once it exists in the upper directory (then the upper copy is the
    truth).  ``__slots__`` keeps a 100k-file image small."""

    __slots__ = (
        "children",
        "entry",
        "ino",
        "layer",
        "links",
        "lookups",
        "name",
        "nlink",
        "parent",
        "upper",
    )

    def __init__(
        self,
        ino: int,
        parent: Node | None,
        name: str,
        entry: Entry | None,
        layer: int,
    ) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.entry = entry
        self.layer = layer
        self.upper = False
        self.nlink = 1
        self.lookups = 0
        self.links: list[tuple[Node, str]] | None = None  # extra names of a hardlinked file
        self.children: dict[str, Node] | None = {} if entry is None or entry.type == "dir" else None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def path(self) -> tuple[str, ...]:
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return tuple(reversed(parts))

    def mode(self) -> int:
        """st_mode of the lower entry (callers use lstat for upper nodes)."""
        e = self.entry
        if e is None:
            return stat.S_IFDIR | 0o755
        if e.type == "symlink":
            return stat.S_IFLNK | 0o777  # Linux symlinks have no mode of their own
        return _FMT.get(e.type, stat.S_IFREG) | e.mode

    def __repr__(self) -> str:
        return f"Node({self.ino}, {'/'.join(self.path())!r})"


class Inodes:
    """Inode number -> node, as a list indexed by number: 8 bytes an inode where a dict costs
    ~50.  Numbers are handed out in order and never reused, so the list only has holes where
    nodes were forgotten (8 bytes each)."""

    __slots__ = ("_count", "_slots")

    def __init__(self) -> None:
        self._slots: list[Node | None] = [None]  # no inode 0
        self._count = 0

    def add(self, node: Node) -> None:
        slots = self._slots
        if node.ino != len(slots):
            raise AssertionError(f"inode {node.ino} out of order ({len(slots)} expected)")
        slots.append(node)
        self._count += 1

    def get(self, ino: int) -> Node | None:
        return self._slots[ino] if 0 < ino < len(self._slots) else None

    def __contains__(self, ino: int) -> bool:
        return self.get(ino) is not None

    def pop(self, ino: int) -> None:
        if self.get(ino) is not None:
            self._slots[ino] = None
            self._count -= 1

    def __len__(self) -> int:
        return self._count


# A tree this large was built from TOCs whose decode freed several times its size.
TRIM_AFTER_NODES = 10_000


def _trim_heap() -> None:
    """Hand the free memory the TOC decode and the build left in the C heap back to the
    system: glibc keeps freed blocks mapped (~7 MiB of RSS at 100k files) until asked.
    Without glibc (no ``malloc_trim``) nothing is done."""
    import ctypes  # only for large trees: a mount's start-up pays the import once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _implicit_dir() -> Entry:
    return Entry(name="", type="dir", mode=0o755)


class Tree:
    """The inode table.  ``nodes`` maps inode numbers to nodes (:class:`Inodes`)."""

    def __init__(self) -> None:
        self.root = Node(ROOT_INO, None, "", _implicit_dir(), -1)
        # Every path the lower layers have, after their own whiteouts: removing such a path
        # from the mount must leave a whiteout.  A property of the path, not of the inode that
        # holds it now (renames and hardlinks move inodes between names).
        # Kept as a sorted array of their hashes, 8 bytes a path (a set of the paths cost ~200):
        # a collision could only add a whiteout for a path no lower layer has, which is
        # harmless (it hides nothing).
        self.lower_paths = array("q")
        self.nodes = Inodes()
        self.nodes.add(self.root)
        self._next_ino = ROOT_INO + 1

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_layers(cls, tocs: Sequence[TOC]) -> Tree:
        tree = cls()
        for index, toc in enumerate(tocs):
            tree._apply_layer(index, toc.entries)
        tree.lower_paths = array("q", sorted(hash(path) for path, _ in tree.walk() if path))
        if len(tree.nodes) >= TRIM_AFTER_NODES:
            _trim_heap()
        return tree

    def new_node(self, parent: Node, name: str, entry: Entry | None, layer: int) -> Node:
        node = Node(self._next_ino, parent, name, entry, layer)
        self._next_ino += 1
        self.nodes.add(node)
        return node

    def _apply_layer(self, layer: int, entries: list[Entry]) -> None:
        # Whiteouts first: they hide what lower layers had, never this layer's own entries.
        content: list[Entry] = []
        for e in entries:
            dirname, _, base = e.name.rpartition("/")
            if not base.startswith(WHITEOUT):
                content.append(e)
                continue
            parent = self._dir(dirname, layer)
            assert parent.children is not None
            if base == OPAQUE:
                for child in list(parent.children.values()):
                    self._drop(parent, child.name)
            else:
                self._drop(parent, base[len(WHITEOUT) :])
        # A TOC lists a directory's entries together: look each parent up once per run of
        # siblings, not once per entry (a mount of 100k files spends its start-up here).
        last_dir: str | None = None
        parent = self.root
        # One string per distinct base name (__init__.py, README...), not one per node.
        names: dict[str, str] = {}
        for e in content:
            if e.name == "":
                self._set_entry(self.root, e, layer)
                continue
            dirname, _, name = e.name.rpartition("/")
            name = names.setdefault(name, name)
            if dirname != last_dir or parent.children is None or parent.nlink <= 0:
                parent = self._dir(dirname, layer)
                last_dir = dirname
            assert parent.children is not None
            old = parent.children.get(name)
            if old is not None and old.is_dir:
                last_dir = None  # it may be dropped below, and the cached parent with it
            if e.type == "hardlink":
                target = self.find(e.link_name)
                if target is None or target.is_dir:
                    raise FormatError(
                        f"layer {layer}: hardlink {e.name!r} to missing {e.link_name!r}"
                    )
                if old is target:
                    continue  # a link to itself (or to another of its names) changes nothing
                if old is not None:
                    self._drop(parent, name)
                self.add_link(target, parent, name)
                continue
            if old is not None and old.is_dir and e.type == "dir":
                self._set_entry(old, e, layer)  # a directory in an upper layer merges
                continue
            if old is not None:
                self._drop(parent, name)
            parent.children[name] = self.new_node(parent, name, e, layer)

    def _set_entry(self, node: Node, e: Entry, layer: int) -> None:
        node.entry = e
        node.layer = layer

    def _dir(self, path: str, layer: int) -> Node:
        """The directory at ``path``, creating implicit parents as tar extractors do."""
        node = self.root
        if not path:
            return node
        for part in path.split("/"):
            assert node.children is not None
            child = node.children.get(part)
            if child is None or not child.is_dir:
                if child is not None:
                    self._drop(node, part)
                child = self.new_node(node, part, _implicit_dir(), layer)
                node.children[part] = child
            node = child
        return node

    def _drop(self, parent: Node, name: str) -> None:
        assert parent.children is not None
        node = parent.children.pop(name, None)
        if node is None:
            return
        self.unlink_name(node, parent, name)

    # -- queries and edits used by the FUSE operations --------------------------------------

    def lower_has(self, path: tuple[str, ...]) -> bool:
        h, paths = hash("/".join(path)), self.lower_paths
        i = bisect_left(paths, h)
        return i < len(paths) and paths[i] == h

    def find(self, path: str) -> Node | None:
        node = self.root
        for part in (p for p in path.split("/") if p):
            if node.children is None:
                return None
            nxt = node.children.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def add_link(self, target: Node, parent: Node, name: str) -> None:
        assert parent.children is not None
        if target.links is None:
            target.links = []
        target.links.append((parent, name))
        target.nlink += 1
        parent.children[name] = target

    def unlink_name(self, node: Node, parent: Node, name: str) -> None:
        """Forget one name of ``node`` (already removed from ``parent.children``); a node left
        without names releases its children too.  A loop: a tree can be deeper than Python's
        stack."""
        todo = [(node, parent, name)]
        while todo:
            node, parent, name = todo.pop()
            node.nlink -= 1
            if node.links:
                if node.parent is parent and node.name == name:
                    node.parent, node.name = node.links.pop(0)
                else:
                    node.links = [(p, n) for p, n in node.links if not (p is parent and n == name)]
            if node.nlink > 0:
                continue
            if node.children:
                for child_name, child in list(node.children.items()):
                    del node.children[child_name]
                    todo.append((child, node, child_name))
            node.nlink = 0
            if node.lookups == 0:
                self.nodes.pop(node.ino)

    def forget(self, node: Node, n: int) -> None:
        node.lookups -= n
        if node.lookups <= 0 and node.nlink <= 0:
            self.nodes.pop(node.ino)

    def names(self, node: Node) -> Iterator[tuple[Node, str]]:
        """Every (parent, name) under which ``node`` is linked."""
        if node.parent is not None:
            yield node.parent, node.name
        yield from node.links or ()

    def walk(self) -> Iterator[tuple[str, Node]]:
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name, child in sorted(node.children.items(), reverse=True):
                    stack.append((f"{path}/{name}" if path else name, child))
