"""Memory per container with the lazyfs snapshotter: RSS of the chain's FUSE daemon and of the
snapshotter with N running containers of one lazy image (root; loopback only).

    .venv/bin/python scripts/bench_snapshotter_memory.py [--counts 1,5,10]

Starts its own registry, containerd and snapshotter under a temporary directory and stops
them (and the containers) by PID at the end.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
from contextlib import ExitStack
from pathlib import Path

from lazyfs_snapshotter.testing import SnapshotterProcess
from lazyfs_tools.convert import convert

from lazyfs.fs.daemon import Daemon
from lazyfs.testing.containerd import ContainerdInstance
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import make_layout, make_tar
from lazyfs.testing.rootfs import PROGRAMS, host_rootfs_items

SN = "lazyfs"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1,5,10", help="container counts to measure at")
    counts = sorted({int(n) for n in p.parse_args().counts.split(",")})
    with tempfile.TemporaryDirectory(prefix="lzm-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        reg = stack.enter_context(RegistryInstance(base / "registry"))
        make_layout(base / "src", [make_tar(host_rootfs_items((*PROGRAMS, "/bin/sleep")))],
                    tag="v1")
        convert(f"oci:{base / 'src'}:v1", f"oci:{base / 'lazy'}:v1")
        ref = f"{reg.host}/mem/app:v1"
        push_oci_layout(base / "lazy", ref, tag="v1")
        conf = base / "sn.toml"
        conf.write_text(f'[registry]\nplain_http = ["{reg.host}"]\n')
        sp = SnapshotterProcess(base / "sn", args=("--config", str(conf), "--unmount-on-exit"))
        stack.callback(sp.stop)
        sp.start()
        ctrd = stack.enter_context(
            ContainerdInstance(base / "ctrd", proxy_snapshotters={SN: sp.address}))
        ctrd.ctr("images", "rpull", "--plain-http", "--snapshotter", SN, ref,
                 binary="ctr-remote", capture=True)
        names: list[str] = []

        def remove_all() -> None:
            for name in names:
                ctrd.ctr("task", "kill", "-s", "SIGKILL", name, check=False, capture=True)
                ctrd.ctr("task", "rm", "-f", name, check=False, capture=True)
                ctrd.ctr("containers", "rm", name, check=False, capture=True)

        stack.callback(remove_all)
        assert sp.proc is not None
        print(f"{'containers':>10} {'daemons':>8} {'daemon RSS':>11} {'snapshotter RSS':>16}")
        for n in counts:
            while len(names) < n:
                name = f"c{len(names)}"
                ctrd.ctr("run", "-d", "--snapshotter", SN, ref, name, "/bin/sleep", "3600",
                         capture=True)
                names.append(name)
            with sqlite3.connect(sp.root / "metadata.db") as db:
                rows = list(db.execute("SELECT pid, mountpoint FROM daemons WHERE pid != 0"))
            daemon = sum(rss_kib(pid) for pid, _ in rows)
            print(f"{n:>10} {len(rows):>8} {daemon / 1024:>8.1f} MiB "
                  f"{rss_kib(sp.proc.pid) / 1024:>12.1f} MiB")
        remove_all()
        names.clear()
        with sqlite3.connect(sp.root / "metadata.db") as db:
            for pid, mnt in db.execute("SELECT pid, mountpoint FROM daemons WHERE pid != 0"):
                Daemon(pid, mnt).stop()


if __name__ == "__main__":
    main()
