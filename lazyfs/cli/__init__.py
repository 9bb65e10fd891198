"""The ``lazyfs`` command: argument parsing and output only.

Each subcommand lives in a small module that registers its parser and a handler returning an
exit code; the logic it calls is importable and tested without a terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lazyfs.errors import LazyfsError, first_error

from . import cache, delta, forks, imagecmds, mount, optimizecmd, pull, trace

MODULES = (imagecmds, mount, pull, cache, trace, optimizecmd, delta, forks)


class _VersionAction(argparse.Action):
    """``--version``; the package metadata is read only when asked (it costs import time)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("lazyfs")
        except PackageNotFoundError:  # a source tree that was never installed
            text = "unknown"
        print(f"lazyfs {text}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount OCI images lazily: run containers before they download."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # What was asked, as given: `lazyfs mount` hands it on to a fork server's child.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="lazyfs: %(levelname)s %(name)s: %(message)s",
    )
    try:
        try:
            return int(args.handler(args) or 0)
        except BaseExceptionGroup as group:  # from trio nurseries: report the first cause
            raise first_error(group) from None
    except LazyfsError as e:
        print(f"lazyfs: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141
    except OSError as e:  # a path the user gave that cannot be used: one line, not a trace
        where = f": {e.filename}" if e.filename else ""
        print(f"lazyfs: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
