"""Image references: ``[HOST/]REPO[:TAG][@sha256:…]`` with Docker Hub defaults, and
``oci:DIR[:TAG]`` for an OCI layout on disk."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import FormatError
from lazyfs.oci import check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _is_host(component: str) -> bool:
    # Same rule as the Docker CLI: a first component with a dot or a port, or "localhost",
    # names a registry; otherwise it is part of a Docker Hub repository name.
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> Reference:
    """Parse an image reference.  Raises FormatError with the offending text."""
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        check_digest(digest)
    host = DOCKER_HUB
    first, sep, remainder = rest.partition("/")
    if sep and _is_host(first):
        host, rest = first, remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise FormatError(f"bad tag {tag!r} in image reference {text!r}")
    if not rest or not all(_REPO_COMPONENT.match(c) for c in rest.split("/")):
        raise FormatError(f"bad repository name in image reference {text!r}")
    if host == DOCKER_HUB:
        host = DOCKER_HUB_REGISTRY
        if "/" not in rest:
            rest = f"library/{rest}"
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host=host, repository=rest, tag=tag, digest=digest)


def parse_oci_ref(ref: str) -> tuple[Path, str | None]:
    """``oci:DIR[:TAG]`` → (DIR, TAG or None).  A DIR that exists as given wins over a ``:``
    split, since paths may hold one."""
    if not ref.startswith("oci:"):
        raise FormatError(f"{ref!r} is not an OCI layout reference (oci:DIR[:TAG])")
    spec = ref[4:]
    if not spec:
        raise FormatError(f"{ref!r} names no directory (oci:DIR[:TAG])")
    if Path(spec).is_dir():
        return Path(spec), None
    head, sep, tag = spec.rpartition(":")
    if sep and "/" not in tag and head:
        return Path(head), tag
    return Path(spec), None
