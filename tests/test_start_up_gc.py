"""A mount keeps the collector's full passes off its start (fs/serve.py)."""

from __future__ import annotations

import gc

import trio

from lazyfs.fs.serve import _full_collections_after, _no_full_collections


def test_full_collections_are_held_then_restored() -> None:
    before = gc.get_threshold()
    try:
        held = _no_full_collections()
        assert held == before
        now = gc.get_threshold()
        assert now[:2] == before[:2]  # young generations are still collected
        assert now[2] >= 1 << 30
        trio.run(_full_collections_after, 0.01, held)
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
