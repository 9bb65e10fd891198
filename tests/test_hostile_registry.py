"""Hostile images and misbehaving registries, end to end (issue 9): the real docker-registry on
loopback, the fault proxy in front of it, crafted zstd:chunked images, real mounts."""

# ruff: noqa: F811  (pytest fixtures imported by name are redefined as parameters)
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError, RemoteError, first_error
from lazyfs.formats import toc as toc_module
from lazyfs.formats import zstdchunked
from lazyfs.formats.layer import TAIL_SIZE, locate_toc, toc_json
from lazyfs.fs.unmount import is_mounted, unmount
from lazyfs.remote import registry as registry_module
from lazyfs.remote.local import OCILayoutSource
from lazyfs.remote.registry import RegistrySource, RetryPolicy
from lazyfs.remote.resolve import resolve_image
from lazyfs.store.chunkcache import ChunkCache
from lazyfs.store.layerstore import LayerStore
from lazyfs.store.tocs import load_layer, load_tocs
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
from tests.support.fixtures import fault_proxy, registry  # noqa: F401
from tests.test_hostile_images import _declaring, _zstd_frame

BIG_CHUNK = 16 * 1024 * 1024
BIG = seeded_bytes(BIG_CHUNK, 7)  # one chunk, decoded to disk (store.bigchunk)
SMALL = seeded_bytes(300_000, 8)
MANY = 150_000  # directory entries added to the memory test's TOC

# Quick to give up, so stall tests take about a second.
STALL = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, stall_timeout=0.5, deadline=1.0)


def _read_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = oci.sha256_digest(data)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def _rewrite_toc(
    layout: Path,
    mutate: Callable[[dict[str, object], int], None],
    layer: int = -1,
    extra: bytes = b"",
) -> None:
    """Give the image's ``layer`` a TOC changed by ``mutate`` (as an attacker who controls
    the manifest would): a new TOC frame and footer, new digest and position annotations.
    ``extra`` is added to the content region; ``mutate(doc, at)`` learns its blob offset."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads(_read_blob(layout, mdesc["digest"]))
    ldesc = manifest["layers"][layer]
    blob = _read_blob(layout, ldesc["digest"])
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), ldesc["annotations"])
    doc = json.loads(toc_json(loc, blob[loc.start : loc.end]))
    mutate(doc, loc.data_end)
    plain = json.dumps(doc).encode()
    comp = zstandard.ZstdCompressor().compress(plain)
    head = blob[: loc.data_end] + extra
    start = len(head) + 8
    footer = zstdchunked.Footer(start, len(comp), len(plain), zstdchunked.MANIFEST_TYPE_TOC)
    new = (
        head
        + struct.pack("<II", zstdchunked.SKIPPABLE_MAGIC, len(comp))
        + comp
        + zstdchunked.skippable_frame(zstdchunked.encode_footer(footer))
    )
    ldesc["digest"], ldesc["size"] = _write_blob(layout, new)
    ldesc["annotations"] = {
        oci.ANN_ZSTD_CHECKSUM: "sha256:" + hashlib.sha256(comp).hexdigest(),
        oci.ANN_ZSTD_POSITION: f"{start}:{len(comp)}:{len(plain)}:1",
    }
    mdesc["digest"], mdesc["size"] = _write_blob(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))


def _image(d: Path, name: str, chunk_size: int = 64 * 1024, layers: int = 1) -> Path:
    items = [
        Item("etc", "dir", mode=0o755),
        Item("etc/hostname", data=b"lazyfs\n"),
        Item("small.bin", data=SMALL),
        Item("big.bin", data=BIG),
    ]
    tars = [make_tar(items)] + [make_tar([Item(f"l{i}", data=b"x")]) for i in range(1, layers)]
    make_lazy_layout(d / name, tars, chunk_size=chunk_size)
    return d / name


def _add_many(doc: dict[str, object], n: int = MANY) -> None:
    entries = doc["entries"]
    assert isinstance(entries, list)
    entries.append({"type": "dir", "name": "many/", "mode": 0o755})
    entries.extend({"type": "dir", "name": f"many/d{i:07d}/", "mode": 0o755} for i in range(n))


def _add_long_name(doc: dict[str, object], at: int) -> None:
    entries = doc["entries"]
    assert isinstance(entries, list)
    entries.append({"type": "dir", "name": "n" * 300 + "/", "mode": 0o755})


@pytest.fixture(scope="module")
def images(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("hostile")
    push_oci_layout(_image(d, "ok"), f"{registry.host}/hostile/ok:v1", tag="v1")
    longname = _image(d, "longname")
    _rewrite_toc(longname, _add_long_name)
    push_oci_layout(longname, f"{registry.host}/hostile/longname:v1", tag="v1")
    large = _image(d, "large", chunk_size=BIG_CHUNK)
    bomb = _declaring(_zstd_frame(os.urandom(2 << 20)), 64 << 30)

    def many_and_a_bomb(doc: dict[str, object], at: int) -> None:
        _add_many(doc)
        entries = doc["entries"]
        assert isinstance(entries, list)
        entries.append(
            {
                "type": "reg",
                "name": "bomb.bin",
                "size": 4096,
                "offset": at,
                "endOffset": at + len(bomb),
                "digest": "sha256:" + "ab" * 32,
                "chunkDigest": "sha256:" + "ab" * 32,
            }
        )

    _rewrite_toc(large, many_and_a_bomb, extra=bomb)
    push_oci_layout(large, f"{registry.host}/hostile/large:v1", tag="v1")
    return {"ok": "hostile/ok", "longname": "hostile/longname:v1", "large": "hostile/large:v1"}


def _source(host: str, repo: str, policy: RetryPolicy = STALL, **kw: object) -> RegistrySource:
    return RegistrySource(host, repo, plain_http=True, retry=policy, **kw)  # type: ignore[arg-type]


# -- the TOC fetch heals a bit flip ------------------------------------------------------------


def test_toc_fetch_is_retried_on_a_bad_digest(
    images: dict[str, str], fault_proxy: FaultProxy
) -> None:
    async def main() -> None:
        src = _source(fault_proxy.host, images["ok"])
        try:
            img = await resolve_image(src, "v1")
            fault_proxy.reset()
            fault_proxy.flip_next(1)  # the next blob response: the TOC's
            info = await load_layer(src, img.layers[0], None)
            assert "big.bin" in info.toc.by_name()
            assert len(fault_proxy.paths) == 2, fault_proxy.paths  # damaged, then good
        finally:
            await src.aclose()

    trio.run(main)


# -- stalls ------------------------------------------------------------------------------------


def test_stalled_registry_fails_within_the_deadline(
    images: dict[str, str], fault_proxy: FaultProxy
) -> None:
    async def main() -> None:
        src = _source(fault_proxy.host, images["ok"])
        try:
            digest = (await resolve_image(src, "v1")).layers[0].digest
            fault_proxy.stall_next(1)  # one stall: the next attempt gets the bytes
            t0 = time.monotonic()
            assert len(await src.read_range(digest, 0, 1000)) == 1000
            assert 0.4 < time.monotonic() - t0 < 2.0
            fault_proxy.stall_next(100)  # stalled for good: an error within deadline + stall
            t0 = time.monotonic()
            with pytest.raises(RemoteError):
                await src.read_range(digest, 0, 1000)
            assert time.monotonic() - t0 < STALL.deadline + STALL.stall_timeout + 1.0
        finally:
            fault_proxy.reset()
            await src.aclose()

    trio.run(main)


def test_stalled_mirror_hands_over_to_the_next_host(
    images: dict[str, str], registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    (tmp_path / registry.host).mkdir()
    (tmp_path / registry.host / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n\n'
        f'[host."http://{fault_proxy.host}"]\n  capabilities = ["pull", "resolve"]\n'
    )

    async def main() -> None:
        src = _source(registry.host, images["ok"], hosts_dir=tmp_path)
        try:
            digest = (await resolve_image(src, "v1")).layers[0].digest
            fault_proxy.stall_next(100)
            t0 = time.monotonic()
            assert len(await src.read_range(digest, 0, 1000)) == 1000
            assert time.monotonic() - t0 < STALL.stall_timeout + 1.0
        finally:
            fault_proxy.reset()
            await src.aclose()

    trio.run(main)


def test_reader_joining_a_failed_read_ahead_retries(
    images: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    # One attempt per request (no deadline left for a second), so the read-ahead fails.
    once = RetryPolicy(attempts=1, stall_timeout=0.5, deadline=0.0)

    async def main() -> None:
        src = _source(fault_proxy.host, images["ok"], policy=once)
        store = LayerStore(ChunkCache(tmp_path / "cache"))
        try:
            img = await resolve_image(src, "v1")
            info = await load_layer(src, img.layers[0], None)
            layer = store.add_layer(info.descriptor.digest, src, info.toc, info.descriptor.size)
            entry = info.toc.by_name()["small.bin"]
            fault_proxy.reset()
            fault_proxy.stall_next(1)
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def read_ahead() -> None:
                    try:
                        await store.prefetch(layer, [entry])
                    except RemoteError as e:
                        failed.append(e)

                nursery.start_soon(read_ahead)
                while not fault_proxy.paths:
                    await trio.sleep(0.01)
                # Joins the stalled flight, which fails; then fetches its own chunks.
                assert await store.read(layer, entry, 0, 4096) == SMALL[:4096]
            assert failed, "the read-ahead should have failed"
        finally:
            fault_proxy.reset()
            await store.aclose()
            await src.aclose()

    trio.run(main)


def test_entries_are_bounded_per_image_not_per_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two layers, each under the cap, together over it (a small cap keeps the test quick).
    cap = 1000
    monkeypatch.setattr(toc_module, "MAX_IMAGE_ENTRIES", cap)
    layout = _image(tmp_path, "split", layers=2)
    for i in (0, 1):
        _rewrite_toc(layout, lambda doc, at: _add_many(doc, cap // 2 + 10), layer=i)

    async def main() -> None:
        try:
            await load_tocs(OCILayoutSource(str(layout)), "v1")
        except BaseException as e:
            error = first_error(e)
        else:
            raise AssertionError("an image over the cap was opened")
        assert isinstance(error, FormatError)
        assert f"exceed {cap} entries" in str(error) and "\n" not in str(error)

    trio.run(main)


# -- refused images and bounded memory on a real mount -----------------------------------------


def test_mount_refuses_a_name_no_kernel_can_show(
    images: dict[str, str], registry: RegistryInstance, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = f"{registry.host}/{images['longname']}"
    try:
        res = run(
            *lazyfs_cmd("mount", ref, str(mnt), "--plain-http", "--read-only"),
            *("--cache", str(tmp_path / "cache")),
            timeout=60,
        )
    finally:
        if is_mounted(str(mnt)):
            unmount(str(mnt))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "layer sha256:" in lines[0] and "over 255 bytes" in lines[0], lines[0]


MEMORY_LIMIT = 1 << 30  # the daemon's address space; see README "Memory"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_large_image_mounts_and_reads_under_a_memory_limit(
    images: dict[str, str],
    registry: RegistryInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fewer malloc arenas: address space, not memory, is what RLIMIT_AS counts.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    ref = f"{registry.host}/{images['large']}"
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-prefetch", "--cache", str(tmp_path / "cache"))
    with mounted(ref, mnt, *args, preexec_fn=_limit_memory) as m:
        # A 2 MiB zstd frame declaring 64 GiB: EIO for its reader, nothing allocated.
        with pytest.raises(OSError) as e:
            (mnt / "bomb.bin").read_bytes()
        assert e.value.errno == errno.EIO
        names = os.listdir(mnt / "many")
        assert len(names) == MANY
        for off in (0, 5_000_000, BIG_CHUNK - 4096):
            with open(mnt / "big.bin", "rb") as f:
                f.seek(off)
                assert f.read(4096) == BIG[off : off + 4096]
        assert (mnt / "big.bin").read_bytes() == BIG
        assert (mnt / "small.bin").read_bytes() == SMALL
        for name in names[:: MANY // 100]:
            assert (mnt / "many" / name).is_dir()
        assert m.alive(), m.log_text()
        status = Path(f"/proc/{m.pid}/status").read_text()
        rss = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        print("daemon peak RSS:", rss)


def test_stalled_registry_gives_a_reader_eio_within_read_timeout(
    images: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    ref = f"{fault_proxy.host}/{images['ok']}:v1"
    mnt = tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-prefetch", "--cache", str(tmp_path / "cache"))
    with mounted(ref, mnt, *args, "--read-timeout", "1.5") as m:
        fault_proxy.stall_next(1000)
        t0 = time.monotonic()
        # The layer's last bytes: each stalled answer still brings half of what is missing,
        # and the chunks complete in it are used, but the last chunk never comes.  The
        # kernel asks twice (it retries a page whose read failed): each gets EIO in time.
        with pytest.raises(OSError) as e, open(mnt / "big.bin", "rb") as f:
            f.seek(len(BIG) - 4096)
            f.read()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 2 * 1.5 + 1.0
        fault_proxy.reset()  # the registry recovers: the same read now succeeds
        assert (mnt / "small.bin").read_bytes() == SMALL
        assert m.alive(), m.log_text()


def test_read_timeout_must_be_positive(tmp_path: Path) -> None:
    res = run(*lazyfs_cmd("mount", "oci:/nonexistent", str(tmp_path), "--read-timeout", "0"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "lazyfs: --read-timeout takes a number of seconds > 0"
    ], res.stderr


def test_oversized_document_is_refused(
    images: dict[str, str], registry: RegistryInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    # get_blob holds what it reads in memory: a registry sending more than a document's cap
    # (here shrunk below the image config's size) gets a one-line error, not our memory.
    monkeypatch.setattr(registry_module, "MAX_DOCUMENT_SIZE", 50)

    async def main() -> None:
        src = _source(registry.host, images["ok"])
        try:
            with pytest.raises(RemoteError) as e:
                await resolve_image(src, "v1")
            assert "too large" in str(e.value) and "\n" not in str(e.value)
        finally:
            await src.aclose()

    trio.run(main)
