"""The main job, end to end, on the embedded default image.

1. Build a sample image from this machine's Python 3 and standard library (cached in .demo/).
2. Convert it to zstd:chunked with `lazyfs convert`.
3. Serve both from Debian's docker-registry on 127.0.0.1.
4. Baseline: full pull and extract (skopeo + umoci), then run the start-up in a chroot.
5. lazyfs: mount lazily from the registry, run the same start-up, show what was fetched.
6. Remount with the warm cache: nothing is fetched.
7. Through containerd (its own daemon, root, state and sockets under the demo's directory):
   `ctr images pull` + `ctr run` with its overlayfs snapshotter, then `ctr-remote images
   rpull` + `ctr run` with the lazyfs snapshotter (scripts/bench_ctr.py's CtrStack).

Every daemon and mount started here is stopped (by PID) and unmounted, even on Ctrl-C.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_ctr import SN, CtrStack, pull_and_run  # noqa: E402
from benchlib import sigterm_as_interrupt  # noqa: E402
from lazyfs_tools.convert import convert  # noqa: E402

from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout  # noqa: E402
from lazyfs.testing.faultproxy import FaultProxy  # noqa: E402
from lazyfs.testing.mounts import lazyfs_cmd, run, start_mount  # noqa: E402
from lazyfs.testing.sample import PYTHON, WORKLOAD, build_sample_image  # noqa: E402

P = ParamSpec("P")
T = TypeVar("T")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def timed(fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kw)
    return result, time.perf_counter() - t0


def workload(rootfs: Path) -> float:
    res, secs = timed(run, "chroot", str(rootfs), PYTHON, "-c", WORKLOAD)
    if res.returncode != 0 or "started" not in res.stdout:
        raise SystemExit(f"workload failed in {rootfs}: {res.stderr.strip()}")
    return secs


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def main() -> int:
    sigterm_as_interrupt()  # a SIGTERM unwinds like Ctrl-C: every daemon stopped by PID
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    step("sample image: this machine's Python 3 and its standard library")
    src, secs = timed(build_sample_image, work / "sample")
    print(f"oci:{src}:sample ready ({secs:.1f}s)")
    lazy = work / "sample-lazy"
    shutil.rmtree(lazy, ignore_errors=True)
    step("lazyfs convert → zstd:chunked")
    report, secs = timed(convert, f"oci:{src}:sample", f"oci:{lazy}:sample")
    print(
        f"{report.layers} layer, {mib(report.bytes_in)} of tar → {mib(report.bytes_out)} "
        f"in {secs:.1f}s ({report.bytes_in / secs / 1e6:.0f} MB/s)"
    )

    with tempfile.TemporaryDirectory(prefix="lazyfs-demo-") as tmp_s:
        tmp = Path(tmp_s)
        with RegistryInstance(tmp / "registry") as reg:
            step(f"docker-registry on {reg.host}: pushing both images")
            push_oci_layout(src, f"{reg.host}/demo/python:gzip", tag="sample")
            push_oci_layout(lazy, f"{reg.host}/demo/python:lazy", tag="sample")

            step("baseline: full pull and extract (skopeo copy + umoci unpack), then start")
            t0 = time.perf_counter()
            subprocess.run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "-q",
                    "--src-tls-verify=false",
                    f"docker://{reg.host}/demo/python:gzip",
                    f"oci:{tmp / 'pulled'}:x",
                ],
                check=True,
            )
            subprocess.run(
                ["umoci", "unpack", "--image", f"{tmp / 'pulled'}:x", str(tmp / "bundle")],
                check=True,
                capture_output=True,
            )
            pull_secs = time.perf_counter() - t0
            run_secs = workload(tmp / "bundle" / "rootfs")
            pulled = sum(
                p.stat().st_size for p in (tmp / "pulled" / "blobs").rglob("*") if p.is_file()
            )
            print(
                f"pull+extract {pull_secs:.2f}s, start-up {run_secs:.2f}s, "
                f"{mib(pulled)} transferred"
            )

            step("lazyfs: mount lazily from the registry, then start")
            mnt, cache = tmp / "mnt", tmp / "cache"
            ref = f"{reg.host}/demo/python:lazy"
            args = ("--plain-http", "--upper", str(tmp / "upper"), "--cache", str(cache))
            m, mount_secs = timed(start_mount, ref, mnt, *args)
            try:
                lazy_run = workload(mnt)
                stats = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json")).stdout)
                print(run(*lazyfs_cmd("stats", str(mnt))).stdout.rstrip())
            finally:
                m.stop()
            layer = stats["layers"][0]["stats"]
            fetched, total = layer["bytes_fetched"], layer["bytes_total"]
            print(
                f"mount {mount_secs:.2f}s, start-up {lazy_run:.2f}s, fetched {mib(fetched)} "
                f"of {mib(total)} ({fetched / total:.1%}) in {layer['requests']} requests"
            )

            step("remount with the warm cache")
            m, warm_mount = timed(start_mount, ref, mnt, *args)
            try:
                warm_run = workload(mnt)
                warm = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json")).stdout)
            finally:
                m.stop()
            print(
                f"mount {warm_mount:.2f}s, start-up {warm_run:.2f}s, "
                f"{warm['layers'][0]['stats']['requests']} requests"
            )

            ctr_rows = through_containerd(reg, tmp / "ctr")

    step("summary (one run on loopback; see BENCHMARKS.md for medians and slow links)")
    base = pull_secs + run_secs
    cold = mount_secs + lazy_run
    rows = [
        ("pull + extract + start", base, pulled),
        ("lazyfs mount + start", cold, fetched),
        ("lazyfs, warm cache", warm_mount + warm_run, 0),
        *ctr_rows,
    ]
    print(f"{'':34}{'time to started':>16}{'bytes over the wire':>22}")
    for label, secs, nbytes in rows:
        print(f"{label:34}{secs:>15.2f}s{mib(nbytes):>22}")
    print(
        f"lazy start needs {fetched / pulled:.0%} of the bytes; "
        f"time ratio {cold / base:.2f}x the full pull"
    )
    return 0


def through_containerd(reg: RegistryInstance, base: Path) -> list[tuple[str, float, int]]:
    """The same start-up as a container: containerd's own pull and its overlayfs snapshotter,
    then the lazyfs snapshotter's lazy pull.  A counting proxy in front of the registry
    measures the blob bytes each way; all of it is stopped by PID on the way out."""
    rows = []
    with FaultProxy(reg.url) as proxy:
        step("containerd: `ctr images pull` (overlayfs snapshotter), then `ctr run`")
        with CtrStack(base / "overlayfs", proxy.host) as st:
            s = pull_and_run(st, f"{proxy.host}/demo/python:gzip", "overlayfs",
                             lambda: proxy.blob_bytes)  # fmt: skip
        print(f"pull+unpack {s.pull:.2f}s, run {s.run:.2f}s, {mib(s.bytes)}")
        rows.append(("containerd pull + run (overlayfs)", s.pull + s.run, s.bytes))

        step("containerd: `ctr-remote images rpull --snapshotter lazyfs`, then `ctr run`")
        with CtrStack(base / "lazyfs", proxy.host) as st:
            s = pull_and_run(st, f"{proxy.host}/demo/python:lazy", SN, lambda: proxy.blob_bytes)
            print(st.ctr("snapshots", "--snapshotter", SN, "ls").rstrip())
        print(
            f"rpull {s.pull:.2f}s ({mib(s.pull_bytes)}: footers, TOCs, config), "
            f"run {s.run:.2f}s, {mib(s.bytes)} in all"
        )
        rows.append(("containerd + lazyfs snapshotter", s.pull + s.run, s.bytes))
    return rows


if __name__ == "__main__":
    sys.exit(main())
