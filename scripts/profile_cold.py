"""Where a cold start with stored prefetch groups spends its time: every request at the proxy
(arrival and answer, relative to the daemon's spawn), the mount's readiness and the start-up's
end, for the demo's sample image on a loopback registry behind a proxy that delays each request
by ``--rtt`` seconds (a round trip, no bandwidth limit).

``.venv/bin/python scripts/profile_cold.py [--rtt 0.04] [--reps 2] [--image sample|debian]
[--before DIR] [--quiet]``

``--before DIR``: a checkout of an older lazyfs whose daemon starts every other repetition (as
``bench_speed.py --before``); the end prints, per daemon, medians of the moments that matter:
the manifest's request, the first prefetch request (a ranged blob request after the TOC's),
readiness and the start-up's end.  ``--quiet``: no per-request timeline.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl
from bench_speed import cold_image, trace_groups

from lazyfs.fs.daemon import spawn
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy


def _what(path: str, rng: str | None) -> str:
    if "/referrers/" in path:
        return "referrers API"
    if "/manifests/sha256-" in path:
        return "referrers tag (index)"
    if "/manifests/" in path:
        return "manifest " + path.rsplit("/", 1)[1][:19]
    if "/blobs/" in path:
        return f"blob {path.rsplit('/', 1)[1][7:19]} {rng or 'whole'}"
    return path


def _with_ranges(proxy: FaultProxy) -> list[tuple[tuple[str, str, float], str | None]]:
    """Each event with the Range of its request ("in" events and ranges are appended together)."""
    ins = iter(proxy.ranges)
    return [(ev, next(ins, None) if ev[0] == "in" else None) for ev in proxy.events]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=float, default=0.04)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--image", choices=("sample", "debian"), default="sample")
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    moments: dict[str, dict[str, list[float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="profile-cold-", dir=bl.BENCH_DIR))
    try:
        _, lazy, tag, startup, says = cold_image(args.image, work)
        with RegistryInstance(work / "registry") as reg, FaultProxy(reg.url) as proxy:
            push_oci_layout(lazy, f"{reg.host}/cold/groups:{tag}", tag=tag)
            ref = f"{reg.host}/cold/groups:{tag}"
            trace_groups(ref, startup, work)
            mnt = work / "mnt"
            mnt.mkdir()
            runs = [(i, who) for i in range(args.reps)
                    for who in (("after", "before") if args.before else ("after",))]  # fmt: skip
            for i, who in runs:
                cache = work / f"cache-{i}-{who}"
                proxy.reset()
                proxy.match = "/v2/"  # count every request, documents too
                proxy.delay = args.rtt
                t0 = time.monotonic()
                d = spawn(f"{proxy.host}/cold/groups:{tag}", mnt,
                          ["--read-only", "--plain-http", "--cache", str(cache)],
                          log=work / "mnt.log", timeout=120,
                          cwd=args.before if who == "before" else None)  # fmt: skip
                ready = time.monotonic() - t0
                try:
                    out = subprocess.run(["chroot", str(mnt), *startup], capture_output=True,
                                         text=True, check=True)  # fmt: skip
                    assert says in out.stdout
                    done = time.monotonic() - t0
                finally:
                    d.stop()
                seen = [(k, p, t - t0, r) for (k, p, t), r in _with_ranges(proxy)]
                chunk = [t for k, p, t, r in seen if k == "in" and r and "," not in r
                         and "/blobs/" in p][1:2]  # fmt: skip
                multi = [t for k, p, t, r in seen if k == "in" and r and "," in r]
                first = min(chunk + multi) if chunk or multi else float("nan")
                m = moments.setdefault(who, {})
                for name, value in (
                    ("manifest sent", seen[0][2]),
                    ("ready", ready),
                    ("first prefetch request", first),
                    ("start-up done", done),
                    # the same after the manifest's request (the process's own start, all
                    # CPU, varies most with the machine's load)
                    ("ready - manifest", ready - seen[0][2]),
                    ("first prefetch - manifest", first - seen[0][2]),
                    ("done - manifest", done - seen[0][2]),
                ):
                    m.setdefault(name, []).append(value)  # fmt: skip
                shutil.rmtree(cache, ignore_errors=True)
                if args.quiet:
                    continue
                print(f"--- rep {i + 1} ({who}): rtt {args.rtt * 1000:.0f} ms, "
                      f"ready {ready:.3f} s, start-up done {done:.3f} s, "
                      f"{len(proxy.paths)} requests, "
                      f"{proxy.blob_bytes / 2**20:.2f} MiB, of them multipart part headers "
                      f"{(proxy.blob_bytes - proxy.payload_bytes) / 1024:.1f} KiB")  # fmt: skip
                ins = iter(proxy.ranges)  # "in" events and ranges are appended together
                outs = iter(proxy.served)  # as are "out" events of answered blob requests
                for kind, path, t in proxy.events:
                    if kind == "in":
                        print(f"  {t - t0:7.3f} in  {_what(path, next(ins, None))}")
                    else:
                        print(f"  {t - t0:7.3f} out {_what(path, None)} {next(outs, ('', 0))[1]} B")
        for who, m in moments.items():
            print(f"{who}: medians of {len(m['ready'])} (s after spawn): " + ", ".join(
                f"{name} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                for name, v in m.items()))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
