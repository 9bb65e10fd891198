"""``lazyfs diff`` (what an update costs a node that holds the old image) and ``lazyfs delta``
(binary patches published beside the new image)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from lazyfs.errors import LazyfsError

from .common import add_cache_args, add_registry_args

if TYPE_CHECKING:
    from lazyfs.delta.report import DiffReport
    from lazyfs.opener import OpenedImage

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("diff", help="what a node holding OLD must fetch to run NEW")
    p.add_argument("old", metavar="OLD", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("new", metavar="NEW", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    add_cache_args(p)
    add_registry_args(p)
    p.set_defaults(handler=diff_cmd)

    p = sub.add_parser("delta", help="binary patches from OLD's files to NEW's, stored with NEW")
    p.add_argument("old", metavar="OLD", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("new", metavar="NEW", help="registry reference or oci:DIR[:TAG]")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--push", action="store_true", help="store them in NEW's repository")
    where.add_argument("--out", metavar="oci:DIR", help="write them into an OCI layout")
    p.add_argument("--level", type=int, default=19, help="zstd level of the patches (1-22)")
    p.add_argument("--json", action="store_true", help="a JSON summary")
    add_cache_args(p)
    add_registry_args(p)
    p.set_defaults(handler=delta_cmd)


def _opened(
    args: argparse.Namespace, body: Callable[[OpenedImage, OpenedImage], Awaitable[T]]
) -> T:
    import trio

    from lazyfs.opener import open_image

    opts = {
        "cache_dir": args.cache,
        "cache_size": args.cache_size,
        "plain_http": args.plain_http,
        "insecure": args.insecure,
        "platform": args.platform,
    }

    async def run() -> T:
        async with open_image(args.old, **opts) as old, open_image(args.new, **opts) as new:
            return await body(old, new)

    return trio.run(run)


async def diff_images(old: OpenedImage, new: OpenedImage) -> DiffReport:
    """The update report for ``lazyfs pull NEW`` on a node that holds OLD."""
    from lazyfs.delta.report import ImageLayers, diff

    def side(img: OpenedImage) -> ImageLayers:
        return ImageLayers(
            img.image, img.manifest, [(ol.descriptor.size, ol.layer) for ol in img.layers]
        )

    store = new.store
    return diff(side(old), side(new), store.merge_gap, store.max_request)


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(x) < 1024:
            return f"{n}B" if unit == "B" else f"{x:.1f}{unit}"
        x /= 1024
    return f"{x:.1f}GiB"


def diff_cmd(args: argparse.Namespace) -> int:
    async def body(old: OpenedImage, new: OpenedImage) -> DiffReport:
        return await diff_images(old, new)

    report = _opened(args, body)
    if args.json:
        print(json.dumps(msgspec.to_builtins(report), indent=1, sort_keys=True))
        return 0
    print(
        f"{'layer':<19} {'size':>9} {'held':>9} {'fetch':>9} {'changed':>7} {'new':>6} {'same':>6}"
    )
    for ld in report.layers:
        print(
            f"{ld.digest[7:19]:<12}{' (old)' if ld.shared else '':<7} {_size(ld.size):>9} "
            f"{_size(ld.held_bytes):>9} {_size(ld.fetch_bytes):>9} {ld.files_changed:>7} "
            f"{ld.files_new:>6} {ld.files_unchanged:>6}"
        )
    print(
        f"fetch {_size(report.fetch_bytes)} to run {report.new} holding {report.old} "
        f"(a pull of the changed layers: {_size(report.full_pull_bytes)}; "
        f"{report.files_removed} files removed)"
    )
    for src, n in sorted(report.saved_by.items(), key=lambda kv: -kv[1]):
        side, _, digest = src.partition(":")
        print(f"  saved {_size(n):>9} by chunks of {side} layer {digest[:19]}")
    return 0


def delta_cmd(args: argparse.Namespace) -> int:
    if not 1 <= args.level <= 22:
        raise LazyfsError("--level must be 1..22")
    if args.push and args.new.startswith("oci:"):
        raise LazyfsError(f"--push needs a registry reference, not {args.new!r}")
    if args.out is not None and not args.out.startswith("oci:"):
        raise LazyfsError(f"--out takes oci:DIR, not {args.out!r}")

    async def body(old: OpenedImage, new: OpenedImage) -> dict[str, str | int | float]:
        from lazyfs import oci
        from lazyfs.delta.publish import build_deltas, push_deltas, write_deltas
        from lazyfs.remote.registry import RegistrySource
        from lazyfs.remote.resolve import open_source

        t0 = time.monotonic()
        deltas = await build_deltas(old, new, args.level)
        if args.push:
            source, _ = open_source(args.new, plain_http=args.plain_http, insecure=args.insecure)
            assert isinstance(source, RegistrySource)
            try:
                digest = await push_deltas(source, deltas)
            finally:
                await source.aclose()
        else:
            data, media_type, _ = await new.source.get_manifest(new.manifest)
            subject = oci.Descriptor(mediaType=media_type, digest=new.manifest, size=len(data))
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            digest = write_deltas(Path(args.out[4:]), deltas, subject, created)
        return {
            "artifact": digest,
            "manifest": new.manifest,
            "base_manifest": old.manifest,
            "files": len(deltas.index.files),
            "files_considered": deltas.files_considered,
            "chunk_bytes": deltas.chunk_bytes,
            "patch_bytes": deltas.patch_bytes,
            "seconds": round(time.monotonic() - t0, 3),
        }

    summary = _opened(args, body)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        patch, chunks = int(summary["patch_bytes"]), int(summary["chunk_bytes"])
        print(
            f"{summary['files']} patches ({_size(patch)}) instead of {_size(chunks)} of chunks; "
            f"stored as {summary['artifact']}"
        )
    sys.stdout.flush()
    return 0
