"""``lazyfs cache du`` and ``lazyfs cache prune``: look at and shrink the chunk cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from lazyfs.progress import human_bytes
from lazyfs.store.chunkcache import CacheUsage, PruneResult

from .common import add_cache_args, parse_size

# Opening a ChunkCache evicts down to its bound; these commands must not evict by accident
# (a mount may run with a larger --cache-size than the default), so they open it unbounded.
_UNBOUNDED = 1 << 62


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="chunk cache usage and cleanup")
    cmds = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    du = cmds.add_parser("du", help="how much the cache holds")
    add_cache_args(du, size_help="the bound to report as max (not recorded; default 10GiB)")
    du.add_argument("--json", action="store_true", help="machine-readable output")
    du.set_defaults(handler=du_cmd)

    prune = cmds.add_parser("prune", help="evict least recently used chunks")
    prune.add_argument("--cache", metavar="DIR", help="chunk cache directory")
    prune.add_argument(
        "--to",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="keep at most SIZE bytes (default 0: everything not pinned goes)",
    )
    prune.add_argument("--json", action="store_true", help="machine-readable output")
    prune.set_defaults(handler=prune_cmd)


def _cache_dir(arg: str | None) -> Path:
    from lazyfs.store.chunkcache import default_cache_dir

    return Path(arg) if arg is not None else default_cache_dir()


def du_cmd(args: argparse.Namespace) -> int:
    from lazyfs.store.chunkcache import ChunkCache

    d = _cache_dir(args.cache)
    if d.is_dir():
        cache = ChunkCache(d, _UNBOUNDED)
        cache.max_bytes = args.cache_size  # reported only: nothing is evicted by du
        usage = cache.du()
    else:  # looking must not create the directory
        usage = CacheUsage(
            dir=str(d), chunks=0, bytes=0, max_bytes=args.cache_size, pinned=0, layer_maps=0
        )
    if args.json:
        sys.stdout.write(msgspec.json.encode(usage).decode() + "\n")
        return 0
    pct = 100.0 * usage.bytes / usage.max_bytes if usage.max_bytes else 0.0
    print(
        f"{usage.dir}: {usage.chunks} chunks, {human_bytes(usage.bytes)} of "
        f"{human_bytes(usage.max_bytes)} max ({pct:.1f}%), {usage.layer_maps} layer maps"
    )
    return 0


def prune_cmd(args: argparse.Namespace) -> int:
    from lazyfs.store.chunkcache import ChunkCache

    d = _cache_dir(args.cache)
    if d.is_dir():
        # Pins live in the processes that hold them, so from here nothing is pinned; a mount
        # whose chunk disappears re-fetches it on the next read.
        result = ChunkCache(d, _UNBOUNDED).prune(args.to)
    else:
        result = PruneResult(removed=0, freed_bytes=0, bytes=0)
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return 0
    print(
        f"{d}: freed {human_bytes(result.freed_bytes)} ({result.freed_bytes} bytes, "
        f"{result.removed} chunks); {human_bytes(result.bytes)} remain"
    )
    return 0
