# ruff: noqa: RUF001, RUF003  (× and – in Markdown output are intended)
"""What an image update costs a node that holds the old image: a full pull of the changed
layers, zstd:chunked-style file dedup, lazyfs chunk dedup and lazyfs binary deltas.

Two updates, both real, built reproducibly by this script:

* **debian**: the WAN harness's Debian (``debootstrap --variant=minbase --include=python3
  bookworm`` from this machine's apt mirror: a point release) and the same tree after
  ``apt-get upgrade`` with bookworm-updates and bookworm-security added (the next state of
  that package set).  One layer, as a Debian base image is.  Start-up: the harness's
  ``python3 -c 'import json, email.parser, …'`` in a chroot.
* **app**: the upgraded Debian layer (unchanged) plus an application layer: this repository's
  Python source at two git revisions (``--app-old``, ``--app-new``).  Start-up: read every
  file the update changed.

Each is converted to zstd:chunked and pushed, with its gzip original, to docker-registry: on
loopback behind a byte-counting proxy (blob bytes), or behind the WAN harness's shaped link
and delaying relay (``--profile wan``, the default: every byte on the veth).  For each
contender, a fresh copy of a node that holds OLD (and NEW's TOCs, which every lazy contender
reads first) is timed from the first request until NEW's start-up has run: a full pull of the
changed gzip layers (``curl | tar -xz``), a zstd:chunked-style partial pull (files whose
digest OLD lacks, whole: the node's cache less those files' chunks, then ``lazyfs pull``),
``lazyfs pull`` with chunk dedup, the same with deltas, and both lazily (mount and start, no
pull).  Also measured: zstd patch-from at two levels against an rsync-style delta (``rdiff``,
librsync) over the same changed files.

    .venv/bin/python scripts/bench_delta.py [--profile wan|loopback|…] [--reps N] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    ROOT,
    append_markdown,
    byte_compiled,
    command_line,
    log,
    machine_info,
    md_table,
    write_json,
)

from lazyfs.fs.unmount import is_mounted
from lazyfs.testing.dockerregistry import push_oci_layout
from lazyfs.testing.layers import make_layout
from lazyfs.testing.mounts import mounted

MiB = 1 << 20


def lazyfs(*args: str, timeout: float = 1800) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if res.returncode != 0:
        raise RuntimeError(f"lazyfs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


# ------------------------------------------------------------------------------- images


def debian_roots() -> tuple[Path, Path, list[list[str]]]:
    """OLD: the WAN harness's Debian (debootstrap of bookworm, its point release, from this
    machine's apt mirror; cached).  NEW: the same tree after ``apt-get upgrade`` with
    bookworm-updates and bookworm-security added (cached beside it): the next state of the
    package set, as a rebuilt base image has.  Returns both and the upgraded packages
    ``[name, old version, new version]``."""
    from benchwan.images import IMAGES_DIR, _debian_rootfs, apt_mirror

    old = _debian_rootfs()
    if old is None:
        raise SystemExit("bench_delta needs debootstrap of bookworm from the apt mirror")
    new = IMAGES_DIR / "debian-upgraded-rootfs"
    meta = IMAGES_DIR / "debian-upgraded.json"
    if meta.exists() and new.is_dir():
        return old, new, json.loads(meta.read_text())["upgraded"]
    log("debian: apt-get upgrade of a copy with bookworm-updates and -security (once)")
    tmp = new.with_name(new.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-a", str(old), str(tmp)], check=True)
    sources, resolv = tmp / "etc/apt/sources.list", tmp / "etc/resolv.conf"
    kept = sources.read_bytes(), resolv.read_bytes()
    main, security = apt_mirror(), apt_mirror(security=True)
    sources.write_text(
        f"deb {main} bookworm main\ndeb {main} bookworm-updates main\n"
        f"deb {security} bookworm-security main\n"
    )
    shutil.copyfile("/etc/resolv.conf", resolv)  # the chroot resolves the mirror as we do
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "-y", "-qq", "-o", "Dpkg::Options::=--force-confold", "upgrade"],
        ["apt-get", "clean"],
    ):
        res = subprocess.run(["chroot", str(tmp), *argv], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} in the Debian copy: {res.stderr.strip()[-300:]}")
    sources.write_bytes(kept[0])
    resolv.write_bytes(kept[1])
    before, after = _versions(old), _versions(tmp)
    upgraded = [[n, before[n], v] for n, v in sorted(after.items()) if before.get(n) != v]
    tmp.replace(new)
    meta.write_text(json.dumps({"upgraded": upgraded}, indent=1))
    return old, new, upgraded


def _versions(root: Path) -> dict[str, str]:
    res = subprocess.run(
        ["dpkg-query", "--admindir", str(root / "var/lib/dpkg"), "-W", "-f",
         "${Package} ${Version}\n"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(line.split(" ", 1) for line in res.stdout.splitlines() if line)


def rootfs_tar(root: Path, work: Path) -> bytes:
    """The tree as the WAN harness tars it (sorted names, numeric owners, no /dev contents)."""
    from benchwan.images import _debian_tar

    tar = work / "rootfs.tar"
    _debian_tar(root, tar)
    data = tar.read_bytes()
    tar.unlink()
    return data


def app_tar(rev: str) -> bytes:
    """This repository's tracked files at ``rev`` under app/ (git archive: deterministic)."""
    res = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "--prefix=app/", rev],
        capture_output=True,
        check=True,
    )
    return res.stdout


def lazy_image(tars: list[bytes], work: Path, tag: str) -> tuple[Path, list[int]]:
    """A gzip image of ``tars`` (whose layer sizes a plain pull costs) converted to
    zstd:chunked; returns the lazy layout and the gzip layer sizes."""
    from lazyfs_tools.convert import convert

    src = work / f"{tag}-gzip"
    dst = work / f"{tag}-lazy"
    for d in (src, dst):
        shutil.rmtree(d, ignore_errors=True)
    make_layout(src, tars, kind="gzip", tag=tag)
    convert(f"oci:{src}:{tag}", f"oci:{dst}:{tag}")
    from lazyfs.ocilayout import Layout

    gz = [d.size for d in Layout(src).manifest(tag).layers]
    return dst, gz


# ------------------------------------------------------------------------------- measures


@dataclass
class Sample:
    seconds: float
    bytes: int


def pulled(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        doc = json.loads(line)
        if doc.get("event") == "pulled":
            return dict(doc)
    raise RuntimeError("no pulled event")


def file_dedup(old: str, new: str, cache: Path) -> tuple[int, set[str]]:
    """zstd:chunked-style partial pull: every NEW file whose digest OLD lacks is fetched
    whole.  Returns those bytes and the chunk digests of those files (which a node doing
    file dedup cannot take from its cache)."""
    import trio

    from lazyfs.opener import open_image

    async def run() -> tuple[int, set[str]]:
        async with (
            open_image(old, cache_dir=cache, plain_http=True) as o,
            open_image(new, cache_dir=cache, plain_http=True) as n,
        ):
            have = {e.digest for li in o.layers for e in li.toc.entries if e.digest}
            shared = {li.descriptor.digest for li in o.layers}
            seen: set[str] = set()
            chunks: set[str] = set()
            total = 0
            for li in n.layers:
                if li.descriptor.digest in shared:
                    continue
                for e in li.toc.entries:
                    if e.type != "reg" or not e.digest or e.digest in have or e.digest in seen:
                        continue
                    seen.add(e.digest)
                    total += sum(c.end - c.offset for c in e.chunks if not c.zeros)
                    chunks.update(c.digest for c in e.chunks if c.digest and not c.zeros)
            return total, chunks

    return trio.run(run)


def patch_methods(old: str, new: str, cache: Path, work: Path) -> dict[str, dict[str, float]]:
    """zstd patch-from (levels 3 and 19) against rdiff over the files lazyfs delta would
    patch (same pairs): total bytes and seconds to make them."""
    import trio

    from lazyfs.delta.patch import make_patch
    from lazyfs.delta.publish import _plan
    from lazyfs.opener import open_image

    async def pairs() -> list[tuple[bytes, bytes]]:
        async with (
            open_image(old, cache_dir=cache, plain_http=True) as o,
            open_image(new, cache_dir=cache, plain_http=True) as n,
        ):
            out = []
            for job in _plan(o, n):
                base = await o.store.read(job.base_layer, job.base, 0, job.base.size)
                data = await n.store.read(job.layer, job.entry, 0, job.entry.size)
                out.append((base, data))
            return out

    files = trio.run(pairs)
    result: dict[str, dict[str, float]] = {}
    import zstandard

    plain = zstandard.ZstdCompressor(level=19)
    result["zstd -19 (no base)"] = {"bytes": sum(len(plain.compress(n)) for _, n in files)}
    for level in (3, 19):
        t0 = time.monotonic()
        size = sum(len(make_patch(b, n, level)) for b, n in files)
        result[f"zstd patch-from -{level}"] = {"bytes": size, "seconds": time.monotonic() - t0}
    t0 = time.monotonic()
    raw = comp = 0
    for i, (b, n) in enumerate(files):
        bp, np_, sp, dp = (work / f"rd{i}.{x}" for x in ("old", "new", "sig", "delta"))
        bp.write_bytes(b)
        np_.write_bytes(n)
        subprocess.run(["rdiff", "signature", str(bp), str(sp)], check=True)
        subprocess.run(["rdiff", "delta", str(sp), str(np_), str(dp)], check=True)
        d = dp.read_bytes()
        raw += len(d)
        comp += len(plain.compress(d))
        for p in (bp, np_, sp, dp):
            p.unlink()
    secs = time.monotonic() - t0
    result["rdiff delta"] = {"bytes": raw, "seconds": secs}
    result["rdiff delta + zstd -19"] = {"bytes": comp, "seconds": secs}
    result["files"] = {"bytes": len(files), "new_bytes": sum(len(n) for _, n in files)}
    return result


@dataclass
class Scenario:
    name: str
    description: str
    old_tars: list[bytes]
    new_tars: list[bytes]
    start: Callable[[Path], None]  # the start-up of NEW in a root filesystem
    start_text: str


@dataclass
class Prepared:
    old: str  # registry references, on the unshaped push host
    new: str  # NEW without deltas (chunk and file dedup)
    new_deltas: str  # the same NEW in a repository that also holds its deltas
    gzip: str  # NEW with gzip layers (the full pull)
    changed_gzip: list[str]  # blob digests of NEW's changed gzip layers
    pristine: Path  # a node cache holding OLD and NEW's TOCs
    file_node: Path  # the same, less the chunks of files file dedup fetches
    results: dict[str, Any]


def prepare(sc: Scenario, w: Any, work: Path) -> Prepared:
    from lazyfs.ocilayout import Layout

    log(f"{sc.name}: converting and pushing")
    d = work / sc.name
    d.mkdir(parents=True, exist_ok=True)
    old_lay, _ = lazy_image(sc.old_tars, d, "v1")
    new_lay, new_gz = lazy_image(sc.new_tars, d, "v2")
    base = f"{w.push_host}/{sc.name}"
    old, new, new_deltas, gzip = (f"{base}/{r}" for r in ("img:v1", "img:v2", "deltas:v2",
                                                           "gzip:v2"))  # fmt: skip
    push_oci_layout(old_lay, old, tag="v1")
    push_oci_layout(new_lay, new, tag="v2")
    push_oci_layout(new_lay, new_deltas, tag="v2")
    push_oci_layout(d / "v2-gzip", gzip, tag="v2")
    old_layers = Layout(old_lay).manifest("v1").layers
    new_layers = Layout(new_lay).manifest("v2").layers
    gz_layers = Layout(d / "v2-gzip").manifest("v2").layers
    held = {o.digest for o in old_layers}
    changed = [i for i, desc in enumerate(new_layers) if desc.digest not in held]
    res: dict[str, Any] = {
        "description": sc.description,
        "start": sc.start_text,
        "image_gzip_bytes": sum(new_gz),
        "full_pull_gzip": sum(new_gz[i] for i in changed),
        "full_pull_lazy": sum(new_layers[i].size for i in changed),
    }
    pristine = d / "node"
    shutil.rmtree(pristine, ignore_errors=True)
    lazyfs("pull", old, "--plain-http", "--cache", str(pristine), "--progress", "none")
    # NEW's TOCs: every contender reads them first (a lazy pull's first step); a node that
    # holds OLD has them, so they stay out of the comparison.
    report = json.loads(
        lazyfs("diff", old, new, "--plain-http", "--cache", str(pristine), "--json")
    )
    lazyfs("diff", old, new_deltas, "--plain-http", "--cache", str(pristine), "--json")
    res["report"] = {
        k: report[k] for k in ("fetch_bytes", "held_bytes", "full_pull_bytes", "files_removed")
    }
    res["files"] = {
        k: sum(ld[k] for ld in report["layers"])
        for k in ("files_changed", "files_new", "files_unchanged", "changed_bytes", "new_bytes")
    }
    res["file_dedup_bytes"], drop = file_dedup(old, new, pristine)
    file_node = d / "file-node"
    shutil.rmtree(file_node, ignore_errors=True)
    shutil.copytree(pristine, file_node)
    from lazyfs.store.chunkcache import ChunkCache

    cache = ChunkCache(file_node)
    for digest in drop:
        cache.path_of(digest).unlink(missing_ok=True)

    log(f"{sc.name}: making deltas")
    t0 = time.monotonic()
    summary = json.loads(
        lazyfs("delta", old, new_deltas, "--push", "--plain-http", "--json", "--cache",
               str(d / "builder"))
    )  # fmt: skip
    res["delta_build"] = {**summary, "seconds": time.monotonic() - t0}
    log(f"{sc.name}: patch methods")
    res["methods"] = patch_methods(old, new, d / "builder", d)
    return Prepared(
        old, new, new_deltas, gzip, [gz_layers[i].digest for i in changed], pristine,
        file_node, res,
    )  # fmt: skip


CONTENDERS = (
    "full pull of the changed layers (gzip) + extract",
    "zstd:chunked-style file dedup (`lazyfs pull`, file-level cache)",
    "lazyfs chunk dedup (`lazyfs pull`)",
    "lazyfs deltas (`lazyfs pull`)",
    "lazyfs chunk dedup, lazily (mount, no pull)",
    "lazyfs deltas, lazily (mount, no pull)",
)


def measure(label: str, sc: Scenario, p: Prepared, w: Any, d: Path) -> Sample:
    """One repetition of one contender: a fresh copy of the node, then timed from the first
    request until NEW's start-up has finished."""

    def host_of(ref: str) -> str:  # the measured host
        return str(ref.replace(w.push_host, w.host))

    node = d / "rep-node"
    shutil.rmtree(node, ignore_errors=True)
    root = d / "rep-root"
    if is_mounted(str(root)):
        subprocess.run(["umount", "-l", str(root)], check=False)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    if not label.startswith("full pull"):
        shutil.copytree(p.file_node if "file dedup" in label else p.pristine, node)
    new = host_of(p.new_deltas if "deltas" in label else p.new)
    n0 = w.count()
    t0 = time.monotonic()
    if label.startswith("full pull"):
        if len(sc.new_tars) > 1:  # the unchanged layers are on the node already
            for tar in sc.new_tars[:-1]:
                subprocess.run(["tar", "-xf", "-", "-C", str(root)], input=tar, check=True)
            n0, t0 = w.count(), time.monotonic()
        repo = host_of(p.gzip).rsplit(":", 1)[0].split("/", 1)
        for digest in p.changed_gzip:
            url = f"http://{repo[0]}/v2/{repo[1]}/blobs/{digest}"
            subprocess.run(
                f"curl -sfL {shlex.quote(url)} | tar -xzf - -C {shlex.quote(str(root))}",
                shell=True, check=True,
            )  # fmt: skip
        sc.start(root)
    else:
        if "pull" in label:
            lazyfs("pull", new, "--plain-http", "--cache", str(node), "--progress", "none")
        with mounted(new, root, "--read-only", "--plain-http", "--cache", str(node),
                     "--no-prefetch"):  # fmt: skip
            sc.start(root)
    sample = Sample(time.monotonic() - t0, w.count() - n0)
    if not label.startswith("full pull"):
        shutil.rmtree(node, ignore_errors=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return sample


def python_start(root: Path) -> None:
    from benchwan.images import WORKLOAD

    subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c", WORKLOAD], check=True,
                   capture_output=True)  # fmt: skip


def reader(paths: list[str]) -> Callable[[Path], None]:
    def start(root: Path) -> None:
        for rel in paths:
            path = root / rel
            if path.is_file() and not path.is_symlink():
                path.read_bytes()

    return start


def changed_app_files(old: str, new: str) -> list[str]:
    res = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--name-only", old, new],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return ["app/" + p for p in res.stdout.split()]


# ------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= 0.1 * MiB else f"{n / 1024:.1f} KiB"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"Link: {results['link']}; medians of {results['reps']} repetitions."]
    for name, r in results["scenarios"].items():
        full = r["full_pull_gzip"]
        samples = r["samples"]
        base_t = med([s["seconds"] for s in samples[CONTENDERS[0]]])
        rows = []
        for label in CONTENDERS:
            ss = samples[label]
            t = [s["seconds"] for s in ss]
            n = med([s["bytes"] for s in ss])
            rows.append([
                label, mib(n), f"{full / max(1, n):.1f}×",
                f"{med(t):.2f} s ({min(t):.2f}–{max(t):.2f})", f"{med(t) / base_t:.2f}×",
            ])  # fmt: skip
        f = r["files"]
        parts.append(
            f"**{name}** ({r['description']}): {f['files_changed']} files changed, "
            f"{f['files_new']} new, {r['report']['files_removed']} removed, "
            f"{f['files_unchanged']} unchanged. A full pull of the changed layers is "
            f"{mib(full)} (gzip; {mib(r['full_pull_lazy'])} as zstd:chunked); `lazyfs diff` "
            f"predicts {mib(r['report']['fetch_bytes'])} of chunks for the chunk-dedup pull; "
            f"file dedup needs {mib(r['file_dedup_bytes'])}. `lazyfs delta`: "
            f"{r['delta_build']['files']} patches, {mib(r['delta_build']['patch_bytes'])} "
            f"instead of {mib(r['delta_build']['chunk_bytes'])} of chunks, made in "
            f"{r['delta_build']['seconds']:.1f} s. Start-up: {r['start']}.\n\n"
            + md_table(["NEW given OLD cached, until started", "bytes over the wire",
                        "fewer than full pull", "time (min–max)", "time vs full pull"], rows)
        )  # fmt: skip
        m = r["methods"]
        mrows = [
            [k, mib(v["bytes"]), f"{v['seconds']:.2f} s" if "seconds" in v else "–"]
            for k, v in m.items()
            if k != "files"
        ]
        parts.append(
            f"Patch methods over the same {int(m['files']['bytes'])} changed files "
            f"({mib(m['files']['new_bytes'])} of new content):\n\n"
            + md_table(["method", "bytes", "time to make"], mrows)
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from bench_ctr import wire
    from benchwan.netns import PROFILES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="scratch space (default: a temporary dir)")
    ap.add_argument("--profile", choices=["loopback", *sorted(PROFILES)], default="wan")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--app-old", default="HEAD~40")
    ap.add_argument("--app-new", default="HEAD")
    ap.add_argument("--only", choices=["debian", "app"], help="one scenario")
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("rdiff") is None:
        raise SystemExit(
            "bench_delta needs rdiff (librsync) to compare against: apt-get install rdiff"
        )
    byte_compiled()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lazyfs-bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    old_root, new_root, upgraded = debian_roots()
    log(f"debian: {len(upgraded)} packages upgraded: {' '.join(u[0] for u in upgraded)}")
    old_tar, new_tar = rootfs_tar(old_root, work), rootfs_tar(new_root, work)
    scenarios = []
    if args.only in (None, "debian"):
        scenarios.append(Scenario(
            "debian",
            f"`debootstrap --variant=minbase --include=python3 bookworm` (Debian "
            f"{(old_root / 'etc/debian_version').read_text().strip()}, one layer) and the same "
            f"tree after `apt-get upgrade` from bookworm-updates and bookworm-security, "
            f"{len(upgraded)} packages upgraded: "
            + ", ".join(f"{n} {a} → {b}" for n, a, b in upgraded),
            [old_tar], [new_tar], python_start,
            "`chroot ROOT python3 -c 'import json, email.parser, http.client, sqlite3, …'` "
            "(the WAN harness's)",
        ))  # fmt: skip
    if args.only in (None, "app"):
        scenarios.append(Scenario(
            "app",
            f"the upgraded Debian layer plus an application layer: this repository's Python "
            f"source, {args.app_old} → {args.app_new}",
            [new_tar, app_tar(args.app_old)], [new_tar, app_tar(args.app_new)],
            reader(changed_app_files(args.app_old, args.app_new)),
            "read every file the update changed",
        ))  # fmt: skip
    results: dict[str, Any] = {"machine": machine_info(), "scenarios": {}, "reps": args.reps,
                               "load_start": os.getloadavg()[0]}  # fmt: skip
    with wire(args.profile, work) as w:
        prepared = [prepare(sc, w, work) for sc in scenarios]
        w.start_link()
        results["link"] = w.describe
        for sc, p in zip(scenarios, prepared, strict=True):
            samples: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
            for rep in range(args.reps):
                for label in CONTENDERS:
                    s = measure(label, sc, p, w, work / sc.name)
                    log(f"{sc.name} rep {rep + 1}: {label}: {s.seconds:.2f} s, {mib(s.bytes)}")
                    samples[label].append({"seconds": s.seconds, "bytes": s.bytes})
            results["scenarios"][sc.name] = {**p.results, "samples": samples}
    results["load_end"] = os.getloadavg()[0]
    path = write_json("delta", results)
    body = markdown(results)
    print(body)
    if not args.no_markdown:
        append_markdown(
            "Image updates: chunk dedup and binary deltas", results["machine"], command_line(), body
        )
    log(f"results: {path}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
