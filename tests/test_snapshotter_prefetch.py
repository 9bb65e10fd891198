"""The snapshotter's ``[prefetch] policy``, cache bound and credentials reach each chain daemon
as ``lazyfs mount`` flags (what each flag then does is checked on real mounts in
test_prefetch_pipeline, test_store and test_snapshotter_lazy)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from lazyfs_snapshotter.config import PREFETCH_POLICIES, Config, RegistryConfig
from lazyfs_snapshotter.lazy import LazyLayers
from lazyfs_snapshotter.metadata import RemoteLayerRow
from lazyfs_snapshotter.remote import Chain

from lazyfs.cli.mount import PREFETCH_SOURCES


@pytest.mark.parametrize(("policy", "flags"), [
    ("auto", []),
    ("groups", ["--prefetch-from", "groups"]),
    ("landmark", ["--prefetch-from", "landmark"]),
    ("none", ["--no-prefetch"]),
])  # fmt: skip
def test_policy_becomes_the_daemons_prefetch_flags(
    policy: str, flags: list[str], tmp_path: Path
) -> None:
    top = RemoteLayerRow("127.0.0.1:5000/app@sha256:" + "a" * 64, "sha256:" + "a" * 64, 1, "{}")
    opts = LazyLayers(tmp_path, Config(prefetch=policy), None)._options(Chain("c", top))
    assert [o for o in opts if "prefetch" in o or o in PREFETCH_SOURCES] == flags


def test_every_policy_but_none_is_a_source_the_daemon_knows() -> None:
    assert set(PREFETCH_POLICIES) == {*PREFETCH_SOURCES, "none"}


def test_every_daemon_gets_the_cache_bound_and_the_credentials(tmp_path: Path) -> None:
    # One shared, bounded cache (evicting beyond it: test_store) and the credentials file
    # (tokens renewed as they expire: test_snapshotter_lazy) for every chain daemon.
    top = RemoteLayerRow("127.0.0.1:5000/app@sha256:" + "a" * 64, "sha256:" + "a" * 64, 1, "{}")
    config = Config(cache_size=3 << 30, registry=RegistryConfig(docker_config="/etc/auth.json"))
    opts = LazyLayers(tmp_path, config, None)._options(Chain("c", top))
    flags = dict(itertools.pairwise(opts))
    assert flags["--cache"] == str(tmp_path / "cache")
    assert flags["--cache-size"] == str(3 << 30)
    assert flags["--docker-config"] == "/etc/auth.json"
