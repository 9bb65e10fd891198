"""Multi-range requests: the ``Range`` header for several ranges, and an incremental parser of
the ``206 multipart/byteranges`` answer (RFC 9110 §14.6), pure and without I/O.

The parser hands over each part's bytes as they arrive, with their blob offset from the
part's ``Content-Range``; it never searches a part's body for the boundary (its length is
known), so a part costs a few hundred bytes of header parsing whatever its size.  Anything
it cannot read exactly raises :class:`Malformed`: the caller then asks for single ranges.
Whether the bytes are the right ones is not its business: chunks are verified by digest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Proxies and load balancers commonly refuse request headers beyond 8 KiB; staying under 4 KiB
# leaves room for the rest (an Authorization token is often 1-2 KiB).
MAX_RANGE_HEADER = 4000
# Before the first boundary (a preamble), in a part's header block, after a boundary: more
# than this is not a byteranges answer.
_MAX_PREAMBLE = 1024
_MAX_PART_HEADERS = 8192
_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+|\*)")
_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,200})"|([^\s;",]{1,200}))', re.IGNORECASE)


class Malformed(Exception):
    """The answer is not a multipart/byteranges body we can read exactly."""


def range_spec(ranges: Sequence[tuple[int, int]]) -> str:
    """The ``Range`` header value for half-open ``[start, end)`` ranges."""
    return "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)


def split_ranges(
    ranges: Sequence[tuple[int, int]], limit: int = MAX_RANGE_HEADER
) -> list[list[tuple[int, int]]]:
    """``ranges`` cut, in order, into runs whose ``Range`` header stays within ``limit``."""
    out: list[list[tuple[int, int]]] = []
    size = limit
    for start, end in ranges:
        n = len(f"{start}-{end - 1},")
        if size + n > limit:
            out.append([])
            size = len("bytes=")
        out[-1].append((start, end))
        size += n
    return out


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/byteranges`` content type, or None if it is another."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "multipart/byteranges":
        return None
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise Malformed(f"multipart answer without a boundary: {content_type[:200]!r}")
    return (m.group(1) or m.group(2)).encode("ascii", "replace")


class ByteRanges:
    """Feed the body as it arrives; get ``(offset, bytes)`` pieces of the parts in the order
    sent.  ``done`` once the closing boundary was read."""

    def __init__(self, boundary: bytes) -> None:
        self._delim = b"--" + boundary
        self._buf = b""
        self._state = "preamble"
        self._at = 0  # blob offset of the next body byte
        self._left = 0  # body bytes of the current part still to come
        self.done = False

    def finish(self) -> None:
        """The body ended: raises Malformed if it held no part at all (garbage, not a cut
        transfer, which the caller sees as a short answer)."""
        if self._state == "preamble":
            raise Malformed("a multipart answer without a part")

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        buf = self._buf + data if self._buf else data
        # Each step moves ``at`` along buf: slicing off what was read instead copied the
        # rest of the buffer at every step, four times a part (quadratic in small parts).
        at, end = 0, len(buf)
        while at < end and not self.done:
            if self._state == "body":
                n = min(self._left, end - at)
                out.append((self._at, buf[at : at + n]))
                self._at += n
                self._left -= n
                at += n
                if not self._left:
                    self._state = "separator"
                continue
            step = getattr(self, "_" + self._state)(buf, at)
            if step is None:
                break  # needs more bytes
            at = step
        self._buf = b"" if self.done else bytes(buf[at:])
        return out

    def _preamble(self, buf: bytes, at: int) -> int | None:
        i = buf.find(self._delim, at)
        if i < 0:
            if len(buf) - at > _MAX_PREAMBLE:
                raise Malformed("no boundary where the first part should start")
            return None
        self._state = "after_delim"
        return i + len(self._delim)

    def _after_delim(self, buf: bytes, at: int) -> int | None:
        if len(buf) - at < 2:
            return None
        if buf[at : at + 2] == b"--":
            self.done = True
            return len(buf)
        i = buf.find(b"\r\n", at)
        if i < 0 or buf[at:i].strip(b" \t"):
            if i >= 0 or len(buf) - at > _MAX_PREAMBLE:
                raise Malformed("garbage after a boundary")
            return None
        self._state = "headers"
        return i + 2

    def _headers(self, buf: bytes, at: int) -> int | None:
        i = buf.find(b"\r\n\r\n", at)
        if i < 0:
            if len(buf) - at > _MAX_PART_HEADERS:
                raise Malformed("a part's headers never end")
            return None
        found: tuple[int, int] | None = None
        for line in buf[at:i].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                m = _CONTENT_RANGE.fullmatch(value.strip())
                if m is None:
                    raise Malformed(f"a part with Content-Range {value.strip()[:80]!r}")
                found = (int(m.group(1)), int(m.group(2)))
        if found is None:
            raise Malformed("a part without Content-Range")
        first, last = found
        if last < first:
            raise Malformed(f"a part with Content-Range {first}-{last}")
        self._at, self._left = first, last - first + 1
        self._state = "body"
        return i + 4

    def _separator(self, buf: bytes, at: int) -> int | None:
        want = b"\r\n" + self._delim
        if len(buf) - at < len(want):
            if not want.startswith(buf[at:]):
                raise Malformed("a part longer than its Content-Range")
            return None
        if not buf.startswith(want, at):
            raise Malformed("a part longer than its Content-Range")
        self._state = "after_delim"
        return at + len(want)


def encode(parts: Sequence[tuple[int, bytes]], size: int, boundary: bytes) -> bytes:
    """A ``multipart/byteranges`` body of ``(offset, bytes)`` parts of a blob of ``size``
    bytes, as Go's ServeContent writes it (a test server's answers)."""
    out = []
    for at, data in parts:
        out.append(
            b"\r\n--%s\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Range: bytes %d-%d/%d\r\n\r\n%s"
            % (boundary, at, at + len(data) - 1, size, data)
        )
    out.append(b"\r\n--%s--\r\n" % boundary)
    return b"".join(out)[2:]
