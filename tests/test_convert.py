"""``lazyfs convert``: OCI layout in, lazy OCI layout out, checked by non-lazy tools."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.cli import main
from lazyfs.errors import FormatError, IntegrityError, NotFoundError
from lazyfs.testing.layers import Item, make_layout, make_tar, sample_items, seeded_bytes


def layers_of(tmp: Path) -> list[bytes]:
    base = make_tar(sample_items())
    upper = make_tar(
        [
            Item("etc", "dir", mode=0o755),
            Item("etc/hostname", data=b"upper\n"),
            Item("etc/.wh.empty", data=b""),
            Item("new.bin", data=seeded_bytes(70_000, 9)),
        ]
    )
    return [base, upper]


def blobs(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def top_manifest(layout: Path) -> dict:
    index = json.loads((layout / "index.json").read_text())
    d = index["manifests"][0]["digest"].split(":")[1]
    return json.loads((layout / "blobs" / "sha256" / d).read_bytes())


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
@pytest.mark.parametrize("fmt", ["zstd:chunked", "estargz"])
def test_convert_keeps_a_valid_image(tmp_path: Path, kind: str, fmt: str) -> None:
    tars = layers_of(tmp_path)
    make_layout(tmp_path / "src", tars, kind=kind, tag="v1")
    report = convert(
        f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:lazy", fmt=fmt, chunk_size=64 * 1024
    )
    assert report.layers == 2
    manifest = top_manifest(tmp_path / "dst")
    store = blobs(tmp_path / "dst")
    config = json.loads(store[manifest["config"]["digest"].split(":")[1]])
    for layer, tar, diff_id in zip(
        manifest["layers"], tars, config["rootfs"]["diff_ids"], strict=True
    ):
        blob = store[layer["digest"].split(":")[1]]
        assert len(blob) == layer["size"]
        tool = ["zstd", "-dc"] if fmt == "zstd:chunked" else ["gzip", "-dc"]
        plain = subprocess.run(tool, input=blob, capture_output=True, check=True).stdout
        import hashlib

        assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
        if fmt == "zstd:chunked":
            assert plain == tar
            assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
            assert "io.github.containers.zstd-chunked.manifest-checksum" in layer["annotations"]
        else:
            assert "containerd.io/snapshot/stargz/toc.digest" in layer["annotations"]
    # A runtime without lazy loading reads it: skopeo copies it (verifying every digest) and,
    # for gzip layers, umoci unpacks a rootfs.
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{tmp_path / 'dst'}:lazy", f"oci:{tmp_path / 'copy'}:x"],
        check=True,
        capture_output=True,
    )
    if fmt == "estargz":
        subprocess.run(
            ["umoci", "unpack", "--image", f"{tmp_path / 'dst'}:lazy", str(tmp_path / "bundle")],
            check=True,
            capture_output=True,
        )
        rootfs = tmp_path / "bundle" / "rootfs"
        assert (rootfs / "etc" / "hostname").read_bytes() == b"upper\n"
        assert not (rootfs / "etc" / "empty").exists()  # whiteout applied
        assert (rootfs / "data" / "big.bin").read_bytes() == seeded_bytes(300_000, 2)


def test_multi_platform_index_keeps_every_platform(tmp_path: Path) -> None:
    make_layout(tmp_path / "src", [make_tar(sample_items())], platforms=("amd64", "arm64"))
    convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}")
    index = top_manifest(tmp_path / "dst")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]


def test_output_is_deterministic(tmp_path: Path) -> None:
    make_layout(tmp_path / "src", layers_of(tmp_path))
    a = convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'a'}")
    b = convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'b'}")
    assert a.digest == b.digest
    assert blobs(tmp_path / "a") == blobs(tmp_path / "b")


def _no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda p: make_layout(p, [make_tar(sample_items())], mutate=lambda b: b[: len(b) // 2]),
            FormatError,
            "corrupt or truncated",
        ),
        (
            lambda p: make_layout(
                p, [make_tar(sample_items())], mutate=lambda b: b[:-9] + b"\0" * 9
            ),
            FormatError,
            "layer sha256:",
        ),
        (
            lambda p: make_layout(
                p, [make_tar([Item("x", data=b"1")])], media_type="application/x-weird"
            ),
            FormatError,
            "unknown layer media type",
        ),
        (
            lambda p: make_layout(p, [make_tar([Item("../evil", data=b"1")])]),
            FormatError,
            "escapes the root",
        ),
    ],
)
def test_bad_input_leaves_nothing(tmp_path: Path, build, error, match: str) -> None:
    build(tmp_path / "src")
    with pytest.raises(error, match=match):
        convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}")
    _no_output(tmp_path)


def test_missing_blob_and_digest_mismatch(tmp_path: Path) -> None:
    make_layout(tmp_path / "src", [make_tar(sample_items())])
    layer = top_manifest(tmp_path / "src")["layers"][0]["digest"].split(":")[1]
    path = tmp_path / "src" / "blobs" / "sha256" / layer
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises((IntegrityError, FormatError)):
        convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}")
    _no_output(tmp_path)
    path.unlink()
    with pytest.raises(NotFoundError, match="missing blob"):
        convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}")
    _no_output(tmp_path)


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["convert", f"oci:{tmp_path / 'nope'}", f"oci:{tmp_path / 'dst'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lazyfs: ")
    make_layout(tmp_path / "src", [make_tar([Item("a", data=b"a")])])
    assert main(["convert", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"]) == 0
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    assert main(["convert", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'junk'}"]) == 1
    assert "is not an OCI layout" in capsys.readouterr().err


def test_convert_adds_a_tag_to_an_existing_layout(tmp_path: Path) -> None:
    """As skopeo and umoci do: other tags stay, the same tag moves, blobs are shared."""
    make_layout(tmp_path / "src", [make_tar([Item("a", data=b"one" * 3000)])], tag="v1")
    make_layout(tmp_path / "src2", [make_tar([Item("a", data=b"two" * 3000)])], tag="v2")
    dst = tmp_path / "dst"
    first = convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{dst}:v1")
    second = convert(f"oci:{tmp_path / 'src2'}:v2", f"oci:{dst}:v2")
    index = json.loads((dst / "index.json").read_text())
    tags = {d["annotations"][oci.ANN_REF_NAME]: d["digest"] for d in index["manifests"]}
    assert tags == {"v1": first.digest, "v2": second.digest}
    again = convert(f"oci:{tmp_path / 'src2'}:v2", f"oci:{dst}:v1")  # v1 now points at v2's
    index = json.loads((dst / "index.json").read_text())
    tags = {d["annotations"][oci.ANN_REF_NAME]: d["digest"] for d in index["manifests"]}
    assert tags == {"v1": again.digest, "v2": second.digest} and again.digest == second.digest
    for tag in ("v1", "v2"):  # skopeo reads both tags of the layout it would push
        res = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{dst}:{tag}"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
    assert not list(dst.parent.glob(".dst.partial-*"))


def test_cli_head_chunk_size(tmp_path: Path, capsys) -> None:
    """``--head-chunk-size``: a big file's first chunk is cut small; under 4 KiB is refused."""
    from lazyfs.formats.layer import TAIL_SIZE, decode_layer_toc, locate_toc

    data = seeded_bytes(300_000, 5)
    make_layout(tmp_path / "src", [make_tar([Item("big", data=data)])])
    argv = ["convert", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}", "--chunk-size"]
    assert main([*argv, "128k", "--head-chunk-size", "16k"]) == 0
    (layer,) = top_manifest(tmp_path / "dst")["layers"]
    blob = blobs(tmp_path / "dst")[layer["digest"].split(":")[1]]
    loc = locate_toc(blob[-TAIL_SIZE:], len(blob), layer["annotations"])
    (big,) = [e for e in decode_layer_toc(loc, blob[loc.start : loc.end]).entries if e.chunks]
    assert [c.size for c in big.chunks] == [16 << 10, 128 << 10, 128 << 10, 300_000 - (272 << 10)]
    capsys.readouterr()
    assert main([*argv, "128k", "--head-chunk-size", "100"]) == 1
    assert "head chunk size 100 is below the 4096-byte minimum" in capsys.readouterr().err


def test_rewritten_descriptors_embed_no_stale_content(tmp_path: Path) -> None:
    """A descriptor may embed its content (``data``, base64): an index its manifests, a
    manifest its config or a small layer.  The conversion rewrites those, so a copied
    embedding would be the old content beside the new digest (a reader that takes embedded
    bytes, as image-spec allows, would refuse the image or use the old bytes)."""
    from lazyfs.ocilayout import Layout

    src = tmp_path / "src"
    make_layout(src, [make_tar([Item("a", data=b"x")])], platforms=("amd64", "arm64"))
    layout = Layout(src)

    def embedding(desc: dict) -> dict:
        data = base64.b64encode(layout.read_blob(desc["digest"])).decode()
        return {**desc, "data": data}

    top = layout.find(None)
    index = json.loads(layout.read_blob(top.digest))
    for child in index["manifests"]:
        m = json.loads(layout.read_blob(child["digest"]))
        m["config"] = embedding(m["config"])
        m["layers"] = [embedding(d) for d in m["layers"]]
        child["digest"], child["size"] = layout.put_json(m)
    index["manifests"] = [embedding(c) for c in index["manifests"]]
    d, n = layout.put_json(index)
    layout.write_top([{"mediaType": oci.MT_OCI_INDEX, "digest": d, "size": n,
                       "annotations": {oci.ANN_REF_NAME: "latest"}}])  # fmt: skip
    convert(f"oci:{src}", f"oci:{tmp_path / 'dst'}")
    out = Layout(tmp_path / "dst")
    descs = []
    for child in json.loads(out.read_blob(out.find(None).digest))["manifests"]:
        m = json.loads(out.read_blob(child["digest"]))
        descs += [child, m["config"], *m["layers"]]
    assert len(descs) == 6
    for desc in descs:
        # None left, or one that checks out.
        if "data" in desc:
            assert oci.sha256_digest(base64.b64decode(desc["data"])) == desc["digest"], desc
