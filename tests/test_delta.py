"""Image updates: ``lazyfs diff`` against the bytes a real registry then serves, binary patches
(``lazyfs delta``) used by pulls and mounts, and patches that are wrong in every way falling
back to chunks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
import zstandard

from lazyfs.delta.patch import (
    BaseChunk,
    Blob,
    DeltaIndex,
    FilePatch,
    apply_patch,
    decode_index,
    encode_index,
    make_patch,
)
from lazyfs.delta.provider import DeltaProvider
from lazyfs.delta.publish import build_deltas, push_deltas
from lazyfs.delta.report import ImageLayers, LayerDiff, diff, merged_files
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.formats.toc import TOC, Chunk, Entry
from lazyfs.opener import open_image
from lazyfs.progress import PulledEvent, decode_events
from lazyfs.remote.registry import RegistrySource
from lazyfs.remote.resolve import open_source
from lazyfs.store import ChunkCache
from lazyfs.store.layerstate import Layer
from lazyfs.store.layerstore import LayerStore
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
from tests.support.fixtures import fault_proxy, registry  # noqa: F401
from tests.test_store import MemSource

CHUNK = 64 * 1024


def edited(data: bytes, seed: int) -> bytes:
    """A binary update: scattered small edits and an insertion near the start that shifts
    every later byte (so no fixed-size chunk after it stays the same)."""
    r = random.Random(seed)
    out = bytearray(data)
    for _ in range(20):
        i = r.randrange(len(out) - 8)
        out[i : i + 4] = r.randbytes(4)
    out[1000:1000] = r.randbytes(1000)
    return bytes(out)


LIB = seeded_bytes(400_000, 11)
TOOL = seeded_bytes(300_000, 12)
DATA = seeded_bytes(500_000, 13)
VENDOR = seeded_bytes(200_000, 14)
CONF = b"".join(b"option%d = value%d\n" % (i, i) for i in range(3000))
MAIN = b"".join(b"def f%d(x):\n    return x + %d\n" % (i, i) for i in range(2000))
# Unchanged and smaller than the merge gap, between a changed and a new file in NEW's blob: a
# request must not fetch its held chunk again to join them.
LINK = seeded_bytes(8_000, 17)


def old_layers() -> list[bytes]:
    return [
        make_tar(
            [
                Item("usr", "dir", mode=0o755),
                Item("usr/lib", "dir", mode=0o755),
                Item("usr/lib/libfoo.so.1.2.3", data=LIB),
                Item("usr/lib/link.ld", data=LINK),
                Item("usr/bin", "dir", mode=0o755),
                Item("usr/bin/tool", data=TOOL, mode=0o755),
                Item("etc", "dir", mode=0o755),
                Item("etc/conf", data=CONF),
                Item("usr/share", "dir", mode=0o755),
                Item("usr/share/old.txt", data=seeded_bytes(30_000, 15)),
            ]
        ),
        make_tar(
            [
                Item("app", "dir", mode=0o755),
                Item("app/main.py", data=MAIN),
                Item("app/data.bin", data=DATA),
            ]
        ),
        make_tar([Item("opt", "dir", mode=0o755), Item("opt/vendor", data=VENDOR)]),
    ]


NEW_FILES = {
    "usr/lib/libfoo.so.1.2.4": edited(LIB, 1),  # a versioned library: a similar name
    "usr/bin/tool": TOOL,  # unchanged, in a changed layer
    "usr/lib/link.ld": LINK,
    "etc/conf": CONF.replace(b"value17\n", b"value17-changed\n"),
    "usr/share/new.txt": seeded_bytes(20_000, 16),
    "app/data.bin": DATA,  # moved here from OLD's app layer
    "app/main.py": MAIN.replace(b"return x + 5\n", b"return x - 5\n"),
    "opt/vendor": VENDOR,
}


def new_layers() -> list[bytes]:
    f = NEW_FILES
    return [
        make_tar(
            [
                Item("usr", "dir", mode=0o755),
                Item("usr/lib", "dir", mode=0o755),
                Item("usr/lib/libfoo.so.1.2.4", data=f["usr/lib/libfoo.so.1.2.4"]),
                Item("usr/bin", "dir", mode=0o755),
                Item("usr/bin/tool", data=TOOL, mode=0o755),
                Item("etc", "dir", mode=0o755),
                Item("etc/conf", data=f["etc/conf"]),
                Item("usr/lib/link.ld", data=LINK),
                Item("usr/share", "dir", mode=0o755),
                Item("usr/share/new.txt", data=f["usr/share/new.txt"]),
                Item("app", "dir", mode=0o755),
                Item("app/data.bin", data=DATA),
            ]
        ),
        make_tar([Item("app", "dir", mode=0o755), Item("app/main.py", data=f["app/main.py"])]),
        old_layers()[2],  # the same blob in both images
    ]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("delta-images")
    for tag, tars in (("v1", old_layers()), ("v2", new_layers())):
        make_lazy_layout(d / tag, tars, tag=tag, chunk_size=CHUNK)
    return d / "v1", d / "v2"


@pytest.fixture(scope="module")
def images(registry: RegistryInstance, layouts: tuple[Path, Path]) -> tuple[str, str]:  # noqa: F811
    refs = []
    for layout, tag in zip(layouts, ("v1", "v2"), strict=True):
        ref = f"{registry.host}/upd/app:{tag}"
        push_oci_layout(layout, ref, tag=tag)
        refs.append(ref)
    return refs[0], refs[1]


def lazyfs(*args: str) -> subprocess.CompletedProcess[str]:
    return run(*lazyfs_cmd(*args), timeout=120)


def pull(ref: str, cache: Path) -> PulledEvent:
    res = lazyfs("pull", ref, "--plain-http", "--cache", str(cache), "--progress", "json")
    assert res.returncode == 0, res.stderr
    done = [e for e in decode_events(res.stdout) if isinstance(e, PulledEvent)]
    assert len(done) == 1
    return done[0]


def node_holding(ref: str, tmp_path: Path, name: str = "node") -> Path:
    cache = tmp_path / name
    pull(ref, cache)
    return cache


def via(proxy: FaultProxy, ref: str, registry: RegistryInstance) -> str:  # noqa: F811
    return ref.replace(registry.host, proxy.host)


def diff_report(old: str, new: str, cache: Path) -> dict[str, object]:
    res = lazyfs("diff", old, new, "--plain-http", "--json", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    report: dict[str, object] = json.loads(res.stdout)
    return report


def nodes_holding_old(
    old: str, new: str, tmp_path: Path, spares: int
) -> tuple[Path, dict[str, object], list[Path]]:
    """A node that pulled OLD, the chunks-only diff from it to NEW, and ``spares`` copies of
    it (for mounts: the node's own cache is changed by a pull of NEW)."""
    node = node_holding(old, tmp_path)
    plain = diff_report(old, new, node)
    copies = [tmp_path / f"spare{i}" for i in range(spares)]
    for copy in copies:
        shutil.copytree(node, copy)
    return node, plain, copies


def mount_serves_new(ref: str, cache: Path, mnt: Path, *args: str) -> list[dict[str, int]]:
    """Mount NEW over ``cache``: every file reads as NEW's; the stats of each layer."""
    with mounted(ref, mnt, "--read-only", "--plain-http", "--cache", str(cache), "--no-prefetch",
                 *args) as m:  # fmt: skip
        for path, data in NEW_FILES.items():
            assert (m.mountpoint / path).read_bytes() == data, path
        stats = m.stats()
    return [layer["stats"] for layer in stats["layers"]]


async def _push_deltas(old: str, new: str, cache: Path, tamper: str = "") -> int:
    async with (
        open_image(old, cache_dir=cache, plain_http=True) as o,
        open_image(new, cache_dir=cache, plain_http=True) as n,
    ):
        deltas = await build_deltas(o, n, level=3)
    if tamper == "flip":  # damage the middle of every patch
        blob = bytearray(deltas.patches)
        for f in deltas.index.files:
            blob[f.offset + f.length // 2] ^= 0xFF
        deltas.patches = bytes(blob)
    elif tamper == "truncate":  # each patch loses its end
        deltas.index.files = [
            FilePatch(**{**_fields(f), "length": max(1, f.length // 2)}) for f in deltas.index.files
        ]
    elif tamper == "wrong-base":  # patches made against another file than the index names
        blob = bytearray()
        files = []
        for f in deltas.index.files:
            # A base close to the new content: the patch leans on it and is wrong elsewhere.
            p = make_patch(edited(NEW_FILES[f.path], 77), NEW_FILES[f.path], 3)
            files.append(FilePatch(**{**_fields(f), "offset": len(blob), "length": len(p)}))
            blob += p
        deltas.patches = bytes(blob)
        deltas.index.files = files
    if tamper:
        deltas.index.patches = Blob(
            "sha256:" + hashlib.sha256(deltas.patches).hexdigest(), len(deltas.patches)
        )
    source, _ = open_source(new, plain_http=True)
    assert isinstance(source, RegistrySource)
    try:
        await push_deltas(source, deltas)
    finally:
        await source.aclose()
    return len(deltas.index.files)


def _fields(f: FilePatch) -> dict[str, object]:
    return {k: getattr(f, k) for k in f.__struct_fields__}


# ------------------------------------------------------------------------------- pure parts


def test_patch_round_trip_and_bounds() -> None:
    old = seeded_bytes(300_000, 1)
    new = edited(old, 2)
    patch = make_patch(old, new, 3)
    assert len(patch) < len(new) // 20
    assert apply_patch(old, patch, len(new)) == new
    # The file's size comes from the TOC: a patch that would give more or less is refused.
    with pytest.raises(IntegrityError):
        apply_patch(old, patch, len(new) - 1)
    with pytest.raises(IntegrityError):
        apply_patch(old, patch, len(new) + 1)
    with pytest.raises(IntegrityError):
        apply_patch(old, patch[: len(patch) // 2], len(new))
    with pytest.raises(IntegrityError):
        apply_patch(old, b"not a zstd frame at all", len(new))
    # A size bomb without a declared size: 64 MiB of zeros in a frame of a few KiB is cut
    # off just past the file's size, not inflated.
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=17, write_content_size=False
    )
    bomb = zstandard.ZstdCompressor(compression_params=params).compress(bytes(64 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(IntegrityError, match="more than"):
        apply_patch(old, bomb, 1000)
    # One that needs a window wider than base and file together is refused before decoding.
    wide = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(IntegrityError, match="memory"):
        apply_patch(old, wide, 1000)
    # Against another base, zstd cannot tell: the output is wrong (the provider's digest
    # check is what refuses it), never the new file.
    with contextlib.suppress(IntegrityError):
        assert apply_patch(seeded_bytes(300_000, 3), patch, len(new)) != new


def test_index_validation() -> None:
    good = DeltaIndex(
        manifest="sha256:" + "a" * 64,
        base_manifest="sha256:" + "b" * 64,
        patches=Blob("sha256:" + "c" * 64, 100),
        files=[
            FilePatch(
                digest="sha256:" + "d" * 64,
                size=10,
                base_digest="sha256:" + "e" * 64,
                base_size=5,
                base_chunks=[BaseChunk("sha256:" + "f" * 64, 5)],
                offset=0,
                length=100,
            )
        ],
    )
    assert decode_index(encode_index(good)) == good
    for bad in (
        {"offset": 1},  # past the blob
        {"length": 0},
        {"base_size": 6},  # chunks do not add up
        {"size": -1},
    ):
        f = FilePatch(**{**_fields(good.files[0]), **bad})
        doc = DeltaIndex(**{**{k: getattr(good, k) for k in good.__struct_fields__}, "files": [f]})
        with pytest.raises(FormatError):
            decode_index(encode_index(doc))
    with pytest.raises(FormatError):
        decode_index(b"{}")


def test_merged_files_apply_whiteouts() -> None:
    def toc(*names: str) -> TOC:
        return TOC(
            compression="zstd",
            entries=[Entry(name=n, type="reg", digest=n) for n in names],
            data_end=0,
        )

    files = merged_files(
        [toc("a/x", "a/y", "b/z", "c"), toc("a/.wh.x", "b/.wh..wh..opq", "b/w"), toc("d")]
    )
    assert sorted(files) == ["a/y", "b/w", "c", "d"]


def test_diff_plans_as_a_pull_streams(tmp_path: Path) -> None:
    """Pure planning: NEW's chunks to fetch are one streamed request past the reader's 8 MiB
    cap, split only where a chunk OLD holds sits in the gap."""
    n, span = 200, 64 * 1024

    def layer(digest: str, chunks: list[Chunk]) -> Layer:
        end = chunks[-1].end
        toc = TOC(
            compression="zstd",
            entries=[Entry(name="f", type="reg", size=len(chunks) * span, chunks=tuple(chunks))],
            data_end=end,
        )
        return store.add_layer(digest, MemSource({}), toc)

    def planned(held: Chunk) -> LayerDiff:
        report = diff(
            ImageLayers("old", "sha256:" + "a" * 64, [(span, layer(held.digest, [held]))]),
            ImageLayers("new", "sha256:" + "b" * 64, [(n * span, new)]),
            merge_gap=64 * 1024,
            max_request=8 << 20,
        )
        (ld,) = report.layers
        return ld

    store = LayerStore(ChunkCache(tmp_path))
    chunks = [Chunk(i * span, span, i * span, (i + 1) * span, f"sha256:{i:064x}") for i in range(n)]
    new = layer("sha256:" + "2" * 64, chunks)
    other = planned(Chunk(0, span, 0, span, "sha256:" + "f" * 64))
    assert (other.requests, other.fetch_bytes) == (1, n * span)  # 12.5 MiB in one request
    ld = planned(chunks[150])
    # Two ranges around the held chunk, in one multi-range request.
    assert (ld.requests, ld.held_chunks, ld.fetch_chunks) == (1, 1, n - 1)
    assert ld.fetch_bytes == (n - 1) * span  # not the held chunk again


def test_provider_refuses_a_patch_made_against_another_base(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    base = seeded_bytes(100_000, 5)
    new = edited(base, 6)
    base_digest = "sha256:" + hashlib.sha256(base).hexdigest()
    cache.put(base_digest, base)
    # Made against a sibling of the base: it copies from the wrong offsets of this one.
    patch = make_patch(edited(base, 8), new, 3)
    fp = FilePatch(
        digest="sha256:" + hashlib.sha256(new).hexdigest(),
        size=len(new),
        base_digest=base_digest,
        base_size=len(base),
        base_chunks=[BaseChunk(base_digest, len(base))],
        offset=0,
        length=len(patch),
    )
    index = DeltaIndex(
        manifest="sha256:" + "a" * 64,
        base_manifest="sha256:" + "b" * 64,
        patches=Blob("sha256:" + hashlib.sha256(patch).hexdigest(), len(patch)),
        files=[fp],
    )
    provider = DeltaProvider(index, source=None, cache=cache)  # type: ignore[arg-type]  # unused
    entry = Entry(name="f", type="reg", size=len(new), digest=fp.digest)
    with pytest.raises(IntegrityError):
        provider._apply(entry, fp, patch)
    good = make_patch(base, new, 3)
    assert provider._apply(entry, fp, good) == {}  # no chunks in this entry, but it applied


# ------------------------------------------------------------------------------- registry


def test_diff_report_equals_the_bytes_the_registry_serves(
    images: tuple[str, str],
    registry: RegistryInstance,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    tmp_path: Path,
) -> None:
    old, new = images
    node = node_holding(old, tmp_path)
    report = diff_report(old, new, node)
    layers = report["layers"]
    assert isinstance(layers, list) and len(layers) == 3
    base, app, vendor = layers
    assert vendor["shared"] and vendor["fetch_bytes"] == 0
    assert report["full_pull_bytes"] == base["size"] + app["size"]
    assert (base["files_changed"], base["files_new"], base["files_unchanged"]) == (1, 2, 3)
    assert (app["files_changed"], app["files_new"]) == (1, 0)
    assert report["files_removed"] == 2  # old.txt and libfoo.so.1.2.3
    # The moved file's chunks came from OLD's app layer, the tool's from OLD's base layer.
    saved = report["saved_by"]
    assert isinstance(saved, dict)
    old_digests = {k.split(":", 1)[1] for k in saved}
    assert len(old_digests) == 3
    assert saved == {
        k: v for k, v in saved.items() if k.startswith("old:")
    }  # nothing within NEW itself
    assert 0 < report["fetch_bytes"] < report["full_pull_bytes"] // 2  # type: ignore[operator]

    fault_proxy.reset()
    pulled = pull(via(fault_proxy, new, registry), node)
    served = fault_proxy.payload_bytes  # multipart answers: their parts' headers left out
    assert served == report["fetch_bytes"], fault_proxy.served
    assert pulled.bytes_fetched == served
    assert pulled.bytes_held == report["held_bytes"]
    # And human output says the same in words.
    res = lazyfs("diff", old, new, "--plain-http", "--cache", str(node))
    assert res.returncode == 0, res.stderr
    assert "a pull of the changed layers" in res.stdout and "saved" in res.stdout


def test_pull_and_mount_use_patches(
    images: tuple[str, str],
    registry: RegistryInstance,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    tmp_path: Path,
) -> None:
    old, new = images
    res = lazyfs(
        "delta", old, new, "--push", "--plain-http", "--json", "--cache", str(tmp_path / "b")
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    # libfoo (by its similar name), etc/conf and app/main.py.
    assert summary["files"] == 3
    assert summary["patch_bytes"] * 10 < summary["chunk_bytes"]

    node, plain, (spare, spare2) = nodes_holding_old(old, new, tmp_path, 2)
    fault_proxy.reset()
    pulled = pull(via(fault_proxy, new, registry), node)
    assert pulled.patch_bytes > 0
    served = fault_proxy.payload_bytes
    assert served < plain["fetch_bytes"] // 4  # type: ignore[operator]
    index_blob = [n for p, n in fault_proxy.served if p.endswith(tuple(_artifact_blobs(new)))]
    assert served == pulled.bytes_fetched + pulled.patch_bytes + sum(index_blob)

    # A mount of NEW on a node holding OLD serves NEW exactly, made from patches.
    layers = mount_serves_new(via(fault_proxy, new, registry), spare, tmp_path / "mnt")
    assert sum(s["provided_chunks"] for s in layers) > 0
    assert sum(s["patch_bytes"] for s in layers) > 0
    assert sum(s["patch_fallbacks"] for s in layers) == 0
    # --no-deltas: the same reads, from chunks only.
    layers = mount_serves_new(
        via(fault_proxy, new, registry), spare2, tmp_path / "mnt", "--no-deltas"
    )
    assert all(s["patch_bytes"] == 0 for s in layers)
    assert all(s["provided_chunks"] == 0 for s in layers)


def _artifact_blobs(ref: str) -> list[str]:
    """The digests of the delta index blobs stored for ``ref`` (found by the pull)."""

    async def find() -> list[str]:
        from lazyfs.delta.patch import DELTAS_ARTIFACT_TYPE
        from lazyfs.remote.referrers import list_referrers

        source, _ = open_source(ref, plain_http=True)
        try:
            _, _, digest = await source.get_manifest(ref.rsplit(":", 1)[1])
            refs, _ = await list_referrers(source, digest)
            out = []
            for d in refs:
                if d.artifactType == DELTAS_ARTIFACT_TYPE:
                    data, _, _ = await source.get_manifest(d.digest)
                    out.append(json.loads(data)["layers"][0]["digest"])
            return out
        finally:
            await source.aclose()

    return trio.run(find)


@pytest.mark.parametrize("tamper", ["flip", "truncate", "wrong-base"])
def test_bad_patches_fall_back_to_chunks(
    tamper: str,
    images: tuple[str, str],
    registry: RegistryInstance,  # noqa: F811
    tmp_path: Path,
) -> None:
    old, new = images
    n = trio.run(_push_deltas, old, new, tmp_path / "builder", tamper)
    assert n == 3
    node, plain, (spare,) = nodes_holding_old(old, new, tmp_path, 1)
    pulled = pull(new, node)
    assert pulled.patch_bytes > 0
    assert pulled.bytes_fetched == plain["fetch_bytes"]  # every chunk came after all
    layers = mount_serves_new(new, spare, tmp_path / "mnt")
    assert sum(s["patch_fallbacks"] for s in layers) == 3
    assert sum(s["provided_chunks"] for s in layers) == 0


def test_deltas_written_into_a_layout(layouts: tuple[Path, Path], tmp_path: Path) -> None:
    old_dir, new_dir = layouts
    mine = tmp_path / "v2"
    shutil.copytree(new_dir, mine)
    old, new = f"oci:{old_dir}:v1", f"oci:{mine}:v2"
    res = lazyfs(
        "delta", old, new, "--out", f"oci:{mine}", "--json", "--cache", str(tmp_path / "b")
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == 3
    node = tmp_path / "node"
    assert lazyfs("pull", old, "--cache", str(node), "--progress", "none").returncode == 0
    pulled = pull(new, node)
    assert pulled.patch_bytes > 0
    # The image itself is untouched: its tag still names the same manifest.
    again = lazyfs("diff", old, new, "--json", "--cache", str(tmp_path / "other"))
    assert again.returncode == 0, again.stderr


def test_delta_errors_are_one_line(images: tuple[str, str], tmp_path: Path) -> None:
    old, new = images
    for args, message in (
        (("delta", old, f"oci:{tmp_path}", "--push"), "--push needs a registry reference"),
        (("delta", old, new, "--out", str(tmp_path)), "--out takes oci:DIR"),
        (("delta", old, new, "--push", "--level", "0"), "--level must be 1..22"),
        (("diff", old, f"oci:{tmp_path / 'nothing'}", "--plain-http"), "not an OCI image layout"),
    ):
        res = lazyfs(*args, "--cache", str(tmp_path / "c"))
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.stderr
    # OLD == NEW: nothing to patch.
    res = lazyfs("delta", old, old, "--push", "--plain-http", "--cache", str(tmp_path / "c"))
    assert res.returncode == 1 and "cheaper to send as a patch" in res.stderr


class _CountingSource:
    """Only ``read_range`` of one blob: enough for the provider, and counts requests."""

    name = "counting"

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.ranges: list[tuple[int, int]] = []

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        return self.blob[start:end]


def test_provider_fetches_neighbouring_patches_in_one_request(tmp_path: Path) -> None:
    from contextlib import asynccontextmanager

    from lazyfs.formats.toc import Chunk
    from lazyfs.store.chunkmap import ChunkMap
    from lazyfs.store.layerstate import Layer

    cache = ChunkCache(tmp_path / "cache")
    files, entries, blob = [], [], bytearray()
    for i in range(3):
        base = seeded_bytes(50_000, 20 + i)
        new = edited(base, 30 + i)
        bd = "sha256:" + hashlib.sha256(base).hexdigest()
        nd = "sha256:" + hashlib.sha256(new).hexdigest()
        cache.put(bd, base)
        patch = make_patch(base, new, 3)
        files.append(
            FilePatch(
                digest=nd, size=len(new), base_digest=bd, base_size=len(base),
                base_chunks=[BaseChunk(bd, len(base))], offset=len(blob), length=len(patch),
            )
        )  # fmt: skip
        blob += patch
        chunk = Chunk(file_offset=0, size=len(new), offset=0, end=1, digest=nd)
        entries.append(Entry(name=f"f{i}", type="reg", size=len(new), digest=nd, chunks=(chunk,)))
    index = DeltaIndex(
        manifest="sha256:" + "a" * 64,
        base_manifest="sha256:" + "b" * 64,
        patches=Blob("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob)),
        files=files,
    )
    source = _CountingSource(bytes(blob))
    provider = DeltaProvider(index, source, cache)  # type: ignore[arg-type]  # read_range only
    toc = TOC(compression="zstd", entries=entries, data_end=1)
    digests = [e.digest for e in entries]
    layer = Layer("sha256:" + "c" * 64, source, toc, ChunkMap(tmp_path / "m", "x", digests))  # type: ignore[arg-type]
    provider.add_layer(layer)

    @asynccontextmanager
    async def slot():  # type: ignore[no-untyped-def]
        yield

    got = trio.run(provider.provide, layer, [entries[0].chunks[0]], slot)
    assert set(got) == set(digests)  # the asked-for file and its two neighbours
    assert source.ranges == [(0, len(blob))]
    assert layer.stats.patch_bytes == len(blob)
