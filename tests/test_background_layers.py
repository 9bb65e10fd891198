"""Layers without a TOC are fetched in the background: the mount is ready before they arrive,
what needs them waits (and then answers exactly what a mount made after them would), a failed
layer answers EIO, is never cached, and is fetched again on the next access.  Against the real
registry, through the fault proxy (faults aimed at one layer's blob only)."""

# ruff: noqa: F811
from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.errors import FormatError
from lazyfs.formats.toc import TOC, Entry
from lazyfs.fs.tree import Tree
from lazyfs.ocilayout import Layout
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import lazyfs_cmd, mounted, run
from tests.support.fixtures import registry  # noqa: F401
from tests.test_whole_layers import BIG, _base, _check, _top

# Plain tar layers: a mount asks nothing of them before their download (no footer to read),
# so a fault aimed at a blob hits that download.
_ARGS = ("--plain-http", "--no-prefetch")


def _push(tmp_path: Path, registry: RegistryInstance, name: str) -> tuple[str, str]:
    """Push the two-layer test image; its repository and its base layer's digest."""
    make_layout(tmp_path / "img", [_base(), _top()], kind="tar", tag="v1")
    push_oci_layout(tmp_path / "img", f"{registry.host}/bg/{name}:v1", tag="v1")
    return f"bg/{name}:v1", Layout(tmp_path / "img").manifest("v1").layers[0].digest


def _size(tmp_path: Path, digest: str) -> int:
    layers = Layout(tmp_path / "img").manifest("v1").layers
    return next(d.size for d in layers if d.digest == digest)


def _whole(stats: dict[str, object], digest: str) -> dict[str, object]:
    layers = stats["layers"]
    assert isinstance(layers, list)
    return next(layer["whole"] for layer in layers if layer["digest"] == digest)


def _indexed(cache: Path, digest: str) -> bool:
    return (cache / "tocs" / f"{digest.removeprefix('sha256:')}.whole").exists()


def test_ready_before_the_layer_and_a_reader_waits_for_it(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    repo, base = _push(tmp_path, registry, "slow")
    cache = tmp_path / "cache"
    with FaultProxy(registry.url, match=f"/blobs/{base}") as proxy:
        ref = f"{proxy.host}/{repo}"
        # Unmounted while the layer is half way: nothing of it is kept.
        proxy.stall_next(1)
        with mounted(ref, tmp_path / "m1", *_ARGS, "--read-only", "--cache", str(cache)) as m:
            assert _whole(m.stats(), base)["seconds"] is None  # ready, the layer still coming
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 10
        assert not _indexed(cache, base)
        assert not list((cache / "blobs").glob(f"{base.removeprefix('sha256:')}*"))

        proxy.stall_next(1)
        with mounted(ref, tmp_path / "m2", *_ARGS, "--read-only", "--cache", str(cache)) as m:
            os.statvfs(m.mountpoint)  # answered without the layer
            got: list[bytes] = []
            reader = threading.Thread(
                target=lambda: got.append((m.mountpoint / "etc" / "hostname").read_bytes())
            )
            reader.start()
            half = _size(tmp_path, base) // 2
            deadline = time.monotonic() + 10
            while _whole(m.stats(), base)["received"] != half and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _whole(m.stats(), base)["received"] == half  # the stalled answer's half
            assert reader.is_alive() and not got  # it waits for the layer
            table = run(*lazyfs_cmd("stats", str(m.mountpoint))).stdout
            assert "downloading in the background, 4.5MiB so far" in table, table
            proxy.reset()  # the stalled answer ends short: the download starts again
            reader.join(30)
            assert got == [b"whole\n"]
            _check(m.mountpoint)
            assert _whole(m.stats(), base)["seconds"] is not None
        assert _indexed(cache, base)


def test_a_failed_layer_answers_eio_and_the_next_access_fetches_it_again(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    repo, base = _push(tmp_path, registry, "missing")
    cache, upper = tmp_path / "cache", tmp_path / "upper"
    with FaultProxy(registry.url, match=f"/blobs/{base}") as proxy:
        proxy.fail_next(100, status=404)
        ref = f"{proxy.host}/{repo}"
        with mounted(ref, tmp_path / "m", *_ARGS, "--upper", str(upper), "--cache",
                     str(cache), "--read-timeout", "1.5") as m:  # fmt: skip
            with pytest.raises(OSError) as e:
                os.listdir(m.mountpoint)
            assert e.value.errno == errno.EIO
            whole = _whole(m.stats(), base)
            assert "not found" in str(whole["error"]) and whole["seconds"] is None, whole
            assert not _indexed(cache, base)
            table = run(*lazyfs_cmd("stats", str(m.mountpoint))).stdout
            assert "failed (" in table and "the next access tries again" in table, table
            # Tried again, and stalled: EIO once the read timeout has passed.
            proxy.reset()
            proxy.stall_next(100)
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                (m.mountpoint / "top.txt").read_bytes()
            assert e.value.errno == errno.EIO and time.monotonic() - t0 < 10
            assert _whole(m.stats(), base)["error"], m.stats()
            proxy.reset()
            assert "top.txt" in os.listdir(m.mountpoint)  # this access tried again
            _check(m.mountpoint)
            (m.mountpoint / "etc" / "new").write_bytes(b"upper\n")  # the upper works as ever
            assert (m.mountpoint / "etc" / "new").read_bytes() == b"upper\n"
            assert m.stats()["handler_errors"] == 0
        assert _indexed(cache, base)


def test_a_layer_that_does_not_match_its_diff_id_answers_eio_and_is_not_cached(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    make_layout(tmp_path / "img", [_base()], kind="gzip", tag="v1")
    lay = Layout(tmp_path / "img")
    manifest = lay.manifest("v1")
    config = json.loads(lay.read_blob(manifest.config.digest))
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    cdesc = lay.write_blob(json.dumps(config).encode())
    doc = json.loads(lay.read_blob(lay.find("v1").digest))
    doc["config"] = {**doc["config"], "digest": cdesc.digest, "size": cdesc.size}
    digest, size = lay.put_json(doc)
    lay.write_top([{"mediaType": doc["mediaType"], "digest": digest, "size": size,
                    "annotations": {"org.opencontainers.image.ref.name": "v1"}}])  # fmt: skip
    push_oci_layout(tmp_path / "img", f"{registry.host}/bg/bad:v1", tag="v1")
    layer = manifest.layers[0].digest
    cache = tmp_path / "cache"
    with FaultProxy(registry.url, match=f"/blobs/{layer}") as proxy:
        ref = f"{proxy.host}/bg/bad:v1"
        with mounted(ref, tmp_path / "m", *_ARGS, "--read-only", "--cache", str(cache)) as m:
            for _ in range(2):
                with pytest.raises(OSError) as e:
                    (m.mountpoint / "etc" / "hostname").read_bytes()
                assert e.value.errno == errno.EIO
            whole = _whole(m.stats(), layer)
            assert "but the image config says sha256:000" in str(whole["error"]), whole
            assert m.stats()["handler_errors"] == 0
        # The footer, then one whole download per access: the failure was not remembered
        # as an answer.
        gets = [p for p, r in zip(proxy.paths, proxy.ranges, strict=True) if layer in p and not r]
        assert len(gets) == 2, proxy.ranges
    assert not _indexed(cache, layer)
    chunks = cache / "chunks"
    assert not chunks.exists() or not [p for p in chunks.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- early answers (issue 12)
# A plain base layer under a lazy top layer: while the base downloads, whatever the top layer
# settles is answered at once, the rest waits for the base.

APP = seeded_bytes(300_000, 5)
ROOT_MTIME = 1_234_567_890


def _early_top() -> bytes:
    return make_tar(
        [
            Item("app", "dir", mode=0o755),
            Item("app/main.py", data=APP),
            Item("etc", "dir", mode=0o755),
            Item("etc/.wh.gone"),
            Item("etc/top.conf", data=b"top\n"),
            Item("opq", "dir", mode=0o755),
            Item("opq/.wh..wh..opq"),
            Item("opq/only", data=b"only\n"),
        ]
    )


def _early_base() -> bytes:
    return make_tar(
        [
            Item("./", "dir", mode=0o755, mtime=ROOT_MTIME),  # as debuerreotype's tars have
            Item("etc", "dir", mode=0o755),
            Item("etc/hostname", data=b"base\n"),
            Item("etc/gone", data=b"deleted above\n"),
            Item("etc/sub", "dir", mode=0o755),
            Item("opq", "dir", mode=0o755),
            Item("opq/hidden", data=b"hidden\n"),
            Item("app", "dir", mode=0o700),
            Item("app/old.py", data=b"old\n"),
            Item("data/big.bin", data=BIG),  # keeps the stalled half short of the end
        ]
    )


def _push_mixed(tmp_path: Path, registry: RegistryInstance, name: str) -> tuple[str, str]:
    """Push [plain tar base, zstd:chunked top]; its repository and the base's digest."""
    src, lazy = tmp_path / "src", tmp_path / "lazy"
    make_layout(src, [_early_base(), _early_top()], kind="tar", tag="v1")
    convert(f"oci:{src}:v1", f"oci:{lazy}:v1")
    # The converted base keeps its diff_id: the plain original takes its place.
    plain = Layout(src).manifest("v1").layers[0]
    out = Layout(lazy)
    out.write_blob(Layout(src).read_blob(plain.digest))
    doc = json.loads(out.read_blob(out.find("v1").digest))
    doc["layers"][0] = {"mediaType": plain.mediaType, "digest": plain.digest, "size": plain.size}
    digest, size = out.put_json(doc)
    out.write_top([{"mediaType": doc["mediaType"], "digest": digest, "size": size,
                    "annotations": {"org.opencontainers.image.ref.name": "v1"}}])  # fmt: skip
    push_oci_layout(lazy, f"{registry.host}/bg/{name}:v1", tag="v1")
    return f"bg/{name}:v1", plain.digest


def _errno(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []

    def run() -> None:
        try:
            got.append(fn())
        except OSError as e:
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_what_the_layers_above_settle_is_answered_while_the_base_downloads(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    repo, base = _push_mixed(tmp_path, registry, "early")
    with FaultProxy(registry.url, match=f"/blobs/{base}") as proxy:
        proxy.stall_next(1)
        ref = f"{proxy.host}/{repo}"
        with mounted(ref, tmp_path / "m", *_ARGS, "--read-only", "--cache",
                     str(tmp_path / "cache")) as m:  # fmt: skip
            mnt = m.mountpoint
            deadline = time.monotonic() + 10
            while not _whole(m.stats(), base).get("received") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _whole(m.stats(), base).get("received"), "the base never started"
            # A file only the top layer has: its attributes and bytes, at once.
            t0 = time.monotonic()
            st = (mnt / "app" / "main.py").stat()
            assert (st.st_size, (mnt / "app" / "main.py").read_bytes()) == (len(APP), APP)
            fd = os.open(mnt / "app" / "main.py", os.O_RDONLY)
            try:
                etc = (mnt / "etc").stat()
                app_ino, etc_ino = st.st_ino, etc.st_ino
                assert etc.st_nlink == 2  # the subdirectories known so far
                assert (mnt / "app").stat().st_mode & 0o777 == 0o755  # the top's entry wins
                assert (mnt / "etc" / "top.conf").read_bytes() == b"top\n"
                # Whited out above, or absent under an opaque directory: ENOENT at once.
                assert _errno(lambda: (mnt / "etc" / "gone").stat()) == errno.ENOENT
                assert _errno(lambda: (mnt / "opq" / "hidden").stat()) == errno.ENOENT
                assert os.listdir(mnt / "opq") == ["only"]  # an opaque listing is final
                assert time.monotonic() - t0 < 5
                # A listing the base may add to, and a name only the base may have: they wait.
                listing, listed = _in_thread(lambda: sorted(os.listdir(mnt / "etc")))
                lookup, looked = _in_thread(lambda: (mnt / "etc" / "hostname").read_bytes())
                time.sleep(1)
                assert listing.is_alive() and lookup.is_alive() and not listed and not looked
                assert _whole(m.stats(), base)["seconds"] is None  # still downloading
                stats = m.stats()
                assert stats["answered_early"] > 0 and stats["waited_for_layers"] >= 1, stats
                table = run(*lazyfs_cmd("stats", str(mnt))).stdout
                assert "answered at once: " in table, table
                proxy.reset()  # the stalled download ends short and starts again
                listing.join(30)
                lookup.join(30)
                assert listed == [["hostname", "sub", "top.conf"]]
                assert looked == [b"base\n"]  # a name only the pending layer has
                # Inode numbers handed out early stay; an early descriptor reads on.
                assert (mnt / "app" / "main.py").stat().st_ino == app_ino
                assert (mnt / "etc").stat().st_ino == etc_ino
                assert os.pread(fd, 100, 1000) == APP[1000:1100]
            finally:
                os.close(fd)
            assert sorted(os.listdir(mnt / "app")) == ["main.py", "old.py"]
            assert (mnt / "data" / "big.bin").read_bytes() == BIG
            assert (mnt / "etc").stat().st_nlink == 3  # the kernel's cached count was dropped
            assert mnt.stat().st_mtime == ROOT_MTIME  # the provisional root was not cached
            assert m.stats()["handler_errors"] == 0


def test_a_failed_base_answers_eio_only_for_what_it_could_change(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    repo, base = _push_mixed(tmp_path, registry, "early-fail")
    with FaultProxy(registry.url, match=f"/blobs/{base}") as proxy:
        proxy.fail_next(100, status=404)
        ref = f"{proxy.host}/{repo}"
        with mounted(ref, tmp_path / "m", *_ARGS, "--upper", str(tmp_path / "upper"),
                     "--cache", str(tmp_path / "cache")) as m:  # fmt: skip
            mnt = m.mountpoint
            assert _errno(lambda: os.listdir(mnt / "etc")) == errno.EIO
            assert _errno(lambda: (mnt / "etc" / "hostname").stat()) == errno.EIO
            # A change waits for the whole tree, and fails with it.
            assert _errno(lambda: (mnt / "app" / "new").write_bytes(b"x")) == errno.EIO
            assert (mnt / "app" / "main.py").read_bytes() == APP  # settled: still served
            assert _errno(lambda: (mnt / "etc" / "gone").stat()) == errno.ENOENT
            assert os.listdir(mnt / "opq") == ["only"]
            proxy.reset()  # the next access fetches the base again
            assert sorted(os.listdir(mnt / "etc")) == ["hostname", "sub", "top.conf"]
            (mnt / "app" / "new").write_bytes(b"upper\n")
            assert (mnt / "app" / "new").read_bytes() == b"upper\n"
            assert m.stats()["handler_errors"] == 0


# ---------------------------------------------------------------- the tree, top-down (pure logic)


def _toc(*entries: tuple[str, ...]) -> TOC:
    """Entries as (name, type[, link target])."""
    made = [Entry(name=e[0], type=e[1], link_name=e[2] if len(e) > 2 else "") for e in entries]  # type: ignore[arg-type]
    return TOC(compression="none", entries=made, data_end=0)


_LAYERS = [
    _toc(("etc", "dir"), ("etc/a", "reg"), ("etc/b", "reg"), ("lib", "symlink", "usr/lib"),
         ("usr/lib/x", "reg"), ("usr/lib/y", "hardlink", "usr/lib/x"), ("opq/old", "reg")),
    _toc(("etc/.wh.a", "reg"), ("etc/c", "reg"), ("lib", "dir"), ("lib/z", "reg"),
         ("opq/.wh..wh..opq", "reg"), ("opq/new", "reg"), ("bin", "reg")),
    _toc(("", "dir"), ("etc", "dir"), ("etc/d", "reg"), ("usr/lib/w", "hardlink", "usr/lib/x"),
         (".wh.bin", "reg"), ("bin", "dir"), ("bin/sh", "reg")),
]  # fmt: skip


def _shape(tree: Tree) -> dict[str, tuple[object, ...]]:
    groups: dict[int, str] = {}
    out = {}
    for path, node in tree.walk():
        groups.setdefault(node.ino, path)
        e = node.entry
        # The entry itself (both builds share the TOCs), so attributes are compared too.
        out[path] = (node.is_dir, id(e), node.nlink, groups[node.ino], node.ino)
    return out


@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_tree_built_above_then_beneath_is_the_tree_built_at_once(split: int) -> None:
    whole = Tree.from_layers(_LAYERS)
    tree = Tree()
    tree.add_beneath(_LAYERS[split:], split)  # the layers above a pending one
    early = {p: v for p, v in _shape(tree).items() if tree.known(tree.find(p) or tree.root)}
    assert early or split == len(_LAYERS)  # only a tree with nothing above knows nothing
    tree.add_beneath(_LAYERS[:split], 0)
    tree.finish()
    assert _shape(tree) == _shape(whole)  # inode numbers included: both built top-down
    after = _shape(tree)
    assert all(after[p] == v for p, v in early.items())  # early answers stay true
    assert sorted(p for p in after if p.startswith("etc/")) == ["etc/b", "etc/c", "etc/d"]
    assert "opq/old" not in after and after["usr/lib/w"][3] == after["usr/lib/y"][3]
    assert after["bin"][0] and "lib/z" in after and "lib/x" not in after


def test_what_a_tree_missing_lower_layers_knows() -> None:
    tree = Tree()
    tree.add_beneath(_LAYERS[1:], 1)
    etc, opq, usr = (tree.find(p) for p in ("etc", "opq", "usr/lib"))
    assert etc is not None and opq is not None and usr is not None
    assert tree.known(tree.root) and tree.known(etc)
    assert not tree.known(usr)  # implied by a path only: a lower layer may have its entry
    w = tree.find("usr/lib/w")
    assert w is not None and not tree.known(w)  # a hardlink to a lower layer's file
    assert tree.absent_known(etc, "a") and not tree.absent_known(etc, "b")
    assert tree.listing_known(opq) and not tree.listing_known(etc)
    assert tree.absent_known(opq, "old") and not tree.absent_known(tree.root, "var")


def _random_stack(r: random.Random) -> list[TOC]:
    """Small layers over few names, so that layers collide: dirs, files, whiteouts, opaque
    markers, hardlinks (within and across layers), root entries, duplicates."""
    tocs, files = [], []
    for _ in range(r.randint(1, 5)):
        entries = []
        for _ in range(r.randint(0, 8)):
            path = "/".join(r.choice("abc") for _ in range(r.randint(1, 3)))
            where = path.rpartition("/")[0]
            where = f"{where}/" if where else ""
            kind = r.choice(["dir", "reg", "reg", "wh", "opq", "link", "root", "symlink"])
            if kind == "wh":
                entries.append(Entry(name=f"{where}.wh.{r.choice('abc')}", type="reg"))
            elif kind == "opq":
                entries.append(Entry(name=f"{where}.wh..wh..opq", type="reg"))
            elif kind == "link" and files:
                entries.append(Entry(name=path, type="hardlink", link_name=r.choice(files)))
            elif kind == "root":
                entries.append(Entry(name="", type="dir", mode=0o700))
            elif kind in ("dir", "symlink"):
                entries.append(Entry(name=path, type=kind, mode=r.choice([0o755, 0o711])))
            else:
                entries.append(Entry(name=path, type="reg"))
                files.append(path)
        tocs.append(TOC(compression="none", entries=entries, data_end=0))
    return tocs


def test_early_answers_of_random_stacks_stay_true() -> None:
    r = random.Random(12)
    checked = 0
    for _ in range(400):
        tocs = _random_stack(r)
        try:
            whole = _shape(Tree.from_layers(tocs))
        except FormatError:
            continue  # a hardlink to nowhere: refused either way
        for split in range(1, len(tocs)):
            tree = Tree()
            tree.add_beneath(tocs[split:], split)
            known, absent, listed = {}, [], {}
            for path, node in list(tree.walk()):
                if tree.known(node) and node is not tree.root:
                    known[path] = _shape(tree)[path]
                if node.children is not None:
                    gone = [n for n in "abc" if n not in node.children]
                    absent += [
                        f"{path}/{n}".lstrip("/") for n in gone if tree.absent_known(node, n)
                    ]
                    if tree.listing_known(node):
                        listed[path] = sorted(node.children)
            tree.add_beneath(tocs[:split], 0)
            tree.finish()
            after = _shape(tree)
            assert after == whole
            assert all(after[p] == v for p, v in known.items())
            assert not [p for p in absent if p in after]
            for path, names in listed.items():
                node = tree.find(path)
                assert node is not None and sorted(node.children or ()) == names
            checked += 1
    assert checked > 300
