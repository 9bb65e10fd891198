"""A big lower directory listed (``os.listdir``: getdents in 32 KiB parts) on a quiet mount and
while names are created and removed in another directory: each part of the listing is an own
readdir request, and the daemon keeps a directory's sorted listing between them only as long
as that directory does not change.  Run from the repo root, as root:

    .venv/bin/python -m scripts.bench_listing [--names 30000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from lazyfs_tools.convert import convert

from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import mounted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=30000)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        items = [Item("d", "dir", mode=0o755), Item("o", "dir", mode=0o755)]
        items += [Item(f"d/entry-{i:06d}", data=b"") for i in range(a.names)]
        make_layout(tmp / "src", [make_tar(items)], tag="v1")
        convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
        args = ("--upper", str(tmp / "upper"), "--cache", str(tmp / "c"), "--no-prefetch")
        with mounted(f"oci:{tmp / 'img'}:v1", tmp / "mnt", *args) as m:
            d, other = m.mountpoint / "d", m.mountpoint / "o"
            quiet, busy = [], []
            for _ in range(a.reps):
                for times, churning in ((quiet, False), (busy, True)):
                    (d / "poke").write_bytes(b"")  # the kernel's cached listing goes
                    os.unlink(d / "poke")
                    stop = threading.Event()

                    def churn(stop: threading.Event) -> None:
                        while not stop.is_set():
                            (other / "t").write_bytes(b"")
                            os.unlink(other / "t")
                            time.sleep(0.005)

                    th = threading.Thread(target=churn, args=(stop,))
                    if churning:
                        th.start()
                    t0 = time.perf_counter()
                    assert len(os.listdir(d)) == a.names
                    times.append(time.perf_counter() - t0)
                    stop.set()
                    if churning:
                        th.join()
        print(
            f"{a.names} names, medians of {a.reps}: ls quiet {statistics.median(quiet):.2f} s, "
            f"ls while names change in another directory {statistics.median(busy):.2f} s"
        )


if __name__ == "__main__":
    main()
