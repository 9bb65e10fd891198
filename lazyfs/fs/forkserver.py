"""A fork server for mount daemons: the client side, and a handle to start and stop one.

A mount daemon spends most of its time before "ready" starting Python and importing trio,
pyfuse3, httpx and lazyfs (0.3-0.5 s; reading cached TOCs takes less).  A fork server is one
process that has paid for those imports once, runs no trio loop and starts no thread (a fork
copies only the calling thread), and forks a daemon per request.  The child is what
``lazyfs mount … --ready-fd N`` started as a new process would be: a new session, stdio on its
log, the caller's working directory and environment, the same command line through the same
entry point (:func:`lazyfs.cli.main`).  The server side is ``lazyfs serve-forks``
(:mod:`lazyfs.cli.forks`).

One SOCK_SEQPACKET connection per daemon: the client sends a :class:`ForkRequest` with the
write end of its readiness pipe attached (SCM_RIGHTS) and gets a :class:`ForkReply` with the
child's PID.  The child starts only after that reply went out, so a client that got no PID
knows nothing was started and can start the daemon itself.  Daemons are not tied to the server:
they outlive it, and whoever started the server stops it by PID.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec

from lazyfs.errors import LazyfsError
from lazyfs.fs.runtime import runtime_dir
from lazyfs.process import stop_process

StrPath = str | os.PathLike[str]

# What a forked child writes to the readiness pipe when its server went away between the fork
# and the go-ahead: nothing of the daemon ran, the caller starts it another way.
LOST = "the fork server went away before the daemon started"
# A server that takes longer than this to answer is treated as gone.
REQUEST_TIMEOUT = 5.0
MAX_MESSAGE = 1 << 20


class ForkServerError(LazyfsError):
    """The fork server could not be used (gone, refused, another lazyfs): nothing started."""


class ForkRequest(msgspec.Struct, frozen=True):
    argv: list[str]  # lazyfs's arguments (after ``lazyfs``), without --ready-fd
    log: str  # the child's stdout and stderr, appended
    cwd: str
    env: dict[str, str]
    origin: str  # see origin(): a server running another lazyfs refuses


class ForkReply(msgspec.Struct, frozen=True):
    pid: int = 0
    error: str = ""


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
    request = ForkRequest(
        argv=list(argv),
        log=os.path.abspath(log),
        cwd=os.path.abspath(cwd if cwd is not None else os.getcwd()),
        env=dict(os.environ),
        origin=origin(),
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(sock_path))
        fds = array.array("i", [ready_fd])
        s.sendmsg([msgspec.json.encode(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        data = s.recv(MAX_MESSAGE)
    if not data:
        raise ForkServerError("the fork server closed the connection without an answer")
    try:
        reply = msgspec.json.decode(data, type=ForkReply)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ForkServerError("the fork server's answer is not understood") from None
    if reply.error or reply.pid <= 0:
        raise ForkServerError(reply.error or "the fork server started nothing")
    return reply.pid


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
        cls, socket_path: StrPath, *, log: StrPath = os.devnull, exit_with_parent: bool = True
    ) -> ForkServer:
        """Start a server on ``socket_path`` and return once it listens.  It imports the
        daemon's modules after that, so a request sent meanwhile waits for them, not for a
        timeout.  ``exit_with_parent``: it exits once this process is gone (a snapshotter
        killed outright leaves no server behind; its daemons stay)."""
        from lazyfs.fs.daemon import lazyfs_argv

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
                )
        finally:
            os.close(write_fd)
        try:
            with os.fdopen(read_fd, "rb") as ready:
                line = ready.readline().decode(errors="replace").strip()
        except BaseException:
            stop_process(proc)
            raise
        if line != "ready":
            stop_process(proc)
            raise LazyfsError(f"the fork server did not start: {line or 'it exited'}")
        return cls(proc, path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (it removes its socket), SIGKILL if it lingers.  Its daemons keep running."""
        stop_process(self.proc, timeout)
