# ruff: noqa: RUF001, RUF003  (× and – in Markdown output are intended)
"""What an image update costs a node that holds the old image: a full pull of the changed
layers, zstd:chunked-style file dedup, lazyfs chunk dedup and lazyfs binary deltas.

Two updates, both real, built reproducibly from what is on disk:

* **debian**: a root filesystem unpacked from Debian packages (``dpkg-deb -x``, a fixed set
  taken from apt's package cache, by name), and the same set after upgrading every package
  the cache holds two versions of (an ``apt-get upgrade`` of those packages), with
  ``var/lib/dpkg/status`` listing the versions.  One layer, as a Debian base image is.
* **app**: that Debian layer (unchanged) plus an application layer: this repository's source
  at two git revisions (``--app-old``, ``--app-new``).

Each is converted to zstd:chunked and pushed to a local docker-registry behind a byte-counting
proxy.  Bytes are counted at the proxy (blob requests: TOCs are excluded as every contender
needs them; the delta index is included); times are wall-clock on loopback, where the network
costs nothing, so bytes are the main figure.  Also measured: zstd patch-from at two levels
against an rsync-style delta (``rdiff``, librsync) over the same changed files.

    .venv/bin/python scripts/bench_delta.py [--workdir DIR] [--debs DIR] [--budget-mib N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    ROOT,
    append_markdown,
    command_line,
    log,
    machine_info,
    md_table,
    write_json,
)

from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.layers import make_layout

MiB = 1 << 20
ARCH = {"amd64", "all"}


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


def _deb_name(path: Path) -> tuple[str, str, str]:
    name, version, arch = path.stem.split("_")
    return name, version, arch


def pick_debs(debs: Path, budget: int) -> tuple[list[Path], list[Path], list[str]]:
    """(old set, new set, upgraded package names): every package with two versions in the
    cache (old: the lower version as dpkg orders them), then others by name until ``budget``
    bytes of .deb."""
    by_name: dict[str, list[Path]] = {}
    for p in sorted(debs.glob("*.deb")):
        name, _, arch = _deb_name(p)
        if arch in ARCH:
            by_name.setdefault(name, []).append(p)
    upgraded = sorted(n for n, ps in by_name.items() if len(ps) > 1)
    old: list[Path] = []
    new: list[Path] = []
    for n in upgraded:
        ps = sorted(by_name[n], key=lambda p: _Version(_deb_name(p)[1]))
        old.append(ps[0])
        new.append(ps[-1])
    total = sum(p.stat().st_size for p in old)
    for n, ps in sorted(by_name.items()):
        if n in upgraded or total >= budget:
            continue
        old.append(ps[0])
        new.append(ps[0])
        total += ps[0].stat().st_size
    return old, new, upgraded


class _Version:
    """dpkg's version order, asked of dpkg itself (no reimplementation)."""

    def __init__(self, v: str) -> None:
        self.v = v.replace("%3a", ":")

    def __lt__(self, other: _Version) -> bool:
        r = subprocess.run(["dpkg", "--compare-versions", self.v, "lt", other.v], check=False)
        return r.returncode == 0


def rootfs_tar(debs: list[Path], work: Path) -> bytes:
    """The packages unpacked into one tree, as a deterministic tar (sorted, root-owned)."""
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    status = []
    for p in debs:
        subprocess.run(["dpkg-deb", "-x", str(p), str(root)], check=True)
        name, version, arch = _deb_name(p)
        status.append(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: {arch}\n"
            f"Version: {version.replace('%3a', ':')}\n"
        )
    (root / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("\n".join(status))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in _walk(root):
            info = tf.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with path.open("rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)
    shutil.rmtree(root)
    return buf.getvalue()


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield d / name


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


@contextmanager
def counting(proxy: FaultProxy) -> Iterator[dict[str, float]]:
    proxy.reset()
    out: dict[str, float] = {}
    t0 = time.monotonic()
    yield out
    out["seconds"] = time.monotonic() - t0
    out["bytes"] = proxy.blob_bytes
    out["requests"] = len(proxy.served)


def pulled(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        doc = json.loads(line)
        if doc.get("event") == "pulled":
            return dict(doc)
    raise RuntimeError("no pulled event")


def file_dedup_bytes(old: str, new: str, cache: Path) -> int:
    """zstd:chunked-style partial pull: every NEW file whose digest OLD lacks, whole."""
    import trio

    from lazyfs.opener import open_image

    async def run() -> int:
        async with (
            open_image(old, cache_dir=cache, plain_http=True) as o,
            open_image(new, cache_dir=cache, plain_http=True) as n,
        ):
            have = {e.digest for li in o.layers for e in li.toc.entries if e.digest}
            shared = {li.descriptor.digest for li in o.layers}
            seen: set[str] = set()
            total = 0
            for li in n.layers:
                if li.descriptor.digest in shared:
                    continue
                for e in li.toc.entries:
                    if e.type != "reg" or not e.digest or e.digest in have or e.digest in seen:
                        continue
                    seen.add(e.digest)
                    total += sum(c.end - c.offset for c in e.chunks if not c.zeros)
            return total

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


def scenario(
    name: str,
    old_tars: list[bytes],
    new_tars: list[bytes],
    reg: RegistryInstance,
    proxy: FaultProxy,
    work: Path,
    read: list[str],
) -> dict[str, Any]:
    log(f"{name}: converting and pushing")
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    old_lay, _ = lazy_image(old_tars, d, "v1")
    new_lay, new_gz = lazy_image(new_tars, d, "v2")
    old = f"{reg.host}/{name}/img:v1"
    new = f"{reg.host}/{name}/img:v2"
    push_oci_layout(old_lay, old, tag="v1")
    push_oci_layout(new_lay, new, tag="v2")
    via = new.replace(reg.host, proxy.host)
    from lazyfs.ocilayout import Layout

    old_layers = Layout(old_lay).manifest("v1").layers
    new_layers = Layout(new_lay).manifest("v2").layers
    changed = [
        i for i, desc in enumerate(new_layers) if desc.digest not in {o.digest for o in old_layers}
    ]
    res: dict[str, Any] = {
        "image_gzip_bytes": sum(new_gz),
        "full_pull_gzip": sum(new_gz[i] for i in changed),
        "full_pull_lazy": sum(new_layers[i].size for i in changed),
        "old_layers": [o.size for o in old_layers],
    }

    def node() -> Path:
        cache = d / "node"
        shutil.rmtree(cache, ignore_errors=True)
        lazyfs("pull", old, "--plain-http", "--cache", str(cache), "--progress", "none")
        # TOCs of NEW: every contender reads them first; keep them out of the comparison.
        lazyfs("diff", old, new, "--plain-http", "--cache", str(cache), "--json")
        return cache

    cache = node()
    report = json.loads(lazyfs("diff", old, new, "--plain-http", "--cache", str(cache), "--json"))
    res["report"] = {
        k: report[k] for k in ("fetch_bytes", "held_bytes", "full_pull_bytes", "files_removed")
    }
    res["files"] = {
        k: sum(ld[k] for ld in report["layers"])
        for k in ("files_changed", "files_new", "files_unchanged", "changed_bytes", "new_bytes")
    }
    res["file_dedup"] = file_dedup_bytes(old, new, cache)

    log(f"{name}: chunk dedup pull")
    with counting(proxy) as m:
        ev = pulled(
            lazyfs("pull", via, "--plain-http", "--cache", str(cache), "--progress", "json")
        )
    res["chunk_pull"] = {**m, "bytes_held": ev["bytes_held"]}
    res["chunk_read"] = mount_read(via, node(), read, proxy, d)

    log(f"{name}: making deltas")
    t0 = time.monotonic()
    summary = json.loads(
        lazyfs("delta", old, new, "--push", "--plain-http", "--json", "--cache", str(d / "builder"))
    )
    res["delta_build"] = {**summary, "seconds": time.monotonic() - t0}
    cache = node()
    with counting(proxy) as m:
        ev = pulled(
            lazyfs("pull", via, "--plain-http", "--cache", str(cache), "--progress", "json")
        )
    res["delta_pull"] = {**m, "patch_bytes": ev["patch_bytes"], "chunk_bytes": ev["bytes_fetched"]}
    res["delta_read"] = mount_read(via, node(), read, proxy, d)
    log(f"{name}: patch methods")
    res["methods"] = patch_methods(old, new, d / "builder", d)
    return res


def mount_read(
    image: str, cache: Path, paths: list[str], proxy: FaultProxy, d: Path
) -> dict[str, float]:
    """Mount NEW on a node holding OLD and read ``paths`` (the update's files): the bytes and
    time until they are all read."""
    from lazyfs.testing.mounts import mounted

    mnt = d / "mnt"
    with (
        counting(proxy) as m,
        mounted(image, mnt, "--read-only", "--plain-http", "--cache", str(cache), "--no-prefetch"),
    ):
        for p in paths:
            path = mnt / p
            if path.is_file() and not path.is_symlink():
                path.read_bytes()
    return m


def package_files(debs: list[Path]) -> list[str]:
    out: list[str] = []
    for p in debs:
        listing = subprocess.run(
            ["dpkg-deb", "-c", str(p)], capture_output=True, text=True, check=True
        )
        for line in listing.stdout.splitlines():
            if line.startswith("-"):
                out.append(re.sub(r"^\./", "", line.split(None, 5)[5]))
    return out


def changed_app_files(old: str, new: str) -> list[str]:
    res = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--name-only", old, new],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return ["app/" + p for p in res.stdout.split()]


# ------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= 0.1 * MiB else f"{n / 1024:.1f} KiB"


def markdown(results: dict[str, Any]) -> str:
    parts = []
    for name, r in results["scenarios"].items():
        full = r["full_pull_gzip"]

        def row(
            label: str, n: int, m: dict[str, float] | None = None, full: int = full
        ) -> list[str]:
            secs = f"{m['seconds']:.2f} s" if m is not None else "–"
            return [label, mib(n), f"{full / max(1, n):.1f}×", secs]

        rows = [
            row("full pull of the changed layers (gzip)", full),
            row("full pull of the changed layers (zstd:chunked)", r["full_pull_lazy"]),
            row("zstd:chunked-style file dedup (computed)", r["file_dedup"]),
            row("lazyfs chunk dedup (`lazyfs pull`)", r["chunk_pull"]["bytes"], r["chunk_pull"]),
            row("lazyfs deltas (`lazyfs pull`)", r["delta_pull"]["bytes"], r["delta_pull"]),
            row("lazyfs chunk dedup: mount, read the update's files", r["chunk_read"]["bytes"],
                r["chunk_read"]),
            row("lazyfs deltas: mount, read the update's files", r["delta_read"]["bytes"],
                r["delta_read"]),
        ]  # fmt: skip
        f = r["files"]
        parts.append(
            f"**{name}** ({r['description']}): {f['files_changed']} files changed, "
            f"{f['files_new']} new, {r['report']['files_removed']} removed, "
            f"{f['files_unchanged']} unchanged; `lazyfs diff` predicted "
            f"{mib(r['report']['fetch_bytes'])} for the chunk-dedup pull and the registry "
            f"served {mib(r['chunk_pull']['bytes'])}. `lazyfs delta`: {r['delta_build']['files']} "
            f"patches, {mib(r['delta_build']['patch_bytes'])} instead of "
            f"{mib(r['delta_build']['chunk_bytes'])} of chunks, made in "
            f"{r['delta_build']['seconds']:.1f} s.\n\n"
            + md_table(
                ["NEW given OLD cached", "bytes served", "vs full pull", "time (loopback)"], rows
            )
        )
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="scratch space (default: a temporary dir)")
    ap.add_argument("--debs", type=Path, default=Path("/var/cache/apt/archives"),
                    help="where the Debian packages come from (apt's package cache)")  # fmt: skip
    ap.add_argument("--budget-mib", type=int, default=80, help=".deb bytes in the image")
    ap.add_argument("--app-old", default="HEAD~40")
    ap.add_argument("--app-new", default="HEAD")
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("rdiff") is None:
        raise SystemExit(
            "bench_delta needs rdiff (librsync) to compare against: apt-get install rdiff"
        )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lazyfs-bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    old_debs, new_debs, upgraded = pick_debs(args.debs, args.budget_mib * MiB)
    if not upgraded:
        raise SystemExit(f"{args.debs}: no package with two versions: nothing to upgrade")
    log(f"debian: {len(old_debs)} packages, upgrading {', '.join(upgraded)}")
    old_root = rootfs_tar(old_debs, work)
    new_root = rootfs_tar(new_debs, work)
    deb_read = package_files([p for p in new_debs if _deb_name(p)[0] in upgraded])
    app_read = changed_app_files(args.app_old, args.app_new)
    results: dict[str, Any] = {"machine": machine_info(), "scenarios": {}}
    with RegistryInstance(work / "registry") as reg, FaultProxy(reg.url) as proxy:
        r = scenario("debian", [old_root], [new_root], reg, proxy, work, deb_read)
        r["description"] = (
            f"{len(old_debs)} Debian packages unpacked into one layer, "
            f"{len(upgraded)} upgraded: " + ", ".join(
                f"{_deb_name(o)[0]} {_deb_name(o)[1]} → {_deb_name(n)[1]}"
                for o, n in zip(old_debs, new_debs, strict=True) if o != n
            )
        )  # fmt: skip
        results["scenarios"]["debian"] = r
        a_old, a_new = app_tar(args.app_old), app_tar(args.app_new)
        r = scenario("app", [old_root, a_old], [old_root, a_new], reg, proxy, work, app_read)
        r["description"] = (
            f"the Debian layer plus this repository's source, {args.app_old} → {args.app_new}"
        )
        results["scenarios"]["app"] = r
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
