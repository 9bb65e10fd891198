"""Where a mount decodes its TOCs: a small one on the event loop's thread, in steps (a worker
thread and the loop handed the GIL to and fro while the loop read the group's early ranges:
ready later), a large one, or one while a worker decodes another layer, in a worker."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from lazyfs.formats.layer import decode_layer_table, decode_layer_table_steps, decode_layer_toc
from lazyfs.formats.toc import TocBudget, run_steps
from lazyfs.remote.local import OCILayoutSource
from lazyfs.remote.resolve import resolve_image
from lazyfs.store import tocs
from lazyfs.store.tocs import LayerInfo, Unsaved, load_layer
from lazyfs.testing.layers import make_lazy_layout, make_tar, sample_items


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lazy_layout(tmp_path_factory.mktemp("tocloop") / "lazy", [make_tar(sample_items())])


def _raw(layout: Path, info: LayerInfo) -> bytes:
    blob = layout / "blobs/sha256" / info.descriptor.digest.split(":")[1]
    return blob.read_bytes()[info.location.start : info.location.end]


#: What decodes a TOC (the source's reads go to workers too: not counted).
DECODERS = {"_decode_sync", "_unpack_cached", "_decode"}


def _workers(monkeypatch: pytest.MonkeyPatch, *, allowed: bool) -> list[Callable[..., Any]]:
    """The TOC decodes sent to a worker thread from now on (refused unless ``allowed``)."""
    sent: list[Callable[..., Any]] = []
    real = trio.to_thread.run_sync

    async def run_sync(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if getattr(fn, "__name__", "") in DECODERS:
            sent.append(fn)
            if not allowed:
                raise AssertionError(f"{fn.__name__} went to a worker thread")
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    return sent


def _pins(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often glibc's thresholds are held at their start values from now on."""
    pins: list[int] = []

    def pin() -> bool:
        pins.append(1)
        return True

    monkeypatch.setattr(tocs, "start_up_thresholds", pin)
    return pins


def _load(
    layout: Path,
    toc_dir: Path | None,
    budget: TocBudget,
    unsaved: list[Unsaved] | None = None,
    during: Callable[[], Any] | None = None,
    ticks: list[int] | None = None,
) -> LayerInfo:
    """The layer loaded as a mount loads it (tables); ``ticks[0]`` counts the turns another
    task took meanwhile."""
    ticks = [0] if ticks is None else ticks

    async def main() -> LayerInfo:
        src = OCILayoutSource(str(layout))
        desc = (await resolve_image(src, "v1")).layers[0]
        done = False

        async def ticker() -> None:
            while not done:
                ticks[0] += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            if during is not None:
                nursery.start_soon(during)
            info = await load_layer(src, desc, toc_dir, budget=budget, unsaved=unsaved, tables=True)
            done = True
        return info

    return trio.run(main)


def test_a_small_fetched_toc_decodes_on_the_loop_in_steps(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _workers(monkeypatch, allowed=False)
    pins = _pins(monkeypatch)
    ticks = [0]
    seen: list[int] = []  # the other task's turns so far, as each step starts
    real = decode_layer_table_steps

    def steps(*args: Any) -> Any:
        inner = real(*args)
        while True:
            seen.append(ticks[0])
            try:
                next(inner)
            except StopIteration as done:
                return done.value
            yield

    monkeypatch.setattr(tocs, "decode_layer_table_steps", steps)
    unsaved: list[Unsaved] = []
    info = _load(layout, layout.parent / "tocs", TocBudget(), unsaved, ticks=ticks)
    assert not sent and not pins  # the main arena: trimmed after the start-up
    assert len(seen) >= 4
    # Between two steps the loop turns many times: a lookup reading its listing and the
    # early ranges reading their bytes (a read a turn) get on while the TOC decodes.
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert all(g >= 15 for g in gaps), gaps  # 16 turns, give or take the batch order
    raw = _raw(layout, info)
    packed, table = decode_layer_table(info.location, raw)
    assert list(info.toc.entries) == list(table.entries)
    assert list(table.entries) == decode_layer_toc(info.location, raw).entries
    ((_, _, kept),) = unsaved
    assert kept == packed  # what the TOC cache gets


def test_the_steps_are_the_whole_decode(layout: Path) -> None:
    info = _load(layout, None, TocBudget())
    raw = _raw(layout, info)
    steps = decode_layer_table_steps(info.location, raw, TocBudget())
    whole = decode_layer_table(info.location, raw)
    assert run_steps(steps)[0] == whole[0]
    pauses = 0
    again = decode_layer_table_steps(info.location, raw, TocBudget())
    while True:
        try:
            next(again)
        except StopIteration as done:
            assert done.value[0] == whole[0]
            break
        pauses += 1
    assert pauses >= 3  # inflated, JSON decoded, columns made: the loop runs between


def test_a_large_toc_decodes_in_a_worker(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tocs, "DECODE_ON_LOOP_BYTES", 100)
    sent = _workers(monkeypatch, allowed=True)
    pins = _pins(monkeypatch)
    info = _load(layout, None, TocBudget())
    assert [fn.__name__ for fn in sent] == ["_decode_sync"]
    assert pins == [1]  # glibc's thresholds held low: the worker's arena gives back
    assert list(info.toc.entries) == decode_layer_toc(info.location, _raw(layout, info)).entries


def test_the_loop_does_not_wait_for_a_worker_decoding_another_layer(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another layer's decode in a worker holds the image's decoding lock: this one goes to a
    worker too (which waits for it), never blocking the loop on the lock."""
    sent = _workers(monkeypatch, allowed=True)
    budget = TocBudget()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.decoding:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)

    async def let_go() -> None:
        await trio.sleep(0.05)  # the loop is free meanwhile: this task runs
        release.set()

    try:
        info = _load(layout, None, budget, during=let_go)
    finally:
        release.set()
        holder.join()
    assert [fn.__name__ for fn in sent] == ["_decode_sync"]
    assert list(info.toc.entries) == decode_layer_toc(info.location, _raw(layout, info)).entries


def test_a_cached_toc_loads_on_the_loop(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched = _load(layout, tmp_path, TocBudget())  # written at once (no unsaved list)
    (cached,) = tmp_path.iterdir()
    assert msgspec.msgpack.decode(cached.read_bytes(), type=tocs._CachedTOC).packed
    sent = _workers(monkeypatch, allowed=False)
    again = _load(layout, tmp_path, TocBudget())
    assert [fn.__name__ for fn in sent] == []
    assert list(again.toc.entries) == list(fetched.toc.entries)
