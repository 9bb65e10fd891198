"""A fork server for mount daemons: the client side, and a handle to start and stop one.

A mount daemon spends most of its time before "ready" starting Python and importing trio,
pyfuse3, httpx and lazyfs (0.3-0.5 s; reading cached TOCs takes less).  A fork server is one
process that has paid for those imports once, runs no trio loop and starts no thread (a fork
copies only the calling thread), and forks a daemon per request.  The child is what
``lazyfs mount … --ready-fd N`` started as a new process would be: a new session, stdio on its
log, the caller's working directory and environment, the same command line through the same
entry point (:func:`lazyfs.cli.main`).  The server side is ``lazyfs serve-forks``
(:mod:`lazyfs.cli.forks`).

One SOCK_SEQPACKET connection per request, JSON messages (the server's schema is
``lazyfs.cli.forks.ForkRequest``), descriptors attached with SCM_RIGHTS:

- ``daemon`` (:func:`request_fork`, what :func:`lazyfs.fs.daemon.spawn` uses): the write end
  of the caller's readiness pipe goes along; the answer is the child's PID.
- ``command`` (:func:`run_in_server`, what the ``lazyfs`` command does first for ``mount``):
  the caller's stdin, stdout and stderr go along; the child runs the whole command (which
  forks the daemon as it always does) and sends its exit code when done.

A child starts only after the answer with its PID went out, so a client that got no PID knows
nothing was started and does the work itself.  Daemons are not tied to the server: they
outlive it, and whoever started the server stops it by PID.  This module imports only the
standard library: the command's fast path must cost next to nothing.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.errors import LazyfsError
from lazyfs.fs.runtime import runtime_dir

if TYPE_CHECKING:
    import subprocess

StrPath = str | os.PathLike[str]

# What a forked child writes to the readiness pipe when its server went away between the fork
# and the go-ahead: nothing of the daemon ran, the caller starts it another way.
LOST = "the fork server went away before the daemon started"
# A server that takes longer than this to answer is treated as gone.
REQUEST_TIMEOUT = 5.0
MAX_MESSAGE = 1 << 20


class ForkServerError(LazyfsError):
    """The fork server could not be used (gone, refused, another lazyfs): nothing started."""


def origin() -> str:
    """The interpreter and the lazyfs package this process runs: a fork of a server with
    other code would not be the daemon the client asked for."""
    import lazyfs

    return f"{sys.executable} {os.path.dirname(os.path.abspath(lazyfs.__file__))}"


# Names the socket ``lazyfs mount`` and ``serve-forks`` use instead of the default (the
# snapshotter's server, say, or a test's own).
SOCKET_ENV = "LAZYFS_FORK_SERVER"


def default_socket() -> Path:
    """Where ``lazyfs serve-forks`` listens unless told otherwise, and ``lazyfs mount`` looks."""
    return Path(os.environ.get(SOCKET_ENV) or runtime_dir() / "forks.sock")


def request_fork(
    sock_path: StrPath,
    argv: list[str],
    *,
    log: StrPath,
    ready_fd: int,
    cwd: StrPath | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> int:
    """Ask the server at ``sock_path`` for a daemon running ``lazyfs ARGV --ready-fd N``, N
    being its copy of ``ready_fd``; return the daemon's PID.  Raises ForkServerError (or
    OSError) when no daemon was started."""
    with _send(sock_path, "daemon", argv, [ready_fd], cwd, timeout, log=log) as s:
        return _pid(s)


# Commands the server runs for the ``lazyfs`` command: those whose time is mostly imports.
SERVED_COMMANDS = ("mount",)


def run_in_server(argv: Sequence[str], sock_path: StrPath | None = None) -> int | None:
    """Run ``lazyfs ARGV`` in a fork of the server (at ``sock_path``, default_socket() by
    default) on this process's stdin, stdout and stderr; its exit code.  None when it is not
    a served command or no server started it: the caller runs the command itself."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] not in SERVED_COMMANDS:
        return None
    # The daemon itself (--ready-fd: started by spawn, its pipe is here), --foreground (this
    # process serves) and --help stay here; argparse takes unique prefixes of option names.
    if any(a in ("-h", "--help") or a.startswith(("--ready", "--fo")) for a in argv):
        return None
    path = sock_path if sock_path is not None else default_socket()
    if not os.path.exists(path):
        return None
    try:
        s = _send(path, "command", list(argv), [0, 1, 2], None, REQUEST_TIMEOUT)
    except (OSError, ForkServerError):
        return None
    with s:
        try:
            pid = _pid(s)
        except (OSError, ForkServerError):
            return None
        # The command is ours now: ^C and SIGTERM go to it; its answer is its exit code.
        def forward(signum: int, frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        s.settimeout(None)
        data = s.recv(MAX_MESSAGE)
    try:
        return int(json.loads(data)["exit"])
    except (ValueError, KeyError, TypeError):
        print("lazyfs: the command ended without an exit status", file=sys.stderr)
        return 1


def _send(
    sock_path: StrPath,
    kind: str,
    argv: list[str],
    fds: list[int],
    cwd: StrPath | None,
    timeout: float,
    *,
    log: StrPath = os.devnull,
) -> socket.socket:
    request = {
        "kind": kind,
        "argv": argv,
        "log": os.path.abspath(log),
        "cwd": os.path.abspath(cwd if cwd is not None else os.getcwd()),
        "env": dict(os.environ),
        "origin": origin(),
    }
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(os.fspath(sock_path))
        rights = array.array("i", fds)
        s.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    except BaseException:
        s.close()
        raise
    return s


def _pid(s: socket.socket) -> int:
    data = s.recv(MAX_MESSAGE)
    if not data:
        raise ForkServerError("the fork server closed the connection without an answer")
    try:
        reply: Any = json.loads(data)
        pid, error = reply.get("pid", 0), reply.get("error", "")
    except (ValueError, AttributeError):
        raise ForkServerError("the fork server's answer is not understood") from None
    if error or not isinstance(pid, int) or pid <= 0:
        raise ForkServerError(str(error) or "the fork server started nothing")
    return pid


# A server not listening after this long (an interpreter start and lazyfs's CLI) is not used.
START_TIMEOUT = 30.0


class ForkServer:
    """A ``lazyfs serve-forks`` process this process started; :meth:`stop` ends it by PID."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path) -> None:
        self.proc = proc
        self.socket = socket_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __repr__(self) -> str:
        return f"<ForkServer pid {self.pid} on {self.socket}>"

    @classmethod
    def start(
        cls,
        socket_path: StrPath,
        *,
        log: StrPath = os.devnull,
        exit_with_parent: bool = True,
        cwd: StrPath | None = None,
    ) -> ForkServer:
        """Start a server on ``socket_path`` and return once it listens.  It imports the
        daemon's modules after that, so a request sent meanwhile waits for them, not for a
        timeout.  ``exit_with_parent``: it exits once this process is gone (a snapshotter
        killed outright leaves no server behind; its daemons stay).  ``cwd``: where it runs
        (a benchmark's checkout of another lazyfs, which ``python -m`` then imports)."""
        import subprocess

        from lazyfs.fs.daemon import DaemonFailed, lazyfs_argv, read_ready
        from lazyfs.process import stop_process

        path = Path(os.path.abspath(socket_path))
        argv = lazyfs_argv("serve-forks", "--socket", str(path))
        if exit_with_parent:
            argv.append("--exit-with-parent")
        read_fd, write_fd = os.pipe()
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [*argv, "--ready-fd", str(write_fd)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # a ^C meant for the caller is not for it
                    cwd=cwd,
                )
        finally:
            os.close(write_fd)
        try:
            read_ready(read_fd, START_TIMEOUT)  # the daemon's protocol: "ready" or its error
        except DaemonFailed as e:
            stop_process(proc)
            raise LazyfsError(f"the fork server did not start: {e or 'it exited'}") from None
        except BaseException:
            stop_process(proc)
            raise
        finally:
            os.close(read_fd)
        return cls(proc, path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (it removes its socket), SIGKILL if it lingers.  Its daemons keep running."""
        from lazyfs.process import stop_process

        stop_process(self.proc, timeout)
