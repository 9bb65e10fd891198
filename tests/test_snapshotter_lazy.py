"""Lazy layers through containerd: ``ctr-remote image rpull`` fetches only footers and TOCs,
containers run on one shared lazyfs mount per chain of lazy layers, survive a ``kill -9`` of
the snapshotter, and a daemon that dies is replaced for new containers.  CRI's labels go
through the gRPC API directly (the test containerd runs without the CRI plugin)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from lazyfs_snapshotter.api import snapshots_pb2
from lazyfs_snapshotter.remote import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    REMOTE_LABEL,
    STARGZ_DIGEST,
    STARGZ_REF,
    TARGET_LABEL,
)
from lazyfs_snapshotter.testing import Client, SnapshotterProcess

from lazyfs.fs.daemon import Daemon
from lazyfs.fs.unmount import is_mounted
from lazyfs.ocilayout import Layout
from lazyfs.process import rss_bytes, wait_pid
from lazyfs.testing.containerd import ContainerdInstance
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.rootfs import PROGRAMS, host_rootfs_items
from lazyfs.testing.tokenserver import TokenServer
from tests.support.fixtures import TOKEN_USER, registry  # noqa: F401 - fixture
from tests.test_snapshotter_containerd import (
    collect_garbage,
    db_rows,
    remove_images,
    snapshots,
    wait_reconnected,
)

SN = "lazyfs"
HELLO = b"hello from a lazy layer\n"
LATE = seeded_bytes(300_000, 7)  # read for the first time after the snapshotter restarts


@dataclass
class Env:
    proxy: FaultProxy  # in front of the registry: counts the blob bytes that cross it
    hosts: Path  # a containerd hosts dir: the proxy is plain HTTP
    lazy: str  # zstd:chunked image, through the proxy
    mirror: str  # the same image in another repository
    plain: str  # the same image with gzip layers
    manifest: str  # the lazy image's manifest digest
    layers: list[str]  # its layer digests
    layer_bytes: int  # the size of its layer blobs
    plain_layers: list[str]


@pytest.fixture(scope="module")
def env(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
        ) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("lazy-images")
    base = make_tar(host_rootfs_items((*PROGRAMS, "/bin/sleep")))
    top = make_tar([
        Item("etc", "dir", mode=0o755), Item("etc/hello", data=HELLO),
        Item("data", "dir", mode=0o755), Item("data/late.bin", data=LATE),
    ])
    make_lazy_layout(d / "lazy", [base, top])
    push_oci_layout(d / "lazy", f"{registry.host}/lazy/app:v1", tag="v1")
    push_oci_layout(d / "lazy", f"{registry.host}/mirror/app:v1", tag="v1")
    # Other layers than the lazy image's: a conversion keeps diff_ids, so the same layers in
    # gzip would find their chain already there and never reach Prepare.
    make_layout(d / "gzip", [make_tar(host_rootfs_items()), top], tag="v1")
    push_oci_layout(d / "gzip", f"{registry.host}/plain/app:v1", tag="v1")
    lazy, plain = Layout(d / "lazy"), Layout(d / "gzip")
    manifest = lazy.find("v1").digest
    layers = lazy.manifest("v1").layers
    with FaultProxy(registry.url) as proxy:
        hosts = d / "hosts"
        (hosts / proxy.host).mkdir(parents=True)
        (hosts / proxy.host / "hosts.toml").write_text(f'server = "http://{proxy.host}"\n')
        yield Env(
            proxy, hosts, f"{proxy.host}/lazy/app:v1", f"{proxy.host}/mirror/app:v1",
            f"{proxy.host}/plain/app:v1", manifest,
            [layer.digest for layer in layers], sum(layer.size for layer in layers),
            [layer.digest for layer in plain.manifest("v1").layers],
        )


@pytest.fixture
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lzl-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def daemons(root: Path) -> list[tuple[int, str, str]]:
    """The ``daemons`` table: (pid, mountpoint, chain id)."""
    with sqlite3.connect(root / "metadata.db") as conn:
        return list(conn.execute("SELECT pid, mountpoint, chain_id FROM daemons ORDER BY id"))


def stop_daemons(root: Path) -> None:
    """After a test: whatever chain daemon is still recorded is stopped by its PID."""
    if not (root / "metadata.db").exists():
        return
    for pid, mnt, _ in daemons(root):
        if pid:
            Daemon(pid, mnt).stop()
        elif is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)


def fork_server_pid(log_text: str) -> int:
    """The PID of the snapshotter's fork server, from its log (the last one it started)."""
    found = re.findall(r"fork server pid (\d+)", log_text)
    assert found, "the snapshotter started no fork server"
    return int(found[-1])


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def lazy_mounts(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if f" {root}/mnt/" in line]


def start(stack: ExitStack, base: Path, env: Env) -> tuple[SnapshotterProcess, ContainerdInstance]:
    sp = SnapshotterProcess(base / "sn", args=("--hosts-dir", str(env.hosts)))
    stack.callback(stop_daemons, sp.root)
    stack.callback(sp.stop)
    sp.start()
    ctrd = stack.enter_context(
        ContainerdInstance(base / "ctrd", proxy_snapshotters={SN: sp.address}))
    return sp, ctrd


def rpull(ctrd: ContainerdInstance, ref: str) -> None:
    ctrd.ctr("images", "rpull", "--plain-http", "--snapshotter", SN, ref, binary="ctr-remote",
             capture=True, timeout=120)


def run(ctrd: ContainerdInstance, ref: str, name: str, *cmd: str) -> str:
    return ctrd.ctr("run", "--rm", "--snapshotter", SN, ref, name, *cmd, capture=True,
                    timeout=120).stdout


def remove_container(ctrd: ContainerdInstance, name: str) -> None:
    ctrd.ctr("task", "kill", "-s", "SIGKILL", name, check=False, capture=True)
    # A task still stopping refuses its removal: what the list says ends the wait, not that
    # (under load, the container and its snapshot were left behind).
    for _ in range(100):
        ctrd.ctr("task", "rm", name, check=False, capture=True)
        listed = ctrd.ctr("task", "ls", "-q", check=False, capture=True).stdout.split()
        if name not in listed:
            break
        time.sleep(0.1)
    ctrd.ctr("containers", "rm", name, check=False, capture=True)


def test_rpull_fetches_only_tocs_runs_and_gc_cleans(env: Env, base_dir: Path) -> None:
    with ExitStack() as stack:
        sp, ctrd = start(stack, base_dir, env)
        env.proxy.reset()
        rpull(ctrd, env.lazy)
        fetched = env.proxy.blob_bytes
        # Footers and TOCs (and the small config blob): a few percent of the layers.
        assert 0 < fetched < env.layer_bytes // 10, (fetched, env.layer_bytes)
        snaps = snapshots(ctrd)
        assert sorted(snaps.values()) == ["Committed", "Committed"], snaps
        rows = db_rows(sp.root)
        assert all(REMOTE_LABEL in json.loads(labels) for _, _, labels in rows)
        assert daemons(sp.root) == []  # no container yet, no mount

        assert run(ctrd, env.lazy, "c1", "/bin/cat", "/etc/hello") == HELLO.decode()
        out = run(ctrd, env.lazy, "c2", "/usr/bin/sha256sum", "/data/late.bin")
        assert out.split()[0] == hashlib.sha256(LATE).hexdigest()
        # containerd removes a deleted container's snapshot in its GC, not in the delete.
        collect_garbage(ctrd)
        assert daemons(sp.root) == [] and lazy_mounts(sp.root) == []  # last user gone

        top = next(k for k in snaps if k.endswith(_chain_top(ctrd, snaps)))
        info = json.loads(ctrd.ctr("snapshots", "--snapshotter", SN, "info", top,
                                   capture=True).stdout)
        assert info["Kind"] == "Committed" and info["Labels"][REMOTE_LABEL] == SN
        assert top in ctrd.ctr("snapshots", "--snapshotter", SN, "usage", top,
                               capture=True).stdout
        ctrd.ctr("snapshots", "--snapshotter", SN, "prepare", "by-hand", top, capture=True)
        mounts = ctrd.ctr("snapshots", "--snapshotter", SN, "mounts", "/x", "by-hand",
                          capture=True).stdout
        ((pid, mnt, _),) = daemons(sp.root)
        assert f"lowerdir={mnt}" in mounts and lazy_mounts(sp.root) == [mnt]
        with open("/proc/self/mountinfo") as f:  # host users get no set-id bits or devices
            (line,) = [line for line in f if f" {mnt} " in line]
        assert {"ro", "nosuid", "nodev"} <= set(line.split()[5].split(","))
        assert oct(os.stat(sp.root).st_mode & 0o777) == "0o700"
        ctrd.ctr("snapshots", "--snapshotter", SN, "rm", "by-hand", capture=True)
        collect_garbage(ctrd)
        assert daemons(sp.root) == [] and wait_pid(pid, 10) and lazy_mounts(sp.root) == []

        # A gzip image through the same labels: pulled normally, the reason logged.
        rpull(ctrd, env.plain)
        assert run(ctrd, env.plain, "c3", "/bin/cat", "/etc/hello") == HELLO.decode()
        log = sp.log_text()
        assert "pulling normally" in log and "is not lazy" in log, "\n".join(
            line for line in log.splitlines() if "prepare" in line)

        remove_images(ctrd, sp.root, env.lazy, env.plain)
        assert daemons(sp.root) == [] and lazy_mounts(sp.root) == []
        assert list((sp.root / "mnt").iterdir()) == []
        assert "Traceback" not in sp.log_text()


def _chain_top(ctrd: ContainerdInstance, snaps: dict[str, str]) -> str:
    """The key of the snapshot no other one has as parent."""
    out = ctrd.ctr("snapshots", "--snapshotter", SN, "ls", capture=True).stdout
    parents = {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) == 3}
    (top,) = [k for k in snaps if k not in parents]
    return top


def test_container_survives_kill_9_of_the_snapshotter_and_dead_daemons_are_replaced(
    env: Env, base_dir: Path
) -> None:
    with ExitStack() as stack:
        sp, ctrd = start(stack, base_dir, env)
        rpull(ctrd, env.lazy)
        stack.callback(remove_container, ctrd, "long")
        ctrd.ctr("run", "-d", "--snapshotter", SN, env.lazy, "long", "/bin/sleep", "600",
                 capture=True, timeout=120)
        ((pid, mnt, _),) = daemons(sp.root)
        forks = fork_server_pid(sp.log_text())
        assert parent_pid(pid) == forks  # forked by the snapshotter's fork server

        sp.kill()
        assert wait_pid(forks, 10)  # the fork server goes with the snapshotter
        assert not wait_pid(pid, 0.5)  # the FUSE daemon lives on without either
        sp.start()
        wait_reconnected(ctrd)
        assert f"re-attached daemon pid {pid}" in sp.log_text()
        res = ctrd.ctr("task", "exec", "--exec-id", "late", "long", "/usr/bin/sha256sum",
                       "/data/late.bin", capture=True, timeout=60)
        assert res.stdout.split()[0] == hashlib.sha256(LATE).hexdigest()
        # The one daemon every container of the chain shares: memory that does not grow
        # with containers (measured 37 MiB here, forked from the fork server).
        assert (rss_bytes(pid) or 0) < 80 << 20
        mounts = ctrd.ctr("snapshots", "--snapshotter", SN, "mounts", "/x", "long",
                          capture=True).stdout
        assert f"lowerdir={mnt}" in mounts
        assert daemons(sp.root) == [(pid, mnt, daemons(sp.root)[0][2])]

        # The daemon dies: the running container gets errors, new containers a new daemon.
        os.kill(pid, signal.SIGKILL)
        assert wait_pid(pid, 10)
        res = ctrd.ctr("task", "exec", "--exec-id", "dead", "long", "/bin/cat", "/etc/hello",
                       check=False, capture=True, timeout=60)
        assert res.returncode != 0 and "transport endpoint is not connected" in res.stderr
        assert run(ctrd, env.lazy, "fresh", "/bin/cat", "/etc/hello") == HELLO.decode()
        ((new_pid, new_mnt, _),) = daemons(sp.root)
        assert new_pid not in (0, pid) and new_mnt == mnt
        assert "died" in sp.log_text()

        remove_container(ctrd, "long")
        collect_garbage(ctrd)
        assert daemons(sp.root) == [] and wait_pid(new_pid, 10) and lazy_mounts(sp.root) == []
        assert "Traceback" not in sp.log_text()


def test_layers_held_already_are_prepared_without_the_registry(
    env: Env, registry: RegistryInstance, base_dir: Path  # noqa: F811
) -> None:
    # The snapshotter reaches the registry through a proxy of its own (containerd through
    # env.proxy): what it asks is counted apart from containerd's pull.
    with ExitStack() as stack:
        mine = stack.enter_context(FaultProxy(registry.url))
        hosts = base_dir / "hosts"
        (hosts / env.proxy.host).mkdir(parents=True)
        (hosts / env.proxy.host / "hosts.toml").write_text(f'server = "http://{mine.host}"\n')
        sp = SnapshotterProcess(base_dir / "sn", args=("--hosts-dir", str(hosts)))
        stack.callback(stop_daemons, sp.root)
        stack.callback(sp.stop)
        sp.start()
        ctrd = stack.enter_context(
            ContainerdInstance(base_dir / "ctrd", proxy_snapshotters={SN: sp.address}))
        rpull(ctrd, env.lazy)
        assert mine.requests > 0  # the TOCs came through it
        mine.reset()
        # The same layers under another name, in another namespace: containerd asks for
        # every layer again, and each is found held: no manifest, no tag, no TOC is asked for.
        ctrd.namespace = f"{ctrd.namespace}-other"
        rpull(ctrd, env.mirror)
        assert mine.requests == 0, mine.paths
        # containerd did ask about both layers: each snapshot keeps the mirror, to be looked
        # up only if its chain cannot be mounted from the first image.
        with sqlite3.connect(sp.root / "metadata.db") as conn:
            pending = conn.execute("SELECT image_ref FROM pending_refs").fetchall()
        assert pending == [(env.mirror,)] * 2
        assert "Traceback" not in sp.log_text()


def test_cri_labels_through_the_grpc_api(env: Env, base_dir: Path) -> None:
    """What containerd's CRI plugin sends with ``disable_snapshot_annotations = false``."""
    with ExitStack() as stack:
        sp = SnapshotterProcess(base_dir / "sn", args=("--hosts-dir", str(env.hosts)))
        stack.callback(stop_daemons, sp.root)
        stack.enter_context(sp)
        c = Client(sp.address, namespace="k8s.io")
        stack.callback(c.close)
        parent = prepare_layers(c, env.lazy, env.manifest, env.layers)
        target = mount_container(stack, c, "container", parent, base_dir / "rootfs")
        assert (target / "etc/hello").read_bytes() == HELLO
        (target / "etc/hello").write_bytes(b"changed\n")  # writes go to the container's upper
        assert (target / "data/late.bin").read_bytes() == LATE
        subprocess.run(["umount", str(target)], check=True)
        ((pid, _, chain),) = daemons(sp.root)
        assert chain == parent
        c.call("Remove", snapshots_pb2.RemoveSnapshotRequest(key="container"))
        assert wait_pid(pid, 10) and daemons(sp.root) == []

        # A gzip layer with the same labels: a normal pull (mounts to unpack into), logged.
        labels = {TARGET_LABEL: "plain-0", CRI_IMAGE_REF: env.plain,
                  CRI_LAYER_DIGEST: env.plain_layers[0]}
        assert c.prepare("extract-plain", "", labels).mounts[0].type == "bind"
        assert "pulling normally" in sp.log_text()
        assert "Traceback" not in sp.log_text()


def prepare_layers(c: Client, ref: str, manifest: str, layers: list[str],
                   chains: list[str] | None = None, stargz: bool = False) -> str:
    """Prepare each layer as containerd's unpacker does, with CRI's labels or stargz's, as
    ``chains`` (containerd's chain IDs; chain-I by default); every one is answered
    ALREADY_EXISTS (committed as remote now, or before by another image).  The top key."""
    keys = chains or [f"chain-{i}" for i in range(len(layers))]
    parent = ""
    for i, (digest, chain) in enumerate(zip(layers, keys, strict=True)):
        labels = ({TARGET_LABEL: chain, STARGZ_REF: ref, STARGZ_DIGEST: digest} if stargz
                  else {TARGET_LABEL: chain, CRI_IMAGE_REF: ref, CRI_LAYER_DIGEST: digest,
                        CRI_IMAGE_LAYERS: ",".join(layers[i:]), CRI_MANIFEST_DIGEST: manifest})
        with pytest.raises(grpc.RpcError) as err:
            c.prepare(f"extract-{ref}-{i}", parent, labels)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        parent = chain
    return parent


def mount_container(stack: ExitStack, c: Client, key: str, parent: str, target: Path) -> Path:
    """A container's rootfs as containerd would mount it; unmounted before the daemons
    stop (an overlay over a FUSE mount would keep its daemon from exiting)."""
    (m,) = c.prepare(key, parent).mounts
    target.mkdir()
    subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)],
                   check=True)
    stack.callback(subprocess.run, ["umount", "-l", str(target)], check=False)
    return target


def test_sigterm_leaves_daemons_and_unmount_on_exit_stops_them(env: Env, base_dir: Path
                                                                ) -> None:
    with ExitStack() as stack:
        sp = SnapshotterProcess(base_dir / "sn", args=("--hosts-dir", str(env.hosts)))
        stack.callback(stop_daemons, sp.root)
        stack.callback(sp.stop)
        sp.start()
        c = Client(sp.address, namespace="k8s.io")
        stack.callback(c.close)
        top = prepare_layers(c, env.lazy, env.manifest, env.layers)
        c.prepare("container", top)
        ((pid, mnt, _),) = daemons(sp.root)
        # The log (both runs share it) goes with each failure: this test failed once under
        # load, in a way not seen again in 27 loaded runs.
        assert sp.stop() == 0, sp.log_text()[-4000:]  # SIGTERM: the mount stays for containers
        assert not wait_pid(pid, 0.5) and is_mounted(mnt)
        restarted = SnapshotterProcess(base_dir / "sn", args=(
            "--hosts-dir", str(env.hosts), "--unmount-on-exit"))
        stack.callback(restarted.stop)
        restarted.start()
        assert f"re-attached daemon pid {pid}" in restarted.log_text(), restarted.log_text()[-4000:]
        assert restarted.stop() == 0, restarted.log_text()[-4000:]
        assert wait_pid(pid, 10) and lazy_mounts(sp.root) == [], restarted.log_text()[-4000:]
        assert "Traceback" not in restarted.log_text(), restarted.log_text()[-4000:]


def test_credentials_from_docker_config_and_expiring_tokens(
    tmp_path_factory: pytest.TempPathFactory, base_dir: Path
) -> None:
    """A registry behind a token service: the snapshotter and its daemons log in with
    config.json's credentials, and a token that expires while a container runs is renewed."""
    work = tmp_path_factory.mktemp("auth")
    with ExitStack() as stack:
        tokens = stack.enter_context(TokenServer(work / "tokens", credentials=TOKEN_USER,
                                                 expires_in=7))
        reg = stack.enter_context(RegistryInstance(work / "registry",
                                                   token=tokens.registry_auth))
        make_lazy_layout(work / "lazy", [make_tar(host_rootfs_items()), make_tar([
            Item("etc", "dir", mode=0o755), Item("etc/hello", data=HELLO),
            Item("data", "dir", mode=0o755), Item("data/late.bin", data=LATE)])])
        push_oci_layout(work / "lazy", f"{reg.host}/auth/app:v1", tag="v1", creds=TOKEN_USER)
        lazy = Layout(work / "lazy")
        auth = base64.b64encode(":".join(TOKEN_USER).encode()).decode()
        (work / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        (work / "sn.toml").write_text(
            f'[registry]\nplain_http = ["{reg.host}"]\ndocker_config = "{work / "config.json"}"\n')
        sp = SnapshotterProcess(base_dir / "sn", args=("--config", str(work / "sn.toml")))
        stack.callback(stop_daemons, sp.root)
        stack.enter_context(sp)
        c = Client(sp.address, namespace="k8s.io")
        stack.callback(c.close)
        top = prepare_layers(c, f"{reg.host}/auth/app:v1", lazy.find("v1").digest,
                             [layer.digest for layer in lazy.manifest("v1").layers])
        target = mount_container(stack, c, "container", top, base_dir / "rootfs")
        assert (target / "etc/hello").read_bytes() == HELLO
        issued = len(tokens.requests)
        # A 7 s token is renewed 1.75 s (a quarter of its life) before it expires.
        time.sleep(6)
        # The base layer: nothing of it was fetched yet (the top layer's read-ahead took
        # late.bin with hello).
        assert (target / "bin/sh").read_bytes() == Path("/bin/sh").read_bytes()
        assert len(tokens.requests) > issued and all(basic for _, basic in tokens.requests)
