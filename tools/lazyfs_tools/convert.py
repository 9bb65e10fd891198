"""``lazyfs convert``: rewrite every layer of an OCI image into a lazy format.

The output is a complete OCI layout written beside the destination and renamed into place only
when everything succeeded, so a failure leaves nothing behind.  Manifests, configs and indexes
are edited as JSON documents (unknown fields kept), re-encoded deterministically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.formats import estargz, zstdchunked
from lazyfs.formats.framing import DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_SIZE, LayerResult
from lazyfs.formats.layer import (
    TAIL_SIZE,
    decode_layer_toc,
    decompressing,
    locate_toc,
    toc_by_annotations,
)
from lazyfs.formats.tarstream import BLOCK, TarReader
from lazyfs.ocilayout import HashingReader, Layout
from lazyfs.remote.reference import parse_oci_ref, parse_reference
from lazyfs.trace.schema import PrefetchGroups, decode_groups
from lazyfs_tools.transfer import fetch, is_registry_ref, push, registry_name, select_platform

LazyFormat = Literal["zstd:chunked", "estargz"]
WRITERS: dict[str, Callable[..., LayerResult]] = {
    "zstd:chunked": zstdchunked.write_layer,
    "estargz": estargz.write_layer,
}
# Annotations that describe a layer's old encoding and must not survive re-encoding.
_STALE = {
    oci.ANN_ESTARGZ_TOC_DIGEST,
    oci.ANN_ESTARGZ_UNCOMPRESSED_SIZE,
    oci.ANN_ZSTD_CHECKSUM,
    oci.ANN_ZSTD_POSITION,
    oci.ANN_ZSTD_CHECKSUM_OLD,
    oci.ANN_ZSTD_POSITION_OLD,
    oci.ANN_ZSTD_TARSPLIT_POSITION,
    oci.ANN_LAZYFS_PREFETCH_RANGE,
    "io.github.containers.zstd-chunked.tarsplit-checksum",  # older containers/storage
}


# Manifest annotations of an image converted with --prefetch: which groups shaped its layers.
ANN_PREFETCH_GROUPS = "dev.lazyfs.prefetch-groups.digest"
ANN_PREFETCH_GROUP = "dev.lazyfs.prefetch-group"
COPY_PIECE = 1 << 20


class ConvertReport(msgspec.Struct):
    digest: str  # of the top-level manifest or index
    layers: int = 0
    bytes_in: int = 0  # uncompressed tar bytes
    bytes_out: int = 0
    prefetch_entries: int = 0  # files moved to the front of their layer (--prefetch)
    # "DIFF_ID: why" for zstd:chunked layers left without a tar-split (newer podman pulls them
    # whole): inputs containers/storage could not represent either.
    no_tar_split: list[str] = []


@dataclass(frozen=True)
class Prefetch:
    """The group that orders the layers, and where it came from (for the annotations)."""

    groups: PrefetchGroups
    name: str
    digest: str  # sha256 of the groups file

    def by_layer(self) -> dict[str, list[tuple[str, int]]]:
        """Layer digest → (path, size) in rank order, every tier in turn."""
        out: dict[str, list[tuple[str, int]]] = {}
        for tier in self.groups.group(self.name).tiers:
            for e in tier.entries:
                out.setdefault(e.layer, []).append((e.path, e.size))
        return out


@dataclass
class _Member:
    name: str
    type: str
    link: str
    size: int
    start: int  # in the spool: header, content and padding
    end: int


def _spool(plain: BinaryIO, spool: BinaryIO, where: str) -> tuple[list[_Member], bytes, str]:
    """Copy an uncompressed tar to ``spool`` indexing its members; returns the members, the
    end-of-archive bytes and the source tar's sha256 (its diff_id)."""
    sha = hashlib.sha256()
    members: list[_Member] = []
    reader = TarReader(plain, where=where)

    def put(data: bytes) -> None:
        sha.update(data)
        spool.write(data)

    for m in reader:
        start = spool.tell()
        put(m.header)
        while data := reader.read(COPY_PIECE):
            put(data)
        put(reader.take_padding())
        e = m.entry
        members.append(_Member(e.name, e.type, e.link_name, m.size, start, spool.tell()))
    put(reader.trailer)
    return members, reader.trailer, "sha256:" + sha.hexdigest()


def landmark(name: str) -> bytes:
    """A one-byte regular file marking the end of (or the absence of) a prefetch region."""
    info = tarfile.TarInfo(name)
    info.size = len(estargz.LANDMARK_CONTENT)
    info.mode = 0o644
    data = estargz.LANDMARK_CONTENT
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % BLOCK)


def reorder(
    spool: BinaryIO, members: list[_Member], trailer: bytes, wanted: list[tuple[str, int]]
) -> tuple[Iterator[bytes], int]:
    """The spooled tar with ``wanted`` files first (rank order), then ``.prefetch.landmark``
    (or ``.no.prefetch.landmark`` first when none of them is here), then everything else in
    source order.  A file's parent directories move with it (once); a wanted hardlink moves
    its target, so links still follow their targets.  Old landmarks are dropped."""
    last: dict[str, int] = {}
    dup: set[str] = set()
    for i, m in enumerate(members):
        if m.name in last:
            dup.add(m.name)  # moving one copy ahead of another would change which one wins
        last[m.name] = i
    order: list[int] = []
    taken: set[int] = set()
    for path, size in wanted:
        i = last.get(path)
        if i is not None and members[i].type == "hardlink":
            i = last.get(members[i].link)
        # Only regular files with the traced size: a stale group must not reshuffle others.
        if (
            i is None
            or i in taken
            or members[i].type != "reg"
            or members[i].size != size
            or members[i].name in dup
        ):
            continue
        parts = members[i].name.split("/")
        for k in range(1, len(parts)):
            d = last.get("/".join(parts[:k]))
            if d is not None and d < i and d not in taken and members[d].type == "dir":
                taken.add(d)
                order.append(d)
        taken.add(i)
        order.append(i)
    prefetched = sum(1 for i in order if members[i].type == "reg")

    def pieces() -> Iterator[bytes]:
        if not prefetched:
            yield landmark(estargz.NO_PREFETCH_LANDMARK)
        for i in order:
            yield from _copy(spool, members[i])
        if prefetched:
            yield landmark(estargz.PREFETCH_LANDMARK)
        for i, m in enumerate(members):
            if i not in taken and m.name not in estargz.LANDMARKS:
                yield from _copy(spool, m)
        yield trailer

    return pieces(), prefetched


def prefetch_end(blob: Path, res: LayerResult) -> int:
    """Where the written layer's prefetched files end (its landmark's first byte), read
    back from its TOC: the range a cold open requests beside the TOC."""
    with open(blob, "rb") as f:
        loc = toc_by_annotations(res.annotations, res.size)
        if loc is None:
            f.seek(res.size - TAIL_SIZE)
            loc = locate_toc(f.read(TAIL_SIZE), res.size, res.annotations)
        f.seek(loc.start)
        raw = f.read(loc.end - loc.start)
    return decode_layer_toc(loc, raw).prefetch_end


def _copy(spool: BinaryIO, m: _Member) -> Iterator[bytes]:
    spool.seek(m.start)
    left = m.end - m.start
    while left:
        data = spool.read(min(left, COPY_PIECE))
        if not data:
            raise FormatError(f"spooled tar ends early at {m.name!r}")
        left -= len(data)
        yield data


class _PieceReader:
    """A read()-able stream over an iterator of byte strings (what the writers consume)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            nxt = next(self._pieces, None)
            if nxt is None:
                break
            self._buf += nxt
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


class _Counting:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data


def _unembedded(desc: Mapping[str, Any]) -> dict[str, Any]:
    """A descriptor of the input whose content the conversion rewrites, without the content
    it may embed (image-spec's ``data``): kept beside the new digest, it would be the old
    content, which a reader that takes embedded bytes refuses or, worse, uses."""
    return {k: v for k, v in desc.items() if k != "data"}


class Converter:
    def __init__(
        self,
        src: Layout,
        dst: Layout,
        fmt: LazyFormat,
        chunk_size: int,
        prefetch: Prefetch | None = None,
        head_size: int = DEFAULT_HEAD_SIZE,
    ) -> None:
        if fmt not in WRITERS:
            raise FormatError(f"unknown format {fmt!r} (zstd:chunked or estargz)")
        self.src, self.dst, self.fmt = src, dst, fmt
        self.cuts = {"chunk_size": chunk_size, "head_size": head_size}  # the writers' keywords
        self.report = ConvertReport(digest="")
        self._layers: dict[str, tuple[LayerResult, str]] = {}
        self.prefetch = prefetch
        self._wanted = prefetch.by_layer() if prefetch else {}
        #: source layer digest → files to put first, for layers of a manifest the groups match
        self._plan: dict[str, list[tuple[str, int]]] = {}
        self.matched = False  # some manifest matched the groups' image

    def _plan_manifest(self, layers: list[oci.Descriptor]) -> None:
        """Match the groups' layers to this manifest's: by digest (SRC is the traced image),
        else by position when the counts agree (SRC is the image before its lazy conversion)."""
        if self.prefetch is None:
            return
        digests = [d.digest for d in layers]
        traced = self.prefetch.groups.layers
        if set(digests) & (set(self._wanted) | set(traced)):
            pairs = [(d, d) for d in digests]
        elif len(traced) == len(digests):
            pairs = list(zip(digests, traced, strict=True))
        else:
            return
        self.matched = True
        for mine, theirs in pairs:
            self._plan.setdefault(mine, self._wanted.get(theirs, []))

    def _write(self, plain: BinaryIO, out: Any, where: str, landmarks: bool) -> LayerResult:
        if self.fmt == "estargz":
            return estargz.write_layer(plain, out, **self.cuts, where=where, landmarks=landmarks)
        return WRITERS[self.fmt](plain, out, **self.cuts, where=where)

    def _reordered_layer(
        self, desc: oci.Descriptor, wanted: list[tuple[str, int]]
    ) -> tuple[LayerResult, str, int]:
        """Two passes: spool the decompressed tar to disk (indexing members), then feed the
        writer the prioritized members followed by the rest: memory stays bounded."""
        where = f"layer {desc.digest}"
        with (
            tempfile.TemporaryFile(dir=self.dst.root) as spool,
            self.src.open_blob(desc.digest) as raw,
            self.dst.blob_writer() as out,
        ):
            hashed = HashingReader(raw)
            try:
                plain = decompressing(hashed, desc.mediaType)  # type: ignore[arg-type]
                members, trailer, source_diff = _spool(plain, spool, where)  # type: ignore[arg-type]
                hashed.drain()
            except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
                raise FormatError(f"{where}: corrupt or truncated: {e}") from e
            if hashed.digest != desc.digest:
                raise IntegrityError(f"{where}: blob content has digest {hashed.digest}")
            self.report.bytes_in += spool.tell()
            pieces, moved = reorder(spool, members, trailer, wanted)  # type: ignore[arg-type]
            res = self._write(_PieceReader(pieces), out, where, landmarks=True)  # type: ignore[arg-type]
            out.commit(res.digest)
        if moved:
            end = prefetch_end(self.dst.blob_path(res.digest), res)
            if end:
                res.annotations[oci.ANN_LAZYFS_PREFETCH_RANGE] = f"0:{end}"
        return res, source_diff, moved

    def _note(self, res: LayerResult, source: str) -> None:
        if res.no_tar_split:
            self.report.no_tar_split.append(f"{source}: {res.no_tar_split}")

    def layer(self, desc: oci.Descriptor) -> tuple[LayerResult, str]:
        """Convert one layer; returns the result and the source's uncompressed digest."""
        if desc.digest in self._layers:
            return self._layers[desc.digest]
        wanted = self._plan.get(desc.digest)
        # A zstd:chunked layer with nothing to prefetch stays byte-identical to a plain
        # conversion (a shared base layer keeps its digest); eStargz marks it, as ctr-remote.
        if wanted is not None and (wanted or self.fmt == "estargz"):
            res, source_diff, moved = self._reordered_layer(desc, wanted)
            self._note(res, desc.digest)
            self.report.layers += 1
            self.report.bytes_out += res.size
            self.report.prefetch_entries += moved
            self._layers[desc.digest] = (res, source_diff)
            return res, source_diff
        where = f"layer {desc.digest}"
        with self.src.open_blob(desc.digest) as raw, self.dst.blob_writer() as out:
            hashed = HashingReader(raw)
            plain = _Counting(decompressing(hashed, desc.mediaType))  # type: ignore[arg-type]
            try:
                res = WRITERS[self.fmt](plain, out, **self.cuts, where=where)
                hashed.drain()  # a blob with trailing garbage still has to match its digest
            except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
                raise FormatError(f"{where}: corrupt or truncated: {e}") from e
            if hashed.digest != desc.digest:
                raise IntegrityError(f"{where}: blob content has digest {hashed.digest}")
            out.commit(res.digest)
        self._note(res, desc.digest)
        self.report.layers += 1
        self.report.bytes_in += plain.count
        self.report.bytes_out += res.size
        source_diff = res.diff_id if self.fmt == "zstd:chunked" else ""
        self._layers[desc.digest] = (res, source_diff)
        return res, source_diff

    def manifest(self, desc: oci.Descriptor) -> oci.Descriptor:
        raw = self.src.read_blob(desc.digest)
        manifest = oci.decode_manifest(raw)
        doc: dict[str, Any] = msgspec.json.decode(raw)
        config_raw = self.src.read_blob(manifest.config.digest)
        config = oci.decode_config(config_raw)
        if len(config.rootfs.diff_ids) != len(manifest.layers):
            raise FormatError(
                f"manifest {desc.digest}: {len(manifest.layers)} layers but "
                f"{len(config.rootfs.diff_ids)} diff_ids"
            )
        self._plan_manifest(manifest.layers)
        # Layers convert in parallel: zlib, zstd and sha256 release the GIL, so two threads
        # keep both cores busy on a multi-layer image.  (A batch tool, not the trio runtime.)
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            unique = {d.digest: d for d in manifest.layers}
            done = dict(zip(unique, pool.map(self.layer, unique.values()), strict=True))
        results = [done[d.digest] for d in manifest.layers]
        new_layers = []
        diff_ids = []
        for old, want, (res, source_diff) in zip(
            doc["layers"], config.rootfs.diff_ids, results, strict=True
        ):
            if source_diff and source_diff != want:
                raise IntegrityError(
                    f"layer {old['digest']}: uncompressed digest {source_diff} does not match "
                    f"the config's diff_id {want}"
                )
            ann = {k: v for k, v in (old.get("annotations") or {}).items() if k not in _STALE}
            ann.update(res.annotations)
            new_layers.append(
                {
                    **_unembedded(old),
                    "mediaType": res.media_type,
                    "digest": res.digest,
                    "size": res.size,
                    "annotations": dict(sorted(ann.items())),
                }
            )
            diff_ids.append(res.diff_id)
        config_doc: dict[str, Any] = msgspec.json.decode(config_raw)
        config_doc["rootfs"]["diff_ids"] = diff_ids
        cdesc = self.dst.write_blob(msgspec.json.encode(config_doc))
        doc["config"] = {**_unembedded(doc["config"]), "digest": cdesc.digest, "size": cdesc.size}
        doc["layers"] = new_layers
        if (
            doc.get("mediaType") == oci.MT_DOCKER_MANIFEST
            or desc.mediaType == oci.MT_DOCKER_MANIFEST
        ):
            # zstd layers are not expressible in Docker schema2; the result is an OCI manifest.
            doc["mediaType"] = oci.MT_OCI_MANIFEST
            doc["config"]["mediaType"] = oci.MT_OCI_CONFIG
        if self.prefetch is not None and any(d.digest in self._plan for d in manifest.layers):
            doc["annotations"] = {
                **(doc.get("annotations") or {}),
                ANN_PREFETCH_GROUPS: self.prefetch.digest,
                ANN_PREFETCH_GROUP: self.prefetch.name,
            }
        mdesc = self.dst.write_blob(msgspec.json.encode(doc))
        return oci.Descriptor(
            mediaType=doc.get("mediaType") or oci.MT_OCI_MANIFEST,
            digest=mdesc.digest,
            size=mdesc.size,
            annotations=desc.annotations,
            platform=desc.platform,
        )

    def index(self, desc: oci.Descriptor) -> oci.Descriptor:
        raw = self.src.read_blob(desc.digest)
        oci.decode_index(raw)
        doc: dict[str, Any] = msgspec.json.decode(raw)
        children = []
        for child in doc["manifests"]:
            cd = msgspec.convert(child, oci.Descriptor)
            new = self.any(cd)
            children.append(
                {
                    **_unembedded(child),
                    "mediaType": new.mediaType,
                    "digest": new.digest,
                    "size": new.size,
                }
            )
        doc["manifests"] = children
        if doc.get("mediaType") == oci.MT_DOCKER_LIST:
            doc["mediaType"] = oci.MT_OCI_INDEX
        idesc = self.dst.write_blob(msgspec.json.encode(doc))
        return oci.Descriptor(
            mediaType=doc.get("mediaType") or oci.MT_OCI_INDEX,
            digest=idesc.digest,
            size=idesc.size,
            annotations=desc.annotations,
        )

    def any(self, desc: oci.Descriptor) -> oci.Descriptor:
        if desc.mediaType in oci.INDEX_TYPES:
            return self.index(desc)
        if desc.mediaType in oci.MANIFEST_TYPES:
            return self.manifest(desc)
        # Attestations and other artifacts are copied unchanged.
        self.dst.write_blob(self.src.read_blob(desc.digest))
        return desc


def convert(
    src_ref: str,
    dst_ref: str,
    *,
    fmt: LazyFormat = "zstd:chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_size: int = DEFAULT_HEAD_SIZE,
    prefetch: str | os.PathLike[str] | None = None,
    group: str | None = None,
    plain_http: bool = False,
    insecure: bool = False,
    hosts_dir: str | os.PathLike[str] | None = None,
    platform: str | None = None,
) -> ConvertReport:
    """Convert ``src_ref`` into ``dst_ref``: each ``oci:DIR[:TAG]`` or a registry reference
    (``docker://`` prefix optional, as skopeo users type it).  ``prefetch``: a prefetch-groups
    file; each layer's entries of ``group`` (default: the first) go first, in rank order, then a
    landmark.  ``chunk_size``, ``head_size``: how files are cut (framing.chunk_cuts).
    ``platform``: convert only that image of a multi-platform index (default: all).
    ``hosts_dir``: registry mirrors (containerd's hosts.toml directory), as every command reads
    them."""
    if chunk_size < 4096:
        raise FormatError(f"chunk size {chunk_size} is below the 4096-byte minimum")
    if 0 < head_size < 4096:
        raise FormatError(f"head chunk size {head_size} is below the 4096-byte minimum")
    src_remote, dst_remote = is_registry_ref(src_ref), is_registry_ref(dst_ref)
    if not (src_remote or dst_remote):
        return _convert_layouts(
            src_ref, dst_ref, fmt, (chunk_size, head_size), prefetch, group, platform
        )
    net = {"plain_http": plain_http, "insecure": insecure, "hosts_dir": hosts_dir}
    with tempfile.TemporaryDirectory(prefix="lazyfs-convert-") as tmp:
        src_local, dst_local = src_ref, dst_ref
        if src_remote:
            fetch(src_ref, Layout(Path(tmp, "src")), platform=platform, **net)
            src_local, platform = f"oci:{Path(tmp, 'src')}", None
            tag = parse_reference(registry_name(src_ref)).tag
            if not dst_remote and tag and parse_oci_ref(dst_ref)[1] is None:
                dst_local = f"{dst_ref}:{tag}"  # the tag the image had, as skopeo keeps it
        if dst_remote:
            dst_local = f"oci:{Path(tmp, 'dst')}"
        report = _convert_layouts(
            src_local, dst_local, fmt, (chunk_size, head_size), prefetch, group, platform
        )
        if dst_remote:
            out = Layout(Path(tmp, "dst"))
            top = out.find(None)
            report.digest = push(out, top, dst_ref, **net)
        return report


def _convert_layouts(
    src_ref: str,
    dst_ref: str,
    fmt: LazyFormat,
    cuts: tuple[int, int],
    prefetch: str | os.PathLike[str] | None,
    group: str | None,
    platform: str | None,
) -> ConvertReport:
    plan = _load_prefetch(Path(prefetch), group) if prefetch is not None else None
    src_dir, src_tag = parse_oci_ref(src_ref)
    dst_dir, dst_tag = parse_oci_ref(dst_ref)
    src = Layout(src_dir)
    top = src.find(src_tag)
    if platform is not None and top.mediaType in oci.INDEX_TYPES:
        index = oci.decode_index(src.read_blob(top.digest))
        top = msgspec.structs.replace(
            select_platform(index, platform, src_ref), annotations=top.annotations
        )
    existing = _existing_layout(dst_dir)
    # A new layout is built beside its place and renamed in, so a failure leaves nothing; an
    # existing one gets the blobs (content-addressed, each written atomically) and then the
    # tag, as skopeo and umoci add a tag: a failure leaves unreferenced blobs at worst.
    staging = dst_dir.parent / f".{dst_dir.name}.partial-{os.getpid()}"
    dst = Layout(dst_dir if existing else staging)
    if not existing:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        dst.init()
        conv = Converter(src, dst, fmt, cuts[0], plan, head_size=cuts[1])
        new = conv.any(top)
        if plan is not None and not conv.matched:
            raise FormatError(
                f"prefetch groups are for manifest {plan.groups.manifest}, whose layers are "
                f"not those of {src_ref}"
            )
        tag = dst_tag or src_tag or (top.annotations or {}).get(oci.ANN_REF_NAME) or "latest"
        ann = {**(new.annotations or {}), oci.ANN_REF_NAME: tag}
        tagged = oci.Descriptor(
            mediaType=new.mediaType, digest=new.digest, size=new.size, annotations=ann
        )
        others = [
            d
            for d in (dst.index().manifests if existing else [])
            if (d.annotations or {}).get(oci.ANN_REF_NAME) != tag
        ]
        dst.write_index(
            oci.Index(schemaVersion=2, mediaType=oci.MT_OCI_INDEX, manifests=[*others, tagged])
        )
        conv.report.digest = new.digest
        if not existing:
            if dst_dir.exists():
                dst_dir.rmdir()  # empty, checked by _existing_layout
            os.replace(staging, dst_dir)
    except BaseException:
        if not existing:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return conv.report


def _existing_layout(path: Path) -> bool:
    """True for an OCI layout (a tag is added to it), False for a missing or empty directory
    (a new layout is made); anything else is refused rather than mixed into."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    if (path / "oci-layout").is_file() and (path / "index.json").is_file():
        return True
    raise FormatError(f"{path}: exists and is not an OCI layout")


def _load_prefetch(path: Path, group: str | None) -> Prefetch:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LazyfsError(f"{path}: {e.strerror or e}") from None
    groups = decode_groups(data, what=str(path))
    name = groups.group(group).name  # a missing group is an error before any work
    return Prefetch(groups=groups, name=name, digest=oci.sha256_digest(data))


__all__ = ["ConvertReport", "LazyfsError", "convert"]
