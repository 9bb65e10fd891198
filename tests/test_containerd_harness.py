"""The test containerd (lazyfs.testing.containerd) beside another one: test runs at once (CI
jobs, or engineers sharing a machine) must not see each other's containers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lazyfs.process import wait_pid
from lazyfs.testing.containerd import CGROUPS, RUNC_STATE, ContainerdInstance
from lazyfs.testing.layers import make_tar
from lazyfs.testing.rootfs import host_rootfs_items


def _task_pid(ctrd: ContainerdInstance, name: str) -> int:
    for line in ctrd.ctr("task", "ls", capture=True).stdout.splitlines()[1:]:
        task, pid, status = line.split()
        if task == name:
            assert status == "RUNNING", line
            return int(pid)
    raise AssertionError(f"no task {name}")


def _left(namespace: str) -> list[Path]:
    """What runc and ctr keep of a namespace for every containerd on the machine."""
    return [d for d in (RUNC_STATE / namespace, CGROUPS / namespace,
                        *CGROUPS.glob(f"*/{namespace}")) if d.exists()]  # fmt: skip


def test_two_containerds_run_one_container_name_apart_and_leave_nothing(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    with tarfile.open(fileobj=io.BytesIO(make_tar(host_rootfs_items(("/bin/sleep",))))) as tar:
        tar.extractall(rootfs, filter="tar")
    with ContainerdInstance() as a, ContainerdInstance() as b:
        # One namespace for both: b's create failed ("container with given ID already
        # exists"), and its clean-up killed a's container.
        assert a.namespace != b.namespace
        for ctrd in (a, b):
            ctrd.ctr("run", "-d", "--rootfs", str(rootfs), "same", "/bin/sleep", "600",
                     capture=True, timeout=60)
        pid_a, pid_b = _task_pid(a, "same"), _task_pid(b, "same")
        # b stops with its container still running (a test failing before its clean-up):
        # the container goes with it, and so does all it kept of its namespace.
        b.stop()
        assert wait_pid(pid_b, 10)
        assert _left(b.namespace) == []
        assert _task_pid(a, "same") == pid_a
    assert wait_pid(pid_a, 10) and _left(a.namespace) == []


def test_a_namespace_not_spelt_as_containerd_spells_one_is_refused() -> None:
    """A namespace becomes paths (and a glob) under runc's state and every cgroup hierarchy
    at the stop: "*" would remove every empty cgroup at their top, ".." their parents."""
    ctrd = ContainerdInstance()
    for bad in ("*", "..", ".", "a/b", "../../x", "a*", "-a", "a.", "é", "a" * 77):
        with pytest.raises(ValueError, match="not a containerd namespace"):
            ctrd.ctr_argv("task", "ls", namespace=bad)
    ctrd.namespace = "*"
    with pytest.raises(ValueError):
        ctrd.ctr_argv("task", "ls")
    assert ctrd._namespaces == set()  # nothing for the stop to remove
