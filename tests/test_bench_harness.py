"""The benchmark harness end to end, smallest case: ``scripts/bench.sh --quick --profile lan
startup`` on the 1k-file synthetic image, one repetition.  It must produce a result JSON with
every contender and leave no namespace, veth, mount or process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchwan import netns  # noqa: E402
from benchwan.state import RUN_DIR, STATE_FILE, mounts_under  # noqa: E402

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


@pytest.mark.timeout(240)
def test_quick_startup_lan_end_to_end(tmp_path: Path) -> None:
    results = tmp_path / "results"
    res = subprocess.run(
        [
            str(ROOT / "scripts" / "bench.sh"),
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
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
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

    # nothing left behind
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns.NETNS not in ns
    assert subprocess.run(["ip", "link", "show", netns.VETH_HOST], capture_output=True).returncode
    assert not STATE_FILE.exists()
    assert not mounts_under(RUN_DIR)
    assert not _pids_running(str(ROOT / "scripts" / "benchwan" / "relay.py"))
    assert not _pids_running(str(RUN_DIR / "registry.yml"))
    assert not _pids_running(str(RUN_DIR / "mnt"))
