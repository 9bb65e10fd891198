"""The control socket of a mount daemon: one JSON request line, one JSON reply line.

``lazyfs stats``, ``info`` and ``trace dump`` ask the daemon here, so they need no file inside
the container's rootfs.  The server runs in the daemon (trio); the client is plain blocking
socket code, usable from the CLI, tests and the snapshotter without an event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from lazyfs.errors import LazyfsError
from lazyfs.fs.runtime import control_path
from lazyfs.store.chunkcache import CacheUsage
from lazyfs.store.wholelayer import WholeFetch

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import trio


class PrefetchStats(msgspec.Struct, kw_only=True):
    """A prefetch's progress for ``lazyfs stats --json`` (the ``prefetch`` field)."""

    group: str
    entries: int = 0  # matched entries to prefetch
    skipped: int = 0  # entries whose layer or path this image does not have
    prefetch_total: int = 0  # content bytes of the chunks to prefetch (unique)
    prefetch_bytes: int = 0  # of those, bytes handled so far (fetched, or already cached)
    prefetch_done: bool = False
    elapsed_ns: int = 0  # from start to done
    error: str = ""  # the first fetch error, if any (prefetch is best effort)


class NeededStats(msgspec.Struct, kw_only=True):
    """The libraries fetched because an ELF file read names them, and the modules because
    it is a Python (``needed`` field)."""

    elf_files: int = 0  # ELF files whose dynamic section was looked at
    libraries: int = 0  # libraries they name that were fetched before being read
    bytes: int = 0  # those libraries' content bytes
    modules: int = 0  # an interpreter's standard modules fetched at its exec (stdmodules)
    module_bytes: int = 0  # their content bytes
    busy: int = 0  # look-ups and fetches under way
    error: str = ""  # the first error (follow-ups are best effort)


class MountInfo(msgspec.Struct):
    pid: int
    image: str
    mountpoint: str
    manifest: str
    upper: str | None


class LayerReport(msgspec.Struct):
    digest: str
    entries: int
    stats: dict[str, object]
    whole: WholeFetch | None = None  # a layer without a TOC this mount downloaded whole


class ReadyReport(msgspec.Struct):
    """What the daemon tells the command that started it, on its readiness pipe, with the
    word "ready": the command says plainly when layers are not lazy."""

    layers: int = 0
    plain: list[str] = []  # media types of the layers without a TOC, manifest order


# The readiness pipe, one line each: "progress {WholeFetch}"* then "ready {ReadyReport}" or
# "error: TEXT".  A bare "ready" (an older daemon) reads as an empty report.
def progress_line(fetch: WholeFetch) -> bytes:
    return b"progress " + msgspec.json.encode(fetch) + b"\n"


def ready_line(report: ReadyReport) -> bytes:
    return b"ready " + msgspec.json.encode(report) + b"\n"


class StatsReport(msgspec.Struct):
    image: str
    manifest: str
    mountpoint: str
    files: int
    layers: list[LayerReport]
    prefetch: PrefetchStats | None = None
    needed: NeededStats | None = None  # libraries named by the ELF files read (no groups)
    handler_errors: int = 0  # FUSE requests that failed unexpectedly (logged; answered EIO)
    # For metrics: the daemon's own PID and resident memory, and its view of the chunk cache
    # (its start-up scan plus its own writes: daemons sharing a cache do not see each other's).
    pid: int = 0
    rss_bytes: int = 0
    cache: CacheUsage | None = None
    requests: dict[str, int] = {}  # per handler, the FUSE requests that reached Python
    # The patched pyfuse3's reader thread: requests it answered in C, and handed to Python.
    c_requests: dict[str, int] = {}
    # While layers without a TOC were pending: requests answered from the layers above them,
    # and requests that waited for them.
    answered_early: int = 0
    waited_for_layers: int = 0
    log: str | None = None  # the daemon's log file
    # Start-up's background work is over (deltas and prefetch looked for, the prefetch run,
    # fetched TOCs kept and the heap trimmed): a resident size measured now is steady.
    settled: bool = False


def _answer(handler: Callable[[dict[str, object]], object], line: bytes) -> bytes:
    try:
        request = msgspec.json.decode(line.strip() or b"{}")
        if not isinstance(request, dict):
            raise LazyfsError("a control request is one JSON object")
        return msgspec.json.encode({"ok": True, "result": handler(request)}) + b"\n"
    except (msgspec.DecodeError, LazyfsError, KeyError) as e:
        error = str(e)
    except Exception as e:  # a bug answering one request must not end the mount
        log.exception("control request %r failed", line[:200])
        error = f"internal error: {e}"
    return msgspec.json.encode({"ok": False, "error": error}) + b"\n"


def control_listener(path: Path) -> trio.SocketListener:
    """The control socket at ``path``, bound and listening: made without a checkpoint, so a
    mount says it is ready without first letting every other task run (a client connecting
    meanwhile waits in the backlog until :func:`control_server` serves it)."""
    import trio  # here: the client side (every CLI command) should not pay for it

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def control_server(
    listener: trio.SocketListener, path: Path, handler: Callable[[dict[str, object]], object]
) -> None:
    """Answer the requests ``listener`` (:func:`control_listener`'s, at ``path``) accepts,
    until cancelled; then remove the socket."""
    import trio

    async def serve_one(stream: trio.SocketStream) -> None:
        # Whatever a client sends, or however early it hangs up (a scraper's timeout), the
        # mount stays up: this task's exception would end the daemon's nursery.
        try:
            async with stream:
                buf = b""
                with trio.move_on_after(10):
                    while b"\n" not in buf and len(buf) < 65536:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        buf += data
                    await stream.send_all(_answer(handler, buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nobody is left to answer

    try:
        await trio.serve_listeners(serve_one, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def control_request(
    mountpoint: str, request: dict[str, object], *, timeout: float = 10.0
) -> object:
    path = control_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.fspath(path))
            s.sendall(msgspec.json.encode(request) + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
    except OSError as e:
        raise LazyfsError(f"{mountpoint}: no lazyfs daemon answers ({e.strerror or e})") from None
    try:
        reply = msgspec.json.decode(buf)
    except msgspec.DecodeError:
        raise LazyfsError(f"{mountpoint}: the lazyfs daemon gave no answer") from None
    if not reply.get("ok"):
        raise LazyfsError(f"{mountpoint}: {reply.get('error')}")
    return reply.get("result")
