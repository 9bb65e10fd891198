"""The ``lazyfs`` command: argument parsing and output only.

Each subcommand lives in a small module that registers its parser and a handler returning an
exit code; the logic it calls is importable and tested without a terminal.  Importing this
package imports none of them: ``lazyfs mount`` first asks a running fork server to do the
whole command (see :func:`main`), and that costs only the interpreter's start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lazyfs.errors import LazyfsError, first_error


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


#: The parser :func:`keep_parser` built ahead, which :func:`parser` hands out (else None).
_kept: argparse.ArgumentParser | None = None


def keep_parser() -> None:
    """Build the parser now and have :func:`parser` return that one from then on: a fork
    server's, before it forks.  Each child then parses its command line with it instead of
    building its own (twice: to name itself, then to run; 5-9 ms each on a forked mount's
    way to readiness, the ``_()`` of every help text looking for message catalogues)."""
    global _kept
    _kept = build_parser()


def parser() -> argparse.ArgumentParser:
    """The parser kept by :func:`keep_parser`, or a new one (argparse parsers keep no state
    between ``parse_args`` calls)."""
    return _kept if _kept is not None else build_parser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount OCI images lazily: run containers before they download."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import cache, delta, forks, imagecmds, mount, optimizecmd, pull, trace

    for module in (imagecmds, mount, pull, cache, trace, optimizecmd, delta, forks):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lazyfs`` command.  Run as a program (``argv`` None), ``lazyfs mount`` is done by
    a fork of a running ``lazyfs serve-forks`` when one listens at the default socket: the
    same command, without importing trio, pyfuse3, httpx and lazyfs here first."""
    if argv is None:
        from lazyfs.fs.forkserver import run_in_server

        code = run_in_server(sys.argv[1:])
        if code is not None:
            return code
    return run(argv)


def run(argv: Sequence[str] | None = None) -> int:
    """The ``lazyfs`` command in this process."""
    import logging

    args = parser().parse_args(argv)
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
