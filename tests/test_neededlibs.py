"""A mount without groups fetches the libraries an ELF file names (DT_NEEDED, found as the
loader would: DT_RUNPATH with $ORIGIN, the default directories, links followed) once a reader
has read the file's start, before anything reads them; ``--no-prefetch`` fetches none."""

# ruff: noqa: F811
from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from lazyfs_tools.convert import convert

from lazyfs.formats.toc import TOC, Chunk, Entry
from lazyfs.fs import neededlibs
from lazyfs.fs.neededlibs import NeededLibs, lower_file
from lazyfs.fs.tree import Tree
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.elffile import make_elf
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted_read_only
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

LIBDIR = "usr/lib/x86_64-linux-gnu"
PROG = make_elf(["libA.so.1", "libB.so.2"], pad=seeded_bytes(200_000, 1))
LIBS = {
    # libA names libC through its RUNPATH: followed one level down.
    f"{LIBDIR}/libA.so.1.0.0": make_elf(
        ["libC.so"], runpath="$ORIGIN/../../private", pad=seeded_bytes(50_000, 2)
    ),
    f"{LIBDIR}/libB.so.2": seeded_bytes(80_000, 3),  # no ELF: nothing further
    "usr/private/libC.so": seeded_bytes(30_000, 4),
}


def _hostile() -> dict[str, bytes]:
    """ELF files whose headers lie: the follow-ups fetch nothing for them and fail nothing."""
    far = bytearray(make_elf(["libC.so"]))
    struct.pack_into("<Q", far, 64 + 56 + 8, 2**40)  # PT_DYNAMIC's offset: past the file
    strtab = bytearray(make_elf(["libC.so"]))
    dyn_at = len(strtab) - 3 * 16
    struct.pack_into("<qQ", strtab, dyn_at, 5, 2**50)  # DT_STRTAB mapped nowhere
    return {
        "usr/bin/far": bytes(far),
        "usr/bin/strtab": bytes(strtab),
        "usr/bin/path": make_elf(["../private/libC.so", "/usr/private/libC.so"]),
        "usr/bin/short": make_elf(["libC.so"])[:100],
    }


HOSTILE = _hostile()
FAR = "opt/data.bin"
FAR_BYTES = seeded_bytes(3_000_000, 5)


def _items() -> list[Item]:
    return [
        Item("lib", "symlink", link="usr/lib"),
        Item("usr", "dir", mode=0o755),
        Item("usr/bin", "dir", mode=0o755),
        Item("usr/bin/prog", data=PROG, mode=0o755),
        *(Item(name, data=data, mode=0o755) for name, data in HOSTILE.items()),
        # Between the program and its libraries in the blob: a miss of the program brings
        # neighbours (amplify), not them.
        Item("opt", "dir", mode=0o755),
        Item(FAR, data=FAR_BYTES),
        Item("usr/lib", "dir", mode=0o755),
        Item(LIBDIR, "dir", mode=0o755),
        Item(f"{LIBDIR}/libA.so.1", "symlink", link="libA.so.1.0.0"),
        *(Item(name, data=data) for name, data in LIBS.items() if name.startswith(LIBDIR)),
        Item(f"{LIBDIR}/libunused.so.1", data=seeded_bytes(40_000, 6)),
        Item("usr/private", "dir", mode=0o755),
        Item("usr/private/libC.so", data=LIBS["usr/private/libC.so"]),
    ]


@pytest.fixture(scope="module")
def image(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("needed")
    make_layout(d / "src", [make_tar(_items())], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/needed/app:v1", tag="v1")
    return "needed/app:v1"


def _read_head(path: Path) -> bytes:
    """What the kernel reads of a program it executes first (the loader: the same)."""
    with path.open("rb") as f:
        return f.read(4096)


def _followed(
    mnt: Path, *, libraries: int = 0, elf_files: int = 0, timeout: float = 20.0
) -> dict[str, Any]:
    """The mount's stats once nothing is busy and at least ``elf_files`` ELF files were
    looked at and ``libraries`` fetched: "none fetched" means something only then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mnt)
        needed = stats["needed"]
        if (
            needed["libraries"] >= libraries
            and needed["elf_files"] >= elf_files
            and not needed["busy"]
        ):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"follow-ups not over: {needed}")
        time.sleep(0.05)


def test_the_libraries_an_elf_file_names_are_fetched_before_they_are_read(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        assert _read_head(mnt / "usr/bin/prog") == PROG[:4096]
        needed = _followed(mnt, libraries=len(LIBS))["needed"]
        assert needed["libraries"] == len(LIBS) and not needed["error"], needed
        assert needed["elf_files"] == 2  # prog and libA (libB is no ELF file)
        before = len(fault_proxy.served)
        # Bounded: the program's miss (with its neighbours, up to 768 KiB), its libraries,
        # the TOC; not the 3 MB file.
        assert fault_proxy.payload_bytes < 1_500_000
        assert (mnt / "lib/x86_64-linux-gnu/libA.so.1").read_bytes() == LIBS[
            f"{LIBDIR}/libA.so.1.0.0"
        ]
        for name, data in LIBS.items():
            assert (mnt / name).read_bytes() == data
        assert len(fault_proxy.served) == before
        # Any other file is fetched when read.
        assert (mnt / FAR).read_bytes() == FAR_BYTES
        assert len(fault_proxy.served) > before


def test_a_following_mount_reads_from_memory_in_the_fuse_reader(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Following ELF files does not take the mount's reads off the fast path: the libraries
    the follow-up fetched (in memory) are read in the C reader thread (they were all queued
    for trio's thread while libraries were followed)."""
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        assert _read_head(mnt / "usr/bin/prog") == PROG[:4096]
        _followed(mnt, libraries=len(LIBS))
        for name in LIBS:
            (mnt / name).stat()  # looked up now: below, only READs
        time.sleep(0.2)  # trio idle: the reader may take its lock
        before = mount_stats(mnt)["c_requests"]["fast"]
        for name, data in LIBS.items():
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, len(data) + 1, 0) == data
            finally:
                os.close(fd)
        stats = mount_stats(mnt)
        assert stats["c_requests"]["fast"] > before, stats["c_requests"]
        assert stats["handler_errors"] == 0


def test_elf_files_whose_headers_lie_fetch_nothing_and_break_nothing(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        for name, data in HOSTILE.items():
            assert (mnt / name).read_bytes() == data
        # Looked at (not merely not yet): all but the truncated one have a dynamic section.
        stats = _followed(mnt, elf_files=len(HOSTILE) - 1)
        assert stats["needed"]["elf_files"] == len(HOSTILE) - 1, stats
        assert stats["needed"]["libraries"] == 0 and not stats["needed"]["error"], stats
        assert stats["handler_errors"] == 0
        assert (mnt / "usr/private/libC.so").read_bytes() == LIBS["usr/private/libC.so"]


def test_no_prefetch_follows_nothing(image: str, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-prefetch") as mnt:
        assert _read_head(mnt / "usr/bin/prog") == PROG[:4096]
        time.sleep(0.3)
        assert mount_stats(mnt).get("needed") is None
        before = len(fault_proxy.served)
        assert (mnt / "usr/private/libC.so").read_bytes() == LIBS["usr/private/libC.so"]
        assert len(fault_proxy.served) > before


def test_lower_file_follows_links_as_the_kernel_does() -> None:
    entries = [
        Entry(name="lib", type="symlink", link_name="usr/lib"),
        Entry(name="loop", type="symlink", link_name="loop/x"),
        Entry(name="usr", type="dir"),
        Entry(name="usr/lib", type="dir"),
        Entry(name="usr/lib/abs", type="symlink", link_name="/usr/lib/libz.so"),
        Entry(name="usr/lib/libz.so", type="reg", size=3, digest="sha256:" + "1" * 64),
    ]
    tree = Tree.from_layers([TOC(compression="zstd", entries=entries, data_end=0)])
    found = lower_file(tree, "/lib/abs")
    assert found is not None and found.path() == ("usr", "lib", "libz.so")
    assert lower_file(tree, "lib/../lib/./libz.so") is found
    # "$ORIGIN/../../.." past the root stays in the image, as ".." at "/" does.
    assert lower_file(tree, "/usr/../../../../lib/abs") is found
    assert lower_file(tree, "/loop") is None
    assert lower_file(tree, "/usr/lib") is None  # a directory
    assert lower_file(tree, "/usr/lib/libz.so/x") is None
    assert lower_file(tree, "/nowhere/libz.so") is None


def test_elf_files_read_one_after_another_are_looked_at_a_few_at_a_time() -> None:
    """A scan reading the start of every ELF file (``file``, ``ldconfig``) starts no more
    look-ups at once than WORKERS; beyond QUEUE more waiting, the rest is left to the loader."""
    files = 200
    tree, entries = _elf_files(files)

    class Stalled:  # the network never answers: every look-up stays under way
        peeks = 0

        async def peek(self, *_: Any) -> bytes:
            self.peeks += 1
            await trio.sleep_forever()
            raise AssertionError

    store = Stalled()
    needed = NeededLibs(cast(LayerStore, store), tree, [cast(Layer, None)])

    def check() -> None:
        assert needed.stats.busy == store.peeks == neededlibs.WORKERS
        assert len(needed._seen) == neededlibs.WORKERS + neededlibs.QUEUE

    _read_starts(needed, tree, entries, check)


def _elf_files(files: int, chunks: tuple[Chunk, ...] = ()) -> tuple[Tree, list[Entry]]:
    """A tree of ``files`` ELF files f0, f1, … (PROG's size), in one layer."""
    entries = [
        Entry(name=f"f{i}", type="reg", size=len(PROG), digest=f"sha256:{i:064x}", chunks=chunks)
        for i in range(files)
    ]
    return Tree.from_layers([TOC(compression="zstd", entries=entries, data_end=0)]), entries


def _read_starts(
    needed: NeededLibs, tree: Tree, entries: list[Entry], check: Callable[[], None] = lambda: None
) -> None:
    """Each file's start read in turn, the follow-ups left to run after each; ``check`` then
    runs before the follow-ups are stopped."""

    async def scan() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(needed.run)
            for i, entry in enumerate(entries):
                node = tree.root.children[f"f{i}"]  # type: ignore[index]
                needed.noticed(node, entry, 0, PROG[:4096])
                await trio.testing.wait_all_tasks_blocked()
            check()
            nursery.cancel_scope.cancel()

    trio.run(scan)


def test_the_look_ups_own_reads_are_charged_to_the_mount_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader of many ELF files' starts (``file /usr/lib/*``) makes the follow-ups read each
    file's dynamic section: those reads count against MOUNT_BYTES like the libraries do, so
    once it is spent no more chunks are fetched for a look."""
    files = 10
    size = len(PROG)
    chunk = Chunk(file_offset=0, size=size, offset=0, end=1, digest="sha256:" + "0" * 64)
    tree, entries = _elf_files(files, (chunk,))
    monkeypatch.setattr(neededlibs, "MOUNT_BYTES", 3 * size)

    class Answering:  # every look gets its bytes at once, and is counted
        peeks = 0

        async def peek(self, _layer: Any, _entry: Any, offset: int, n: int) -> bytes:
            self.peeks += 1
            await trio.lowlevel.checkpoint()
            return PROG[offset : offset + n]

        async def prefetch(self, *_: Any) -> None:
            await trio.lowlevel.checkpoint()

    store = Answering()
    needed = NeededLibs(cast(LayerStore, store), tree, [cast(Layer, None)])

    _read_starts(needed, tree, entries)
    # Each look reads the dynamic section and the string table, both in the file's one
    # chunk, charged once: three chunks' worth of budget allows three files' looks (two
    # reads each), then nothing more is read for any file.
    assert store.peeks == 3 * 2
    assert needed._left == 0
    assert needed.stats.elf_files == files
