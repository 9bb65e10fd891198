"""Wire formats of traces and prefetch groups (JSON, versioned, validated at the edge).

A **trace** is what one run of a workload read from one mount: every file it opened or read,
when (nanoseconds since the mount was ready), how long readers waited for the network on it,
and which byte ranges it read.  A **prefetch-groups** document is what the optimizer makes of
many traces: per workload group, ordered tiers of (layer, path, ranges) to fetch in that order.

Both carry ``kind`` and ``version``; readers refuse other kinds and newer major versions with a
clear error instead of guessing.
"""

from __future__ import annotations

from typing import Final, Literal, TypeVar

import msgspec

from lazyfs.errors import FormatError

TRACE_KIND: Final = "lazyfs.trace"
GROUPS_KIND: Final = "lazyfs.prefetch-groups"
VERSION = 1
# The OCI artifact type under which prefetch groups are stored beside their image.
GROUPS_ARTIFACT_TYPE = "application/vnd.lazyfs.prefetch-groups.v1+json"

Range = tuple[int, int]  # [start, end) in bytes of the file's content


class FileAccess(msgspec.Struct, kw_only=True, omit_defaults=True):
    path: str  # in the merged tree, relative, no leading slash
    layer: str  # digest of the layer blob the content comes from
    digest: str  # sha256 of the file's content (dedup key across layers and images)
    size: int
    first_open_ns: int = -1  # -1: never opened (e.g. only mmap-read through another name)
    first_read_ns: int = -1  # -1: opened but never read
    reads: int = 0
    bytes_read: int = 0
    wait_ns: int = 0  # time readers of this file waited for the network
    ranges: list[Range] = []  # merged, sorted


class Trace(msgspec.Struct, kw_only=True):
    kind: Literal["lazyfs.trace"] = TRACE_KIND
    version: int = VERSION
    image: str  # the reference as mounted
    manifest: str  # digest of the image manifest
    layers: list[str]  # layer blob digests, bottom first
    group: str  # workload label
    started: str  # RFC 3339, when the mount became ready
    duration_ns: int = 0  # from ready to the end of recording
    files: list[FileAccess]  # in order of first access


class RankedEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    layer: str
    path: str
    digest: str
    size: int
    ranges: list[Range] = []  # what to fetch; empty means the whole file
    score: float = 0.0  # lower is earlier; kept for humans and tests


class Tier(msgspec.Struct, kw_only=True):
    name: Literal["always", "sometimes", "rest"]
    entries: list[RankedEntry]


class Group(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    runs: int  # traces merged into this group
    tiers: list[Tier]
    # Per layer blob digest: the multi-range requests (each ascending [start, end) blob
    # ranges) the mount's prefetch of this group sends first, so a cold mount can send them
    # beside the layer's TOC instead of after its decode (lazyfs.store.earlyrange).  A hint:
    # checked against the blob, and every chunk is verified against the TOC.
    requests: dict[str, list[list[Range]]] = {}


class PrefetchGroups(msgspec.Struct, kw_only=True):
    kind: Literal["lazyfs.prefetch-groups"] = GROUPS_KIND
    version: int = VERSION
    image: str
    manifest: str
    layers: list[str]
    groups: list[Group]

    def group(self, name: str | None) -> Group:
        if name is None:
            if not self.groups:
                raise FormatError("the prefetch groups document has no groups")
            return self.groups[0]
        for g in self.groups:
            if g.name == name:
                return g
        have = ", ".join(g.name for g in self.groups) or "none"
        raise FormatError(f"no prefetch group {name!r} (have: {have})")


_S = TypeVar("_S", bound=msgspec.Struct)


def _decode(data: bytes, kind: str, typ: type[_S], what: str) -> _S:
    try:
        head = msgspec.json.decode(data, type=dict[str, object])
    except msgspec.DecodeError as e:
        raise FormatError(f"{what} is not JSON: {e}") from e
    if head.get("kind") != kind:
        raise FormatError(f"{what} is not a {kind} document (kind={head.get('kind')!r})")
    version = head.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise FormatError(f"{what} has version {version!r}; this lazyfs reads up to {VERSION}")
    try:
        return msgspec.json.decode(data, type=typ)
    except msgspec.ValidationError as e:
        raise FormatError(f"{what} does not match the schema: {e}") from e


def decode_trace(data: bytes, what: str = "trace") -> Trace:
    return _decode(data, TRACE_KIND, Trace, what)


def decode_groups(data: bytes, what: str = "prefetch groups") -> PrefetchGroups:
    return _decode(data, GROUPS_KIND, PrefetchGroups, what)


def encode(doc: Trace | PrefetchGroups) -> bytes:
    return msgspec.json.format(msgspec.json.encode(doc), indent=1) + b"\n"
