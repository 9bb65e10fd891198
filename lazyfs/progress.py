"""Per-layer progress for ``lazyfs pull``: bars or ``done/total`` lines on a terminal, JSON lines
otherwise.

The renderer is pure: it writes to the stream it is given, at the width it is given, and reads
time only from the clock it is given, so every mode is tested with a ``StringIO`` and a fake
clock.  It is fed :class:`~lazyfs.store.stats.LayerStats` snapshots by the store's progress
callback and never touches the store itself.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Literal, TextIO, TypedDict, cast

import msgspec

from lazyfs.store.stats import LayerStats

Mode = Literal["bar", "compact", "json", "none"]
MODES = ("auto", "bar", "compact", "json", "none")
#: Narrower terminals get ``compact`` lines: a useful bar needs the room.
BAR_MIN_WIDTH = 110
#: At most this many terminal redraws per second; a pull calls back once per request.
MAX_REDRAWS_PER_SECOND = 10.0

_UP = "\x1b[{}A"  # cursor up N lines
_CLEAR_EOL = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


# ------------------------------------------------------------------------------- JSON events


class ProgressEvent(msgspec.Struct, kw_only=True, tag_field="event", tag="progress"):
    layer: str
    done: int  # uncompressed bytes ready in the cache
    total: int
    chunks_done: int
    chunks_total: int
    bytes_fetched: int  # compressed bytes received by this pull


class DoneEvent(msgspec.Struct, kw_only=True, tag_field="event", tag="done"):
    layer: str
    done: int
    total: int
    chunks_done: int
    chunks_total: int
    bytes_fetched: int
    seconds: float


class PulledEvent(msgspec.Struct, kw_only=True, tag_field="event", tag="pulled"):
    image: str
    manifest: str
    layers: int
    bytes_total: int
    bytes_fetched: int
    seconds: float
    # Compressed bytes of chunks already cached (held from other images or layers), and of
    # binary patches fetched instead of chunks.
    bytes_held: int = 0
    patch_bytes: int = 0


Event = ProgressEvent | DoneEvent | PulledEvent


def decode_events(text: str | bytes) -> list[Event]:
    """Parse ``--progress=json`` output (for tests and scripts)."""
    dec = msgspec.json.Decoder(Event)
    raw = text.encode() if isinstance(text, str) else text
    return [dec.decode(line) for line in raw.splitlines() if line.strip()]


# ------------------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    """``512B``, ``1.5KiB``, ``3.0MiB``... (binary units, one decimal above bytes)."""
    if n < 1024:
        return f"{n:.0f}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f}{unit}"


def choose_mode(requested: str, stream: TextIO, width: int | None = None) -> Mode:
    """Resolve ``auto``: JSON lines unless ``stream`` is a terminal, then by its width."""
    if requested != "auto":
        return cast(Mode, requested)  # argparse checked it against MODES
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return "json"
    if width is None:
        width = shutil.get_terminal_size().columns
    return "bar" if width >= BAR_MIN_WIDTH else "compact"


class _Line:
    __slots__ = ("finished", "sent", "started", "stats")

    def __init__(self, stats: LayerStats, started: float) -> None:
        self.stats = stats
        self.started = started
        self.finished: float | None = None
        self.sent: tuple[int, int] | None = None  # last (done, fetched) emitted as JSON


class Renderer:
    """One line per layer, in the order the layers were started.

    ``live``: redraw the lines in place with ANSI cursor movement (a terminal).  Without it the
    human modes print only each layer's final line, so a forced ``--progress=bar`` into a
    file or pipe stays free of escape sequences.
    """

    def __init__(
        self,
        out: TextIO,
        mode: Mode,
        *,
        width: int = 80,
        clock: Callable[[], float] = time.monotonic,
        live: bool = False,
        max_rate: float = MAX_REDRAWS_PER_SECOND,
    ) -> None:
        self.out = out
        self.mode = mode
        # Never write into the last column: terminals that auto-wrap there would push the
        # block down a line and break the cursor-up arithmetic.
        self.width = max(width - 1, 20)
        self.clock = clock
        self.live = live and mode in ("bar", "compact")
        self.min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self.redraws = 0
        self._lines: dict[str, _Line] = {}
        self._finals: list[str] = []  # completed lines not yet written above the live block
        self._drawn = 0  # live lines on screen, just above the cursor
        self._last_draw: float | None = None
        self._dirty = False

    # ------------------------------------------------------------------------- feeding

    def start(self, stats: LayerStats) -> None:
        """Register a layer (before its fetch starts) and show its initial state."""
        if stats.blob in self._lines:
            return
        self._lines[stats.blob] = _Line(stats, self.clock())
        self._changed(stats)

    def update(self, stats: LayerStats) -> None:
        """The store's progress callback: called after every completed request."""
        line = self._lines.get(stats.blob)
        if line is None:
            self.start(stats)
            return
        line.stats = stats
        if line.finished is None:
            self._changed(stats)

    def finish(self, stats: LayerStats) -> None:
        """The layer is complete: emit its final line (or ``done`` event) now."""
        self.start(stats)
        line = self._lines[stats.blob]
        if line.finished is not None:
            return
        line.stats = stats
        line.finished = self.clock()
        if self.mode == "json":
            seconds = round(line.finished - line.started, 3)
            self._emit(DoneEvent(**_counts(stats), seconds=seconds))
        elif self.mode != "none":
            self._finals.append(self._format(line))
            self._draw()

    def summary(self, event: PulledEvent) -> None:
        """The whole image is pulled: flush the display, then one closing line or event."""
        self.close()
        if self.mode == "json":
            self._emit(event)
        elif self.mode != "none":
            self.out.write(
                f"pulled {event.image} ({event.manifest[:19]}): {event.layers} layers, "
                f"{human_bytes(event.bytes_total)}, fetched {human_bytes(event.bytes_fetched)} "
                f"in {event.seconds:.1f}s"
                + (f", {human_bytes(event.bytes_held)} already held" if event.bytes_held else "")
                + (f", {human_bytes(event.patch_bytes)} of patches" if event.patch_bytes else "")
                + "\n"
            )
            self.out.flush()

    def close(self) -> None:
        """Draw whatever a rate-limited update left pending (also after a failure, so the
        error message lands below an up-to-date display)."""
        if self.live and self._dirty:
            self._draw()

    # ------------------------------------------------------------------------- internals

    def _changed(self, stats: LayerStats) -> None:
        if self.mode == "json":
            line = self._lines[stats.blob]
            key = (stats.bytes_ready, stats.bytes_fetched)
            if key != line.sent:  # an unchanged state says nothing new
                line.sent = key
                self._emit(ProgressEvent(**_counts(stats)))
            return
        if not self.live:
            return
        self._dirty = True
        now = self.clock()
        if self._last_draw is None or now - self._last_draw >= self.min_interval:
            self._draw()

    def _emit(self, event: Event) -> None:
        self.out.write(msgspec.json.encode(event).decode() + "\n")
        self.out.flush()

    def _draw(self) -> None:
        if not self.live:
            # Not a terminal: completed lines only, one write each, never rewritten.
            for text in self._finals:
                self.out.write(text + "\n")
            self._finals.clear()
            self.out.flush()
            return
        parts: list[str] = []
        if self._drawn:
            parts.append(_UP.format(self._drawn))
        # Completed layers go above the live block and scroll away with the terminal.
        parts.extend(f"\r{text}{_CLEAR_EOL}\n" for text in self._finals)
        self._finals.clear()
        live = [ln for ln in self._lines.values() if ln.finished is None]
        parts.extend(f"\r{self._format(ln)}{_CLEAR_EOL}\n" for ln in live)
        parts.append(_CLEAR_BELOW)  # lines left over from a taller block
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(live)
        self._last_draw = self.clock()
        self._dirty = False
        self.redraws += 1

    def _format(self, line: _Line) -> str:
        s = line.stats
        name = s.blob.partition(":")[2][:12] or s.blob[:12]
        total = s.bytes_total
        pct = 100.0 * s.bytes_ready / total if total else 100.0
        end = line.finished if line.finished is not None else self.clock()
        elapsed = end - line.started
        rate = s.bytes_fetched / elapsed if elapsed > 0 else 0.0
        state = " done" if line.finished is not None else ""
        amount = f"{human_bytes(s.bytes_ready)}/{human_bytes(total)}"
        if self.mode == "compact":
            text = f"{name} {amount} {pct:3.0f}%{state}"
            return text[: self.width]
        tail = f" {amount:>19} {pct:3.0f}% {human_bytes(rate) + '/s':>11}{state:5}"
        room = self.width - len(name) - len(tail) - 3  # name, space, brackets
        if room < 10:  # too narrow for a bar after all: degrade to the compact text
            return f"{name} {amount} {pct:3.0f}%{state}"[: self.width]
        filled = int(room * min(pct, 100.0) / 100.0)
        bar = "#" * filled + "." * (room - filled)
        return f"{name} [{bar}]{tail}"


class _Counts(TypedDict):
    layer: str
    done: int
    total: int
    chunks_done: int
    chunks_total: int
    bytes_fetched: int


def _counts(stats: LayerStats) -> _Counts:
    """The fields progress and done events share."""
    return {
        "layer": stats.blob,
        "done": stats.bytes_ready,
        "total": stats.bytes_total,
        "chunks_done": stats.chunks_ready,
        "chunks_total": stats.chunks_total,
        "bytes_fetched": stats.bytes_fetched,
    }
