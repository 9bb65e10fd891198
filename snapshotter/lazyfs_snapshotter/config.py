"""The snapshotter's TOML configuration: parsed and validated up front, one-line errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "/run/lazyfs-snapshotter/lazyfs.sock"
DEFAULT_ROOT = "/var/lib/lazyfs-snapshotter"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_CACHE_SIZE = 10 * 1024**3
PREFETCH_POLICIES = ("auto", "groups", "landmark", "none")


class ConfigError(ValueError):
    """A bad config file or value; str() is the one-line message for the user."""


@dataclass(frozen=True)
class RegistryConfig:
    plain_http: tuple[str, ...] = ()  # hosts reached over http:// without a hosts.toml
    insecure: tuple[str, ...] = ()  # hosts whose TLS certificate is not verified
    docker_config: str | None = None  # credentials file; None = the user's default


@dataclass(frozen=True)
class Config:
    cache_dir: str | None = None  # None = <root>/cache
    cache_size: int = DEFAULT_CACHE_SIZE
    prefetch: str = "auto"
    deltas: bool = True  # chain daemons use binary patches stored beside an image
    metrics_address: str | None = None
    # Daemons forked from a process that has imported lazyfs (a mount ready in a fraction of
    # the time); off: each daemon starts a new interpreter.
    fork_server: bool = True
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def cache_path(self, root: Path) -> Path:
        return Path(self.cache_dir) if self.cache_dir else root / "cache"


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: object, what: str) -> int:
    """A byte count: an integer or a string such as ``512M`` or ``10GiB``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        digits = text[: len(text) - len(unit)].strip()
        if not digits.isdigit():
            raise ConfigError(f"{what}: not a size: {value!r}")
        n = int(digits) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"{what}: expected a size, got {type(value).__name__}")
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return n


def host_port(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) split and checked; port 0: any free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what}: expected a list of non-empty strings")
    return tuple(value)


def _opt_str(table: dict[str, Any], key: str, what: str) -> str | None:
    value = table.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{what}.{key}: expected a non-empty string")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{what}: unknown key {unknown[0]!r}")


def parse_config(data: dict[str, Any]) -> Config:
    """A Config from a decoded TOML document."""
    _check_keys(data, {"cache", "prefetch", "deltas", "metrics", "registry", "daemons"}, "config")
    cache = data.get("cache", {})
    prefetch = data.get("prefetch", {})
    deltas = data.get("deltas", {})
    metrics = data.get("metrics", {})
    registry = data.get("registry", {})
    daemons = data.get("daemons", {})
    for name, table in (("cache", cache), ("prefetch", prefetch), ("deltas", deltas),
                        ("metrics", metrics), ("registry", registry), ("daemons", daemons)):
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{name}] must be a table")
    _check_keys(cache, {"dir", "size"}, "[cache]")
    _check_keys(prefetch, {"policy"}, "[prefetch]")
    _check_keys(deltas, {"enabled"}, "[deltas]")
    _check_keys(metrics, {"address"}, "[metrics]")
    _check_keys(registry, {"plain_http", "insecure", "docker_config"}, "[registry]")
    _check_keys(daemons, {"fork_server"}, "[daemons]")
    fork_server = daemons.get("fork_server", True)
    if not isinstance(fork_server, bool):
        raise ConfigError(f"[daemons].fork_server: expected true or false, got {fork_server!r}")
    policy = prefetch.get("policy", "auto")
    if policy not in PREFETCH_POLICIES:
        raise ConfigError(
            f"[prefetch].policy: {policy!r} is not one of {', '.join(PREFETCH_POLICIES)}"
        )
    use_deltas = deltas.get("enabled", True)
    if not isinstance(use_deltas, bool):
        raise ConfigError(f"[deltas].enabled: expected true or false, got {use_deltas!r}")
    metrics_address = _opt_str(metrics, "address", "[metrics]")
    if metrics_address is not None:
        host_port(metrics_address, "[metrics].address")
    return Config(
        cache_dir=_opt_str(cache, "dir", "[cache]"),
        cache_size=parse_size(cache.get("size", DEFAULT_CACHE_SIZE), "[cache].size"),
        prefetch=policy,
        deltas=use_deltas,
        metrics_address=metrics_address,
        fork_server=fork_server,
        registry=RegistryConfig(
            plain_http=_str_list(registry.get("plain_http", []), "[registry].plain_http"),
            insecure=_str_list(registry.get("insecure", []), "[registry].insecure"),
            docker_config=_opt_str(registry, "docker_config", "[registry]"),
        ),
    )


def load_config(path: Path | None) -> Config:
    """The config in *path*, or the defaults when None."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"bad TOML in {path}: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
