"""``lazyfs convert`` and ``lazyfs inspect``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import msgspec

from lazyfs.formats.framing import DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_SIZE

if TYPE_CHECKING:
    from lazyfs.formats.toc import Entry

from .common import add_registry_args, not_lazy_line, parse_size, plain_kind, registry_options


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="rewrite an image's layers into a lazy format")
    p.add_argument(
        "src", metavar="SRC", help="source image: oci:DIR[:TAG] or [docker://]REGISTRY/REPO:TAG"
    )
    p.add_argument(
        "dst",
        metavar="DST",
        help="destination: oci:DIR[:TAG] (a new layout, or a tag added to an existing one) or "
        "[docker://]REGISTRY/REPO:TAG (pushed: exactly the blobs written)",
    )
    p.add_argument(
        "--format",
        choices=("zstd:chunked", "estargz"),
        default="zstd:chunked",
        help="lazy layer format (default zstd:chunked: podman partial-pulls it)",
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="split files larger than N bytes (default 4MiB; k/m suffixes)",
    )
    p.add_argument(
        "--head-chunk-size",
        type=parse_size,
        default=DEFAULT_HEAD_SIZE,
        metavar="N",
        help="cut a larger file's first N bytes into a chunk of their own: a read there waits "
        "for that chunk only (default %(default)s: off; k/m suffixes)",
    )
    p.add_argument(
        "--prefetch",
        metavar="GROUPS.json",
        help="put each layer's files of a prefetch group first (lazyfs optimize output)",
    )
    p.add_argument("--group", metavar="NAME", help="which group of --prefetch (default: first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_registry_args(p, platform=False)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="convert only this image of an index"
    )
    which.add_argument(
        "--all-platforms",
        action="store_true",
        help="convert every image of an index (the default; skopeo's --all)",
    )
    p.set_defaults(handler=convert_cmd)
    register_inspect(sub)


def convert_cmd(args: argparse.Namespace) -> int:
    from lazyfs_tools.convert import convert

    from lazyfs.errors import LazyfsError

    if args.group is not None and args.prefetch is None:
        raise LazyfsError("--group needs --prefetch GROUPS.json")
    report = convert(
        args.src,
        args.dst,
        fmt=args.format,
        chunk_size=args.chunk_size,
        head_size=args.head_chunk_size,
        prefetch=args.prefetch,
        group=args.group,
        platform=args.platform,
        **registry_options(args),
    )
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        ratio = report.bytes_out / report.bytes_in if report.bytes_in else 0.0
        print(
            f"{args.dst}: {report.digest} ({report.layers} layers, "
            f"{report.bytes_in} bytes of tar -> {report.bytes_out} bytes, {ratio:.1%})"
            + (f", {report.prefetch_entries} files moved first" if args.prefetch else "")
        )
        # Such a layer still mounts lazily here; containers/storage 1.55+ pulls it whole.
        for why in report.no_tar_split:
            print(f"warning: no tar-split for {why}", file=sys.stderr)
    return 0


def register_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="print the TOC of an image or a layer blob")
    p.add_argument(
        "target",
        metavar="IMAGE|LAYER",
        help="registry reference, oci:DIR[:TAG], or a lazy layer blob file",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_registry_args(p)
    p.set_defaults(handler=inspect_cmd)


def inspect_cmd(args: argparse.Namespace) -> int:
    import hashlib
    import os

    import trio

    from lazyfs import oci
    from lazyfs.formats.layer import expected_toc_digest
    from lazyfs.formats.toc import TocBudget
    from lazyfs.remote.local import BlobFileSource
    from lazyfs.remote.resolve import open_source, resolve_image
    from lazyfs.store.tocs import LayerInfo, NotLazyError, load_layer

    async def load() -> list[LayerInfo | oci.Descriptor]:
        if os.path.isfile(args.target):
            size = os.path.getsize(args.target)
            with open(args.target, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            src = BlobFileSource(args.target, digest)
            desc = oci.Descriptor(mediaType="", digest=digest, size=size)
            # A bare blob has no manifest to promise a TOC digest: show it unverified.
            return [await load_layer(src, desc, None, verify=False)]
        source, ref = open_source(args.target, **registry_options(args))
        try:
            resolved = await resolve_image(source, ref, args.platform)
            budget = TocBudget()  # bounds the whole image, as a mount does
            out: list[LayerInfo | oci.Descriptor] = []
            for desc in resolved.layers:
                try:
                    out.append(await load_layer(source, desc, None, budget=budget))
                except NotLazyError:
                    lazy = any(
                        expected_toc_digest(desc.annotations, f)
                        for f in ("zstd:chunked", "estargz")
                    )
                    if lazy:  # it says it is lazy and is not: a broken image, not a plain one
                        raise
                    out.append(desc)  # a plain layer: shown as such, not an error
            return out
        finally:
            await source.aclose()

    layers = trio.run(load)
    if args.json:
        doc = [
            {"digest": li.descriptor.digest, "format": li.location.format, "lazy": True}
            | {"entries": li.toc.entries}
            if isinstance(li, LayerInfo)
            else {"digest": li.digest, "format": _plain_kind(li), "lazy": False, "entries": []}
            for li in layers
        ]
        sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
        return 0
    plain = 0
    for li in layers:
        if not isinstance(li, LayerInfo):
            plain += 1
            kind = _plain_kind(li)
            print(f"# layer {li.digest} ({kind}, NOT LAZY: no TOC; a mount fetches it whole)")
            continue
        n = len(li.toc.entries)
        print(f"# layer {li.descriptor.digest} ({li.location.format}, lazy, {n} entries)")
        for e in li.toc.entries:
            print(_row(e))
    if plain:  # on stderr, so the table stays parseable
        types = [d.mediaType for d in layers if not isinstance(d, LayerInfo)]
        consequence = "nothing can be read from them before they are fetched whole"
        print(not_lazy_line(args.target, len(layers), types, consequence), file=sys.stderr)
    return 0


def _plain_kind(desc: object) -> str:
    from lazyfs import oci

    assert isinstance(desc, oci.Descriptor)
    return plain_kind(desc.mediaType)


def _row(e: Entry) -> str:
    import stat
    import time

    kind = {
        "dir": "d",
        "symlink": "l",
        "char": "c",
        "block": "b",
        "fifo": "p",
        "hardlink": "h",
    }.get(e.type, "-")
    mode = kind + stat.filemode(e.mode)[1:]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    size = f"{e.dev_major},{e.dev_minor}" if e.type in ("char", "block") else str(e.size)
    name = e.name or "."
    if e.type == "symlink":
        name += f" -> {e.link_name}"
    elif e.type == "hardlink":
        name += f" link to {e.link_name}"
    chunks = f"{len(e.chunks)}c" if e.chunks else ""
    return f"{mode} {e.uid:>5}/{e.gid:<5} {size:>10} {chunks:>5} {when} {name}"
