"""Run a real lazyfs mount for a test and always take it down: unmount, then stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lazyfs.fs.serve import is_mounted, is_stale, unmount


class Mount:
    def __init__(self, proc: subprocess.Popen[bytes], mountpoint: Path, log: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """Unmount and wait for the daemon; kill it by PID if it does not go."""
        if self.proc.poll() is None and is_mounted(str(self.mountpoint)):
            with contextlib.suppress(Exception):
                unmount(str(self.mountpoint))
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            abort_connection(self.mountpoint)  # a hung daemon: cut only its own connection
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_stale(str(self.mountpoint)) or is_mounted(str(self.mountpoint)):
            unmount(str(self.mountpoint), lazy=True)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), leaving a stale mount behind."""
        self.proc.kill()
        self.proc.wait()


def abort_connection(mountpoint: Path) -> None:
    """Abort the FUSE connection behind ``mountpoint`` (found by its device number)."""
    real = str(mountpoint)  # not realpath(): a stat of a hung mount would hang too
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == real:
                minor = fields[2].split(":")[1]
                with contextlib.suppress(OSError):
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


def lazyfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs.cli", *args]


def start_mount(
    image: str, mountpoint: Path, *args: str, log: Path | None = None, timeout: float = 30.0
) -> Mount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            lazyfs_cmd("-v", "mount", image, str(mountpoint), "--foreground", *args),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    m = Mount(proc, mountpoint, log)
    deadline = time.monotonic() + timeout
    while not is_mounted(str(mountpoint)):
        if proc.poll() is not None or time.monotonic() > deadline:
            m.stop()
            raise RuntimeError(f"mount did not come up:\n{m.log_text()}")
        time.sleep(0.02)
    return m


@contextlib.contextmanager
def mounted(image: str, mountpoint: Path, *args: str, **kw: object) -> Iterator[Mount]:
    m = start_mount(image, mountpoint, *args, **kw)  # type: ignore[arg-type]
    try:
        yield m
    finally:
        m.stop()


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)  # type: ignore[call-overload]


__all__ = ["Mount", "lazyfs_cmd", "mounted", "os", "run", "start_mount"]
