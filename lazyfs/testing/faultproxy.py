"""An HTTP proxy on 127.0.0.1 that forwards to a registry and misbehaves on request.

Faults apply to requests whose path contains ``match`` (default ``/blobs/``), so pings, token
and manifest requests stay healthy unless asked for.  Counted faults fire for the next N
matching requests; flags stay on until reset.  Threads, not trio: it is test-only and must run
across many ``trio.run`` calls::

    with FaultProxy(registry.url) as proxy:
        proxy.fail_next(2, status=503)
        ...  # point a RegistrySource at proxy.host
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from lazyfs.remote.multipart import ByteRanges, boundary_of, encode
from lazyfs.testing.server import ThreadedHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

#: how the proxy answers a request for several ranges (``FaultProxy.multirange``): as the
#: registry does (None), as servers that do not do multi-range do ("whole": 200 and the whole
#: blob, "first": only the first range, "416"), or with a hostile multipart body ("reorder":
#: parts last first, "lie": each part's bytes shifted by one under the right Content-Range,
#: "overlap": the first part twice, each later one followed by its predecessor again, "long":
#: a part longer than its Content-Range, "garbage": a boundary the body does not use)
MULTIRANGE_MODES = (None, "whole", "first", "416", "reorder", "lie", "overlap", "long", "garbage")


def _rewrite(mode: str, body: bytes, content_type: str) -> tuple[bytes, str]:
    """A registry's multipart answer made hostile as ``mode`` says."""
    boundary = boundary_of(content_type)
    assert boundary is not None
    parser = ByteRanges(boundary)
    parts = parser.feed(body)  # the whole body at once: one piece per part
    m = re.search(rb"/(\d+)\r\n", body)
    size = int(m.group(1)) if m else 0
    if mode == "reorder":
        parts = parts[::-1]
    elif mode == "lie":
        parts = [(at, data[1:] + data[:1]) for at, data in parts]
    elif mode == "overlap":
        parts = [q for i, p in enumerate(parts) for q in ([p, parts[i - 1]] if i else [p, p])]
    elif mode == "long":
        out = encode(parts, size, boundary)
        head = out.index(b"\r\n\r\n") + 4 + len(parts[0][1])
        return out[:head] + b"0123456789" + out[head:], content_type
    elif mode == "garbage":
        return body, content_type.replace(boundary.decode(), "not-the-boundary")
    return encode(parts, size, boundary), content_type


class FaultProxy(ThreadedHTTPServer):
    def __init__(self, upstream: str, *, match: str = "/blobs/") -> None:
        self.upstream = urlsplit(upstream).netloc
        self.match = match
        self.lock = threading.Lock()
        self.reset()
        self.port = self.serve(self._handler())
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    def reset(self) -> None:
        for old in (getattr(self, "_release", None), getattr(self, "_unhold", None)):
            if old is not None:
                old.set()  # stalled and held responses end now
        with self.lock:
            self._stall = 0
            self._release = threading.Event()
            self._hold = 0
            self._hold_at = 0
            self._unhold = threading.Event()
            #: set once a held answer has sent its first part and waits (see hold_next)
            self.holding = threading.Event()
            self.requests = 0  # all requests seen
            self.blob_bytes = 0  # body bytes of the matching GETs answered (bytes pulled)
            #: of those, blob bytes: the parts of multipart answers without their headers
            self.payload_bytes = 0
            self.paths: list[str] = []
            self.ranges: list[str | None] = []  # each request's Range header
            #: each request's client port: requests with the same one shared a connection
            self.ports: list[int] = []
            self.authorization: list[str | None] = []
            #: (path, body bytes sent) of every answered matching request
            self.served: list[tuple[str, int]] = []
            self._fail: list[tuple[int, str | None]] = []  # (status, Retry-After) per request
            self._drop = 0
            self._truncate = 0
            self._flip = 0
            #: flip bits (as flip_next) in every answer to a request with this Range header
            self.flip_range: str | None = None
            self.ignore_range = False
            #: answers to multi-range requests: one of MULTIRANGE_MODES
            self.multirange: str | None = None
            self.no_content_length = False
            #: send matching bodies at this many bytes per second (a slow link), None: at once
            self.rate: float | None = None
            #: answer matching requests with 307 to this base URL instead of proxying
            self.redirect_to: str | None = None
            #: add this Authorization upstream (a "presigned" storage stand-in)
            self.upstream_auth: str | None = None
            #: seconds every request waits before it is forwarded (a round trip), None: none
            self.delay: float | None = None
            #: only requests whose path holds this are delayed (None: all)
            self.delay_match: str | None = None
            #: ("in" | "out", path, time.monotonic()) of every request as it arrives and as its
            #: answer is sent: which requests were in flight together (tests assert on the
            #: order, benchmarks read the times)
            self.events: list[tuple[str, str, float]] = []

    def blob_requests(self, digest: str) -> list[tuple[int, str | None]]:
        """(index among the requests seen, Range) of each request naming ``digest``."""
        with self.lock:
            pairs = list(enumerate(zip(self.paths, self.ranges, strict=True)))
        return [(n, r) for n, (p, r) in pairs if digest in p]

    def ranges_before_first_answer(self, digest: str) -> list[str | None]:
        """The Range headers of the requests naming ``digest`` that arrived before the first
        answer to one of them left: what a client sent beside its first request."""
        with self.lock:
            events = list(self.events)
        ins = [i for i, ev in enumerate(events) if ev[0] == "in"]
        out = next(i for i, ev in enumerate(events) if ev[0] == "out" and digest in ev[1])
        return [r for n, r in self.blob_requests(digest) if ins[n] < out]

    def fail_next(self, n: int, status: int = 503, retry_after: str | None = None) -> None:
        with self.lock:
            self._fail += [(status, retry_after)] * n

    def drop_next(self, n: int) -> None:
        """Send headers and half the body, then reset the connection."""
        with self.lock:
            self._drop += n

    def truncate_next(self, n: int) -> None:
        """Send a short body with a matching (lying) Content-Length."""
        with self.lock:
            self._truncate += n

    def stall_next(self, n: int) -> None:
        """Send headers and half the body, then nothing until reset or close (at most 60 s)."""
        with self.lock:
            self._stall += n

    def hold_next(self, n: int, at: int) -> None:
        """Send the first ``at`` body bytes, then wait for :meth:`unhold` (at most 60 s) and
        send the rest on the same connection: a transfer a test can keep half-way for as long
        as it needs, whatever the load, without the client seeing a stall it would cut."""
        with self.lock:
            self._hold += n
            self._hold_at = at

    def unhold(self) -> None:
        self._unhold.set()

    def flip_next(self, n: int) -> None:
        """Flip a bit in every 4 KiB of the next ``n`` matching bodies."""
        with self.lock:
            self._flip += n

    def _take(self, attr: str) -> bool:
        with self.lock:
            if getattr(self, attr) > 0:
                setattr(self, attr, getattr(self, attr) - 1)
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # An answer leaves in two writes (headers, then body): with Nagle's algorithm the
            # body waited for the client's delayed ACK of the headers, 40-50 ms on a kept-alive
            # connection (traced), which a registry (Go sets TCP_NODELAY) never costs.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(
                self, status: int, headers: dict[str, str], body: bytes, hold: bool = False
            ) -> None:
                with proxy.lock:
                    proxy.events.append(("out", self.path, time.monotonic()))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if proxy.no_content_length and status < 300:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        if hold:
                            # This answer's: a reset() or hold_next() meanwhile changes the
                            # proxy's, and the rest must start where the first part ended.
                            at, unhold, holding = proxy._hold_at, proxy._unhold, proxy.holding
                            self._body(body[:at])
                            self.wfile.flush()
                            holding.set()
                            unhold.wait(60)
                            body = body[at:]
                        self._body(body)
                    except (BrokenPipeError, ConnectionResetError):
                        # A client that stops reading a whole blob after its headers (it
                        # asked for a range) closes the connection: expected, not news.
                        self.close_connection = True

            def _body(self, body: bytes) -> None:
                rate = proxy.rate if proxy.match in self.path else None
                if rate is None:
                    self.wfile.write(body)
                    return
                for i in range(0, len(body), 32 * 1024):
                    piece = body[i : i + 32 * 1024]
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(len(piece) / rate)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                matched = proxy.match in self.path
                with proxy.lock:
                    proxy.requests += 1
                    proxy.paths.append(self.path)
                    proxy.ranges.append(self.headers.get("Range"))
                    proxy.ports.append(self.client_address[1])
                    proxy.authorization.append(self.headers.get("Authorization"))
                    proxy.events.append(("in", self.path, time.monotonic()))
                    fail = proxy._fail.pop(0) if matched and proxy._fail else None
                    delay = proxy.delay
                    if proxy.delay_match is not None and proxy.delay_match not in self.path:
                        delay = None
                if delay:
                    time.sleep(delay)
                if fail is not None:
                    status, retry_after = fail
                    extra = {"Retry-After": retry_after} if retry_after else {}
                    self._reply(status, extra, b"injected failure\n")
                    return
                if matched and proxy.redirect_to:
                    self._reply(307, {"Location": proxy.redirect_to + self.path}, b"")
                    return
                headers: dict[str, str] = {}
                for k, v in self.headers.items():
                    if k.lower() not in _HOP:
                        # Repeated headers (podman sends one Accept per manifest type) join.
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                if matched and proxy.ignore_range:
                    headers.pop("Range", None)
                several = matched and "," in headers.get("Range", "")
                mode = proxy.multirange if several else None
                if mode == "416":
                    self._reply(416, {}, b"")
                    return
                if mode == "whole":
                    headers.pop("Range")
                elif mode == "first":
                    headers["Range"] = headers["Range"].split(",")[0]
                if proxy.upstream_auth:
                    headers["Authorization"] = proxy.upstream_auth
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
                    status = resp.status
                    if self.command == "HEAD":  # no body: pass on the size it announces
                        body = b"\0" * int(resp.getheader("Content-Length") or 0)
                finally:
                    conn.close()
                kind = resp.getheader("Content-Type") or ""
                if mode is not None and status == 206 and kind.startswith("multipart/"):
                    body, out["Content-Type"] = _rewrite(mode, body, kind)
                if matched and status < 300 and body:
                    if proxy._take("_drop"):
                        self.send_response(status)
                        for k, v in out.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self._body(body[: len(body) // 2])
                        self.wfile.flush()
                        # RST rather than FIN: the client sees a reset mid-body.
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                        self.close_connection = True
                        return
                    if proxy._take("_stall"):
                        release = proxy._release
                        self.send_response(status)
                        for k, v in out.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self._body(body[: len(body) // 2])
                        self.wfile.flush()
                        release.wait(60)
                        self.close_connection = True
                        return
                    if proxy._take("_truncate"):
                        body = body[: len(body) // 2]
                    flip_range = proxy.flip_range is not None and proxy.flip_range == (
                        self.headers.get("Range")
                    )
                    if proxy._take("_flip") or flip_range:
                        # A bit of every 4 KiB: a request takes neighbours of what a
                        # reader asked for, and each of its chunks must arrive damaged.
                        flipped = bytearray(body)
                        for at in range(0, len(flipped), 4096):
                            flipped[at] ^= 0x01
                        body = bytes(flipped)
                hold = (matched and self.command == "GET" and status < 300 and len(body) > 0
                        and proxy._take("_hold"))  # fmt: skip
                if matched and self.command == "GET":
                    payload = len(body)
                    kind = out.get("Content-Type", "")
                    if status == 206 and kind.startswith("multipart/byteranges") and not mode:
                        payload = sum(
                            len(d) for _, d in ByteRanges(boundary_of(kind) or b"").feed(body)
                        )
                    with proxy.lock:
                        proxy.blob_bytes += len(body)
                        proxy.payload_bytes += payload
                        proxy.served.append((self.path, len(body)))
                self._reply(status, out, body, hold)

        return Handler

    def close(self) -> None:
        self._release.set()
        self._unhold.set()
        super().close()
