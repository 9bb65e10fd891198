"""docker-registry and the delaying relay, both inside the namespace; pushing; profile checks.

Images are pushed straight to the registry (port 5000) before the link is shaped; every
measured client talks to the relay (port 5001), through the shaped veth.
"""

from __future__ import annotations

import http.client
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import log, stop_process

from . import netns
from .state import State

REGISTRY_PORT = 5000
RELAY_PORT = 5001
RELAY_SCRIPT = Path(__file__).with_name("relay.py")


class NsServices:
    """The registry and (per profile) the relay, started and stopped by PID."""

    def __init__(self, state: State, workdir: Path) -> None:
        self.state = state
        self.workdir = workdir
        self.registry: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.registry_host = f"{netns.NS_ADDR}:{REGISTRY_PORT}"  # unshaped latency: push only
        self.host = f"{netns.NS_ADDR}:{RELAY_PORT}"  # what every client uses
        self.relay_events = workdir / "relay-events.jsonl"  # for .rtts

    def _spawn(self, argv: list[str], log_name: str, label: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log_name, "ab") as out:
            proc = subprocess.Popen(
                netns.in_netns(*argv), stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        self.state.add_pid(proc.pid, label)
        return proc

    def start_registry(self) -> None:
        storage = self.workdir / "registry-storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "registry.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            f"http:\n  addr: {self.registry_host}\n"
        )
        self.registry = self._spawn(
            ["/usr/bin/docker-registry", "serve", str(cfg)], "registry.log", "docker-registry"
        )
        _wait_http(self.registry_host, self.registry)
        log(f"docker-registry in {netns.NETNS} on {self.registry_host}")

    def start_relay(self, rtt_ms: float, slow_start: bool = False) -> None:
        self.stop_relay()
        self.relay = self._spawn(
            [
                sys.executable,
                str(RELAY_SCRIPT),
                "--listen",
                self.host,
                "--upstream",
                self.registry_host,
                "--rtt-ms",
                str(rtt_ms),
                "--log",
                str(self.relay_events),
                *(["--slow-start"] if slow_start else []),
            ],
            "relay.log",
            "relay",
        )
        _wait_http(self.host, self.relay)
        ss = ", slow start modelled" if slow_start else ""
        log(f"relay on {self.host} -> {self.registry_host}, RTT {rtt_ms} ms{ss}")

    def stop_relay(self) -> None:
        if self.relay is not None:
            stop_process(self.relay)
            self.state.drop_pid(self.relay.pid)
            self.relay = None

    def stop(self) -> None:
        self.stop_relay()
        if self.registry is not None:
            stop_process(self.registry)
            self.state.drop_pid(self.registry.pid)
            self.registry = None

    def push(self, layout: Path, repo: str, tag: str) -> None:
        res = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-no-creds",
                "--preserve-digests",
                f"oci:{layout}:bench",
                f"docker://{self.registry_host}/{repo}:{tag}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            raise RuntimeError(f"push of {layout} failed: {res.stderr.strip()}")


def _wait_http(host: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, timeout=2)
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on {host} within {timeout}s")


def _kept_alive_gets(host: str, n: int = 9) -> list[float]:
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", "/v2/")
    conn.getresponse().read()
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/v2/")
        conn.getresponse().read()
        rtts.append(time.perf_counter() - t0)
    conn.close()
    return rtts


def measure_link(host: str, direct_host: str, blob_path: str, blob_size: int) -> dict[str, Any]:
    """RTT of a small GET on a kept-alive connection (through the relay, and straight to the
    registry for reference), a new connection's first GET, and curl's throughput on a blob."""
    rtts = _kept_alive_gets(host)
    direct = _kept_alive_gets(direct_host)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", "/v2/")
    conn.getresponse().read()
    first = time.perf_counter() - t0
    conn.close()
    res = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
         f"http://{host}{blob_path}"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    size_s, secs_s = res.stdout.split()
    size, secs = int(size_s), float(secs_s)
    if size != blob_size:
        raise RuntimeError(f"curl got {size} bytes of {blob_path}, expected {blob_size}")
    return {
        "rtt_ms": statistics.median(rtts) * 1000,
        "rtt_ms_min": min(rtts) * 1000,
        "direct_rtt_ms": statistics.median(direct) * 1000,
        "new_connection_get_ms": first * 1000,
        "curl_blob_bytes": size,
        "curl_seconds": secs,
        "curl_mbit_s": size * 8 / secs / 1e6,
    }
