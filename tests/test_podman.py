"""podman (Debian's 4.3.1, containers/storage 1.43) partial-pulls lazyfs zstd:chunked images.

podman runs with its own root, runroot, tmpdir and config files in the test's directory, so
the machine's container storage is never touched.  Bytes are counted at a proxy in front of
the registry; podman's debug log says when it took the partial path.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.testing.cstorage import awkward_tars, concat
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import MTIME, Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.rootfs import PROGRAMS, host_rootfs_items
from tests.support.fixtures import registry  # noqa: F401

PARTIAL = "Retrieved partial blob"


class Podman:
    def __init__(self, base: Path, registry_host: str) -> None:
        self.base = base
        base.mkdir()
        # podman refuses a runroot path over 50 characters: a short one of our own.
        self.runroot = Path(tempfile.mkdtemp(prefix="lazyfs-podman-"))
        (base / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'runroot = "{self.runroot}"\n'
            f'graphroot = "{base}/root"\n'
            "[storage.options]\n"
            # What partial pulls need (off by default in Debian's podman).
            'pull_options = {enable_partial_images = "true", use_hard_links = "false", '
            'ostree_repos = ""}\n'
        )
        (base / "registries.conf").write_text(
            "unqualified-search-registries = []\n"
            f'[[registry]]\nlocation = "{registry_host}"\ninsecure = true\n'
        )
        (base / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            'runtime = "runc"\n'
            "[network]\n"
            f'network_config_dir = "{base}/networks"\n'
            "[containers]\n"
            # podman raises NOFILE and NPROC by default, which this sandbox refuses.
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        )
        (base / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            "CONTAINERS_CONF": str(base / "containers.conf"),
        }

    def run(self, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman",
            "--root", str(self.base / "root"),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.base / "tmp"),
            "--storage-driver", "overlay",
        ]  # fmt: skip
        if debug:
            cmd += ["--log-level", "debug"]
        return subprocess.run(
            cmd + list(args), env=self.env, capture_output=True, text=True, timeout=120
        )

    def pull(self, ref: str) -> str:
        policy = str(self.base / "policy.json")
        res = self.run("pull", "--signature-policy", policy, ref, debug=True)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stderr

    def close(self) -> None:
        self.run("rm", "--all", "--force")
        self.run("rmi", "--all", "--force")
        # Whatever podman left mounted under its root goes before the directory does.
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for root in (str(self.base), str(self.runroot)):
            for m in sorted((m for m in mounts if m.startswith(root + "/")), reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture
def podman(tmp_path: Path, registry: RegistryInstance) -> Iterator[tuple[Podman, FaultProxy]]:  # noqa: F811
    with FaultProxy(registry.url) as proxy:
        p = Podman(tmp_path / "podman", proxy.host)
        try:
            yield p, proxy
        finally:
            p.close()


def _image(path: Path, changed: bytes | None) -> tuple[Path, int]:
    """A runnable image (the host's sh and friends) with 20 data files of 200 kB; ``changed``
    replaces data/f3.  Returns the converted layout and its layer blob's size."""
    items = [*host_rootfs_items(), Item("data", "dir", mode=0o755)]
    for i in range(20):
        data = seeded_bytes(200_000, i) if i != 3 or changed is None else changed
        items.append(Item(f"data/f{i}", data=data))
    make_layout(path / "src", [make_tar(items)])
    convert(f"oci:{path / 'src'}:latest", f"oci:{path / 'lazy'}:latest")
    blobs = sorted((path / "lazy" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    return path / "lazy", blobs[-1].stat().st_size


def test_podman_partial_pull_runs_and_updates_fetch_only_changed_files(
    tmp_path: Path,
    registry: RegistryInstance,  # noqa: F811
    podman: tuple[Podman, FaultProxy],
) -> None:
    pm, proxy = podman
    v1, size1 = _image(tmp_path / "v1", None)
    v2, size2 = _image(tmp_path / "v2", b"changed in v2\n")
    push_oci_layout(v1, f"{registry.host}/podapp:v1")
    push_oci_layout(v2, f"{registry.host}/podapp:v2")

    proxy.reset()
    log = pm.pull(f"{proxy.host}/podapp:v1")
    assert PARTIAL in log, "podman did not take the partial-pull path for v1"
    # Nothing local to share yet: every chunk comes over, but in range requests, not more.
    assert proxy.blob_bytes < size1 * 1.05

    proxy.reset()
    log = pm.pull(f"{proxy.host}/podapp:v2")
    assert PARTIAL in log, "podman did not take the partial-pull path for v2"
    # One changed 14-byte file: the TOC and that file's chunk, not the 4 MB blob.
    assert proxy.blob_bytes < size2 // 100, (proxy.blob_bytes, size2)

    res = pm.run(
        "run", "--rm", "--network", "none", f"{proxy.host}/podapp:v2",
        "/bin/sh", "-c", "cat /data/f3 && sha256sum /data/f4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "changed in v2"
    assert lines[1].split()[0] == hashlib.sha256(seeded_bytes(200_000, 4)).hexdigest()


def test_podman_partial_pulls_layers_from_awkward_tars(
    tmp_path: Path,
    registry: RegistryInstance,  # noqa: F811
    podman: tuple[Podman, FaultProxy],
) -> None:
    """A layer whose headers say more than a normalised TOC would (``./`` names, type bits in
    modes, a V7 directory, GNU and PAX access/change times, a hardlink spelt ``./``) carries
    a tar-split matching its TOC, and podman 4.3.1 still partial-pulls and runs it."""
    pm, proxy = podman
    tars = awkward_tars()
    times = io.BytesIO()
    with tarfile.open(fileobj=times, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("./t")
        info.size, info.mtime = 3, MTIME
        info.pax_headers = {"atime": "1700000001.5", "ctime": "1700000002"}
        tf.addfile(info, io.BytesIO(b"tt\n"))
    awkward = concat(
        tars["dot-slash"], tars["mode-type-bits"], tars["gnu-atime-ctime"], times.getvalue()
    )
    base = make_tar(host_rootfs_items((*PROGRAMS, "/usr/bin/stat")))
    make_layout(tmp_path / "src", [base, awkward])
    convert(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'lazy'}:latest")
    push_oci_layout(tmp_path / "lazy", f"{registry.host}/awkward:v1")
    sizes = sum(p.stat().st_size for p in (tmp_path / "lazy" / "blobs" / "sha256").iterdir())

    proxy.reset()
    log = pm.pull(f"{proxy.host}/awkward:v1")
    assert log.count(PARTIAL) == 2, "podman did not partial-pull both layers"
    assert proxy.blob_bytes < sizes * 1.05
    res = pm.run(
        "run", "--rm", "--network", "none", f"{proxy.host}/awkward:v1",
        "/bin/sh", "-c",
        "cat /etc/a /etc/h /usr/f /old/f /g /t && cat /etc/s && echo"
        " && stat -c '%a %n' /usr /usr/f /old /old/f && stat -c '%h %n' /etc/a",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [
        "a" * 100 + "a" * 100 + "hello" + "abc" + "gg" + "tt",
        # podman 4.3.1 spells the target "a" after a partial pull (it cleans it): the same file.
        "a" * 100,
        "755 /usr",
        "644 /usr/f",
        "755 /old",
        "644 /old/f",
        "2 /etc/a",  # /etc/h, spelt ./etc/a in its header, is a hardlink to it
    ]
