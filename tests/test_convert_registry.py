"""``lazyfs convert`` with registry references on either side, against docker-registry."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.cli import main
from lazyfs.errors import NotFoundError
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from tests.support.fixtures import registry  # noqa: F401

ACCEPT = ", ".join((oci.MT_OCI_INDEX, oci.MT_OCI_MANIFEST, oci.MT_DOCKER_MANIFEST))


def remote_manifest(reg: RegistryInstance, repo: str, ref: str) -> dict:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def layout_manifest(layout: Path, digest: str) -> dict:
    return json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())


def test_convert_between_registries_and_layouts(
    tmp_path: Path,
    registry: RegistryInstance,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    tars = [make_tar([Item("big", data=seeded_bytes(20_000_000, 7)), Item("etc", "dir")])]
    make_layout(tmp_path / "src", tars, platforms=("amd64", "arm64"))
    push_oci_layout(tmp_path / "src", f"{registry.host}/conv:gzip", all_images=True)
    local = convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'local'}")  # the reference

    # Registry to registry, skopeo's spelling: the same index as a local conversion, pushed
    # with exactly the blobs written (the 20 MB layer goes in PATCH pieces).
    host = registry.host
    assert (
        main(
            ["convert", "--plain-http", f"docker://{host}/conv:gzip", f"docker://{host}/conv:lazy"]
        )
        == 0
    )
    assert "conv:lazy" in capsys.readouterr().out
    index = remote_manifest(registry, "conv", "lazy")
    assert [m["digest"] for m in index["manifests"]] == [
        m["digest"] for m in layout_manifest(tmp_path / "local", local.digest)["manifests"]
    ]
    for m in index["manifests"]:
        pushed = remote_manifest(registry, "conv", m["digest"])
        assert {ly["mediaType"] for ly in pushed["layers"]} == {oci.MT_LAYER_ZSTD}
        assert pushed == layout_manifest(tmp_path / "local", m["digest"])

    # Registry to a layout, one platform: a single manifest, tagged as the source was.
    report = convert(
        f"{host}/conv:gzip", f"oci:{tmp_path / 'arm'}", plain_http=True, platform="linux/arm64"
    )
    top = json.loads((tmp_path / "arm" / "index.json").read_text())["manifests"]
    assert len(top) == 1 and top[0]["annotations"][oci.ANN_REF_NAME] == "gzip"
    assert top[0]["digest"] == report.digest and top[0]["mediaType"] == oci.MT_OCI_MANIFEST
    arm = [m for m in index["manifests"] if m["platform"]["architecture"] == "arm64"]
    assert report.digest == arm[0]["digest"]

    # A layout to a registry; an unknown platform is a one-line error naming what there is.
    convert(f"oci:{tmp_path / 'arm'}", f"{host}/conv:arm", plain_http=True)
    assert remote_manifest(registry, "conv", "arm")["layers"][0]["mediaType"] == oci.MT_LAYER_ZSTD
    with pytest.raises(NotFoundError, match=r"linux/s390x.*available: linux/amd64, linux/arm64"):
        convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'x'}", platform="linux/s390x")
    assert not (tmp_path / "x").exists()
