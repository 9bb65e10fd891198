"""``lazyfs optimize``: traces in, prefetch groups out (and optionally into the registry)."""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.atomic import atomic_write
from lazyfs.errors import LazyfsError

from .common import add_registry_args, registry_options

if TYPE_CHECKING:
    from lazyfs.trace.schema import PrefetchGroups


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("optimize", help="rank traced files into prefetch groups")
    p.add_argument("traces", metavar="TRACE", nargs="+", help="trace files (lazyfs trace output)")
    p.add_argument("--out", required=True, metavar="GROUPS.json", help="where to write the groups")
    p.add_argument(
        "--window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="start-up window: files first read later than this go to the 'rest' tier (30)",
    )
    p.add_argument(
        "--push",
        metavar="IMAGE",
        help="also store the groups in IMAGE's repository as an OCI artifact referring to it",
    )
    p.add_argument(
        "--ranges",
        metavar="IMAGE",
        help="write each group's first byte ranges per layer, from IMAGE's TOCs, so a cold "
        "mount requests them beside the TOCs (default: the --push image; 'none': not)",
    )
    add_registry_args(p, platform=False)
    p.set_defaults(handler=optimize_cmd)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise LazyfsError(f"{path}: {e.strerror or e}") from None


def optimize_cmd(args: argparse.Namespace) -> int:
    from lazyfs.trace.optimize import optimize
    from lazyfs.trace.schema import decode_trace, encode

    if args.window < 0:
        raise LazyfsError("--window must not be negative")
    traces = [decode_trace(_read(p), what=p) for p in args.traces]
    groups = optimize(traces, window_ns=int(args.window * 1e9))
    ranges_from = args.ranges or args.push
    if ranges_from and ranges_from != "none":
        import trio

        try:
            trio.run(functools.partial(add_requests, groups, ranges_from, **registry_options(args)))
        except LazyfsError as e:  # a hint for cold mounts: the groups are whole without it
            print(f"{ranges_from}: no byte ranges written: {e}", file=sys.stderr)
    data = encode(groups)
    out = Path(args.out)
    try:
        atomic_write(out.absolute(), data)
    except OSError as e:
        raise LazyfsError(f"{out}: {e.strerror or e}") from None
    counts = ", ".join(
        f"{g.name}: {'/'.join(str(len(t.entries)) for t in g.tiers)}" for g in groups.groups
    )
    print(f"{out}: {len(groups.groups)} groups from {len(traces)} traces ({counts})")
    if args.push:
        digest = push_to(args.push, groups.manifest, data, **registry_options(args))
        print(f"{args.push}: prefetch groups stored as {digest} (subject {groups.manifest})")
    return 0


def push_to(
    image: str,
    manifest_digest: str,
    data: bytes,
    *,
    plain_http: bool = False,
    insecure: bool = False,
    hosts_dir: str | None = None,
) -> str:
    import trio

    from lazyfs.remote.referrers import subject_descriptor
    from lazyfs.remote.registry import RegistrySource
    from lazyfs.remote.resolve import open_source
    from lazyfs.trace.stored import push_groups

    if image.startswith("oci:"):
        raise LazyfsError(f"--push needs a registry reference, not {image!r}")

    async def run() -> str:
        source, _ = open_source(
            image, plain_http=plain_http, insecure=insecure, hosts_dir=hosts_dir
        )
        assert isinstance(source, RegistrySource)
        try:
            # The subject is the manifest the traces were recorded on, fetched by digest from
            # IMAGE's repository: this also checks the traces belong to that repository.
            subject = await subject_descriptor(source, manifest_digest)
            return await push_groups(source, subject, data)
        finally:
            await source.aclose()

    digest = trio.run(run)
    sys.stdout.flush()
    return digest


async def add_requests(groups: PrefetchGroups, image: str, **registry: Any) -> None:
    """Give each group the requests its prefetch sends first (``Group.requests``), planned on
    ``image``'s TOCs (the image the traces were recorded on, by its manifest digest)."""
    from lazyfs.fs.prefetch import Prefetcher
    from lazyfs.opener import open_image

    with tempfile.TemporaryDirectory(prefix="lazyfs-optimize-") as cache:
        async with open_image(image, cache_dir=cache, background=True, **registry) as opened:
            if opened.manifest != groups.manifest:
                # A tag moved since the traces: their groups still match by path and digest
                # (the prefetch's fallback), but these blobs' ranges would be another's.
                print(
                    f"{image} is now {opened.manifest}, not the traced {groups.manifest}: "
                    "no byte ranges written",
                    file=sys.stderr,
                )
                return
            layers = opened.store_layers()
            store = opened.store
            for group in groups.groups:
                prefetcher = Prefetcher(store, layers, group)
                group.requests = prefetcher.first_requests(store.merge_gap, store.max_request)
