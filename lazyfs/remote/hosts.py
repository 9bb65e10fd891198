"""containerd-style registry host configuration (``CERTS_DIR/HOST/hosts.toml``).

Endpoints are tried in file order (the ``[host."…"]`` tables), then ``server`` (by default the
registry itself).  A host lacking a capability is skipped for that kind of request: ``resolve``
for manifests by tag, ``pull`` for blobs and manifests by digest.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import FormatError

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True)
class Endpoint:
    #: base URL including the API root, e.g. ``http://127.0.0.1:5000/v2``
    url: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()

    @property
    def netloc(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]


def _base_url(url: str, default_scheme: str, override_path: bool) -> str:
    if "://" not in url:
        url = f"{default_scheme}://{url}"
    url = url.rstrip("/")
    # containerd appends /v2 unless the URL already names the API root or override_path is set.
    if not override_path and not url.endswith("/v2"):
        url += "/v2"
    return url


def _caps(value: object, where: str) -> frozenset[str]:
    if value is None:
        return ALL_CAPABILITIES
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{where}: capabilities must be a list of strings")
    return frozenset(value)


def _ca(value: object, base: Path) -> tuple[str, ...]:
    # Relative CA paths are relative to the hosts.toml's directory, as in containerd.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(str(base / str(v)) for v in value)


def default_server(host: str) -> str:
    return "registry-1.docker.io" if host in ("docker.io", "registry-1.docker.io") else host


def load_endpoints(
    host: str,
    hosts_dir: str | os.PathLike[str] | None = None,
    *,
    plain_http: bool = False,
    insecure: bool = False,
) -> list[Endpoint]:
    """Ordered endpoints for ``host``.  Without a hosts.toml: just the registry itself."""
    scheme = "http" if plain_http else "https"
    server = Endpoint(_base_url(default_server(host), scheme, False), skip_verify=insecure)
    if hosts_dir is None:
        return [server]
    base = Path(hosts_dir)
    path = base / host / "hosts.toml"
    if not path.is_file():
        path = base / "_default" / "hosts.toml"
        if not path.is_file():
            return [server]
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FormatError(f"cannot read {path}: {e}") from e
    out: list[Endpoint] = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise FormatError(f"{path}: [host] must be a table")
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise FormatError(f"{path}: host {url!r} must be a table")
        out.append(
            Endpoint(
                _base_url(url, scheme, bool(table.get("override_path", False))),
                _caps(table.get("capabilities"), f"{path} host {url!r}"),
                bool(table.get("skip_verify", insecure)),
                _ca(table.get("ca"), path.parent),
            )
        )
    if "server" in doc:
        out.append(
            Endpoint(
                _base_url(str(doc["server"]), scheme, False),
                _caps(doc.get("capabilities"), str(path)),
                bool(doc.get("skip_verify", insecure)),
                _ca(doc.get("ca"), path.parent),
            )
        )
    else:
        out.append(server)
    return out
