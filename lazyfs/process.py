"""Stopping one process by its PID: the only way this project ends what it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaping it when it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        pass  # not our child (e.g. a daemon started by an earlier process): ask /proc
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def wait_pid(pid: int, timeout: float | None) -> bool:
    """Wait for ``pid`` to exit; False if it still runs after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _gone(pid):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop_process(proc: subprocess.Popen[bytes] | int, timeout: float = 5.0) -> None:
    """SIGTERM one process by its PID, SIGKILL it if it lingers past ``timeout``; wait for it."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _gone(proc):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc, sig)
        if wait_pid(proc, timeout):
            return


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (VmRSS in /proc/PID/status); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in kB
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no VmRSS line
