"""Open an image for mounting: resolve it, then read every layer's footer and TOC.

This is the only start-up I/O a mount does; file content is fetched later, on demand.  TOCs
are kept beside the chunk cache (``DIR/tocs``), keyed by layer digest, so a remount reads no
TOC from the network.  A cached TOC is checked against the manifest's digest annotation again
on every load, as a fetched one is.  The cache keeps the TOC decoded (``pack_toc``'s columns,
with their sha256), not its JSON: a mount rebuilds the entries without parsing, normalising
and checking the JSON again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from lazyfs import oci
from lazyfs.atomic import atomic_write
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.formats.layer import (
    TAIL_SIZE,
    TocLocation,
    decode_layer_table,
    decode_layer_table_steps,
    decode_layer_toc,
    expected_toc_digest,
    locate_toc,
    tail_start_hint,
    toc_by_annotations,
)
from lazyfs.formats.toc import MAX_TOC_BYTES, TOC, TocBudget, pack_toc, table_toc, unpack_toc
from lazyfs.heap import start_up_thresholds, trim_heap
from lazyfs.remote.base import REQUEST_SENT, Source
from lazyfs.remote.resolve import ResolvedImage, resolve_manifest
from lazyfs.store.wholelayer import WholeLayers

log = logging.getLogger(__name__)

TAIL_GUESS = 64 * 1024
TOC_FETCH_TRIES = 3

#: How long the image's other first requests (config, what ``on_resolved`` starts) wait for
#: the TOCs' requests to be sent: the TOC is the long pole of a cold start (its bytes, then
#: its decode), so its request takes the connection the manifest came on rather than racing
#: the others for it and, losing, paying a new connection's round trip.
TOC_FIRST_WAIT = 0.05


class NotLazyError(FormatError):
    """The layer has no TOC (a plain gzip, zstd or tar layer)."""


class LayerInfo(msgspec.Struct):
    descriptor: oci.Descriptor
    location: TocLocation
    toc: TOC


class Image(msgspec.Struct):
    reference: str
    resolved: ResolvedImage
    layers: list[LayerInfo]


class _CachedTOC(msgspec.Struct):
    location: TocLocation
    raw: bytes = b""  # the TOC's bytes as fetched (caches written before ``packed``)
    packed: bytes = b""  # pack_toc of the decoded TOC
    packed_sha256: bytes = b""


#: a decoded TOC, and its packed bytes when its entries are a table of them (else None)
Decoded = tuple[TOC, bytes | None]


#: A fetched TOC up to this many bytes is decoded on the event loop's thread, in steps (of
#: up to ~15 ms at ~10k entries; other tasks run between them: the stored groups' lookup,
#: the early ranges' reads), not in a worker: the Debian image's (394 kB, 8,218 entries,
#: ~45 ms of CPU) took 90-220 ms of wall time in a worker while the loop read the group's
#: early ranges, the two threads handing the GIL to and fro (BENCHMARKS "H82").  A larger
#: one (over ~20k entries) would hold the loop for steps of over 30 ms: still a worker's.
DECODE_ON_LOOP_BYTES = 1 << 20
#: Scheduler turns between two steps of a decode on the loop (see _others_turns).
STEP_TURNS = 16
#: The same for a cached TOC's packed bytes (loaded in one step, ten times cheaper per byte:
#: the Debian image's, 1.6 MB, in 4 ms).
UNPACK_ON_LOOP_BYTES = 16 << 20


async def _decode(loc: TocLocation, raw: bytes, budget: TocBudget | None, tables: bool) -> Decoded:
    """A fetched TOC's bytes decoded; with ``tables``, straight into an EntryTable's columns
    (no entry made) and packed: on the loop when small enough and no worker is decoding
    another of the image's layers (its lock is not waited for here), else in a worker."""
    if tables and len(raw) <= DECODE_ON_LOOP_BYTES:
        budget = TocBudget(max_bytes=MAX_TOC_BYTES) if budget is None else budget
        if budget.decoding.acquire(blocking=False):
            try:
                steps = decode_layer_table_steps(loc, raw, budget)
                while True:
                    try:
                        next(steps)
                    except StopIteration as done:
                        packed, toc = done.value
                        return toc, packed
                    await _others_turns()
            finally:
                budget.decoding.release()
    if tables:
        _worker_thresholds()
    return await trio.to_thread.run_sync(_decode_sync, loc, raw, budget, tables)


def _worker_thresholds() -> None:
    """Before a mount's TOC decodes in a worker: glibc's thresholds held at their start
    values (:func:`~lazyfs.heap.start_up_thresholds`; the mount raises them once its TOCs
    are in), else the worker's arena keeps the decode's temporaries (17 MiB at 100k
    entries).  Not for a decode on the loop: the main arena is trimmed after the start-up,
    and held low, every large block of the decode was mapped and faulted in afresh (the
    Debian TOC's decode: 52 ms of CPU against 43, fresh processes, BENCHMARKS "H82")."""
    start_up_thresholds()


async def _others_turns() -> None:
    """Between two steps of a decode on the loop: :data:`STEP_TURNS` scheduler turns.  A task
    reading a socket takes one read a turn: with one turn a step the stored groups' lookup
    asked for the early ranges only after the decode, and with few the early ranges' bytes
    (the group's 8.9 MiB on the Debian image, in 64 KiB reads) waited in the kernel, the
    sender stalled, until the decode was over.  A turn with nothing else to run costs tens
    of microseconds."""
    for _ in range(STEP_TURNS):
        await trio.lowlevel.checkpoint()


def _decode_sync(loc: TocLocation, raw: bytes, budget: TocBudget | None, tables: bool) -> Decoded:
    if tables:
        packed, toc = decode_layer_table(loc, raw, budget)
        return toc, packed
    return decode_layer_toc(loc, raw, budget), None


def _unpack_cached(entry: _CachedTOC, budget: TocBudget | None, tables: bool) -> Decoded:
    if not entry.packed:  # an older cache's JSON
        return _decode_sync(entry.location, entry.raw, budget, tables)
    if hashlib.sha256(entry.packed).digest() != entry.packed_sha256:
        raise FormatError("the cached TOC does not match its digest")
    if tables:
        return table_toc(entry.packed, budget=budget), None
    return unpack_toc(entry.packed, budget=budget), None


async def _store(cached: Path, loc: TocLocation, toc: TOC | bytes) -> None:
    """Write ``toc`` (or its :func:`pack_toc` bytes) to the TOC cache."""
    # Packed on this thread: packing in a worker left ~30 MiB at 100k entries in that
    # thread's malloc arena for good (measured); only the write goes to a worker.
    packed = toc if isinstance(toc, bytes) else pack_toc(toc)
    entry = _CachedTOC(loc, packed=packed, packed_sha256=hashlib.sha256(packed).digest())
    data = msgspec.msgpack.encode(entry)
    del packed, entry
    cached.parent.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(atomic_write, cached, data)


#: a fetched TOC not written to the TOC cache yet: where it goes, and what (or its packed
#: bytes, when the mount keeps its entries as a table of them)
Unsaved = tuple[Path, TocLocation, TOC | bytes]


async def save_tocs(unsaved: list[Unsaved]) -> None:
    """Write the TOCs ``load_layer`` left in ``unsaved`` to the TOC cache (for the next
    mount; a failure costs that mount a fetch, so it is logged, not raised)."""
    written = bool(unsaved)
    while unsaved:
        cached, loc, toc = unsaved.pop()
        try:
            await _store(cached, loc, toc)
        except OSError as e:
            log.warning("could not keep the TOC at %s: %s", cached, e)
        del toc
    if written:
        # The packed TOCs and their encodings were freed among what the mount keeps: at 100k
        # entries 18 MiB of RSS until the heap is trimmed (measured; a trim takes ~1 ms).
        trim_heap()


async def _keep(
    cached: Path | None, loc: TocLocation, decoded: Decoded, unsaved: list[Unsaved] | None
) -> TOC:
    """Write (or leave in ``unsaved``) a fetched TOC (its packed bytes when it has them);
    the TOC to use."""
    toc, packed = decoded
    if cached is not None:
        kept = toc if packed is None else packed
        if unsaved is not None:
            unsaved.append((cached, loc, kept))
        else:
            await _store(cached, loc, kept)
    return toc


async def load_layer(
    source: Source,
    desc: oci.Descriptor,
    toc_dir: Path | None,
    *,
    verify: bool = True,
    budget: TocBudget | None = None,
    unsaved: list[Unsaved] | None = None,
    tables: bool = False,
) -> LayerInfo:
    """Read (or take from ``toc_dir``) a layer's TOC, charging ``budget`` (the image's).
    ``verify``: refuse a TOC the manifest gives no digest for, since every chunk digest comes
    from it (only ``lazyfs inspect`` of a bare blob file passes False).  ``unsaved``: a
    fetched TOC is put there instead of written to ``toc_dir`` now (packing it is tens of
    milliseconds of CPU a mount need not spend before it is ready: :func:`save_tocs`).
    ``tables``: the TOC's entries as an :class:`EntryTable`, made when asked for (what a
    mount keeps; a small TOC is then decoded on the loop, a large one in a worker under
    :func:`_worker_thresholds`)."""
    hexpart = oci.check_digest(desc.digest)
    cached = toc_dir / hexpart if toc_dir is not None else None
    if cached is not None and cached.exists():
        try:
            entry = msgspec.msgpack.decode(cached.read_bytes(), type=_CachedTOC)
            # Checked against what this manifest promises, not what was promised then.
            want = expected_toc_digest(desc.annotations, entry.location.format)
            if want is None or want != entry.location.expected_digest:
                raise FormatError("the manifest promises another TOC digest")
            if tables and entry.packed and len(entry.packed) <= UNPACK_ON_LOOP_BYTES:
                decoded = _unpack_cached(entry, budget, tables)  # one short step, on the loop
            else:
                if tables:
                    _worker_thresholds()
                decoded = await trio.to_thread.run_sync(_unpack_cached, entry, budget, tables)
            if not entry.packed:  # an older cache: rewritten in the form loaded faster
                try:
                    await _keep(cached, entry.location, decoded, None)
                except OSError as e:
                    log.info("could not rewrite the cached TOC of %s: %s", desc.digest, e)
            return LayerInfo(desc, entry.location, decoded[0])
        except (msgspec.DecodeError, msgspec.ValidationError, LazyfsError) as e:
            log.info("not using the cached TOC of %s: %s", desc.digest, e)
            cached.unlink(missing_ok=True)
    where = f"layer {desc.digest}"
    if desc.size < TAIL_SIZE or oci.LAYER_TYPES.get(desc.mediaType) == "tar":
        raise NotLazyError(f"{where} ({desc.mediaType}) is not lazy: it has no TOC")
    loc = toc_by_annotations(desc.annotations, desc.size)
    if loc is not None:
        # Just the TOC: the tar-split after it (as large as the TOC) is no use to a mount.
        try:
            decoded = await _fetch_toc(source, desc.digest, loc, None, budget, tables, tries=1)
        except (FormatError, IntegrityError) as e:
            log.info("%s: no TOC where the manifest says (%s); reading the footer", where, e)
        else:
            return LayerInfo(desc, loc, await _keep(cached, loc, decoded, unsaved))
    # One request for the footer and, usually, the TOC before it: a round trip saved per
    # layer on a slow link.
    tail_start = min(
        tail_start_hint(desc.annotations, desc.size, TAIL_GUESS), desc.size - TAIL_SIZE
    )
    tail = await source.read_range(desc.digest, tail_start, desc.size)
    try:
        loc = locate_toc(tail[-TAIL_SIZE:], desc.size, desc.annotations)
    except FormatError as e:
        raise NotLazyError(
            f"{where} ({desc.mediaType}) is not lazy: {e}; convert the image with `lazyfs convert`"
        ) from None
    if verify and loc.expected_digest is None:
        raise FormatError(
            f"{where}: the manifest gives no TOC digest annotation, so its content cannot be "
            "verified; refusing it"
        )
    first = tail[loc.start - tail_start : loc.end - tail_start] if loc.start >= tail_start else None
    try:
        decoded = await _fetch_toc(source, desc.digest, loc, first, budget, tables)
    except LazyfsError as e:
        raise type(e)(f"{where}: {e}") from None
    return LayerInfo(desc, loc, await _keep(cached, loc, decoded, unsaved))


def _promises_toc(desc: oci.Descriptor) -> bool:
    """The manifest promises a TOC digest for the layer (so it is lazy, or the image bad)."""
    ann = desc.annotations
    return bool(expected_toc_digest(ann, "zstd:chunked") or expected_toc_digest(ann, "estargz"))


async def _fetch_toc(
    source: Source,
    digest: str,
    loc: TocLocation,
    first: bytes | None,
    budget: TocBudget | None,
    tables: bool,
    tries: int = TOC_FETCH_TRIES,
) -> Decoded:
    """The decoded TOC, from its bytes (``first`` if already read).  Bytes that fail
    their digest are most likely damaged in transit: fetched again, as chunks are."""
    for attempt in range(tries):
        raw = first if first is not None else await source.read_range(digest, loc.start, loc.end)
        first = None
        try:
            return await _decode(loc, raw, budget, tables)
        except IntegrityError as e:
            if attempt + 1 == tries:
                raise
            log.warning("TOC of %s: %s; fetching it again", digest, e)
    raise AssertionError("unreachable")


def _then(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    """``first``, then, on the first call only, ``then``."""
    called = False

    def call() -> None:
        nonlocal called
        first()
        if not called:
            called = True
            then()

    return call


class _Countdown:
    """``done`` is set once each of ``n`` parties has called its :meth:`once` callable (at
    least once: a party may call it again, as each retried request does)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = trio.Event()
        if n == 0:
            self.done.set()

    def once(self) -> Callable[[], None]:
        called = False

        def call() -> None:
            nonlocal called
            if not called:
                called = True
                self.left -= 1
                if self.left == 0:
                    self.done.set()

        return call


async def load_tocs(
    source: Source,
    ref: str,
    *,
    platform: str = "linux/amd64",
    toc_dir: Path | None = None,
    layer_count: int | None = None,
    whole: WholeLayers | None = None,
    on_resolved: Callable[[str, float, bool], None] | None = None,
    unsaved: list[Unsaved] | None = None,
    tables: bool = False,
    toc_sent: Callable[[oci.Descriptor], None] | None = None,
) -> Image:
    """Resolve ``ref`` and load the layer TOCs concurrently: all of them, or the lowest
    ``layer_count`` (a prefix of the image, as containerd's snapshotter mounts a chain).  A
    layer without a TOC is an error (NotLazyError), unless ``whole`` is given: then it is
    fetched whole and indexed.  ``on_resolved`` hears of the manifest digest, what resolving
    it took (s) and whether a TOC is fetched (a cold open), once the TOCs' requests are sent
    (:data:`TOC_FIRST_WAIT`): what else needs the digest starts beside them, as the config's
    fetch does.  ``unsaved``,
    ``tables``: see :func:`load_layer`.  ``toc_sent`` hears of each layer whose TOC is
    fetched, once that request has left (what goes beside it: an early range)."""
    t0 = trio.current_time()
    found_manifest = await resolve_manifest(source, ref, platform)
    resolve_time = trio.current_time() - t0
    descriptors = list(found_manifest.manifest.layers)
    n_layers = len(descriptors)
    if layer_count is not None:
        if not 0 < layer_count <= len(descriptors):
            raise FormatError(
                f"{ref}: cannot take {layer_count} layers of an image with {len(descriptors)}"
            )
        descriptors = descriptors[:layer_count]
    layers: list[LayerInfo | None] = [None] * len(descriptors)
    budget = TocBudget()  # bounds the whole image, not each layer
    # The config (diff_ids) is fetched beside the TOCs: only layers fetched whole need it.
    config: list[ResolvedImage] = []
    config_error: list[LazyfsError] = []
    have_config = trio.Event()

    async def get_config() -> None:
        try:
            blob = await source.get_blob(found_manifest.manifest.config.digest)
            resolved = found_manifest.with_config(blob)
            diff_ids = resolved.config.rootfs.diff_ids
            if whole is not None and len(diff_ids) != n_layers:
                raise FormatError(
                    f"{ref}: the config lists {len(diff_ids)} diff_ids for {n_layers} layers"
                )
            config.append(resolved)
        except LazyfsError as e:
            config_error.append(e)  # raised after the nursery: as itself, not in a group
        finally:
            have_config.set()

    tocs_sent = _Countdown(len(descriptors))
    # Which layers' TOCs are kept from an earlier open: no request for those.
    kept = [
        toc_dir is not None and (toc_dir / oci.check_digest(d.digest)).exists() for d in descriptors
    ]
    cold = not all(kept)

    async def one(i: int, desc: oci.Descriptor) -> None:
        tried = False
        if whole is None or _promises_toc(desc):
            sent = tocs_sent.once()
            if not kept[i]:
                if toc_sent is not None:
                    sent = _then(sent, functools.partial(toc_sent, desc))
                REQUEST_SENT.set(sent)  # the source calls it as the TOC's request leaves
            else:
                sent()  # a cached TOC: no request
            try:
                layers[i] = await load_layer(
                    source, desc, toc_dir, budget=budget, unsaved=unsaved, tables=tables
                )
                return
            except NotLazyError as e:
                if whole is None:
                    raise
                log.info("%s", e)
            finally:
                sent()
                REQUEST_SENT.set(None)
            tried = True
        else:
            tocs_sent.once()()  # fetched whole: after the config
        await have_config.wait()
        if not config:
            return
        diff_id = config[0].config.rootfs.diff_ids[i]
        found = whole.cached(desc, diff_id)
        if found is None:
            if not tried:
                try:
                    layers[i] = await load_layer(
                        source, desc, toc_dir, budget=budget, unsaved=unsaved, tables=tables
                    )
                    return
                except NotLazyError as e:
                    log.info("%s", e)
            found = await whole.index(desc, diff_id)
        layers[i] = LayerInfo(desc, *found)

    async def after_tocs_sent() -> None:
        with trio.move_on_after(TOC_FIRST_WAIT):
            await tocs_sent.done.wait()
        if on_resolved is not None:
            on_resolved(found_manifest.digest, resolve_time, cold)
        await get_config()

    async with trio.open_nursery() as nursery:
        for i, desc in enumerate(descriptors):
            nursery.start_soon(one, i, desc)
        nursery.start_soon(after_tocs_sent)
    if config_error:
        raise config_error[0]
    resolved = config[0]
    return Image(ref, resolved, [li for li in layers if li is not None])
