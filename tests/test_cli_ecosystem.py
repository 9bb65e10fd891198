"""The CLI as a newcomer meets it: help on every option, ``--version``, mirrors from every
command, errors that name their cause, and mount flags that cannot contradict each other."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from lazyfs.cli import build_parser
from lazyfs.testing.mounts import lazyfs_cmd, run


def _parsers(
    p: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, child in action.choices.items():
                assert name in helped, f"{path} {name}: no help text"
                yield from _parsers(child, f"{path} {name}")


def test_every_option_has_help() -> None:
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, p in _parsers(build_parser(), "lazyfs")
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction) and not a.help
    ]
    assert not missing, missing


def test_registry_commands_take_hosts_dir() -> None:
    for path, p in _parsers(build_parser(), "lazyfs"):
        flags = {s for a in p._actions for s in a.option_strings}
        if "--plain-http" in flags:
            assert "--hosts-dir" in flags, path
            assert p.get_default("hosts_dir") == "/etc/containerd/certs.d", path


def test_version() -> None:
    r = run(*lazyfs_cmd("--version"))
    assert r.returncode == 0
    assert r.stdout.startswith("lazyfs 0.")
