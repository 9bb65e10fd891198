"""``lazyfs convert``: rewrite every layer of an OCI image into a lazy format.

The output is a complete OCI layout written beside the destination and renamed into place only
when everything succeeded, so a failure leaves nothing behind.  Manifests, configs and indexes
are edited as JSON documents (unknown fields kept), re-encoded deterministically.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

import msgspec
import zstandard

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.formats import estargz, zstdchunked
from lazyfs.formats.zstdchunked import DEFAULT_CHUNK_SIZE, LayerResult
from lazyfs_tools.layout import HashingReader, Layout, parse_oci_ref

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
}


class ConvertReport(msgspec.Struct):
    digest: str  # of the top-level manifest or index
    layers: int = 0
    bytes_in: int = 0  # uncompressed tar bytes
    bytes_out: int = 0


def _decompressing(f: BinaryIO, media_type: str) -> BinaryIO:
    kind = oci.LAYER_TYPES.get(media_type)
    if kind is None:
        raise FormatError(f"unknown layer media type {media_type!r}")
    if kind == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)  # type: ignore[return-value]
    return f


class _Counting:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data


class Converter:
    def __init__(self, src: Layout, dst: Layout, fmt: LazyFormat, chunk_size: int) -> None:
        if fmt not in WRITERS:
            raise FormatError(f"unknown format {fmt!r} (zstd:chunked or estargz)")
        self.src, self.dst, self.fmt, self.chunk_size = src, dst, fmt, chunk_size
        self.report = ConvertReport(digest="")
        self._layers: dict[str, tuple[LayerResult, str]] = {}

    def layer(self, desc: oci.Descriptor) -> tuple[LayerResult, str]:
        """Convert one layer; returns the result and the source's uncompressed digest."""
        if desc.digest in self._layers:
            return self._layers[desc.digest]
        where = f"layer {desc.digest}"
        with self.src.open_blob(desc.digest) as raw, self.dst.blob_writer() as out:
            hashed = HashingReader(raw)
            plain = _Counting(_decompressing(hashed, desc.mediaType))  # type: ignore[arg-type]
            try:
                res = WRITERS[self.fmt](plain, out, chunk_size=self.chunk_size, where=where)
                hashed.drain()  # a blob with trailing garbage still has to match its digest
            except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
                raise FormatError(f"{where}: corrupt or truncated: {e}") from e
            if hashed.digest != desc.digest:
                raise IntegrityError(f"{where}: blob content has digest {hashed.digest}")
            out.commit(res.digest)
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
                    **old,
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
        doc["config"] = {**doc["config"], "digest": cdesc.digest, "size": cdesc.size}
        doc["layers"] = new_layers
        if (
            doc.get("mediaType") == oci.MT_DOCKER_MANIFEST
            or desc.mediaType == oci.MT_DOCKER_MANIFEST
        ):
            # zstd layers are not expressible in Docker schema2; the result is an OCI manifest.
            doc["mediaType"] = oci.MT_OCI_MANIFEST
            doc["config"]["mediaType"] = oci.MT_OCI_CONFIG
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
                {**child, "mediaType": new.mediaType, "digest": new.digest, "size": new.size}
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
) -> ConvertReport:
    src_dir, src_tag = parse_oci_ref(src_ref)
    dst_dir, dst_tag = parse_oci_ref(dst_ref)
    if chunk_size < 4096:
        raise FormatError(f"chunk size {chunk_size} is below the 4096-byte minimum")
    if dst_dir.exists() and any(dst_dir.iterdir()):
        raise FormatError(f"{dst_dir}: destination exists and is not empty")
    src = Layout(src_dir)
    top = src.find(src_tag)
    staging = dst_dir.parent / f".{dst_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    dst = Layout(staging)
    try:
        dst.init()
        conv = Converter(src, dst, fmt, chunk_size)
        new = conv.any(top)
        tag = dst_tag or src_tag or (top.annotations or {}).get(oci.ANN_REF_NAME) or "latest"
        ann = {**(new.annotations or {}), oci.ANN_REF_NAME: tag}
        dst.write_index(
            oci.Index(
                schemaVersion=2,
                mediaType=oci.MT_OCI_INDEX,
                manifests=[
                    oci.Descriptor(
                        mediaType=new.mediaType, digest=new.digest, size=new.size, annotations=ann
                    )
                ],
            )
        )
        conv.report.digest = new.digest
        if dst_dir.exists():
            dst_dir.rmdir()  # empty, checked above
        os.replace(staging, dst_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return conv.report


__all__ = ["ConvertReport", "LazyfsError", "convert"]
