"""The snapshotter end to end: Debian's containerd + runc pull, run and GC plain gzip images
through ``lazyfs-snapshotter`` as a proxy plugin; crashes of the snapshotter in between."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from lazyfs_snapshotter.api import snapshots_pb2
from lazyfs_snapshotter.snapshots import PAUSE_ENV
from lazyfs_snapshotter.testing import Client, SnapshotterProcess

from lazyfs.process import stop_process
from lazyfs.testing.containerd import ContainerdInstance
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.rootfs import host_rootfs_items
from tests.support.fixtures import registry  # noqa: F401 - fixture

SN = "lazyfs"
HELLO = b"hello through the lazyfs snapshotter\n"


@pytest.fixture(scope="module")
def image(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """A runnable two-layer gzip image (host /bin/sh, cat, … + one file) in the registry."""
    base = make_tar(host_rootfs_items())
    top = make_tar([Item("etc", "dir", mode=0o755), Item("etc/hello", data=HELLO)])
    layout = make_layout(tmp_path_factory.mktemp("plain") / "layout", [base, top], kind="gzip")
    ref = f"{registry.host}/plain:v1"
    push_oci_layout(layout, ref)
    return ref


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Unix socket paths are short: a /tmp dir, not pytest's deep tmp_path.
    d = Path(tempfile.mkdtemp(prefix="lzs-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def snapshots(ctrd: ContainerdInstance) -> dict[str, str]:
    """``ctr snapshots ls``: key → kind."""
    out = ctrd.ctr("snapshots", "--snapshotter", SN, "ls", capture=True).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {r[0]: r[-1] for r in rows}


def wait_reconnected(ctrd: ContainerdInstance, timeout: float = 30.0) -> dict[str, str]:
    """``snapshots()`` once containerd has reconnected to a restarted snapshotter.

    containerd's gRPC client retries a lost connection with back-off; until it is back,
    calls fail with "unavailable" (what any proxy snapshotter's restart looks like).
    """
    deadline = time.monotonic() + timeout
    while True:
        # Prepare always reaches the snapshotter (ls may be answered from containerd's own
        # metadata alone).
        res = ctrd.ctr("snapshots", "--snapshotter", SN, "prepare", "reconnect-probe",
                       check=False, capture=True)
        if res.returncode == 0 or time.monotonic() > deadline:
            ctrd.ctr("snapshots", "--snapshotter", SN, "rm", "reconnect-probe", capture=True)
            return snapshots(ctrd)
        assert "unavailable" in res.stderr, res.stderr
        time.sleep(0.2)


def collect_garbage(ctrd: ContainerdInstance) -> None:
    """Run containerd's garbage collection now and wait for it, snapshotter clean-up (our
    Remove calls) included.  Otherwise it runs some time after a deletion, at an interval
    that grows with how long its last collections took (long on a loaded machine)."""
    lease = f"gc-{time.monotonic_ns()}"
    ctrd.ctr("leases", "create", "--id", lease, capture=True)
    ctrd.ctr("leases", "delete", "--sync", lease, capture=True)


def pull(ctrd: ContainerdInstance, ref: str) -> None:
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", SN, ref, capture=True)


def run_cat(ctrd: ContainerdInstance, ref: str, name: str, path: str = "/etc/hello") -> str:
    res = ctrd.ctr("run", "--rm", "--snapshotter", SN, ref, name, "/bin/cat", path,
                   capture=True, timeout=120)
    return res.stdout


def db_rows(root: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(root / "metadata.db") as conn:
        return list(conn.execute("SELECT key, kind, labels FROM snapshots ORDER BY id"))


def snapshot_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "snapshots").iterdir())


def remove_images(ctrd: ContainerdInstance, root: Path, *refs: str) -> None:
    """Remove the images; containerd's GC then Removes their snapshots (waited for, at most
    30 s): none is left, in containerd or in the metadata under ``root``."""
    for ref in refs:
        ctrd.ctr("images", "rm", "--sync", ref, capture=True)
    deadline = time.monotonic() + 30
    while (snapshots(ctrd) or db_rows(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshots(ctrd) == {} and db_rows(root) == []


def test_pull_run_inspect_and_gc_through_containerd(image: str, base_dir: Path) -> None:
    with ExitStack() as stack:
        sp = stack.enter_context(SnapshotterProcess(base_dir / "sn"))
        ctrd = stack.enter_context(
            ContainerdInstance(base_dir / "ctrd", proxy_snapshotters={SN: sp.address})
        )
        pull(ctrd, image)
        snaps = snapshots(ctrd)
        assert sorted(snaps.values()) == ["Committed", "Committed"], snaps
        assert len(db_rows(sp.root)) == 2

        assert run_cat(ctrd, image, "c1") == HELLO.decode()

        top = next(k for k in snaps if k not in _parents(ctrd, snaps))
        info = json.loads(ctrd.ctr("snapshots", "--snapshotter", SN, "info", top,
                                   capture=True).stdout)
        assert info["Kind"] == "Committed" and info["Parent"] in snaps
        usage = ctrd.ctr("snapshots", "--snapshotter", SN, "usage", top, capture=True).stdout
        assert top in usage

        # A container's own active snapshot, made and removed by hand.
        ctrd.ctr("snapshots", "--snapshotter", SN, "prepare", "by-hand", top, capture=True)
        assert snapshots(ctrd)["by-hand"] == "Active"
        mounts = ctrd.ctr("snapshots", "--snapshotter", SN, "mounts", "/mnt", "by-hand",
                          capture=True).stdout
        assert "overlay" in mounts and "upperdir=" in mounts
        ctrd.ctr("snapshots", "--snapshotter", SN, "rm", "by-hand", capture=True)
        assert "by-hand" not in snapshots(ctrd)
        # `ctr snapshots view` (unlike prepare) gives its snapshot no gc.root label and no
        # lease, so containerd's GC removes it at its next collection, and every deletion
        # (c1's, by-hand's) schedules one.  Collect now: with no deletion pending, no
        # collection runs under the view.
        collect_garbage(ctrd)
        assert not any(key.endswith("/by-hand") for key, _, _ in db_rows(sp.root))
        ctrd.ctr("snapshots", "--snapshotter", SN, "view", "a-view", top, capture=True)
        assert snapshots(ctrd)["a-view"] == "View"
        ctrd.ctr("snapshots", "--snapshotter", SN, "rm", "a-view", capture=True)
        # Labels go through Update; containerd keeps most itself and passes on only those
        # under containerd.io/snapshot/.
        label = "containerd.io/snapshot/lazyfs.test"
        ctrd.ctr("snapshots", "--snapshotter", SN, "label", top, f"{label}=yes", capture=True)
        info = json.loads(ctrd.ctr("snapshots", "--snapshotter", SN, "info", top,
                                   capture=True).stdout)
        assert info["Labels"][label] == "yes"
        assert any(label in labels for _, _, labels in db_rows(sp.root))
        rm_parent = ctrd.ctr("snapshots", "--snapshotter", SN, "rm", info["Parent"],
                             check=False, capture=True)
        assert rm_parent.returncode != 0  # it has a child: FAILED_PRECONDITION
        assert "failed precondition" in rm_parent.stderr

        # Image removal: containerd's GC removes the snapshots through Remove, then Cleanup.
        remove_images(ctrd, sp.root, image)
        assert snapshot_dirs(sp.root) == []
        assert "Traceback" not in sp.log_text()


def _parents(ctrd: ContainerdInstance, snaps: dict[str, str]) -> set[str]:
    out = ctrd.ctr("snapshots", "--snapshotter", SN, "ls", capture=True).stdout
    return {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) == 3}


def test_snapshotter_killed_between_steps_and_restarted(image: str, base_dir: Path) -> None:
    """kill -9 after a pull: containerd sees the same snapshots after the restart and runs."""
    with ExitStack() as stack:
        sp = SnapshotterProcess(base_dir / "sn")
        stack.callback(sp.stop)
        sp.start()
        ctrd = stack.enter_context(
            ContainerdInstance(base_dir / "ctrd", proxy_snapshotters={SN: sp.address})
        )
        pull(ctrd, image)
        before = snapshots(ctrd)
        sp.kill()
        sp.start()  # same socket: a stale one is removed
        assert wait_reconnected(ctrd) == before
        assert run_cat(ctrd, image, "after-restart") == HELLO.decode()
        assert snapshots(ctrd) == before  # the container's active snapshot went with --rm


def test_snapshotter_killed_inside_a_commit_during_a_pull(image: str, base_dir: Path) -> None:
    """kill -9 while containerd's unpack is inside our Commit transaction: the pull fails,
    the next one succeeds and runs, and GC leaves nothing behind."""
    with ExitStack() as stack:
        paused = SnapshotterProcess(base_dir / "sn", env={PAUSE_ENV: "commit"})
        plain = SnapshotterProcess(base_dir / "sn")
        stack.callback(paused.stop)
        stack.callback(plain.stop)
        paused.start()
        ctrd = stack.enter_context(
            ContainerdInstance(base_dir / "ctrd", proxy_snapshotters={SN: paused.address})
        )
        pulling = subprocess.Popen(
            ctrd.ctr_argv("images", "pull", "--plain-http", "--snapshotter", SN, image),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        stack.callback(stop_process, pulling)
        marker = paused.root / "paused-commit"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), paused.log_text()
        paused.kill()
        assert pulling.wait(60) != 0
        marker.unlink()

        plain.start()
        wait_reconnected(ctrd)
        pull(ctrd, image)
        assert run_cat(ctrd, image, "after-crash") == HELLO.decode()
        remove_images(ctrd, plain.root, image)
        assert snapshot_dirs(plain.root) == []


@pytest.mark.parametrize("step", ["prepare", "commit", "remove"])
def test_kill_inside_a_transaction_leaves_a_consistent_store(step: str, base_dir: Path) -> None:
    """SIGKILL while a step's transaction is open: afterwards it either happened or not."""
    sp = SnapshotterProcess(base_dir, env={PAUSE_ENV: step})
    plain = SnapshotterProcess(base_dir)
    with ExitStack() as stack:
        stack.callback(sp.stop)
        stack.callback(plain.stop)
        if step != "prepare":
            plain.start()
            c = Client(plain.address)
            c.prepare("a")
            (plain.root / "snapshots" / "1" / "fs" / "f").write_bytes(b"x" * 5000)
            if step == "remove":
                c.commit("A", "a")
            c.close()
            plain.stop()
        sp.start()
        c = Client(sp.address)
        requests: dict[str, Callable[[], object]] = {
            "prepare": lambda: c.prepare("a"),
            "commit": lambda: c.commit("A", "a"),
            "remove": lambda: c.call("Remove", snapshots_pb2.RemoveSnapshotRequest(key="A")),
        }
        t = threading.Thread(target=_swallow, args=(requests[step],), daemon=True)
        t.start()
        marker = sp.root / f"paused-{step}"
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), sp.log_text()
        sp.kill()
        c.close()
        t.join(10)
        marker.unlink()

        plain.start()
        c = Client(plain.address)
        infos = {i.name: i.kind for i in c.list()}
        c.call("Cleanup", snapshots_pb2.CleanupRequest())
        if step == "prepare":
            assert infos == {}
            assert snapshot_dirs(plain.root) == []
            c.prepare("a")  # the key is free, the id reused cleanly
        elif step == "commit":
            assert infos == {"a": 2}  # still active: the commit never happened
            c.commit("A", "a")
            assert c.stat("A").kind == 3
        else:
            assert infos == {"A": 3}  # not removed
            c.call("Remove", snapshots_pb2.RemoveSnapshotRequest(key="A"))
            assert c.list() == []
        c.close()
        assert "Traceback" not in plain.log_text()
        assert all(not n.startswith("new-") for n in os.listdir(plain.root / "snapshots"))


def _swallow(fn: Callable[[], object]) -> None:
    # The daemon is killed under the call: it fails, as containerd's would.
    with contextlib.suppress(grpc.RpcError):
        fn()
