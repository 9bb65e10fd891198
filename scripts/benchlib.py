# ruff: noqa: RUF001, RUF002, RUF003  (×, – and µ in Markdown output are intended)
"""Shared helpers for the benchmark scripts: timing, medians, machine info, results output,
deterministic synthetic layers and OCI layouts, and process/mount lifetimes.

Every script measures its baseline in the same run and reports ratios of medians.  Results
go to ``.bench/<name>.json`` (gitignored) and a Markdown section appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout, not an installed copy, when run as a script

from lazyfs.fs.daemon import clear_mountpoint  # noqa: E402
from lazyfs.process import stop_process  # noqa: E402
from lazyfs.testing.mounts import walk_lstat  # noqa: E402, F401 - the benchmarks' walk

MTIME = 1_700_000_000
MiB = 1 << 20


# ----------------------------------------------------------------------------- signals


def sigterm_as_interrupt() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so every ``finally`` cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def byte_compiled() -> None:
    """Byte-compile this checkout as an installed lazyfs is, and let later processes keep
    what they compile: with PYTHONDONTWRITEBYTECODE set (as in some CI shells) every lazyfs
    process compiles its ~50 modules again, 0.1-0.6 s of each mount's start."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    dirs = [str(ROOT / d) for d in ("lazyfs", "snapshotter", "tools") if (ROOT / d).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


# ----------------------------------------------------------------------------- statistics


@dataclass
class Summary:
    median: float
    min: float
    max: float
    runs: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs}


def alternate_children(
    script: str, trees: dict[str, Path], child_args: Sequence[str], reps: int
) -> dict[str, list[dict[str, Any]]]:
    """``reps`` rounds of ``python SCRIPT --_child TREE *CHILD_ARGS`` run in each of ``trees``
    in turn (so ``python -m``-style imports take that checkout's lazyfs), each child printing
    one JSON object: alternating, the load drifts and every tree sees it."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(reps):
        for name, src in trees.items():
            out = subprocess.run(
                [sys.executable, script, "--_child", str(src), *child_args],
                check=True,
                capture_output=True,
                text=True,
                cwd=src,
            ).stdout
            runs[name].append(json.loads(out))
    return runs


def summarize(values: Sequence[float]) -> Summary:
    vals = list(values)
    return Summary(statistics.median(vals), min(vals), max(vals), vals)


def repeat(fn: Callable[[], Any], reps: int, *, setup: Callable[[], Any] | None = None) -> Summary:
    """Wall-clock seconds of ``fn()`` over ``reps`` runs (``setup()`` untimed before each)."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def throughput(nbytes: int, s: Summary) -> Summary:
    """MB/s (10^6) for a time summary: the median of rates, min–max swapped accordingly."""
    return summarize([nbytes / t / 1e6 for t in s.runs])


def fmt_range(s: Summary, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s.median)} ({fmt.format(s.min)}–{fmt.format(s.max)})"


def fmt_ms(s: Summary) -> str:
    return fmt_range(summarize([v * 1000 for v in s.runs]), "{:.1f}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return res.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short=12", "HEAD") + ("-dirty" if dirty else ""),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def command_line() -> str:
    """This run's command, as one would type it in the repository; an absolute path in an
    argument (a before/baseline checkout, a scratch directory) is written as its last part
    only: results name no path of the machine they ran on."""
    args = [
        f".../{os.path.basename(a.rstrip('/'))}" if os.path.isabs(a) else a for a in sys.argv[1:]
    ]
    return ".venv/bin/python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *args])


# ----------------------------------------------------------------------------- output


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --quick, --reps (a default per script) and
    --no-markdown; a script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-markdown", action="store_true", help="only write .bench/ JSON")
    return p


def work_dir(name: str) -> Path:
    """An empty .bench/work-NAME (what a killed run left there is removed)."""
    work = BENCH_DIR / f"work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def write_json(name: str, data: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def publish(name: str, title: str, result: dict[str, Any], body: str, machine: dict[str, Any], *,
            quick: bool = False, markdown: bool = True) -> Path:
    """A benchmark's end: its JSON (NAME-quick.json for a quick run), its markdown printed and,
    unless ``markdown`` is off, appended to BENCHMARKS.md under TITLE."""
    path = write_json(f"{name}-quick" if quick else name, result)
    log(f"wrote {path}")
    print(body)
    if markdown:
        append_markdown(title + (" (quick)" if quick else ""), machine, command_line(), body)
    return path


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_markdown(title: str, machine: dict[str, Any], command: str, body: str) -> None:
    head = (
        f"\n## {title}\n\n"
        f"- date: {machine['date']}, commit `{machine['commit']}`\n"
        f"- machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB, "
        f"kernel {machine['kernel']}, Python {machine['python']}\n"
        f"- command: `{command}`\n"
        f"- 1-min load average at start {machine.get('loadavg_start', '?')}, at end "
        f"{os.getloadavg()[0]:.2f} (other work on the machine shows here; 2 CPUs)\n\n"
    )
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text(
            "# Benchmarks\n\nProduced by `scripts/bench_*.py`; every ratio compares medians "
            "measured in the same run.  Figures are `median (min–max)` over the stated "
            "number of runs.\n"
        )
    with BENCHMARKS_MD.open("a") as f:
        f.write(head + body.rstrip() + "\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def random_bytes(n: int, seed: int) -> bytes:
    piece = 64 * MiB  # randbytes() of more than 256 MiB overflows
    if n <= piece:
        return random.Random(seed).randbytes(n)
    parts = [random.Random(f"{seed}/{i}").randbytes(min(piece, n - i)) for i in range(0, n, piece)]
    return b"".join(parts)


_TEXTISH = bytes.maketrans(bytes(range(256)), (b"etaoin shrdlu\ncmf" * 16)[:256])


def textish_bytes(n: int, seed: int) -> bytes:
    """Compressible (about 2:1 for zstd -3) but not trivially so: skewed random letters."""
    return random.Random(seed).randbytes(n).translate(_TEXTISH)


def mixed_bytes(n: int, seed: int) -> bytes:
    """Partly compressible content: the kind is chosen by the seed."""
    kind = seed % 5
    if kind in (0, 1):
        return random_bytes(n, seed)
    if kind in (2, 3):
        return textish_bytes(n, seed)
    block = random_bytes(min(n, 4096), seed) or b"\0"
    return (block * (n // len(block) + 1))[:n]  # highly repetitive


@dataclass
class FileSpec:
    name: str
    size: int
    seed: int
    kind: str = "mixed"  # mixed | random | textish

    def data(self) -> bytes:
        if self.kind == "random":
            return random_bytes(self.size, self.seed)
        if self.kind == "textish":
            return textish_bytes(self.size, self.seed)
        return mixed_bytes(self.size, self.seed)


def write_tar(path: Path, files: Sequence[FileSpec]) -> int:
    """Write a deterministic PAX tar (directories first as needed); returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    seen: set[str] = set()
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for spec in files:
            parts = spec.name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = MTIME
                    tf.addfile(info)
            info = tarfile.TarInfo(spec.name)
            info.size = spec.size
            info.mode = 0o644
            info.mtime = MTIME
            tf.addfile(info, io.BytesIO(spec.data()))
    tmp.replace(path)
    return path.stat().st_size


def write_tar_layout(layout: Path, tar: Path, tag: str = "latest") -> Path:
    """An OCI layout of one image whose only layer is the uncompressed ``tar``."""
    from lazyfs.ocilayout import Layout
    from lazyfs.testing.layers import put_image

    out = Layout(layout)
    out.init()
    digest, size = out.put_file(tar)
    layer: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size
    }
    desc = put_image(out, [layer], [digest])
    out.write_top([{**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}])
    return layout


def lazy_image(
    name: str, files: Callable[[], Sequence[FileSpec]], fmt: str = "zstd:chunked"
) -> Path:
    """Build (once, cached under .bench/data) a tar, its plain layout and a converted lazy
    layout; returns the lazy layout directory."""
    base = BENCH_DIR / "data" / name
    lazy = base / "lazy"
    if (lazy / "index.json").exists():
        return lazy
    from lazyfs_tools.convert import convert

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    tar = base / "layer.tar"
    log(f"building {name}: tar")
    write_tar(tar, files())
    write_tar_layout(base / "plain", tar)
    log(f"building {name}: convert to {fmt}")
    convert(f"oci:{base / 'plain'}", f"oci:{lazy}", fmt=fmt)  # type: ignore[arg-type]
    return lazy


def layer_blob(layout: Path) -> tuple[str, int]:
    """(digest, size) of the only layer of the only image in ``layout``."""
    from lazyfs.ocilayout import Layout

    layer = Layout(layout).manifest().layers[0]
    return layer.digest, layer.size


def extract_tar(tar: Path, dest: Path) -> Path:
    marker = dest.with_name(dest.name + ".extracted")
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
        marker.touch()
    return dest


# ----------------------------------------------------------------------------- processes


def is_mounted(path: Path) -> bool:
    from lazyfs.fs.unmount import is_mounted as _is

    return _is(str(path))


@dataclass
class Daemon:
    pid: int  # a new process or a fork server's child: either way not waited on here
    mountpoint: Path
    started: float  # perf_counter at spawn
    ready_s: float  # spawn → mounted

    def rss_kib(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0])
        return out


@contextlib.contextmanager
def lazyfs_mount(
    image: str,
    mnt: Path,
    cache: Path,
    *extra: str,
    timeout: float = 120.0,
    upper: Path | None = None,
    forkserver: Path | None = None,
    tree: Path = ROOT,
) -> Iterator[Daemon]:
    """``lazyfs mount IMAGE MNT --read-only --cache DIR`` (``--upper DIR`` instead of
    ``--read-only`` when given), spawned through the project's one daemon module and ready when
    it says so; unmounted and stopped by PID on exit.  ``forkserver``: a ``lazyfs serve-forks``
    socket to fork the daemon from, as the snapshotter does.  ``tree``: the checkout whose
    lazyfs runs (``python -m`` there imports its own; a ``--before`` tree)."""
    from lazyfs.errors import LazyfsError
    from lazyfs.fs.daemon import spawn

    mnt.mkdir(parents=True, exist_ok=True)
    log_path = mnt.parent / f"{mnt.name}.log"
    t0 = time.perf_counter()
    try:
        lazy = spawn(
            image,
            mnt,
            [
                *(["--upper", str(upper)] if upper else ["--read-only"]),
                "--cache",
                str(cache),
                *extra,
            ],
            log=log_path,
            timeout=timeout,
            cwd=tree,
            forkserver=forkserver,
        )
    except LazyfsError as e:
        text = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"mount at {mnt} did not come up: {e}\n{text}") from None
    d = Daemon(lazy.pid, mnt, t0, time.perf_counter() - t0)
    try:
        yield d
    finally:
        lazy.stop()


def _wait_mounted(proc: subprocess.Popen[bytes], mnt: Path, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            text = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"mount at {mnt} did not come up:\n{text}")
        time.sleep(0.005)


@contextlib.contextmanager
def overlay_mount(lower: Path, work: Path, mnt: Path) -> Iterator[Daemon]:
    """fuse-overlayfs in the foreground over ``lower``; unmounted and stopped by PID."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "upper").mkdir(parents=True)
    (work / "work").mkdir(parents=True)
    mnt.mkdir(parents=True, exist_ok=True)
    log_path = work / "overlay.log"
    opts = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
    with open(log_path, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["fuse-overlayfs", "-f", "-o", opts, str(mnt)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    d = Daemon(proc.pid, mnt, t0, 0.0)
    try:
        _wait_mounted(proc, mnt, log_path, 30)
        d.ready_s = time.perf_counter() - t0
        yield d
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        clear_mountpoint(mnt)


def read_file(path: Path, bufsize: int = MiB) -> int:
    n = 0
    buf = bytearray(bufsize)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


