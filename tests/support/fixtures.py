"""pytest fixtures for registry tests.

A test module imports the fixtures it uses by name::

    from tests.support.fixtures import registry, fault_proxy  # noqa: F401

Registries are module-scoped (one daemon per test module and flavour) and stopped by PID at
module teardown; proxies are per test.  Nothing is skipped: a missing docker-registry or
skopeo is a test failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lazyfs.testing.dockerregistry import RegistryInstance
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.tokenserver import TokenServer

HTPASSWD_USER = ("alice", "s3cret-pw")
TOKEN_USER = ("bob", "t0ken-pw")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryInstance]:
    """An anonymous registry."""
    with RegistryInstance(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def htpasswd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryInstance]:
    """A registry requiring Basic auth as ``HTPASSWD_USER``."""
    with RegistryInstance(
        tmp_path_factory.mktemp("registry-htpasswd"), htpasswd=HTPASSWD_USER
    ) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A token service requiring ``TOKEN_USER``'s Basic credentials."""
    with TokenServer(tmp_path_factory.mktemp("tokens"), credentials=TOKEN_USER) as ts:
        yield ts


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[RegistryInstance]:
    """A registry with ``auth: token:`` trusting ``token_server``."""
    workdir = tmp_path_factory.mktemp("registry-token")
    with RegistryInstance(workdir, token=token_server.registry_auth) as reg:
        yield reg


@pytest.fixture
def fault_proxy(registry: RegistryInstance) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the anonymous ``registry``."""
    with FaultProxy(registry.url) as proxy:
        yield proxy
