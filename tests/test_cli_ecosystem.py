"""The CLI as a newcomer meets it: help on every option, ``--version``, mirrors from every
command, errors that name their cause, and mount flags that cannot contradict each other."""

# ruff: noqa: F811
from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lazyfs_tools.convert import convert

from lazyfs.cli import build_parser
from lazyfs.remote.registry import transport_cause
from lazyfs.testing.dockerregistry import RegistryInstance, free_port, push_oci_layout
from lazyfs.testing.layers import make_layout, make_tar, sample_items
from lazyfs.testing.mounts import lazyfs_cmd, run
from tests.support.fixtures import htpasswd_registry, registry  # noqa: F401


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


# -- errors that name the cause -----------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("images")
    make_layout(d / "src", [make_tar(sample_items())], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/eco/app:v1", tag="v1")
    return f"{registry.host}/eco/app:v1"


def _fails(*argv: str, within: float = 10.0) -> str:
    t0 = time.monotonic()
    r = run(*lazyfs_cmd(*argv), timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert took < within, (took, lines[0])
    return lines[0]


def test_https_to_a_plain_http_registry_says_so_at_once(pushed: str) -> None:
    line = _fails("inspect", pushed, within=3.0)
    assert "server gave HTTP response to HTTPS client" in line
    assert "--plain-http" in line


def test_connection_refused_is_named(tmp_path: Path) -> None:
    line = _fails("inspect", f"127.0.0.1:{free_port()}/eco/app:v1", "--plain-http")
    assert "connection refused" in line


def test_unknown_tag_and_repository_are_named(pushed: str) -> None:
    host = pushed.split("/")[0]
    line = _fails("inspect", f"{host}/eco/app:nope", "--plain-http")
    assert "tag nope not found in" in line and "eco/app" in line and "MANIFEST_UNKNOWN" in line
    line = _fails("inspect", f"{host}/eco/nothing:v1", "--plain-http")
    assert "tag v1 not found in" in line and "eco/nothing" in line


def test_credentials_refused_name_registry_and_repository(
    htpasswd_registry: RegistryInstance, tmp_path: Path
) -> None:
    line = _fails("inspect", f"{htpasswd_registry.host}/eco/app:v1", "--plain-http")
    assert htpasswd_registry.host in line and "eco/app" in line
    assert "authentication required" in line


def test_dns_failure_is_named_and_not_retried() -> None:
    # Pure classification (a real lookup would leave loopback): the chain httpx raises.
    inner = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    outer = httpx.ConnectError("[Errno -2] Name or service not known")
    outer.__cause__ = inner
    text, permanent = transport_cause(outer)
    assert "cannot resolve" in text and permanent
    again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    outer.__cause__ = again
    assert transport_cause(outer)[1] is False
