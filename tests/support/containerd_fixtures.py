"""pytest fixtures around :mod:`lazyfs.testing.containerd`.

Use from a test module or conftest.py::

    pytest_plugins = ["tests.support.containerd_fixtures"]

or import the fixture names directly.  A missing containerd/ctr, or not being root, fails the
test (CI has root and scripts/setup.sh installs containerd): nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lazyfs.testing.containerd import ContainerdInstance, containerd_binary, ctr_binary


def containerd_missing() -> str | None:
    if containerd_binary() is None or ctr_binary() is None:
        return "containerd/ctr not installed"
    if os.geteuid() != 0:
        return "containerd test daemon needs root"
    return None


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdInstance]:
    """A fresh private containerd per test (own root/state/socket)."""
    reason = containerd_missing()
    if reason:
        pytest.fail(reason)  # CI has root and installs containerd: a missing one is a failure
    # tmp_path can exceed the AF_UNIX path limit; let the instance mkdtemp in
    # /tmp (short) and remove it on exit.
    with ContainerdInstance() as inst:
        yield inst


@pytest.fixture(scope="session")
def containerd_session() -> Iterator[ContainerdInstance]:
    """One private containerd shared by a whole session (cheaper, shared state)."""
    reason = containerd_missing()
    if reason:
        pytest.fail(reason)  # CI has root and installs containerd: a missing one is a failure
    with ContainerdInstance() as inst:
        yield inst


__all__ = ["containerd", "containerd_missing", "containerd_session"]
