"""Snapshotter logic without containerd: label parsing, filters, config, and the snapshot
semantics over a real sqlite store and real directories."""

from __future__ import annotations

import fcntl
import os
import resource
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from lazyfs_snapshotter.config import ConfigError, load_config, parse_config
from lazyfs_snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from lazyfs_snapshotter.filters import match_any, parse_filters
from lazyfs_snapshotter.locks import ChainLocks
from lazyfs_snapshotter.metadata import (
    MAX_REFS,
    Kind,
    MetadataStore,
    PendingRef,
    RemoteLayerRow,
)
from lazyfs_snapshotter.remote import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    REMOTE_LABEL,
    STARGZ_DIGEST,
    STARGZ_LAYERS,
    STARGZ_REF,
    TARGET_LABEL,
    Chain,
    Readiness,
    RemoteSource,
    SourceError,
    parse_source,
)
from lazyfs_snapshotter.snapshots import Snapshotter, _end_detached

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


# -- labels ---------------------------------------------------------------------------
def test_stargz_labels_parse() -> None:
    src = parse_source({
        TARGET_LABEL: "chain-1",
        STARGZ_REF: "127.0.0.1:5000/app:v1",
        STARGZ_DIGEST: D1,
        STARGZ_LAYERS: f"{D1},{D2}",
    })
    assert src == RemoteSource("chain-1", "127.0.0.1:5000/app:v1", D1, (D1, D2), None, "stargz")


def test_cri_labels_parse_and_drop_a_truncated_last_layer() -> None:
    src = parse_source({
        TARGET_LABEL: "chain-2",
        CRI_IMAGE_REF: "reg.invalid/app:v1",
        CRI_LAYER_DIGEST: D2,
        CRI_IMAGE_LAYERS: f"{D1},{D2},sha256:33",  # CRI cut the list at its size limit
        CRI_MANIFEST_DIGEST: D3,
    })
    assert src is not None
    assert (src.label_set, src.layer_digest, src.manifest_digest) == ("cri", D2, D3)
    assert src.image_layers == (D1, D2)


def test_stargz_labels_win_over_cri() -> None:
    src = parse_source({
        TARGET_LABEL: "t", STARGZ_REF: "a/b:c", STARGZ_DIGEST: D1,
        CRI_IMAGE_REF: "x/y:z", CRI_LAYER_DIGEST: D2,
    })
    assert src is not None and src.label_set == "stargz" and src.layer_digest == D1


@pytest.mark.parametrize("labels", [
    {},
    {STARGZ_REF: "a/b:c", STARGZ_DIGEST: D1},  # no target: not an unpack
    {TARGET_LABEL: "t"},  # an unpack without remote labels
    {TARGET_LABEL: "t", "containerd.io/gc.root": "x"},
])
def test_no_source(labels: dict[str, str]) -> None:
    assert parse_source(labels) is None


@pytest.mark.parametrize("labels", [
    {TARGET_LABEL: "t", STARGZ_REF: "a/b:c", STARGZ_DIGEST: "nope"},
    {TARGET_LABEL: "t", STARGZ_DIGEST: D1},
    {TARGET_LABEL: "t", CRI_IMAGE_REF: "a/b:c", CRI_LAYER_DIGEST: D1, CRI_MANIFEST_DIGEST: "x"},
])
def test_broken_labels_are_a_source_error(labels: dict[str, str]) -> None:
    with pytest.raises(SourceError):
        parse_source(labels)


# -- filters ----------------------------------------------------------------------------
def _fields(**values: str) -> Callable[[Sequence[str]], str | None]:
    def get(path: Sequence[str]) -> str | None:
        return values.get(".".join(path))
    return get


@pytest.mark.parametrize(("text", "expected"), [
    ("kind==committed", True),
    ("kind!=committed", False),
    ('labels."containerd.io/gc.root"', True),
    ("labels.missing", False),
    ("name~=^sha256:", True),
    ("name~=/^SHA/", False),
    ('kind==committed,labels."containerd.io/gc.root"=="yes"', True),
    ('kind==committed,labels."containerd.io/gc.root"=="no"', False),
])
def test_filters(text: str, expected: bool) -> None:
    get = _fields(**{"kind": "committed", "name": "sha256:abc",
                     "labels.containerd.io/gc.root": "yes"})
    assert match_any(parse_filters([text]), get) is expected


def test_filters_are_any_of() -> None:
    get = _fields(kind="active")
    assert match_any(parse_filters(["kind==view", "kind==active"]), get)
    assert match_any(parse_filters([]), get)


@pytest.mark.parametrize("bad", ["kind==", '"unterminated', "kind==a b", "name~=(", "==x"])
def test_bad_filters(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_filters([bad])


# -- config -----------------------------------------------------------------------------
def test_config_parses() -> None:
    cfg = parse_config({
        "cache": {"dir": "/srv/cache", "size": "2GiB"},
        "prefetch": {"policy": "landmark"},
        "deltas": {"enabled": False},
        "metrics": {"address": "127.0.0.1:9101"},
        "registry": {"plain_http": ["127.0.0.1:5000"]},
        "daemons": {"fork_server": False},
    })
    assert not cfg.fork_server and parse_config({}).fork_server
    assert cfg.cache_size == 2 * 1024**3 and cfg.prefetch == "landmark"
    assert not cfg.deltas and parse_config({}).deltas
    assert cfg.registry.plain_http == ("127.0.0.1:5000",)
    assert cfg.cache_path(Path("/r")) == Path("/srv/cache")
    assert parse_config({}).cache_path(Path("/r")) == Path("/r/cache")


@pytest.mark.parametrize(("data", "message"), [
    ({"cache": {"size": "lots"}}, "not a size"),
    ({"cache": {"size": -1}}, "must be positive"),
    ({"prefetch": {"policy": "always"}}, "is not one of"),
    ({"deltas": {"enabled": "no"}}, "expected true or false"),
    ({"deltas": True}, r"\[deltas\] must be a table"),
    ({"daemons": {"fork_server": 1}}, "expected true or false"),
    ({"metrics": {"address": "nowhere"}}, "HOST:PORT"),
    ({"registry": {"plain_http": "x"}}, "list of non-empty strings"),
    ({"cahce": {}}, "unknown key 'cahce'"),
    ({"cache": {"sise": 1}}, "unknown key 'sise'"),
])
def test_bad_config(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_bad_toml_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[cache\n")
    with pytest.raises(ConfigError, match="bad TOML") as e:
        load_config(p)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def _daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyfs_snapshotter.cli", *args],
                          capture_output=True, text=True, timeout=30)


def test_cli_rejects_bad_config_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prefetch]\npolicy = "sometimes"\n')
    res = _daemon("--address", str(tmp_path / "s.sock"), "--root", str(tmp_path / "r"),
                  "--config", str(cfg))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "policy" in res.stderr
    res = _daemon("--log-level", "loud")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    res = _daemon("--address", "/tmp/" + "x" * 120, "--root", str(tmp_path / "r"))
    assert res.returncode == 2 and "too long" in res.stderr


# -- snapshot semantics -----------------------------------------------------------------
@pytest.fixture
def sn(tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def _layer(sn: Snapshotter, key: str, parent: str = "") -> None:
    sn.prepare("ns", key + "-active", parent, {})
    sn.commit("ns", key, key + "-active", {})


def test_mounts_follow_containerds_overlay_snapshotter(sn: Snapshotter) -> None:
    root = sn.dir
    first = sn.prepare("ns", "a", "", {})
    assert [(x.type, x.source, x.options) for x in first] == [
        ("bind", f"{root}/1/fs", ("rw", "rbind"))]
    sn.commit("ns", "A", "a", {})
    assert not (root / "1" / "work").exists()
    _layer(sn, "B", "A")
    (m,) = sn.prepare("ns", "c", "B", {})
    assert m.type == "overlay"
    assert f"lowerdir={root}/2/fs:{root}/1/fs" in m.options
    assert f"upperdir={root}/3/fs" in m.options and f"workdir={root}/3/work" in m.options
    (v1,) = sn.view("ns", "v1", "A", {})
    assert (v1.type, v1.source, v1.options) == ("bind", f"{root}/1/fs", ("ro", "rbind"))
    (v2,) = sn.view("ns", "v2", "B", {})
    assert (v2.type, v2.options) == ("overlay", (f"lowerdir={root}/2/fs:{root}/1/fs",))
    assert sn.mounts("ns", "c") == [m]
    with pytest.raises(FailedPrecondition):
        sn.mounts("ns", "A")


def test_errors_map_to_containerds_kinds(sn: Snapshotter) -> None:
    sn.prepare("ns", "a", "", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "a", "", {})
    with pytest.raises(NotFound):
        sn.prepare("ns", "b", "nope", {})
    with pytest.raises(InvalidArgument):
        sn.prepare("ns", "b", "a", {})  # parent not committed
    with pytest.raises(InvalidArgument):
        sn.prepare("ns", "", "", {})
    with pytest.raises(NotFound):
        sn.commit("ns", "X", "nope", {})
    sn.commit("ns", "A", "a", {})
    with pytest.raises(FailedPrecondition):
        sn.commit("ns", "A2", "A", {})  # committed, not active
    sn.prepare("ns", "c", "A", {})
    with pytest.raises(AlreadyExists):
        sn.commit("ns", "A", "c", {})
    with pytest.raises(FailedPrecondition):
        sn.remove("ns", "A")  # has a child
    with pytest.raises(NotFound):
        sn.stat("other-ns", "A")  # namespaces are apart…
    assert sn.stat("", "A").name == "A"  # …but a call without one sees them all
    # Failed Prepares leave no directory behind.
    assert sorted(p.name for p in sn.dir.iterdir()) == ["1", "2"]


def test_commit_usage_update_list_remove(sn: Snapshotter) -> None:
    sn.prepare("ns", "a", "", {"keep": "1"})
    (sn.dir / "1" / "fs" / "f").write_bytes(b"x" * 10000)
    (sn.dir / "1" / "fs" / "hl").hardlink_to(sn.dir / "1" / "fs" / "f")
    size, inodes = sn.usage("ns", "a")
    assert inodes == 2 and size >= 10000  # fs dir + one file (the hard link counts once)
    sn.commit("ns", "A", "a", {"containerd.io/gc.root": "x"})
    assert sn.usage("ns", "A") == (size, inodes)
    info = sn.stat("ns", "A")
    assert info.kind == Kind.COMMITTED and info.labels == {"containerd.io/gc.root": "x"}
    info = sn.update("ns", "A", {"a": "1", "b": "2"}, ["labels.a"])
    assert info.labels == {"containerd.io/gc.root": "x", "a": "1"}
    info = sn.update("ns", "A", {}, ["labels.a"])
    assert info.labels == {"containerd.io/gc.root": "x"}
    assert sn.update("ns", "A", {"z": "9"}, []).labels == {"z": "9"}
    with pytest.raises(InvalidArgument):
        sn.update("ns", "A", {}, ["parent"])
    sn.view("ns", "v", "A", {})
    assert [i.name for i in sn.list("ns", [])] == ["A", "v"]
    assert [i.name for i in sn.list("ns", ["kind==view"])] == ["v"]
    assert [i.name for i in sn.list("ns", ["labels.z==9"])] == ["A"]
    assert [i.parent for i in sn.list("ns", ["name==v"])] == ["A"]
    sn.remove("ns", "v")
    sn.remove("ns", "A")
    assert sn.list("ns", []) == [] and list(sn.dir.iterdir()) == []


def test_cleanup_removes_orphans_and_restart_removes_temporaries(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "r")
    sn.prepare("ns", "a", "", {})
    (sn.dir / "7" / "fs").mkdir(parents=True)  # e.g. left by a crash after a Remove
    (sn.dir / "new-xyz").mkdir()  # a Prepare that died half-way
    sn.cleanup()
    assert sorted(p.name for p in sn.dir.iterdir()) == ["1", "new-xyz"]
    sn.close()
    sn = Snapshotter(tmp_path / "r")
    assert sorted(p.name for p in sn.dir.iterdir()) == ["1"]
    sn.close()


class _LazyEverything:
    """A LayerFS that serves every layer: the chain logic, exercised without FUSE."""

    name = "test"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prepared: list[tuple[RemoteSource, int]] = []
        self.released: list[int] = []
        self.plain: set[str] = set()  # layer digests that are "not lazy"

    def start(self, store: MetadataStore, chains: ChainLocks) -> None:
        self.store = store

    def prepare(self, source: RemoteSource, depth: int) -> Readiness:
        self.prepared.append((source, depth))
        if source.layer_digest in self.plain:
            return Readiness(False, "gzip")
        return Readiness(True, record=RemoteLayerRow("h.io/r/x@" + D1, D1, depth - 1, "{}"))

    def mount(self, chain: Chain) -> tuple[int, Path]:
        self.mounted = chain
        mnt = self.root / "mnt" / chain.chain_id
        with self.store.transaction() as tx:
            row = tx.daemon(chain.chain_id)
            if row is not None:
                return row.id, mnt
            return tx.put_daemon(4242, str(mnt), "sock", chain.top.image_ref, chain.chain_id), mnt

    def release(self, daemon_id: int) -> None:
        with self.store.transaction() as tx:
            if tx.daemon_users(daemon_id) == 0 and tx.daemon_by_id(daemon_id) is not None:
                tx.delete_daemon(daemon_id)
                self.released.append(daemon_id)

    def check(self) -> None:
        return None

    def close(self, unmount: bool) -> None:
        return None


def _layer_labels(target: str, digest: str) -> dict[str, str]:
    return {TARGET_LABEL: target, STARGZ_REF: "a/b:c", STARGZ_DIGEST: digest}


def test_remote_seam_commits_the_target_and_answers_already_exists(tmp_path: Path) -> None:
    layers = _LazyEverything(tmp_path)
    sn = Snapshotter(tmp_path / "r", layers)
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "extract-1", "", _layer_labels("chain-A", D1))
    info = sn.stat("ns", "chain-A")
    assert info.kind == Kind.COMMITTED and info.labels[REMOTE_LABEL] == "test"
    with pytest.raises(NotFound):
        sn.stat("ns", "extract-1")
    with pytest.raises(AlreadyExists):  # the second lazy layer: depth 2, one chain mount
        sn.prepare("ns", "extract-2", "chain-A", _layer_labels("chain-AB", D2))
    assert [d for _, d in layers.prepared] == [1, 2]
    (m,) = sn.prepare("ns", "ctr", "chain-AB", {})
    assert f"lowerdir={tmp_path}/mnt/chain-AB" in m.options
    assert sn.prepare("ns", "ctr2", "chain-AB", {})[0].options[-1] == m.options[-1]
    assert sn.update("ns", "chain-A", {}, []).labels == {REMOTE_LABEL: "test"}
    sn.remove("ns", "ctr")
    assert layers.released == []  # ctr2 still uses the chain's daemon
    sn.remove("ns", "ctr2")
    assert layers.released == [1]
    sn.remove("ns", "chain-AB")
    sn.remove("ns", "chain-A")
    # Broken labels: a normal pull, not an error.
    labels = _layer_labels("chain-B", "bad")
    assert sn.prepare("ns", "extract-3", "", labels)[0].type == "bind"
    assert len(layers.prepared) == 2
    sn.close()


def test_every_image_naming_a_remote_snapshot_is_kept_in_order(tmp_path: Path) -> None:
    layers = _LazyEverything(tmp_path)
    sn = Snapshotter(tmp_path / "r", layers)
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "x1", "", _layer_labels("L1", D1))
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "x2", "L1", _layer_labels("L12", D2))
    for image in ("b/c:d", "e/f:g", "b/c:d"):  # two more images share the chain
        labels = {TARGET_LABEL: "L12", STARGZ_REF: image, STARGZ_DIGEST: D2}
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", "x3", "L1", labels)
    # The record's own image again (CRI's labels name its manifest): nothing new.
    cri = {TARGET_LABEL: "L12", CRI_IMAGE_REF: "h.io/r/x:v1", CRI_LAYER_DIGEST: D2,
           CRI_MANIFEST_DIGEST: D1}  # fmt: skip
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "x3", "L1", cri)
    assert [d for _, d in layers.prepared] == [1, 2]  # the LayerFS was asked nothing more
    sn.prepare("ns", "ctr", "L12", {})
    assert layers.mounted.refs == ("h.io/r/x@" + D1,)
    # Kept as the labels gave them, each once, the most recently named first; looked up only
    # to mount from them.
    assert layers.mounted.pending == (PendingRef("b/c:d", "", D2), PendingRef("e/f:g", "", D2))
    sn.close()
    # A metadata file of a snapshotter without ``remote_refs`` and ``pending_refs`` gains
    # them on open, its snapshots and their records kept.
    db = tmp_path / "r" / "metadata.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE remote_refs")
        conn.execute("DROP TABLE pending_refs")
    store = MetadataStore(db)
    with store.transaction() as tx:
        (row,) = [r for r in tx.all("ns") if r.key == "L12"]
        assert tx.remote_refs(row.id) == ["h.io/r/x@" + D1]
        tx.add_remote_ref(row.id, "h/r@" + D2)
        assert tx.remote_refs(row.id) == ["h.io/r/x@" + D1, "h/r@" + D2]
        assert tx.pending_refs(row.id) == []
        tx.add_pending_ref(row.id, PendingRef("b/c:d", "", D2))
        assert tx.pending_refs(row.id) == [PendingRef("b/c:d", "", D2)]
    store.close()


def test_a_layer_found_there_asks_nothing_and_keeps_each_new_image_once(
    tmp_path: Path,
) -> None:
    """A Prepare of a layer held already asks the LayerFS (the registry) nothing: another image
    naming it is kept as its labels give it, once, to be looked up only if the chain must be
    mounted from it; one held by digest already is not kept again."""
    layers = _LazyEverything(tmp_path)
    sn = Snapshotter(tmp_path / "r", layers)

    def cri(manifest: str) -> dict[str, str]:
        return {TARGET_LABEL: "L1", CRI_IMAGE_REF: "h.io/e/f:g", CRI_LAYER_DIGEST: D1,
                CRI_MANIFEST_DIGEST: manifest}  # fmt: skip

    pinned = {TARGET_LABEL: "L1", STARGZ_REF: "h.io/e/f@" + D2, STARGZ_DIGEST: D1}
    record = {TARGET_LABEL: "L1", STARGZ_REF: "h.io/r/x@" + D1, STARGZ_DIGEST: D1}
    prepares = [_layer_labels("L1", D1), cri(D2), cri(D2), pinned, record, cri(D3),
                _layer_labels("L1", D1)]  # fmt: skip
    for labels in prepares:  # the first commits L1 from tag a/b:c; the others find it
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", "x", "", labels)
    assert len(layers.prepared) == 1
    sn.close()
    sn = Snapshotter(tmp_path / "r", layers)  # kept across a restart, never asked again
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "x", "", cri(D2))
    assert len(layers.prepared) == 1
    sn.prepare("ns", "ctr", "L1", {})
    assert layers.mounted.refs == ("h.io/r/x@" + D1,)
    assert layers.mounted.pending == (  # cri(D2), named again last, is the newest: tried first
        PendingRef("h.io/e/f:g", D2, D1), PendingRef("a/b:c", "", D1),
        PendingRef("h.io/e/f:g", D3, D1), PendingRef("h.io/e/f@" + D2, "", D1))  # fmt: skip
    sn.close()


def test_images_kept_per_snapshot_stay_bounded_over_many_prepare_remove_cycles(
    tmp_path: Path,
) -> None:
    """A base layer that lives for weeks is named by every new build over it: only the
    MAX_REFS most recently named images are kept, and they go with the snapshot."""
    layers = _LazyEverything(tmp_path)
    sn = Snapshotter(tmp_path / "r", layers)

    def counts() -> tuple[int, int]:
        with sn.store.transaction() as tx:
            return tuple(tx.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                         for t in ("pending_refs", "remote_refs"))  # type: ignore[return-value]

    for cycle in range(3):
        with pytest.raises(AlreadyExists):
            sn.prepare("ns", "x", "", _layer_labels("L1", D1))
        for n in range(3 * MAX_REFS):  # every build is a new tag over the same base
            labels = {TARGET_LABEL: "L1", STARGZ_REF: f"h.io/app:{cycle}.{n}", STARGZ_DIGEST: D1}
            with pytest.raises(AlreadyExists):
                sn.prepare("ns", "x", "", labels)
        with sn.store.transaction() as tx:
            (row,) = tx.all("ns")
            for n in range(3 * MAX_REFS):  # as lookups confirm them
                tx.add_remote_ref(row.id, f"h.io/app@sha256:{n:064x}")
            tx.add_remote_ref(row.id, f"h.io/app@sha256:{0:064x}")  # named again: newest
            pending = tx.pending_refs(row.id)
            refs = tx.remote_refs(row.id)
        assert counts() == (MAX_REFS, MAX_REFS)
        assert [p.image_ref for p in pending] == [  # newest first
            f"h.io/app:{cycle}.{n}" for n in reversed(range(2 * MAX_REFS, 3 * MAX_REFS))]
        assert refs[0] == "h.io/r/x@" + D1  # the record's own image is always first
        assert refs[-1] == f"h.io/app@sha256:{0:064x}" and len(refs) == MAX_REFS + 1
        sn.prepare("ns", "ctr", "L1", {})
        sn.remove("ns", "ctr")
        sn.remove("ns", "L1")
        assert counts() == (0, 0)  # gone with their snapshot
    sn.close()


def test_plain_layers_above_a_lazy_prefix_and_never_below(tmp_path: Path) -> None:
    """Mixed chains: plain layers stack on the lazy prefix's one mount; a lazy layer above a
    plain one is pulled normally (its whiteouts could not hide the plain layer's files)."""
    layers = _LazyEverything(tmp_path)
    layers.plain.add(D2)
    sn = Snapshotter(tmp_path / "r", layers)
    with pytest.raises(AlreadyExists):
        sn.prepare("ns", "x1", "", _layer_labels("L1", D1))
    (m,) = sn.prepare("ns", "x2", "L1", _layer_labels("L1P", D2))  # not lazy: unpacked
    assert m.options[-1] == f"lowerdir={tmp_path}/mnt/L1"
    sn.commit("ns", "L1P", "x2", {})
    assert layers.released == [1]  # the unpack's snapshot was the only user
    (m,) = sn.prepare("ns", "x3", "L1P", _layer_labels("L1PL", D3))
    assert m.type == "overlay" and len(layers.prepared) == 2  # above plain: pulled normally
    sn.commit("ns", "L1PL", "x3", {})
    (m,) = sn.prepare("ns", "ctr", "L1PL", {})
    lower = next(o for o in m.options if o.startswith("lowerdir="))
    p = sn.dir
    assert lower == f"lowerdir={p}/3/fs:{p}/2/fs:{tmp_path}/mnt/L1"
    assert sn.mounts("ns", "ctr") == [m]
    sn.close()


def test_proto_generation_names_a_missing_package(tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "scripts" / "gen_snapshotter_proto.py"
    res = subprocess.run([sys.executable, str(script), "--proto-root", str(tmp_path),
                          "--out-root", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "golang-github-containerd-containerd-dev" in res.stderr
    assert res.stderr.count("\n") == 1


def test_generated_service_has_containerds_wire_names() -> None:
    from lazyfs_snapshotter.api import mount_pb2, snapshots_pb2

    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert {m.name for m in service.methods} == {
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"}
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"


def test_a_stray_daemon_is_waited_for_whatever_its_pidfd_number(tmp_path: Path) -> None:
    """Cleanup waits for a detached stray through its pidfd; a snapshotter with many files
    open (a raised descriptor limit) gets one past 1024, which select() cannot watch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    high = -1
    try:
        pidfd = os.pidfd_open(proc.pid)
        high = fcntl.fcntl(pidfd, fcntl.F_DUPFD_CLOEXEC, 2000)
        os.close(pidfd)
        _end_detached(tmp_path / "mnt", proc.pid, high)  # returns once it exits on its own
        assert proc.wait(5) == 0  # not signalled
    finally:
        if high >= 0:
            os.close(high)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_chain_locks_are_per_chain_reentrant_and_dropped_when_free() -> None:
    locks = ChainLocks()
    entered = threading.Event()
    leave = threading.Event()

    def slow() -> None:
        with locks.hold("x"):
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=slow)
    t.start()
    try:
        assert entered.wait(10)
        with locks.hold("y"), locks.hold("y"):  # another chain: at once; re-entrant
            assert len(locks) == 2
        with locks.hold_if_free("x") as held:
            assert not held  # a check looks at x next time
        with locks.hold_if_free("y") as held:
            assert held
    finally:
        leave.set()
        t.join(10)
    with locks.hold_if_free("x") as held:
        assert held
    assert len(locks) == 0  # nothing kept for chains nobody holds
