"""Run a real lazyfs mount for a test and always take it down: unmount, then stop by PID."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from lazyfs.errors import LazyfsError
from lazyfs.fs.daemon import Daemon, lazyfs_argv, spawn


class Mount(Daemon):
    """A daemon this process started (``proc`` is always set)."""

    proc: subprocess.Popen[bytes]


def lazyfs_cmd(*args: str) -> list[str]:
    return lazyfs_argv(*args)


def start_mount(
    image: str,
    mountpoint: Path,
    *args: str,
    log: Path | None = None,
    timeout: float = 30.0,
    preexec_fn: Callable[[], None] | None = None,
) -> Mount:
    """Mount and return once the daemon reports ready; a mount that fails raises
    RuntimeError with the daemon's log.  ``preexec_fn`` runs in the daemon before it starts."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"{mountpoint.name}.log"
    try:
        d = spawn(
            image, mountpoint, args, log=log, timeout=timeout, verbose=1, preexec_fn=preexec_fn
        )
    except LazyfsError as e:
        text = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"mount did not come up: {e}\n{text}") from None
    assert d.proc is not None
    m = Mount(d.pid, mountpoint, proc=d.proc, log=log, ready=d.ready)
    return m


@contextlib.contextmanager
def mounted(image: str, mountpoint: Path, *args: str, **kw: Any) -> Iterator[Mount]:
    """A mount for the block; afterwards the daemon must have exited cleanly: one that
    crashed on its way out lost the chunks it held, and no other check would notice."""
    m = start_mount(image, mountpoint, *args, **kw)
    try:
        yield m
    finally:
        m.stop()
    check_exit(m)


def check_exit(m: Mount) -> None:
    """AssertionError (with the log's end) unless the stopped daemon exited with status 0
    or was SIGKILLed (by the test, as a crash would be)."""
    code = m.proc.returncode
    if code not in (0, -signal.SIGKILL):
        raise AssertionError(f"the daemon exited with {code}:\n{m.log_text()[-4000:]}")


@contextlib.contextmanager
def mounted_read_only(image: str, work: Path, *args: str) -> Iterator[Path]:
    """``image`` from a plain-HTTP registry mounted read-only at ``work/mnt``, its chunk
    cache in ``work/c``, with ``args`` besides: yields the mount point."""
    mnt = work / "mnt"
    with mounted(image, mnt, "--plain-http", "--read-only", "--cache", str(work / "c"), *args):
        yield mnt


def run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


def walk_lstat(root: Path) -> int:
    """os.walk + lstat of every entry (what ``find`` or an image scan asks of a mount); the
    number of entries."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


__all__ = ["Mount", "lazyfs_cmd", "mounted", "run", "start_mount", "walk_lstat"]


def mount_stats(mnt: Path) -> dict[str, Any]:
    """``lazyfs stats MNT --json``, parsed."""
    out = run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def wait_prefetched(mnt: Path, timeout: float = 20.0) -> dict[str, Any]:
    """The mount's stats once its prefetch is done; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mnt)
        pf = stats.get("prefetch")
        if pf and pf["prefetch_done"]:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"prefetch did not finish: {stats}")
        time.sleep(0.05)


def wait_settled(mnt: Path, timeout: float = 20.0) -> dict[str, Any]:
    """The mount's stats once its start-up work is over (``settled``: see
    lazyfs.fs.control.StatsReport); AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mnt)
        if stats["settled"]:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the mount's start-up work did not end: {stats}")
        time.sleep(0.05)


def wait_written(mnt: Path, timeout: float = 20.0) -> dict[str, Any]:
    """The mount's stats once no chunk a read fetched waits for its cache write (they are
    written when reads pause: lazyfs.store.layerstore.WRITE_IDLE_SECONDS); AssertionError
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mnt)
        if not any(layer["stats"].get("bytes_unwritten") for layer in stats["layers"]):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"chunks still wait for their cache write: {stats}")
        time.sleep(0.05)


def startup_groups(
    image: str, manifest: str, layer: str, files: Mapping[str, bytes], names: Sequence[str]
) -> bytes:
    """A prefetch groups document (JSON) with one group ranking ``names`` of one layer."""
    from lazyfs.trace.schema import Group, PrefetchGroups, RankedEntry, Tier

    entries = [
        RankedEntry(
            layer=layer,
            path=n,
            digest="sha256:" + hashlib.sha256(files[n]).hexdigest(),
            size=len(files[n]),
        )
        for n in names
    ]
    group = Group(name="startup", runs=1, tiers=[Tier(name="always", entries=entries)])
    doc = PrefetchGroups(image=image, manifest=manifest, layers=[layer], groups=[group])
    return msgspec.json.encode(doc)
