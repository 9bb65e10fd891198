"""``lazyfs pull``: bring every chunk of an image into the cache ahead of a mount."""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.errors import LazyfsError, first_error
from lazyfs.progress import MODES, PulledEvent, Renderer, choose_mode
from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES

from .common import add_cache_args, add_registry_args, registry_options

if TYPE_CHECKING:
    from lazyfs.store import Layer


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pull", help="fetch a whole image into the chunk cache")
    p.add_argument("image", metavar="IMAGE", help="registry reference or oci:DIR[:TAG]")
    add_cache_args(p)
    add_registry_args(p)
    p.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="auto: bars on a wide terminal, done/total on a narrow one, JSON lines otherwise",
    )
    p.set_defaults(handler=pull_cmd)


async def pull(
    image: str,
    renderer: Renderer,
    *,
    cache_dir: str | Path | None = None,
    cache_size: int = DEFAULT_MAX_BYTES,
    plain_http: bool = False,
    insecure: bool = False,
    hosts_dir: str | None = None,
    platform: str = "linux/amd64",
) -> PulledEvent:
    """Fetch every layer of ``image`` concurrently; chunks already cached cost nothing."""
    import trio

    from lazyfs.delta.provider import attach_deltas
    from lazyfs.opener import open_image

    t0 = time.monotonic()
    async with open_image(
        image,
        cache_dir=cache_dir,
        cache_size=cache_size,
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
        platform=platform,
    ) as img:
        cache, store = img.cache, img.store
        layers = img.unique_layers()  # a manifest may list one blob twice
        sizes = {c.digest: c.size for layer in layers for c in layer.chunks}
        needed = sum(sizes.values())
        if needed > cache.max_bytes:
            # The cache would evict this pull's own chunks to make room for the rest.
            raise LazyfsError(
                f"{image} needs {needed} bytes of cache, more than --cache-size {cache.max_bytes}"
            )
        await attach_deltas(img)  # patches against chunks held, when NEW has some
        for layer in layers:
            renderer.start(layer.stats)

        async def one(layer: Layer) -> None:
            await store.fetch_all(layer, renderer.update)
            if layer.stats.chunks_ready != layer.stats.chunks_total:
                raise LazyfsError(
                    f"layer {layer.blob_digest}: {layer.stats.chunks_ready} of "
                    f"{layer.stats.chunks_total} chunks cached after the pull"
                )
            renderer.finish(layer.stats)

        # Pinned for the pull: chunks cached long ago sit first in the LRU order and would
        # otherwise be the first evicted to make room for the ones this pull brings.
        with cache.pinned(sizes):
            try:
                async with trio.open_nursery() as nursery:
                    for layer in layers:
                        nursery.start_soon(one, layer)
            finally:
                renderer.close()
        return PulledEvent(
            image=image,
            manifest=img.manifest,
            layers=len(layers),
            bytes_total=needed,
            bytes_fetched=sum(layer.stats.bytes_fetched for layer in layers),
            seconds=round(time.monotonic() - t0, 3),
            bytes_held=sum(layer.stats.bytes_held for layer in layers),
            patch_bytes=sum(layer.stats.patch_bytes for layer in layers),
        )


def pull_cmd(args: argparse.Namespace) -> int:
    import trio

    out = sys.stdout
    width = shutil.get_terminal_size().columns
    mode = choose_mode(args.progress, out, width)
    renderer = Renderer(out, mode, width=width, live=out.isatty())
    opts = {
        "cache_dir": args.cache,
        "cache_size": args.cache_size,
        **registry_options(args),
        "platform": args.platform,
    }
    try:
        event = trio.run(functools.partial(pull, args.image, renderer, **opts))
    except Exception as e:
        # An OSError (say, an unwritable cache directory) may come wrapped in a nursery's
        # group: report it as one line, not a traceback.
        err = first_error(e)
        if isinstance(err, OSError):
            raise LazyfsError(f"{err.filename or args.image}: {err.strerror or err}") from None
        raise
    renderer.summary(event)
    return 0
