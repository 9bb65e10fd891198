"""``lazyfs optimize``: traces in, prefetch groups out (and optionally into the registry)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lazyfs.atomic import atomic_write
from lazyfs.errors import LazyfsError

from .common import add_registry_args, registry_options


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
