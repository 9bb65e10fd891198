"""Prefetch groups stored in the registry beside the image they were made for."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import FormatError, LazyfsError
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import find_artifact, push_artifact
from lazyfs.remote.registry import RegistrySource
from lazyfs.trace.schema import GROUPS_ARTIFACT_TYPE, Group, decode_groups

log = logging.getLogger(__name__)

#: How long a mount looks for stored groups before prefetching by landmarks instead.
STORED_GROUPS_TIMEOUT = 10.0

#: A kept copy of the stored groups older than this is looked up again after a mount used it,
#: so groups pushed later for the same image reach the mount after next.
GROUPS_REFRESH_AGE = 3600.0

#: The least an opened image waits for a groups document already asked for (more when the
#: manifest's request took longer): the answer may be in while the lookup's task has not run
#: (the TOC's decode held the interpreter), and a mount that knows its group at open sends
#: the prefetch before it builds its tree.
ASKED_WAIT_MIN = 0.05
#: ... and the most (a slow manifest, e.g. one behind a token request, says little).
ASKED_WAIT_MAX = 0.5
#: Scheduler turns an opened image gives the lookup before it looks whether a document was
#: asked for: an answer read meanwhile (the referrers listing) wakes the lookup's task, which
#: asks within a turn or two; without them the opener went straight on to the tree (tens of
#: milliseconds of CPU) and the prefetch left only after readiness (traced).
SETTLE_TURNS = 4


async def push_groups(
    source: RegistrySource,
    image_manifest_desc: oci.Descriptor,
    groups_bytes: bytes,
    *,
    created: str | None = None,
) -> str:
    """Store a prefetch-groups document as an artifact referring to the image; returns the
    artifact manifest's digest.  Idempotent for identical groups."""
    return await push_artifact(
        source, image_manifest_desc, groups_bytes, GROUPS_ARTIFACT_TYPE, created=created
    )


async def find_groups(
    source: Source, manifest_digest: str, asking: Callable[[], None] | None = None
) -> bytes | None:
    """The newest prefetch groups stored for ``manifest_digest`` that decode and are made for
    that manifest, or None.  ``asking``: see :func:`find_artifact`."""

    def check(data: bytes) -> None:
        if decode_groups(data, "stored prefetch groups").manifest != manifest_digest:
            raise FormatError("groups are for another manifest")

    return await find_artifact(source, manifest_digest, GROUPS_ARTIFACT_TYPE, check, asking)


def _cached_path(cache_dir: Path, manifest_digest: str) -> Path:
    return cache_dir / f"groups-of-{oci.check_digest(manifest_digest)}"


def cached_group(cache_dir: Path, manifest_digest: str, name: str | None) -> Group | None:
    """The group ``name`` of the groups an earlier mount found stored beside the image (kept
    in ``cache_dir``), or None.  Read before the mount is ready, so its prefetch starts with
    it; a document that no longer decodes is dropped."""
    path = _cached_path(cache_dir, manifest_digest)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        doc = decode_groups(data, "cached prefetch groups")
        if doc.manifest != manifest_digest:
            raise FormatError("groups are for another manifest")
    except LazyfsError as e:
        log.info("dropping the cached prefetch groups: %s", e)
        path.unlink(missing_ok=True)
        return None
    try:
        return doc.group(name)
    except LazyfsError as e:
        log.info("not using the cached prefetch groups: %s", e)
        return None


async def find_group(
    source: Source,
    manifest_digest: str,
    name: str | None,
    cache_dir: Path | None = None,
    asking: Callable[[], None] | None = None,
) -> Group | None:
    """The group ``name`` (default: the first) of the groups stored beside the image, or None
    when there are none, they are unusable, or the registry takes too long to say.  Found
    groups are kept in ``cache_dir`` for :func:`cached_group`.  ``asking``: see
    :func:`find_artifact`."""
    try:
        with trio.move_on_after(STORED_GROUPS_TIMEOUT):
            data = await find_groups(source, manifest_digest, asking)
            if data is not None:
                doc = decode_groups(data, "prefetch groups stored with the image")
                log.info("prefetching with the groups stored beside %s", manifest_digest)
                if cache_dir is not None:
                    try:
                        atomic_write(_cached_path(cache_dir, manifest_digest), data, fsync=False)
                    except OSError as e:
                        log.warning("could not keep the prefetch groups: %s", e)
                return doc.group(name)
    except LazyfsError as e:
        log.info("no usable prefetch groups in the registry: %s", e)
    return None


class StoredGroups:
    """The group ``name`` stored beside an image: the copy an earlier mount kept in
    ``cache_dir``, at once, else looked up in the registry from the moment the manifest digest
    is known (:meth:`begin`, beside the TOC fetch: the lookup's round trips overlap it instead
    of following the mount's readiness)."""

    def __init__(self, source: Source, cache_dir: Path, name: str | None) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.name = name
        self.manifest = ""
        self.kept = False  # the group came from the kept copy
        self.group: Group | None = None
        self.done = trio.Event()
        #: a document was asked for: the lookup's answer is a request away
        self.asked = trio.Event()
        #: what one request to the registry took (the manifest's): how long a reader may
        #: wait for the lookup rather than ask for its own bytes
        self.request_time = 0.0

    def begin(self, nursery: trio.Nursery, manifest_digest: str, request_time: float) -> None:
        self.manifest = manifest_digest
        self.request_time = request_time
        self.group = cached_group(self.cache_dir, manifest_digest, self.name)
        if self.group is not None:
            self.kept = True
            self.done.set()
        else:
            nursery.start_soon(self._lookup)

    async def _lookup(self) -> None:
        try:
            self.group = await find_group(
                self.source, self.manifest, self.name, self.cache_dir, self.asked.set
            )
        finally:
            self.done.set()

    async def settle(self) -> None:
        """Once the TOCs are in: when a document was asked for, wait for the lookup (about
        one request's time, within :data:`ASKED_WAIT_MIN`-:data:`ASKED_WAIT_MAX`), so an
        answer already in is taken; else (nothing asked yet, or nothing stored) return."""
        for _ in range(SETTLE_TURNS):
            if self.done.is_set() or self.asked.is_set():
                break
            await trio.lowlevel.checkpoint()
        if self.done.is_set() or not self.asked.is_set():
            return
        with trio.move_on_after(min(max(self.request_time, ASKED_WAIT_MIN), ASKED_WAIT_MAX)):
            await self.done.wait()

    async def wait(self) -> Group | None:
        """The group, once known (None: none stored, or not usable)."""
        await self.done.wait()
        return self.group

    async def refresh(self, max_age: float = GROUPS_REFRESH_AGE) -> None:
        """After the kept copy was used: look in the registry again when it is older than
        ``max_age`` (a newer document replaces it); the copy's age starts again either way,
        so an image without new groups costs one lookup per ``max_age``, off the start-up."""
        if not self.kept:
            return
        path = _cached_path(self.cache_dir, self.manifest)
        try:
            if time.time() - path.stat().st_mtime < max_age:
                return
            os.utime(path)
        except OSError:
            return
        log.info("looking for newer prefetch groups beside %s", self.manifest)
        await find_group(self.source, self.manifest, self.name, self.cache_dir)
