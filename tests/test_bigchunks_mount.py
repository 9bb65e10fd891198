"""Big chunks end to end (issue 9): images with a 64 MiB file cut as one chunk (as
containers/storage does for content its rolling hash cannot split), built by the test in both
formats, pushed to the real docker-registry on loopback and read through real mounts whose
daemon may grow its address space by less than the chunk's size."""

# ruff: noqa: F811  (pytest fixtures imported by name are redefined as parameters)
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import Mount, mounted
from tests.support.fixtures import registry  # noqa: F401

SIZE = 64 * 1024 * 1024
BIG = seeded_bytes(SIZE, 11)  # incompressible: the chunk spans ~64 MiB compressed too
SMALL = seeded_bytes(100_000, 12)
CHUNK_DIGEST = "sha256:" + hashlib.sha256(BIG).hexdigest()
# What the daemon's address space may grow by while it serves the big file: the old code
# (the chunk decoded in memory: its compressed and plain bytes at once) needs over twice this.
HEADROOM = 56 * 1024 * 1024


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = oci.sha256_digest(data)
    _blob(layout, digest).write_bytes(data)
    return digest, len(data)


def _damage_middle(layout: Path) -> None:
    """Flip one byte in the middle of the only layer (inside the big chunk's compressed
    bytes) and re-point the manifest at the damaged blob, as an attacker or a broken mirror
    could: the TOC stays valid, the chunk no longer verifies."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads(_blob(layout, mdesc["digest"]).read_bytes())
    ldesc = manifest["layers"][0]
    blob = bytearray(_blob(layout, ldesc["digest"]).read_bytes())
    blob[len(blob) // 2] ^= 0x40
    ldesc["digest"], ldesc["size"] = _put(layout, bytes(blob))
    mdesc["digest"], mdesc["size"] = _put(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def images(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bigchunks")
    items = [Item("small.bin", data=SMALL), Item("big.bin", data=BIG)]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    out: dict[str, str] = {}
    for name, fmt in (
        ("zstd", "zstd:chunked"),
        ("estargz", "estargz"),
        ("corrupt", "zstd:chunked"),
    ):
        convert(f"oci:{d / 'src'}:v1", f"oci:{d / name}:v1", fmt=fmt, chunk_size=SIZE)  # type: ignore[arg-type]
        if name == "corrupt":
            _damage_middle(d / name)
        push_oci_layout(d / name, f"{registry.host}/big/{name}:v1", tag="v1")
        out[name] = f"{registry.host}/big/{name}:v1"
    return out


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _limit(m: Mount) -> int:
    """Cap the ready daemon's address space at what it uses now plus HEADROOM."""
    limit = _vm_size(m.pid) + HEADROOM
    resource.prlimit(m.pid, resource.RLIMIT_AS, (limit, limit))
    return limit


def _args(tmp_path: Path) -> tuple[str, ...]:
    return ("--plain-http", "--read-only", "--no-prefetch", "--cache", str(tmp_path / "cache"))


def _cache_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file()]


@pytest.fixture
def one_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    # One malloc arena: a worker thread's new arena would reserve 64 MiB of address space
    # without using it, which is not what this limit is about.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")


@pytest.mark.parametrize("fmt", ["zstd", "estargz"])
def test_big_chunk_reads_partially_and_fully_under_a_memory_limit(
    fmt: str, images: dict[str, str], tmp_path: Path, one_arena: None
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(images[fmt], mnt, *_args(tmp_path)) as m:
        limit = _limit(m)
        for off in (SIZE // 2 + 123, 0, SIZE - 4096, 5_000_000):
            with open(mnt / "big.bin", "rb") as f:
                f.seek(off)
                assert f.read(4096) == BIG[off : off + 4096]
        assert hashlib.sha256((mnt / "big.bin").read_bytes()).hexdigest() == CHUNK_DIGEST[7:]
        assert (mnt / "small.bin").read_bytes() == SMALL
        assert m.alive(), m.log_text()
        assert _vm_size(m.pid) <= limit
        layer = m.stats()["layers"][0]["stats"]
        # One pass over the chunk, however many reads: the first decoded it to the cache.
        assert layer["bytes_fetched"] < SIZE * 1.1, layer
    chunk = tmp_path / "cache" / "chunks" / CHUNK_DIGEST[7:9] / CHUNK_DIGEST[7:]
    assert chunk.stat().st_size == SIZE
    # A fresh mount over the filled cache re-hashes the chunk on its first read, in pieces.
    with mounted(images[fmt], mnt, *_args(tmp_path)) as m:
        _limit(m)
        with open(mnt / "big.bin", "rb") as f:
            f.seek(SIZE - 10)
            assert f.read() == BIG[-10:]
        assert m.alive(), m.log_text()
        assert m.stats()["layers"][0]["stats"]["bytes_fetched"] == 0


def test_concurrent_readers_of_a_cold_big_chunk_share_one_decode(
    images: dict[str, str], tmp_path: Path, one_arena: None
) -> None:
    mnt = tmp_path / "mnt"
    offsets = [i * (SIZE // 8) + 777 for i in range(8)]

    def read_at(off: int) -> bytes:
        with open(mnt / "big.bin", "rb") as f:
            return os.pread(f.fileno(), 65536, off)

    with mounted(images["zstd"], mnt, *_args(tmp_path)) as m:
        _limit(m)
        with concurrent.futures.ThreadPoolExecutor(len(offsets)) as pool:
            got = list(pool.map(read_at, offsets))
        assert got == [BIG[o : o + 65536] for o in offsets]
        assert m.alive(), m.log_text()
        layer = m.stats()["layers"][0]["stats"]
        assert layer["bytes_fetched"] < SIZE * 1.1, layer


def test_corrupt_big_chunk_is_eio_and_nothing_is_cached(
    images: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(images["corrupt"], mnt, *_args(tmp_path)) as m:
        with pytest.raises(OSError) as e, open(mnt / "big.bin", "rb") as f:
            f.seek(SIZE // 2)
            f.read(4096)
        assert e.value.errno == errno.EIO
        assert (mnt / "small.bin").read_bytes() == SMALL  # the rest of the layer still serves
        assert m.alive(), m.log_text()
        assert "failed verification" in m.log_text()
    assert not [p for p in _cache_files(tmp_path) if p.stat().st_size > 1_000_000], _cache_files(
        tmp_path
    )
    assert not [p for p in _cache_files(tmp_path) if p.name.startswith(".tmp-")]


def test_big_chunk_over_the_cache_bound_is_eio_with_the_reason(
    images: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(images["zstd"], mnt, *_args(tmp_path), "--cache-size", "32M") as m:
        with pytest.raises(OSError) as e, open(mnt / "big.bin", "rb") as f:
            f.read(4096)
        assert e.value.errno == errno.EIO
        assert (mnt / "small.bin").read_bytes() == SMALL
        assert m.alive(), m.log_text()
        assert "larger than the cache" in m.log_text()
    assert not [p for p in _cache_files(tmp_path) if p.stat().st_size > 1_000_000]


def test_big_chunk_over_the_free_disk_is_eio_with_the_reason(
    images: dict[str, str], tmp_path: Path
) -> None:
    small_fs = tmp_path / "smallfs"  # a 40 MiB file system for the cache: the chunk is 64 MiB
    small_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small_fs)], check=True)
    try:
        mnt = tmp_path / "mnt"
        args = ("--plain-http", "--read-only", "--no-prefetch", "--cache", str(small_fs / "c"))
        with mounted(images["zstd"], mnt, *args) as m:
            with pytest.raises(OSError) as e, open(mnt / "big.bin", "rb") as f:
                f.read(4096)
            assert e.value.errno == errno.EIO
            assert (mnt / "small.bin").read_bytes() == SMALL
            assert m.alive(), m.log_text()
            assert "does not fit" in m.log_text()
        assert not [p for p in (small_fs / "c" / "chunks").rglob(".tmp-*")]
    finally:
        subprocess.run(["umount", str(small_fs)], check=True)
