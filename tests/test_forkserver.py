"""lazyfs.fs.forkserver and ``lazyfs serve-forks``: daemons forked from a server that has
imported lazyfs, real FUSE mounts; spawn falls back to a new process when the server is gone;
daemons outlive their server.  Every process here is stopped by PID, even on failure."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.cli.forks import _comm
from lazyfs.errors import LazyfsError
from lazyfs.fs.daemon import Daemon, attach, clear_mountpoint, lazyfs_argv, spawn
from lazyfs.fs.forkserver import SOCKET_ENV, ForkServer, request_fork
from lazyfs.fs.unmount import is_mounted
from lazyfs.process import stop_process
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes

DATA = seeded_bytes(100_000, 7)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("forks-image")
    make_layout(d / "src", [make_tar([Item("f", data=DATA)])], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    return f"oci:{d / 'lazy'}:v1"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ForkServer]:
    fs = ForkServer.start(tmp_path / "forks.sock", log=tmp_path / "forks.log")
    try:
        yield fs
    finally:
        fs.stop()


@contextlib.contextmanager
def stopping(daemons: list[Daemon]) -> Iterator[list[Daemon]]:
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def _mnt(tmp_path: Path, name: str = "mnt") -> Path:
    mnt = tmp_path / name
    mnt.mkdir()
    return mnt


def test_the_fork_server_spawns_a_working_mount(
    image: str, server: ForkServer, tmp_path: Path
) -> None:
    mnt = _mnt(tmp_path)
    with stopping([]) as daemons:
        d = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")], verbose=1,
                  log=tmp_path / "log", timeout=60, forkserver=server.socket)  # fmt: skip
        daemons.append(d)
        assert d.proc is None  # forked by the server, not a child of this process
        # ps shows what it is, as for a daemon started anew, not the server's command line:
        # all of it, however much longer than the server's own it is.
        assert Path(f"/proc/{d.pid}/comm").read_text() == "lazyfs-mount\n"
        shown = Path(f"/proc/{d.pid}/cmdline").read_bytes().split(b"\0")
        argv = lazyfs_argv("-v", "mount", image, os.fspath(mnt), "--read-only", "--cache",
                           str(tmp_path / "c"), "--ready-fd")  # fmt: skip
        assert [a.decode() for a in shown[:-2]] == argv and shown[-2].isdigit(), shown
        room = len(Path(f"/proc/{server.pid}/cmdline").read_bytes())
        assert shown[-1] == b"" and len(b" ".join(shown)) > room  # more than the server's
        assert (mnt / "f").read_bytes() == DATA
        info = attach(mnt, expect_pid=d.pid).info()
        assert info["pid"] == d.pid
        assert os.getsid(d.pid) == d.pid  # its own session, as a spawned one has
        d.stop()
        assert not d.alive() and not is_mounted(os.fspath(mnt))
    assert server.alive()


def test_a_forked_process_is_named_for_its_subcommand() -> None:
    assert _comm(["-v", "-v", "mount", "a", "b"]) == "lazyfs-mount"
    assert _comm(["-vv", "mount", "a", "b", "--read-only"]) == "lazyfs-mount"
    assert _comm(["--verbose", "cache", "du"]) == "lazyfs-cache"
    # No subcommand lazyfs's parser would run: no name made up from the words.
    for argv in (["--log", "x", "mount", "a", "b"], ["-v"], ["--help"], ["nosuch"]):
        assert _comm(argv) == "lazyfs", argv


def test_a_forked_daemon_neither_builds_a_parser_nor_imports() -> None:
    """What a fork server's child does before its mount starts is only its own: the parser
    (built ahead, not twice in each child: 5-9 ms each) and the modules it calls (loaded
    ahead) come from the server."""
    code = (
        "import sys\n"
        "from unittest import mock\n"
        "import lazyfs.cli\n"
        "from lazyfs.cli import forks\n"
        "forks._preload()\n"
        "before = set(sys.modules)\n"
        "argv = ['mount', 'r/i:t', '/m', '--read-only', '--ready-fd', '5']\n"
        "with mock.patch.object(lazyfs.cli, 'build_parser', side_effect=AssertionError):\n"
        "    assert forks._comm(argv) == 'lazyfs-mount'\n"
        "    assert lazyfs.cli.parser().parse_args(argv).ready_fd == 5\n"
        "import socket\n"
        "socket.getaddrinfo('localhost', 80)\n"
        "from lazyfs.fs.daemon import lazyfs_argv\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    assert out.strip() == "[]", out


def test_a_command_line_without_room_is_cut_visibly() -> None:
    """Where the kernel refuses to move the command line, it is written over the old one,
    and what does not fit is marked cut, never silently dropped."""
    code = (
        "from pathlib import Path\n"
        "from lazyfs.cli.forks import _memory_map, _overwrite_cmdline\n"
        "m = _memory_map()\n"
        "_overwrite_cmdline(b'lazyfs mount ' + b'x' * 5000, (m['arg_start'], m['arg_end']))\n"
        "print(Path('/proc/self/cmdline').read_bytes().decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout  # fmt: skip
    assert out.startswith("lazyfs mount xxx") and out.endswith("x...\0\n"), out


def test_the_childs_error_comes_back_as_one_line(server: ForkServer, tmp_path: Path) -> None:
    mnt = _mnt(tmp_path)
    with pytest.raises(LazyfsError, match="not an OCI image layout"):
        spawn(f"oci:{tmp_path / 'nothing'}", mnt, ["--read-only"], timeout=60,
              forkserver=server.socket)  # fmt: skip
    assert not is_mounted(os.fspath(mnt))
    assert server.alive()


def test_spawn_falls_back_when_the_server_is_gone(
    image: str, server: ForkServer, tmp_path: Path
) -> None:
    server.stop()
    assert not server.socket.exists()  # it removed its socket on SIGTERM
    mnt = _mnt(tmp_path)
    with stopping([]) as daemons:
        d = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")],
                  timeout=60, forkserver=server.socket)  # fmt: skip
        daemons.append(d)
        assert d.proc is not None  # started as a new process
        assert (mnt / "f").read_bytes() == DATA


def test_spawn_falls_back_when_the_server_was_killed(image: str, tmp_path: Path) -> None:
    """A server that hangs (no answer: a timeout) or was SIGKILLed (its socket file stays,
    nobody listens): nothing started, and spawn starts the daemon as a new process."""
    import socket

    sock_path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(os.fspath(sock_path))
        listener.listen(1)
        r, w = os.pipe()
        try:
            with pytest.raises(OSError):  # nobody accepts: it sits in the backlog
                request_fork(sock_path, ["--version"], log=os.devnull, ready_fd=w, timeout=0.3)
        finally:
            os.close(r)
            os.close(w)
    assert sock_path.exists()
    mnt = _mnt(tmp_path)
    with stopping([]) as daemons:
        d = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")],
                  timeout=60, forkserver=sock_path)  # fmt: skip
        daemons.append(d)
        assert d.proc is not None
        assert (mnt / "f").read_bytes() == DATA


def test_a_daemon_outlives_its_fork_server(image: str, tmp_path: Path) -> None:
    server = ForkServer.start(tmp_path / "forks.sock")
    mnt = _mnt(tmp_path)
    with stopping([]) as daemons:
        try:
            d = spawn(image, mnt, ["--read-only", "--cache", str(tmp_path / "c")],
                      timeout=60, forkserver=server.socket)  # fmt: skip
            daemons.append(d)
        finally:
            server.stop()
        assert not server.alive()
        assert d.alive() and (mnt / "f").read_bytes() == DATA
        assert attach(mnt, expect_pid=d.pid).info()["pid"] == d.pid


def test_the_server_exits_with_its_parent_and_leaves_the_daemons(
    image: str, tmp_path: Path
) -> None:
    """The snapshotter killed outright: its fork server goes within a second, its daemons
    stay (they are not the server's to stop)."""
    sock = tmp_path / "forks.sock"
    # A parent that starts a server, forks one daemon through it, prints both PIDs and exits.
    code = (
        "import sys\n"
        "from lazyfs.fs.forkserver import ForkServer\n"
        "from lazyfs.fs.daemon import spawn\n"
        f"s = ForkServer.start({os.fspath(sock)!r})\n"
        f"d = spawn({image!r}, {os.fspath(tmp_path / 'mnt')!r}, ['--read-only', '--cache', "
        f"{os.fspath(tmp_path / 'c')!r}], timeout=60, forkserver=s.socket)\n"
        "print(s.pid, d.pid, d.proc is None, flush=True)\n"
    )
    _mnt(tmp_path)
    out = subprocess.run([lazyfs_argv()[0], "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    pids = [int(x) for x in out.stdout.split()[:2]] if out.returncode == 0 else []
    try:
        assert out.returncode == 0, out.stderr
        server_pid, daemon_pid = pids
        assert out.stdout.split()[2] == "True"
        d = attach(tmp_path / "mnt", expect_pid=daemon_pid)
        from lazyfs.process import wait_pid

        assert wait_pid(server_pid, 10), "the fork server outlived its parent"
        assert d.alive() and (tmp_path / "mnt" / "f").read_bytes() == DATA
        d.stop()
    finally:
        with contextlib.suppress(LazyfsError):
            attach(tmp_path / "mnt").stop()
        for pid in reversed(pids):
            stop_process(pid)
        clear_mountpoint(tmp_path / "mnt")


def test_the_snapshotters_fork_server_follows_its_config(tmp_path: Path) -> None:
    from lazyfs_snapshotter.config import Config
    from lazyfs_snapshotter.lazy import LazyLayers

    off = LazyLayers(tmp_path / "off", Config(fork_server=False), None)
    off._start_fork_server()
    assert off._forks is None
    from lazyfs_snapshotter.metadata import MetadataStore

    on = LazyLayers(tmp_path / "on", Config(), None)
    on.root.mkdir()
    on.start(MetadataStore(on.root / "metadata.db"))
    servers = [on._forks]
    try:
        first = servers[0]
        assert first is not None and first.alive() and first.socket.exists()
        first.stop()  # it died: the periodic check starts another
        on.check()
        servers.append(on._forks)
        assert on._forks is not None and on._forks is not first and on._forks.alive()
        on.close(unmount=False)  # stops the fork server even when mounts stay
        assert on._forks is None and not any(s.alive() for s in servers if s is not None)
    finally:
        for s in servers:
            if s is not None:
                s.stop()
        on.store.close()


def test_lazyfs_mount_uses_a_fork_server_it_finds(image: str, tmp_path: Path) -> None:
    """``lazyfs mount`` from a shell: the whole command runs in a fork of the server named by
    the environment (the default socket otherwise), on the caller's stdout and stderr, and
    exits with the command's code; errors still come back as one line."""
    server = ForkServer.start(tmp_path / "forks.sock")
    env = {**os.environ, SOCKET_ENV: os.fspath(server.socket)}
    mnt = _mnt(tmp_path)
    try:
        out = subprocess.run(
            lazyfs_argv("mount", image, os.fspath(mnt), "--read-only", "--cache",
                        os.fspath(tmp_path / "c"), "--log", os.fspath(tmp_path / "log")),
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        d = attach(mnt)
        assert out.stdout == f"{mnt}: mounted {image} (pid {d.pid})\n"
        # A fork of the server (a daemon started anew is "python3"), named for what it runs.
        assert Path(f"/proc/{d.pid}/comm").read_text() == "lazyfs-mount\n"
        assert b"serve-forks" not in Path(f"/proc/{d.pid}/cmdline").read_bytes()
        assert os.getsid(d.pid) == d.pid
        assert (mnt / "f").read_bytes() == DATA
        d.stop()
        bad = subprocess.run(
            lazyfs_argv("mount", f"oci:{tmp_path / 'nothing'}", os.fspath(mnt), "--read-only"),
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 1 and "not an OCI image layout" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        assert server.alive()
    finally:
        with contextlib.suppress(LazyfsError):
            attach(mnt).stop()
        server.stop()
        clear_mountpoint(mnt)


def test_the_command_fast_path_leaves_daemons_and_help_alone(tmp_path: Path) -> None:
    from lazyfs.fs.forkserver import run_in_server

    sock = tmp_path / "listening.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(os.fspath(sock))
        listener.listen(8)
        listener.setblocking(False)
        for argv in (["mount", "x", "m", "--ready-fd", "5"], ["mount", "--help"],
                     ["-v", "mount", "x", "m", "--foreground"], ["pull", "x"], []):  # fmt: skip
            assert run_in_server(argv, sock) is None
        with pytest.raises(BlockingIOError):  # none of them even connected
            listener.accept()
    nobody = tmp_path / "nobody.sock"
    nobody.touch()  # not a server there: run here
    assert run_in_server(["mount", "x", "m"], nobody) is None



def test_a_server_that_cannot_listen_says_why(tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 120) / "forks.sock"  # beyond a unix socket's path limit
    with pytest.raises(LazyfsError, match="fork server did not start: cannot listen on"):
        ForkServer.start(too_long)
