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
import trio

from lazyfs import oci
from lazyfs.cli import build_parser
from lazyfs.fs.daemon import Daemon
from lazyfs.fs.runtime import log_path
from lazyfs.fs.unmount import is_mounted
from lazyfs.ocilayout import Layout
from lazyfs.remote.registry import RegistrySource, transport_cause
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import (
    Item,
    make_layout,
    make_lazy_layout,
    make_tar,
    sample_items,
    seeded_bytes,
)
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
from lazyfs.testing.server import refusing_port
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
    make_lazy_layout(d / "lazy", [make_tar(sample_items())])
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
    with refusing_port() as port:
        line = _fails("inspect", f"127.0.0.1:{port}/eco/app:v1", "--plain-http")
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


# -- mirrors: a pull-through cache in front of the upstream --------------------------------

BIG = seeded_bytes(6 * 1024 * 1024, 77)


def _push_big(registry: RegistryInstance, d: Path, repo: str) -> tuple[str, oci.Descriptor]:
    """A lazy image with one 6 MiB file in many chunks; (reference, its layer)."""
    make_lazy_layout(d / "lazy", [make_tar([Item("big.bin", data=BIG)])], chunk_size=256 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/{repo}:v1", tag="v1")
    (layer,) = Layout(d / "lazy").manifest("v1").layers
    return f"{registry.host}/{repo}:v1", layer


def _hosts(d: Path, upstream: str, server: str, mirror: str) -> Path:
    (d / upstream).mkdir(parents=True)
    (d / upstream / "hosts.toml").write_text(
        f'server = "{server}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return d


@pytest.fixture
def mirror(registry: RegistryInstance, tmp_path: Path) -> Iterator[FaultProxy]:
    """Debian's docker-registry as a pull-through cache of ``registry``, behind a counting
    proxy."""
    with (
        RegistryInstance(tmp_path / "mirror", proxy=registry.url) as cache,
        FaultProxy(cache.url) as proxy,
    ):
        yield proxy


def _whole_gets(proxy: FaultProxy, digest: str) -> int:
    return sum(
        p.endswith(digest) and r is None for p, r in zip(proxy.paths, proxy.ranges, strict=True)
    )


def test_mirror_sending_whole_blobs_is_downloaded_once(
    registry: RegistryInstance, mirror: FaultProxy, tmp_path: Path
) -> None:
    ref, desc = _push_big(registry, tmp_path / "img", "eco/big")
    layer = desc.digest
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    hosts = _hosts(tmp_path / "hosts", registry.host, registry.url, mirror.url)
    pieces = [(i * 700_001 % (4 << 20), i * 700_001 % (4 << 20) + 300_000) for i in range(12)]

    async def main() -> tuple[list[bytes], bytes, int]:
        src = RegistrySource(registry.host, repo, hosts_dir=hosts)
        src.spool_dir = tmp_path / "spool"
        whole = b""
        try:
            got: list[bytes] = [b""] * len(pieces)

            async def one(i: int) -> None:
                got[i] = await src.read_range(layer, *pieces[i])

            async with trio.open_nursery() as nursery:  # concurrent readers of a cold blob
                for i in range(len(pieces)):
                    nursery.start_soon(one, i)
            # Readers of the first megabytes may well be answered before the download ends.
            whole = await src.read_range(layer, 0, desc.size)
        finally:
            await src.aclose()
        return got, whole, src.stats.bytes_received

    got, whole, received = trio.run(main)
    assert mirror.ranges, "nothing went to the mirror"
    assert whole and oci.sha256_digest(whole) == layer
    for (start, end), data in zip(pieces, got, strict=True):
        assert data == whole[start:end]
    assert _whole_gets(mirror, layer) == 1, list(zip(mirror.paths, mirror.ranges, strict=True))
    # The blob once, not once per reader; readers whose request reached the mirror after it
    # had cached the blob got their own range (206), no more.
    assert received <= len(whole) + sum(end - start for start, end in pieces)
    assert not list((tmp_path / "spool").iterdir())  # unlinked: nothing left behind


def test_mount_goes_to_the_mirror_and_falls_back_when_it_is_down(
    registry: RegistryInstance, mirror: FaultProxy, tmp_path: Path
) -> None:
    ref, desc = _push_big(registry, tmp_path / "img", "eco/mirrored")
    layer = desc.digest
    with FaultProxy(registry.url) as upstream:
        hosts = _hosts(tmp_path / "hosts", registry.host, upstream.url, mirror.url)
        args = ("--read-only", "--hosts-dir", str(hosts), "--no-prefetch")
        with mounted(ref, tmp_path / "m1", *args, "--cache", str(tmp_path / "c1")) as m:
            assert (m.mountpoint / "big.bin").read_bytes() == BIG
        # Everything came through the mirror, except the lookups of referrers (API and tag:
        # prefetch groups, deltas) the image has none of: the mirror's 404 hands them to the
        # server, as containerd's hosts.toml order requires for any answer a mirror does not
        # have.
        direct = [
            p for p in upstream.paths if "/manifests/sha256-" not in p and "/referrers/" not in p
        ]
        assert direct == [], upstream.paths
        assert _whole_gets(mirror, layer) <= 1
        assert any(p.endswith(layer) for p in mirror.paths)
        # The mirror down (nothing listens there): the upstream serves, no error.
        with refusing_port() as port:
            dead = f"http://127.0.0.1:{port}"
            hosts = _hosts(tmp_path / "hosts2", registry.host, upstream.url, dead)
            args = ("--read-only", "--hosts-dir", str(hosts), "--no-prefetch")
            with mounted(ref, tmp_path / "m2", *args, "--cache", str(tmp_path / "c2")) as m:
                assert (m.mountpoint / "big.bin").read_bytes() == BIG
        assert any(p.endswith(layer) for p in upstream.paths)


def test_convert_reads_mirrors_from_hosts_dir(
    registry: RegistryInstance, mirror: FaultProxy, tmp_path: Path
) -> None:
    make_layout(tmp_path / "src", [make_tar([Item("big.bin", data=BIG)])], tag="v1")
    push_oci_layout(tmp_path / "src", f"{registry.host}/eco/conv:v1", tag="v1")
    layer = Layout(tmp_path / "src").manifest("v1").layers[0].digest
    with FaultProxy(registry.url) as upstream:
        hosts = _hosts(tmp_path / "hosts", registry.host, upstream.url, mirror.url)
        # Pulled through the mirror (127.0.0.1, a pull-through cache): the upstream sees nothing.
        r = run(*lazyfs_cmd("convert", "--hosts-dir", str(hosts), f"docker://{registry.host}/"
                            f"eco/conv:v1", f"oci:{tmp_path / 'lazy'}"), timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert upstream.requests == 0, upstream.paths
        assert any(p.endswith(layer) for p in mirror.paths), mirror.paths
        assert Layout(tmp_path / "lazy").manifest("v1").layers[0].mediaType == oci.MT_LAYER_ZSTD
    # A push goes to the endpoint that may push (the server), not to the pull-only mirror,
    # which answers only GET and HEAD: the push going through says the writes went upstream.
    hosts = _hosts(tmp_path / "hosts2", registry.host, registry.url, mirror.url)
    r = run(*lazyfs_cmd("convert", "--hosts-dir", str(hosts), f"oci:{tmp_path / 'lazy'}:v1",
                        f"docker://{registry.host}/eco/conv:lazy"), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run(*lazyfs_cmd("inspect", "--plain-http", f"{registry.host}/eco/conv:lazy"))
    assert r.returncode == 0 and "not lazy" not in r.stderr, r.stderr
