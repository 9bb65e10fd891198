"""The "registry host": a network namespace joined to the root namespace by a veth pair.

Addresses come from a private /30 that exists only on these two interfaces; before creating
anything we check that no interface or route on the machine already uses that range.  Names
and the /30 are per run (``LAZYFS_BENCH_RUN``, default the PID), so runs from two checkouts at
once never share a namespace, an interface or a range.  The
link rate is shaped with a tbf qdisc on *both* veth ends; latency is added by the relay
(:mod:`.relay`) because this kernel has no netem.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from benchlib import log

from .state import State, link_exists, netns_exists


def run_names(run: str) -> tuple[str, str, str]:
    """(namespace, host-side veth, namespace-side veth) of run ``run``."""
    if not re.fullmatch(r"[0-9a-z]{1,10}", run):  # interface names are at most 15 bytes
        raise ValueError(f"LAZYFS_BENCH_RUN must be 1-10 of [0-9a-z], not {run!r}")
    return f"lazyfs-bench-{run}", f"lzb{run}h", f"lzb{run}n"


RUN = os.environ.get("LAZYFS_BENCH_RUN") or f"{os.getpid():x}"
NETNS, VETH_HOST, VETH_NS = run_names(RUN)
_POOL = list(ipaddress.ip_network("10.123.0.0/16").subnets(new_prefix=30))
# Where this run's /30 search starts: spread runs over the pool so they rarely meet.
_FIRST = zlib.crc32(RUN.encode()) % len(_POOL)
SUBNET = _POOL[_FIRST]
HOST_ADDR, NS_ADDR = (str(a) for a in SUBNET.hosts())


@dataclass(frozen=True)
class Profile:
    name: str
    rate_mbit: float
    rtt_ms: float

    def tbf_args(self) -> list[str]:
        """tbf: burst of ~2 ms at line rate (at least 64 KiB so a GSO segment fits), and
        a queue bounded by 50 ms of data."""
        rate_bps = self.rate_mbit * 1e6 / 8
        burst = max(int(rate_bps * 0.002), 64 * 1024)
        return ["rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]


PROFILES = {
    "lan": Profile("lan", 1000, 0.5),
    "wan": Profile("wan", 100, 40),
    "edge": Profile("edge", 20, 100),
}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res


def range_in_use(subnet: ipaddress.IPv4Network) -> list[str]:
    """Addresses or routes on this machine (root namespace) overlapping ``subnet``."""
    hits = []
    for line in sh("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        cidr = line.split()[3]
        if ipaddress.ip_interface(cidr).network.overlaps(subnet):
            hits.append(line.strip())
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0]
        if dest in ("default", "broadcast", "local", "unreachable", "multicast"):
            dest = line.split()[1] if len(line.split()) > 1 else ""
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue
        if net.prefixlen > 0 and net.overlaps(subnet):
            hits.append(line.strip())
    return hits


def _free_subnet() -> ipaddress.IPv4Network:
    """This run's /30: the first from ``_FIRST`` on that nothing here uses yet."""
    for i in range(64):
        subnet = _POOL[(_FIRST + i) % len(_POOL)]
        if not range_in_use(subnet):
            return subnet
    raise RuntimeError(f"no free /30 in {_POOL[0].supernet(new_prefix=16)} near {_POOL[_FIRST]}")


def create(state: State) -> None:
    global SUBNET, HOST_ADDR, NS_ADDR
    if netns_exists(NETNS) or link_exists(VETH_HOST):
        raise RuntimeError(
            f"netns {NETNS} or veth {VETH_HOST} already exists: run scripts/bench.sh --cleanup"
        )
    SUBNET = _free_subnet()
    HOST_ADDR, NS_ADDR = (str(a) for a in SUBNET.hosts())
    state.netns = NETNS
    state.save()
    sh("ip", "netns", "add", NETNS)
    state.veth = VETH_HOST
    state.save()
    sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", VETH_HOST)
    sh("ip", "link", "set", VETH_HOST, "up")
    sh("ip", "-n", NETNS, "addr", "add", f"{NS_ADDR}/30", "dev", VETH_NS)
    sh("ip", "-n", NETNS, "link", "set", VETH_NS, "up")
    sh("ip", "-n", NETNS, "link", "set", "lo", "up")
    log(f"netns {NETNS}: {VETH_HOST} {HOST_ADDR}/30 <-> {VETH_NS} {NS_ADDR}/30")


def shape(profile: Profile | None) -> None:
    """tbf on both ends (egress of each side), or remove shaping with ``None``."""
    for prefix, dev in (([], VETH_HOST), (["-n", NETNS], VETH_NS)):
        if profile is None:
            sh("tc", *prefix, "qdisc", "del", "dev", dev, "root", check=False)
        else:
            sh("tc", *prefix, "qdisc", "replace", "dev", dev, "root", "tbf", *profile.tbf_args())
    if profile:
        log(f"shaped {VETH_HOST}/{VETH_NS}: {' '.join(profile.tbf_args())}")


def veth_bytes() -> int:
    """rx + tx bytes of the host-side veth: everything that crossed the emulated link."""
    base = Path("/sys/class/net") / VETH_HOST / "statistics"
    return int((base / "rx_bytes").read_text()) + int((base / "tx_bytes").read_text())


def in_netns(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv]


def connections_opened() -> int:
    """TCP connections accepted inside the namespace so far, halved: each client connection
    to the relay is one passive open at the relay and one at the registry behind it."""
    snmp = sh(*in_netns("cat", "/proc/net/snmp")).stdout.splitlines()
    names, values = [line.split() for line in snmp if line.startswith("Tcp:")][:2]
    return int(values[names.index("PassiveOpens")]) // 2
