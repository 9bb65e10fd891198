"""The control socket of a mount daemon: one JSON request line, one JSON reply line.

``lazyfs stats``, ``info`` and ``trace dump`` ask the daemon here, so they need no file inside
the container's rootfs.  The server runs in the daemon (trio); the client is plain blocking
socket code, usable from the CLI, tests and the snapshotter without an event loop.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from lazyfs.errors import LazyfsError
from lazyfs.fs.prefetch import PrefetchStats
from lazyfs.fs.runtime import control_path


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


class StatsReport(msgspec.Struct):
    image: str
    manifest: str
    mountpoint: str
    files: int
    layers: list[LayerReport]
    prefetch: PrefetchStats | None = None
    handler_errors: int = 0  # FUSE requests that failed unexpectedly (logged; answered EIO)
    log: str | None = None  # the daemon's log file


async def control_server(
    path: Path, handler: Callable[[dict[str, object]], object], task_status: trio.TaskStatus
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            with trio.move_on_after(10):
                while b"\n" not in buf and len(buf) < 65536:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
                try:
                    request = msgspec.json.decode(buf.strip() or b"{}")
                    reply: object = {"ok": True, "result": handler(request)}
                except (msgspec.DecodeError, LazyfsError, KeyError) as e:
                    reply = {"ok": False, "error": str(e)}
                await stream.send_all(msgspec.json.encode(reply) + b"\n")

    try:
        task_status.started()
        await trio.serve_listeners(serve_one, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def control_request(mountpoint: str, request: dict[str, object]) -> object:
    path = control_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.fspath(path))
            s.sendall(msgspec.json.encode(request) + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
    except OSError as e:
        raise LazyfsError(f"{mountpoint}: no lazyfs daemon answers ({e.strerror})") from None
    try:
        reply = msgspec.json.decode(buf)
    except msgspec.DecodeError:
        raise LazyfsError(f"{mountpoint}: the lazyfs daemon gave no answer") from None
    if not reply.get("ok"):
        raise LazyfsError(f"{mountpoint}: {reply.get('error')}")
    return reply.get("result")
