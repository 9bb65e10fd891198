"""The kernel caches lower directories' listings (FOPEN_CACHE_DIR) and lower attributes for an
hour: what it shows must still follow every change the upper layer makes."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lazyfs_tools.convert import convert

from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import Mount, lazyfs_cmd, mounted, run

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


@contextlib.contextmanager
def mount_lower(tmp: Path, lower: list[Item]) -> Iterator[Mount]:
    """``lower`` as a one-layer lazy image, mounted at tmp/mnt with its upper at tmp/upper."""
    make_layout(tmp / "src", [make_tar(lower)], tag="v1")
    convert(f"oci:{tmp / 'src'}:v1", f"oci:{tmp / 'img'}:v1")
    args = ("--upper", str(tmp / "upper"), "--cache", str(tmp / "c"), "--no-prefetch")
    with mounted(f"oci:{tmp / 'img'}:v1", tmp / "mnt", *args) as m:
        yield m


def readdirs(mnt: Path) -> int:
    """Listings the kernel asked for (not served from its cache)."""
    return requests(mnt).get("readdir", 0)


def requests(mnt: Path) -> dict[str, int]:
    res = run(*lazyfs_cmd("stats", str(mnt), "--json"))
    assert res.returncode == 0, res.stderr
    got: dict[str, int] = json.loads(res.stdout)["requests"]
    return got


def uncached(fd: int) -> int:
    """``fd``, its pages dropped: the next read asks the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


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
    with mount_lower(tmp_path, lower) as m:
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


class Dirents:
    """A directory read with getdents64 in small parts (a few entries each), as a program
    with a small buffer does: a listing the kernel resumes at the offset of its last entry,
    between changes."""

    def __init__(self, path: Path, bufsize: int = 256) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.buf = ctypes.create_string_buffer(bufsize)

    def read(self) -> list[str] | None:
        """The next part; None at the end."""
        n = _libc.syscall(_SYS_GETDENTS64, self.fd, self.buf, len(self.buf))
        if n < 0:
            raise OSError(ctypes.get_errno(), "getdents64")
        if n == 0:
            return None
        names, raw, at = [], self.buf.raw, 0
        while at < n:  # struct linux_dirent64: ino, off, reclen, type, name
            reclen = int.from_bytes(raw[at + 16 : at + 18], "little")
            names.append(os.fsdecode(raw[at + 19 : at + reclen].split(b"\0", 1)[0]))
            at += reclen
        return names

    def close(self) -> None:
        os.close(self.fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_GETDENTS64 = 217  # x86_64


def test_a_directory_changed_while_read_in_parts_lists_each_unchanged_entry_once(
    tmp_path: Path,
) -> None:
    """The kernel sends no OPENDIR (no_opendir): a listing has no snapshot of its own, and
    the kernel resumes it at the offset it was given, from its cache or, once a change
    dropped that, from the daemon.  Names created, removed (whiteouts too), renamed in, out
    and within, and the directory promoted, between the parts of a listing: every name left
    alone comes exactly once, a removed one never comes back to life."""
    names = [f"lower-entry-{i:04d}" for i in range(300)]
    lower = [
        Item("d", "dir", mode=0o755),
        *(Item(f"d/{n}", data=b"x") for n in names),
        Item("other", "dir", mode=0o755),
        *(Item(f"other/in-{i}", data=b"o") for i in range(10)),
    ]
    with mount_lower(tmp_path, lower) as m:
        mnt, d = m.mountpoint, m.mountpoint / "d"
        for cached in (True, False):  # read from the kernel's cached listing, or not yet cached
            start = {".", "..", *os.listdir(d)}  # into the kernel's cache
            if not cached:  # a change drops it
                (d / "uncached").write_bytes(b"u")
                start.add("uncached")
            touched: set[str] = set()  # changed since the listing began
            seen: list[str] = []
            lister = Dirents(d)
            step = 0
            try:
                while (part := lister.read()) is not None:
                    seen += part
                    step += 1
                    left = sorted(set(os.listdir(d)) - set(seen) - touched)
                    unseen = [n for n in left if n.startswith("lower-")]
                    seen_still = [n for n in seen if n.startswith("lower-") and n not in touched]
                    k = f"{int(cached)}-{step}"
                    if step % 7 == 1 and unseen:  # a whiteout ahead of the listing
                        os.unlink(d / unseen[-1])
                        touched.add(unseen[-1])
                    if step % 7 == 2 and seen_still:  # and behind it
                        os.unlink(d / seen_still[0])
                        touched.add(seen_still[0])
                    if step % 7 == 3:
                        (d / f"new-{k}").write_bytes(b"n")
                        os.mkdir(d / f"newdir-{k}")
                        touched |= {f"new-{k}", f"newdir-{k}"}
                    if step % 7 == 4 and unseen:  # renamed within and out
                        os.rename(d / unseen[0], d / f"renamed-{k}")
                        os.rename(d / unseen[-1], mnt / "other" / f"out-{k}")
                        touched |= {unseen[0], unseen[-1], f"renamed-{k}"}
                    if step % 7 == 5:  # renamed in
                        ins = [n for n in os.listdir(mnt / "other") if n.startswith("in-")]
                        if ins:
                            os.rename(mnt / "other" / ins[0], d / f"moved-in-{k}")
                            touched.add(f"moved-in-{k}")
                    if step % 7 == 6 and unseen:  # a copy-up of an entry (and so of d)
                        os.chmod(d / unseen[len(unseen) // 2], 0o600)
            finally:
                lister.close()
            now = {".", "..", *os.listdir(d)}
            left_alone = (start & now) - touched
            counts = Counter(seen)
            assert [n for n, c in counts.items() if c > 1] == [], "listed twice"
            assert left_alone - counts.keys() == set(), "an unchanged entry was skipped"
            assert counts.keys() <= start | touched, "a name that never was"
            for gone in touched - now:  # no dentry left for a removed name
                assert not os.path.lexists(d / gone), gone
            assert step > 20, "the listing took too few parts to test much"
        assert m.stats()["handler_errors"] == 0


def test_a_listing_half_read_does_not_outlive_a_change(tmp_path: Path) -> None:
    """The daemon keeps a directory's sorted listing while the kernel reads it in parts; a
    change in between, and a new listing from the start is taken afresh, not from it."""
    names = [f"lower-entry-{i:04d}" for i in range(300)]
    lower = [Item("d", "dir", mode=0o755), *(Item(f"d/{n}", data=b"x") for n in names)]
    with mount_lower(tmp_path, lower) as m:
        d = m.mountpoint / "d"
        want = set(names)
        for i in range(5):
            (d / f"first-{i}").write_bytes(b"f")  # the kernel's cached listing, if any, goes
            want.add(f"first-{i}")
            lister = Dirents(d)
            try:
                part = lister.read()  # the daemon lists from the start, the kernel takes a part
                assert part
                gone = sorted(want - set(part))[i]
                os.unlink(d / gone)
                (d / f"later-{i}").write_bytes(b"l")
                want = (want - {gone}) | {f"later-{i}"}
                assert set(os.listdir(d)) == want
                assert not os.path.lexists(d / gone)
            finally:
                lister.close()


def test_every_listing_is_cached_and_follows_changes_made_while_cached(tmp_path: Path) -> None:
    """Upper directories' listings are cached too (the kernel opens every directory with
    FOPEN_CACHE_DIR once OPENDIR answered ENOSYS): a listing asks the daemon once, and a
    change shows in the next one."""
    lower = [Item("d", "dir", mode=0o755), *(Item(f"d/f{i}", data=b"x") for i in range(20))]
    with mount_lower(tmp_path, lower) as m:
        mnt = m.mountpoint
        os.mkdir(mnt / "up")
        for i in range(20):
            (mnt / "up" / f"u{i}").write_bytes(b"u")
        os.chmod(mnt / "d" / "f0", 0o600)  # d promoted: an upper directory with lower entries
        for rel, want in (
            ("up", {f"u{i}" for i in range(20)}),
            ("d", {f"f{i}" for i in range(20)}),
        ):
            pin = os.open(mnt / rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert set(os.listdir(mnt / rel)) == want
                before = readdirs(mnt)
                for _ in range(10):
                    assert set(os.listdir(mnt / rel)) == want
                assert readdirs(mnt) - before < 3, f"{rel}: not cached"
                (mnt / rel / "later").write_bytes(b"l")
                os.unlink(mnt / rel / sorted(want)[0])
                want = (want - {sorted(want)[0]}) | {"later"}
                assert set(os.listdir(mnt / rel)) == want
            finally:
                os.close(pin)
        assert sum(requests(mnt).get(name, 0) for name in ("opendir", "releasedir")) <= 1


BIG = seeded_bytes(300_000, 7)


def test_files_are_read_and_written_without_open_requests(tmp_path: Path) -> None:
    """The daemon answers ENOSYS to the first OPEN (the kernel's no_open): no file's open or
    close reaches it again, reads and writes come by inode, and a copy-up happens at the
    first write or truncation.  What a descriptor shows must not depend on the open it no
    longer sees."""
    names = ("promoted", "written", "unlinked", "renamed", "truncated", "emptied", "warm")
    lower = [
        Item("f", "dir", mode=0o755),
        *(Item(f"f/{n}", data=f"lower {n}".encode()) for n in names),
        Item("f/big", data=BIG),
    ]
    upper = tmp_path / "upper"
    with mount_lower(tmp_path, lower) as m:
        f = m.mountpoint / "f"

        # a reader keeps its descriptor while another one writes (and so copies up)
        with open(f / "promoted", "rb") as r:
            assert r.read(5) == b"lower"
            with open(f / "promoted", "r+b") as w:
                w.write(b"UPPER")
            assert os.pread(uncached(r.fileno()), 64, 0) == b"UPPER promoted"
        assert (upper / "f" / "promoted").read_bytes() == b"UPPER promoted"

        # written through one descriptor, read through another
        with open(f / "written", "r+b") as w:
            w.seek(0, os.SEEK_END)
            w.write(b" and more")
            w.flush()
            with open(f / "written", "rb") as r:
                assert os.pread(uncached(r.fileno()), 64, 0) == b"lower written and more"

        # unlinked while open: still readable and writable through the descriptor, lower
        # (copied up then, to no name) and upper alike
        (f / "new").write_bytes(b"upper new")
        for name, was in (("unlinked", b"lower unlinked"), ("new", b"upper new")):
            fd = os.open(f / name, os.O_RDWR)
            try:
                os.unlink(f / name)
                assert os.pread(uncached(fd), 64, 0) == was
                os.pwrite(fd, b"GONE", 0)
                assert os.pread(uncached(fd), 64, 0) == b"GONE" + was[4:]
                os.ftruncate(fd, 4)
                assert os.fstat(fd).st_size == 4
                assert os.pread(uncached(fd), 64, 0) == b"GONE"
            finally:
                os.close(fd)
            assert not (f / name).exists()
            left = upper / "f" / name  # a lower name leaves a whiteout (empty), an upper none
            if name == "unlinked":
                assert os.path.lexists(left) and left.lstat().st_size == 0
            else:
                assert not os.path.lexists(left)

        # renamed while open: the descriptor follows the file
        with open(f / "renamed", "r+b") as w:
            os.rename(f / "renamed", f / "moved")
            w.write(b"MOVED")
            w.flush()
            assert os.pread(uncached(w.fileno()), 64, 0) == b"MOVED renamed"
        assert (f / "moved").read_bytes() == b"MOVED renamed"
        assert (upper / "f" / "moved").read_bytes() == b"MOVED renamed"

        # O_TRUNC of a lower file: its content is gone, written over or not
        (f / "truncated").write_bytes(b"new")
        assert (f / "truncated").read_bytes() == b"new"
        os.close(os.open(f / "emptied", os.O_WRONLY | os.O_TRUNC))
        assert os.stat(f / "emptied").st_size == 0 and (f / "emptied").read_bytes() == b""
        assert (upper / "f" / "emptied").read_bytes() == b""

        # mmap of a lower file
        with open(f / "big", "rb") as r, mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == BIG

        # created, written, closed, read back
        (f / "created").write_bytes(b"created")
        with open(f / "created", "ab") as a:
            a.write(b" and appended")
        assert (f / "created").read_bytes() == b"created and appended"
        assert (upper / "f" / "created").read_bytes() == b"created and appended"

        # a warm start: opens and closes send nothing at all
        for _ in range(2):
            (f / "warm").read_bytes()
        before = requests(m.mountpoint)
        for _ in range(20):
            assert (f / "warm").read_bytes() == b"lower warm"
            assert (f / "big").read_bytes() == BIG
        after = requests(m.mountpoint)
        for op in ("open", "release", "flush", "read"):
            assert after.get(op, 0) == before.get(op, 0), (op, before, after)
        # one OPEN (answered ENOSYS) and one FLUSH (ENOSYS) in the whole run; RELEASE only
        # for the files created here (the kernel releases a CREATE's handle)
        assert after.get("open", 0) == 1 and after.get("flush", 0) <= 1, after
        assert after.get("release", 0) <= after.get("create", 0), after
        assert m.stats()["handler_errors"] == 0


def test_cached_pages_and_sizes_follow_writes_without_open_requests(tmp_path: Path) -> None:
    """With no OPEN the kernel keeps a file's pages across opens: they must follow a copy-up
    and every write and truncation made through another descriptor or by path, read through
    pages never dropped (``uncached`` elsewhere hides exactly this)."""
    lower = [
        Item("f", "dir", mode=0o755),
        Item("f/big", data=BIG),
        Item("f/config", data=b"old config"),
        Item("f/shrunk", data=BIG),
    ]
    upper = tmp_path / "upper"
    with mount_lower(tmp_path, lower) as m:
        f = m.mountpoint / "f"
        want = bytearray(BIG)
        r = os.open(f / "big", os.O_RDONLY)
        try:
            assert os.pread(r, len(BIG) + 1, 0) == BIG  # every page cached
            with mmap.mmap(r, 0, prot=mmap.PROT_READ) as mm:
                w = os.open(f / "big", os.O_RDWR)  # another descriptor: copies up, writes
                try:
                    os.pwrite(w, b"XYZ", 100_000)
                    want[100_000:100_003] = b"XYZ"
                    assert os.pread(r, len(BIG) + 1, 0) == want
                    assert mm[99_999:100_004] == want[99_999:100_004]
                    os.ftruncate(w, 150_000)
                    del want[150_000:]
                    assert os.fstat(r).st_size == os.stat(f / "big").st_size == 150_000
                    os.pwrite(w, b"end", 160_000)  # beyond the old end: zeros between
                    want += bytes(10_000) + b"end"
                finally:
                    os.close(w)
            assert os.pread(r, len(BIG) + 1, 0) == want
            os.truncate(f / "big", 200_000)  # by path, larger: zeros again
            want += bytes(200_000 - len(want))
            assert os.fstat(r).st_size == 200_000
            assert os.pread(r, len(BIG) + 1, 0) == want
            with open(f / "big", "rb") as again:  # a new open keeps the same pages
                assert again.read() == want
        finally:
            os.close(r)
        assert (upper / "f" / "big").read_bytes() == want

        # rewritten by rename (a config file's usual update): the name leads to the new file
        assert (f / "config").read_bytes() == b"old config"
        (f / "config.tmp").write_bytes(b"new")
        os.rename(f / "config.tmp", f / "config")
        assert (f / "config").read_bytes() == b"new"
        assert os.stat(f / "config").st_size == 3

        # truncated by O_TRUNC while another descriptor holds the cached pages
        with open(f / "shrunk", "rb") as held:
            assert held.read() == BIG
            (f / "shrunk").write_bytes(b"short")
            assert os.fstat(held.fileno()).st_size == 5
            assert os.pread(held.fileno(), len(BIG), 0) == b"short"
        assert m.stats()["handler_errors"] == 0


def test_cached_lower_attributes_follow_every_change(tmp_path: Path) -> None:
    """Lower attributes are cached for an hour: after a rename, an unlink of one of two hard
    links, a directory's removal (a whiteout) and its return (opaque), each entry's
    attributes are the upper directory's (or follow from the tree), never the cached ones."""
    lower = [
        Item("d", "dir", mode=0o755),
        Item("d/moved", data=b"m", mode=0o640),
        Item("d/sub", "dir", mode=0o755),
        Item("d/sub/x", data=b"x"),
        Item("d/one", data=b"linked"),
        Item("d/two", "hardlink", link="d/one"),
    ]
    upper = tmp_path / "upper"
    fields = ("st_mode", "st_nlink", "st_size", "st_mtime_ns", "st_ctime_ns")
    with mount_lower(tmp_path, lower) as m:
        d = m.mountpoint / "d"
        before = {n: os.stat(d / n) for n in ("", "moved", "sub", "one", "two")}
        assert before["one"].st_nlink == 2 and before[""].st_nlink == 3

        os.rename(d / "moved", d / "renamed")
        got, truth = os.stat(d / "renamed"), os.stat(upper / "d" / "renamed")
        assert [getattr(got, k) for k in fields] == [getattr(truth, k) for k in fields]
        assert not os.path.lexists(d / "moved")

        os.unlink(d / "one")  # a whiteout; the other name's link count follows
        assert os.stat(d / "two").st_nlink == 1
        assert (d / "two").read_bytes() == b"linked"
        assert not os.path.lexists(d / "one")

        os.unlink(d / "sub" / "x")
        os.rmdir(d / "sub")  # a directory's whiteout: the parent's link count follows
        assert not os.path.lexists(d / "sub")
        assert os.stat(d).st_nlink == 2
        os.mkdir(d / "sub")  # back, opaque
        assert os.stat(d).st_nlink == 3 and os.listdir(d / "sub") == []
        got, truth = os.stat(d), os.stat(upper / "d")
        assert (got.st_mtime_ns, got.st_ctime_ns) == (truth.st_mtime_ns, truth.st_ctime_ns)
        assert sorted(os.listdir(d)) == ["renamed", "sub", "two"]
        assert m.stats()["handler_errors"] == 0


def test_upper_names_and_attributes_are_cached_and_follow_every_change(tmp_path: Path) -> None:
    """Upper entries are cached as long as lower ones (a warm program start re-reads its byte
    code in upper __pycache__ directories): looked at again past the old 1 s timeout they cost
    no request, and after every kind of change each shows the upper directory's attributes."""
    upper = tmp_path / "upper"
    fields = ("st_mode", "st_nlink", "st_size", "st_mtime_ns", "st_ctime_ns")
    with mount_lower(tmp_path, [Item("d", "dir", mode=0o755)]) as m:
        d = m.mountpoint / "d"
        (d / "up").mkdir()
        (d / "up" / "a").write_bytes(b"a" * 100)
        os.symlink("a", d / "up" / "s")
        names = ("up", "up/a", "up/s", "up/missing")

        def look() -> None:
            for n in names:
                with contextlib.suppress(FileNotFoundError):
                    os.lstat(d / n)
            assert (d / "up" / "a").read_bytes() == b"a" * 100  # read past the end too

        look()
        look()  # the first read from the daemon dropped the kernel's atime: asked for again
        asked = requests(m.mountpoint)
        time.sleep(1.1)
        look()
        now = requests(m.mountpoint)
        assert [now.get(k, 0) - asked.get(k, 0) for k in ("lookup", "getattr")] == [0, 0], now

        def same(name: str) -> None:
            got, truth = os.lstat(d / name), os.lstat(upper / "d" / name)
            assert [getattr(got, k) for k in fields] == [getattr(truth, k) for k in fields], name

        with open(d / "up" / "a", "ab") as f:  # another descriptor's write
            f.write(b"b")
        same("up/a")
        os.chmod(d / "up" / "a", 0o600)
        same("up/a")
        os.link(d / "up" / "a", d / "up" / "b")
        same("up/a")
        same("up/b")
        os.rename(d / "up" / "b", d / "up" / "c")
        same("up/c")
        os.unlink(d / "up" / "c")
        same("up/a")
        os.mkdir(d / "up" / "sub")
        same("up")
        os.utime(d / "up" / "a", ns=(1, 2))
        same("up/a")
        os.setxattr(d / "up" / "a", "user.k", b"v")
        same("up/a")
        (d / "up" / "a").write_bytes(b"x")  # O_TRUNC: a SETATTR, then a write
        same("up/a")
        (d / "up" / "missing").write_bytes(b"m")  # a cached negative entry gives way
        same("up/missing")
        assert sorted(os.listdir(d / "up")) == ["a", "missing", "s", "sub"]
        # "." and ".." first, in an upper, a lower and the root directory alike (ls -f: unsorted)
        for where, names in ((d / "up", 4), (d / "up" / "sub", 0), (m.mountpoint, 1)):
            got = run("ls", "-f", str(where)).stdout.split()
            assert got[:2] == [".", ".."] and len(got) == 2 + names, got
        assert m.stats()["handler_errors"] == 0


def test_a_copy_up_drops_the_attributes_of_the_directories_it_wrote_in(tmp_path: Path) -> None:
    """A copy-up (a promote) makes a name in its upper parent directories, changing their
    times without a request of the kernel's for them: the kernel, which keeps an upper
    directory's attributes as long as a lower one's, must ask again."""
    upper = tmp_path / "upper"
    lower = [
        Item("d", "dir", mode=0o755),
        Item("d/f", data=b"f"),
        Item("h", "dir", mode=0o755),
        Item("h/one", data=b"1"),
        Item("k", "dir", mode=0o755),
        Item("k/two", "hardlink", link="h/one"),
        Item("a", "dir", mode=0o755),
        Item("a/x", data=b"x"),
    ]

    def same(got: Path, truth: Path) -> None:
        a, b = os.lstat(got), os.lstat(truth)
        assert (a.st_mtime_ns, a.st_ctime_ns) == (b.st_mtime_ns, b.st_ctime_ns), got

    with mount_lower(tmp_path, lower) as m:
        mnt = m.mountpoint
        for dirname in ("d", "h", "k"):
            (mnt / dirname / "new").write_bytes(b"n")  # the directory is upper now
        for p in (mnt, mnt / "d", mnt / "h", mnt / "k", mnt / "a"):
            os.lstat(p)  # into the kernel's cache
        time.sleep(0.02)  # the copy-ups' times differ from those cached
        os.chmod(mnt / "d" / "f", 0o600)  # copied up into upper d
        same(mnt / "d", upper / "d")
        os.chmod(mnt / "h" / "one", 0o600)  # and linked into upper k as well
        same(mnt / "h", upper / "h")
        same(mnt / "k", upper / "k")
        (mnt / "a" / "y").write_bytes(b"y")  # a promoted: made in the upper root
        same(mnt, upper)
        fd = os.open(mnt / "a" / "x", os.O_RDONLY)
        try:
            os.unlink(mnt / "a" / "x")
            os.lstat(mnt)
            time.sleep(0.02)
            os.fchmod(fd, 0o600)  # an unlinked file's copy: a temporary name in the root
            same(mnt, upper)
        finally:
            os.close(fd)
        assert m.stats()["handler_errors"] == 0


def test_a_trace_still_sees_every_open(tmp_path: Path) -> None:
    """A ``--trace`` mount keeps OPEN (the trace records opens), with files still served by
    inode."""
    files = [Item("a", data=b"A"), Item("b", data=b"B")]
    make_layout(tmp_path / "src", [make_tar(files)], tag="v1")
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'img'}:v1")
    args = ("--upper", str(tmp_path / "upper"), "--cache", str(tmp_path / "c"), "--no-prefetch")
    trace = ("--trace", str(tmp_path / "trace.json"))
    with mounted(f"oci:{tmp_path / 'img'}:v1", tmp_path / "mnt", *args, *trace) as m:
        for _ in range(3):
            assert (m.mountpoint / "a").read_bytes() == b"A"
            assert (m.mountpoint / "b").read_bytes() == b"B"
        (m.mountpoint / "a").write_bytes(b"AA")  # O_TRUNC, then a copy-up at the write
        assert (m.mountpoint / "a").read_bytes() == b"AA"
        got = requests(m.mountpoint)
        assert got.get("open", 0) >= 7 and got.get("flush", 0) == 0, got
        assert m.stats()["handler_errors"] == 0


def test_symlink_targets_are_cached_and_follow_every_change(tmp_path: Path) -> None:
    """The kernel keeps a symlink's target (FUSE_CAP_CACHE_SYMLINKS): a path walked through one
    again and again asks the daemon once (a Debian start-up walked ``/lib`` ten times), and a
    name that leads to a new symlink shows the new target."""
    lower = [
        Item("usr", "dir", mode=0o755),
        Item("usr/lib", "dir", mode=0o755),
        Item("usr/lib/f", data=b"lower f"),
        Item("usr/lib/g", data=b"lower g"),
        Item("lib", "symlink", link="usr/lib", mode=0o777),
        Item("s", "symlink", link="lib/f", mode=0o777),
    ]
    with mount_lower(tmp_path, lower) as m:
        mnt = m.mountpoint
        before = requests(mnt).get("readlink", 0)
        for _ in range(20):
            assert (mnt / "lib" / "f").read_bytes() == b"lower f"
            assert (mnt / "s").read_bytes() == b"lower f"
            assert os.readlink(mnt / "s") == "lib/f"
        asked = requests(mnt).get("readlink", 0) - before
        assert asked <= 2, f"symlink targets were not cached: {asked} READLINKs for 2 symlinks"

        os.unlink(mnt / "s")  # a whiteout, then an upper symlink by the same name
        os.symlink("lib/g", mnt / "s")
        assert os.readlink(mnt / "s") == "lib/g"
        assert (mnt / "s").read_bytes() == b"lower g"
        os.symlink("usr/lib/f", mnt / "t")
        os.rename(mnt / "t", mnt / "s")  # renamed over it
        assert os.readlink(mnt / "s") == "usr/lib/f"
        assert (mnt / "s").read_bytes() == b"lower f"
        os.chown(mnt / "lib", 1234, 1234, follow_symlinks=False)  # a lower symlink copied up
        assert os.readlink(mnt / "lib") == "usr/lib"
        assert (mnt / "lib" / "g").read_bytes() == b"lower g"
        assert m.stats()["handler_errors"] == 0
    with mount_lower(tmp_path, lower) as m:  # remounted over the same upper
        assert os.readlink(m.mountpoint / "s") == "usr/lib/f"
        assert os.lstat(m.mountpoint / "lib").st_uid == 1234
