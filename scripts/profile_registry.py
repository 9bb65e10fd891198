# ruff: noqa: RUF001, RUF002, RUF003  (– in Markdown output is intended)
"""Where one range request's time goes: the same requests to a loopback ``docker-registry``
through curl, a bare trio socket, httpcore's pool, an httpx client and ``RegistrySource``
(BENCHMARKS.md, issue 13, "the registry's answer").

``.venv/bin/python scripts/profile_registry.py [--requests N] [--kib K] [--runs R]``

Time to the first body byte and to the last, medians (min–p90) over N requests of K KiB at
random offsets of an 8 MiB blob, one keep-alive connection per client (curl's first row opens
a new one each time); the Python clients alternate R times, and their CPU time per request
(this process: the registry is another) is printed for each run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpcore
import httpx
import trio

from lazyfs.remote.registry import RegistrySource
from lazyfs.testing.dockerregistry import RegistryInstance, push_one_layer
from lazyfs.testing.layers import Item, make_lazy_layout, make_tar, seeded_bytes

Timings = tuple[list[float], list[float]]  # first byte, whole (seconds)


def summary(xs: list[float]) -> str:
    p90 = sorted(xs)[int(len(xs) * 0.9)]
    return f"{statistics.median(xs) * 1e3:.2f} ({min(xs) * 1e3:.2f}–{p90 * 1e3:.2f})"


def curl(url: str, offs: list[int], span: int, keep_alive: bool) -> Timings:
    fmt = "%{time_starttransfer} %{time_total}\n"
    ranges = [["-o", "/dev/null", "-r", f"{o}-{o + span - 1}", "-w", fmt, url] for o in offs]
    if keep_alive:  # one process: the connection is reused after the first
        args = ["curl", "-s", *(a for r in ranges for a in r)]
        lines = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        pairs = [line.split() for line in lines.splitlines()[1:]]
    else:
        pairs = [
            subprocess.run(
                ["curl", "-s", *r], capture_output=True, text=True, check=True
            ).stdout.split()
            for r in ranges
        ]
    return [float(p[0]) for p in pairs], [float(p[1]) for p in pairs]


async def bare(host: str, port: int, path: str, offs: list[int], span: int) -> Timings:
    """HTTP/1.1 by hand: the floor a Python client on trio can reach."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    firsts, wholes = [], []
    buf = b""
    try:
        for o in offs:
            req = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={o}-{o + span - 1}\r\n"
                "Accept-Encoding: identity\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            await s.send_all(req)
            first = 0.0
            while b"\r\n\r\n" not in buf:
                buf += await s.receive_some(1 << 20)
                first = first or time.perf_counter()
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(buf) < length:
                buf += await s.receive_some(1 << 20)
            buf = buf[length:]
            firsts.append(first - t0)
            wholes.append(time.perf_counter() - t0)
    finally:
        await s.aclose()
    return firsts, wholes


async def with_httpcore(url: str, host: str, offs: list[int], span: int) -> Timings:
    firsts, wholes = [], []
    async with httpcore.AsyncConnectionPool() as pool:
        for o in offs:
            headers: dict[bytes | str, bytes | str] = {
                "Host": host,
                "Range": f"bytes={o}-{o + span - 1}",
            }
            t0 = time.perf_counter()
            first = 0.0
            async with pool.stream("GET", url, headers=headers) as r:
                async for _ in r.aiter_stream():
                    first = first or time.perf_counter()
            firsts.append(first - t0)
            wholes.append(time.perf_counter() - t0)
    return firsts, wholes


async def with_httpx(url: str, offs: list[int], span: int) -> Timings:
    firsts, wholes = [], []
    async with httpx.AsyncClient(trust_env=False) as c:
        for o in offs:
            headers = {"Range": f"bytes={o}-{o + span - 1}", "Accept-Encoding": "identity"}
            t0 = time.perf_counter()
            first = 0.0
            async with c.stream("GET", url, headers=headers) as r:
                async for _ in r.aiter_bytes():
                    first = first or time.perf_counter()
            firsts.append(first - t0)
            wholes.append(time.perf_counter() - t0)
    return firsts, wholes


async def with_source(host: str, digest: str, offs: list[int], span: int) -> Timings:
    firsts, wholes = [], []
    src = RegistrySource(host, "prof/app", plain_http=True)
    try:
        for o in offs:
            t0 = time.perf_counter()
            first = 0.0

            async def sink(piece: bytes) -> None:
                nonlocal first
                first = first or time.perf_counter()

            await src.stream_range(digest, o, o + span, sink)
            firsts.append(first - t0)
            wholes.append(time.perf_counter() - t0)
    finally:
        await src.aclose()
    return firsts, wholes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--kib", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    span = args.kib * 1024
    with tempfile.TemporaryDirectory() as tmp, RegistryInstance(Path(tmp) / "reg") as reg:
        work = Path(tmp)
        make_lazy_layout(work / "img", [make_tar([Item("big", data=seeded_bytes(8 << 20, 7))])])
        info = push_one_layer(work / "img", f"{reg.host}/prof/app:v1", tag="v1")
        digest, size = info["digest"], len(info["blob"])
        path = f"/v2/prof/app/blobs/{digest}"
        url = f"http://{reg.host}{path}"
        rng = random.Random(3)
        offs = [rng.randrange(0, size - span) for _ in range(args.requests)]
        rows: dict[str, Timings] = {
            "curl, a new connection each": curl(url, offs, span, False),
            "curl, keep-alive": curl(url, offs, span, True),
        }
        clients: dict[str, Callable[[], Awaitable[Timings]]] = {
            "bare trio socket": lambda: bare(reg.host, reg.port, path, offs, span),
            "httpcore pool": lambda: with_httpcore(url, reg.host, offs, span),
            "httpx.AsyncClient": lambda: with_httpx(url, offs, span),
            "RegistrySource.stream_range": lambda: with_source(reg.host, digest, offs, span),
        }
        cpu: dict[str, list[float]] = {k: [] for k in clients}
        for _ in range(args.runs):
            for name, fn in clients.items():
                c0 = time.process_time()
                firsts, wholes = trio.run(fn)
                cpu[name].append((time.process_time() - c0) / len(offs))
                old = rows.setdefault(name, ([], []))
                old[0].extend(firsts[1:])  # the first opens the connection
                old[1].extend(wholes[1:])
    print(f"{args.requests} requests of {args.kib} KiB, {args.runs} runs; ms, median (min–p90)")
    print("| client | first byte | whole | client CPU a request |\n|---|---|---|---|")
    for name, (firsts, wholes) in rows.items():
        c = " / ".join(f"{x * 1e3:.2f}" for x in cpu[name]) if name in cpu else ""
        print(f"| {name} | {summary(firsts)} | {summary(wholes)} | {c} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
