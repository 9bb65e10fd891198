"""The kernel caches lower directories' listings (FOPEN_CACHE_DIR) and lower attributes for an
hour: what it shows must still follow every change the upper layer makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lazyfs_tools.convert import convert

from lazyfs.testing.layers import Item, make_layout, make_tar
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run

REPO = Path(__file__).resolve().parent.parent


def image(tmp: Path) -> str:
    lower = [
        Item("d", "dir", mode=0o755),
        *(Item(f"d/f{i}", data=b"x" * i) for i in range(40)),
        Item("d/sub", "dir", mode=0o755),
        Item("d/sub/deep", "dir", mode=0o755),
        Item("d/sub/deep/file", data=b"lower"),
        Item("e", "dir", mode=0o755),
        Item("e/gone", "dir", mode=0o755),
        Item("e/gone/inner", data=b"i"),
        Item("e/kept", data=b"k"),
    ]
    make_layout(tmp / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
    return f"oci:{tmp / 'img'}:v1"


def readdirs(mnt: Path) -> int:
    res = run(*lazyfs_cmd("stats", str(mnt), "--json"))
    assert res.returncode == 0, res.stderr
    n: int = json.loads(res.stdout)["readdir_requests"]
    return n


def test_the_patched_pyfuse3_is_installed() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pyfuse3_cache_dir.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, "run scripts/setup.sh: pyfuse3 lacks the cache_readdir patch"


def test_lower_listings_are_cached_and_follow_every_change(tmp_path: Path) -> None:
    args = ("--upper", str(tmp_path / "upper"), "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(image(tmp_path), tmp_path / "mnt", *args) as m:
        mnt = m.mountpoint
        want = sorted([*(f"f{i}" for i in range(40)), "sub"])
        # The cached listing lives in the directory inode's pages, which the kernel may
        # still drop: the whole inode once unused (dentry reclaim; drop_caches "2", as
        # tests/test_fs_hardening.py writes, from any test on the machine) or just the pages
        # (memory pressure).  The open descriptor pins the inode; over many listings, page
        # reclaim may cost a refill or two, where no caching costs a request per listing.
        pin = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert sorted(os.listdir(mnt / "d")) == want
            before = readdirs(mnt)
            listings = 20
            for _ in range(listings):
                assert sorted(os.listdir(mnt / "d")) == want
            asked = readdirs(mnt) - before
        finally:
            os.close(pin)
        assert asked < listings // 4, f"a lower directory's listing was not cached: {asked}"

        # every kind of change the upper layer makes shows in the next listing
        (mnt / "d" / "new").write_bytes(b"n")
        want.append("new")
        assert sorted(os.listdir(mnt / "d")) == sorted(want)
        os.unlink(mnt / "d" / "f0")  # a whiteout
        want.remove("f0")
        assert sorted(os.listdir(mnt / "d")) == sorted(want)
        os.rename(mnt / "d" / "f1", mnt / "d" / "f1-renamed")
        want[want.index("f1")] = "f1-renamed"
        assert sorted(os.listdir(mnt / "d")) == sorted(want)
        os.rename(mnt / "d" / "f2", mnt / "e" / "moved")  # across directories
        want.remove("f2")
        assert sorted(os.listdir(mnt / "d")) == sorted(want)
        assert sorted(os.listdir(mnt / "e")) == ["gone", "kept", "moved"]
        os.unlink(mnt / "e" / "gone" / "inner")
        os.rmdir(mnt / "e" / "gone")  # a directory's whiteout
        assert sorted(os.listdir(mnt / "e")) == ["kept", "moved"]
        os.mkdir(mnt / "e" / "gone")  # back, opaque: the old contents stay gone
        assert os.listdir(mnt / "e" / "gone") == []
        os.link(mnt / "e" / "kept", mnt / "d" / "hardlink")
        want.append("hardlink")
        assert sorted(os.listdir(mnt / "d")) == sorted(want)
        # a name looked up in vain (a negative entry the kernel keeps) appears once created
        unused = iter(range(5, 40))
        for make in (
            lambda p: p.write_bytes(b"late"),
            lambda p: p.mkdir(),
            lambda p: p.symlink_to("f3"),
            lambda p: os.link(mnt / "e" / "kept", p),
            lambda p: os.rename(mnt / "d" / f"f{next(unused)}", p),
        ):
            for where in (mnt / "d" / "sub" / "deep", mnt / "d", mnt / "e"):
                path = where / f"late{make.__code__.co_firstlineno}"
                assert not path.exists() and not path.exists()
                make(path)
                assert os.path.lexists(path), path
                assert path.name in os.listdir(where)
        listed = {rel: sorted(os.listdir(mnt / rel)) for rel in ("d", "e", "d/sub/deep")}
    # and a remount over the same upper directory agrees
    with mounted(image(tmp_path / "again"), tmp_path / "mnt", *args) as m:
        for rel, names in listed.items():
            assert sorted(os.listdir(m.mountpoint / rel)) == names


def test_attributes_follow_a_promotion(tmp_path: Path) -> None:
    """A lower entry's attributes are cached for an hour; a copy-up changes some (ctime,
    blocks, and the times of the directories the copy landed in): the mount shows what its
    upper directory has, not the hour-old lower values."""
    upper = tmp_path / "upper"
    args = ("--upper", str(upper), "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(image(tmp_path), tmp_path / "mnt", *args) as m:
        mnt = m.mountpoint
        for rel in ("d", "d/sub", "d/sub/deep", "d/sub/deep/file", "e/kept"):
            os.stat(mnt / rel)  # into the kernel's attribute cache
        with open(mnt / "d" / "sub" / "deep" / "file", "r+b") as f:  # promotes its parents
            f.write(b"U")
        os.chmod(mnt / "e" / "kept", 0o600)  # a metadata-only promotion
        for rel in ("d", "d/sub", "d/sub/deep", "d/sub/deep/file", "e", "e/kept"):
            got, truth = os.stat(mnt / rel), os.stat(upper / rel)
            for field in ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns"):
                assert getattr(got, field) == getattr(truth, field), (rel, field)
        assert (mnt / "d" / "sub" / "deep" / "file").read_bytes() == b"Uower"


def test_a_listing_in_progress_survives_the_first_change(tmp_path: Path) -> None:
    """A lower directory is opened without a snapshot of its own (its OPENDIR is answered in
    C); removing entries while listing it, as ``rm -rf`` does, must neither skip nor repeat
    one, however many requests the listing takes.  Also a lower directory opened before an
    upper change that is read only afterwards."""
    names = [
        f"entry-with-a-long-name-so-a-listing-takes-many-requests-{i:05d}" for i in range(3000)
    ]
    lower = [Item("big", "dir", mode=0o755), *(Item(f"big/{n}", data=b"x") for n in names)]
    lower += [Item("small", "dir", mode=0o755), *(Item(f"small/{n}", data=b"y") for n in names[:5])]
    make_layout(tmp_path / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'img'}:v1")
    args = ("--upper", str(tmp_path / "upper"), "--cache", str(tmp_path / "c"), "--no-prefetch")
    with mounted(f"oci:{tmp_path / 'img'}:v1", tmp_path / "mnt", *args) as m:
        mnt = m.mountpoint
        seen = []
        with os.scandir(mnt / "big") as it:
            for entry in it:
                seen.append(entry.name)
                os.unlink(entry.path)
        assert sorted(seen) == names
        assert os.listdir(mnt / "big") == []

        fd = os.open(mnt / "small", os.O_RDONLY | os.O_DIRECTORY)
        try:
            (mnt / "small" / "new").write_bytes(b"n")  # the first change, after the open
            os.unlink(mnt / "small" / names[0])
            listed = os.listdir(fd)
        finally:
            os.close(fd)
        # The names it had when opened (POSIX leaves entries changed since unspecified).
        assert set(names[1:5]) <= set(listed) <= {*names[:5], "new"}
        assert sorted(os.listdir(mnt / "small")) == sorted([*names[1:5], "new"])
