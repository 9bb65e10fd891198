"""pjdfstest, the POSIX file system conformance suite, on a writable lazyfs mount: 0 failed.

Its source is not part of the project: it is read from ``../shared/third_party/`` beside the
repository (or beside the main checkout of a git worktree), built in a temporary directory
for this run, and run as root with the current directory inside the mount, as its README says.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import mounted

REPO = Path(__file__).resolve().parent.parent
TARBALL = "pjdfstest.tar.gz"
RUN_TIMEOUT = 900


def third_party() -> Path:
    roots = [REPO]
    common = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        capture_output=True,
        text=True,
    )
    if common.returncode == 0:
        roots.append(Path(common.stdout.strip()).parent)  # the main checkout of a worktree
    for root in roots:
        candidate = root.parent / "shared" / "third_party" / TARBALL
        if candidate.is_file():
            return candidate
    pytest.fail(f"pjdfstest is absent: no ../shared/third_party/{TARBALL} beside {REPO}")


@pytest.fixture(scope="module")
def pjdfstest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("pjdfstest-build")
    with tarfile.open(third_party()) as tar:
        tar.extractall(build, filter="data")
    src = build / "pjdfstest"
    for cmd in (["autoreconf", "-ifs"], ["./configure"], ["make", "-j2"]):
        res = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr}"
    return src


# ~250 s on an idle machine, more under load: past pytest's 300 s default, within RUN_TIMEOUT.
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_pjdfstest_on_a_writable_mount(pjdfstest: Path, tmp_path: Path) -> None:
    items = [Item("etc", "dir", mode=0o755), Item("etc/hostname", data=b"lazyfs\n")]
    make_layout(tmp_path / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'lazy'}:v1")
    mnt = tmp_path / "mnt"
    args = ("--upper", str(tmp_path / "upper"), "--cache", str(tmp_path / "cache"))
    # allow_other: pjdfstest acts as other users too.
    with mounted(f"oci:{tmp_path / 'lazy'}:v1", mnt, *args, "--allow-other", "--no-prefetch") as m:
        work = mnt / "work"
        work.mkdir()
        t0 = time.monotonic()
        res = subprocess.run(
            ["prove", "-r", str(pjdfstest / "tests")],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        took = time.monotonic() - t0
        assert m.proc.poll() is None, m.log_text()[-3000:]
    summary = res.stdout[res.stdout.find("Test Summary Report") :]
    counts = re.search(r"Files=(\d+), Tests=(\d+)", res.stdout)
    assert counts is not None, res.stdout[-3000:] + res.stderr[-2000:]
    print(f"pjdfstest: {counts.group(1)} files, {counts.group(2)} tests in {took:.0f}s")
    assert "Result: PASS" in res.stdout, summary[-6000:]
