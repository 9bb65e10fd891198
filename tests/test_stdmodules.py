"""A mount without groups fetches a Python's standard modules (its ``__pycache__`` and
``lib-dynload``) once a reader has read the start of ``<prefix>/bin/pythonX.Y``, before the
interpreter imports them; what no start-up imports (tests, other versions, ``-O`` files,
sources, third-party packages) stays where it is."""

# ruff: noqa: F811
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from lazyfs_tools.convert import convert

from lazyfs.formats.toc import TOC, Entry
from lazyfs.fs.control import NeededStats
from lazyfs.fs.stdmodules import (
    MODULE_BYTES,
    MODULE_FILES,
    MOUNT_MODULE_BYTES,
    StdModules,
    library_dir,
    modules,
)
from lazyfs.fs.tree import Node, Tree
from lazyfs.remote.base import REQUEST_SENT
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.elffile import make_elf
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted_read_only
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

LIB = "usr/lib/python3.11"
CACHE = "cpython-311"
SO = f"{CACHE}-x86_64-linux-gnu.so"
PYTHON = make_elf(["libc.so.6"], pad=seeded_bytes(150_000, 1))
# What the interpreter imports: fetched at its exec.
MODULES = {
    f"{LIB}/__pycache__/os.{CACHE}.pyc": seeded_bytes(20_000, 2),
    f"{LIB}/__pycache__/zipfile.{CACHE}.pyc": seeded_bytes(90_000, 3),
    f"{LIB}/encodings/__pycache__/__init__.{CACHE}.pyc": seeded_bytes(6_000, 4),
    f"{LIB}/json/__pycache__/decoder.{CACHE}.pyc": seeded_bytes(15_000, 5),
    # An extension module naming a library (as _ssl names libssl and libcrypto).
    f"{LIB}/lib-dynload/_json.{SO}": make_elf(["libjson.so.1"], pad=seeded_bytes(40_000, 6)),
}
# What that module's import loads: fetched once the module's bytes are in, not at its read.
EXT_LIB = "usr/lib/x86_64-linux-gnu/libjson.so.1"
EXT_LIB_BYTES = seeded_bytes(60_000, 13)
# What it does not: read later, each costs a request.
OTHERS = {
    f"{LIB}/os.py": seeded_bytes(200_000, 7),
    f"{LIB}/__pycache__/os.{CACHE}.opt-1.pyc": seeded_bytes(20_000, 8),
    f"{LIB}/__pycache__/os.cpython-310.pyc": seeded_bytes(20_000, 9),
    f"{LIB}/test/__pycache__/test_os.{CACHE}.pyc": seeded_bytes(300_000, 10),
    f"{LIB}/site-packages/pkg/__pycache__/mod.{CACHE}.pyc": seeded_bytes(300_000, 11),
}
FAR = "opt/data.bin"  # between the program and its library in the blob: no neighbour


def _items() -> list[Item]:
    dirs = sorted({p.rsplit("/", 1)[0] for p in [*MODULES, *OTHERS, EXT_LIB]} | {"usr/lib"})
    return [
        Item("usr", "dir", mode=0o755),
        Item("usr/bin", "dir", mode=0o755),
        Item("usr/bin/python3", "symlink", link="python3.11"),
        Item("usr/bin/python3.11", data=PYTHON, mode=0o755),
        Item("opt", "dir", mode=0o755),
        Item(FAR, data=seeded_bytes(3_000_000, 12)),
        *(Item(d, "dir", mode=0o755) for d in dirs),
        *(
            Item(p, data=data)
            for p, data in sorted({**MODULES, **OTHERS, EXT_LIB: EXT_LIB_BYTES}.items())
        ),
    ]


@pytest.fixture(scope="module")
def image(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("stdmodules")
    make_layout(d / "src", [make_tar(_items())], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/stdmodules/py:v1", tag="v1")
    return "stdmodules/py:v1"


def _fetched(mnt: Path, modules: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        needed = mount_stats(mnt)["needed"]
        if needed["modules"] >= modules and not needed["busy"]:
            return cast(dict[str, Any], needed)
        if time.monotonic() > deadline:
            raise AssertionError(f"modules not fetched: {needed}")
        time.sleep(0.05)


def test_a_python_exec_fetches_its_standard_modules_before_they_are_imported(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        with (mnt / "usr/bin/python3").open("rb") as f:  # the kernel's exec, through the link
            assert f.read(4096) == PYTHON[:4096]
        needed = _fetched(mnt, len(MODULES))
        assert needed["modules"] == len(MODULES) and not needed["error"], needed
        assert needed["module_bytes"] == sum(map(len, MODULES.values()))
        before = len(fault_proxy.served)
        for path, data in MODULES.items():
            assert (mnt / path).read_bytes() == data
        assert len(fault_proxy.served) == before  # every import a hit
        for path, data in OTHERS.items():
            assert (mnt / path).read_bytes() == data
        assert len(fault_proxy.served) > before


def test_the_extension_modules_libraries_are_fetched_before_any_import(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """An extension module's libraries are fetched once the module's own bytes are in, not
    at its first read (then each waits, in series: libssl and libcrypto behind ``_ssl``)."""
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        with (mnt / "usr/bin/python3").open("rb") as f:
            assert f.read(4096) == PYTHON[:4096]
        needed = _fetched(mnt, len(MODULES))
        assert needed["libraries"] == 1 and not needed["error"], needed
        assert needed["bytes"] == len(EXT_LIB_BYTES)
        before = len(fault_proxy.served)
        assert (mnt / EXT_LIB).read_bytes() == EXT_LIB_BYTES  # no module read: a hit
        assert (mnt / f"{LIB}/lib-dynload/_json.{SO}").read_bytes() == MODULES[
            f"{LIB}/lib-dynload/_json.{SO}"
        ]
        assert len(fault_proxy.served) == before


def test_a_warm_mount_leaves_the_extension_modules_to_their_reads(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Extension modules the cache held before the mount are not looked at (their libraries
    came with them); they are followed at their first read, as any ELF file."""
    so = f"{LIB}/lib-dynload/_json.{SO}"
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        _read_head(mnt / "usr/bin/python3")
        assert _fetched(mnt, len(MODULES))["elf_files"] == 2  # python3.11 and _json
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        _read_head(mnt / "usr/bin/python3")
        assert _fetched(mnt, len(MODULES))["elf_files"] == 1  # python3.11 only
        assert _read_head(mnt / so) == MODULES[so][:4096]
        deadline = time.monotonic() + 20
        while mount_stats(mnt)["needed"]["elf_files"] < 2:  # followed at its read
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4096)


def test_no_prefetch_fetches_no_modules(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-prefetch") as mnt:
        assert (mnt / "usr/bin/python3.11").read_bytes()[:4] == PYTHON[:4]
        time.sleep(0.3)
        before = len(fault_proxy.served)
        assert (mnt / f"{LIB}/__pycache__/os.{CACHE}.pyc").read_bytes()
        assert len(fault_proxy.served) > before


def _tree(names: list[str]) -> Tree:
    entries = []
    for i, name in enumerate(names):
        if name.endswith("/"):
            entries.append(Entry(name=name.rstrip("/"), type="dir"))
        else:
            entries.append(Entry(name=name, type="reg", size=10, digest=f"sha256:{i:064x}"))
    return Tree.from_layers([TOC(compression="zstd", entries=entries, data_end=0)])


def _node(tree: Tree, path: str) -> Node:
    node = tree.root
    for part in path.split("/"):
        assert node.children is not None
        node = node.children[part]
    return node


def test_the_library_directory_is_the_programs_prefix_lib() -> None:
    tree = _tree(
        [
            "usr/", "usr/bin/", "usr/bin/python3.11", "usr/bin/python3", "usr/bin/python3.9",
            "usr/lib/", "usr/lib/python3.11/",
            "usr/local/", "usr/local/bin/", "usr/local/bin/python3.12",
            "usr/local/lib/", "usr/local/lib/python3.12/",
        ]
    )  # fmt: skip
    found = library_dir(_node(tree, "usr/bin/python3.11"))
    assert found is not None and found.path() == ("usr", "lib", "python3.11")
    found = library_dir(_node(tree, "usr/local/bin/python3.12"))
    assert found is not None and found.path() == ("usr", "local", "lib", "python3.12")
    assert library_dir(_node(tree, "usr/bin/python3")) is None  # no version: no directory
    assert library_dir(_node(tree, "usr/bin/python3.9")) is None  # none for that version


def test_the_modules_are_the_compiled_ones_of_this_version() -> None:
    lib = "usr/lib/python3.11"
    tree = _tree(
        [
            "usr/", "usr/lib/", f"{lib}/", f"{lib}/os.py",
            f"{lib}/__pycache__/", f"{lib}/__pycache__/os.{CACHE}.pyc",
            f"{lib}/__pycache__/os.{CACHE}.opt-1.pyc", f"{lib}/__pycache__/os.cpython-310.pyc",
            f"{lib}/encodings/", f"{lib}/encodings/__pycache__/",
            f"{lib}/encodings/__pycache__/__init__.{CACHE}.pyc",
            f"{lib}/json/", f"{lib}/json/__pycache__/", f"{lib}/json/decoder.py",
            f"{lib}/json/__pycache__/decoder.{CACHE}.pyc",
            f"{lib}/test/", f"{lib}/test/__pycache__/", f"{lib}/test/__pycache__/x.{CACHE}.pyc",
            f"{lib}/site-packages/", f"{lib}/site-packages/__pycache__/",
            f"{lib}/site-packages/__pycache__/a.{CACHE}.pyc",
            f"{lib}/lib-dynload/", f"{lib}/lib-dynload/_json.{SO}",
            f"{lib}/lib-dynload/_json.cpython-310-x86_64-linux-gnu.so",
            f"{lib}/lib-dynload/README",
        ]
    )  # fmt: skip
    found = sorted(m for m, _ in modules(_node(tree, lib), CACHE))
    assert found == [
        "encodings/__init__",
        "json/decoder",
        f"lib-dynload/_json.{SO}",
        "os",
    ]


def test_the_start_up_modules_are_asked_for_before_the_rest() -> None:
    """FIRST's files leave in requests of their own, planned before the rest's (which would
    otherwise take them into its ranges where they lie amid its own)."""
    lib = "usr/lib/python3.11"
    tree = _tree(
        [
            "usr/", "usr/bin/", "usr/bin/python3.11", "usr/lib/", f"{lib}/",
            f"{lib}/__pycache__/", f"{lib}/__pycache__/abc.{CACHE}.pyc",
            f"{lib}/__pycache__/json.{CACHE}.pyc", f"{lib}/__pycache__/site.{CACHE}.pyc",
            f"{lib}/encodings/", f"{lib}/encodings/__pycache__/",
            f"{lib}/encodings/__pycache__/__init__.{CACHE}.pyc",
            f"{lib}/encodings/__pycache__/cp1252.{CACHE}.pyc",
        ]
    )  # fmt: skip
    calls: list[tuple[str, list[str]]] = []

    class Recording:
        async def prefetch(self, _layer: Any, entries: list[Entry], *, hold: bool) -> None:
            assert hold
            names = sorted(e.name.removeprefix(f"{lib}/").split(".")[0] for e in entries)
            calls.append(("planned", names))
            await trio.sleep(0.01)
            sent = REQUEST_SENT.get()
            assert sent is not None
            sent()
            calls.append(("sent", names))
            await trio.sleep(0.01)

    stats = NeededStats()
    mods = StdModules(cast(LayerStore, Recording()), stats)
    program = _node(tree, "usr/bin/python3.11")
    trio.run(mods.fetch, program, [cast(Layer, None)])
    first = ["__pycache__/abc", "__pycache__/site", "encodings/__pycache__/__init__"]
    rest = ["__pycache__/json", "encodings/__pycache__/cp1252"]
    assert calls == [("planned", first), ("sent", first), ("planned", rest), ("sent", rest)]
    assert stats.modules == 5 and stats.module_bytes == 50
    trio.run(mods.fetch, program, [cast(Layer, None)])  # once per library directory
    assert len(calls) == 4


def test_a_library_of_too_many_modules_plans_a_bounded_number() -> None:
    """A hostile (or odd) TOC with a huge ``__pycache__`` of tiny files, far under
    MODULE_BYTES: the walk runs in the event loop and each module costs an Entry, so it
    stops at MODULE_FILES (900k of them took the event loop for 5-9 s)."""
    lib = "usr/lib/python3.11"
    many = [f"{lib}/__pycache__/m{i}.{CACHE}.pyc" for i in range(MODULE_FILES + 300)]
    tree = _tree(["usr/", "usr/bin/", "usr/bin/python3.11", "usr/lib/", f"{lib}/",
                  f"{lib}/__pycache__/", *many])  # fmt: skip
    planned: list[int] = []

    class Counting:
        async def prefetch(self, _layer: Any, entries: list[Entry], *, hold: bool) -> None:
            planned.append(len(entries))

    stats = NeededStats()
    mods = StdModules(cast(LayerStore, Counting()), stats)
    trio.run(mods.fetch, _node(tree, "usr/bin/python3.11"), [cast(Layer, None)])
    assert sum(planned) == MODULE_FILES == stats.modules


def test_the_modules_of_many_pythons_are_fetched_within_a_mounts_budget() -> None:
    """Each library directory is planned once, but an image may hold many Pythons (conda
    environments), and a reader of every ELF header would start each's fetch: at most
    MOUNT_MODULE_BYTES in all."""
    big = MODULE_BYTES // 2  # two modules fill a library's share
    entries = []
    for env in range(4):
        lib = f"env{env}/lib/python3.11"
        for d in (f"env{env}", f"env{env}/bin", f"env{env}/lib", lib, f"{lib}/__pycache__"):
            entries.append(Entry(name=d, type="dir"))
        entries.append(Entry(name=f"env{env}/bin/python3.11", type="reg", size=10))
        for i in range(2):
            name = f"{lib}/__pycache__/m{i}.{CACHE}.pyc"
            entries.append(Entry(name=name, type="reg", size=big, digest=f"sha256:{env}{i:063x}"))
    tree = Tree.from_layers([TOC(compression="zstd", entries=entries, data_end=0)])
    planned: list[int] = []

    class Counting:
        async def prefetch(self, _layer: Any, entries: list[Entry], *, hold: bool) -> None:
            planned.extend(e.size for e in entries)

    mods = StdModules(cast(LayerStore, Counting()), NeededStats())
    for env in range(4):
        trio.run(mods.fetch, _node(tree, f"env{env}/bin/python3.11"), [cast(Layer, None)])
    assert planned and sum(planned) == MOUNT_MODULE_BYTES < 4 * MODULE_BYTES
