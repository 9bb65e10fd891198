"""Prefetch groups stored beside the image, on the real registry: a mount looks them up while
its TOC loads (not after readiness), reads just the TOC (no tar-split), and a copy kept from an
earlier mount is refreshed in the background once old."""

# ruff: noqa: F811
from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import pytest
import trio
import trio.testing
from lazyfs_tools.convert import convert

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.ocilayout import Layout
from lazyfs.opener import open_image
from lazyfs.remote import referrers
from lazyfs.remote.push import push_manifest
from lazyfs.remote.referrers import MAX_EMBEDDED, referrers_tag, subject_descriptor
from lazyfs.remote.registry import RegistrySource
from lazyfs.store import tocs
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import Item, make_layout, make_tar, seeded_bytes
from lazyfs.testing.mounts import mounted, startup_groups, wait_prefetched
from lazyfs.trace import stored
from lazyfs.trace.schema import Group
from lazyfs.trace.stored import push_groups
from tests.support.fixtures import fault_proxy, registry  # noqa: F401
from tests.test_store import MemSource

FILES = {f"app/f{i}.bin": seeded_bytes(150_000, 70 + i) for i in range(6)}
USED = ["app/f4.bin", "app/f1.bin"]


def _push(registry: RegistryInstance, d: Path, repo: str) -> dict:
    items = [Item("app", "dir", mode=0o755), *(Item(n, data=b) for n, b in FILES.items())]
    make_layout(d / "src", [make_tar(items)], tag="v1")
    convert(f"oci:{d / 'src'}:v1", f"oci:{d / 'lazy'}:v1", chunk_size=64 * 1024)
    push_oci_layout(d / "lazy", f"{registry.host}/{repo}:v1", tag="v1")
    manifest = Layout(d / "lazy").manifest("v1")
    return {
        "manifest": Layout(d / "lazy").find("v1").digest,
        "layer": manifest.layers[0],
        "config": manifest.config.digest,
        "repo": repo,
    }


def _doc(img: dict, group_name: str) -> bytes:
    doc = json.loads(startup_groups(img["repo"], img["manifest"], img["layer"].digest, FILES, USED))
    doc["groups"][0]["name"] = group_name
    return json.dumps(doc).encode()


def _store(
    registry: RegistryInstance, img: dict, group_name: str, created: str, embed: bool = True
) -> bytes:
    """Store a groups document for ``img``; its bytes.  ``embed=False``: as lazyfs pushed
    before embedding (the listing names the artifact, which names the document)."""
    data = _doc(img, group_name)

    async def go() -> None:
        src = RegistrySource(registry.host, img["repo"], plain_http=True)
        try:
            subject = await subject_descriptor(src, img["manifest"])
            await push_groups(src, subject, data, created=created)
        finally:
            await src.aclose()

    with mock.patch.object(referrers, "MAX_EMBEDDED", MAX_EMBEDDED if embed else -1):
        trio.run(go)
    return data


def test_groups_lookup_beside_the_toc_fetch(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Groups pushed before embedding: the artifact manifest and the document are fetched."""
    img = _push(registry, tmp_path, "stored/overlap")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z", embed=False)
    fault_proxy.match = "/v2/"  # documents too
    fault_proxy.delay = 0.2  # every request in flight long enough to see what overlaps
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(f"{fault_proxy.host}/{img['repo']}:v1", tmp_path / "mnt", *args) as m:
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert pf["group"] == "startup" and not pf["error"]
        for name in USED:
            assert (m.mountpoint / name).read_bytes() == FILES[name]
    # The i-th "in" event is the i-th request (paths and ranges are recorded with it).
    ins = [i for i, ev in enumerate(fault_proxy.events) if ev[0] == "in"]
    at = {n: ins[n] for n in range(len(ins))}
    paths, ranges, events = fault_proxy.paths, fault_proxy.ranges, fault_proxy.events

    def out_of(n: int) -> int:
        return next(i for i, ev in enumerate(events) if ev[0] == "out" and ev[1] == paths[n])

    toc = next(n for n, r in enumerate(ranges) if r is not None)
    # Just the TOC's bytes: the tar-split after it is not fetched.
    ann = img["layer"].annotations or {}
    start, length = (int(x) for x in ann[oci.ANN_ZSTD_POSITION].split(":")[:2])
    assert ranges[toc] == f"bytes={start}-{start + length - 1}"
    # The groups lookup (the referrers tag schema: docker-registry has no referrers API) was
    # sent before the TOC's answer came back: it does not wait for the mount to be ready.
    lookup = next(n for n, p in enumerate(paths) if "/manifests/sha256-" in p)
    assert at[lookup] < out_of(toc)
    # The groups document is asked for beside the artifact manifest, not after it.
    artifact = next(n for n in range(lookup + 1, len(paths)) if "/manifests/sha256:" in paths[n])
    document = next(
        n for n in range(lookup + 1, len(paths)) if "/blobs/" in paths[n] and ranges[n] is None
    )
    assert at[document] < out_of(artifact)


def test_a_slow_lookup_does_not_hold_readers(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    img = _push(registry, tmp_path, "stored/slow")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z")
    fault_proxy.match = "/v2/"
    fault_proxy.delay, fault_proxy.delay_match = 0.9, "/manifests/sha256-"  # < GATE_WAIT
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(f"{fault_proxy.host}/{img['repo']}:v1", tmp_path / "mnt", *args) as m:
        name = USED[0]
        assert (m.mountpoint / name).read_bytes() == FILES[name]
        read_done = len(fault_proxy.events)
        # The lookup still goes on, and its group is prefetched when it comes.
        assert wait_prefetched(m.mountpoint)["prefetch"]["group"] == "startup"
    events, paths = fault_proxy.events, fault_proxy.paths
    lookup = next(n for n, p in enumerate(paths) if "/manifests/sha256-" in p)
    answered = next(i for i, ev in enumerate(events) if ev[0] == "out" and ev[1] == paths[lookup])
    assert answered >= read_done  # the reader had its bytes before the lookup's answer


def _kept(cache: Path) -> Path:
    (kept,) = (cache / "documents").glob("groups-of-*")
    return kept


def _kept_name(cache: Path) -> str:
    name: str = json.loads(_kept(cache).read_bytes())["groups"][0]["name"]
    return name


def test_kept_groups_are_refreshed_once_old(registry: RegistryInstance, tmp_path: Path) -> None:
    img = _push(registry, tmp_path, "stored/refresh")
    _store(registry, img, "first", "2026-11-30T10:00:00Z")
    ref, cache, mnt = f"{registry.host}/{img['repo']}:v1", tmp_path / "c", tmp_path / "mnt"
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(cache))
    with mounted(ref, mnt, *args):
        assert wait_prefetched(mnt)["prefetch"]["group"] == "first"
    assert _kept_name(cache) == "first"
    _store(registry, img, "second", "2026-11-30T11:00:00Z")
    # A young kept copy is used as it is and not looked up again.
    mtime = _kept(cache).stat().st_mtime
    with mounted(ref, mnt, *args):
        assert wait_prefetched(mnt)["prefetch"]["group"] == "first"
    assert _kept_name(cache) == "first" and _kept(cache).stat().st_mtime == mtime
    # An old one is still used at once (no lookup on the start-up path), then refreshed.
    old = time.time() - 2 * 3600
    os.utime(_kept(cache), (old, old))
    with mounted(ref, mnt, *args):
        assert wait_prefetched(mnt)["prefetch"]["group"] == "first"
        deadline = time.monotonic() + 20
        while _kept_name(cache) != "second":
            assert time.monotonic() < deadline, "the kept groups were not refreshed"
            time.sleep(0.05)
    with mounted(ref, mnt, *args):
        assert wait_prefetched(mnt)["prefetch"]["group"] == "second"


def test_no_stored_groups(registry: RegistryInstance, tmp_path: Path) -> None:
    img = _push(registry, tmp_path, "stored/none")
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(f"{registry.host}/{img['repo']}:v1", tmp_path / "mnt", *args) as m:
        for name in USED:
            assert (m.mountpoint / name).read_bytes() == FILES[name]
    assert not list((tmp_path / "c" / "documents").glob("groups-of-*"))


def test_one_listing_and_the_prefetch_before_readiness(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    img = _push(registry, tmp_path, "stored/early")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z")
    fault_proxy.match = "/v2/"
    # The layer's bytes (TOC, then chunks) come slowly: the groups are known before the TOC.
    fault_proxy.delay, fault_proxy.delay_match = 0.3, img["layer"].digest
    cache = tmp_path / "c"
    args = ("--plain-http", "--read-only", "--cache", str(cache))  # deltas looked up too
    with mounted(f"{fault_proxy.host}/{img['repo']}:v1", tmp_path / "mnt", *args) as m:
        at_ready = len(fault_proxy.paths)
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert pf["group"] == "startup" and not pf["error"]
        for name in USED:
            assert (m.mountpoint / name).read_bytes() == FILES[name]
        # The TOC goes to the TOC cache once the prefetch is done, not on the way to readiness.
        deadline = time.monotonic() + 10
        while not list((cache / "tocs").iterdir()):
            assert time.monotonic() < deadline, "the TOC was not kept"
            time.sleep(0.05)
    paths, ranges = fault_proxy.paths, fault_proxy.ranges
    # One listing of the image's referrers serves the groups lookup and the deltas lookup.
    assert sum("/manifests/sha256-" in p for p in paths) == 1
    # The group was known before the TOC came: the prefetch's first request went out before
    # the mount was ready (the tree is built while it travels).  The proxy's thread may note
    # it just after the test saw readiness (a tiny image's tree takes a millisecond), so what
    # is checked is that nothing but chunks was asked after readiness and that the prefetch's
    # first request came no later than the first request after it.
    layer = [n for n, p in enumerate(paths) if img["layer"].digest in p and ranges[n]]
    assert len(layer) >= 2 and layer[1] <= at_ready
    assert all(img["layer"].digest in p and ranges[n] for n, p in enumerate(paths) if n >= at_ready)


def _open(proxy: FaultProxy, img: dict, cache: Path) -> tuple[bool, float]:
    """Open the image as a mount does; whether its group was known when the opener returned,
    and how long that took."""

    async def go() -> tuple[bool, float]:
        t0 = trio.current_time()
        ref = f"{proxy.host}/{img['repo']}:v1"
        async with open_image(ref, cache_dir=cache, plain_http=True, stored_groups=True) as im:
            assert im.groups is not None
            return im.groups.group is not None, trio.current_time() - t0

    return trio.run(go)


def test_the_toc_rides_a_connection_already_open(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path, monkeypatch: Any
) -> None:
    """The TOC is the long pole of a cold open: its request must not pay a new connection's
    round trip while the config's and the groups lookup's requests take the open ones, even
    when the client is slow to send it (a token to fetch first, a loaded CPU)."""
    img = _push(registry, tmp_path, "stored/order")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z")
    load_layer = tocs.load_layer

    async def slow_to_send(*args: Any, **kw: Any) -> Any:
        await trio.sleep(0.01)
        return await load_layer(*args, **kw)

    monkeypatch.setattr(tocs, "load_layer", slow_to_send)
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.02  # a round trip: the requests beside the TOC overlap it
    for i in range(10):
        fault_proxy.reset()
        fault_proxy.match, fault_proxy.delay = "/v2/", 0.02
        _open(fault_proxy, img, tmp_path / f"c{i}")
        asked = list(zip(fault_proxy.paths, fault_proxy.ranges, fault_proxy.ports, strict=True))
        toc = [n for n, (p, r, _) in enumerate(asked) if img["layer"].digest in p and r]
        assert len(toc) == 1, asked
        port = asked[toc[0]][2]
        # An earlier request came on the TOC's connection: it was open already.
        assert any(q == port for _, _, q in asked[: toc[0]]), asked
        assert any("/manifests/sha256-" in p for p, _, _ in asked), asked


def test_the_listing_has_warm_connections_without_deltas(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A cold open looking for stored groups but not for deltas warms a connection for each
    request beside the TOC's: the config's and the listing's two (the referrers API and its
    tag), which otherwise paid a handshake each in series."""
    img = _push(registry, tmp_path, "stored/warm")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z")
    fault_proxy.match = "/v2/"
    _open(fault_proxy, img, tmp_path / "c")  # stored groups, no referrers (deltas) listing
    assert fault_proxy.paths.count("/v2/") == 3, fault_proxy.paths


def test_a_document_on_its_way_is_waited_for(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path, monkeypatch: Any
) -> None:
    img = _push(registry, tmp_path, "stored/settle")
    data = _store(registry, img, "startup", "2026-11-30T10:00:00Z", embed=False)

    # Blobs (the TOC's, the config's, the groups document's) wait 0.3 s, documents by tag or
    # digest not at all, and the groups document's answer is then held: it is asked for
    # before the TOC is in and answered after it.
    def slow_document() -> None:
        fault_proxy.reset()
        fault_proxy.match = oci.sha256_digest(data)
        fault_proxy.delay, fault_proxy.delay_match = 0.3, "/blobs/"
        fault_proxy.hold_next(1, at=1)

    slow_document()
    try:
        known, took = _open(fault_proxy, img, tmp_path / "c0")
    finally:
        fault_proxy.unhold()
    assert fault_proxy.holding.is_set()  # it was asked for
    assert not known and took < 0.7  # ASKED_WAIT_MIN at most: the manifest came at once
    monkeypatch.setattr(stored, "ASKED_WAIT_MIN", 2.0)  # the bound out of the way
    monkeypatch.setattr(stored, "ASKED_WAIT_MAX", 2.0)
    slow_document()
    threading.Timer(1.0, fault_proxy.unhold).start()
    known, took = _open(fault_proxy, img, tmp_path / "c1")
    assert known and 0.9 < took < 1.8
    # Nothing stored: nothing asked for, nothing waited for.
    bare = _push(registry, tmp_path / "bare", "stored/settle-none")
    fault_proxy.reset()
    fault_proxy.match = "/v2/"
    known, took = _open(fault_proxy, bare, tmp_path / "c2")
    assert not known and took < 1.5


def test_the_deltas_listing_travels_with_the_toc(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A mount prefetching from a groups file: the image's referrers (where deltas would be)
    are listed beside the TOC's fetch, not after the TOC is decoded, where the prefetch
    waited a round trip for them (on the WAN harness: 47-112 ms)."""
    img = _push(registry, tmp_path, "stored/deltas-early")
    groups = tmp_path / "groups.json"
    groups.write_bytes(
        startup_groups(img["repo"], img["manifest"], img["layer"].digest, FILES, USED)
    )
    fault_proxy.match = "/v2/"
    fault_proxy.delay = 0.2  # every request in flight long enough to see what overlaps
    ref = f"{fault_proxy.host}/{img['repo']}:v1"
    args = ("--plain-http", "--read-only", "--prefetch", str(groups))
    with mounted(ref, tmp_path / "mnt", *args, "--cache", str(tmp_path / "c")) as m:
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert pf["group"] and not pf["error"]
        for name in USED:
            assert (m.mountpoint / name).read_bytes() == FILES[name]
    paths, ranges, events = fault_proxy.paths, fault_proxy.ranges, fault_proxy.events
    ins = [i for i, ev in enumerate(events) if ev[0] == "in"]
    toc = next(n for n, r in enumerate(ranges) if r is not None)
    toc_out = next(i for i, ev in enumerate(events) if ev[0] == "out" and ev[1] == paths[toc])
    listings = [n for n, p in enumerate(paths) if "/manifests/sha256-" in p]
    # One listing (the deltas lookup took it), asked for before the TOC's answer came back.
    assert len(listings) == 1 and ins[listings[0]] < toc_out
    # The referrers API (docker-registry has none: 404) asked beside the tag, not before it.
    (api,) = [n for n, p in enumerate(paths) if "/referrers/" in p]
    tag_out = next(
        i for i, ev in enumerate(events) if ev[0] == "out" and ev[1] == paths[listings[0]]
    )
    api_out = next(i for i, ev in enumerate(events) if ev[0] == "out" and ev[1] == paths[api])
    assert ins[api] < tag_out and ins[listings[0]] < api_out
    # Without deltas nobody needs the listing: none is asked for.
    fault_proxy.reset()
    fault_proxy.match = "/v2/"
    no_deltas = (*args, "--no-deltas", "--cache", str(tmp_path / "c2"))
    with mounted(ref, tmp_path / "mnt", *no_deltas) as m:
        assert wait_prefetched(m.mountpoint)["prefetch"]["group"]
    assert not any("/manifests/sha256-" in p for p in fault_proxy.paths)


def test_settle_lets_a_woken_lookup_ask_first(tmp_path: Path) -> None:
    """The listing came in while the TOC decoded: the lookup's task is woken but has not run
    when the opener settles.  Given its turns it asks for the document, which is then waited
    for (the prefetch leaves before the tree), instead of found only after readiness."""

    async def main() -> None:
        groups = stored.StoredGroups(MemSource({}), tmp_path, None)
        listed = trio.Event()
        group = Group(name="startup", runs=1, tiers=[])

        async def lookup() -> None:
            await listed.wait()
            await trio.lowlevel.checkpoint()  # the listing's own step (shared_referrers)
            groups.asked.set()
            await trio.sleep(0.01)  # the document's request
            groups.group = group
            groups.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            await trio.testing.wait_all_tasks_blocked()
            listed.set()  # woken, not yet run
            await groups.settle()
            assert groups.group is group

    trio.run(main)


def _listing(registry: RegistryInstance, img: dict) -> dict:
    """The tag schema's index of ``img``'s referrers, as stored."""

    async def go() -> bytes:
        src = RegistrySource(registry.host, img["repo"], plain_http=True)
        try:
            return (await src.get_manifest(referrers_tag(img["manifest"])))[0]
        finally:
            await src.aclose()

    listing: dict = json.loads(trio.run(go))
    return listing


def _put(
    registry: RegistryInstance, img: dict, ref: str, data: bytes, mt: str = oci.MT_OCI_INDEX
) -> None:
    async def go() -> None:
        src = RegistrySource(registry.host, img["repo"], plain_http=True)
        try:
            await push_manifest(src, ref, data, mt)
        finally:
            await src.aclose()

    trio.run(go)


def _lookup_requests(proxy: FaultProxy, img: dict) -> list[str]:
    """The requests a cold mount sent for anything but the image itself (its manifest by
    tag, config, layer) and the registry's ping."""
    mine = ("/manifests/v1", img["config"], img["layer"].digest)
    return [p for p in proxy.paths if p.rstrip("/") != "/v2" and not any(x in p for x in mine)]


def test_embedded_groups_come_with_the_listing(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The listing embeds the artifact manifest, which embeds the document: the lookup sends
    nothing after the listing (two requests: the referrers API and its tag fallback, at
    once).  (Its byte ranges then leave while the TOC travels: test_group_ranges.)"""
    img = _push(registry, tmp_path, "stored/embedded")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z")
    (entry,) = _listing(registry, img)["manifests"]
    assert entry["data"]  # the push embedded the artifact manifest
    fault_proxy.match = "/v2/"
    fault_proxy.delay, fault_proxy.delay_match = 0.6, img["layer"].digest  # a long TOC
    args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(tmp_path / "c"))
    with mounted(f"{fault_proxy.host}/{img['repo']}:v1", tmp_path / "mnt", *args) as m:
        pf = wait_prefetched(m.mountpoint)["prefetch"]
        assert pf["group"] == "startup" and not pf["error"]
        for name in USED:
            assert (m.mountpoint / name).read_bytes() == FILES[name]
    lookup = _lookup_requests(fault_proxy, img)
    assert sorted(p.split("/")[-2] for p in lookup) == ["manifests", "referrers"], lookup
    assert "/manifests/sha256-" in " ".join(lookup)


def _tampered(registry: RegistryInstance, img: dict, how: str) -> None:
    """Rewrite the listing's entry: ``manifest``: the embedded artifact manifest names
    another document (the entry's digest unchanged: the bytes do not match it);
    ``document``: a manifest of its own (the entry names it, digest and size right) whose
    embedded document is another than the one its layer's digest names."""
    listing = _listing(registry, img)
    (entry,) = listing["manifests"]
    manifest = json.loads(base64.b64decode(entry["data"]))
    evil = _doc(img, "evil")
    layer = manifest["layers"][0]
    if how == "manifest":
        layer.update(digest=oci.sha256_digest(evil), size=len(evil), data=oci.embed(evil))
        entry["data"] = oci.embed(json.dumps(manifest).encode())
    else:
        layer["data"] = oci.embed(evil[: layer["size"]].ljust(layer["size"]))
        raw = json.dumps(manifest).encode()
        entry.update(digest=oci.sha256_digest(raw), size=len(raw), data=oci.embed(raw))
        _put(registry, img, entry["digest"], raw, oci.MT_OCI_MANIFEST)  # the index names it
    _put(registry, img, referrers_tag(img["manifest"]), json.dumps(listing).encode())


def test_tampered_embedded_content_is_refused(
    registry: RegistryInstance, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Embedded bytes that are not what their descriptor names are refused, with a line in
    the log, and fetched instead: the mount prefetches the stored group, not the other."""
    for how, fetched in (("manifest", "/manifests/sha256:"), ("document", "/blobs/sha256:")):
        img = _push(registry, tmp_path / how, f"stored/tampered-{how}")
        _store(registry, img, "startup", "2026-11-30T10:00:00Z")
        _tampered(registry, img, how)
        fault_proxy.reset()
        fault_proxy.match = "/v2/"
        cache, log = tmp_path / how / "c", tmp_path / how / "log"
        args = ("--plain-http", "--read-only", "--no-deltas", "--cache", str(cache))
        with mounted(
            f"{fault_proxy.host}/{img['repo']}:v1", tmp_path / "mnt", *args, "--log", str(log)
        ) as m:
            pf = wait_prefetched(m.mountpoint)["prefetch"]
            assert pf["group"] == "startup" and not pf["error"], how
            for name in USED:
                assert (m.mountpoint / name).read_bytes() == FILES[name]
        assert any(fetched in p for p in _lookup_requests(fault_proxy, img)), how
        refused = [line for line in log.read_text().splitlines() if "refused" in line]
        assert len(refused) == 1, (how, refused)
        assert _kept_name(cache) == "startup"


def test_a_groups_push_embeds_what_an_old_push_did_not(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    """The same document pushed again where an older lazyfs stored it without embedding:
    the listing's entry is replaced by an embedded one (a re-push of an embedded one is a
    no-op, as before)."""
    img = _push(registry, tmp_path, "stored/re-push")
    _store(registry, img, "startup", "2026-11-30T10:00:00Z", embed=False)
    (old,) = _listing(registry, img)["manifests"]
    assert "data" not in old
    _store(registry, img, "startup", "2026-11-30T11:00:00Z")
    (new,) = _listing(registry, img)["manifests"]
    assert new["data"] and new["digest"] != old["digest"]
    _store(registry, img, "startup", "2026-11-30T12:00:00Z")
    assert _listing(registry, img)["manifests"] == [new]


def test_embedded_content_is_checked() -> None:
    data = b'{"a": 1}'
    good = oci.Descriptor(
        mediaType="x/y", digest=oci.sha256_digest(data), size=len(data), data=oci.embed(data)
    )
    assert oci.embedded(good, 100) == data
    assert oci.embedded(msgspec.structs.replace(good, data=None), 100) is None
    for bad, error in (
        (msgspec.structs.replace(good, data=oci.embed(b'{"a": 2}')), IntegrityError),
        (msgspec.structs.replace(good, size=len(data) + 1), FormatError),
        (msgspec.structs.replace(good, data=oci.embed(data)[:-4]), FormatError),
        (msgspec.structs.replace(good, data="!" * len(oci.embed(data))), FormatError),
        (msgspec.structs.replace(good, data="\u00e9" * 3), FormatError),
    ):
        with pytest.raises(error):
            oci.embedded(bad, 100)
    with pytest.raises(FormatError):
        oci.embedded(good, len(data) - 1)  # more than the reader takes


def test_a_document_whose_manifest_is_too_big_to_embed_is_pushed_once(
    registry: RegistryInstance, tmp_path: Path
) -> None:
    """A document that its artifact manifest embeds (at most MAX_EMBEDDED) but whose manifest,
    base64 and all, is then too big for the listing to embed: the same document pushed again
    is a no-op (an entry that could not embed is not an old push's), not a new artifact that
    replaces the last at every push."""
    img = _push(registry, tmp_path, "stored/big-doc")
    data = json.dumps({"pad": "x" * (MAX_EMBEDDED - 1000)}).encode()
    assert len(data) <= MAX_EMBEDDED < len(oci.embed(data))

    def push(created: str) -> str:
        async def go() -> str:
            src = RegistrySource(registry.host, img["repo"], plain_http=True)
            try:
                subject = await subject_descriptor(src, img["manifest"])
                return await referrers.push_artifact(
                    src, subject, data, "application/x-test", created=created
                )
            finally:
                await src.aclose()

        return trio.run(go)

    first = push("2026-11-30T10:00:00Z")
    (entry,) = _listing(registry, img)["manifests"]
    assert entry["digest"] == first and "data" not in entry
    assert push("2026-11-30T11:00:00Z") == first
    assert _listing(registry, img)["manifests"] == [entry]
