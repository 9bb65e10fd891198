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
from lazyfs.formats.toc import TOC, Entry, EntryTable, EntryType
from lazyfs.heap import trim_heap

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


class _Rows:
    """The entry rows of the nodes one layer's build made from its :class:`EntryTable`, by
    inode number: 4 bytes a node, where an int in each node took 28 (and its table 8)."""

    __slots__ = ("first", "rows", "table")

    def __init__(self, table: EntryTable, first: int) -> None:
        self.table = table
        self.first = first  # the inode number of rows[0]
        self.rows = array("I")

    def pad(self, ino: int) -> None:
        """Nodes made since the last row, up to ``ino``, show no row of this table."""
        self.rows.frombytes(bytes((ino - self.first - len(self.rows)) * self.rows.itemsize))


class Node:
    """One inode.  ``entry``/``layer`` describe the lower content it shows until promoted;
    ``upper`` is True once it exists in the upper directory (then the upper copy is the
    truth).  ``__slots__`` keeps a 100k-file image small.  A lower entry is kept as its
    row in its layer's :class:`EntryTable` (in the layer's :class:`_Rows`, or a
    ``(row, table)`` pair for a node an entry of a lower layer was given later) and made
    when asked for (equal each time, not the same object): the entries of a large image are
    most of its memory."""

    __slots__ = (
        "_entry",
        "children",
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
        entry: Entry | int | _Rows | None,
        layer: int,
        table: EntryTable | None = None,
        is_dir: bool | None = None,
    ) -> None:
        """``entry``: an int is a row of ``table``."""
        self.ino = ino
        self.parent = parent
        self.name = name
        self._entry: Entry | _Rows | tuple[int, EntryTable] | None = entry  # type: ignore[assignment]
        if type(entry) is int:
            assert table is not None
            self._entry = (entry, table)
        self.layer = layer
        self.upper = False
        self.nlink = 1
        self.lookups = 0
        self.links: list[tuple[Node, str]] | None = None  # extra names of a hardlinked file
        if is_dir is None:
            is_dir = entry is None or (isinstance(entry, Entry) and entry.type == "dir")
        self.children: dict[str, Node] | None = {} if is_dir else None

    def _row(self) -> tuple[int, EntryTable] | None:
        """The table row this node shows, if it shows one."""
        e = self._entry
        if type(e) is _Rows:
            return e.rows[self.ino - e.first], e.table
        if type(e) is tuple:
            return e
        return None

    @property
    def entry(self) -> Entry | None:
        row = self._row()
        if row is not None:
            return row[1][row[0]]
        return self._entry  # type: ignore[return-value]

    @entry.setter
    def entry(self, e: Entry | None) -> None:
        self._entry = e

    def set_row(self, i: int, table: EntryTable) -> None:
        """Show entry ``i`` of ``table``."""
        self._entry = (i, table)

    def implicit(self) -> bool:
        """Whether no layer has given this directory its entry (yet)."""
        return self._entry is IMPLICIT_DIR

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

    def stat_fields(self) -> tuple[EntryType, int, int, int, int, int, int, str]:
        """The lower entry's type, uid, gid, size, mtime_ns, device numbers and link target,
        from its table row without making the entry where it has one (a LOOKUP's attributes
        made a file's whole entry, chunks and all, to read five numbers of it)."""
        row = self._row()
        if row is not None:
            i, table = row
            kind, uid, gid, size, mtime, major, minor = table.stat_fields(i)
            return kind, uid, gid, size, mtime, major, minor, table.link_name(i)
        e = self.entry
        assert e is not None
        return e.type, e.uid, e.gid, e.size, e.mtime_ns, e.dev_major, e.dev_minor, e.link_name

    def mode(self) -> int:
        """st_mode of the lower entry (callers use lstat for upper nodes)."""
        row = self._row()
        if row is not None:
            kind, mode = row[1].kind_mode(row[0])
            if kind == "symlink":
                return stat.S_IFLNK | 0o777
            return _FMT.get(kind, stat.S_IFREG) | mode
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


# The entry of a directory no layer has an entry for (yet): one shared object, so that "is it
# implicit" is an identity test (a lower layer's entry for it then gives its attributes).
IMPLICIT_DIR = Entry(name="", type="dir", mode=0o755)


def _hidden_below(path: str, whiteouts: set[str], opaque: set[str]) -> bool:
    """Whether these markers (whiteouts, opaque directories) of layers above hide from the
    layers beneath them everything below the directory ``path``."""
    if "" in opaque:
        return True
    prefix = ""
    for part in path.split("/") if path else ():
        prefix = f"{prefix}/{part}" if prefix else part
        if prefix in whiteouts or prefix in opaque:
            return True
    return False


def _hides(path: str, whiteouts: set[str], opaque: set[str]) -> bool:
    """Whether these markers hide ``path`` from the layers beneath them."""
    return path in whiteouts or _hidden_below(path.rpartition("/")[0], whiteouts, opaque)


def _link_beneath(target: str) -> Entry:
    """The entry of a placeholder node: a hardlink to ``target`` in a layer not added yet."""
    return Entry(name="", type="hardlink", link_name=target)


def _missing(placeholder: Node, target: str) -> FormatError:
    name = "/".join(placeholder.path())
    return FormatError(f"layer {placeholder.layer}: hardlink {name!r} to missing {target!r}")


class Tree:
    """The inode table.  ``nodes`` maps inode numbers to nodes (:class:`Inodes`).

    Built top-down (:meth:`add_beneath`): the top layer first, then each lower layer beneath
    what the tree holds, filling in only what the layers above leave open.  So a node, once
    made, keeps its inode number as lower layers arrive, and a tree built from the layers
    above one not indexed yet (a layer fetched whole in the background) already answers
    everything those layers settle (:meth:`known`, :meth:`listing_known`,
    :meth:`absent_known`); the rest is added beneath it later."""

    def __init__(self) -> None:
        self.root = Node(ROOT_INO, None, "", IMPLICIT_DIR, -1)
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
        # While building: what the layers added so far hide from the layers beneath them
        # (whiteouts, and non-directories a directory above replaces, by path; opaque
        # directories by path), and hardlinks whose target is in a layer beneath (by target
        # path: their placeholder nodes).
        self._whiteouts: set[str] = set()
        self._opaque: set[str] = set()
        self._wanted: dict[str, list[Node]] = {}
        self.final = False  # every layer added (finish)

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_layers(cls, tocs: Sequence[TOC]) -> Tree:
        tree = cls()
        tree.add_beneath(tocs, 0)
        tree.finish()
        return tree

    def add_beneath(self, tocs: Sequence[TOC], first: int) -> None:
        """Add the layers ``first``, ``first + 1``, ... (``tocs``, bottom first) beneath the
        layers the tree holds, which must all be above them."""
        for index in range(len(tocs) - 1, -1, -1):
            self._add_layer(first + index, tocs[index].entries)

    def finish(self, *, lower_paths: bool = True) -> None:
        """After the last (lowest) layer: every hardlink must have found its target.
        ``lower_paths``: keep every path (:meth:`lower_has`), which only removing or renaming
        a name asks, so a read-only mount does without (a walk of the whole tree before it is
        ready)."""
        for target, waiting in self._wanted.items():
            raise _missing(waiting[0], target)
        self._whiteouts, self._opaque = set(), set()
        self.final = True
        if lower_paths:
            self.lower_paths = array("q", sorted(self._path_hashes()))
        if len(self.nodes) >= TRIM_AFTER_NODES:
            trim_heap()  # what the TOC decode and the build freed

    @property
    def next_ino(self) -> int:
        """The number the next node gets (every node so far has a smaller one)."""
        return self._next_ino

    def new_node(
        self,
        parent: Node,
        name: str,
        entry: Entry | int | _Rows | None,
        layer: int,
        table: EntryTable | None = None,
        is_dir: bool | None = None,
    ) -> Node:
        node = Node(self._next_ino, parent, name, entry, layer, table, is_dir)
        self._next_ino += 1
        self.nodes.add(node)
        return node

    def _add_layer(self, layer: int, entries: Sequence[Entry]) -> None:
        """One layer beneath the tree.  The nodes numbered from ``start`` on are this layer's
        own: a later entry of the layer replaces them, as a tar extractor would; everything
        older belongs to a layer above and wins.  An :class:`EntryTable` is read by its
        columns (names, types): its nodes keep entry indices, and an entry is made only for
        the few a hardlink needs."""
        start = self._next_ino
        hidden: set[str] = set()  # what this layer hides from the layers beneath it
        opaque: set[str] = set()
        table = entries if isinstance(entries, EntryTable) else None
        made = _Rows(table, start) if table is not None else None  # the rows of its nodes
        made_rows = made.rows if made is not None else array("I")

        def rows() -> Iterator[tuple[str, EntryType]]:
            if table is not None:
                return table.rows()
            return ((e.name, e.type) for e in entries)

        # A table without ".wh." in any name has no whiteout to act on or skip.
        whiteouts = table is None or table.mentions(WHITEOUT)
        # Whiteouts act before the layer's content, so they go first.
        for full, _ in rows() if whiteouts else ():
            dirname, _, base = full.rpartition("/")
            if not base.startswith(WHITEOUT):
                continue
            where = self._place_dir(dirname, layer, start, hidden)
            if where is None:
                continue  # hidden by a layer above: it has nothing to hide
            assert where.children is not None
            # Only directories an earlier whiteout of this layer implied are this layer's
            # to remove.
            if base == OPAQUE:
                opaque.add(dirname)
                gone = list(where.children)
            else:
                name = base[len(WHITEOUT) :]
                hidden.add(f"{dirname}/{name}" if dirname else name)
                gone = [name] if name in where.children else []
            for name in gone:
                child = where.children[name]
                if child.ino >= start:
                    self._drop(where, name)
                elif child.is_dir:
                    self._drop_own(child, layer, start)
        # Entries a layer above hides (by path), for this layer's hardlinks to them; hardlinks
        # of this layer whose target is beneath it (by target path); shadowed targets made
        # into nodes for the links that need them.
        skipped: dict[str, Node | Entry] = {}
        links: dict[str, list[Node]] = {}
        orphans: dict[int, Node] = {}
        marked = bool(self._whiteouts)
        # A TOC lists a directory's entries together: look each parent up once per run of
        # siblings, not once per entry (a mount of 100k files spends its start-up here).
        last_dir: str | None = None
        parent: Node | None = self.root
        # One string per distinct base name (__init__.py, README...), not one per node.
        names: dict[str, str] = {}
        placed: dict[str, Node] = {}
        add_node = self.nodes.add
        for i, (full, kind) in enumerate(rows()):
            if full == "":
                root = self.root
                if root.implicit() or root.layer == layer:
                    self._set_row(root, entries, i, layer)
                continue
            dirname, _, name = full.rpartition("/")
            if whiteouts and name.startswith(WHITEOUT):
                continue
            name = names.setdefault(name, name)
            if dirname != last_dir or (
                parent is not None and (parent.children is None or parent.nlink <= 0)
            ):
                # A directory's entries resume after each of its subdirectories': the
                # directories placed so far by path (a node dropped since has no link left).
                parent = placed.get(dirname)
                if parent is None or parent.children is None or parent.nlink <= 0:
                    parent = self._place_dir(dirname, layer, start, hidden)
                    if parent is not None:
                        placed[dirname] = parent
                last_dir = dirname
            if parent is None or (marked and full in self._whiteouts):
                if kind != "dir":  # hidden from above: only a hardlink may still need it
                    skipped[full] = self._shadowed(entries[i], start, skipped)
                continue
            assert parent.children is not None
            old = parent.children.get(name)
            if old is not None and old.is_dir:
                last_dir = None  # it may be dropped below, and the cached parent with it
            if old is not None and old.ino < start:  # a layer above has this name
                if kind == "dir":
                    if old.is_dir and (old.implicit() or old.layer == layer):
                        self._set_row(old, entries, i, layer)  # the directory above merges
                    continue
                if old.is_dir:
                    # This non-directory replaced what this layer and those beneath had
                    # there so far; a directory above replaced it in turn.
                    hidden.add(full)
                    self._drop_own(old, layer, start)
                skipped[full] = self._shadowed(entries[i], start, skipped)
                continue
            if kind == "hardlink":
                e = entries[i]
                self._add_link(e, parent, name, old, layer, start, skipped, links, orphans)
                continue
            if old is not None and old.is_dir and kind == "dir":
                self._set_row(old, entries, i, layer)  # the same directory again: the last wins
                continue
            if old is not None:
                if kind == "dir":
                    hidden.add(full)  # this layer's own non-directory hid what is beneath
                self._drop(parent, name)
            if made is not None:
                # new_node's work inlined: a call less per node of the mount's largest loop.
                ino = self._next_ino
                if ino - start != len(made_rows):
                    made.pad(ino)  # implicit directories, links made meanwhile
                made_rows.append(i)
                node = Node(ino, parent, name, made, layer, None, kind == "dir")
                self._next_ino = ino + 1
                add_node(node)
            else:
                node = self.new_node(parent, name, entries[i], layer)
            parent.children[name] = node
        # Hardlinks of the layers above whose target is beneath them: this layer's word on
        # the target, if it has one.
        for target in list(self._wanted):
            got = self._link_target(target, start, skipped)
            if got is None:
                if _hides(target, hidden, opaque):
                    raise _missing(self._wanted[target][0], target)
                continue
            self._resolve(self._wanted.pop(target), target, got, layer, links, orphans)
        self._whiteouts |= hidden
        self._opaque |= opaque
        for target, waiting in links.items():
            self._wanted.setdefault(target, []).extend(waiting)

    def _drop_own(self, node: Node, layer: int, start: int) -> None:
        """Forget what this layer (nodes from ``start`` on) gave the directory ``node`` of a
        layer above, its entry included."""
        if node.layer == layer:
            node.entry = IMPLICIT_DIR
        stack = [node]
        while stack:
            d = stack.pop()
            assert d.children is not None
            for name, child in list(d.children.items()):
                if child.ino >= start:
                    self._drop(d, name)
                elif child.is_dir:
                    if child.layer == layer:
                        child.entry = IMPLICIT_DIR
                    stack.append(child)

    def _shadowed(self, e: Entry, start: int, skipped: dict[str, Node | Entry]) -> Node | Entry:
        """What a hardlink of this layer to ``e``, which a layer above hides, links to."""
        if e.type != "hardlink":
            return e
        got = self._link_target(e.link_name, start, skipped)
        return got if got is not None else _link_beneath(e.link_name)

    def _link_target(
        self, path: str, start: int, skipped: dict[str, Node | Entry]
    ) -> Node | Entry | None:
        """What this layer (its nodes numbered from ``start``) has at ``path`` for a hardlink:
        its node, the entry a layer above hides, a hardlink entry when its own target is in a
        layer beneath, or None when this layer has nothing there."""
        node = self.find(path)
        if node is not None and node.ino >= start:
            e = node.entry
            return e if e is not None and e.type == "hardlink" else node  # a placeholder
        return skipped.get(path)

    def _add_link(
        self,
        e: Entry,
        parent: Node,
        name: str,
        old: Node | None,
        layer: int,
        start: int,
        skipped: dict[str, Node | Entry],
        links: dict[str, list[Node]],
        orphans: dict[int, Node],
    ) -> None:
        assert parent.children is not None
        target = self._link_target(e.link_name, start, skipped)
        if target is None:  # in a layer beneath: a placeholder until that layer is added
            target = _link_beneath(e.link_name)
        if isinstance(target, Node):
            if target.is_dir:
                raise FormatError(f"layer {layer}: hardlink {e.name!r} to missing {e.link_name!r}")
            if old is target:
                return  # a link to itself (or to another of its names) changes nothing
            if old is not None:
                self._drop(parent, name)
            self.add_link(target, parent, name)
            return
        if old is not None and old is orphans.get(id(target)):
            return
        if old is not None:
            self._drop(parent, name)
        if target.type == "hardlink":
            ph = self.new_node(parent, name, target, layer)
            parent.children[name] = ph
            links.setdefault(target.link_name, []).append(ph)
            return
        self._link_orphan(target, parent, name, layer, orphans)

    def _link_orphan(
        self, entry: Entry, parent: Node, name: str, layer: int, orphans: dict[int, Node]
    ) -> None:
        """Link ``name`` to the node of ``entry``, an entry a layer above hides at its own
        name (made on the first link)."""
        assert parent.children is not None
        node = orphans.get(id(entry))
        if node is None or node.nlink <= 0:
            node = orphans[id(entry)] = self.new_node(parent, name, entry, layer)
            parent.children[name] = node
        else:
            self.add_link(node, parent, name)

    def _resolve(
        self,
        waiting: list[Node],
        target: str,
        got: Node | Entry,
        layer: int,
        links: dict[str, list[Node]],
        orphans: dict[int, Node],
    ) -> None:
        """Replace the placeholders of hardlinks from above by what this layer has at their
        target."""
        if isinstance(got, Entry) and got.type == "hardlink":
            for ph in waiting:
                ph.entry = got
            links.setdefault(got.link_name, []).extend(waiting)  # beneath this layer too
            return
        for ph in waiting:
            parent, name = ph.parent, ph.name
            if ph.nlink <= 0 or parent is None:
                continue  # replaced meanwhile by a later entry of its own layer
            if isinstance(got, Node) and got.is_dir:
                raise _missing(ph, target)
            assert parent.children is not None
            self._drop(parent, name)
            if isinstance(got, Node):
                self.add_link(got, parent, name)
            else:
                self._link_orphan(got, parent, name, layer, orphans)

    def _set_row(self, node: Node, entries: Sequence[Entry], i: int, layer: int) -> None:
        """Give ``node`` entry ``i`` of ``entries``, this layer's."""
        if isinstance(entries, EntryTable):
            node.set_row(i, entries)
        else:
            node.entry = entries[i]
        node.layer = layer

    def _place_dir(self, path: str, layer: int, start: int, hidden: set[str]) -> Node | None:
        """The directory at ``path`` for an entry of ``layer``, creating implicit parents as
        tar extractors do; None when a layer above hides ``path``."""
        node = self.root
        marked = bool(self._whiteouts or self._opaque)
        if marked and "" in self._opaque:
            return None
        if not path:
            return node
        prefix = ""
        for part in path.split("/"):
            assert node.children is not None
            if marked:
                prefix = f"{prefix}/{part}" if prefix else part
                if prefix in self._whiteouts:
                    return None
            child = node.children.get(part)
            if child is None or not child.is_dir:
                if child is not None:
                    if child.ino < start:
                        return None  # a non-directory of a layer above
                    # This layer's own non-directory: replaced, and what it hid stays hidden.
                    hidden.add("/".join((*node.path(), part)))
                    self._drop(node, part)
                child = self.new_node(node, part, IMPLICIT_DIR, layer)
                node.children[part] = child
            node = child
            if marked and prefix in self._opaque:
                return None
        return node

    def _drop(self, parent: Node, name: str) -> None:
        assert parent.children is not None
        node = parent.children.pop(name, None)
        if node is None:
            return
        self.unlink_name(node, parent, name)

    # -- what a tree still missing lower layers can answer ----------------------------------

    def known(self, node: Node) -> bool:
        """Whether ``node``'s name and attributes are final: no layer beneath can change
        them.  Not an implicit directory (a lower layer may have its entry) nor a hardlink
        whose target is beneath."""
        if self.final or node.implicit():
            return self.final
        e = node.entry
        return e is None or e.type != "hardlink"

    def listing_known(self, node: Node) -> bool:
        """Whether no layer beneath can add names to the directory ``node``."""
        return self.final or _hidden_below("/".join(node.path()), self._whiteouts, self._opaque)

    def absent_known(self, parent: Node, name: str) -> bool:
        """Whether no layer beneath can add ``name`` to the directory ``parent``."""
        return self.final or _hides("/".join((*parent.path(), name)), self._whiteouts, self._opaque)

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

    def _path_hashes(self) -> list[int]:
        """hash() of every path but the root's, in no order (walk's sorting is not needed)."""
        out: list[int] = []
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            assert node.children is not None
            for name, child in node.children.items():
                sub = f"{path}/{name}" if path else name
                out.append(hash(sub))
                if child.children:
                    stack.append((sub, child))
        return out

    def walk(self) -> Iterator[tuple[str, Node]]:
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name, child in sorted(node.children.items(), reverse=True):
                    stack.append((f"{path}/{name}" if path else name, child))
