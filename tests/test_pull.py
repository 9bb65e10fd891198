"""``lazyfs pull`` and ``lazyfs cache``: the progress renderer, pulls from a real registry,
cache usage and pruning, errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import msgspec
import pytest
import trio
from lazyfs_tools.convert import convert

from lazyfs import opener
from lazyfs.cli import pull as pull_cli
from lazyfs.progress import (
    DoneEvent,
    ProgressEvent,
    PulledEvent,
    Renderer,
    choose_mode,
    decode_events,
)
from lazyfs.remote.base import Source
from lazyfs.remote.local import OCILayoutSource
from lazyfs.store import ChunkCache, LayerStats, layer_chunks
from lazyfs.store.tocs import load_tocs
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import (
    Item,
    make_layout,
    make_lazy_layout,
    make_tar,
    sample_items,
    seeded_bytes,
)
from lazyfs.testing.mounts import lazyfs_cmd, run
from tests.support.fixtures import fault_proxy, registry  # noqa: F401

ANSI = re.compile(r"\x1b\[[0-9]*[A-Za-z]")
MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def stats(blob: str, ready: int, total: int, fetched: int = 0) -> LayerStats:
    return LayerStats(
        blob=blob,
        bytes_ready=ready,
        bytes_total=total,
        chunks_ready=ready // MiB,
        chunks_total=total // MiB,
        bytes_fetched=fetched,
    )


A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def screen_lines(text: str) -> list[str]:
    """What each written line shows once escape sequences and carriage returns are gone."""
    return [ANSI.sub("", line).lstrip("\r") for line in text.split("\n") if ANSI.sub("", line)]


# ------------------------------------------------------------------------------- renderer


def test_choose_mode() -> None:
    assert choose_mode("auto", io.StringIO(), 200) == "json"  # not a terminal
    assert choose_mode("auto", Tty(), 120) == "bar"
    assert choose_mode("auto", Tty(), 110) == "bar"
    assert choose_mode("auto", Tty(), 109) == "compact"
    assert choose_mode("auto", Tty(), 80) == "compact"
    for mode in ("bar", "compact", "json", "none"):
        assert choose_mode(mode, io.StringIO(), 80) == mode


def test_bar_at_120_columns() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "bar", width=120, clock=clock, live=True)
    r.start(stats(A, 0, 2 * MiB))
    clock.now += 2.0
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB))
    last = screen_lines(out.getvalue())[-1]
    assert last.startswith("aaaaaaaaaaaa [")
    assert "#" in last and "." in last  # half a bar
    assert "1.0MiB/2.0MiB" in last and " 50%" in last
    assert "512.0KiB/s" in last  # 1 MiB fetched in 2 s
    assert len(last) <= 119  # never the last column: no auto-wrap
    assert len(last) > 100  # the bar takes the room there is


def test_compact_at_80_columns() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, choose_mode("auto", Tty(), 80), width=80, clock=clock, live=True)
    r.start(stats(A, 0, 2 * MiB))
    clock.now += 1.0
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB))
    last = screen_lines(out.getvalue())[-1]
    assert last == "aaaaaaaaaaaa 1.0MiB/2.0MiB  50%"
    clock.now += 1.0
    r.finish(stats(A, 2 * MiB, 2 * MiB, fetched=2 * MiB))
    assert screen_lines(out.getvalue())[-1] == "aaaaaaaaaaaa 2.0MiB/2.0MiB 100% done"
    assert all(len(line) <= 79 for line in screen_lines(out.getvalue()))


def test_redraws_in_place() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "compact", width=80, clock=clock, live=True)
    r.start(stats(A, 0, 2 * MiB))
    clock.now += 1.0
    r.start(stats(B, 0, 4 * MiB))
    first = out.getvalue()
    # Second draw: back up over the one line drawn before, then both layers.
    assert first.count("\x1b[1A") == 1
    clock.now += 1.0
    mark = len(out.getvalue())
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB))
    redraw = out.getvalue()[mark:]
    assert redraw.startswith("\x1b[2A")
    assert screen_lines(redraw) == [
        "aaaaaaaaaaaa 1.0MiB/2.0MiB  50%",
        "bbbbbbbbbbbb 0B/4.0MiB   0%",
    ]
    # A completed layer's final line is written above the live block, which shrinks to one.
    clock.now += 1.0
    mark = len(out.getvalue())
    r.finish(stats(A, 2 * MiB, 2 * MiB, fetched=2 * MiB))
    redraw = out.getvalue()[mark:]
    assert redraw.startswith("\x1b[2A")
    assert screen_lines(redraw) == [
        "aaaaaaaaaaaa 2.0MiB/2.0MiB 100% done",
        "bbbbbbbbbbbb 0B/4.0MiB   0%",
    ]
    clock.now += 1.0
    mark = len(out.getvalue())
    r.update(stats(B, MiB, 4 * MiB, fetched=MiB))
    assert out.getvalue()[mark:].startswith("\x1b[1A")  # only B is live now


def test_redraws_are_rate_limited() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "bar", width=120, clock=clock, live=True)
    r.start(stats(A, 0, 100 * MiB))
    for i in range(1, 100):  # 99 callbacks in one second
        clock.now += 0.01
        r.update(stats(A, i * MiB, 100 * MiB, fetched=i * MiB))
    assert 9 <= r.redraws <= 11
    assert out.getvalue().count("\x1b[J") == r.redraws  # one clear per redraw, no more
    before = r.redraws
    clock.now += 0.01  # within the interval, but completion is always shown at once
    r.finish(stats(A, 100 * MiB, 100 * MiB, fetched=100 * MiB))
    assert r.redraws == before + 1
    last = screen_lines(out.getvalue())[-1]
    assert "100.0MiB/100.0MiB 100%" in last and "100.0MiB/s" in last and last.endswith("done")


def test_close_draws_a_pending_update() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "compact", width=80, clock=clock, live=True)
    r.start(stats(A, 0, 2 * MiB))
    clock.now += 0.01
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB))  # rate-limited: not shown yet
    assert "50%" not in out.getvalue()
    r.close()
    assert screen_lines(out.getvalue())[-1] == "aaaaaaaaaaaa 1.0MiB/2.0MiB  50%"


def test_not_live_prints_final_lines_only() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "bar", width=120, clock=clock, live=False)
    r.start(stats(A, 0, 2 * MiB))
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB))
    assert out.getvalue() == ""
    r.finish(stats(A, 2 * MiB, 2 * MiB, fetched=2 * MiB))
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.count("\n") == 1 and "100%" in text and text.rstrip().endswith("done")


def test_json_events() -> None:
    out, clock = io.StringIO(), FakeClock()
    r = Renderer(out, "json", width=80, clock=clock, live=True)
    r.start(stats(A, 0, 2 * MiB))
    r.start(stats(B, 4 * MiB, 4 * MiB))
    clock.now += 0.5
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB + 10))
    r.update(stats(A, MiB, 2 * MiB, fetched=MiB + 10))  # nothing new: no event
    r.finish(stats(B, 4 * MiB, 4 * MiB))
    clock.now += 0.5
    r.finish(stats(A, 2 * MiB, 2 * MiB, fetched=2 * MiB + 20))
    r.summary(
        PulledEvent(
            image="x",
            manifest="sha256:m",
            layers=2,
            bytes_total=6 * MiB,
            bytes_fetched=1,
            seconds=1,
        )
    )
    assert "\x1b" not in out.getvalue()
    raw = [json.loads(line) for line in out.getvalue().splitlines()]
    assert raw[0] == {
        "event": "progress",
        "layer": A,
        "done": 0,
        "total": 2 * MiB,
        "chunks_done": 0,
        "chunks_total": 2,
        "bytes_fetched": 0,
    }
    events = decode_events(out.getvalue())
    assert [type(e) for e in events] == [
        ProgressEvent,
        ProgressEvent,
        ProgressEvent,
        DoneEvent,
        DoneEvent,
        PulledEvent,
    ]
    assert events[2] == ProgressEvent(
        layer=A, done=MiB, total=2 * MiB, chunks_done=1, chunks_total=2, bytes_fetched=MiB + 10
    )
    assert events[3] == DoneEvent(
        layer=B,
        done=4 * MiB,
        total=4 * MiB,
        chunks_done=4,
        chunks_total=4,
        bytes_fetched=0,
        seconds=0.5,
    )
    assert isinstance(events[4], DoneEvent) and events[4].seconds == 1.0


def test_none_is_silent() -> None:
    out = io.StringIO()
    r = Renderer(out, "none", width=120, live=True)
    r.start(stats(A, 0, 2 * MiB))
    r.finish(stats(A, 2 * MiB, 2 * MiB))
    r.summary(
        PulledEvent(image="x", manifest="m", layers=1, bytes_total=1, bytes_fetched=1, seconds=0)
    )
    assert out.getvalue() == ""


# ------------------------------------------------------------------------------- pulls


def image_layers() -> list[bytes]:
    return [
        make_tar(sample_items(big=400_000)),
        make_tar([Item("opt", "dir", mode=0o755), Item("opt/blob", data=seeded_bytes(700_000, 7))]),
        make_tar([Item("srv", "dir", mode=0o755), Item("srv/one", data=seeded_bytes(90_000, 8))]),
    ]


@pytest.fixture(scope="module")
def lazy_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pull-image")
    return make_lazy_layout(d / "lazy", image_layers())


@pytest.fixture(scope="module")
def pushed(registry: RegistryInstance, lazy_layout: Path) -> str:  # noqa: F811
    ref = f"{registry.host}/pull/app:v1"
    push_oci_layout(lazy_layout, ref, tag="v1")
    return ref


def chunk_digests(layout: Path) -> dict[str, set[str]]:
    """Layer digest -> the digests of its (non-hole) chunks, from the image's own TOCs."""

    async def load() -> dict[str, set[str]]:
        src = OCILayoutSource(str(layout))
        try:
            img = await load_tocs(src, "v1")
        finally:
            await src.aclose()
        return {li.descriptor.digest: {c.digest for c in layer_chunks(li.toc)} for li in img.layers}

    return trio.run(load)


def lazyfs(*args: str) -> subprocess.CompletedProcess[str]:
    return run(*lazyfs_cmd(*args), timeout=60)


def by_layer(events: list[object]) -> dict[str, list[ProgressEvent | DoneEvent]]:
    out: dict[str, list[ProgressEvent | DoneEvent]] = {}
    for e in events:
        if isinstance(e, ProgressEvent | DoneEvent):
            out.setdefault(e.layer, []).append(e)
    return out


def test_pull_from_registry(pushed: str, lazy_layout: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    expected = chunk_digests(lazy_layout)
    assert len(expected) == 3

    res = lazyfs("pull", pushed, "--plain-http", "--cache", str(cache_dir), "--progress", "json")
    assert res.returncode == 0, res.stderr
    events = decode_events(res.stdout)
    layers = by_layer(events)
    assert set(layers) == set(expected)
    for digest, evs in layers.items():
        final = evs[-1]
        assert isinstance(final, DoneEvent), digest
        assert final.done == final.total > 0
        assert final.chunks_done == final.chunks_total == len(expected[digest])
        assert final.bytes_fetched > 0
        dones = [e.done for e in evs]
        assert dones == sorted(dones)  # progress never goes backwards
    summary = events[-1]
    assert isinstance(summary, PulledEvent)
    assert summary.layers == 3 and summary.manifest.startswith("sha256:")
    assert summary.bytes_fetched == sum(ev[-1].bytes_fetched for ev in layers.values())

    cache = ChunkCache(cache_dir)
    for digests in expected.values():
        for d in digests:
            assert cache.path_of(d).is_file(), d
    all_chunks = set().union(*expected.values())
    assert cache.du().chunks == len(all_chunks)

    # Everything is cached now: the second pull fetches nothing and still ends complete.
    again = lazyfs("pull", pushed, "--plain-http", "--cache", str(cache_dir), "--progress", "json")
    assert again.returncode == 0, again.stderr
    events = decode_events(again.stdout)
    assert all(e.bytes_fetched == 0 for e in events)
    for evs in by_layer(events).values():
        assert isinstance(evs[-1], DoneEvent) and evs[-1].done == evs[-1].total

    # du, then prune to a size, then prune everything.
    res = lazyfs("cache", "du", "--cache", str(cache_dir), "--json")
    assert res.returncode == 0, res.stderr
    du = msgspec.json.decode(res.stdout)
    total = sum(cache.path_of(d).stat().st_size for d in all_chunks)
    assert du["chunks"] == len(all_chunks) and du["bytes"] == total
    assert du["layer_maps"] == 3 and du["max_bytes"] == 10 * 1024**3

    res = lazyfs("cache", "du", "--cache", str(cache_dir))
    assert res.returncode == 0 and f"{len(all_chunks)} chunks" in res.stdout

    res = lazyfs("cache", "prune", "--cache", str(cache_dir), "--to", str(total // 2), "--json")
    assert res.returncode == 0, res.stderr
    half = msgspec.json.decode(res.stdout)
    assert 0 < half["bytes"] <= total // 2 and half["freed_bytes"] == total - half["bytes"]

    res = lazyfs("cache", "prune", "--cache", str(cache_dir), "--to", "0")
    assert res.returncode == 0, res.stderr
    assert "freed" in res.stdout and "0B remain" in res.stdout
    du = msgspec.json.decode(lazyfs("cache", "du", "--cache", str(cache_dir), "--json").stdout)
    assert du["chunks"] == 0 and du["bytes"] == 0
    assert not [p for p in (cache_dir / "chunks").rglob("*") if p.is_file()]

    # Pruned chunks come back with the next pull, which fetches again.
    res = lazyfs("pull", pushed, "--plain-http", "--cache", str(cache_dir), "--progress", "json")
    assert res.returncode == 0, res.stderr
    final = decode_events(res.stdout)[-1]
    assert isinstance(final, PulledEvent) and final.bytes_fetched > 0


def test_pull_human_output(pushed: str, tmp_path: Path) -> None:
    res = lazyfs(
        "pull", pushed, "--plain-http", "--cache", str(tmp_path / "c"), "--progress", "compact"
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "\x1b" not in res.stdout  # not a terminal: no redraws, final lines only
    assert len(lines) == 4 and all(line.endswith(" 100% done") for line in lines[:3])
    assert lines[3].startswith(f"pulled {pushed} (sha256:")
    quiet = lazyfs(
        "pull", pushed, "--plain-http", "--cache", str(tmp_path / "c"), "--progress", "none"
    )
    assert quiet.returncode == 0 and quiet.stdout == ""


class SlowSource(Source):
    """An OCI layout that takes a while per range request and records the overlap."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.active: dict[str, int] = {}
        self.max_layers = 0
        self.counting = False  # TOC loads overlap too: only the pull's fetches count

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        return await self.inner.get_manifest(ref)

    async def get_blob(self, digest: str) -> bytes:
        return await self.inner.get_blob(digest)

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        self.active[digest] = self.active.get(digest, 0) + 1
        if self.counting:
            self.max_layers = max(self.max_layers, sum(1 for n in self.active.values() if n))
        try:
            await trio.sleep(0.05)
            return await self.inner.read_range(digest, start, end)
        finally:
            self.active[digest] -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_layers_are_fetched_concurrently(
    lazy_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources: list[SlowSource] = []
    real = opener.open_source

    def slow_open(image: str, **kw: object) -> tuple[Source, str]:
        src, ref = real(image, **kw)  # type: ignore[arg-type]
        sources.append(SlowSource(src))
        return sources[-1], ref

    class Counting(Renderer):
        def start(self, stats: LayerStats) -> None:  # the fetch phase begins
            sources[0].counting = True
            super().start(stats)

    monkeypatch.setattr(opener, "open_source", slow_open)
    renderer = Counting(io.StringIO(), "json")
    event = trio.run(
        lambda: pull_cli.pull(f"oci:{lazy_layout}:v1", renderer, cache_dir=tmp_path / "c")
    )
    assert event.layers == 3 and event.bytes_fetched > 0
    assert sources[0].max_layers == 3  # all three layers had a request in flight at once


def test_errors_are_one_line(pushed: str, registry: RegistryInstance, tmp_path: Path) -> None:  # noqa: F811
    cache = str(tmp_path / "c")
    for ref in (f"{registry.host}/pull/app:missing", f"{registry.host}/no/such:v1", "Bad Ref!"):
        res = lazyfs("pull", ref, "--plain-http", "--cache", cache, "--progress", "json")
        assert res.returncode == 1, (ref, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazyfs: "), res.stderr
        assert "Traceback" not in res.stderr
    # A cache too small to hold the image would evict the pull's own chunks: refused.
    res = lazyfs("pull", pushed, "--plain-http", "--cache", cache, "--cache-size", "64k")
    assert res.returncode == 1 and "--cache-size" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _blob_paths(proxy: FaultProxy) -> list[str]:
    return [p for p in proxy.paths if "/blobs/" in p]


def test_pull_from_a_registry_ignoring_range(
    registry: RegistryInstance,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Every layer is registered with its blob size, so once Range is found ignored the
    blob is downloaded once into a local copy; without the size every request took the
    blob's prefix again."""
    make_layout(
        tmp_path / "src",
        [make_tar([Item("big.bin", data=seeded_bytes(5 * 1024 * 1024, 3))])],
        kind="gzip",
        tag="v1",
    )
    convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'lazy'}:v1")
    push_oci_layout(tmp_path / "lazy", f"{registry.host}/pull/big:v1", tag="v1")
    (layer,) = chunk_digests(tmp_path / "lazy")
    fault_proxy.ignore_range = True
    ref = f"{fault_proxy.host}/pull/big:v1"
    res = lazyfs("pull", ref, "--plain-http", "--cache", str(tmp_path / "c"), "--progress", "json")
    assert res.returncode == 0, res.stderr
    gets = [p for p in _blob_paths(fault_proxy) if p.endswith(layer)]
    # The footer and TOC at open (answered whole), then one whole copy for the chunks; the
    # pull without the size made a third request (the whole prefix up to its last chunk).
    assert len(gets) <= 2, gets


def test_warm_pull_asks_only_for_the_tag(
    pushed: str,
    registry: RegistryInstance,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = pushed.replace(registry.host, fault_proxy.host)
    cache = str(tmp_path / "c")
    res = lazyfs("pull", ref, "--plain-http", "--cache", cache, "--progress", "json")
    assert res.returncode == 0, res.stderr
    fault_proxy.reset()
    res = lazyfs("pull", ref, "--plain-http", "--cache", cache, "--progress", "json")
    assert res.returncode == 0, res.stderr
    # Manifest by digest, config and TOCs come from the cache; chunks are all there.
    assert _blob_paths(fault_proxy) == []
    assert [p for p in fault_proxy.paths if "/manifests/" in p] == [
        p for p in fault_proxy.paths if p.endswith("/manifests/v1")
    ]
