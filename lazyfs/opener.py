"""Open an image: the one place that puts source, chunk cache, TOCs and layer store together.

The mount daemon, ``lazyfs pull``, ``lazyfs trace`` and the snapshotter all open images here,
so every caller gets the same rules: manifests and configs come from the document cache when
their digest is known, TOCs from the TOC cache, and every layer is registered with its blob
size (which a registry that ignores Range needs, or each read downloads the prefix again).

A layer without a TOC is fetched whole and indexed (:mod:`lazyfs.store.wholelayer`): before
``open_image`` returns, or, with ``background`` (the mount daemon), after: the image is then
returned at once with ``layers`` empty, the caller starts the downloads in a nursery of its
own (``start_background``), and ``complete()`` waits for them and fills ``layers``.  The
layers above the topmost pending one are known meanwhile (``layers_above_pending``): the
mount answers from them what no pending layer can change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import LazyfsError
from lazyfs.formats.layer import TocLocation
from lazyfs.formats.toc import TOC
from lazyfs.remote.base import Source
from lazyfs.remote.referrers import shared_referrers
from lazyfs.remote.registry import RegistrySource, RetryPolicy
from lazyfs.remote.resolve import ResolvedImage, open_source
from lazyfs.store import ChunkCache, Layer, LayerStore
from lazyfs.store.chunkcache import DEFAULT_MAX_BYTES
from lazyfs.store.documents import CachingSource
from lazyfs.store.earlyrange import MAX_EARLY_BYTES, EarlyRange, early_range, group_requests
from lazyfs.store.tocs import LayerInfo, Unsaved, load_tocs, save_tocs
from lazyfs.store.wholelayer import PendingIndex, WholeFetch, WholeLayers
from lazyfs.trace.schema import Group
from lazyfs.trace.stored import StoredGroups

log = logging.getLogger(__name__)

#: How long the referrers listing begun with a cold open may take (its users wait their own
#: bounded times for it: the deltas lookup, the stored groups' lookup).
REFERRERS_TIMEOUT = 10.0


#: The connections warmed for a group's first requests per layer (one per rank share of a
#: layer laid out by path, ``fs.prefetch.EARLY_RANK_SHARES``): they go one after another,
#: each as those before are nearly in, so two or three are on their way at a time (and a
#: multipart answer read to its end leaves its connection for the next).
GROUP_EARLY_REQUESTS = 3


def warm_connections(*, early_ranges: bool, referrers: bool, groups: bool = False) -> int:
    """How many connections a cold open warms while its manifest travels: one for each
    request sent together with the TOC's, which race for idle connections (a range left
    without one pays a handshake in series): the config's, an early range's, the referrers
    listing and its tag fallback (``referrers`` asked at once, as a registry may lack the API).
    With ``groups`` (a group with byte ranges given at open), early ranges are a group's
    first requests: :data:`GROUP_EARLY_REQUESTS`."""
    early = (GROUP_EARLY_REQUESTS if groups else 1) if early_ranges else 0
    return 1 + early + 2 * int(referrers)


@dataclass(frozen=True, slots=True)
class OpenedLayer:
    """One manifest layer: its descriptor, its TOC and the store's view of its blob (shared by
    every manifest entry naming the same blob)."""

    descriptor: oci.Descriptor
    location: TocLocation
    toc: TOC
    layer: Layer


class LayerIndexing:
    """The layers of an image some of which are still being fetched whole and indexed in the
    background: ``layers`` is filled, all at once, when the last of them is indexed."""

    def __init__(
        self,
        infos: list[LayerInfo],
        whole: WholeLayers,
        store: LayerStore,
        source: Source,
    ) -> None:
        self.layers: list[OpenedLayer] = []
        self.descriptors = [li.descriptor for li in infos]
        self._infos = infos
        self._whole = whole
        self._store = store
        self._source = source
        self._pending: list[PendingIndex] = list(whole.pending.values())
        self.complete = not self._pending
        if self.complete:
            self._fill()

    def start(self, nursery: trio.Nursery) -> None:
        """Start the downloads in ``nursery`` (the caller's: they end with it)."""
        for p in self._pending:
            p.start(nursery)

    async def wait(self) -> None:
        """Return once every layer is indexed; raise (LazyfsError) if one of them failed.
        A failed layer is fetched again first: each access retries it."""
        if self.complete:
            return
        for p in self._pending:
            p.retry()
        results = {p.desc.digest: await p.wait() for p in self._pending}
        if not self.complete:  # another waiter may have filled it meanwhile
            self._infos = [
                LayerInfo(li.descriptor, *results[li.descriptor.digest])
                if li.descriptor.digest in results
                else li
                for li in self._infos
            ]
            self._fill()
            self.complete = True

    def above_pending(self) -> list[OpenedLayer]:
        """The layers above the topmost one still pending, in manifest order: their TOCs are
        final already (empty when complete, or when the top layer is pending)."""
        if self.complete:
            return []
        pending = {p.desc.digest for p in self._pending}
        top = max(i for i, li in enumerate(self._infos) if li.descriptor.digest in pending)
        return [self._open(li) for li in self._infos[top + 1 :]]

    def _fill(self) -> None:
        self.layers[:] = [self._open(li) for li in self._infos]

    def _open(self, li: LayerInfo) -> OpenedLayer:
        digest = li.descriptor.digest
        source = self._whole.sources.get(digest, self._source)
        layer = self._store.add_layer(digest, source, li.toc, li.descriptor.size)
        return OpenedLayer(li.descriptor, li.location, li.toc, layer)


@dataclass(frozen=True, slots=True)
class OpenedImage:
    image: str  # as the caller named it
    resolved: ResolvedImage
    layers: list[OpenedLayer]  # manifest order; empty until complete() when opened in background
    source: Source
    cache: ChunkCache
    store: LayerStore
    whole: WholeLayers  # the layers without a TOC, and their downloads
    indexing: LayerIndexing
    groups: StoredGroups | None = None  # with ``stored_groups``: the prefetch group, or its lookup
    #: tasks that live as long as the image (cancelled as it closes): the lookups, and work a
    #: caller starts before it has a nursery of its own
    side: trio.Nursery | None = None
    #: TOCs fetched but not yet in the TOC cache: written by ``save_tocs``, or at close
    unsaved: list[Unsaved] = dataclasses.field(default_factory=list)

    @property
    def manifest(self) -> str:
        return self.resolved.manifest_digest

    @property
    def descriptors(self) -> list[oci.Descriptor]:
        """The opened layers' descriptors, in manifest order (known before ``complete``)."""
        return self.indexing.descriptors

    @property
    def is_complete(self) -> bool:
        return self.indexing.complete

    def start_background(self, nursery: trio.Nursery) -> None:
        """Start fetching the layers still pending, in ``nursery``."""
        self.indexing.start(nursery)

    async def complete(self) -> None:
        """Wait until every layer is indexed and ``layers`` filled; raises LazyfsError when a
        layer fetched in the background failed (the next call tries it again)."""
        await self.indexing.wait()

    def layers_above_pending(self) -> list[OpenedLayer]:
        """While layers are pending: those above the topmost of them (see LayerIndexing)."""
        return self.indexing.above_pending()

    async def save_tocs(self) -> None:
        """Write the fetched TOCs to the TOC cache (a mount does once its start is over)."""
        await save_tocs(self.unsaved)

    def plain_descriptors(self) -> list[oci.Descriptor]:
        """The layers without a TOC (fetched whole), in manifest order."""
        return [d for d in self.descriptors if d.digest in self.whole.sources]

    def store_layers(self) -> list[Layer]:
        """The store's layers in manifest order (a blob listed twice appears twice)."""
        return [ol.layer for ol in self.layers]

    def unique_layers(self) -> list[Layer]:
        """Each blob once, in order of first appearance."""
        seen: dict[str, Layer] = {}
        for ol in self.layers:
            seen.setdefault(ol.layer.blob_digest, ol.layer)
        return list(seen.values())


@asynccontextmanager
async def open_image(
    image: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size: int = DEFAULT_MAX_BYTES,
    plain_http: bool = False,
    insecure: bool = False,
    platform: str = "linux/amd64",
    hosts_dir: str | os.PathLike[str] | None = None,
    docker_config: str | os.PathLike[str] | None = None,
    retry: RetryPolicy | None = None,
    layer_count: int | None = None,
    progress: Callable[[WholeFetch], None] | None = None,
    background: bool = False,
    stored_groups: bool = False,
    group: str | None = None,
    entry_tables: bool = False,
    referrers: bool = False,
    early_ranges: bool = False,
    group_ranges: Group | None = None,
    hold_early: trio.Event | None = None,
) -> AsyncIterator[OpenedImage]:
    """Resolve ``image`` (a registry reference or ``oci:DIR[:TAG]``) and read every layer's
    TOC; on exit write the readiness maps and close the source.  ``hosts_dir``,
    ``docker_config`` and ``retry`` reach the registry source (mirrors, credentials, how long
    a fetch may take).  ``layer_count``: open only the lowest N layers (``layers`` then holds
    N; ``resolved`` is still the whole image), which is how the snapshotter mounts a chain of
    lazy layers.  ``progress`` hears of each whole-layer download as it starts and ends.
    ``background``: do not wait for those downloads (see :class:`LayerIndexing`).
    ``stored_groups``: find the prefetch group ``group`` stored beside the image (kept from an
    earlier open, else looked up while the TOCs load; see :class:`StoredGroups`).
    ``entry_tables``: keep the TOCs' entries as columns, each made when asked for (a mount's
    memory; not for what relies on one object per entry).  ``referrers``: when a TOC is
    fetched (a cold open), list the image's referrers beside it, for a deltas lookup after
    the open (it then takes the listing instead of a round trip of its own, which the
    prefetch would wait for).  ``early_ranges``: when a TOC is fetched, request the layer's
    start-up range (a re-laid-out layer's annotation) beside it, adopted by the store as a
    request of its own once the TOC is in (:mod:`lazyfs.store.earlyrange`); with
    ``stored_groups``, the stored group's byte ranges too, once it is known, and
    ``group_ranges``' (a group given at open).  ``hold_early``: adopted early ranges
    hand their bytes over (to be decoded) only once it is set.  A registry
    image whose manifest is not in the document cache (a cold open) has connections opened
    beside the manifest's request for those that go beside the TOC's (:func:`warm_connections`)."""
    source, ref = open_source(
        image,
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
        docker_config=docker_config,
        retry=retry,
    )
    try:
        # The start-up scan stats every cached chunk: keep it off the event loop.
        cache = await trio.to_thread.run_sync(ChunkCache, cache_dir, cache_size)
        if isinstance(source, RegistrySource):
            source.spool_dir = cache.blobs_dir  # blobs a mirror sends whole, downloaded once
        source = CachingSource(source, cache.documents_dir)
        # Layers without a TOC are fetched whole and indexed once; their chunks are read
        # through a source of their own (the local tar).
        whole = WholeLayers(source, cache, progress, background=background)
        groups = StoredGroups(source, cache.documents_dir, group) if stored_groups else None
        unsaved: list[Unsaved] = []
        store: LayerStore | None = None
        try:
            # The store closes after the side tasks end (cancelled): an early range or early
            # prefetch still verifying chunks then has handed them over, and the close writes
            # them with the rest held.
            async with _side_tasks() as side:
                early = _Early(side, source, group_ranges, hold_early)
                if groups is not None and early_ranges:
                    side.start_soon(_when_known, groups, early)
                remote = source.underlying()
                registry = isinstance(remote, RegistrySource)
                if isinstance(remote, RegistrySource) and not _known(cache.documents_dir, image):
                    # Beside the manifest's request, one for each request that goes out
                    # together with the TOC's (which keeps the manifest's connection).
                    warm = warm_connections(
                        early_ranges=early_ranges,
                        # The stored groups' lookup lists the referrers too (a mount
                        # without deltas).
                        referrers=referrers or stored_groups,
                        # A stored group's come after the lookup's round trip, whose
                        # connections are idle by then.
                        groups=group_ranges is not None and bool(group_ranges.requests),
                    )
                    side.start_soon(remote.preconnect, warm)
                tocs = await load_tocs(
                    source,
                    ref,
                    platform=platform,
                    toc_dir=cache.tocs_dir,
                    whole=whole,
                    layer_count=layer_count,
                    on_resolved=_begin(groups, side, source if referrers else None),
                    unsaved=unsaved,
                    tables=entry_tables,
                    toc_sent=early.toc_sent if early_ranges else None,
                )
                if registry:
                    _remember(cache.documents_dir, image, tocs.resolved)
                if groups is not None:
                    await groups.settle()  # a document on its way: the mount starts with it
                store = LayerStore(cache)
                indexing = LayerIndexing(tocs.layers, whole, store, source)
                early.adopt(indexing, store)
                yield OpenedImage(
                    image,
                    tocs.resolved,
                    indexing.layers,
                    source,
                    cache,
                    store,
                    whole,
                    indexing,
                    groups,
                    side,
                    unsaved,
                )
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await save_tocs(unsaved)  # those the caller did not save yet
                    if store is not None:
                        await store.aclose()  # readiness maps: the next open starts warm
                finally:
                    await whole.aclose()  # the local tars; their chunks stay in the cache
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


def _tag_file(documents: Path, image: str) -> Path:
    """Where the digest ``image`` last resolved to is kept (a tag's, beside its documents)."""
    return documents / f"tag-{hashlib.sha256(image.encode()).hexdigest()}"


def _known(documents: Path, image: str) -> bool:
    """Whether ``image``'s manifest (or index) is likely in the document cache: a warm open,
    whose requests after the manifest's are few enough for the manifest's connection alone.
    A tag is judged by the digest it resolved to last time (it may have moved since: then
    the open is cold and only goes without a warmed connection)."""
    digest = image.rsplit("@", 1)[1] if "@" in image else None
    if digest is None:
        try:
            # Bytes, decoded leniently: a damaged hint is no digest, never an error.
            digest = _tag_file(documents, image).read_bytes().decode("ascii", "replace")
        except OSError:
            return False
    try:
        return (documents / oci.check_digest(digest)).is_file()  # named as store.documents does
    except LazyfsError:
        return False  # not a digest: a damaged hint


def _remember(documents: Path, image: str, resolved: ResolvedImage) -> None:
    """Keep the digest ``image`` resolved to, for the next open's :func:`_known`."""
    digest = resolved.index_digest or resolved.manifest_digest
    path = _tag_file(documents, image)
    try:
        if not path.is_file() or path.read_bytes() != digest.encode():
            atomic_write(path, digest.encode(), fsync=False)
    except OSError as e:  # a hint only: the next open warms a connection it may not need
        log.info("keeping the digest of %s: %s", image, e)


def _begin(
    groups: StoredGroups | None, nursery: trio.Nursery, referrers: Source | None
) -> Callable[[str, float, bool], None] | None:
    """``load_tocs``'s hook: the groups lookup starts with the TOCs' fetch (the manifest's
    tells what a request costs), and so does, on a cold open, the listing of the image's
    referrers through ``referrers`` (a source)."""
    if groups is None and referrers is None:
        return None

    def begin(digest: str, request_time: float, cold: bool) -> None:
        if groups is not None:
            groups.begin(nursery, digest, request_time)
        if referrers is not None and cold:
            nursery.start_soon(_list_referrers, referrers, digest)

    return begin


class _Early:
    """An open's early ranges: a layer's, requested as its TOC's request has left (on
    another connection: the TOC keeps the manifest's), from its annotation or from the
    group's byte ranges (``Group.requests``) once the group is known; adopted by the store
    once the TOCs are in."""

    def __init__(
        self,
        nursery: trio.Nursery,
        source: Source,
        group: Group | None,
        hold: trio.Event | None = None,
    ) -> None:
        self.nursery = nursery
        self.source = source
        self.group = group
        self.hold = hold
        self.ranges: dict[str, list[EarlyRange]] = {}
        self.sent: dict[str, oci.Descriptor] = {}  # layers whose TOC's request has left
        self.adopted = False

    def toc_sent(self, desc: oci.Descriptor) -> None:
        """``load_tocs``'s ``toc_sent``."""
        if desc.digest in self.sent:
            return
        self.sent[desc.digest] = desc
        span = early_range(desc)
        if span is not None:
            self._request(desc, [[span]])
        self._from_group(desc)

    def group_known(self, group: Group) -> None:
        """The group came (stored beside the image): its ranges of layers whose TOC is on
        its way go now, unless the TOCs are in already (the prefetch sends them itself)."""
        if self.group is None and not self.adopted:
            self.group = group
            for desc in self.sent.values():
                self._from_group(desc)

    def _from_group(self, desc: oci.Descriptor) -> None:
        # A layer with an annotated range is re-laid out: that range is the group's files.
        if self.group is None or desc.digest in self.ranges:
            return
        requests = self.group.requests.get(desc.digest)
        if requests:
            self._request(desc, group_requests(desc, requests))

    def _request(self, desc: oci.Descriptor, requests: list[list[tuple[int, int]]]) -> None:
        # In the order given (a group's: rank order), each once those before are nearly in.
        before: list[EarlyRange] = []
        for runs in requests:
            # The image's, not only each layer's: every range's bytes wait in memory until
            # the TOCs are decoded, and a manifest can annotate many layers.
            held = sum(e.size for es in self.ranges.values() for e in es)
            size = sum(end - start for start, end in runs)
            if held + size > MAX_EARLY_BYTES:
                log.info("layer %s: early range left out: the image's are too large", desc.digest)
                return
            e = EarlyRange(desc.digest, runs[0][0], runs[-1][1], runs)
            e.hold = self.hold
            self.ranges.setdefault(desc.digest, []).append(e)
            self.nursery.start_soon(e.fetch_after, self.source, tuple(before))
            before.append(e)

    def adopt(self, indexing: LayerIndexing, store: LayerStore) -> None:
        """Hand each early range to the store's layer, whose chunks it covers are in flight
        from now on; one whose layer is not open (TOC failed, layers still indexed) is
        dropped."""
        self.adopted = True
        layers = {ol.layer.blob_digest: ol.layer for ol in indexing.layers}
        for digest, es in self.ranges.items():
            layer = layers.get(digest)
            for e in es:
                task = store.adopt(layer, e) if layer is not None else None
                if task is None:
                    e.drop()
                else:
                    self.nursery.start_soon(task)
        self.ranges.clear()


async def _when_known(groups: StoredGroups, early: _Early) -> None:
    """Hand ``early`` the stored group once its lookup has found it."""
    group = await groups.wait()
    if group is not None:
        early.group_known(group)


async def _list_referrers(source: Source, digest: str) -> None:
    """Fetch the referrers listing that later lookups share (``shared_referrers``); a failure
    is theirs to meet again (a failed listing is not shared), never the open's."""
    try:
        with trio.move_on_after(REFERRERS_TIMEOUT):
            await shared_referrers(source, digest)
    except LazyfsError as e:
        log.info("listing the referrers of %s: %s", digest, e)
    except Exception as e:  # a bonus: nothing here may take a mount down
        log.warning("listing the referrers of %s failed: %s", digest, e)


@asynccontextmanager
async def _side_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for lookups that live as long as the image (they handle their own errors and
    are cancelled at its close); the body's own error comes out as itself, not wrapped in an
    exception group, so callers catch LazyfsError as before."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
