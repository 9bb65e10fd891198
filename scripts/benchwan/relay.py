"""A delaying TCP relay: the latency half of the emulated WAN (this kernel has no netem).

Runs inside the registry namespace (stdlib only, so any python3 can run it)::

    relay.py --listen 10.123.45.2:5001 --upstream 10.123.45.2:5000 --rtt-ms 40

Every accepted connection gets a connection to ``--upstream``.  In each direction one thread
reads chunks and stamps them with ``arrival + rtt/2``; another releases them in order at that
time (never earlier, never delayed cumulatively: a chunk whose time has passed is sent at
once).  The client's first chunk waits one extra RTT, standing in for the TCP handshake a
real link would cost (the relay's own accept() is instant).  EOF is forwarded as a half-close
after the same delay.  Buffered data per direction is bounded, so back-pressure still works.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
MAX_QUEUED_CHUNKS = 512  # at most 32 MiB in flight per direction


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _pump(src: socket.socket, dst: socket.socket, delay: float, first_extra: float) -> None:
    q: queue.Queue[tuple[float, bytes]] = queue.Queue(MAX_QUEUED_CHUNKS)
    stop = threading.Event()

    def put(item: tuple[float, bytes]) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.5)
                return

    def reader() -> None:
        extra = first_extra
        try:
            while True:
                data = src.recv(CHUNK)
                put((time.monotonic() + delay + extra, data))
                extra = 0.0
                if not data:
                    return
        except OSError:
            put((0.0, b""))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        while True:
            release, data = q.get()
            wait = release - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
    except OSError:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    finally:
        stop.set()
        t.join()


def _serve_one(client: socket.socket, upstream: tuple[str, int], half: float) -> None:
    try:
        server = socket.create_connection(upstream, timeout=10)
    except OSError:
        client.close()
        return
    server.settimeout(None)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(target=_pump, args=(client, server, half, 2 * half), daemon=True)
    up.start()
    _pump(server, client, half, 0.0)
    up.join()
    client.close()
    server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=_addr)
    ap.add_argument("--upstream", required=True, type=_addr)
    ap.add_argument("--rtt-ms", required=True, type=float)
    args = ap.parse_args(argv)
    half = args.rtt_ms / 2000.0
    lsock = socket.create_server(args.listen, backlog=256, reuse_port=False)
    print(f"relay {args.listen} -> {args.upstream}, rtt {args.rtt_ms} ms", flush=True)
    while True:
        client, _ = lsock.accept()
        threading.Thread(target=_serve_one, args=(client, args.upstream, half), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
