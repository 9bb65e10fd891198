"""``lazyfs serve-forks``: the fork server's side (the client is :mod:`lazyfs.fs.forkserver`).

It binds its socket, imports everything a mount daemon imports, then only accepts, forks and
reaps: no trio loop, no thread, so each child is a clean single-threaded copy that goes on
exactly as a new ``lazyfs mount … --ready-fd N`` process would.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import gc
import io
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Sequence
from types import FrameType

import msgspec

from lazyfs.errors import LazyfsError
from lazyfs.fs.forkserver import LOST, MAX_MESSAGE, REQUEST_TIMEOUT, default_socket, origin

log = logging.getLogger(__name__)

class ForkRequest(msgspec.Struct, frozen=True):
    """What a client asks (see :mod:`lazyfs.fs.forkserver`, which builds it)."""

    kind: str  # "daemon": ARGV --ready-fd N on the one descriptor; "command": ARGV on 0, 1, 2
    argv: list[str]  # lazyfs's arguments (after ``lazyfs``)
    log: str  # a daemon's stdout and stderr, appended
    cwd: str
    env: dict[str, str]
    origin: str  # a server running another lazyfs refuses


class ForkReply(msgspec.Struct, frozen=True, omit_defaults=True):
    pid: int = 0
    error: str = ""


# Descriptors each kind of request carries.
DESCRIPTORS = {"daemon": 1, "command": 3}

# How often the server looks whether its parent is gone (--exit-with-parent).
PARENT_POLL = 1.0


PR_SET_NAME = 15  # prctl(2): the calling thread's name (comm, 15 bytes)
# prctl(2) PR_SET_MM, PR_SET_MM_MAP: a process's own memory map, its command line's bounds
# among it (no capability needed when the executable stays the same).
PR_SET_MM, PR_SET_MM_MAP = 35, 14
CUT = b"..."  # ends a command line that had to be cut to fit
# The buffer /proc/PID/cmdline is read from once moved: it must live as long as the process.
_cmdline: list[ctypes.Array[ctypes.c_char]] = []


class _MmMap(ctypes.Structure):
    """struct prctl_mm_map (linux/prctl.h)."""

    _fields_ = [
        *((name, ctypes.c_uint64) for name in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
            "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")),
        ("auxv_size", ctypes.c_uint32),
        ("exe_fd", ctypes.c_uint32),
    ]  # fmt: skip


# Fields of /proc/PID/stat (1-based, as proc(5) numbers them) that PR_SET_MM_MAP restates.
_STAT_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
                "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49,
                "env_start": 50, "env_end": 51}  # fmt: skip


def name_process(comm: str, argv: Sequence[str]) -> None:
    """Show this process as what it runs, not as the server it was forked from: ``comm``
    (what ``ps -o comm``, ``top`` and ``pkill`` see) and ``argv`` as its command line
    (/proc/PID/cmdline, ``ps -f``).  The kernel is pointed at a copy of ``argv``, whole; if
    it refuses, ``argv`` is written over the server's own command line, space-separated and
    marked ``...`` where that room cuts it.  For people only: lazyfs finds its daemons by
    control socket and PID, never by name."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    name = ctypes.create_string_buffer(os.fsencode(comm)[:15])
    libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
    args = [os.fsencode(a) for a in argv]
    stat = _memory_map()
    if stat is None or _move_cmdline(libc, b"\0".join(args) + b"\0", stat):
        return
    _overwrite_cmdline(b" ".join(args), (stat["arg_start"], stat["arg_end"]))


def _memory_map() -> dict[str, int] | None:
    """This process's memory map as /proc/self/stat gives it (the fields of _STAT_FIELDS)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # fields[0] is field 3
        return {name: int(fields[n - 3]) for name, n in _STAT_FIELDS.items()}
    except (OSError, ValueError, IndexError):
        return None


def _move_cmdline(libc: ctypes.CDLL, text: bytes, stat: dict[str, int]) -> bool:
    """Point the kernel's command line at a copy of ``text`` (NUL-separated arguments);
    False, nothing changed, when it refuses."""
    buf = ctypes.create_string_buffer(text, len(text))
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_long]
    brk = libc.sbrk(0)  # the heap's end: not in /proc/PID/stat, and the map restates it
    if not brk:
        return False
    start = ctypes.addressof(buf)
    mm = _MmMap(**{**stat, "arg_start": start, "arg_end": start + len(text)},
                brk=brk, auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF)  # fmt: skip
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(mm), ctypes.sizeof(mm), 0) != 0:
        return False
    _cmdline.append(buf)
    return True


def _overwrite_cmdline(text: bytes, area: tuple[int, int]) -> None:
    """Write ``text`` over the command line in place, as far as its room goes (the
    environment after it stays untouched; Python keeps its own copies of both)."""
    room = area[1] - area[0]
    if room < len(CUT) + 2:
        return
    if len(text) > room - 1:
        text = text[: room - 1 - len(CUT)] + CUT
    text += b"\0"
    # The kernel shows up to the first NUL when the area's last byte is not one (what
    # setproctitle(3) does), the whole area when it is: either way, the text alone.
    ctypes.memmove(area[0], text + b" " * (room - len(text)), room)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve-forks",
        help="serve mount daemons by fork from one process that has imported lazyfs "
        "(`lazyfs mount` uses it when it listens at the default socket)",
    )
    p.add_argument("--socket", metavar="PATH", help="where to listen (default: %(default)s)",
                   default=None)  # fmt: skip
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=serve_forks_cmd)


def serve_forks_cmd(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.socket) if args.socket else os.fspath(default_socket())
    parent = os.getppid() if args.exit_with_parent else None
    try:
        listener = _listen(path)
    except OSError as e:  # the starter waits on the ready pipe: the one line goes there
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error: cannot listen on {path}: {e.strerror or e}\n".encode())
        raise LazyfsError(f"cannot listen on {path}: {e.strerror or e}") from None
    identity = _identity(path)
    try:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGCHLD, _reap)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        else:
            print(f"lazyfs: serving forks on {path} (pid {os.getpid()})", file=sys.stderr,
                  flush=True)  # fmt: skip
        _preload()
        _loop(listener, parent)
    finally:
        if _identity(path) == identity:  # not if a newer server has taken the path since
            os.unlink(path)
        listener.close()
    return 0


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a dead server's; a live one's clients move to this one
    old = os.umask(0o177)  # only its owner may ask it for daemons
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _preload() -> None:
    """Import what a daemon imports before it is ready, then freeze those objects out of the
    collector so the children's collections do not write to (and copy) the shared pages."""
    # lazyfs.fs.serve: trio, pyfuse3, httpx, msgspec, store, opener.  httpx imports its
    # transport (httpcore) only when the first client is made, and httpcore its trio backend
    # at the first connection: every daemon would import them after the fork.
    # encodings.idna: a daemon's first connection imports it (getaddrinfo encodes the host);
    # lazyfs.fs.daemon: what each child calls to name itself.
    import encodings.idna  # noqa: F401

    import certifi
    import httpcore._backends.auto
    import httpcore._backends.trio  # noqa: F401

    import lazyfs.fs.daemon
    import lazyfs.fs.serve  # noqa: F401
    from lazyfs.cli import keep_parser

    certifi.where()  # imports importlib.resources' readers (the CA bundle's path)
    from lazyfs.remote.registry import default_tls

    default_tls().load()  # the CA bundle parsed once here, not in every https daemon

    # Imports every subcommand's module, as each child's parsing would, and keeps the parser
    # for the children (lazyfs.cli.parser).
    keep_parser()

    gc.collect()
    gc.freeze()


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # through the finally that removes the socket


def _loop(listener: socket.socket, parent: int | None) -> None:
    while True:
        readable, _, _ = select.select([listener], [], [], PARENT_POLL)
        if parent is not None and os.getppid() != parent:
            log.info("the process that started this fork server is gone: exiting")
            return
        if not readable:
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        with conn:
            try:
                _handle(conn, listener)
            except Exception as e:  # one bad request never ends the server
                log.warning("fork request failed: %s", e)


def _reap(signum: int, frame: FrameType | None) -> None:
    """Collect exited daemons, so none stays a zombie while this server runs."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(conn: socket.socket, listener: socket.socket) -> None:
    conn.settimeout(REQUEST_TIMEOUT)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    try:
        if uid != os.geteuid():
            raise LazyfsError(f"uid {uid} may not ask this server for daemons")
        try:
            request = msgspec.json.decode(data, type=ForkRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise LazyfsError(f"bad fork request: {e}") from None
        if len(fds) != DESCRIPTORS.get(request.kind, -1):
            raise LazyfsError(f"a {request.kind!r} request with {len(fds)} descriptors")
        if request.origin != origin():
            raise LazyfsError(f"this fork server runs {origin()}, not {request.origin}")
        _fork(conn, listener, request, list(fds))
    except LazyfsError as e:
        conn.send(msgspec.json.encode(ForkReply(error=str(e))))
    finally:
        for fd in fds:
            os.close(fd)


def _fork(
    conn: socket.socket, listener: socket.socket, request: ForkRequest, fds: list[int]
) -> None:
    go_read, go_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()  # or the child writes the server's pending output again
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(go_write)
            listener.close()
            if request.kind == "command":
                code = _command(request, fds, go_read, conn)
            else:
                conn.close()
                code = _daemon(request, fds[0], go_read)
        except BaseException as e:  # before the CLI took over: the caller gets the one line
            with contextlib.suppress(OSError):
                os.write(fds[-1], f"{'' if request.kind == 'command' else 'error: '}"
                         f"lazyfs: {e}\n".encode())  # fmt: skip
        finally:
            os._exit(code)
    os.close(go_read)
    try:
        conn.send(msgspec.json.encode(ForkReply(pid=pid)))
        os.write(go_write, b"g")  # the client has the PID: the child may start
    finally:
        os.close(go_write)  # without the byte: the child reports LOST and exits


def _start(request: ForkRequest, go_read: int) -> bool:
    """Common to both kinds: default signals, wait for the go-ahead (False: the server went
    away before its client had the PID), then the caller's directory and environment."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.read(go_read, 1) != b"g":
        return False
    os.close(go_read)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    # The server's logging set-up is not the child's: main() sets it from the child's -v.
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    return True


def _comm(argv: Sequence[str]) -> str:
    """``lazyfs-COMMAND``, COMMAND being the subcommand lazyfs's own parser finds in ``argv``
    (options before it and their values skipped as it skips them); ``lazyfs`` when it finds
    none: the command's run reports why."""
    from lazyfs.cli import parser

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            command = parser().parse_args(list(argv)).command
        except SystemExit:  # a bad command line, or --help
            command = None
    return f"lazyfs-{command}" if isinstance(command, str) and command else "lazyfs"


def _daemon(request: ForkRequest, ready_fd: int, go_read: int) -> int:
    """The daemon, from the fork to the CLI's entry point.  Mirrors what the exec path gets
    from subprocess: a new session, stdio on the log, the caller's cwd and environment."""
    if not _start(request, go_read):
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"error: {LOST}\n".encode())
        return 1
    from lazyfs.cli import run
    from lazyfs.cli.mount import detach
    from lazyfs.fs.daemon import lazyfs_argv

    argv = [*request.argv, "--ready-fd", str(ready_fd)]
    name_process(_comm(argv), lazyfs_argv(*argv))  # what a daemon started anew would show
    detach(request.log, ready_fd)

    return run(argv)


def _command(request: ForkRequest, fds: list[int], go_read: int, conn: socket.socket) -> int:
    """A whole ``lazyfs`` command on the client's stdin, stdout and stderr; its exit code
    goes back on the connection (the client exits with it)."""
    if not _start(request, go_read):
        return 1  # the client saw no PID: it runs the command itself
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    from lazyfs.cli import run
    from lazyfs.fs.daemon import lazyfs_argv

    name_process(_comm(request.argv), lazyfs_argv(*request.argv))  # its daemon inherits it

    code = 1
    try:
        code = run(request.argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.send(msgspec.json.encode({"exit": code}))
    return code
