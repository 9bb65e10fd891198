"""The benchmark harness end to end, smallest case: ``scripts/bench.sh --quick --profile lan
startup`` on the 1k-file synthetic image, one repetition.  It must produce a result JSON with
every contender and leave no namespace, veth, mount or process behind.  The run gets its own
namespace and veth names (``LAZYFS_BENCH_RUN``), so a concurrent run elsewhere never clashes,
and whatever it leaves on failure is torn down from its state record and by those names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchwan.netns import run_names  # noqa: E402
from benchwan.state import (  # noqa: E402
    RUN_DIR,
    STATE_FILE,
    link_exists,
    mounts_under,
    netns_exists,
)

# Needs root (network namespaces, FUSE), as CI has: without it the test fails, it never skips.


def _pids_running(cmd_fragment: str) -> list[int]:
    """PIDs whose command line contains ``cmd_fragment`` (read-only inspection)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd_fragment in cmd:
                found.append(int(d.name))
    return found


def _run_bench(argv: list[str], run: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``scripts/bench.sh ARGV`` as run ``run``; on timeout SIGTERM (bench.py tears down on it)."""
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "bench.sh"), *argv],
        cwd=ROOT,
        env={**os.environ, "LAZYFS_BENCH_RUN": run},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _leftovers(ns_name: str, veth: str) -> list[str]:
    return [f"netns {ns_name}"] * netns_exists(ns_name) + [f"veth {veth}"] * link_exists(veth)


@pytest.mark.timeout(240)
def test_quick_startup_lan_end_to_end(tmp_path: Path) -> None:
    run = f"t{os.getpid():x}"
    ns_name, veth, _ = run_names(run)
    try:
        _check_quick_startup(tmp_path, run)
        assert not _leftovers(ns_name, veth)
    finally:
        if STATE_FILE.exists() or _leftovers(ns_name, veth):
            _run_bench(["--cleanup"], run, 60)
        # The last resort, by this run's own names only.
        subprocess.run(["ip", "link", "del", "dev", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)


def _check_quick_startup(tmp_path: Path, run: str) -> None:
    results = tmp_path / "results"
    res = _run_bench(
        [
            "--quick",
            "--profile",
            "lan",
            "--startup-image",
            "syn1k",
            "--reps",
            "1",
            "--results-dir",
            str(results),
            "--no-markdown",
            "startup",
        ],
        run,
        200,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    (path,) = results.glob("*-lan.json")
    data = json.loads(path.read_text())
    assert data["profile"]["name"] == "lan"
    assert data["link"]["rtt_ms"] > 0.4  # the relay's delay is really there
    (sc,) = data["scenarios"]
    assert sc["scenario"] == "startup"
    rows = sc["rows"]
    for contender in ("pull+extract (gzip)", "lazyfs zstd:chunked", "lazyfs eStargz"):
        assert contender in rows, sorted(rows)
        assert rows[contender]["seconds"]["median"] > 0
        assert rows[contender]["veth_bytes"]["median"] > 0
    assert list(results.glob("*-lan-startup.png"))

    # nothing left behind (the namespace and veth are checked by the caller)
    assert not STATE_FILE.exists()
    assert not mounts_under(RUN_DIR)
    assert not _pids_running(str(ROOT / "scripts" / "benchwan" / "relay.py"))
    assert not _pids_running(str(RUN_DIR / "registry.yml"))
    assert not _pids_running(str(RUN_DIR / "mnt"))


def test_fuse_trace_requests_pair_each_send_with_its_end() -> None:
    """bench_startup_requests and bench_cold_phase read a trace's FUSE requests alike: one
    reader pairs each send with its end, on one connection."""
    from bench_startup_requests import fuse_requests

    head = "  python3-77 [001] ..... "
    trace = "\n".join([
        f"{head}10.000100: fuse_request_send: connection 52 req 2 opcode 1 (FUSE_LOOKUP) len 45",
        f"{head}10.000200: fuse_request_send: connection 53 req 2 opcode 15 (FUSE_READ) len 80",
        f"{head}10.000300: fuse_request_send: connection 52 req 4 opcode 15 (FUSE_READ) len 80",
        f"{head}10.000400: fuse_request_send: connection 52 req 6 opcode 2 (FUSE_FORGET) len 48",
        f"{head}10.000900: fuse_request_end: connection 52 req 4 len 131088 error 0",
        f"{head}10.001100: fuse_request_end: connection 52 req 2 len 144 error 0",
        f"{head}10.001200: fuse_request_end: connection 52 req 8 len 16 error 0",  # sent before
        "# a comment line",
    ])  # fmt: skip
    got = [(r.op, round(r.sent, 6), r.took and round(r.took, 6), r.reply_bytes)
           for r in fuse_requests(trace, 52)]  # fmt: skip
    assert got == [
        ("READ", 10.0003, 0.0006, 131088),
        ("LOOKUP", 10.0001, 0.001, 144),
        ("FORGET", 10.0004, None, 0),
    ]


def test_no_isatty_shim_keeps_isatty_out_of_the_kernel(tmp_path: Path) -> None:
    """bench_startup_requests --no-isatty: its preloaded shim answers isatty() in the process
    (False, even for a terminal), so no ioctl reaches the kernel; and a FUSE daemon's CPU is
    read from its threads' schedstat, a thread that ended between two readings left out."""
    from bench_startup_requests import build_no_isatty, cpu_between, task_cpu

    lib = build_no_isatty(tmp_path)
    probe = "import os, pty; m, s = pty.openpty(); print(os.isatty(s))"
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    shimmed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True,
        env={**os.environ, "LD_PRELOAD": str(lib)},
    )  # fmt: skip
    assert (plain.stdout.strip(), shimmed.stdout.strip()) == ("True", "False"), shimmed.stderr
    mine = task_cpu(os.getpid())
    assert sum(mine.values()) > 0 and task_cpu(None) == {}
    assert cpu_between({"1": 5, "2": 9}, {"1": 2_000_000_005, "3": 1_000_000_000}) == 3.0


def test_thread_sched_counts_the_main_threads_cpu() -> None:
    """bench_cold_phase's event-loop columns: a thread's run time grows while it works, and
    its wait for a CPU is read beside it (never negative)."""
    from bench_cold_phase import thread_sched

    cpu0, queued0 = thread_sched(os.getpid())
    sum(i * i for i in range(300_000))  # some CPU on this (the main) thread
    cpu1, queued1 = thread_sched(os.getpid())
    assert cpu1 > cpu0 and queued1 >= queued0 >= 0
