"""Everything a benchmark run creates is recorded here first, so teardown touches only that.

The record lives in ``.bench/state.json`` and survives a crash: ``scripts/bench.sh --cleanup``
reads it and undoes what is listed (mounts under the run directory, processes by PID *and*
start time, the veth pair and the namespace).  Teardown is idempotent: every step checks
first and ignores what is already gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import BENCH_DIR, log

STATE_FILE = BENCH_DIR / "state.json"
RUN_DIR = BENCH_DIR / "run"  # every mountpoint of a run lives under here


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if the PID is gone or a
    zombie (dead, waiting for a parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass
class State:
    netns: str | None = None
    veth: str | None = None
    # pid -> [starttime, label]; a PID is signalled only while its start time still matches
    pids: dict[str, list[int | str]] = field(default_factory=dict)

    def save(self) -> None:
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(STATE_FILE)

    @classmethod
    def load(cls) -> State:
        try:
            data = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return cls()
        return cls(data.get("netns"), data.get("veth"), dict(data.get("pids", {})))

    def add_pid(self, pid: int, label: str) -> None:
        self.pids[str(pid)] = [proc_starttime(pid) or 0, label]
        self.save()

    def drop_pid(self, pid: int) -> None:
        self.pids.pop(str(pid), None)
        self.save()


def stop_recorded_pid(pid: int, starttime: int, label: str, timeout: float = 10.0) -> None:
    if proc_starttime(pid) != starttime:
        return  # gone, or the PID now belongs to somebody else
    log(f"cleanup: stopping {label} (pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc_starttime(pid) == starttime and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if proc_starttime(pid) == starttime:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def mounts_under(root: Path) -> list[str]:
    """Mountpoints at or below ``root`` (deepest first), from /proc/self/mountinfo."""
    prefix = str(root.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(set(found), key=len, reverse=True)


def unmount_all_under(root: Path) -> None:
    for mp in mounts_under(root):
        log(f"cleanup: unmounting {mp}")
        res = subprocess.run(["fusermount3", "-u", mp], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", mp], capture_output=True)
        if mp in mounts_under(root):
            subprocess.run(["umount", "-l", mp], capture_output=True)


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return subprocess.run(argv, capture_output=True).returncode == 0


def netns_exists(name: str) -> bool:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return any(line.split()[0] == name for line in res.stdout.splitlines() if line.strip())


def teardown(state: State | None = None) -> None:
    """Undo everything recorded (idempotent); safe to call any number of times."""
    state = state or State.load()
    unmount_all_under(RUN_DIR)
    for pid_s, (start, label) in list(state.pids.items()):
        stop_recorded_pid(int(pid_s), int(start), str(label))
        state.pids.pop(pid_s, None)
    unmount_all_under(RUN_DIR)  # a daemon stopping late may have left one
    if state.veth and link_exists(state.veth):
        log(f"cleanup: deleting veth {state.veth}")
        subprocess.run(["ip", "link", "del", "dev", state.veth], capture_output=True)
    if state.netns and netns_exists(state.netns):
        log(f"cleanup: deleting netns {state.netns}")
        subprocess.run(["ip", "netns", "del", state.netns], capture_output=True)
    state.veth = state.netns = None
    with contextlib.suppress(FileNotFoundError):
        STATE_FILE.unlink()


LOCK_FILE = BENCH_DIR / "bench.lock"


@contextlib.contextmanager
def run_lock(timeout: float = 1800.0) -> Iterator[None]:
    """One harness at a time on this machine: they share the namespace, the veth and the
    state file, so a second run (or --cleanup) waits until the first has torn down."""
    import fcntl

    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as f:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    f.seek(0)
                    log(f"another bench run holds {LOCK_FILE} ({f.read().strip()}); waiting")
                    waited = True
                if time.monotonic() > deadline:
                    raise RuntimeError("timed out waiting for another bench run") from None
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
