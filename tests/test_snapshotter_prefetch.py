"""The snapshotter's ``[prefetch] policy`` reaches each chain daemon as ``lazyfs mount`` flags
(what each flag then does is checked on real mounts in test_prefetch_pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lazyfs_snapshotter.config import PREFETCH_POLICIES, Config
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
