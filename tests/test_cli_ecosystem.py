"""The CLI as a newcomer meets it: help on every option, ``--version``, mirrors from every
command, errors that name their cause, and mount flags that cannot contradict each other."""

# ruff: noqa: F811
from __future__ import annotations

import argparse
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lazyfs_tools.convert import convert

from lazyfs.cli import build_parser
from lazyfs.fs.daemon import Daemon
from lazyfs.fs.runtime import log_path
from lazyfs.fs.unmount import is_mounted
from lazyfs.remote.registry import transport_cause
from lazyfs.testing.dockerregistry import RegistryInstance, free_port, push_oci_layout
from lazyfs.testing.layers import make_layout, make_tar, sample_items
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
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


# -- mounts: flags, upper lock, log, mount table ---------------------------------------------


def test_contradicting_mount_flags_are_refused(pushed: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    base = ("mount", pushed, str(mnt), "--plain-http", "--cache", str(tmp_path / "c"))
    line = _fails(*base, "--upper", str(tmp_path / "u"), "--read-only")
    assert "--upper and --read-only" in line
    line = _fails(*base, "--read-only", "--prefetch", str(tmp_path / "g.json"), "--no-prefetch")
    assert "--prefetch and --no-prefetch" in line
    assert not is_mounted(str(mnt))


def test_an_upper_directory_serves_one_mount(pushed: str, tmp_path: Path) -> None:
    upper, cache = tmp_path / "upper", str(tmp_path / "c")
    with mounted(pushed, tmp_path / "m1", "--plain-http", "--upper", str(upper), "--cache", cache):
        (tmp_path / "m2").mkdir()
        line = _fails(
            "mount", pushed, str(tmp_path / "m2"), "--plain-http", "--upper", str(upper),
            "--cache", cache,
        )  # fmt: skip
        assert f"upper directory {upper} is in use by another mount" in line
        assert not is_mounted(str(tmp_path / "m2"))
    # Released with its mount: the next one may take it.
    with mounted(pushed, tmp_path / "m3", "--plain-http", "--upper", str(upper), "--cache", cache):
        pass


def test_daemon_logs_by_default_and_the_table_names_the_image(pushed: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run(
        *lazyfs_cmd("-v", "mount", pushed, str(mnt), "--plain-http", "--read-only"),
        "--cache", str(tmp_path / "c"), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    daemon = Daemon(int(r.stdout.rsplit("(pid ", 1)[1].rstrip(")\n")), mnt)
    try:
        stats = run(*lazyfs_cmd("stats", str(mnt)), check=True).stdout
        log = Path(stats.split("log: ", 1)[1].splitlines()[0])
        assert log == log_path(mnt)
        assert "lazyfs: INFO" in log.read_text()
        rows = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        row = next(r for r in rows if r[4] == str(mnt))
        fstype, source = row[row.index("-") + 1 : row.index("-") + 3]
        assert (fstype, source) == ("fuse.lazyfs", pushed)
    finally:
        daemon.stop()
    assert not is_mounted(str(mnt))


def test_log_rotation_keeps_it_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lazyfs.cli import mount as mount_cli

    monkeypatch.setattr(mount_cli, "LOG_MAX_BYTES", 2000)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        mount_cli._log_to(str(tmp_path / "d.log"), daemon=False)
        root.setLevel(logging.INFO)
        for i in range(200):
            logging.getLogger("t").info("line %d of the log", i)
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["d.log", "d.log.1"]
    assert all((tmp_path / f).stat().st_size <= 2100 for f in files)
    assert "line 199 of the log" in (tmp_path / "d.log").read_text()
