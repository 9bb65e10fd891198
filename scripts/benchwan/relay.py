"""A delaying TCP relay: the latency half of the emulated WAN (this kernel has no netem).

Runs inside the registry namespace (stdlib only, so any python3 can run it)::

    relay.py --listen 10.123.45.2:5001 --upstream 10.123.45.2:5000 --rtt-ms 40

Every accepted connection gets a connection to ``--upstream``.  In each direction one thread
reads chunks and stamps them with ``arrival + rtt/2``; another releases them in order at that
time (never earlier, never delayed cumulatively: a chunk whose time has passed is sent at
once).  The client's first chunk waits one extra RTT, standing in for the TCP handshake a
real link would cost (the relay's own accept() is instant).  EOF is forwarded as a half-close
after the same delay.  Buffered data per direction is bounded, so back-pressure still works.

``--log FILE``: one JSON line per connection opened or closed, per HTTP request seen leaving
the client (its request line and Range, at the time the client sent it) and per chunk of
answer handed to the client: what :mod:`.rtts` tables as round trips.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
MAX_QUEUED_CHUNKS = 512  # at most 32 MiB in flight per direction
METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ")


class EventLog:
    """JSON lines, written by every connection's threads (a lock keeps lines whole)."""

    def __init__(self, path: str | None) -> None:
        self._out = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._lock = threading.Lock()

    def __call__(self, **event: object) -> None:
        if self._out is None:
            return
        event["t"] = time.monotonic()
        line = json.dumps(event)
        with self._lock:
            self._out.write(line + "\n")


def request_event(data: bytes) -> dict[str, str] | None:
    """The request line and Range of the HTTP request ``data`` starts with (requests are
    small: their head comes in one chunk), or None for a chunk of a body."""
    if not data.startswith(METHODS):
        return None
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, _, rest = head[0].partition(" ")
    out = {"method": method, "path": rest.rpartition(" ")[0]}
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "range":
            out["range"] = value.strip()
    return out


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class SlowStart:
    """A sender's congestion window on a path of ``rtt`` seconds, for ``--slow-start``: the
    relay's own TCP ends see a sub-millisecond RTT, so their windows open at once and a fresh
    connection runs at the link's rate from its first byte, which a real 40 ms path does not.
    At most ``cwnd`` bytes a round trip, from 10 segments, doubled after each round that used
    it all, and back to 10 segments after an idle RTO (Linux's default,
    tcp_slow_start_after_idle)."""

    IW = 10 * 1448

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt
        self.rto = 0.2 + rtt  # Linux's 200 ms floor plus about the smoothed RTT
        self.cwnd = self.IW
        self.round_end = 0.0
        self.left = 0
        self.last = float("-inf")

    def send(self, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            now = time.monotonic()
            if now - self.last > self.rto:
                self.cwnd = self.left = self.IW
                self.round_end = now + self.rtt
            elif now >= self.round_end:
                if self.left == 0:  # the window was used up: it grows
                    self.cwnd *= 2
                self.left = self.cwnd
                self.round_end = now + self.rtt
            if self.left == 0:
                time.sleep(self.round_end - now)
                continue
            n = min(len(view), self.left)
            dst.sendall(view[:n])
            self.left -= n
            view = view[n:]
            self.last = time.monotonic()


def _pump(
    src: socket.socket,
    dst: socket.socket,
    delay: float,
    first_extra: float,
    note: EventLog,
    conn: int,
    upstream: bool,
    window: SlowStart | None = None,
) -> None:
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
                if upstream and (req := request_event(data)) is not None:
                    note(ev="req", conn=conn, **req)
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
            if window is not None:
                window.send(dst, data)
            else:
                dst.sendall(data)
            if not upstream:
                note(ev="data", conn=conn, n=len(data))
    except OSError:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    finally:
        stop.set()
        t.join()


def _serve_one(
    client: socket.socket,
    upstream: tuple[str, int],
    half: float,
    note: EventLog,
    conn: int,
    slow_start: bool,
) -> None:
    note(ev="open", conn=conn)
    try:
        server = socket.create_connection(upstream, timeout=10)
    except OSError:
        client.close()
        return
    server.settimeout(None)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(
        target=_pump, args=(client, server, half, 2 * half, note, conn, True), daemon=True
    )
    up.start()
    window = SlowStart(2 * half) if slow_start else None
    _pump(server, client, half, 0.0, note, conn, False, window)
    up.join()
    client.close()
    server.close()
    note(ev="close", conn=conn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=_addr)
    ap.add_argument("--upstream", required=True, type=_addr)
    ap.add_argument("--rtt-ms", required=True, type=float)
    ap.add_argument("--log", help="JSON lines: connections, requests, answers' chunks")
    ap.add_argument("--slow-start", action="store_true", help="answers sent as a sender's "
                    "congestion window on a path of --rtt-ms allows (see SlowStart)")
    args = ap.parse_args(argv)
    half = args.rtt_ms / 2000.0
    lsock = socket.create_server(args.listen, backlog=256, reuse_port=False)
    note = EventLog(args.log)
    print(f"relay {args.listen} -> {args.upstream}, rtt {args.rtt_ms} ms", flush=True)
    conn = 0
    while True:
        client, _ = lsock.accept()
        conn += 1
        threading.Thread(
            target=_serve_one,
            args=(client, args.upstream, half, note, conn, args.slow_start),
            daemon=True,
        ).start()


if __name__ == "__main__":
    sys.exit(main())
