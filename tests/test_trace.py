"""Access traces and prefetch on real FUSE mounts: recording, dump, trace run, --prefetch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lazyfs.fs.unmount import is_mounted
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run, start_mount
from lazyfs.testing.rootfs import PROGRAMS, host_rootfs_items
from lazyfs.trace.recorder import MAX_RANGES, _File
from lazyfs.trace.schema import (
    GROUPS_KIND,
    Group,
    PrefetchGroups,
    RankedEntry,
    Tier,
    Trace,
    decode_trace,
    encode,
)

A = seeded_bytes(3000, 1)
C = seeded_bytes(50_000, 2)
BIG = seeded_bytes(3 * 1024 * 1024, 3)
PF = {f"pf/f{i}": seeded_bytes(512 * 1024, 10 + i) for i in range(8)}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("trace-image")
    base = [
        *host_rootfs_items((*PROGRAMS, "/usr/bin/head")),
        Item("a", data=A),
        Item("b", "dir", mode=0o755),
        Item("b/c", data=C),
        Item("big", data=BIG),
        Item("unread", data=b"never read\n"),
    ]
    extra = [Item("pf", "dir", mode=0o755), *(Item(n, data=v) for n, v in PF.items())]
    make_lazy_layout(d / "lazy", [make_tar(base), make_tar(extra)])
    lazy = d / "lazy"
    index = json.loads((lazy / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((lazy / "blobs" / "sha256" / mdigest[7:]).read_text())
    return {
        "ref": f"oci:{lazy}:v1",
        "manifest": mdigest,
        "layers": [layer["digest"] for layer in manifest["layers"]],
    }


def _stats(mnt: Path) -> dict[str, object]:
    res = run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True)
    return json.loads(res.stdout)


def _subsequence(want: list[str], have: list[str]) -> bool:
    it = iter(have)
    return all(any(w == h for h in it) for w in want)


# ---------------------------------------------------------------------------- recorder unit


def test_ranges_merge_and_stay_bounded() -> None:
    f = _File("x", None, "sha256:0")  # type: ignore[arg-type]
    for start, end in [(0, 10), (10, 20), (40, 50), (15, 45), (100, 110), (90, 95), (95, 100)]:
        f.add_range(start, end)
    assert f.ranges == [[0, 50], [90, 110]]
    for i in range(MAX_RANGES * 3):
        f.add_range(1000 + i * 10 + (i % 7), 1000 + i * 10 + 5 + (i % 7))
    assert len(f.ranges) <= MAX_RANGES
    assert f.ranges == sorted(f.ranges)
    assert all(a[1] < b[0] for a, b in zip(f.ranges, f.ranges[1:], strict=False))
    assert f.ranges[0] == [0, 50] and f.ranges[-1][1] == 1000 + (MAX_RANGES * 3 - 1) * 10 + 5 + (
        (MAX_RANGES * 3 - 1) % 7
    )


# ---------------------------------------------------------------------------- recording


def test_trace_lists_what_the_workload_read_in_order(
    image: dict[str, object], tmp_path: Path
) -> None:
    mnt, out = tmp_path / "mnt", tmp_path / "trace.json"
    ref = str(image["ref"])
    # --no-prefetch: the start-up landmarks' neighbours would be this small image's files.
    args = ("--read-only", "--no-prefetch", "--cache", str(tmp_path / "c"))
    with mounted(ref, mnt, *args, "--trace", str(out), "--group", "g"):
        # binary output: discarded outside the chroot, which has no /dev/null
        res = subprocess.run(
            ["chroot", str(mnt), "/bin/sh", "-c", "cat /a; cat /b/c; head -c 10 /big"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert res.returncode == 0, res.stderr
        # dump while mounted: stdout, and atomically to a file
        dumped = run(*lazyfs_cmd("trace", "dump", str(mnt)))
        assert dumped.returncode == 0, dumped.stderr
        live = decode_trace(dumped.stdout.encode())
        res = run(*lazyfs_cmd("trace", "dump", str(mnt), "--out", str(tmp_path / "d.json")))
        assert res.returncode == 0, res.stderr
        assert decode_trace((tmp_path / "d.json").read_bytes()).files == live.files
        assert not out.exists()  # written when the mount ends
    trace = decode_trace(out.read_bytes())
    assert [f.path for f in trace.files] == [f.path for f in live.files]

    assert trace.group == "g" and trace.image == ref
    assert trace.manifest == image["manifest"] and trace.layers == image["layers"]
    assert trace.duration_ns >= live.duration_ns > 0
    paths = [f.path for f in trace.files]
    assert _subsequence(["bin/sh", "a", "b/c", "big"], paths), paths
    assert len(paths) == len(set(paths))
    assert "unread" not in paths and not any(p.startswith("pf/") for p in paths)
    files = {f.path: f for f in trace.files}
    a, c, big = files["a"], files["b/c"], files["big"]
    assert a.ranges == [(0, len(A))] and a.bytes_read == len(A) and a.reads == 1
    assert c.ranges == [(0, len(C))] and c.bytes_read == len(C)
    # head read 10 bytes; the kernel's readahead asks for more, but not the whole file.
    assert len(big.ranges) == 1 and big.ranges[0][0] == 0 and 10 <= big.ranges[0][1] < len(BIG)
    for f, data in ((a, A), (c, C), (big, BIG)):
        assert f.digest.removeprefix("sha256:") == hashlib.sha256(data).hexdigest()
        assert f.size == len(data) and f.layer == image["layers"][0]
        assert 0 <= f.first_open_ns <= f.first_read_ns
    assert a.first_open_ns < c.first_open_ns < big.first_open_ns
    assert sum(f.wait_ns for f in trace.files) > 0  # a cold cache waited for the source


def test_trace_written_on_sigterm_and_dump_needs_trace(
    image: dict[str, object], tmp_path: Path
) -> None:
    mnt, out = tmp_path / "mnt", tmp_path / "t.json"
    m = start_mount(str(image["ref"]), mnt, "--read-only", "--trace", str(out))
    try:
        assert (mnt / "a").read_bytes() == A
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(15)
        assert not is_mounted(str(mnt))
    finally:
        m.stop()
    trace = decode_trace(out.read_bytes())
    assert [f.path for f in trace.files] == ["a"] and trace.group == "default"

    with mounted(str(image["ref"]), mnt, "--read-only"):
        res = run(*lazyfs_cmd("trace", "dump", str(mnt)))
        assert res.returncode == 1 and "--trace" in res.stderr
        assert res.stderr.count("\n") == 1


# ---------------------------------------------------------------------------- trace run


def test_trace_run_two_runs(image: dict[str, object], tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    out = tmp_path / "run.json"
    res = run(
        *lazyfs_cmd(
            "trace", "run", str(image["ref"]), "--group", "cat", "--out", str(out), "--runs", "2"
        ),
        "--",
        "/bin/sh",
        "-c",
        "cat /a /b/c > /dev/null; ls /proc/self/ > /dev/null; echo done",
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("done\n") == 2
    for i in (1, 2):
        trace = decode_trace((tmp_path / f"run.{i}.json").read_bytes())
        paths = [f.path for f in trace.files]
        assert trace.group == "cat" and _subsequence(["bin/sh", "a", "b/c"], paths), paths
        assert "unread" not in paths
    assert not out.exists()
    assert list(tmpdir.iterdir()) == []  # mounts, caches and upper dirs are gone


def test_trace_run_stops_when_idle_and_cleans_up_on_error(
    image: dict[str, object], tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    out = tmp_path / "idle.json"
    t0 = time.monotonic()
    # `cat` with no argument waits on stdin forever: only --idle ends the run.
    proc = subprocess.Popen(
        [
            *lazyfs_cmd("trace", "run", str(image["ref"]), "--group", "g", "--out", str(out)),
            "--idle",
            "1",
            "--timeout",
            "60",
            "--",
            "/bin/sh",
            "-c",
            "cat /a > /dev/null; cat",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert b"idle" in stdout and time.monotonic() - t0 < 30
    assert "a" in [f.path for f in decode_trace(out.read_bytes()).files]
    assert list(tmpdir.iterdir()) == []

    res = run(
        *lazyfs_cmd("trace", "run", f"oci:{tmp_path}/nope:v1", "--group", "g", "--out", str(out)),
        "--",
        "/bin/true",
        env=env,
    )
    assert res.returncode == 1 and res.stderr.startswith("lazyfs: ")
    assert res.stderr.count("\n") == 1
    assert list(tmpdir.iterdir()) == []


# ---------------------------------------------------------------------------- prefetch


def _groups(image: dict[str, object], entries: list[RankedEntry]) -> bytes:
    doc = PrefetchGroups(
        image=str(image["ref"]),
        manifest=str(image["manifest"]),
        layers=list(image["layers"]),  # type: ignore[call-overload]
        groups=[
            Group(name="other", runs=1, tiers=[]),
            Group(
                name="app",
                runs=2,
                tiers=[
                    Tier(name="always", entries=entries[:3]),
                    Tier(name="sometimes", entries=entries[3:]),
                ],
            ),
        ],
    )
    return encode(doc)


def _pf_entries(image: dict[str, object]) -> list[RankedEntry]:
    layer = image["layers"][1]  # type: ignore[index]
    return [
        RankedEntry(
            layer=layer,
            path=name,
            digest="sha256:" + hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        for name, data in PF.items()
    ]


def _read_pf_and_stats(mnt: Path) -> dict[str, int]:
    for name, data in PF.items():
        assert (mnt / name).read_bytes() == data
    layer = _stats(mnt)["layers"][1]["stats"]  # type: ignore[index]
    return {k: layer[k] for k in ("cache_misses", "wait_ns", "requests", "bytes_fetched")}


def _wait_prefetch(mnt: Path, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        pf = _stats(mnt)["prefetch"]
        assert isinstance(pf, dict)
        if pf["prefetch_done"] or time.monotonic() > deadline:
            return pf
        time.sleep(0.05)


def test_prefetch_fetches_the_group_before_it_is_read(
    image: dict[str, object], tmp_path: Path
) -> None:
    groups = tmp_path / "groups.json"
    groups.write_bytes(_groups(image, _pf_entries(image)))
    mnt = tmp_path / "mnt"
    # --no-prefetch: a cold baseline (the image holds a libc: its start-up landmarks).
    cold_args = ("--read-only", "--no-prefetch", "--cache", str(tmp_path / "cold"))
    with mounted(str(image["ref"]), mnt, *cold_args):
        assert _stats(mnt).get("prefetch") is None
        cold = _read_pf_and_stats(mnt)
    with mounted(
        str(image["ref"]),
        mnt,
        "--read-only",
        "--cache",
        str(tmp_path / "warmed"),
        "--prefetch",
        str(groups),
        "--group",
        "app",
    ):
        pf = _wait_prefetch(mnt)
        assert pf["prefetch_done"] and not pf["error"], pf
        assert pf["entries"] == len(PF) and pf["skipped"] == 0
        assert pf["prefetch_bytes"] == pf["prefetch_total"] == sum(map(len, PF.values()))
        before = _stats(mnt)["layers"][1]["stats"]  # type: ignore[index]
        warm = _read_pf_and_stats(mnt)
    print(f"\nprefetch: {pf}\nwithout prefetch: {cold}\nwith prefetch (reads): {warm}")
    assert cold["cache_misses"] > 0 and cold["wait_ns"] > 0
    assert warm["cache_misses"] == 0 and warm["wait_ns"] == 0
    assert warm["requests"] == before["requests"]  # the reads made no request of their own
    # merged: far fewer requests than the group's 64 chunks
    assert before["requests"] <= 8


def test_prefetch_skips_missing_entries_and_bad_files_fail_cleanly(
    image: dict[str, object], tmp_path: Path
) -> None:
    entries = [
        *_pf_entries(image)[:1],
        RankedEntry(layer=image["layers"][1], path="no/such/file", digest="sha256:00", size=1),  # type: ignore[index]
        RankedEntry(layer="sha256:" + "e" * 64, path="a", digest="sha256:00", size=1),
        RankedEntry(layer=image["layers"][0], path="b", digest="sha256:00", size=1),  # type: ignore[index]
    ]
    groups = tmp_path / "groups.json"
    groups.write_bytes(_groups(image, entries))
    mnt = tmp_path / "mnt"
    with mounted(str(image["ref"]), mnt, "--read-only", "--prefetch", str(groups)) as m:
        # no --group: the first group ("other", empty) is used
        pf = _wait_prefetch(mnt)
        assert pf["group"] == "other" and pf["prefetch_done"] and pf["entries"] == 0
        assert m.proc.poll() is None
    with mounted(
        str(image["ref"]), mnt, "--read-only", "--prefetch", str(groups), "--group", "app"
    ):
        pf = _wait_prefetch(mnt)
        assert pf["prefetch_done"] and pf["entries"] == 1 and pf["skipped"] == 3, pf
        assert (mnt / "a").read_bytes() == A and (mnt / "pf" / "f0").read_bytes() == PF["pf/f0"]

    bad = tmp_path / "bad.json"
    trace_doc = Trace(image="x", manifest="m", layers=[], group="g", started="s", files=[])
    cases = {
        "not json": (b"{nope", "not JSON"),
        "a trace": (encode(trace_doc), "not a lazyfs.prefetch-groups"),
        "newer": (json.dumps({"kind": GROUPS_KIND, "version": 99}).encode(), "version"),
        "no group": (_groups(image, entries), "no prefetch group 'zzz'"),
        "missing": (None, "cannot read"),
    }
    for what, (data, message) in cases.items():
        bad.unlink(missing_ok=True)
        if data is not None:
            bad.write_bytes(data)
        args = ["--prefetch", str(bad)] + (["--group", "zzz"] if what == "no group" else [])
        res = run(*lazyfs_cmd("mount", str(image["ref"]), str(mnt), "--read-only", *args))
        if res.returncode == 0:  # a daemon that should not exist: take it down by PID
            pid = int(res.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))
            run(*lazyfs_cmd("umount", "--lazy", str(mnt)))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert res.returncode == 1, (what, res.stderr)
        assert res.stderr.startswith("lazyfs: ") and res.stderr.count("\n") == 1, res.stderr
        assert message in res.stderr, (what, res.stderr)
        assert not is_mounted(str(mnt))
