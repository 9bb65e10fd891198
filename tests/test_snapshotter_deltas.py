"""Binary deltas through containerd: a node whose lazyfs snapshotter ran v1 of an image runs
v2 with its chain daemon fetching the patches stored beside v2 instead of v2's new chunks, and
serves v2 byte-identical; ``[deltas] enabled = false`` starts chain daemons with
``--no-deltas``."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from lazyfs_snapshotter.config import Config
from lazyfs_snapshotter.lazy import LazyLayers
from lazyfs_snapshotter.metadata import RemoteLayerRow
from lazyfs_snapshotter.remote import Chain
from lazyfs_snapshotter.testing import SnapshotterProcess

from lazyfs.process import wait_pid
from lazyfs.testing.containerd import ContainerdInstance
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mount_stats
from lazyfs.testing.rootfs import PROGRAMS, host_rootfs_items
from tests.support.fixtures import registry  # noqa: F401 - fixture
from tests.test_delta import edited
from tests.test_snapshotter_lazy import SN, daemons, rpull, run, stop_daemons

REPO = Path(__file__).resolve().parent.parent
OLD = seeded_bytes(400_000, 21)
NEW = edited(OLD, 22)  # every 64 KiB chunk differs from OLD's, the patch is small


@pytest.fixture
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lzd-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_node_holding_v1_runs_v2_from_patches(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,
) -> None:
    base = make_tar(host_rootfs_items(PROGRAMS))
    refs = {}
    for tag, data in (("v1", OLD), ("v2", NEW)):
        top = make_tar([Item("data", "dir", mode=0o755), Item("data/app.bin", data=data)])
        lazy = make_lazy_layout(base_dir / f"lazy-{tag}", [base, top], tag=tag)
        refs[tag] = f"{registry.host}/deltas/app:{tag}"
        push_oci_layout(lazy, refs[tag], tag=tag)
    made = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "delta", refs["v1"], refs["v2"], "--push",
         "--plain-http", "--cache", str(base_dir / "builder")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr

    with ExitStack() as stack:
        proxy = stack.enter_context(FaultProxy(registry.url))
        hosts = base_dir / "hosts"
        (hosts / proxy.host).mkdir(parents=True)
        (hosts / proxy.host / "hosts.toml").write_text(f'server = "http://{proxy.host}"\n')
        sp = SnapshotterProcess(base_dir / "sn", args=("--hosts-dir", str(hosts)))
        stack.callback(stop_daemons, sp.root)
        stack.callback(sp.stop)
        sp.start()
        ctrd = stack.enter_context(
            ContainerdInstance(base_dir / "ctrd", proxy_snapshotters={SN: sp.address}))
        v1, v2 = (refs[t].replace(registry.host, proxy.host) for t in ("v1", "v2"))
        sha = ("/usr/bin/sha256sum", "/data/app.bin")
        rpull(ctrd, v1)
        assert run(ctrd, v1, "c1", *sha).split()[0] == hashlib.sha256(OLD).hexdigest()
        # A node that ran v1 holds its chunks: v1's daemon keeps what it prefetched (its
        # libraries) in memory until reads pause, or until it stops (containerd removes the
        # container's snapshot in its own time), and v2's would fetch them again meanwhile.
        wait_cached(sp.root)

        proxy.reset()
        rpull(ctrd, v2)
        assert run(ctrd, v2, "c2", *sha).split()[0] == hashlib.sha256(NEW).hexdigest()
        # v2's TOC, the delta index and one patch: a fraction of the file's new chunks.
        assert proxy.blob_bytes < len(NEW) // 4, (proxy.blob_bytes, proxy.served, proxy.ranges)
        assert "Traceback" not in sp.log_text()


def wait_cached(root: Path, timeout: float = 20.0) -> None:
    """Return once every chain daemon of the snapshotter at ``root`` has written the chunks
    it holds in memory to the shared cache, or has exited."""
    deadline = time.monotonic() + timeout
    for pid, mnt, _ in daemons(root):
        while pid and not wait_pid(pid, 0):
            try:
                stats = mount_stats(Path(mnt))
            except subprocess.CalledProcessError:  # unmounted: it writes them as it exits
                stats = None
            if stats is not None and not any(
                layer["stats"].get("bytes_unwritten") for layer in stats["layers"]
            ):
                break
            assert time.monotonic() < deadline, f"daemon {pid} still holds chunks: {stats}"
            time.sleep(0.05)


def test_config_turns_deltas_off_for_chain_daemons(tmp_path: Path) -> None:
    row = RemoteLayerRow("127.0.0.1:5000/app@sha256:" + "0" * 64, "sha256:" + "0" * 64, 1, "{}")
    chain = Chain("chain", row)
    on = LazyLayers(tmp_path, Config(), None)._options(chain)
    off = LazyLayers(tmp_path, Config(deltas=False), None)._options(chain)
    assert "--no-deltas" not in on and off == [*on, "--no-deltas"]
