"""Without groups, fetch a Python's standard modules once the interpreter is exec'd.

A Python start-up imports its modules one after another, and each one whose neighbourhood a
cold mount has not fetched yet is a miss in series: on Debian's python3.11 image, a
start-up importing a dozen standard packages made 12 of its 23 requests so, one per
directory of the library, each bringing ~700 KiB of neighbours (mostly ``.py`` sources no
one reads) for ~100 KiB used (BENCHMARKS.md, issue 13, H77).  The interpreter gives them
away: once a reader has read the start of ``<prefix>/bin/pythonX.Y`` (the kernel's exec;
:class:`NeededLibs` notices it), the modules it will import are the compiled ones of
``<prefix>/lib/pythonX.Y``, its ``__pycache__/*.cpython-XY.pyc`` and its ``lib-dynload``
extension modules.  They are fetched at once, whole, at PREFETCH priority (a reader that
gets there first joins and boosts the flight), held in memory until reads pause (``hold``),
in blob order: a layer laid out by path keeps each ``__pycache__`` together, so the ranges
are few (one multi-range request where the source takes them).  The modules every start-up
imports first (FIRST) go in a request of their own ahead of the rest.

Not at the exec's first READ but once it is served: the program's own first chunk (4 MiB,
python3.11's ~1.9 MiB compressed) then has the network and the CPUs to itself, and the
modules still come before the first import asks (started at the READ, that chunk's wait
was 1.7x as long and the start-up no faster).  Left out: test suites, tools no program
imports at start-up, third-party ``site-packages``, anything past MODULE_BYTES (decoded) or
MODULE_FILES (MOUNT_MODULE_BYTES in all), a library directory of the upper layer; each library
directory once per mount."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import trio

from lazyfs.errors import LazyfsError
from lazyfs.formats.toc import Entry
from lazyfs.fs.control import NeededStats
from lazyfs.fs.tree import Node
from lazyfs.remote.base import REQUEST_SENT
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore

log = logging.getLogger(__name__)

INTERPRETER = re.compile(r"python(\d)\.(\d{1,3})")
# Debian's 3.11: 10.0 MiB of compiled modules and 3.0 MiB of extension modules (5.1 MiB
# compressed); BENCHMARKS' start-up reads 4.5 MiB of them.
MODULE_BYTES = 24 * 1024 * 1024
# And at most this many files (Debian's 3.11: 544 compiled modules).  The walk runs in one
# go in the event loop, and each module found costs an Entry (~10 us, ~0.5 KiB): a TOC of
# 900k one-byte ``.pyc`` files (under MODULE_BYTES) took the event loop for 5-9 s (H78).
MODULE_FILES = 4096
# And at most this much (decoded) in all per mount: each library directory is planned once,
# but an image may hold many (conda environments, one per Python), and whatever reads the
# start of each interpreter (a scanner reading every ELF header) would fetch each's modules.
MOUNT_MODULE_BYTES = 2 * MODULE_BYTES
# Top-level directories of the library no start-up imports from (tests, IDLE, Tk and its
# demos, 2to3, pip's wheels, pydoc's topics) or whose packages are
# third-party, of any size.
SKIP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "site-packages",
        "dist-packages",
    }
)
# What every start-up imports before the program's own imports (3.11 froze most of them
# into the interpreter; older ones read them all): the codecs of the usual file system
# encodings, then site's modules (Debian's sitecustomize among them).  Laid out by path,
# encodings comes after the top-level modules and behind 2.4 MiB of them in one stream.
FIRST = frozenset(
    {
        "encodings/__init__",
        "encodings/aliases",
        "encodings/utf_8",
        "encodings/latin_1",
        "encodings/ascii",
        "codecs",
        "io",
        "abc",
        "site",
        "os",
        "stat",
        "posixpath",
        "genericpath",
        "_collections_abc",
        "_sitebuiltins",
        "sitecustomize",
    }
)


def library_dir(program: Node) -> Node | None:
    """``<prefix>/lib/pythonX.Y`` of the interpreter ``program`` (``<prefix>/bin/pythonX.Y``)
    if it is a lower directory of the tree, else None."""
    if INTERPRETER.fullmatch(program.name) is None:
        return None
    prefix = program.parent.parent if program.parent is not None else None
    if prefix is None or prefix.children is None:
        return None
    lib = prefix.children.get("lib")
    if lib is None or lib.children is None or lib.upper:
        return None
    d = lib.children.get(program.name)
    return d if d is not None and d.children is not None and not d.upper else None


def modules(library: Node, tag: str) -> Iterator[tuple[str, Node]]:
    """The lower files of the interpreter's modules under ``library`` (``tag``:
    ``cpython-311``), each with its name as a path (``encodings/__init__``,
    ``lib-dynload/_json.cpython-311-x86_64-linux-gnu.so``): every ``__pycache__/*.{tag}.pyc``
    (not the ``.opt-1``/``.opt-2`` ones of ``-O``) outside SKIP, and the extension modules
    of ``lib-dynload``."""
    suffix = f".{tag}.pyc"
    assert library.children is not None
    dynload = library.children.get("lib-dynload")
    todo: list[tuple[Node, str]] = [(library, "")]
    while todo:
        d, at = todo.pop()
        assert d.children is not None
        for name, child in d.children.items():
            if child.upper:
                continue
            if child.children is not None:
                if d is not library or name not in SKIP:
                    todo.append((child, f"{at}{name}/"))
                continue
            if d is dynload:
                if f".{tag}-" not in name or not name.endswith(".so"):
                    continue
                module = f"{at}{name}"
            elif d.name == "__pycache__" and name.endswith(suffix) and ".opt-" not in name:
                module = f"{at.removesuffix('__pycache__/')}{name.removesuffix(suffix)}"
            else:
                continue
            entry = child.entry
            if entry is not None and entry.type == "reg" and entry.size > 0:
                yield module, child


class StdModules:
    """Told of each ELF program read by :class:`NeededLibs`; counts in its ``stats``."""

    def __init__(self, store: LayerStore, stats: NeededStats) -> None:
        self.store = store
        self.stats = stats
        self._seen: set[int] = set()  # library directories planned
        self._left = MOUNT_MODULE_BYTES

    async def fetch(
        self,
        program: Node,
        layers: list[Layer],
        extensions: Callable[[list[Node]], None] | None = None,
    ) -> None:
        """Fetch the modules of ``program`` if it is a Python whose library directory this
        mount has not planned yet; ``layers``: the mount's, by the tree's layer index.
        ``extensions`` is told of the extension modules planned once every request is on its
        way (their libraries can then be looked up as their bytes land)."""
        m = INTERPRETER.fullmatch(program.name)
        library = library_dir(program) if m is not None else None
        if m is None or library is None or library.ino in self._seen or self._left <= 0:
            return
        self._seen.add(library.ino)
        first: dict[int, list[Entry]] = {}
        rest: dict[int, list[Entry]] = {}
        exts: dict[int, list[Entry]] = {}
        planned = left = min(MODULE_BYTES, self._left)
        files = MODULE_FILES
        dynload: list[Node] = []
        for module, node in modules(library, f"cpython-{m.group(1)}{m.group(2)}"):
            entry = node.entry
            if entry is None or not 0 <= node.layer < len(layers) or entry.size > left:
                continue
            left -= entry.size
            files -= 1
            part = first if module in FIRST else rest
            if module.startswith("lib-dynload/"):
                part = exts
                dynload.append(node)
            part.setdefault(node.layer, []).append(entry)
            if not files:
                break
        self._left -= planned - left
        async with trio.open_nursery() as nursery:
            for part in (first, exts, rest):
                sent = []
                for i, entries in part.items():
                    sent.append(trio.Event())
                    nursery.start_soon(self._fetch, layers[i], entries, sent[-1])
                # The rest is planned once FIRST's requests are: planned first, it would
                # take FIRST's chunks into its ranges where they lie amid its own.
                for event in sent:
                    await event.wait()
                if part is exts and extensions is not None and dynload:
                    extensions(dynload)

    async def _fetch(self, layer: Layer, entries: list[Entry], sent: trio.Event) -> None:
        REQUEST_SENT.set(sent.set)  # the source calls it as the request leaves
        try:
            await self.store.prefetch(layer, entries, hold=True)
        except (LazyfsError, OSError) as e:
            log.warning("standard modules from %s: %s", layer.blob_digest, e)
            return
        finally:
            sent.set()  # nothing to send, or another source
        self.stats.modules += len(entries)
        self.stats.module_bytes += sum(e.size for e in entries)
