"""Results: one JSON per run under .bench/results/, a Markdown section appended to
BENCHMARKS.md, and PNG charts (time and bytes per contender) beside the JSON."""

# ruff: noqa: RUF001, RUF003  (× and – in Markdown output are intended)
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, MiB, append_markdown, log, md_table

RESULTS_DIR = BENCH_DIR / "results"


def write_json(result: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}-{result['profile']['name']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def _fmt(s: dict[str, Any], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return (
        f"{fmt.format(s['median'] * scale)} "
        f"({fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)})"
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def scenario_table(sc: dict[str, Any]) -> str:
    rows = sc["rows"]
    base = rows.get(sc["baseline"], {})
    metrics = [
        m for m in ("seconds", "MB_s", "mount_seconds") if any(m in r for r in rows.values())
    ]
    header = ["contender"]
    for m in metrics:
        header += [m.replace("_", " "), *(["× baseline"] if m == "seconds" else [])]
    has_bytes = any("veth_bytes" in r for r in rows.values())
    if has_bytes:
        header += ["MiB over the link", "× baseline"]
    rss_key = next(
        (
            k
            for k in ("rss_peak_after_walk_kib", "rss_peak_kib")
            if any(k in r for r in rows.values())
        ),
        None,
    )
    has_conns = any("connections" in r for r in rows.values())
    if has_conns:
        header.append("connections")
    if "rss_mounted_kib" in next(iter(rows.values())):
        header.append("RSS mounted MiB")
    if rss_key:
        header.append("peak RSS MiB")
    body = []
    for name, r in rows.items():
        line = [f"**{name}**" if name == sc["baseline"] else name]
        for m in metrics:
            if m not in r:
                line += ["–", *(["–"] if m == "seconds" else [])]
                continue
            line.append(_fmt(r[m], fmt="{:.1f}" if m == "MB_s" else "{:.3f}"))
            if m == "seconds":
                line.append(_ratio(r[m]["median"], base.get(m, {}).get("median", 0)))
        if has_bytes:
            vb = r.get("veth_bytes")
            line.append(_fmt(vb, 1 / MiB, "{:.1f}") if vb else "0")
            bb = base.get("veth_bytes", {}).get("median", 0)
            line.append(_ratio(vb["median"], bb) if vb and bb else "–")
        if has_conns:
            line.append(f"{r['connections']['median']:.0f}" if "connections" in r else "–")
        if "rss_mounted_kib" in next(iter(rows.values())):
            line.append(f"{r['rss_mounted_kib']['median'] / 1024:.0f}")
        if rss_key:
            line.append(f"{r[rss_key]['median'] / 1024:.0f}" if rss_key in r else "–")
        body.append(line)
    return md_table(header, body)


def markdown(result: dict[str, Any]) -> str:
    p, link = result["profile"], result["link"]
    parts = [
        f"Profile **{p['name']}**: tbf {p['rate_mbit']:g} Mbit/s on both veth ends, relay RTT "
        f"{p['rtt_ms']:g} ms.  Measured before the run: RTT {link['rtt_ms']:.2f} ms (kept-alive "
        f"GET; {link['direct_rtt_ms']:.2f} ms straight to the registry without the relay; new "
        f"connection + GET {link['new_connection_get_ms']:.1f} ms), curl of a "
        f"{link['curl_blob_bytes'] / MiB:.0f} MiB blob {link['curl_mbit_s']:.0f} Mbit/s.  "
        f"{result['reps']} repetitions per contender, alternating; load average at start "
        f"{result['loadavg_at_start'][0]:.2f}.  Images: "
        + "; ".join(f"`{n}`: {m['source']}" for n, m in result["images"].items())
        + "."
    ]
    for sc in result["scenarios"]:
        parts.append(f"\n### {sc['scenario']} — {sc['image']}\n\n{sc['what']}\n")
        parts.append(scenario_table(sc))
    if result["notes"]:
        parts.append("\nNotes:\n" + "\n".join(f"- {n}" for n in result["notes"]))
    if result.get("charts"):
        parts.append("\nCharts: " + ", ".join(f"`{c}`" for c in result["charts"]))
    return "\n".join(parts) + "\n"


def append(result: dict[str, Any]) -> None:
    title = f"WAN harness: profile {result['profile']['name']}"
    append_markdown(title, result["machine"], result["command"], markdown(result))
    log("appended a section to BENCHMARKS.md")


def charts(result: dict[str, Any], out_dir: Path, stamp: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no charts (pip install -e '.[bench]')")
        return []
    made = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for sc in result["scenarios"]:
        rows = sc["rows"]
        names = list(rows)
        panels = [("seconds", "seconds (median, min–max)", 1.0)]
        if any("veth_bytes" in r for r in rows.values()):
            panels.append(("veth_bytes", "MiB over the link", 1 / MiB))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.5 * len(names) + 2))
        axes = axes if len(panels) > 1 else [axes]
        for ax, (key, label, scale) in zip(axes, panels, strict=True):
            med = [rows[n].get(key, {}).get("median", 0) * scale for n in names]
            lo = [
                m - rows[n].get(key, {}).get("min", 0) * scale
                for n, m in zip(names, med, strict=True)
            ]
            hi = [
                rows[n].get(key, {}).get("max", 0) * scale - m
                for n, m in zip(names, med, strict=True)
            ]
            ax.barh(names, med, xerr=[lo, hi], color="#4878a8", capsize=3)
            ax.invert_yaxis()
            ax.set_xlabel(label)
        fig.suptitle(f"{sc['scenario']} ({sc['image']}), profile {result['profile']['name']}")
        fig.tight_layout()
        path = out_dir / f"{stamp}-{result['profile']['name']}-{sc['scenario']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(os.path.relpath(path, BENCH_DIR.parent))
    return made
