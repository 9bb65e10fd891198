"""Chains of lazy layers that images share, and Cleanup of what no snapshot owns.

Two images share a base layer: the base's snapshot (keyed by its chain ID, which only the
layers' diff IDs make) is committed once, from the first image's labels.  The second image's
chains must still mount right: its own top over the shared base, and the base alone under a
container of either image.  Cleanup then stops daemons on mounts under ROOT/mnt that no daemon
row owns (a crash between a daemon's start and its record), by the PID their control socket
gives, detaches stale ones and removes stray directories and logs, leaving owned mounts be.
All through the gRPC API with CRI's labels (cheap: no containerd)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from lazyfs_snapshotter import lazy
from lazyfs_snapshotter.api import snapshots_pb2
from lazyfs_snapshotter.config import Config, RegistryConfig
from lazyfs_snapshotter.errors import AlreadyExists
from lazyfs_snapshotter.lazy import LazyLayers
from lazyfs_snapshotter.metadata import Kind, MetadataStore, PendingRef, RemoteLayerRow
from lazyfs_snapshotter.remote import (
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    STARGZ_DIGEST,
    STARGZ_REF,
    TARGET_LABEL,
    Chain,
)
from lazyfs_snapshotter.snapshots import Mount as SnapshotMount
from lazyfs_snapshotter.snapshots import Snapshotter
from lazyfs_snapshotter.testing import Client, SnapshotterProcess

from lazyfs.fs.unmount import mounts_under
from lazyfs.ocilayout import Layout
from lazyfs.process import wait_pid
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar
from lazyfs.testing.mounts import Mount, start_mount
from tests.support.fixtures import registry  # noqa: F401 - fixture
from tests.test_snapshotter_lazy import (  # noqa: F401 - fixture
    base_dir,
    daemons,
    mount_container,
    prepare_layers,
    stop_daemons,
)
from tests.test_snapshotter_unit import D1, _layer_labels, _LazyEverything

BASE = [Item("etc", "dir", mode=0o755), Item("etc/base", data=b"shared base\n"),
        Item("etc/gone-in-b", data=b"whited out by b\n")]  # fmt: skip
TOP_A = [Item("etc", "dir", mode=0o755), Item("etc/a", data=b"image a\n")]
TOP_B = [Item("etc", "dir", mode=0o755), Item("etc/b", data=b"image b\n"),
         Item("etc/.wh.gone-in-b", data=b"")]  # fmt: skip


def _chain_ids(tars: list[bytes]) -> list[str]:
    """containerd's chain IDs: ``sha256(parent-chain-id + " " + diff-id)`` from the bottom."""
    ids: list[str] = []
    for tar in tars:
        diff = "sha256:" + hashlib.sha256(tar).hexdigest()
        ids.append(diff if not ids else "sha256:" + hashlib.sha256(
            f"{ids[-1]} {diff}".encode()).hexdigest())  # fmt: skip
    return ids


@dataclass(frozen=True)
class _Image:
    ref: str  # by tag, at the host the snapshotter reaches the registry at
    manifest: str
    layers: list[str]
    chains: list[str]

    def prepare(self, c: Client, stargz: bool = False) -> None:
        prepare_layers(c, self.ref, self.manifest, self.layers, self.chains, stargz)


def _push(work: Path, reg: RegistryInstance, host: str, name: str, tars: list[bytes]) -> _Image:
    make_lazy_layout(work / name, tars)
    push_oci_layout(work / name, f"{reg.host}/{name}/app:v1", tag="v1")
    lay = Layout(work / name)
    layers = [layer.digest for layer in lay.manifest("v1").layers]
    return _Image(f"{host}/{name}/app:v1", lay.find("v1").digest, layers, _chain_ids(tars))


@contextmanager
def _two_images(
    reg: RegistryInstance, work: Path, base: Path, host: str = ""
) -> Iterator[tuple[ExitStack, SnapshotterProcess, Client, _Image, _Image]]:
    """Images a (BASE under TOP_A) and b (BASE under TOP_B) in ``reg``, and a snapshotter in
    ``base`` that reaches them at ``host`` (the registry's own by default) over plain HTTP.
    The stack stops it, and then every daemon it recorded, by PID."""
    host = host or reg.host
    shared = make_tar(BASE)
    a = _push(work, reg, host, "a", [shared, make_tar(TOP_A)])
    b = _push(work, reg, host, "b", [shared, make_tar(TOP_B)])
    (work / "sn.toml").write_text(f'[registry]\nplain_http = ["{host}"]\n')
    with ExitStack() as stack:
        sp = SnapshotterProcess(base, args=("--config", str(work / "sn.toml")))
        stack.callback(stop_daemons, sp.root)
        stack.enter_context(sp)
        c = Client(sp.address, namespace="k8s.io")
        stack.callback(c.close)
        yield stack, sp, c, a, b


def _daemon_rows(root: Path) -> dict[str, tuple[int, str, str]]:
    """chain id -> (pid, mountpoint, image_ref) of the ``daemons`` table."""
    with sqlite3.connect(root / "metadata.db") as conn:
        rows = conn.execute("SELECT chain_id, pid, mountpoint, image_ref FROM daemons")
        return {chain: (pid, mnt, ref) for chain, pid, mnt, ref in rows}


def test_images_sharing_a_base_mount_right_and_cleanup_sweeps_strays(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # ROOT through a symlink: mountinfo shows the resolved path, the rows ROOT as given.
    (base_dir / "real").mkdir()
    (base_dir / "link").symlink_to(base_dir / "real")
    with _two_images(registry, tmp_path, base_dir / "link") as (stack, sp, c, a, b):
        assert a.layers[0] == b.layers[0]  # the same base blob (conversion is deterministic)
        a.prepare(c)
        b.prepare(c)

        root_b = mount_container(stack, c, "ctr-b", b.chains[1], base_dir / "b")
        assert sorted(os.listdir(root_b / "etc")) == ["b", "base"]  # b's whiteout applied
        assert (root_b / "etc/base").read_bytes() == b"shared base\n"
        root_a = mount_container(stack, c, "ctr-a", a.chains[1], base_dir / "a")
        assert sorted(os.listdir(root_a / "etc")) == ["a", "base", "gone-in-b"]
        # A container of b right on the shared base (say, b's upper layers were pulled
        # normally): the base's one mount, made from a's manifest, holds the base only.
        root_base = mount_container(stack, c, "ctr-base", b.chains[0], base_dir / "base")
        assert sorted(os.listdir(root_base / "etc")) == ["base", "gone-in-b"]
        rows = _daemon_rows(sp.root)
        assert rows[b.chains[1]][2] == f"{registry.host}/b/app@{b.manifest}"
        assert rows[a.chains[1]][2] == f"{registry.host}/a/app@{a.manifest}"
        assert rows[a.chains[0]][2] == f"{registry.host}/a/app@{a.manifest}"

        # Strays under ROOT/mnt: a live daemon nobody recorded, a stale mount of a killed
        # one, an empty directory and a log.
        mnt_dir = sp.root / "mnt"
        strays: list[Mount] = []
        stack.callback(lambda: [m.stop() for m in strays])
        image = f"oci:{tmp_path / 'a'}:v1"
        for name in ("0000live", "0000dead"):
            strays.append(start_mount(image, mnt_dir / name, "--read-only", "--no-prefetch",
                                      "--cache", str(tmp_path / f"cache-{name}")))
        strays[1].kill()
        (mnt_dir / "0000empty").mkdir()
        (mnt_dir / "0000empty.log").write_text("a daemon's last words\n")
        real = base_dir / "real" / "root" / "mnt"
        owned = {str(real / Path(mnt).name) for _, mnt, _ in rows.values()}
        assert set(mounts_under(str(mnt_dir))) == owned | {str(real / m.mountpoint.name)
                                                          for m in strays}  # fmt: skip

        c.call("Cleanup", snapshots_pb2.CleanupRequest())
        assert wait_pid(strays[0].pid, 10)
        assert set(mounts_under(str(mnt_dir))) == owned
        assert sorted(p.name for p in mnt_dir.iterdir() if p.name.startswith("0000")) == []
        assert all(pid != 0 and not wait_pid(pid, 0) for pid, _, _ in rows.values())
        assert (root_b / "etc/b").read_bytes() == b"image b\n"  # owned mounts still serve
        assert "cleanup: stopping stray daemon pid" in sp.log_text()
        assert "Traceback" not in sp.log_text()


def test_a_shared_chain_mounts_from_another_image_when_the_first_is_deleted(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with _two_images(registry, tmp_path, base_dir / "sn") as (stack, sp, c, a, b):
        a.prepare(c)  # commits the shared base
        b.prepare(c)
        # a is deleted from its registry, and the node no longer holds its manifest.
        res = httpx.delete(f"http://{registry.host}/v2/a/app/manifests/{a.manifest}")
        assert res.status_code == 202, res.text
        (cached,) = (sp.root / "cache" / "documents").glob(f"*{a.manifest.split(':')[1]}*")
        cached.unlink()
        # A container of b right on the shared base: its chain mounts from b's manifest.
        root = mount_container(stack, c, "ctr-base", b.chains[0], base_dir / "base")
        assert sorted(os.listdir(root / "etc")) == ["base", "gone-in-b"]
        assert (root / "etc/base").read_bytes() == b"shared base\n"
        assert _daemon_rows(sp.root)[b.chains[0]][2] == f"{registry.host}/b/app@{b.manifest}"
        assert f"cannot mount chain {b.chains[0]} from {registry.host}/a/app@" in sp.log_text()
        assert "Traceback" not in sp.log_text()


def test_preparing_layers_found_there_asks_the_registry_nothing_again(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Every layer of a re-pull, and the base of every image sharing it, is found there: its
    # Prepare only names one more image for the chain, kept to be looked up if ever needed.
    with (
        FaultProxy(registry.url) as proxy,
        _two_images(registry, tmp_path, base_dir / "sn", proxy.host) as (_, sp, c, a, b),
    ):
        a.prepare(c)
        proxy.reset()
        for stargz in (False, True):  # b's base: a's, held
            prepare_layers(c, b.ref, b.manifest, b.layers[:1], b.chains[:1], stargz)
        assert proxy.requests == 0, proxy.paths
        b.prepare(c)  # b's own top layer: b's manifest and its TOC
        assert proxy.requests > 0
        proxy.reset()
        for img in (a, b, a, b):
            img.prepare(c)
            img.prepare(c, stargz=True)
        assert proxy.requests == 0, proxy.paths
        with sqlite3.connect(sp.root / "metadata.db") as conn:
            refs = conn.execute("SELECT image_ref FROM remote_refs").fetchall()
            pending = conn.execute(
                "SELECT s.key, p.image_ref, p.manifest_digest FROM pending_refs p"
                " JOIN snapshots s ON s.id = p.snapshot_id ORDER BY p.rowid").fetchall()
        assert refs == []
        # Each once, in the order last named (the loop's last round: a's, then b's): the
        # image's own tag (stargz's labels give no digest) for its base and top; for the
        # base, b by manifest (CRI's labels), then by tag (stargz's).
        assert pending == [(a.chains[0], a.ref, ""), (a.chains[1], a.ref, ""),
                           (a.chains[0], b.ref, b.manifest), (a.chains[0], b.ref, ""),
                           (b.chains[1], b.ref, "")]  # fmt: skip


def test_a_pending_tag_that_moved_to_other_lower_layers_is_no_way_to_mount(
    registry: RegistryInstance,  # noqa: F811
    tmp_path: Path,
) -> None:
    # A pending image named by tag alone (stargz's labels) is looked up only when the chain
    # is mounted, maybe long after: by then the tag may name a rebuild with the same top
    # layer over another base.  Mounting the chain from it would serve that base's files
    # under the chain's name; its diff_ids must give the chain's ID.
    top = make_tar(TOP_A)
    tars = [make_tar(BASE), top]
    a = _push(tmp_path, registry, registry.host, "a", tars)
    chain = _chain_ids(tars)[1]
    other = [make_tar([*BASE, Item("etc/rebuilt", data=b"another base\n")]), top]
    moved = _push(tmp_path, registry, registry.host, "moved", other)
    assert moved.layers[1] == a.layers[1]  # the same top layer blob
    push_oci_layout(tmp_path / "moved", f"{registry.host}/a/app:v1", tag="v1")  # a:v1 moves
    config = Config(registry=RegistryConfig(plain_http=(registry.host,)))
    layers = LazyLayers(tmp_path / "root", config, None)
    store = layers._store = MetadataStore(tmp_path / "metadata.db")  # start() forks: not here
    try:
        top_row = RemoteLayerRow(f"{registry.host}/a/app@{a.manifest}", a.manifest, 1, "{}")
        pending = PendingRef(a.ref, "", a.layers[1])
        with store.transaction() as tx:
            snap = tx.insert("ns", "top", None, Kind.COMMITTED, {})
            tx.add_pending_ref(snap, pending)
        assert layers._looked_up(Chain(chain, top_row, (), (pending,), snap), pending) is None
        with store.transaction() as tx:  # the registry's answer is final: not asked again
            assert tx.pending_refs(snap) == []
    finally:
        store.close()


def test_a_slow_stray_daemon_holds_no_other_call(base_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # A stray daemon with a file open in its mount exits only once that file closes.  The
    # sweep waits for it outside the chains lock: a Mounts (which takes that lock) answers
    # meanwhile, and the sweep still ends the daemon.  In-process, no registry: cheap.
    layers = _LazyEverything(tmp_path)
    sn = Snapshotter(base_dir / "root", layers)
    stray: Mount | None = None
    try:
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", "x1", "", _layer_labels("L1", D1))
        sn.prepare("ns", "ctr", "L1", {})
        make_lazy_layout(tmp_path / "img", [make_tar([Item("f", data=b"stray\n")])])
        stray = start_mount(f"oci:{tmp_path / 'img'}:v1", sn.root / "mnt" / "0000slow",
                            "--read-only", "--no-prefetch", "--cache", str(tmp_path / "c"))
        with open(stray.mountpoint / "f", "rb") as held:
            sweep = threading.Thread(target=sn.cleanup)
            sweep.start()
            try:
                while mounts_under(str(sn.root / "mnt")):  # detached: now it waits for the PID
                    assert sweep.is_alive()
                    time.sleep(0.02)
                (m,) = sn.mounts("ns", "ctr")  # takes the chains lock
                assert f"lowerdir={tmp_path}/mnt/L1" in m.options
                assert sweep.is_alive()  # answered while the sweep still waits
                assert held.read() == b"stray\n"  # the detached daemon still serves its file
            finally:
                held.close()
                sweep.join(60)
        assert not sweep.is_alive()
        assert wait_pid(stray.pid, 0)
        assert not (sn.root / "mnt" / "0000slow").exists()
    finally:
        if stray is not None:
            stray.stop()
        sn.close()


def _prepare_in(sn: Snapshotter, img: _Image) -> None:
    """Prepare each of ``img``'s layers as containerd's unpacker does (CRI's labels):
    each is committed as a remote snapshot."""
    parent = ""
    for digest, chain in zip(img.layers, img.chains, strict=True):
        labels = {TARGET_LABEL: chain, CRI_IMAGE_REF: img.ref, CRI_LAYER_DIGEST: digest,
                  CRI_MANIFEST_DIGEST: img.manifest}  # fmt: skip
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", f"extract-{chain}", parent, labels)
        parent = chain


def _lowest(mounts: list[SnapshotMount]) -> Path:
    (m,) = mounts
    lowers = next(o for o in m.options if o.startswith("lowerdir="))
    return Path(lowers.removeprefix("lowerdir=").split(":")[-1])


def test_a_slow_daemon_stop_holds_up_only_its_own_chain(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A file held open in a chain's mount: its daemon, released, exits only once that file
    # closes (a busy container's, a hung FUSE).  Meanwhile another chain starts and stops
    # (a registry lookup and a spawn, a stop: its start waits STOP_WAIT for the slow stop,
    # no longer), and the same chain used again waits for its old daemon to end, then gets
    # a new one.  In-process.
    a = _push(tmp_path, registry, registry.host, "a", [make_tar(BASE), make_tar(TOP_A)])
    o = _push(tmp_path, registry, registry.host, "o", [make_tar(TOP_B)])
    config = Config(registry=RegistryConfig(plain_http=(registry.host,)), fork_server=False)
    root = base_dir / "root"
    monkeypatch.setattr(lazy, "STOP_TIMEOUT", 60.0)  # however loaded, the file closes first
    monkeypatch.setattr(lazy, "STOP_WAIT", 0.2)
    with ExitStack() as stack:
        stack.callback(stop_daemons, root)
        sn = Snapshotter(root, LazyLayers(root, config, None))
        stack.callback(sn.close, unmount=True)
        threads: list[threading.Thread] = []
        stack.callback(lambda: [t.join(60) for t in threads])
        _prepare_in(sn, a)
        _prepare_in(sn, o)
        mnt = _lowest(sn.prepare("ns", "ctr-a", a.chains[1], {}))
        (old_pid, _, _), = [d for d in daemons(root) if d[2] == a.chains[1]]
        again: list[Path] = []
        with open(mnt / "etc/a", "rb") as held:
            threads.append(threading.Thread(target=sn.remove, args=("ns", "ctr-a")))
            threads[0].start()
            while str(mnt) in mounts_under(str(root / "mnt")):  # busy: detached, then waits
                time.sleep(0.02)
            assert threads[0].is_alive() and not wait_pid(old_pid, 0)
            other = _lowest(sn.prepare("ns", "ctr-o", o.chains[0], {}))  # a new daemon
            assert (other / "etc/b").read_bytes() == b"image b\n"
            sn.remove("ns", "ctr-o")  # and its stop
            assert not os.path.exists(other)
            assert threads[0].is_alive(), "the other chain's calls waited for the slow stop"
            threads.append(threading.Thread(target=lambda: again.append(
                _lowest(sn.prepare("ns", "ctr-a2", a.chains[1], {})))))
            threads[1].start()
            threads[1].join(0.5)
            assert threads[1].is_alive() and not again  # the same chain waits
            assert held.read() == b"image a\n"  # the detached daemon still serves its file
        threads[0].join(30)
        threads[1].join(60)
        assert not threads[0].is_alive() and not threads[1].is_alive() and again == [mnt]
        assert wait_pid(old_pid, 0)
        (new_pid, _, _), = [d for d in daemons(root) if d[2] == a.chains[1]]
        assert new_pid != old_pid and not wait_pid(new_pid, 0)
        assert (mnt / "etc/a").read_bytes() == b"image a\n"
        sn.remove("ns", "ctr-a2")
        assert wait_pid(new_pid, 10) and daemons(root) == []


def test_a_start_waits_for_a_daemon_being_stopped(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A daemon writes the chunks it holds in memory to the shared cache as it stops; a
    # daemon of another chain over the same base, started meanwhile, would fetch them again.
    # Here the old daemon's stop lasts as long as a file stays open in its mount: the other
    # chain's daemon starts only once the old one is gone.  In-process.
    a = _push(tmp_path, registry, registry.host, "a", [make_tar(BASE), make_tar(TOP_A)])
    o = _push(tmp_path, registry, registry.host, "o", [make_tar(BASE), make_tar(TOP_B)])
    config = Config(registry=RegistryConfig(plain_http=(registry.host,)), fork_server=False)
    root = base_dir / "root"
    monkeypatch.setattr(lazy, "STOP_TIMEOUT", 60.0)
    monkeypatch.setattr(lazy, "STOP_WAIT", 60.0)
    with ExitStack() as stack:
        stack.callback(stop_daemons, root)
        sn = Snapshotter(root, LazyLayers(root, config, None))
        stack.callback(sn.close, unmount=True)
        threads: list[threading.Thread] = []
        stack.callback(lambda: [t.join(60) for t in threads])
        _prepare_in(sn, a)
        _prepare_in(sn, o)
        mnt = _lowest(sn.prepare("ns", "ctr-a", a.chains[1], {}))
        (old_pid, _, _), = [d for d in daemons(root) if d[2] == a.chains[1]]
        held = stack.enter_context(open(mnt / "etc/a", "rb"))
        threads.append(threading.Thread(target=sn.remove, args=("ns", "ctr-a")))
        threads[0].start()
        while str(mnt) in mounts_under(str(root / "mnt")):  # detached: now it waits for exit
            time.sleep(0.02)
        closer = threading.Timer(3.0, held.close)  # longer than a spawn takes, however loaded
        threads.append(closer)
        closer.start()
        other = _lowest(sn.prepare("ns", "ctr-o", o.chains[1], {}))
        assert wait_pid(old_pid, 0), "the new daemon started while the old one still stopped"
        assert (other / "etc/b").read_bytes() == b"image b\n"
        sn.remove("ns", "ctr-o")


def test_a_registry_lookup_at_a_mount_holds_up_only_its_own_chain(
    registry: RegistryInstance,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The shared base's first image is deleted: mounting the base looks b's tag up, whose
    # answer the proxy holds half-sent.  Meanwhile another chain's container starts and goes.
    root = base_dir / "root"
    with FaultProxy(registry.url, match="/b/app/manifests/v1") as proxy, ExitStack() as stack:
        shared = make_tar(BASE)
        a = _push(tmp_path, registry, proxy.host, "a", [shared, make_tar(TOP_A)])
        b = _push(tmp_path, registry, proxy.host, "b", [shared, make_tar(TOP_B)])
        o = _push(tmp_path, registry, proxy.host, "o", [make_tar([
            Item("etc", "dir", mode=0o755), Item("etc/o", data=b"image o\n")])])
        config = Config(registry=RegistryConfig(plain_http=(proxy.host,)), fork_server=False)
        stack.callback(stop_daemons, root)
        sn = Snapshotter(root, LazyLayers(root, config, None))
        stack.callback(sn.close, unmount=True)
        _prepare_in(sn, a)
        _prepare_in(sn, o)
        with pytest.raises(AlreadyExists):  # b names the base by tag: checked only if need be
            sn.prepare("ns", "x", "", {TARGET_LABEL: b.chains[0], STARGZ_REF: b.ref,
                                       STARGZ_DIGEST: b.layers[0]})  # fmt: skip
        res = httpx.delete(f"http://{registry.host}/v2/a/app/manifests/{a.manifest}")
        assert res.status_code == 202, res.text
        (cached,) = (root / "cache" / "documents").glob(f"*{a.manifest.split(':')[1]}*")
        cached.unlink()
        proxy.hold_next(1, at=1)
        base: list[Path] = []
        lookup = threading.Thread(target=lambda: base.append(
            _lowest(sn.prepare("ns", "ctr-base", a.chains[0], {}))))
        lookup.start()
        stack.callback(lookup.join, 60)
        stack.callback(proxy.unhold)
        assert proxy.holding.wait(30)
        other = _lowest(sn.prepare("ns", "ctr-o", o.chains[0], {}))  # lookup, TOCs, daemon
        assert (other / "etc/o").read_bytes() == b"image o\n"
        sn.remove("ns", "ctr-o")
        assert lookup.is_alive(), "the other chain's calls waited for the lookup"
        proxy.unhold()
        lookup.join(60)
        assert base and sorted(os.listdir(base[0] / "etc")) == ["base", "gone-in-b"]
        assert _daemon_rows(root)[a.chains[0]][2] == f"{proxy.host}/b/app@{b.manifest}"
        sn.remove("ns", "ctr-base")
