"""The round trips of one contender's run, from the relay's event log (relay.py ``--log``).

Every request the client sent through the relay in a time window, with its connection (new
or reused: a new one costs the relay's handshake RTT), when it left, when its answer's first
and last bytes reached the client, and how many bytes; and the requests that waited for an
earlier answer (sent after some answer had completed and before any later one started):
the serial chain a cold start pays in round trips.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Request:
    conn: int
    new_conn: bool  # the connection's first request
    method: str
    path: str
    range: str
    sent: float  # s after the window's start
    first: float | None = None  # answer's first byte at the client
    last: float | None = None
    nbytes: int = 0


def requests_between(events: Path, t0: float, t1: float) -> list[Request]:
    """The requests sent in [t0, t1] (monotonic seconds), with their answers' chunks."""
    reqs: list[Request] = []
    current: dict[int, Request] = {}  # connection -> its request being answered
    opened: set[int] = set()
    with open(events) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:  # a line cut by the relay's stop
                continue
            t = ev["t"]
            if t < t0 or t > t1:
                continue
            conn = ev["conn"]
            if ev["ev"] == "open":
                opened.add(conn)
            elif ev["ev"] == "req":
                path = ev["path"].rsplit("/", 1)
                short = path[-1][:19] if len(path[-1]) > 19 else path[-1]
                kind = path[0].rsplit("/", 1)[-1]  # manifests, blobs, referrers
                r = Request(
                    conn,
                    conn in opened,
                    ev["method"],
                    f"{kind}/{short}",
                    ev.get("range", ""),
                    t - t0,
                )
                opened.discard(conn)
                current[conn] = r
                reqs.append(r)
            elif ev["ev"] == "data" and conn in current:
                r = current[conn]
                r.first = t - t0 if r.first is None else r.first
                r.last = t - t0
                r.nbytes += ev["n"]
    return reqs


def serial_depth(reqs: list[Request]) -> list[int]:
    """For each request, how many answers it waited for in series: 1 + the deepest request
    whose answer was complete before it was sent (0 waited for nothing)."""
    depth: list[int] = []
    for i, r in enumerate(reqs):
        ends = [(j, q.last) for j, q in enumerate(reqs[:i]) if q.last is not None]
        before = [depth[j] for j, last in ends if last < r.sent]
        depth.append(1 + max(before) if before else 0)
    return depth


def table(reqs: list[Request]) -> str:
    """A Markdown table of ``reqs`` (times in ms after the window's start)."""
    depth = serial_depth(reqs)
    out = [
        "| # | conn | sent ms | first byte ms | last byte ms | method | what | range | bytes | "
        "waited for |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (r, d) in enumerate(zip(reqs, depth, strict=True)):
        first = f"{r.first * 1000:.0f}" if r.first is not None else "-"
        last = f"{r.last * 1000:.0f}" if r.last is not None else "-"
        conn = f"{r.conn} (new)" if r.new_conn else str(r.conn)
        ranges = r.range.removeprefix("bytes=")
        ranges = ranges if len(ranges) <= 30 else f"{ranges.count(',') + 1} ranges"
        out.append(
            f"| {i + 1} | {conn} | {r.sent * 1000:.0f} | {first} | {last} | {r.method} | "
            f"{r.path} | {ranges} | {r.nbytes} | {d} |"
        )
    return "\n".join(out)


def landmarks(reqs: list[Request]) -> dict[str, float]:
    """A run's moments (s): the manifest's request, the data phase's first request (the
    first ranged request after the first one, the TOC's) and its serial depth, the last
    byte of any answer; and the connections the run opened."""
    out: dict[str, float] = {"requests": len(reqs), "connections": sum(r.new_conn for r in reqs)}
    if reqs:
        out["manifest_sent"] = reqs[0].sent
        out["last_byte"] = max((r.last for r in reqs if r.last is not None), default=0.0)
    ranged = [i for i, r in enumerate(reqs) if r.range]
    if len(ranged) > 1:
        depth = serial_depth(reqs)
        out["data_sent"] = reqs[ranged[1]].sent
        out["data_depth"] = depth[ranged[1]]
    return out


def medians(runs: dict[str, list[dict[str, float]]]) -> str:
    """A Markdown table of each label's median landmarks (ms), with the runs' range."""
    cols = [
        ("manifest_sent", "manifest sent ms", 1000),
        ("data_sent", "data phase's first request ms", 1000),
        ("data_depth", "answers it waited for in series", 1),
        ("last_byte", "last byte ms", 1000),
        ("requests", "requests", 1),
        ("connections", "connections opened", 1),
    ]
    out = ["| contender | runs | " + " | ".join(c[1] for c in cols) + " |"]
    out.append("|---|---|" + "---|" * len(cols))
    for label, lms in runs.items():
        cells = []
        for key, _, scale in cols:
            vals = sorted(lm[key] * scale for lm in lms if key in lm)
            if not vals:
                cells.append("-")
                continue
            spread = f"{vals[0]:.0f}–{vals[-1]:.0f}"  # noqa: RUF001 (Markdown)
            cells.append(f"{statistics.median(vals):.0f} ({spread})")
        out.append(f"| {label} | {len(lms)} | " + " | ".join(cells) + " |")
    return "\n".join(out)
