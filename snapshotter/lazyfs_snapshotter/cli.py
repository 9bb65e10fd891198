"""``lazyfs-snapshotter``: the containerd proxy snapshotter daemon."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import TextIO

from .config import (
    DEFAULT_ADDRESS,
    DEFAULT_HOSTS_DIR,
    DEFAULT_ROOT,
    Config,
    ConfigError,
    host_port,
    load_config,
)

log = logging.getLogger("lazyfs_snapshotter")

LOG_LEVELS = ("debug", "info", "warning", "error")
# Workers bound how many containerd calls run at once; sqlite serialises writes anyway.
WORKERS = 16
# How often chain daemons are checked for having died (besides on every Mounts/Prepare).
CHECK_INTERVAL = 5.0


class StartError(Exception):
    """The daemon cannot start; str() is the one-line reason."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lazyfs-snapshotter", description="containerd proxy snapshotter for lazyfs"
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="unix socket to listen on")
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR, help="containerd hosts.toml dir")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (overrides [metrics].address)")
    p.add_argument(
        "--unmount-on-exit", action="store_true",
        help="on SIGTERM, stop the lazy-layer daemons too (default: leave them serving the "
        "running containers)",
    )
    p.add_argument("--plain-layers", action="store_true",
                   help="serve no layer lazily: containerd pulls every layer")
    return p.parse_args(argv)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _socket_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def prepare_socket(address: str) -> None:
    """Make the socket's directory (0700) and remove a stale socket left by a crash."""
    if len(address.encode()) > 107:
        raise StartError(f"socket path too long for a unix socket: {address}")
    sock_dir = Path(address).parent
    sock_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(sock_dir, 0o700)
    if os.path.lexists(address):
        if _socket_in_use(address):
            raise StartError(f"{address}: another process is already listening")
        os.unlink(address)


def lock_root(root: Path) -> TextIO:
    """Hold ROOT/lock for our lifetime: two daemons on one metadata store would corrupt it."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    f = open(root / "lock", "w")  # noqa: SIM115 - held open until exit
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StartError(f"{root}: another lazyfs-snapshotter uses this root") from None
    return f


def serve(
    address: str,
    root: Path,
    config: Config,
    hosts_dir: Path,
    *,
    unmount_on_exit: bool = False,
    lazy: bool = True,
) -> None:
    try:
        import grpc

        from .lazy import LazyLayers
        from .metadata import MetadataError
        from .metrics import Metrics
        from .service import SnapshotsService, add_to_server
        from .snapshots import Snapshotter
    except ImportError as e:
        raise StartError(
            f"gRPC modules missing ({e}); run scripts/setup.sh to generate them"
        ) from None

    lock = lock_root(root)
    prepare_socket(address)
    try:
        layers = LazyLayers(root, config, hosts_dir) if lazy else None
        snapshotter = Snapshotter(root, layers)
    except MetadataError as e:
        lock.close()
        raise StartError(str(e)) from None
    metrics = Metrics(snapshotter.store)
    server: grpc.Server | None = None
    stop = threading.Event()
    try:
        if config.metrics_address:
            host, port = host_port(config.metrics_address, "metrics address")
            try:
                port = metrics.serve(host, port)
            except OSError as e:
                raise StartError(
                    f"metrics address {config.metrics_address}: {e.strerror}") from None
            # The port it got: tests (and users) may ask for port 0.
            # An IPv6 host in brackets, or the URL would not parse.
            log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
                     port)  # fmt: skip
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS),
                             interceptors=[metrics.interceptor])
        add_to_server(SnapshotsService(snapshotter), server)
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise StartError(f"cannot listen on {address}")

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        os.chmod(address, 0o600)
        log.info("listening on %s, root %s, cache %s, hosts %s", address, root,
                 config.cache_path(root), hosts_dir)
        sd_notify("READY=1")
        while not stop.wait(CHECK_INTERVAL):
            try:
                snapshotter.check()
            except Exception:  # a check that fails is retried; serving goes on
                log.exception("checking the lazy-layer daemons failed")
    finally:
        # Also when start-up fails after the store opened: the fork server goes now (by
        # PID), not when it next notices its parent gone; the daemons stay unless asked.
        if stop.is_set():
            sd_notify("STOPPING=1")
            log.info("stopping%s", " and unmounting lazy layers" if unmount_on_exit else "")
        if server is not None:
            # In-flight calls get a moment; each is one transaction, so cutting one is safe.
            server.stop(5).wait()
        metrics.close()
        snapshotter.close(unmount=unmount_on_exit and stop.is_set())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        lock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
        if args.metrics_address:
            host_port(args.metrics_address, "--metrics-address")
            config = dataclasses.replace(config, metrics_address=args.metrics_address)
        serve(os.path.abspath(args.address), Path(os.path.abspath(args.root)), config,
              Path(args.hosts_dir), unmount_on_exit=args.unmount_on_exit,
              lazy=not args.plain_layers)
    except (ConfigError, StartError) as e:
        print(f"lazyfs-snapshotter: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lazyfs-snapshotter: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
