"""Traces → optimizer → prefetch groups → convert --prefetch, and groups in the registry."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import subprocess
import tarfile
from pathlib import Path

import msgspec
import pytest
import trio
import zstandard
from lazyfs_tools.convert import ANN_PREFETCH_GROUPS, convert

from lazyfs import oci
from lazyfs.cli import main
from lazyfs.errors import FormatError
from lazyfs.formats.layer import locate_toc, toc_json
from lazyfs.remote.push import push_manifest
from lazyfs.remote.referrers import list_referrers, referrers_tag, subject_descriptor
from lazyfs.remote.registry import RegistrySource
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import Item, make_layout, make_tar, sample_items, seeded_bytes
from lazyfs.trace.optimize import optimize
from lazyfs.trace.schema import (
    FileAccess,
    Group,
    PrefetchGroups,
    RankedEntry,
    Tier,
    Trace,
    decode_groups,
    encode,
)
from lazyfs.trace.stored import find_groups, push_groups
from tests.support.fixtures import registry  # noqa: F401

MANIFEST = "sha256:" + "a" * 64
L0, L1 = "sha256:" + "0" * 64, "sha256:" + "1" * 64
MS = 1_000_000


def dg(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def fa(path: str, t_ms: float, *, layer: str = L0, digest: str | None = None, **kw) -> FileAccess:
    size = kw.pop("size", 1000)
    return FileAccess(
        path=path,
        layer=layer,
        digest=digest or dg(path),
        size=size,
        first_open_ns=int(t_ms * MS),
        first_read_ns=int(t_ms * MS),
        reads=kw.pop("reads", 1),
        bytes_read=kw.pop("bytes_read", size),
        **kw,
    )


def trace(files: list[FileAccess], group: str = "start", manifest: str = MANIFEST) -> Trace:
    return Trace(
        image="reg.example/app:v1",
        manifest=manifest,
        layers=[L0, L1],
        group=group,
        started="2026-11-23T00:00:00Z",
        duration_ns=60_000 * MS,
        files=files,
    )


def names(g: Group) -> dict[str, list[str]]:
    return {t.name: [e.path for e in t.entries] for t in g.tiers}


# -- the optimizer ------------------------------------------------------------------------


def sample_runs() -> list[Trace]:
    late = 40_000  # after the default 30 s start-up window
    return [
        trace(
            [
                fa("bin/sh", 1),
                fa("lib/libc.so", 2),
                fa("etc/passwd", 3),
                fa("var/log/late", late),
                fa("etc/opened-only", 4, reads=0, bytes_read=0),
            ]
        ),
        trace([fa("bin/sh", 1), fa("lib/libc.so", 2), fa("var/log/late", late + 5)]),
        trace(
            [
                fa("bin/sh", 1),
                fa("lib/libc.so", 3),
                fa("usr/share/rare", 2),
                fa("var/log/late", late),
            ]
        ),
    ]


def test_tiers_and_order() -> None:
    doc = optimize(sample_runs())
    assert [g.name for g in doc.groups] == ["start"]
    g = doc.groups[0]
    assert g.runs == 3
    assert names(g) == {
        "always": ["bin/sh", "lib/libc.so"],
        # both in one run of three; rare came second in its run, passwd third in its
        "sometimes": ["usr/share/rare", "etc/passwd"],
        "rest": ["var/log/late"],  # read by every run, but only after start-up
    }
    scores = [e.score for t in g.tiers for e in t.entries if t.name != "rest"]
    assert scores[:2] == sorted(scores[:2])


def test_deterministic_whatever_the_argument_order() -> None:
    runs = [*sample_runs(), trace([fa("x", 1), fa("bin/sh", 2)], group="other")]
    outputs = {encode(optimize(list(p))) for p in itertools.permutations(runs)}
    assert len(outputs) == 1
    doc = decode_groups(outputs.pop())
    assert [g.name for g in doc.groups] == ["other", "start"]


def test_dedup_by_digest_across_layers() -> None:
    same = dg("shared-content")
    runs = [
        trace([fa("usr/lib/b.so", 1, layer=L1, digest=same), fa("lib/a.so", 2, digest=same)]),
        trace([fa("usr/lib/b.so", 1, layer=L1, digest=same)]),
    ]
    entries = [e for t in optimize(runs).groups[0].tiers for e in t.entries]
    assert [(e.layer, e.path, e.digest) for e in entries] == [(L1, "usr/lib/b.so", same)]


def test_longer_wait_ranks_earlier_among_ties() -> None:
    # a and b swap places between the two runs: equal median rank; b made readers wait.
    runs = [
        trace([fa("a", 1), fa("b", 2, wait_ns=50 * MS)]),
        trace([fa("b", 1, wait_ns=10 * MS), fa("a", 2)]),
    ]
    entries = optimize(runs).groups[0].tiers[0].entries
    assert [e.path for e in entries] == ["b", "a"]
    assert entries[0].score < entries[1].score


def test_more_runs_rank_earlier_at_equal_rank() -> None:
    runs = [trace([fa("x", 1), fa("rare", 2), fa("y", 3)])] + [
        trace([fa("x", 1), fa("often", 2), fa("y", 3)]) for _ in range(3)
    ]
    tiers = names(optimize(runs).groups[0])
    assert tiers["always"] == ["x", "y"]
    assert tiers["sometimes"] == ["often", "rare"]


def test_ranges_union_or_whole_file() -> None:
    runs = [
        trace(
            [
                fa("big", 1, size=10_000, ranges=[(0, 100), (5000, 5100)]),
                fa("most", 2, size=1000, ranges=[(0, 400)]),
            ]
        ),
        trace(
            [
                fa("big", 1, size=10_000, ranges=[(50, 200)]),
                fa("most", 2, size=1000, ranges=[(400, 900)]),
            ]
        ),
    ]
    by = {e.path: e for e in optimize(runs).groups[0].tiers[0].entries}
    assert by["big"].ranges == [(0, 200), (5000, 5100)]
    assert by["most"].ranges == []  # 90% read: fetch the whole file


def test_mixed_manifests_refused() -> None:
    with pytest.raises(FormatError, match="different images"):
        optimize([trace([fa("a", 1)]), trace([fa("a", 1)], manifest="sha256:" + "b" * 64)])


# -- convert --prefetch -------------------------------------------------------------------


def layout_with_groups(tmp: Path, wanted: list[str]) -> tuple[Path, Path, list[bytes]]:
    base = make_tar(sample_items())
    upper = make_tar([Item("opt", "dir", mode=0o755), Item("opt/x", data=seeded_bytes(5000, 3))])
    src = make_layout(tmp / "src", [base, upper], tag="v1")
    index = json.loads((src / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((src / "blobs/sha256" / mdigest.split(":")[1]).read_bytes())
    layers = [d["digest"] for d in manifest["layers"]]
    sizes = {it.name: len(it.data) for it in sample_items()}
    sizes["bin/hard-tool"] = sizes["bin/tool"]  # a trace sees a hardlink's content
    entries = [RankedEntry(layer=layers[0], path=p, digest=dg(p), size=sizes[p]) for p in wanted]
    doc = PrefetchGroups(
        image="src",
        manifest=mdigest,
        layers=layers,
        groups=[
            Group(
                name="start",
                runs=1,
                tiers=[
                    Tier(name="always", entries=entries[:2]),
                    Tier(name="sometimes", entries=entries[2:]),
                    Tier(name="rest", entries=[]),
                ],
            )
        ],
    )
    groups = tmp / "groups.json"
    groups.write_bytes(encode(doc))
    return src, groups, [base, upper]


def lazy_layers(layout: Path) -> tuple[dict, list[tuple[dict, bytes]]]:
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: (layout / "blobs/sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    return manifest, [(d, blob(d["digest"])) for d in manifest["layers"]]


def toc_names(desc: dict, data: bytes) -> list[tuple[str, int]]:
    loc = locate_toc(data[-64:], len(data), desc["annotations"])
    doc = json.loads(toc_json(loc, data[loc.start : loc.end]))
    return [(e["name"], e.get("offset", 0)) for e in doc["entries"] if e["type"] != "chunk"]


def members(tar: bytes) -> dict[str, tuple[str, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            out[m.name] = (m.type.decode(), f.read() if f else m.linkname.encode())
    return out


WANTED = ["data/big.bin", "bin/hard-tool", "etc/hostname", "utf8-ünïcode ✓.txt"]


@pytest.mark.parametrize("fmt", ["zstd:chunked", "estargz"])
def test_convert_prefetch_puts_the_group_first(tmp_path: Path, fmt: str) -> None:
    src, groups, tars = layout_with_groups(tmp_path, WANTED)
    report = convert(
        f"oci:{src}:v1", f"oci:{tmp_path / 'dst'}", fmt=fmt, chunk_size=64 * 1024, prefetch=groups
    )
    assert report.prefetch_entries == 4
    manifest, layers = lazy_layers(tmp_path / "dst")
    assert manifest["annotations"][ANN_PREFETCH_GROUPS].startswith("sha256:")
    desc, data = layers[0]
    toc = toc_names(desc, data)
    files = [(n, off) for n, off in toc if off]  # entries with content, in blob order
    # Rank order; the hardlink brought its target; each file's parent directory came first.
    want = ["data/big.bin", "bin/tool", "etc/hostname", "utf8-ünïcode ✓.txt", ".prefetch.landmark"]
    assert [n for n, _ in files[:5]] == want
    assert [off for _, off in files] == sorted(off for _, off in files)
    names_in_order = [n.rstrip("/") for n, _ in toc]
    assert names_in_order.index("data") < names_in_order.index("data/big.bin")
    assert names_in_order.index("bin") < names_in_order.index("bin/tool")
    assert names_in_order.count("bin") == 1
    # A valid tar with the source's members and contents, which tar itself extracts.
    tool = ["zstd", "-dc"] if fmt == "zstd:chunked" else ["gzip", "-dc"]
    plain = subprocess.run(tool, input=data, capture_output=True, check=True).stdout
    got = members(plain)
    got.pop(".prefetch.landmark")
    got.pop("stargz.index.json", None)
    assert got == members(tars[0])
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp_path / "x")], input=plain, check=True)
    config = json.loads(
        (tmp_path / "dst/blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes()
    )
    assert config["rootfs"]["diff_ids"][0] == "sha256:" + hashlib.sha256(plain).hexdigest()
    # The upper layer has no group entries.
    upper_desc, upper = layers[1]
    upper_names = [n for n, _ in toc_names(upper_desc, upper)]
    if fmt == "zstd:chunked":
        assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(upper)).read() == tars[1]
    else:
        assert upper_names[0] == ".no.prefetch.landmark"


def test_convert_without_prefetch_is_unchanged(tmp_path: Path) -> None:
    src, groups, tars = layout_with_groups(tmp_path, WANTED)
    convert(f"oci:{src}:v1", f"oci:{tmp_path / 'plain'}", chunk_size=64 * 1024)
    _, layers = lazy_layers(tmp_path / "plain")
    for (_, data), tar in zip(layers, tars, strict=True):
        assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read() == tar
    # Re-running with the groups is deterministic too.
    for d in ("a", "b"):
        convert(f"oci:{src}:v1", f"oci:{tmp_path / d}", chunk_size=64 * 1024, prefetch=groups)
    assert lazy_layers(tmp_path / "a") == lazy_layers(tmp_path / "b")


def test_convert_prefetch_of_another_image_is_refused(tmp_path: Path) -> None:
    _, groups, _ = layout_with_groups(tmp_path, WANTED)
    other = make_layout(tmp_path / "other", [make_tar([Item("a", data=b"a")])] * 3, tag="v1")
    with pytest.raises(FormatError, match="not those of"):
        convert(f"oci:{other}:v1", f"oci:{tmp_path / 'dst'}", prefetch=groups)
    assert not (tmp_path / "dst").exists()


# -- CLI ----------------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lazyfs: ") and match in err, err


def test_cli_optimize_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = sample_runs()
    paths = []
    for i, t in enumerate(runs):
        p = tmp_path / f"t{i}.json"
        p.write_bytes(encode(t))
        paths.append(str(p))
    out = tmp_path / "groups.json"
    assert main(["optimize", *paths, "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["optimize", *reversed(paths), "--out", str(out)]) == 0
    assert out.read_bytes() == first
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(capsys, ["optimize", str(bad), "--out", str(out)], "bad.json is not JSON")
    one_line_error(capsys, ["optimize", str(tmp_path / "nope"), "--out", str(out)], "nope")
    other = tmp_path / "other.json"
    other.write_bytes(encode(trace([fa("a", 1)], manifest="sha256:" + "b" * 64)))
    one_line_error(
        capsys, ["optimize", paths[0], str(other), "--out", str(out)], "different images"
    )
    src, groups, _ = layout_with_groups(tmp_path, WANTED)
    dst = tmp_path / "dst"
    argv = ["convert", f"oci:{src}:v1", f"oci:{dst}", "--prefetch", str(groups)]
    one_line_error(capsys, [*argv, "--group", "nope"], "no prefetch group 'nope'")
    assert not dst.exists()
    assert main([*argv, "--group", "start"]) == 0


# -- the registry -------------------------------------------------------------------------


def test_push_and_find_groups(registry: RegistryInstance, tmp_path: Path) -> None:  # noqa: F811
    make_layout(tmp_path / "img", [make_tar([Item("a", data=b"a")])], tag="v1")
    push_oci_layout(tmp_path / "img", f"{registry.host}/groups:v1", tag="v1")

    async def run() -> None:
        src = RegistrySource(registry.host, "groups", plain_http=True)
        try:
            _, _, mdigest = await src.get_manifest("v1")
            subject = await subject_descriptor(src, mdigest)
            assert await find_groups(src, mdigest) is None
            doc = PrefetchGroups(image="i", manifest=mdigest, layers=[], groups=[])
            g1 = encode(doc)
            a1 = await push_groups(src, subject, g1, created="2026-11-23T10:00:00Z")
            assert await find_groups(src, mdigest) == g1
            refs, api = await list_referrers(src, mdigest)
            assert not api and [r.digest for r in refs] == [a1]  # docker-registry: tag schema
            # Identical groups: nothing new.
            assert await push_groups(src, subject, g1) == a1
            assert [r.digest for r in (await list_referrers(src, mdigest))[0]] == [a1]
            # Someone else's referrer in the index survives; new groups replace ours.
            index = {
                "schemaVersion": 2,
                "mediaType": oci.MT_OCI_INDEX,
                "manifests": [
                    *[msgspec.to_builtins(r) for r in refs],
                    {
                        "mediaType": oci.MT_OCI_MANIFEST,
                        "digest": a1,  # any manifest that exists will do
                        "size": refs[0].size,
                        "artifactType": "application/vnd.example.signature",
                    },
                ],
            }
            await push_manifest(
                src, referrers_tag(mdigest), msgspec.json.encode(index), oci.MT_OCI_INDEX
            )
            g2 = encode(PrefetchGroups(image="i2", manifest=mdigest, layers=[], groups=[]))
            a2 = await push_groups(src, subject, g2, created="2026-11-23T11:00:00Z")
            assert a2 != a1
            refs, _ = await list_referrers(src, mdigest)
            kinds = sorted((r.artifactType or "", r.digest) for r in refs)
            assert kinds == [
                ("application/vnd.example.signature", a1),
                ("application/vnd.lazyfs.prefetch-groups.v1+json", a2),
            ]
            assert await find_groups(src, mdigest) == g2
        finally:
            await src.aclose()

    trio.run(run)


def test_cli_optimize_push(registry: RegistryInstance, tmp_path: Path) -> None:  # noqa: F811
    make_layout(tmp_path / "img", [make_tar([Item("b", data=b"b")])], tag="v1")
    push_oci_layout(tmp_path / "img", f"{registry.host}/pushed:v1", tag="v1")
    mdigest = json.loads((tmp_path / "img/index.json").read_text())["manifests"][0]["digest"]
    t = tmp_path / "t.json"
    t.write_bytes(encode(trace([fa("b", 1)], manifest=mdigest)))
    out = tmp_path / "g.json"
    image = f"{registry.host}/pushed:v1"
    assert main(["optimize", str(t), "--out", str(out), "--push", image, "--plain-http"]) == 0

    async def found() -> bytes | None:
        src = RegistrySource(registry.host, "pushed", plain_http=True)
        try:
            return await find_groups(src, mdigest)
        finally:
            await src.aclose()

    assert trio.run(found) == out.read_bytes()
    # Traces of an image that is not in the repository: one clean error.
    t.write_bytes(encode(trace([fa("b", 1)])))
    assert main(["optimize", str(t), "--out", str(out), "--push", image, "--plain-http"]) == 1
