"""``lazyfs convert`` and ``lazyfs inspect``."""

from __future__ import annotations

import argparse
import sys

import msgspec

from lazyfs.formats.zstdchunked import DEFAULT_CHUNK_SIZE


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="rewrite an image's layers into a lazy format")
    p.add_argument("src", metavar="SRC", help="source image: oci:DIR[:TAG]")
    p.add_argument("dst", metavar="DST", help="destination image: oci:DIR[:TAG] (must not exist)")
    p.add_argument("--format", choices=("zstd:chunked", "estargz"), default="zstd:chunked")
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="split files larger than N bytes (default 4MiB; k/m suffixes)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=convert_cmd)


def convert_cmd(args: argparse.Namespace) -> int:
    from lazyfs_tools.convert import convert

    report = convert(args.src, args.dst, fmt=args.format, chunk_size=args.chunk_size)
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        ratio = report.bytes_out / report.bytes_in if report.bytes_in else 0.0
        print(
            f"{args.dst}: {report.digest} ({report.layers} layers, "
            f"{report.bytes_in} bytes of tar -> {report.bytes_out} bytes, {ratio:.1%})"
        )
    return 0
