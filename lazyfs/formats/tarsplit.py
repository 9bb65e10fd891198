"""tar-split metadata, as containers/storage embeds it in zstd:chunked layers.

vbatts/tar-split's "storage" format: JSON lines, one per entry, numbered by ``position``:
``{"type":2,"payload":BASE64,...}`` segments hold raw tar bytes (headers, padding, the end of
the archive) and ``{"type":1,"name":...,"size":N,"payload":CRC,...}`` entries stand for a
file's content, which lives elsewhere; ``payload`` of a file is the big-endian CRC-64 (Go's
ISO table) of its content.  Segments and contents in position order give back the exact tar.

containers/storage compresses the lines as one ordinary zstd stream and stores it in a
skippable frame between the TOC and the footer; the TOC's ``tarSplitDigest`` is the sha256 of
the compressed bytes.  Newer containers/storage needs it to partial-pull (it rebuilds the
layer's tar stream from it when the image is pushed or saved).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import crcmod
import msgspec
import zstandard

from lazyfs.formats.toc import TarHeader

SEGMENT = 2
FILE = 1

# CRC-64/GO-ISO: Go's hash/crc64 with the ISO table (init and final xor all ones).
_crc64 = crcmod.Crc(0x1000000000000001B, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
# Go's encoding/json escapes these in strings; doing the same keeps the lines as Go writes them.
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


class TarSplitData(msgspec.Struct, frozen=True):
    data: bytes  # zstd-compressed JSON lines
    digest: str  # sha256 of ``data``
    uncompressed_size: int


def crc64(data: bytes) -> bytes:
    c = _crc64.new()
    c.update(data)
    return bytes(c.digest())


class TarSplitWriter:
    """Collects the entries while a tar stream is framed: call :meth:`header` with each
    member's raw header blocks, :meth:`content` with its bytes, :meth:`end_member` with its
    parsed header, size and the padding after it, and :meth:`finish` with the end-of-archive
    bytes."""

    def __init__(self, level: int = 3) -> None:
        self._buf = io.BytesIO()
        self._zstd = zstandard.ZstdCompressor(level=level).stream_writer(self._buf, closefd=False)
        self._plain = 0
        self._pos = 0
        self._pending = b""  # padding of the previous member: it leads the next segment
        self._crc = _crc64.new()
        #: Every member's header, in order: the TOC entries are written from them, so that
        #: they match the tar-split as containers/storage checks.
        self.headers: list[TarHeader] = []
        self._names: set[str] = set()
        #: Why containers/storage could not accept a tar-split for this layer, if it could
        #: not (then none is written, and it pulls the layer whole rather than refusing it).
        self.refused = ""

    def _line(self, fields: str) -> None:
        line = ("{" + fields + f',"position":{self._pos}}}\n').encode()
        self._zstd.write(line)
        self._plain += len(line)
        self._pos += 1

    def _segment(self, raw: bytes) -> None:
        self._line(f'"type":{SEGMENT},"payload":"{base64.b64encode(raw).decode()}"')

    def header(self, raw: bytes) -> None:
        self._segment(self._pending + raw)
        self._pending = b""

    def content(self, data: bytes) -> None:
        self._crc.update(data)

    def end_member(self, header: TarHeader, size: int, padding: bytes) -> None:
        name = header.name
        self.headers.append(header)
        if not self.refused:
            if header.unrepresentable:
                self.refused = f"{name!r} has {header.unrepresentable}"
            elif name in self._names:
                # containers/storage keys both sides by name and refuses a repeated one.
                self.refused = f"{name!r} appears twice"
            self._names.add(name)
        try:
            name.encode("utf-8")
            named = '"name":' + json.dumps(name, ensure_ascii=False).translate(_GO_ESCAPES)
        except UnicodeEncodeError:  # not UTF-8 in the tar (kept as surrogates): raw bytes
            raw = name.encode("utf-8", "surrogateescape")
            named = f'"name_raw":"{base64.b64encode(raw).decode()}"'
        if size:
            payload = '"' + base64.b64encode(bytes(self._crc.digest())).decode() + '"'
            self._line(f'"type":{FILE},{named},"size":{size},"payload":{payload}')
        else:
            self._line(f'"type":{FILE},{named},"payload":null')
        self._crc = _crc64.new()
        self._pending = padding

    def finish(self, trailer: bytes) -> TarSplitData:
        self._segment(self._pending + trailer)
        self._pending = b""
        self._segment(b"")  # what follows the end of the archive (nothing), as tar-split ends
        self._zstd.flush(zstandard.FLUSH_FRAME)
        data = self._buf.getvalue()
        return TarSplitData(data, "sha256:" + hashlib.sha256(data).hexdigest(), self._plain)


class TarSplitEntry(msgspec.Struct, frozen=True):
    type: int
    position: int
    name: str = ""
    name_raw: bytes = b""
    size: int = 0
    payload: bytes | None = None


def read_tar_split(lines: bytes) -> list[TarSplitEntry]:
    """Decode the (uncompressed) JSON lines; for tests and tools."""
    dec = msgspec.json.Decoder(TarSplitEntry)
    return [dec.decode(line) for line in lines.splitlines() if line.strip()]
