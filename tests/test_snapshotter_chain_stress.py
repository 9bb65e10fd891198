"""The per-chain locks of the snapshotter and LazyLayers under calls arriving in parallel, as
containerd sends them: Prepare, Mounts and Remove of the same chain and of others, the
periodic check and Cleanup, and daemons that die.  Pure lock logic: the daemons are fakes
(no FUSE), everything else (store, locks, LazyLayers, Snapshotter) is the real code."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lazyfs_snapshotter import lazy
from lazyfs_snapshotter.config import Config
from lazyfs_snapshotter.errors import AlreadyExists
from lazyfs_snapshotter.metadata import MetadataStore, RemoteLayerRow
from lazyfs_snapshotter.remote import (
    STARGZ_DIGEST,
    STARGZ_REF,
    TARGET_LABEL,
    Readiness,
    RemoteSource,
)
from lazyfs_snapshotter.snapshots import Snapshotter

from lazyfs.errors import LazyfsError

CHAINS = {"chain-A": "sha256:" + "a" * 64, "chain-B": "sha256:" + "b" * 64}


class _World:
    """The fake daemons, and what must never happen to them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive: dict[str, _FakeDaemon] = {}  # mount point → its running daemon
        self.pids = itertools.count(100_000)
        self.violations: list[str] = []
        self.store: MetadataStore | None = None
        self.started = 0


class _FakeDaemon:
    def __init__(self, world: _World, mnt: Path) -> None:
        self.world, self.mnt = world, str(mnt)
        self.pid = next(world.pids)
        self.running = True
        with world.lock:
            other = world.alive.get(self.mnt)
            if other is not None and other.running:
                world.violations.append(f"two daemons on {self.mnt}")
            world.alive[self.mnt] = self
            world.started += 1

    def alive(self) -> bool:
        return self.running

    def stop(self, timeout: float) -> None:
        store = self.world.store
        assert store is not None
        with store.transaction() as tx:
            users = sum(tx.daemon_users(d.id) for d in tx.daemons() if d.pid == self.pid)
        if users:
            self.world.violations.append(f"pid {self.pid} stopped under {users} users")
        time.sleep(0.002)  # a stop takes a while: widen the window
        self.die()

    def die(self) -> None:
        self.running = False
        with self.world.lock:
            if self.world.alive.get(self.mnt) is self:
                del self.world.alive[self.mnt]


class _Lazy(lazy.LazyLayers):
    """LazyLayers whose every layer is lazy (no registry asked)."""

    def prepare(self, source: RemoteSource, depth: int) -> Readiness:
        d = source.layer_digest
        return Readiness(True, record=RemoteLayerRow("h.io/r/x@" + d, d, depth - 1, "{}"))


def test_parallel_calls_never_stop_a_used_daemon_nor_start_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = _World()

    def spawn(image_ref: str, mnt: Path, args: Any, **kw: Any) -> _FakeDaemon:
        time.sleep(0.002)  # a start takes a while too
        return _FakeDaemon(world, mnt)

    def attach(mountpoint: str, expect_pid: int) -> Any:
        raise LazyfsError("not a real daemon")

    monkeypatch.setattr(lazy, "spawn", spawn)
    monkeypatch.setattr(lazy, "attach", attach)
    monkeypatch.setattr(lazy, "clear_mountpoint", lambda mnt: None)
    layers = _Lazy(tmp_path / "r", Config(fork_server=False), None)
    sn = Snapshotter(tmp_path / "r", layers)
    world.store = sn.store
    for chain, digest in CHAINS.items():
        labels = {TARGET_LABEL: chain, STARGZ_REF: "h.io/r/x:v", STARGZ_DIGEST: digest}
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", f"extract-{chain}", "", labels)
    errors: list[BaseException] = []
    stop = threading.Event()

    def containers(chain: str, worker: int) -> None:
        try:
            for i in range(40):
                key = f"ctr-{chain}-{worker}-{i}"
                (m,) = sn.prepare("ns", key, chain, {})
                mnt = m.options[-1].removeprefix("lowerdir=")
                sn.mounts("ns", key)
                with world.lock:
                    d = world.alive.get(mnt)
                if d is None and not stop.is_set():
                    sn.mounts("ns", key)  # a dead daemon (the killer's) is replaced here
                sn.remove("ns", key)
        except BaseException as e:
            errors.append(e)

    def housekeeping() -> None:
        try:
            for n in itertools.count():
                if stop.is_set():
                    return
                sn.check()
                if n % 5 == 0:
                    sn.cleanup()
                with world.lock:
                    victims = list(world.alive.values())
                if n % 3 == 0 and victims:
                    victims[n % len(victims)].die()  # a daemon crashes
                time.sleep(0.001)
        except BaseException as e:
            errors.append(e)

    workers = [
        threading.Thread(target=containers, args=(chain, w)) for chain in CHAINS for w in range(3)
    ]
    keeper = threading.Thread(target=housekeeping)
    keeper.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    stop.set()
    keeper.join(60)
    assert not errors, errors
    assert world.violations == [], "\n".join(world.violations)
    sn.cleanup()
    with sn.store.transaction() as tx:
        assert [d for d in tx.daemons() if tx.daemon_users(d.id)] == []
    assert world.alive == {}, "a daemon nothing uses is still running"
    assert world.started > len(CHAINS)  # daemons died and were replaced
    assert len(sn.chains) == 0
    sn.close()


def test_the_layers_share_the_snapshotters_chain_locks(tmp_path: Path) -> None:
    """One table of locks for both: the snapshotter holds a chain's from its mount to
    recording the user, LazyLayers holds it to find the daemon unused and stop it.  (An
    empty ChainLocks is falsy: ``chains or own`` kept LazyLayers' own.)"""
    layers = _Lazy(tmp_path / "r", Config(fork_server=False), None)
    sn = Snapshotter(tmp_path / "r", layers)
    assert layers.chains is sn.chains
    sn.close()


def test_a_start_while_the_fork_server_is_replaced_spawns_anyway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check() replaces a dead fork server (``_forks`` None, then the new one) without a
    chain's lock: a start in another thread at that moment spawns, with or without it."""
    world = _World()
    layers = _Lazy(tmp_path / "r", Config(fork_server=False), None)
    got: list[Any] = []

    def spawn(image_ref: str, mnt: Path, args: Any, **kw: Any) -> _FakeDaemon:
        got.append(kw["forkserver"])
        return _FakeDaemon(world, mnt)

    class Replaced:
        """The server check() finds dead: it is dropped just after a start looked at it."""

        socket = tmp_path / "forks.sock"

        def __bool__(self) -> bool:
            layers._forks = None
            return True

    monkeypatch.setattr(lazy, "spawn", spawn)
    monkeypatch.setattr(lazy, "clear_mountpoint", lambda mnt: None)
    sn = Snapshotter(tmp_path / "r", layers)
    world.store = sn.store
    labels = {TARGET_LABEL: "chain-A", STARGZ_REF: "h.io/r/x:v", STARGZ_DIGEST: CHAINS["chain-A"]}
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "extract", "", labels)
    layers._forks = Replaced()  # type: ignore[assignment]
    sn.prepare("ns", "ctr", "chain-A", {})
    assert got == [tmp_path / "forks.sock"]
    sn.close()
