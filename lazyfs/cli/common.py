"""Options several subcommands share, spelled and documented once."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from lazyfs.store.wholelayer import WholeFetch


def parse_size(text: str) -> int:
    """``4096``, ``64k``, ``4MiB``, ``10G`` → bytes (for argparse ``type=``)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


# Where containerd and ctr-remote read registry mirrors from: one hosts.toml per registry.
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"


def add_registry_args(p: argparse.ArgumentParser, *, platform: bool = True) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry")
    p.add_argument("--insecure", action="store_true", help="skip TLS verification")
    p.add_argument(
        "--hosts-dir",
        metavar="DIR",
        default=DEFAULT_HOSTS_DIR,
        help="mirrors and per-host TLS from DIR/HOST/hosts.toml, as containerd reads them "
        f"(default {DEFAULT_HOSTS_DIR}; a missing file means the registry itself)",
    )
    if platform:
        p.add_argument("--platform", default="linux/amd64", help="os/arch[/variant] of an index")


def registry_options(args: argparse.Namespace) -> dict[str, Any]:
    """The registry options of :func:`add_registry_args` as keyword arguments of
    ``open_image`` / ``open_source``."""
    return {"plain_http": args.plain_http, "insecure": args.insecure, "hosts_dir": args.hosts_dir}


def registry_argv(args: argparse.Namespace) -> list[str]:
    """The registry options again as command-line flags, for a daemon this command spawns."""
    out = ["--hosts-dir", args.hosts_dir]
    out += ["--plain-http"] * args.plain_http + ["--insecure"] * args.insecure
    return out


def add_cache_args(p: argparse.ArgumentParser, *, size_help: str | None = None) -> None:
    p.add_argument("--cache", metavar="DIR", help="chunk cache directory")
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help=size_help or "bound the chunk cache (default 10GiB)",
    )


def plain_kind(media_type: str) -> str:
    """A layer media type without a TOC as users know it: tar+gzip, tar+zstd, tar."""
    from lazyfs import oci

    return {"gzip": "tar+gzip", "zstd": "tar+zstd", "tar": "tar"}.get(
        oci.LAYER_TYPES.get(media_type, ""), media_type or "unknown"
    )


def not_lazy_line(image: str, total: int, media_types: list[str], consequence: str) -> str:
    """The one line ``inspect`` and ``mount`` print when layers of an image are not lazy: the
    usual cause is a push that let the registry's gzip blob stand in for the lazy one."""
    kinds = ", ".join(sorted({plain_kind(t) for t in media_types}))
    return (
        f"lazyfs: {len(media_types)} of {total} layers of {image} are plain ({kinds}), "
        f"not lazy: {consequence}; `lazyfs convert` makes them lazy, and "
        "`skopeo copy --preserve-digests` keeps them lazy when pushed"
    )


def whole_fetch_line(fetch: WholeFetch) -> str:
    """A progress line of a whole-layer download, at its start and at its end (or failure)."""
    from lazyfs.progress import human_bytes

    what = f"layer {fetch.digest[:19]} ({plain_kind(fetch.media_type)}, {human_bytes(fetch.size)})"
    if fetch.error is not None:
        return f"lazyfs: {what}: not fetched: {fetch.error}"
    if fetch.seconds is None:
        return f"lazyfs: {what}: fetching it whole"
    rate = fetch.size / fetch.seconds if fetch.seconds > 0 else 0
    return (
        f"lazyfs: {what}: fetched whole and verified in {fetch.seconds:.1f}s "
        f"({human_bytes(int(rate))}/s)"
    )
