"""The fast path (lazyfs.fs.fastpath) under load: Python run on the C reader thread while trio
and its worker threads run too.  Readers that race writers, renames and copy-ups never see a
byte that was never a file's; a SIGTERM or an unmount from outside while the reader answers
ends the daemon cleanly (its thread state, the GIL at join), with nothing raised in the reader."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lazyfs_tools.convert import convert

from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import Mount, mount_stats, mounted

N = 24
# Errors a client may see once the daemon is going or gone.
GONE = {errno.ENOTCONN, errno.ENOENT, errno.ECONNABORTED, errno.ENODEV, errno.EIO}


def content(i: int) -> bytes:
    return f"lower {i} ".encode() * (50 * (i + 1))


def image(tmp: Path) -> str:
    lower = [
        Item("d", "dir", mode=0o755),
        *(Item(f"d/f{i}", data=content(i)) for i in range(N)),
        *(Item(f"d/l{i}", "symlink", link=f"f{i}", mode=0o777) for i in range(N)),
    ]
    make_layout(tmp / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
    return f"oci:{tmp / 'img'}:v1"


def read_uncached(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = b""
        while chunk := os.pread(fd, 1 << 16, len(out)):
            out += chunk
        return out
    finally:
        os.close(fd)


def fast(m: Mount) -> int:
    return int(mount_stats(m.mountpoint)["c_requests"].get("fast", 0))


def no_reader_trouble(m: Mount) -> None:
    """Nothing raised in the reader thread (PyErr_WriteUnraisable's report) nor a fatal error."""
    text = m.log_text()
    for bad in ("Exception ignored", "Fatal Python error", "Traceback"):
        assert bad not in text, text[-4000:]


class Load:
    """Threads asking the mount for lookups, attributes, links, listings and reads until
    stopped; each failure other than the mount going away is kept."""

    def __init__(self, d: Path, work: Callable[[Path, int], None], threads: int = 4) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.done = 0
        self._threads = [
            threading.Thread(target=self._run, args=(d, work, k), daemon=True)
            for k in range(threads)
        ]

    def _run(self, d: Path, work: Callable[[Path, int], None], k: int) -> None:
        i = k
        while not self.stop.is_set():
            try:
                work(d, i % N)
                self.done += 1
            except OSError as e:
                if e.errno not in GONE:
                    self.errors.append(e)
            except BaseException as e:  # a wrong byte: an AssertionError
                self.errors.append(e)
            i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)
            assert not t.is_alive(), "a client hung on the mount"


def lower_work(d: Path, i: int) -> None:
    assert (d / f"f{i}").stat().st_size == len(content(i))
    assert os.readlink(d / f"l{i}") == f"f{i}"
    assert read_uncached(d / f"f{i}") == content(i)
    if i == 0:
        names = os.listdir(d)
        assert len(names) == 2 * N, names


def test_sigterm_while_the_reader_answers_ends_the_daemon_cleanly(tmp_path: Path) -> None:
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    img = image(tmp_path)
    for _ in range(2):
        with mounted(img, tmp_path / "mnt", *args) as m:
            d = m.mountpoint / "d"
            for i in range(N):
                assert read_uncached(d / f"f{i}") == content(i)
            before = fast(m)
            with Load(d, lower_work) as load:
                time.sleep(1.5)
                assert fast(m) > before
                m.proc.send_signal(signal.SIGTERM)
                m.proc.wait(15)
            assert not load.errors, load.errors[:3]
            assert load.done > 0
        assert m.proc.returncode == 0, m.log_text()[-4000:]
        no_reader_trouble(m)


def test_unmount_from_outside_while_the_reader_answers_ends_the_daemon_cleanly(
    tmp_path: Path,
) -> None:
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch")
    img = image(tmp_path)
    with mounted(img, tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        for i in range(N):
            assert read_uncached(d / f"f{i}") == content(i)
        with Load(d, lower_work) as load:
            time.sleep(1.5)
            subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], check=True)
            m.proc.wait(15)
        assert not load.errors, load.errors[:3]
    assert m.proc.returncode == 0, m.log_text()[-4000:]
    no_reader_trouble(m)


def test_readers_racing_renames_and_copy_ups_see_only_whole_files(tmp_path: Path) -> None:
    """A writer replaces files by rename (atomic: a reader opens the old file or the new one)
    and copies others up (chmod, append); the readers, answered by the fast path while trio
    runs the writer's requests between its waits, see each file whole, old or new."""
    args = ("--upper", str(tmp_path / "up"), "--cache", str(tmp_path / "c"), "--no-prefetch")
    img = image(tmp_path)
    versions: dict[int, set[bytes]] = {i: {content(i)} for i in range(N)}
    lock = threading.Lock()

    def reader(d: Path, i: int) -> None:
        try:
            data = read_uncached(d / f"f{i}")
        except FileNotFoundError:
            return  # between a rename's unlink and its link? never in one rename(2)
        with lock:
            known = set(versions[i])
        assert data in known, (i, len(data), data[:40])
        st = os.lstat(d / f"l{i}")
        assert st.st_mode & 0o170000 == 0o120000

    with mounted(img, tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        for i in range(N):
            assert read_uncached(d / f"f{i}") == content(i)
        before = fast(m)
        with Load(d, reader, threads=3) as load:
            for rnd in range(6):
                for i in range(N):
                    if i % 3 == 0:  # replaced by rename
                        new = f"round {rnd} file {i} ".encode() * (30 + i)
                        with lock:
                            versions[i].add(new)
                        (d / f".t{i}").write_bytes(new)
                        os.rename(d / f".t{i}", d / f"f{i}")
                    elif i % 3 == 1 and rnd == 0:  # copied up, bytes kept
                        os.chmod(d / f"f{i}", 0o600)
                    elif i % 3 == 2 and rnd == 0:  # copied up by a write that keeps them
                        with open(d / f"f{i}", "r+b") as f:
                            f.write(content(i)[:10])
                if load.errors:
                    break
        assert not load.errors, load.errors[:3]
        assert load.done > 0
        assert fast(m) > before
        assert m.stats()["handler_errors"] == 0
    assert m.proc.returncode == 0, m.log_text()[-4000:]
    no_reader_trouble(m)


def test_reads_from_memory_reach_the_trace(tmp_path: Path) -> None:
    """With --trace every READ reaches the recorder, those the fast path could answer from
    memory too: a trace short of them would rank the start-up's files wrong."""
    trace = tmp_path / "trace.json"
    args = ("--read-only", "--cache", str(tmp_path / "c"), "--no-prefetch", "--trace", str(trace))
    with mounted(image(tmp_path), tmp_path / "mnt", *args) as m:
        d = m.mountpoint / "d"
        for _ in range(2):  # fetched, then in memory
            for i in range(N):
                assert read_uncached(d / f"f{i}") == content(i)
            time.sleep(0.2)  # trio waits for I/O: the reader may answer
    assert m.proc.returncode == 0, m.log_text()[-4000:]
    files = {f["path"]: f for f in json.loads(trace.read_bytes())["files"]}
    for i in range(N):
        f = files[f"d/f{i}"]
        assert f["bytes_read"] == 2 * len(content(i)), f
        assert f["ranges"] == [[0, len(content(i))]], f
