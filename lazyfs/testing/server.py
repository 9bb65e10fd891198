"""What every test server shares: start in ``with``, wait until it answers, stop by PID.

:class:`Server` is the context manager (``start()`` on entry, ``stop()`` on exit).
:class:`ServerProcess` is a child process whose output goes to a log file; a subclass says how
to start it (:meth:`ServerProcess.start` calls :meth:`ServerProcess.spawn`) and when it is up
(:meth:`ServerProcess.ready`).  :class:`ThreadedHTTPServer` is an in-process HTTP server on
127.0.0.1 in a daemon thread (test code only: it must outlive many ``trio.run`` calls).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from lazyfs.process import stop_process


def unix_socket_accepts(path: str | os.PathLike[str]) -> bool:
    """True when something listens on the unix socket at ``path``."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block lasts: bound but not
    listening, so the kernel answers a SYN with a reset and no one else can take the port
    (a port merely found free may be someone's listener by the time it is dialled)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def listening_port(pid: int) -> int | None:
    """The TCP port process ``pid`` listens on over IPv4 (None while it has none yet): what
    the kernel bound for a server told to listen on port 0.  Its sockets are matched by inode
    in its network namespace's table; more than one listening is an error (which one?)."""
    inodes = set()
    with os.scandir(f"/proc/{pid}/fd") as fds:
        for fd in fds:
            with contextlib.suppress(OSError):  # closed since the listing
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)  # the header
        for row in table:
            # sl local_address rem_address st ... inode (the 10th field); 0A is LISTEN
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    if len(ports) > 1:
        raise RuntimeError(f"process {pid} listens on several ports: {sorted(ports)}")
    return ports.pop() if ports else None


class Server:
    """Started on entering ``with`` (if not already), stopped on leaving it, whatever happens."""

    def start(self) -> Self:
        return self

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(Server):
    """One child process, stopped by PID (SIGTERM, wait, SIGKILL) whatever happens in ``with``."""

    #: what the error messages call it
    name = "server"
    #: the exception start() raises when the process dies or never gets ready
    error: type[Exception] = RuntimeError
    start_timeout = 15.0
    stop_timeout = 5.0
    poll_interval = 0.05

    proc: subprocess.Popen[bytes] | None = None
    _log: Path | None = None
    _log_start = 0

    def ready(self) -> bool:
        """Whether the process serves yet; called while it runs until true or the timeout."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_text(self) -> str:
        """The log so far (all runs: it is appended to across restarts)."""
        if self._log is None:
            return ""
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    def this_run_log(self) -> str:
        """The part of the log written since the last :meth:`spawn`."""
        return self.log_text()[self._log_start :]

    def spawn(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
    ) -> None:
        """Start ``argv`` with stdout and stderr appended to ``log``; return once ready.

        On any failure (or interrupt) while waiting the process is stopped before re-raising.
        """
        if self.proc is not None:
            raise self.error(f"{self.name} already started")
        self._log = log
        self._log_start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C to the test runner is not delivered to the server
                # behind our back; we stop it ourselves by PID.
                start_new_session=new_session,
                env=None if env is None else dict(env),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise self.error(f"{self.name} exited ({rc}):\n{self.log_text()[-4000:]}")
            if self.ready():
                return
            time.sleep(self.poll_interval)
        raise self.error(
            f"{self.name} not ready within {self.start_timeout}s:\n{self.log_text()[-4000:]}"
        )

    def stop(self) -> int | None:
        """Stop the process by PID; idempotent.  Returns its exit status (None if none ran)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        stop_process(proc, self.stop_timeout)
        return proc.returncode


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a cancelled read, a mount stopped) is what the
        # tests do on purpose: not worth a traceback on stderr.  Anything else still prints.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)


class ThreadedHTTPServer(Server):
    """An HTTP server on a free 127.0.0.1 port, serving from a daemon thread until close()."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> int:
        """Start serving with ``handler``; returns the port."""
        self._server = _QuietHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def stop(self) -> None:
        self.close()
