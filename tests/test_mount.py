"""Real FUSE mounts: the merged tree, promote-on-write, crash safety, integrity."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.fs.unmount import is_mounted, is_stale
from lazyfs.store.layerstore import AMPLIFY_BEHIND
from lazyfs.testing.layers import Item, make_layout, make_tar, sample_items, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run, start_mount, wait_settled
from lazyfs.testing.rootfs import host_rootfs_items

XATTR_SKIP = ("security.", "system.", "trusted.")


def overlay_layers() -> list[bytes]:
    """Three layers exercising whiteouts, opaque dirs, replacement and hardlinks."""
    base = sample_items()
    base += [
        Item("opaque", "dir", mode=0o755),
        Item("opaque/old-a", data=b"a"),
        Item("opaque/old-b", data=b"b"),
        Item("gone", "dir", mode=0o755),
        Item("gone/sub", "dir", mode=0o755),
        Item("gone/sub/f", data=b"f"),
        Item("replaced", data=b"file first"),
        Item("usr", "dir", mode=0o755),
        Item("usr/share", "dir", mode=0o755),
        Item("usr/share/doc.txt", data=seeded_bytes(5000, 11)),
    ]
    mid = [
        Item("etc", "dir", mode=0o700, uid=5, gid=6),  # directory metadata changes, contents merge
        Item("etc/.wh.secret"),
        Item("etc/hostname", data=b"mid layer\n"),
        Item("opaque", "dir", mode=0o755),
        Item("opaque/.wh..wh..opq"),
        Item("opaque/new", data=b"new"),
        Item(".wh.gone"),
        Item(".wh.replaced"),
        Item("replaced", "dir", mode=0o750),
        Item("replaced/inside", data=b"now a dir"),
    ]
    top = [
        Item("usr", "dir", mode=0o755),
        Item("usr/share", "dir", mode=0o755),
        Item("usr/share/.wh.doc.txt"),
        Item("usr/share/doc.txt", "symlink", link="../../etc/hostname"),  # same layer re-adds
        Item("data", "dir", mode=0o1777),
        Item("data/second-link", "hardlink", link="data/big.bin"),
        *host_rootfs_items(),
    ]
    return [make_tar(base), make_tar(mid), make_tar(top)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("image")
    make_layout(d / "src", overlay_layers(), kind="gzip", tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    # The oracle: a non-lazy runtime's unpacker applies the same layers to a directory.
    subprocess.run(
        ["umoci", "unpack", "--image", f"{d / 'src'}:v1", str(d / "bundle")],
        check=True,
        capture_output=True,
    )
    return {"dir": d, "lazy": d / "lazy", "rootfs": d / "bundle" / "rootfs"}


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything `ls -l`, `stat`, `getfattr` and `find` would show, keyed by path."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}  # inode -> smallest name, to compare hardlink groups
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for k in os.listxattr(p, follow_symlinks=False):
                    if not k.startswith(XATTR_SKIP):
                        xattrs[k] = os.getxattr(p, k, follow_symlinks=False)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            link_group = None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link_group = st.st_ino  # replaced by the group's first name below
                inodes[st.st_ino] = min(inodes.get(st.st_ino, rel), rel)
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                st.st_mtime_ns // 1_000_000_000 if not stat.S_ISDIR(st.st_mode) else None,
                st.st_rdev,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                link_group,
                tuple(sorted(xattrs.items())),
                content,
            )
    return {k: (*v[:8], inodes.get(v[8]) if v[8] else None, *v[9:]) for k, v in out.items()}


def tar_names(root: Path) -> list[str]:
    """What `tar -c` archives (names, types, modes, owners, sizes, link targets)."""
    tar = subprocess.run(
        ["tar", "-C", str(root), "--xattrs", "--sort=name", "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout
    listing = subprocess.run(
        ["tar", "-tvf", "-", "--numeric-owner"], input=tar, capture_output=True, check=True
    ).stdout.decode()
    # Drop the date/time columns; directory mtimes are the unpacker's business.
    return sorted(" ".join(line.split()[:3] + line.split()[5:]) for line in listing.splitlines())


def test_merged_tree_equals_layers_applied_on_disk(image: dict[str, Path], tmp_path: Path) -> None:
    with mounted(
        f"oci:{image['lazy']}:v1",
        tmp_path / "mnt",
        "--read-only",
        "--cache",
        str(tmp_path / "cache"),
    ):
        got = snapshot(tmp_path / "mnt")
        tar_got = tar_names(tmp_path / "mnt")
    want = snapshot(image["rootfs"])
    assert set(got) == set(want)
    for path in sorted(want):
        assert got[path] == want[path], path
    assert tar_got == tar_names(image["rootfs"])


def test_mount_is_lazy_and_reads_only_what_is_asked(image: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    # --no-prefetch: nothing but reads (the image holds a libc: its start-up landmarks).
    args = ("--read-only", "--no-prefetch", "--cache", str(tmp_path / "c"))
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        stats = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True).stdout)
        assert sum(layer["stats"]["bytes_fetched"] for layer in stats["layers"]) == 0
        os.listdir(mnt / "data")  # metadata needs no content
        with open(mnt / "data" / "big.bin", "rb") as f:
            f.seek(200_000)
            assert f.read(1000) == seeded_bytes(300_000, 2)[200_000:201_000]
        stats = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True).stdout)
        fetched = sum(layer["stats"]["bytes_fetched"] for layer in stats["layers"])
        total = sum(layer["stats"]["bytes_total"] for layer in stats["layers"])
        # That file (readahead takes a small file whole) and at most AMPLIFY_BEHIND of the
        # files before it, not the image.
        assert 0 < fetched <= 310_000 + AMPLIFY_BEHIND
        assert total / 3 > 310_000
        text = run(*lazyfs_cmd("stats", str(mnt))).stdout
        assert "FETCHED" in text


def test_chroot_runs_a_program_from_the_lazy_image(image: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"oci:{image['lazy']}:v1",
        mnt,
        "--upper",
        str(tmp_path / "upper"),
        "--cache",
        str(tmp_path / "c"),
    ):
        res = run(
            "chroot",
            str(mnt),
            "/bin/sh",
            "-c",
            "cat /etc/hostname; ls /data; echo hi > /tmp/x; sha256sum /tmp/x",
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("mid layer\n")
        assert "big.bin" in res.stdout
    assert (tmp_path / "upper" / "tmp" / "x").read_text() == "hi\n"


def test_writes_promote_and_whiteout(image: dict[str, Path], tmp_path: Path) -> None:
    mnt, upper = tmp_path / "mnt", tmp_path / "upper"
    args = ("--upper", str(upper), "--cache", str(tmp_path / "c"))
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        big = mnt / "data" / "big.bin"
        want = bytearray(seeded_bytes(300_000, 2))
        # write into a lower file: promoted with its content, then changed in place
        with open(big, "r+b") as f:
            f.seek(100_000)
            f.write(b"XYZ")
        want[100_000:100_003] = b"XYZ"
        assert big.read_bytes() == want
        assert (mnt / "data" / "second-link").read_bytes() == want  # hardlink follows
        assert os.stat(big).st_nlink == 2
        # O_APPEND, O_TRUNC, O_EXCL
        with open(mnt / "etc" / "hostname", "ab") as f:
            f.write(b"more\n")
        assert (mnt / "etc" / "hostname").read_bytes() == b"mid layer\nmore\n"
        with open(mnt / "bin" / "tool", "wb") as f:
            f.write(b"tiny")
        assert (mnt / "bin" / "tool").read_bytes() == b"tiny"
        assert os.stat(mnt / "bin" / "tool").st_mode & 0o7777 in (0o4755, 0o755)
        with pytest.raises(FileExistsError):
            os.open(mnt / "etc" / "hostname", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        # metadata changes
        os.chmod(mnt / "etc" / "empty", 0o600)
        os.chown(mnt / "etc" / "empty", 123, 456)
        os.utime(mnt / "etc" / "empty", ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(mnt / "etc" / "empty")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
            0o600,
            123,
            456,
            2_000_000_000,
        )
        os.truncate(mnt / "data" / "zeros.bin", 10)
        assert (mnt / "data" / "zeros.bin").read_bytes() == bytes(10)
        # xattrs
        os.setxattr(mnt / "data" / "attrs", "user.new", b"v")
        os.removexattr(mnt / "data" / "attrs", "user.color")
        assert sorted(os.listxattr(mnt / "data" / "attrs")) == ["user.n", "user.new"]
        # unlink / rmdir of lower entries leave whiteouts
        os.unlink(mnt / "etc" / "empty")
        os.unlink(mnt / "bin" / "link-to-tool")
        for name in os.listdir(mnt / "replaced"):
            os.unlink(mnt / "replaced" / name)
        os.rmdir(mnt / "replaced")
        assert not (mnt / "replaced").exists()
        # re-create over a whiteout: a new directory hides the old contents
        os.mkdir(mnt / "replaced")
        assert os.listdir(mnt / "replaced") == []
        # create, mkdir, symlink, link, mknod
        (mnt / "newdir").mkdir()
        (mnt / "newdir" / "f").write_bytes(b"hello")
        os.symlink("f", mnt / "newdir" / "s")
        os.link(mnt / "newdir" / "f", mnt / "newdir" / "h")
        os.mkfifo(mnt / "newdir" / "fifo")
        os.mknod(mnt / "newdir" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        assert os.readlink(mnt / "newdir" / "s") == "f"
        assert os.stat(mnt / "newdir" / "h").st_nlink == 2
        # rename: a lower file moves (copied up), a lower directory answers EXDEV
        os.rename(mnt / "usr" / "share" / "doc.txt", mnt / "newdir" / "doc-link")
        assert os.readlink(mnt / "newdir" / "doc-link") == "../../etc/hostname"
        with pytest.raises(OSError) as exc:
            os.rename(mnt / "etc", mnt / "etc2")
        assert exc.value.errno == errno.EXDEV
        assert run("mv", str(mnt / "bin"), str(mnt / "bin2")).returncode == 0
        assert (mnt / "bin2" / "tool").read_bytes() == b"tiny"
        assert not (mnt / "bin").exists()
        os.rename(mnt / "newdir", mnt / "newdir2")  # an upper-only directory moves
        assert (mnt / "newdir2" / "f").read_bytes() == b"hello"
        # shared writable mmap
        p = mnt / "newdir2" / "mm"
        p.write_bytes(bytes(8192))
        with open(p, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
            m[100:105] = b"mmap!"
            m.flush()
        assert p.read_bytes()[100:105] == b"mmap!"
        # fsync, statfs
        fd = os.open(mnt / "newdir2" / "f", os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        assert os.statvfs(mnt).f_bsize > 0
        snap = snapshot(mnt)
    # whiteouts under the names they hide (as overlayfs); `lazyfs commit` makes them OCI's
    assert os.getxattr(upper / "etc" / "empty", "user.lazyfs.whiteout") == b""
    assert os.getxattr(upper / "bin", "user.lazyfs.whiteout") == b""  # moved away
    assert (upper / "replaced" / ".wh..wh..opq").exists()
    # a remount with the same upper shows the same tree
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        assert snapshot(mnt) == snap


def test_sigkill_then_remount_keeps_fsynced_data(image: dict[str, Path], tmp_path: Path) -> None:
    mnt, upper, cache = tmp_path / "mnt", tmp_path / "upper", tmp_path / "c"
    args = ("--upper", str(upper), "--cache", str(cache))
    m = start_mount(f"oci:{image['lazy']}:v1", mnt, *args)
    try:
        fd = os.open(mnt / "etc" / "kept", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"durable")
        os.fsync(fd)
        os.close(fd)
        assert (mnt / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)
        m.kill()
        assert is_stale(str(mnt))
    finally:
        m.stop()
    # The cache is intact: whatever made it to disk is whole and hashes to its name (chunks
    # still being written at the kill are simply absent and fetched again).
    for p in (cache / "chunks").rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
    # a new mount on the same point cleans the stale one
    m = start_mount(f"oci:{image['lazy']}:v1", tmp_path / "mnt", *args)
    try:
        assert (mnt / "etc" / "kept").read_bytes() == b"durable"
        assert (mnt / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)
        # The start-up prefetch again: what the killed daemon held for a pause in reads died
        # with it, and a prefetch cut short by the unmount would leave the third mount its rest.
        wait_settled(mnt)
    finally:
        m.stop()
    assert not is_mounted(str(mnt))
    # after a clean unmount everything read is cached: a third mount fetches nothing
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        assert (mnt / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)
        stats = json.loads(run(*lazyfs_cmd("stats", str(mnt), "--json"), check=True).stdout)
        assert sum(layer["stats"]["bytes_fetched"] for layer in stats["layers"]) == 0


def test_daemon_mode_and_umount(image: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run(
        *lazyfs_cmd(
            "mount",
            f"oci:{image['lazy']}:v1",
            str(mnt),
            "--read-only",
            "--cache",
            str(tmp_path / "c"),
        )
    )
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))
    try:
        assert (mnt / "etc" / "hostname").read_bytes() == b"mid layer\n"
        assert run(*lazyfs_cmd("umount", str(mnt))).returncode == 0
        assert not is_mounted(str(mnt))
    finally:
        if is_mounted(str(mnt)):
            run(*lazyfs_cmd("umount", "--lazy", str(mnt)))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    # errors before the mount is ready come from the command itself
    res = run(*lazyfs_cmd("mount", f"oci:{tmp_path / 'nope'}", str(mnt), "--read-only"))
    assert res.returncode == 1
    assert res.stderr.startswith("lazyfs: ") and res.stderr.count("\n") == 1
    res = run(*lazyfs_cmd("umount", str(mnt)))
    assert res.returncode == 1 and "not mounted" in res.stderr


def test_corrupt_chunk_is_eio_never_content(image: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(image["lazy"]), str(bad)], check=True)
    index = json.loads((bad / "index.json").read_text())
    manifest = json.loads(
        (bad / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text()
    )
    blob = bad / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc

    data = bytearray(blob.read_bytes())
    loc = locate_toc(bytes(data[-TAIL_SIZE:]), len(data), manifest["layers"][0]["annotations"])
    toc = decode_layer_toc(loc, bytes(data[loc.start : loc.end]))
    chunk = toc.by_name()["data/big.bin"].chunks[2]
    data[chunk.offset + 30] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = tmp_path / "c"
    with mounted(f"oci:{bad}:v1", tmp_path / "mnt", "--read-only", "--cache", str(cache)):
        with open(tmp_path / "mnt" / "data" / "big.bin", "rb") as f:
            assert f.read(65536) == seeded_bytes(300_000, 2)[:65536]
            f.seek(chunk.file_offset)
            with pytest.raises(OSError) as exc:
                f.read(100)
            assert exc.value.errno == errno.EIO
        assert (tmp_path / "mnt" / "etc" / "hostname").read_bytes() == b"mid layer\n"
    hexes = {p.name for p in (cache / "chunks").rglob("*") if p.is_file()}
    assert chunk.digest[7:] not in hexes


def test_concurrent_readers_and_writers(image: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    files = {
        "data/big.bin": seeded_bytes(300_000, 2),
        "etc/hostname": b"mid layer\n",
        "bin/tool": seeded_bytes(10_000, 1),
        "usr/share/doc.txt": b"mid layer\n",
    }
    errors: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(150):
            name, want = rnd.choice(list(files.items()))
            off = rnd.randrange(len(want))
            n = rnd.randrange(1, 70_000)
            with open(mnt / name, "rb") as f:
                f.seek(off)
                got = f.read(n)
            if got != want[off : off + n]:
                errors.append(f"{name}@{off}+{n}")

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        for i in range(60):
            p = mnt / "tmp" / f"w{seed}-{i % 7}"
            data = rnd.randbytes(rnd.randrange(1, 50_000))
            p.write_bytes(data)
            if p.read_bytes() != data:
                errors.append(str(p))
            if i % 3 == 0:
                p.unlink()

    with mounted(
        f"oci:{image['lazy']}:v1",
        mnt,
        "--upper",
        str(tmp_path / "u"),
        "--cache",
        str(tmp_path / "c"),
    ):
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        threads += [threading.Thread(target=writer, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_open_files_survive_promotion_unlink_and_races(
    image: dict[str, Path], tmp_path: Path
) -> None:
    mnt, upper = tmp_path / "mnt", tmp_path / "upper"
    args = ("--upper", str(upper), "--cache", str(tmp_path / "c"))
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        # A reader of a lower file keeps its file across a promotion, an unlink and a new
        # file of the same name.
        reader = open(mnt / "etc" / "hostname", "rb")
        with open(mnt / "etc" / "hostname", "r+b"):
            pass  # promoted
        os.unlink(mnt / "etc" / "hostname")
        (mnt / "etc" / "hostname").write_bytes(b"A DIFFERENT FILE")
        assert reader.read() == b"mid layer\n"
        reader.close()
        # An unlinked but open file keeps working (tempfile.TemporaryFile does this).
        fd = os.open(mnt / "tmp" / "scratch", os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, b"scratch data")
        os.unlink(mnt / "tmp" / "scratch")
        # The unlink dropped the kernel's attributes: the daemon answers by its kept descriptor.
        assert os.fstat(fd).st_size == 12
        os.ftruncate(fd, 4)
        assert os.pread(fd, 100, 0) == b"scra"
        os.close(fd)

        # Each race's other side runs in a thread whose failure ``result()`` raises here.
        def promote(path: Path) -> None:
            with open(path, "r+b"):
                pass

        def promote_unless_gone(path: Path) -> None:
            with contextlib.suppress(FileNotFoundError):  # the unlink came first
                promote(path)

        with ThreadPoolExecutor(max_workers=1) as racer:
            # A truncating open racing a copy-up of the same file: the truncation wins.
            race = racer.submit(promote, mnt / "data" / "big.bin")
            with open(mnt / "data" / "big.bin", "wb") as f:
                f.write(b"B")
            race.result(timeout=60)
            assert (mnt / "data" / "big.bin").read_bytes() == b"B"
            assert (mnt / "data" / "second-link").read_bytes() == b"B"
            # An unlink racing a copy-up: the file stays gone.
            race = racer.submit(promote_unless_gone, mnt / "bin" / "tool")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mnt / "bin" / "tool")
            race.result(timeout=60)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mnt / "bin" / "tool")
        assert not (mnt / "bin" / "tool").exists()
        # A directory moved onto an emptied lower directory hides what was below.
        os.unlink(mnt / "usr" / "share" / "doc.txt")
        (mnt / "n").mkdir()
        os.rename(mnt / "n", mnt / "usr" / "share")
        assert os.listdir(mnt / "usr" / "share") == []
        snap = snapshot(mnt)
    assert not [p.name for p in upper.rglob(".lazyfs-copyup.*")]
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        assert snapshot(mnt) == snap
        assert not (mnt / "bin" / "tool").exists()
        assert os.listdir(mnt / "usr" / "share") == []


def test_whiteouts_follow_names_not_inodes(image: dict[str, Path], tmp_path: Path) -> None:
    # bin/tool and bin/hard-tool are one lower inode under two names.
    mnt, upper = tmp_path / "mnt", tmp_path / "upper"
    args = ("--upper", str(upper), "--cache", str(tmp_path / "c"))
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        os.rename(mnt / "bin" / "tool", mnt / "bin" / "tool2")
        os.unlink(mnt / "bin" / "hard-tool")
        listing = sorted(os.listdir(mnt / "bin"))
        assert "hard-tool" not in listing and "tool" not in listing and "tool2" in listing
    with mounted(f"oci:{image['lazy']}:v1", mnt, *args):
        assert sorted(os.listdir(mnt / "bin")) == listing
        assert (mnt / "bin" / "tool2").read_bytes() == seeded_bytes(10_000, 1)
