"""Once the store drains (an unmounted daemon, LayerStore.drain), no request starts: what is on
its way lands, but neither the next range of a group from a source that sends one range per
request nor a group that gets its slot only now is sent.  And a daemon stopped by a signal
takes its mount down before it drains, so the mount's requests fail at once, not after it."""

# ruff: noqa: F811
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import trio
from lazyfs_tools.convert import convert

from lazyfs.errors import RemoteError
from lazyfs.formats.toc import Entry
from lazyfs.fs.unmount import unmount
from lazyfs.ocilayout import Layout
from lazyfs.opener import open_image
from lazyfs.remote.registry import RegistrySource
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import Mount, mounted, start_mount, startup_groups
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

# 24 incompressible files of 100 kB (two 64 KiB chunks each), laid out by path.
FILES = {f"app/f{i:02d}": seeded_bytes(100_000, 870 + i) for i in range(24)}
REPO = "drainreq/app"


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("drainreq")
    items = [Item("app", "dir", mode=0o755)] + [Item(n, data=b) for n, b in FILES.items()]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/{REPO}:v1", tag="v1")
    return {"dir": d}


def _blob_requests(proxy: FaultProxy, digest: str) -> int:
    return sum(p.endswith(digest) for p in proxy.paths)


async def _wait_for(what: object, timeout: float = 10.0) -> None:
    deadline = trio.current_time() + timeout
    while not what():  # type: ignore[operator]
        assert trio.current_time() < deadline
        await trio.sleep(0.01)


async def _drain_while_held(
    proxy: FaultProxy, tmp: Path, prefetches: list[list[str]], held: int
) -> int:
    """Prefetch each list of names at once, hold the first ``held`` requests half-way, drain,
    let them go; the layer's requests in all."""
    async with open_image(f"{proxy.host}/{REPO}:v1", cache_dir=tmp, plain_http=True) as img:
        src = img.source.inner  # type: ignore[attr-defined]  # CachingSource over the registry
        assert isinstance(src, RegistrySource)
        store, layer = img.store, img.layers[0].layer
        byname = layer.toc.by_name()
        todo: list[list[Entry]] = [[byname[n] for n in names] for names in prefetches]
        proxy.match = layer.blob_digest
        proxy.hold_next(held, at=10_000)
        toc = _blob_requests(proxy, layer.blob_digest)  # the TOC's
        async with trio.open_nursery() as nursery:
            for entries in todo:
                nursery.start_soon(store.prefetch, layer, entries)
            await _wait_for(lambda: _blob_requests(proxy, layer.blob_digest) == toc + held)
            await trio.sleep(0.2)  # the others queued for a slot, if any
            nursery.start_soon(store.drain, 10.0)
            await trio.sleep(0.1)
            proxy.unhold()
        return _blob_requests(proxy, layer.blob_digest) - toc


def test_no_next_range_is_asked_for_once_draining(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """One prefetch of scattered files is one request of several ranges; a host that answers
    only the first gets the others one at a time, each a request of its own: none of those
    once the store drains.  (Before: one per range left, 7 in all.)"""
    fault_proxy.multirange = "first"
    scattered = list(FILES)[::3]
    got = trio.run(_drain_while_held, fault_proxy, tmp_path, [scattered], 1)
    assert got == 1, fault_proxy.ranges


def test_a_group_that_gets_its_slot_while_draining_is_not_sent(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Seven prefetches of one file each: six take the prefetch share of the slots, the
    seventh waits, and its slot comes only after the drain began: it is not sent."""
    names = list(FILES)[::3][:7]
    got = trio.run(_drain_while_held, fault_proxy, tmp_path, [[n] for n in names], 6)
    assert got == 6, fault_proxy.ranges


async def _read_after_drain(proxy: FaultProxy, tmp: Path) -> BaseException | None:
    async with open_image(f"{proxy.host}/{REPO}:v1", cache_dir=tmp, plain_http=True) as img:
        store, layer = img.store, img.layers[0].layer
        await store.drain(1.0)  # nothing on its way: at once
        try:
            await store.read(layer, layer.toc.by_name()["app/f05"], 0, 100)
        except RemoteError as e:
            return e
        return None


def test_a_miss_while_draining_fails(pushed: dict, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A read that misses once nothing may be sent fails (EIO to a reader).  (Before: it went
    round for ever without a checkpoint, and the whole daemon with it.)"""
    got: list[BaseException | None] = []
    t = threading.Thread(
        target=lambda: got.append(trio.run(_read_after_drain, fault_proxy, tmp_path)),
        daemon=True,  # before the fix it never ends
    )
    t.start()
    t.join(20)
    assert got and isinstance(got[0], RemoteError), got


def _mount_with_its_prefetch_held(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path, mnt: Path
) -> Mount:
    """A mount at ``mnt`` (its TOC cached by a mount before) whose groups' prefetch, the
    layer's only request, the proxy holds: its drain then waits its full bound."""
    layout = Layout(pushed["dir"] / "lazy")
    layer = layout.manifest("v1").layers[0].digest
    groups = tmp_path / "groups.json"
    groups.write_bytes(
        startup_groups(REPO, layout.find("v1").digest, layer, FILES, list(FILES)[:3])
    )
    ref = f"{fault_proxy.host}/{REPO}:v1"
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(ref, mnt, *args, "--no-prefetch"):
        pass
    fault_proxy.reset()
    fault_proxy.match = layer
    fault_proxy.hold_next(1, at=10_000)
    return start_mount(ref, mnt, *args, "--prefetch", str(groups))


def test_a_signalled_daemon_takes_its_mount_down_before_it_drains(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """SIGTERM while the prefetch's answer is held (the drain then waits its full bound): a
    program with a directory of the mount open fails at once (ENOTCONN), not once the drain is
    over (before: 0.8 s, then ECONNABORTED)."""
    mnt = tmp_path / "mnt"
    m = _mount_with_its_prefetch_held(pushed, fault_proxy, tmp_path, mnt)
    fd = -1
    try:
        assert fault_proxy.holding.wait(10), fault_proxy.paths
        fd = os.open(mnt / "app", os.O_RDONLY | os.O_DIRECTORY)
        os.kill(m.pid, signal.SIGTERM)
        time.sleep(0.2)  # the daemon is draining now (the held answer keeps it there)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.stat("f20", dir_fd=fd)  # not looked up before: a request to the daemon
        took = time.monotonic() - t0
        assert took < 0.3, (took, e.value)
        assert e.value.errno == errno.ENOTCONN, e.value
    finally:
        if fd >= 0:
            os.close(fd)
        fault_proxy.unhold()
        m.stop()


def test_a_signal_while_an_unmounted_daemon_drains_is_harmless(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Unmounted from outside while the prefetch's answer is held, the daemon closes its FUSE
    session and drains; a SIGTERM then (a service manager's stop) must not ask the closed
    session to end (pyfuse3.terminate on it: a NULL session, SIGSEGV, the held chunks lost).
    The drain ends within its bound and the daemon exits cleanly."""
    mnt = tmp_path / "mnt"
    m = _mount_with_its_prefetch_held(pushed, fault_proxy, tmp_path, mnt)
    try:
        assert fault_proxy.holding.wait(10), fault_proxy.paths
        unmount(os.fspath(mnt))
        time.sleep(0.3)  # the daemon has closed its session and drains (the answer is held)
        assert m.proc.poll() is None, m.log_text()[-2000:]
        os.kill(m.pid, signal.SIGTERM)
        assert m.proc.wait(10) == 0, (m.proc.returncode, m.log_text()[-2000:])
    finally:
        fault_proxy.unhold()
        m.stop()


async def _overtake_while_draining(proxy: FaultProxy, tmp: Path) -> bytes:
    """Prefetch every file in one stream held half-way, drain, then read the last file: its
    chunk is far down the stream, so the reader asks for it alone (overtakes), which the drain
    refuses.  The read's bytes once the stream is let go."""
    async with open_image(f"{proxy.host}/{REPO}:v1", cache_dir=tmp, plain_http=True) as img:
        store, layer = img.store, img.layers[0].layer
        byname = layer.toc.by_name()
        proxy.match = layer.blob_digest
        proxy.hold_next(10, at=10_000)
        last = byname["app/f23"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.prefetch, layer, [byname[n] for n in FILES])
            await _wait_for(proxy.holding.is_set)
            nursery.start_soon(store.drain, 10.0)
            await trio.sleep(0.1)
            with trio.fail_after(10):
                async with trio.open_nursery() as inner:
                    inner.start_soon(_unhold_after, proxy, 0.3)
                    got = await store.read(layer, last, 0, last.size)
        return got


async def _unhold_after(proxy: FaultProxy, delay: float) -> None:
    await trio.sleep(delay)
    proxy.unhold()


def test_a_reader_that_would_overtake_while_draining_waits_for_the_stream(
    pushed: dict, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A reader whose chunk is far down a stream on its way asks for it alone (_overtake); once
    the store drains that request is not sent, quietly, and the reader gets its bytes from the
    stream.  (Before: the drain's refusal, an internal exception, escaped the read.)"""
    assert trio.run(_overtake_while_draining, fault_proxy, tmp_path) == FILES["app/f23"]
