"""A private, throw-away containerd for tests and test-data scripts.

``ContainerdInstance`` starts Debian's ``containerd`` with its own config file,
root, state directory and GRPC socket, all under one temporary directory, so it
never touches (or even looks at) a system containerd under /run/containerd or
/var/lib/containerd.  The CRI plugin and every plugin that could reach the
network or needs special kernel/storage support are disabled.  The daemon is
stopped by PID (SIGTERM, wait, SIGKILL) whatever happens inside the ``with``.

Usage::

    with ContainerdInstance() as ctrd:
        ctrd.ctr("images", "import", "--no-unpack", "img.tar")
        ctrd.ctr("images", "ls", capture=True)

As a pytest fixture (module ``tests.support.containerd_fixtures``)::

    def test_x(containerd: ContainerdInstance) -> None: ...
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lazyfs.testing.server import ServerProcess, unix_socket_accepts

DEFAULT_NAMESPACE = "lazyfs-test"
# What containerd's runc shim and ctr keep per namespace, shared by every containerd on the
# machine: runc's container state (RUNC_STATE/NAMESPACE/ID) and the containers' cgroups
# (/NAMESPACE/ID under each hierarchy).
RUNC_STATE = Path("/run/containerd/runc")
CGROUPS = Path("/sys/fs/cgroup")
# containerd's own rule for a namespace's name: the name becomes a path (and a glob) at the
# stop, so nothing else (no "..", "*", "/") may reach it.
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")

# Plugins we never want in a test daemon: CRI (pulls images, opens ports, wants
# CNI), snapshotters needing special filesystems, the default /opt installer and
# the OTLP exporter (network).
_DISABLED_PLUGINS: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
    "io.containerd.tracing.processor.v1.otlp",
)

# Unix socket paths are limited to 108 bytes; keep temp dirs short.
_MAX_SOCKET_PATH = 100


def containerd_binary() -> str | None:
    """Path of the containerd binary, or None when it is not installed."""
    return shutil.which("containerd")


def ctr_binary() -> str | None:
    return shutil.which("ctr")


def private_namespace() -> str:
    """A namespace no other containerd on the machine uses.  Two test containerds (two test
    runs at once) creating one container name in one namespace share runc's state: the
    second's create fails ("container with given ID already exists") and its clean-up kills
    the first's container ("cannot exec in a stopped state")."""
    return f"{DEFAULT_NAMESPACE}-{secrets.token_hex(4)}"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(base: Path, proxy_snapshotters: Mapping[str, str] | None = None) -> str:
    """containerd (config version 2) TOML keeping every path under *base*.

    *proxy_snapshotters* maps a snapshotter name to its gRPC socket (``[proxy_plugins]``).
    """
    disabled = ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS)
    proxies = [
        f'[proxy_plugins.{_toml_str(name)}]\n  type = "snapshot"\n  address = {_toml_str(addr)}\n'
        for name, addr in (proxy_snapshotters or {}).items()
    ]
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_str(str(base / 'root'))}",
            f"state = {_toml_str(str(base / 'state'))}",
            f"plugin_dir = {_toml_str(str(base / 'plugins'))}",
            f"disabled_plugins = [{disabled}]",
            "",
            "[grpc]",
            f"  address = {_toml_str(str(base / 'containerd.sock'))}",
            "  tcp_address = ''",
            "",
            "[ttrpc]",
            f"  address = {_toml_str(str(base / 'containerd.sock.ttrpc'))}",
            "",
            "[debug]",
            "  address = ''",
            "  level = 'info'",
            "",
            "[metrics]",
            "  address = ''",
            "",
            *proxies,
        ]
    )


class ContainerdError(RuntimeError):
    pass


class ContainerdInstance(ServerProcess):
    """One private containerd daemon; use as a context manager.

    *base_dir*: where config/root/state/socket go.  When None a fresh temp dir
    is created (and removed on exit unless *keep* is true).  *namespace*: a private one
    (:func:`private_namespace`) unless given.  At the stop, tasks still running in any
    namespace ``ctr`` was used with are killed and removed, and runc's and the cgroups'
    directories of those namespaces go once empty.
    """

    name = "containerd"
    error = ContainerdError
    poll_interval = 0.1

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        namespace: str | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        keep: bool = False,
        binary: str | None = None,
        proxy_snapshotters: Mapping[str, str] | None = None,
    ) -> None:
        self._given_base = Path(base_dir) if base_dir is not None else None
        self.namespace = namespace or private_namespace()
        self._namespaces: set[str] = set()  # those ctr was used with: cleaned at the stop
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.keep = keep
        self.binary = binary or containerd_binary()
        self.proxy_snapshotters = dict(proxy_snapshotters or {})
        self.base: Path | None = None
        self._made_base = False

    # -- paths ---------------------------------------------------------------
    def _need_base(self) -> Path:
        if self.base is None:
            raise ContainerdError("containerd instance not started")
        return self.base

    @property
    def address(self) -> str:
        """The GRPC socket path (what ``ctr --address`` takes)."""
        return str(self._need_base() / "containerd.sock")

    @property
    def config_path(self) -> Path:
        return self._need_base() / "config.toml"

    @property
    def root(self) -> Path:
        return self._need_base() / "root"

    @property
    def state(self) -> Path:
        return self._need_base() / "state"

    @property
    def log_path(self) -> Path:
        return self._need_base() / "containerd.log"

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> ContainerdInstance:
        if self.proc is not None:
            raise ContainerdError("already started")
        if self.binary is None:
            raise ContainerdError("containerd binary not found on PATH")
        if self._given_base is not None:
            self.base = self._given_base.resolve()
            self.base.mkdir(parents=True, exist_ok=True)
        else:
            self.base = Path(tempfile.mkdtemp(prefix="lazyfs-ctrd-"))
            self._made_base = True
        if len(self.address) > _MAX_SOCKET_PATH:
            raise ContainerdError(f"socket path too long for AF_UNIX: {self.address}")
        for sub in ("root", "state", "plugins"):
            (self.base / sub).mkdir(exist_ok=True)
        self.config_path.write_text(render_config(self.base, self.proxy_snapshotters))
        argv = [self.binary, "--config", str(self.config_path), "--address", self.address,
                "--root", str(self.root), "--state", str(self.state)]  # fmt: skip
        self.spawn(argv, self.log_path, env=self._env(), new_session=True)
        return self

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Never let a caller's environment point us at another daemon/namespace.
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
            env.pop(var, None)
        return env

    def ready(self) -> bool:
        # The socket listening is not enough: the API must answer.
        return (
            unix_socket_accepts(self.address)
            and self.ctr("version", check=False, capture=True, timeout=10).returncode == 0
        )

    def stop(self) -> int | None:
        """Stop the daemon by PID (SIGTERM, wait, SIGKILL), drop a base we made; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self._remove_tasks()
        rc = super().stop()
        for namespace in self._namespaces:
            # Left by runc and ctr after the last container: a run's namespaces, one each.
            for d in (RUNC_STATE / namespace, CGROUPS / namespace,
                      *CGROUPS.glob(f"*/{namespace}")):  # fmt: skip
                with contextlib.suppress(OSError):
                    d.rmdir()
        self._namespaces.clear()
        if self.base is not None and self._made_base and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        return rc

    def _remove_tasks(self) -> None:
        """Kill and remove the tasks still running (a test that failed before its clean-up):
        their shims and processes would outlive containerd."""
        for namespace in sorted(self._namespaces):
            with contextlib.suppress(subprocess.TimeoutExpired, ContainerdError):
                ls = run_ctr(self.ctr_argv("task", "ls", "-q", namespace=namespace),
                             capture=True, timeout=30)  # fmt: skip
                for task in ls.stdout.split():
                    run_ctr(self.ctr_argv("task", "rm", "-f", task, namespace=namespace),
                            check=False, capture=True, timeout=30)  # fmt: skip

    # -- ctr -------------------------------------------------------------------
    def ctr_argv(self, *args: str, binary: str = "ctr", namespace: str | None = None
                 ) -> list[str]:
        """argv for *binary* (``ctr`` or ``ctr-remote``) aimed at this daemon, in
        ``namespace`` (this instance's current one by default)."""
        namespace = namespace or self.namespace
        if len(namespace) > 76 or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"not a containerd namespace: {namespace!r}")
        self._namespaces.add(namespace)
        return [binary, "--address", self.address, "--namespace", namespace, *args]

    def ctr(
        self,
        *args: str,
        binary: str = "ctr",
        check: bool = True,
        capture: bool = False,
        timeout: float | None = 300,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` (or ``ctr-remote`` via *binary*) against this daemon."""
        return run_ctr(
            self.ctr_argv(*args, binary=binary),
            check=check,
            capture=capture,
            timeout=timeout,
            input=input,
        )


def run_ctr(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = 300,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
        env.pop(var, None)
    res = subprocess.run(
        list(argv),
        input=input.decode() if input is not None else None,
        capture_output=bool(capture or check),
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and res.returncode != 0:
        raise ContainerdError(
            f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res


@contextlib.contextmanager
def containerd(
    base_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[ContainerdInstance]:
    """Functional spelling of ``with ContainerdInstance(...) as c``."""
    inst = ContainerdInstance(base_dir, **kwargs)
    with inst:
        yield inst
