"""The benchmark harness every performance claim comes from: lazyfs against full pulls,
native disk and fuse-overlayfs, over an emulated WAN.  Run it as ``scripts/bench.sh``::

    scripts/bench.sh [--quick] [--profile lan|wan|edge] [--reps N] [SCENARIO ...]
    scripts/bench.sh --cleanup        # undo whatever a killed run left behind

Scenarios: startup, read, walk, mount (default: all).  See scripts/benchwan/ for the parts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import byte_compiled, log, machine_info, sigterm_as_interrupt
from benchwan import images, netns, registry, report, scenarios
from benchwan.state import RUN_DIR, STATE_FILE, State, run_lock, teardown

SCENARIOS = ("startup", "read", "walk", "mount")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], metavar="SCENARIO",
                    help=f"any of {', '.join(SCENARIOS)} (default: all)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1 repetition, smaller mount sweep")
    ap.add_argument("--profile", choices=sorted(netns.PROFILES), default="wan")
    ap.add_argument("--reps", type=int, help="repetitions per contender (default 5, quick 1)")
    ap.add_argument("--startup-image", default="debian", choices=images.ALL_IMAGES)
    ap.add_argument("--debian-mirror", metavar="URL",
                    help="debootstrap from this mirror (default: the one in apt's sources)")
    ap.add_argument("--mount-images", help="comma-separated (default syn1k,syn10k,syn100k)")
    ap.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    ap.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--contenders", help="startup: run only the contenders whose name has one "
                    "of these comma-separated words (the baseline always runs)")
    ap.add_argument("--before", type=Path, metavar="DIR", help="startup: the prefetch "
                    "contenders again with the lazyfs of checkout DIR (byte-compile it first)")
    ap.add_argument("--slow-start", action="store_true", help="the relay models a sender's "
                    "slow start on the profile's RTT (its own TCP ends ramp at once)")
    ap.add_argument("--cleanup", action="store_true", help="tear down a previous run and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    images.MIRROR = args.debian_mirror
    sigterm_as_interrupt()
    byte_compiled()
    with run_lock():
        return locked_main(args, argv)


def locked_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.cleanup or STATE_FILE.exists():
        teardown()
        if args.cleanup:
            log("cleanup done")
            return 0
    chosen = args.scenarios or list(SCENARIOS)
    reps = args.reps or (1 if args.quick else 5)
    profile = netns.PROFILES[args.profile]
    mount_images = (
        args.mount_images.split(",")
        if args.mount_images
        else ["syn1k", "syn10k"]
        if args.quick
        else ["syn1k", "syn10k", "syn100k"]
    )
    needed: list[str] = []
    for sc, imgs in (("startup", [args.startup_image]), ("read", ["bigfile"]),
                     ("walk", ["syn10k"]), ("mount", mount_images)):  # fmt: skip
        if sc in chosen:
            needed += [i for i in imgs if i not in needed]

    state = State()
    t_start = time.monotonic()
    imgs = images.build_all(needed, state)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    services = registry.NsServices(state, RUN_DIR)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "scripts/bench.sh " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "profile": {
            "name": profile.name,
            "rate_mbit": profile.rate_mbit,
            "rtt_ms": profile.rtt_ms,
            "slow_start": args.slow_start,
            "tbf": profile.tbf_args(),
        },
        "reps": reps,
        "loadavg_at_start": os.getloadavg(),
        "images": {n: i.meta for n, i in imgs.items()},
        "scenarios": [],
    }
    try:
        netns.create(state)
        services.start_registry()
        for img in imgs.values():
            for fmt in ("gzip", "zstd", "estargz"):
                services.push(img.layout(fmt), f"bench/{img.name}", fmt)
        log(f"pushed {len(imgs)} images x 3 formats")
        netns.shape(profile)
        services.start_relay(profile.rtt_ms, args.slow_start)
        big = max(
            ((i, b) for i in imgs.values() for b in i.meta["blobs"]["gzip"]),
            key=lambda ib: ib[1]["size"],
        )
        blob_path = f"/v2/bench/{big[0].name}/blobs/{big[1]['digest']}"
        result["link"] = registry.measure_link(
            services.host, services.registry_host, blob_path, big[1]["size"]
        )
        link = result["link"]
        log(
            f"profile {profile.name}: RTT {link['rtt_ms']:.2f} ms (min {link['rtt_ms_min']:.2f}; "
            f"{link['direct_rtt_ms']:.2f} ms without the relay), "
            f"new connection + GET {link['new_connection_get_ms']:.1f} ms, "
            f"curl {link['curl_blob_bytes'] / 2**20:.1f} MiB at {link['curl_mbit_s']:.1f} Mbit/s"
        )
        ctx = scenarios.Ctx(
            services.host, imgs, reps, RUN_DIR, services.push,
            relay_events=services.relay_events,
            only=args.contenders.split(",") if args.contenders else [],
            before=args.before.resolve() if args.before else None,
        )  # fmt: skip
        for sc in chosen:
            log(f"scenario {sc}")
            if sc == "startup":
                out = scenarios.startup(ctx, args.startup_image)
            elif sc == "read":
                out = scenarios.read(ctx)
            elif sc == "walk":
                out = scenarios.walk(ctx)
            else:
                out = scenarios.mount(ctx, mount_images)
            result["scenarios"].append(out)
        result["notes"] = [
            *ctx.notes,
            "the relay delays data by RTT/2 each way and a new connection's first bytes by one "
            "more RTT (the handshake a real link would cost); skopeo's https attempt before "
            "falling back to http (--src-tls-verify=false) costs the baseline 1 or 2 RTTs",
            *(["--slow-start: the relay sends each answer as a sender's congestion window on "
               "the profile's RTT allows (10 segments, doubling a round trip, reset after an "
               "idle RTO); its own TCP ends would ramp at once"] if args.slow_start else []),
        ]
    finally:
        services.stop()
        teardown(state)
    result["seconds_total"] = time.monotonic() - t_start
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result["charts"] = report.charts(result, args.results_dir, stamp) if result["scenarios"] else []
    path = report.write_json(result, args.results_dir, stamp)
    log(f"results: {path}")
    if (RUN_DIR / "rtts.md").exists():
        log(f"each lazy run's requests: {RUN_DIR / 'rtts.md'}")
    print(report.markdown(result))
    if not args.no_markdown:
        report.append(result)
    log(f"done in {result['seconds_total']:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; torn down")
        sys.exit(130)
