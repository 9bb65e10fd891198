"""A mount with neither groups nor a re-laid-out layer prefetches the files any dynamically
linked start-up reads first (the ELF interpreter, the loader's cache, libc, ...), found by the
paths the loader opens, symbolic links followed; readers then find them without a request of
their own, and nothing else is fetched before it is read."""

# ruff: noqa: F811
from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from lazyfs_tools.convert import convert

from lazyfs.formats.toc import TOC, Entry, EntryTable, pack_toc, table_toc
from lazyfs.fs.prefetch import STARTUP_GROUP, startup_group
from lazyfs.store.chunkmap import ChunkMap
from lazyfs.store.layerstate import Layer
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats, mounted_read_only, wait_prefetched
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

LIBDIR = "usr/lib/x86_64-linux-gnu"
LANDMARKS = {
    f"{LIBDIR}/ld-linux-x86-64.so.2": seeded_bytes(150_000, 1),
    f"{LIBDIR}/libc.so.6": seeded_bytes(300_000, 2),
    "etc/ld.so.cache": seeded_bytes(5_000, 3),
    "usr/share/zoneinfo/Etc/UTC": seeded_bytes(118, 6),  # etc/localtime's target
}
NEIGHBOUR = f"{LIBDIR}/libd.so.1"  # right after libc in the blob: not a landmark
FAR = "opt/data.bin"  # no landmark, not near one
FAR_BYTES = seeded_bytes(3_000_000, 5)


def _items() -> list[Item]:
    """A merged-/usr layout: the loader's paths reach the files through symbolic links."""
    return [
        Item("etc", "dir", mode=0o755),
        Item("etc/ld.so.cache", data=LANDMARKS["etc/ld.so.cache"]),
        Item("etc/localtime", "symlink", link="/usr/share/zoneinfo/Etc/UTC"),
        Item("lib", "symlink", link="usr/lib"),
        Item("lib64", "symlink", link="usr/lib64"),
        Item("opt", "dir", mode=0o755),
        Item(FAR, data=FAR_BYTES),
        Item("usr", "dir", mode=0o755),
        Item("usr/lib", "dir", mode=0o755),
        Item(LIBDIR, "dir", mode=0o755),
        Item(f"{LIBDIR}/ld-linux-x86-64.so.2", data=LANDMARKS[f"{LIBDIR}/ld-linux-x86-64.so.2"]),
        Item(f"{LIBDIR}/libc.so.6", data=LANDMARKS[f"{LIBDIR}/libc.so.6"]),
        Item(NEIGHBOUR, data=seeded_bytes(20_000, 4)),
        Item("usr/lib64", "dir", mode=0o755),
        Item("usr/share", "dir", mode=0o755),
        Item("usr/share/zoneinfo", "dir", mode=0o755),
        Item("usr/share/zoneinfo/Etc", "dir", mode=0o755),
        Item("usr/share/zoneinfo/Etc/UTC", data=LANDMARKS["usr/share/zoneinfo/Etc/UTC"]),
        Item(
            "usr/lib64/ld-linux-x86-64.so.2",
            "symlink",
            link="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ]


@pytest.fixture(scope="module")
def image(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("startup")
    make_layout(d / "src", [make_tar(_items())], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/startup/app:v1", tag="v1")
    return "startup/app:v1"


def test_a_mount_without_groups_prefetches_the_start_up_landmarks(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-deltas") as mnt:
        pf = wait_prefetched(mnt)["prefetch"]
        assert pf["group"] == STARTUP_GROUP and pf["entries"] == len(LANDMARKS), pf
        assert not pf["error"]
        before = len(fault_proxy.served)
        # Bounded: the TOC and the landmarks' chunks (random bytes: about their size), not
        # the 3 MB file nor the neighbour.
        assert fault_proxy.payload_bytes < sum(map(len, LANDMARKS.values())) + 16_000
        # The loader's paths, through the links: no request of their own.
        assert (mnt / "lib64/ld-linux-x86-64.so.2").read_bytes() == LANDMARKS[
            f"{LIBDIR}/ld-linux-x86-64.so.2"
        ]
        for name, data in LANDMARKS.items():
            assert (mnt / name).read_bytes() == data
        stats = mount_stats(mnt)["layers"][0]["stats"]
        assert len(fault_proxy.served) == before
        assert stats["cache_misses"] == 0 and stats["wait_ns"] == 0
        # Any other file is fetched when read.
        assert (mnt / NEIGHBOUR).read_bytes() == seeded_bytes(20_000, 4)
        assert (mnt / FAR).read_bytes() == FAR_BYTES
        assert len(fault_proxy.served) > before


def test_no_prefetch_fetches_no_landmarks(
    image: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    with mounted_read_only(f"{fault_proxy.host}/{image}", tmp_path, "--no-prefetch") as mnt:
        assert mount_stats(mnt).get("prefetch") is None
        libc = f"{LIBDIR}/libc.so.6"
        assert (mnt / libc).read_bytes() == LANDMARKS[libc]
        assert mount_stats(mnt)["layers"][0]["stats"]["cache_misses"] > 0


def _layer(tmp_path: Path, entries: list[Entry]) -> Layer:
    toc = TOC(compression="zstd", entries=entries, data_end=0)
    digest = "sha256:" + "0" * 64
    return Layer(digest, None, toc, ChunkMap(tmp_path / "m.map", digest, []))  # type: ignore[arg-type]


def test_no_interpreter_no_start_up_group(tmp_path: Path) -> None:
    libc = Entry(name="lib64/libc.so.6", type="reg", size=10, digest="sha256:" + "1" * 64)
    assert startup_group([_layer(tmp_path, [libc])]) is None


def test_an_absolute_link_is_followed_from_the_image_root(tmp_path: Path) -> None:
    ld = "sha256:" + "3" * 64
    entries = [
        Entry(name="lib64", type="symlink", link_name="/usr/lib64"),
        Entry(name="usr", type="dir"),
        Entry(name="usr/lib64", type="dir"),
        Entry(name="usr/lib64/ld-linux-x86-64.so.2", type="reg", size=9, digest=ld),
    ]
    group = startup_group([_layer(tmp_path, entries)])
    assert group is not None
    assert [e.path for e in group.tiers[0].entries] == ["usr/lib64/ld-linux-x86-64.so.2"]


def test_links_that_loop_or_lead_nowhere_are_no_landmarks(tmp_path: Path) -> None:
    entries = [
        Entry(name="lib64", type="symlink", link_name="lib64"),
        Entry(name="lib", type="symlink", link_name="/nowhere"),
        Entry(name="etc", type="dir"),
        Entry(name="etc/ld.so.cache", type="reg", size=5, digest="sha256:" + "2" * 64),
    ]
    assert startup_group([_layer(tmp_path, entries)]) is None


def test_a_tables_start_up_group_makes_only_the_entries_it_resolves(tmp_path: Path) -> None:
    """A mount keeps its TOCs as tables: the start-up group (computed just after readiness)
    finds what the table version of the list gives, and makes an entry only for the names
    its resolution looks up, not for every name it may pass through (a Debian image's 1,300
    zoneinfo files)."""
    ld, utc = "sha256:" + "3" * 64, "sha256:" + "4" * 64
    zones = [Entry(name=f"usr/share/zoneinfo/Z{k}", type="reg", size=1, digest=utc)
             for k in range(200)]  # fmt: skip
    entries = [
        Entry(name="etc", type="dir"),
        Entry(name="etc/localtime", type="symlink", link_name="/usr/share/zoneinfo/Z7"),
        Entry(name="lib64", type="symlink", link_name="usr/lib64"),
        Entry(name="usr", type="dir"),
        Entry(name="usr/lib64", type="dir"),
        Entry(name="usr/lib64/ld-linux-x86-64.so.2", type="reg", size=9, digest="x"),
        Entry(name="usr/lib64/ld-linux-x86-64.so.2", type="reg", size=9, digest=ld),  # again
        Entry(name="usr/share", type="dir"),
        Entry(name="usr/share/zoneinfo", type="dir"),
        *zones,
    ]
    listed = startup_group([_layer(tmp_path, entries)])
    table = table_toc(pack_toc(TOC(compression="zstd", entries=entries, data_end=0)))
    digest = "sha256:" + "0" * 64
    layer = Layer(digest, None, table, ChunkMap(tmp_path / "t.map", digest, []))  # type: ignore[arg-type]
    made: list[int] = []
    getitem = type(table.entries).__getitem__

    def counting(self: EntryTable, i: int) -> Entry:
        made.append(i)
        return getitem(self, i)

    with mock.patch.object(EntryTable, "__getitem__", counting):
        group = startup_group([layer])
    assert group is not None and listed is not None
    assert group.tiers[0].entries == listed.tiers[0].entries
    assert {e.path: e.digest for e in group.tiers[0].entries} == {
        "usr/lib64/ld-linux-x86-64.so.2": ld,  # the last of a repeated name
        "usr/share/zoneinfo/Z7": utc,
    }
    assert 0 < len(made) < 30, len(made)
