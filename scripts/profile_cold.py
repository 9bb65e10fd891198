"""Where a cold start with stored prefetch groups spends its time: every request at the proxy
(arrival and answer, relative to the daemon's spawn), the mount's readiness and the start-up's
end, for the demo's sample image on a loopback registry behind a proxy that delays each request
by ``--rtt`` seconds (a round trip, no bandwidth limit).

``.venv/bin/python scripts/profile_cold.py [--rtt 0.04] [--reps 2] [--image sample|debian]``
"""

from __future__ import annotations

import argparse
import shutil
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=float, default=0.04)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--image", choices=("sample", "debian"), default="sample")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-cold-", dir=bl.BENCH_DIR))
    try:
        _, lazy, tag, startup, says = cold_image(args.image, work)
        with RegistryInstance(work / "registry") as reg, FaultProxy(reg.url) as proxy:
            push_oci_layout(lazy, f"{reg.host}/cold/groups:{tag}", tag=tag)
            ref = f"{reg.host}/cold/groups:{tag}"
            trace_groups(ref, startup, work)
            mnt = work / "mnt"
            mnt.mkdir()
            for i in range(args.reps):
                cache = work / f"cache-{i}"
                proxy.reset()
                proxy.match = "/v2/"  # count every request, documents too
                proxy.delay = args.rtt
                t0 = time.monotonic()
                d = spawn(f"{proxy.host}/cold/groups:{tag}", mnt,
                          ["--read-only", "--plain-http", "--cache", str(cache)],
                          log=work / "mnt.log", timeout=120)  # fmt: skip
                ready = time.monotonic() - t0
                try:
                    out = subprocess.run(["chroot", str(mnt), *startup], capture_output=True,
                                         text=True, check=True)  # fmt: skip
                    assert says in out.stdout
                    done = time.monotonic() - t0
                finally:
                    d.stop()
                print(f"--- rep {i + 1}: rtt {args.rtt * 1000:.0f} ms, ready {ready:.3f} s, "
                      f"start-up done {done:.3f} s, {len(proxy.paths)} requests, "
                      f"{proxy.blob_bytes / 2**20:.2f} MiB, of them multipart part headers "
                      f"{(proxy.blob_bytes - proxy.payload_bytes) / 1024:.1f} KiB")  # fmt: skip
                ins = iter(proxy.ranges)  # "in" events and ranges are appended together
                outs = iter(proxy.served)  # as are "out" events of answered blob requests
                for kind, path, t in proxy.events:
                    if kind == "in":
                        print(f"  {t - t0:7.3f} in  {_what(path, next(ins, None))}")
                    else:
                        print(f"  {t - t0:7.3f} out {_what(path, None)} {next(outs, ('', 0))[1]} B")
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
