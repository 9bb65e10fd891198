"""The lifecycle of a mount daemon, seen from outside it: spawn, ready, attach, ask, stop.

Every caller that runs ``lazyfs mount`` as a process goes through here: the CLI (``mount``,
``umount``, ``trace run``), the tests, the benchmarks and the snapshotter.  A :class:`Daemon`
needs only a PID and a mount point, so a process that restarts (the snapshotter) can
:func:`attach` to daemons it started earlier, ask them for ``info``/``stats`` and stop them,
without the ``Popen`` it once had.  No pyfuse3 here: this side never serves FUSE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from lazyfs.errors import LazyfsError
from lazyfs.fs.control import ReadyReport, control_request
from lazyfs.fs.forkserver import LOST, ForkServerError, request_fork
from lazyfs.fs.runtime import control_path
from lazyfs.fs.unmount import abort_connection, is_mounted, is_stale, mount_device, unmount
from lazyfs.process import stop_process, wait_pid
from lazyfs.store.wholelayer import WholeFetch

StrPath = str | os.PathLike[str]
logger = logging.getLogger(__name__)


def lazyfs_argv(*args: str) -> list[str]:
    """The command line running this lazyfs (the installed one, whatever the PATH says)."""
    return [sys.executable, "-m", "lazyfs.cli", *args]


class Daemon:
    """A mount daemon by PID and mount point; ``proc`` only when this process started it."""

    def __init__(
        self,
        pid: int,
        mountpoint: StrPath,
        *,
        proc: subprocess.Popen[bytes] | None = None,
        log: Path | None = None,
        ready: ReadyReport | None = None,
    ) -> None:
        self.pid = pid
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.proc = proc
        self.log = log
        self.ready = ready or ReadyReport()  # what it said when ready (spawned ones only)
        # A spawned daemon's connection, taken while its mount is surely the one on top: at
        # stop, another mount may sit at the path (stacked, or one mounted once ours left).
        self.device: tuple[int, int] | None = None
        if ready is not None:
            with contextlib.suppress(OSError, ValueError):
                self.device = mount_device(os.fspath(self.mountpoint))

    def __repr__(self) -> str:
        return f"<Daemon pid {self.pid} on {self.mountpoint}>"

    @property
    def control(self) -> Path:
        return control_path(self.mountpoint)

    def request(self, request: dict[str, object], *, timeout: float = 10.0) -> Any:
        """One control request; raises LazyfsError with the daemon's message, or when no
        answer comes within ``timeout`` seconds."""
        return control_request(os.fspath(self.mountpoint), request, timeout=timeout)

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request({"cmd": "info"})
        return result

    def stats(self, *, timeout: float = 10.0) -> dict[str, Any]:
        result: dict[str, Any] = self.request({"cmd": "stats"}, timeout=timeout)
        return result

    def trace(self, *, summary: bool = False) -> Any:
        return self.request({"cmd": "trace", "summary": summary})

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return not wait_pid(self.pid, 0)

    def wait(self, timeout: float | None) -> bool:
        """Wait for the daemon to exit; False if it still runs after ``timeout``."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return wait_pid(self.pid, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """Unmount and wait for the daemon to exit; a daemon that does not go has its FUSE
        connection aborted and is stopped by PID.  Leaves no mount behind, stale or not."""
        mnt = os.fspath(self.mountpoint)
        if self.alive() and is_mounted(mnt):
            try:
                unmount(mnt)
            except (LazyfsError, OSError):
                with contextlib.suppress(LazyfsError, OSError):
                    unmount(mnt, lazy=True)  # busy: detach; the daemon then exits
        if not self.wait(timeout):
            abort_connection(mnt, self.device)  # a hung daemon: cut only its own connection
            stop_process(self.proc if self.proc is not None else self.pid)
        clear_mountpoint(self.mountpoint)

    def kill(self) -> None:
        """SIGKILL the daemon (as a crash would), leaving its mount behind, stale."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_pid(self.pid, None)


def spawn(
    image: str,
    mountpoint: StrPath,
    options: Sequence[str] = (),
    *,
    log: StrPath = os.devnull,
    timeout: float | None = None,
    verbose: int = 0,
    cwd: StrPath | None = None,
    preexec_fn: Callable[[], None] | None = None,
    progress: Callable[[WholeFetch], None] | None = None,
    forkserver: StrPath | None = None,
) -> Daemon:
    """Start ``lazyfs mount IMAGE MOUNTPOINT OPTIONS…`` in a new session, its output appended
    to ``log``, and return once it reports the mount ready.  The daemon's own one-line error
    (or its exit without a word, or no word within ``timeout`` seconds) raises LazyfsError,
    and then no process is left behind.  ``preexec_fn`` runs in the child before lazyfs does
    (a resource limit, say); ``progress`` hears of whole-layer downloads before the mount is
    ready.  ``forkserver``: the socket of a ``lazyfs serve-forks`` to fork the daemon from
    (no interpreter start, no imports); when it cannot, the daemon starts as a new process."""
    args = [*(["-v"] * verbose), "mount", image, os.fspath(mountpoint), *options]
    if forkserver is not None and preexec_fn is None:  # a preexec_fn runs only in a new process
        try:
            return _forked(args, mountpoint, forkserver, log, cwd, timeout, progress)
        except ForkServerError as e:
            logger.warning("fork server %s: %s; starting the daemon as a new process",
                           os.fspath(forkserver), e)  # fmt: skip
    read_fd, write_fd = os.pipe()
    try:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                lazyfs_argv(*args, "--ready-fd", str(write_fd)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd=cwd,
                preexec_fn=preexec_fn,
            )
    finally:
        os.close(write_fd)
    try:
        report = read_ready(read_fd, timeout, progress)
    except DaemonFailed as e:
        child.wait()
        raise LazyfsError(str(e) or f"daemon exited ({child.returncode})") from None
    except BaseException:
        child.kill()  # by PID: it never became ready, nothing of it is worth keeping
        child.wait()
        raise
    finally:
        os.close(read_fd)
    return Daemon(child.pid, mountpoint, proc=child, log=Path(log), ready=report)


def _forked(
    args: list[str],
    mountpoint: StrPath,
    forkserver: StrPath,
    log: StrPath,
    cwd: StrPath | None,
    timeout: float | None,
    progress: Callable[[WholeFetch], None] | None,
) -> Daemon:
    """:func:`spawn` through a fork server; ForkServerError when it started nothing."""
    read_fd, write_fd = os.pipe()
    try:
        try:
            pid = request_fork(forkserver, args, log=log, ready_fd=write_fd, cwd=cwd)
        except OSError as e:  # no server there (any more), or it hung up
            raise ForkServerError(e.strerror or str(e)) from None
        finally:
            os.close(write_fd)
        try:
            report = read_ready(read_fd, timeout, progress)
        except DaemonFailed as e:
            if str(e) == LOST:
                raise ForkServerError(LOST) from None
            if not wait_pid(pid, 10.0):  # it said its error and is on its way out
                stop_process(pid)
            raise LazyfsError(str(e) or "daemon exited") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # by PID, as above: it never became ready
            wait_pid(pid, 10.0)
            raise
    finally:
        os.close(read_fd)
    return Daemon(pid, mountpoint, log=Path(log), ready=report)


def attach(mountpoint: StrPath, *, expect_pid: int | None = None, timeout: float = 10.0) -> Daemon:
    """The daemon serving ``mountpoint``, found through its control socket.  ``expect_pid``:
    the PID recorded when it was started; another daemon answering there is an error (the
    recorded one is gone), so a caller never stops a process it did not start."""
    info = control_request(os.fspath(mountpoint), {"cmd": "info"}, timeout=timeout)
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        raise LazyfsError(f"{mountpoint}: the lazyfs daemon did not say its PID")
    if expect_pid is not None and info["pid"] != expect_pid:
        raise LazyfsError(f"{mountpoint} is served by pid {info['pid']}, not {expect_pid}")
    return Daemon(info["pid"], mountpoint)


def clear_mountpoint(mountpoint: StrPath) -> None:
    """Detach whatever is left on ``mountpoint`` (a stale mount of a killed daemon)."""
    if is_stale(os.fspath(mountpoint)) or is_mounted(os.fspath(mountpoint)):
        with contextlib.suppress(LazyfsError):
            unmount(os.fspath(mountpoint), lazy=True)


def unmount_and_wait(mountpoint: StrPath, *, lazy: bool = False, timeout: float = 10.0) -> None:
    """Unmount, then wait for the daemon to let go (its control socket goes when it exits)."""
    sock = control_path(mountpoint)
    unmount(os.fspath(mountpoint), lazy=lazy)
    deadline = time.monotonic() + timeout
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class DaemonFailed(LazyfsError):
    """A daemon's own one-line error before it was ready ("": it exited without a word)."""


def read_ready(
    fd: int,
    timeout: float | None,
    progress: Callable[[WholeFetch], None] | None = None,
) -> ReadyReport:
    """Read a daemon's readiness pipe (see :mod:`lazyfs.fs.control`) to its "ready" line.
    Its "error: TEXT" raises DaemonFailed(TEXT); the pipe's end without a word raises
    DaemonFailed(""), for the caller to say how the daemon exited."""
    buf = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            word, _, rest = text.partition(" ")
            if word == "progress":
                if progress is not None:
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        progress(msgspec.json.decode(rest, type=WholeFetch))
                continue
            if word == "ready":
                try:
                    return msgspec.json.decode(rest, type=ReadyReport) if rest else ReadyReport()
                except (msgspec.DecodeError, msgspec.ValidationError):
                    return ReadyReport()
            raise DaemonFailed(text.removeprefix("error: "))
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise LazyfsError(f"the mount was not ready after {timeout:.0f}s")
        # poll, not select: a snapshotter with over 1024 files open hands this a larger fd.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(1000 * (1.0 if left is None else min(left, 1.0))):
            data = os.read(fd, 4096)
            if not data:
                if buf.strip():
                    buf += b"\n"  # a last line without its newline
                    continue
                raise DaemonFailed("")  # the daemon exited without a word
            buf += data
