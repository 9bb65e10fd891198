"""``lazyfs inspect`` on registry images: lazy layers listed, plain ones said plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lazyfs_tools.convert import convert

from lazyfs.cli import main
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.layers import Item, make_layout, make_tar
from tests.support.fixtures import registry  # noqa: F401


def test_inspect_names_plain_gzip_layers(
    tmp_path: Path,
    registry: RegistryInstance,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_layout(tmp_path / "src", [make_tar([Item("etc", "dir"), Item("etc/a", data=b"a")])])
    convert(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'lazy'}:latest")
    push_oci_layout(tmp_path / "src", f"{registry.host}/insp:gzip")
    push_oci_layout(tmp_path / "lazy", f"{registry.host}/insp:lazy")

    assert main(["inspect", "--plain-http", f"{registry.host}/insp:lazy"]) == 0
    out = capsys.readouterr()
    assert "(zstd:chunked, lazy, 2 entries)" in out.out and "etc/a" in out.out and out.err == ""

    assert main(["inspect", "--plain-http", f"{registry.host}/insp:gzip"]) == 0
    out = capsys.readouterr()
    assert "(tar+gzip, NOT LAZY: no TOC; a mount fetches it whole)" in out.out
    assert out.err.count("\n") == 1 and "1 of 1 layers" in out.err and "not lazy" in out.err

    assert main(["inspect", "--json", "--plain-http", f"{registry.host}/insp:gzip"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(d["format"], d["lazy"], d["entries"]) for d in doc] == [("tar+gzip", False, [])]
