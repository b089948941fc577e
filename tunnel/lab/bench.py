"""Benchmark mptun against its peers and the bare link, single- and multipath; writes docs/BENCH.md.

Why: mptun's foundation targets are relative ("TCP >= 0.8x OpenVPN", ...)
and its multipath claims are about what happens when links are bad or die,
and the machine it is developed on is small, shared and noisy, so absolute
figures mean little.  This module measures everything on the impairment
lab's topology (:class:`~tunnel.lab.topology.MultipathTopology`: client,
router, server), repeats every figure, reports medians with their spread,
and puts the ratios next to them.

Sections (``--sections``):

- ``single``: the foundation figures (TCP throughput, UDP packets/s at 100
  and 1200 bytes, CPU per packet, RTT) for each *setup* over one routed path
  at zero impairment, interleaved run by run so slow phases of the machine
  hit all of them.  Setups (``--only``): ``raw`` (the router's forwarding,
  the ceiling), ``openvpn`` (OpenVPN 2.6, user space), ``wireguard``
  (wireguard-go), ``openconnect`` (openconnect against ocserv, DTLS 1.2, with
  the share of bytes its DTLS channel carried next to every figure, since it
  falls back to its TLS channel) and ``mptun``;
- ``loss``: residual loss of a media stream in duplicate mode over two paths
  with independent random loss, against the product p1*p2;
- ``failover``: longest gap and packets lost when the path carrying a 100/s
  stream is blackholed, for each scheduler mode;
- ``aggregation``: one TCP flow through mptun's balance mode over two
  rate-limited paths, against the sum of the link rates, one raw link and
  Linux MPTCP on the same links;
- ``cpu``: CPU per packet of duplicate mode over two paths against one path
  at the same offered load.
- ``server``: server memory per tunnel (tunnel/lab/servermem.py);
- ``fleet``: aggregate packets/s of 20 clients flooding one server at once
  against the same 20 namespaces over the raw underlay, and the server's CPU
  per packet (tunnel/lab/fleetpps.py);
- ``hostile``: a real client's time to its tunnel while silent half-open
  handshakes flood the server (80/s from 16 and 500/s from 64 addresses),
  against no flood (tunnel/lab/starve.py);
- ``marking``: cost of per-packet DSCP/ECN marking and of classification;
- ``webrtc``: a real aiortc call (tunnel/lab/webrtc.py) over the raw link and
  through mptun per mode, under 10 % random loss on both paths and with the
  call's path blackholed mid-call: RTP loss, jitter, longest gap.

One driver measures every setup; a setup (a small class) only knows how to
start and stop itself, which address to send to, which processes do the
tunnelling, which TUN devices they use and which cipher they negotiated.
Every namespace and process lives in a :class:`~tunnel.lab.netns.Lab`, so
everything is torn down on any error or Ctrl-C.  A peer that cannot be
started here is reported in BENCH.md with the reason, not given a number.

BENCH.md is rewritten entirely by each full run from one generator function
per section.  Partial runs (``--quick``, ``--sections``, ``--only``) print
their report instead, unless ``--output`` is given.

The UDP echo used for round-trip times runs as sub-commands of this module
inside the namespaces: ``python -m tunnel.lab.bench echo-server PORT`` and
``python -m tunnel.lab.bench echo-client ADDR PORT SECONDS RATE``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, NamedTuple, Optional, Sequence

from tunnel.lab import mptcp, openconnect, openvpn, wireguard
from tunnel.lab.impair import Impairment, Impairments
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.stack import SERVER_INNER, TunnelStack
from tunnel.lab.stream import held_gap_ms, percentile, run_stream
from tunnel.lab.topology import MultipathTopology

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "BENCH.md"
IPERF_PORT = 5201
ECHO_PORT = 7007
STREAM_PORT = 5004
ECHO_SIZE = 64
ECHO_RATE = 50.0  # datagrams per second
ECHO_GRACE = 1.0  # seconds to wait for late echoes after the last send
SMALL, LARGE = 100, 1200  # UDP payload sizes
SETUP_NAMES = ("raw", "openvpn", "wireguard", "openconnect", "mptun", "mptun-nowarm")
PEERS = ("openvpn", "wireguard", "openconnect")  # what mptun is compared with
MODES = ("duplicate", "redundant", "lowest-rtt", "balance", "backup")
SECTION_NAMES = ("single", "loss", "failover", "aggregation", "reorder", "cpu", "server", "fleet", "hostile",
                 "marking", "webrtc")
TLS_FLAG = 50.0  # an OpenConnect figure with less of its bytes on DTLS (%) is flagged
APT_PACKAGES = {  # binary -> Debian package
    "iperf3": "iperf3", "nft": "nftables", "openvpn": "openvpn",
    "wireguard-go": "wireguard-go", "wg": "wireguard-tools",
    "openconnect": "openconnect", "ocserv": "ocserv", "mptcpize": "mptcpize",
}


@dataclass(frozen=True)
class Plan:
    """How much traffic each section sends; ``--quick`` shrinks it for development."""

    runs: int = 3
    duration: float = 5.0  # seconds per iperf3 test
    echo_duration: float = 8.0  # seconds of UDP echo
    loss_rates: tuple[float, ...] = (0.05, 0.10)  # per-path random loss for the residual-loss test
    loss_count: int = 2000  # datagrams ...
    loss_pps: float = 400.0  # ... at this rate ...
    loss_size: int = 200  # ... of this size
    failover_count: int = 400  # datagrams at failover_pps; the cut comes at failover_cut_s
    failover_pps: float = 100.0
    failover_cut_s: float = 1.5
    link_mbit: float = 20.0  # rate limit of each path for the aggregation test
    cpu_pps: int = 5000  # offered load of the CPU test ...
    cpu_size: int = LARGE  # ... in datagrams of this size
    webrtc_seconds: float = 10.0  # length of each WebRTC call


QUICK = Plan(runs=1, duration=2.0, echo_duration=3.0, loss_count=1000, failover_count=250, webrtc_seconds=6.0)


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Setups: how to carry traffic from the client to the server of a topology
# --------------------------------------------------------------------------

class Setup(ABC):
    """One way of carrying traffic from ``topo.client`` to ``topo.server``."""

    name: ClassVar[str]
    binaries: ClassVar[tuple[str, ...]] = ()  # needed on the machine (installed by ensure_tools)

    def __init__(self, topo: MultipathTopology) -> None:
        self.topo = topo
        self.server: Host = topo.server
        self.client: Host = topo.client
        self.server_addr: str = topo.server_addr

    @abstractmethod
    def start(self) -> None:
        """Bring the path up; return only once traffic flows."""

    def stop(self) -> None:
        """Stop what start() started and remove temporary files (the Lab kills leftovers)."""

    @abstractmethod
    def target(self) -> str:
        """The server's address as the client must use it (through the tunnel, if any)."""

    def tun_names(self) -> Optional[tuple[str, str]]:
        """(client-side, server-side) TUN devices, or None when there is no tunnel."""
        return None

    def pids(self) -> tuple[list[int], list[int]]:
        """(client side, server side) pids of the processes that do the tunnelling."""
        return [], []

    def cipher(self) -> str:
        """The data-channel cipher in use, for the report."""
        return "none"

    def wrap(self, argv: list[str]) -> list[str]:
        """How a traffic tool's command line runs with this setup (e.g. under mptcpize)."""
        return argv

    @contextmanager
    def observe(self, test: str) -> Iterator[dict[str, float]]:
        """Around one test: yields a dict the setup fills with extra figures of its own."""
        yield {}


class RawSetup(Setup):
    """The routed link through the router, no tunnel: the ceiling for everything else."""

    name = "raw"

    def start(self) -> None:
        wait_for(lambda: self.client.ping(self.server_addr, timeout=0.5), 5,
                 message="raw link does not answer pings")

    def target(self) -> str:
        return self.server_addr


class MptcpSetup(RawSetup):
    """The raw links with Linux MPTCP on both ends and iperf3 run under ``mptcpize``."""

    name = "mptcp"
    binaries = ("mptcpize",)

    def start(self) -> None:
        reason = mptcp.available()
        if reason:
            raise RuntimeError(reason)
        mptcp.enable(self.topo)
        super().start()

    def wrap(self, argv: list[str]) -> list[str]:
        return mptcp.argv(argv)

    def cipher(self) -> str:
        return "none (no tunnel)"


class PairSetup(Setup):
    """A setup driven by a pair object (server + client process) with start/stop/workdir."""

    def __init__(self, topo: MultipathTopology) -> None:
        super().__init__(topo)
        self.pair = self.make_pair()

    @abstractmethod
    def make_pair(self):  # -> an object with start(), stop(), workdir, client_proc, server_proc
        ...

    def start(self) -> None:
        self.pair.start()

    def stop(self) -> None:
        try:
            self.pair.stop()
        finally:
            shutil.rmtree(self.pair.workdir, ignore_errors=True)

    def pids(self) -> tuple[list[int], list[int]]:
        return _pids(self.pair.client_proc), _pids(self.pair.server_proc)


class OpenVpnSetup(PairSetup):
    """OpenVPN 2.6 in user space (see tunnel/lab/openvpn.py for the configuration)."""

    name = "openvpn"
    binaries = ("openvpn",)

    def make_pair(self) -> openvpn.OpenVpnPair:
        return openvpn.OpenVpnPair(self.server, self.client, self.server_addr)

    def target(self) -> str:
        return self.pair.server_inner

    def tun_names(self) -> tuple[str, str]:
        return openvpn.TUN, openvpn.TUN

    def cipher(self) -> str:
        return openvpn.CIPHER  # forced on both ends by cipher/data-ciphers


class WireGuardSetup(PairSetup):
    """wireguard-go on both ends (see tunnel/lab/wireguard.py)."""

    name = "wireguard"
    binaries = ("wireguard-go", "wg")

    def make_pair(self) -> wireguard.WireGuardPair:
        return wireguard.WireGuardPair(self.server, self.client, self.server_addr)

    def target(self) -> str:
        return self.pair.server_inner

    def tun_names(self) -> tuple[str, str]:
        return self.pair.client_ifname, self.pair.server_ifname

    def cipher(self) -> str:
        return wireguard.CIPHER


class OpenConnectSetup(PairSetup):
    """openconnect against ocserv (see tunnel/lab/openconnect.py); counts bytes per channel."""

    name = "openconnect"
    binaries = ("openconnect", "ocserv", "nft")

    def make_pair(self) -> openconnect.OpenConnectPair:
        return openconnect.OpenConnectPair(self.server, self.client, self.server_addr)

    def target(self) -> str:
        return self.pair.server_inner

    def tun_names(self) -> tuple[str, str]:
        return self.pair.client_ifname, self.pair.server_ifname()

    def pids(self) -> tuple[list[int], list[int]]:
        return _pids(self.pair.client_proc), self.pair.server_pids()

    def cipher(self) -> str:
        return self.pair.cipher()

    @contextmanager
    def observe(self, test: str) -> Iterator[dict[str, float]]:
        """Adds ``dtls_share_<test>``: % of the tunnel's bytes (both ways) carried by DTLS."""
        counters = self.pair.counters
        assert counters is not None
        counters.read(reset=True)
        extra: dict[str, float] = {}
        yield extra
        totals = counters.read()
        if totals["dtls"] + totals["tls"]:
            extra[f"dtls_share_{test}"] = 100.0 * totals["dtls"] / (totals["dtls"] + totals["tls"])


class MptunSetup(PairSetup):
    """Real ``mptun server`` / ``mptun client`` processes, logging at info like a deployment.

    ``client`` holds extra client settings (``mode``, ``interfaces``, ...).
    """

    name = "mptun"
    server_settings: ClassVar[dict] = {}  # extra server settings of a variant

    def __init__(self, topo: MultipathTopology, **client: object) -> None:
        self.client_settings = client
        super().__init__(topo)

    def make_pair(self) -> TunnelStack:
        quiet = {"log_level": "info"}
        return TunnelStack(self.server, self.client, self.server_addr,
                           server_overrides={**quiet, **self.server_settings},
                           client_overrides={**quiet, **self.client_settings})

    @property
    def stack(self) -> TunnelStack:
        return self.pair

    def target(self) -> str:
        return SERVER_INNER

    def tun_names(self) -> tuple[str, str]:
        return "mptun0", "mptun0"  # as configured by TunnelStack

    def cipher(self) -> str:
        """Negotiated by DTLS; the client logs "path P: connected to server 'N', CIPHER"."""
        for line in self.stack.client_log.read_text(errors="replace").splitlines():
            if "connected to" in line and ", " in line:
                return line.rsplit(", ", 1)[1].strip()
        return "unknown"

    def paths(self) -> list[dict]:
        return self.stack.client_status()["paths"]

    def wait_paths(self, n: int, timeout: float = 15.0) -> None:
        """Wait until ``n`` paths are joined and up on the client and the server lists ``n``."""
        def ready() -> bool:
            up = sum(bool(p.get("joined")) and p.get("state") == "up" for p in self.paths())
            tunnels = self.stack.server_status()["tunnels"]
            return up == n and bool(tunnels) and len(tunnels[0]["paths"]) == n
        wait_for(ready, timeout, message=f"mptun: expected {n} joined paths; client: {self.paths()}")

    def path_index(self, status: dict) -> int:
        """The topology path a client status entry belongs to (by interface name or address)."""
        text = json.dumps(status)
        for path in self.topo.paths:
            if path.client_ifname in text or path.client_addr in text:
                return path.index
        raise LookupError(f"cannot tell which path this is: {status}")

    def path_counters(self, key: str = "tx_packets") -> dict[int, int]:
        """A counter of every client path, by topology path index."""
        return {self.path_index(p): p.get(key, 0) for p in self.paths()}

    def path_loss_counters(self) -> dict[int, tuple[int, int]]:
        """(records the client sent, records the server received) per path index."""
        tunnels = self.stack.server_status()["tunnels"]
        received = {self.path_index(p): p.get("rx_packets", 0) for p in (tunnels[0]["paths"] if tunnels else [])}
        return {i: (sent, received.get(i, 0)) for i, sent in self.path_counters().items()}

    @staticmethod
    def path_loss(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
        """Upstream loss ratio of each path between two :meth:`path_loss_counters` readings."""
        out = {}
        for i, (sent, received) in after.items():
            d_sent = sent - before.get(i, (0, 0))[0]
            d_received = received - before.get(i, (0, 0))[1]
            out[i] = 1.0 - d_received / d_sent if d_sent > 0 else 0.0
        return out


class MptunNoWarmSetup(MptunSetup):
    """mptun with ``keep_warm = false`` on both ends: what tunnel/warm.py is worth."""

    name = "mptun-nowarm"
    server_settings: ClassVar[dict] = {"keep_warm": False}

    def __init__(self, topo: MultipathTopology, **client: object) -> None:
        super().__init__(topo, keep_warm=False, **client)


SETUPS: dict[str, type[Setup]] = {cls.name: cls for cls in (
    RawSetup, OpenVpnSetup, WireGuardSetup, OpenConnectSetup, MptunSetup, MptunNoWarmSetup)}


def _pids(proc: Optional[subprocess.Popen]) -> list[int]:
    # `ip netns exec` execs the command, so the Popen pid is the tunnel process itself.
    return [proc.pid] if proc is not None else []


@contextmanager
def started(setup: Setup) -> Iterator[Setup]:
    """``setup`` started, and stopped again however the block ends."""
    try:
        progress(f"  {setup.name}: starting")
        setup.start()
        yield setup
    finally:
        setup.stop()


@contextmanager
def lab_topology(tag: str, n_paths: int) -> Iterator[tuple[MultipathTopology, Impairments]]:
    """A fresh lab with a MultipathTopology of ``n_paths`` paths and its Impairments."""
    with Lab(unique_prefix(tag)) as lab:
        topo = MultipathTopology(lab, n_paths=n_paths)
        with Impairments(topo) as imp:
            yield topo, imp


# --------------------------------------------------------------------------
# Probes: CPU time and TUN packet counters
# --------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` (all their threads) from /proc/PID/stat, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # skip "pid (comm)": comm may hold spaces
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / _CLK_TCK


def tun_counter(host: Host, ifname: str, counter: str) -> int:
    """A packet counter of ``ifname`` in ``host`` (e.g. "tx_packets").

    On a TUN device, tx_packets counts packets the tunnel process read from it
    and rx_packets those it wrote into it.
    """
    with host.ipr() as ipr:
        links = ipr.get_links(ifname=ifname)
        if not links:
            raise RuntimeError(f"{ifname} is gone in {host.name}: the tunnel process exited or restarted")
        return int(links[0].get_attr("IFLA_STATS64")[counter])


class CpuSample(NamedTuple):
    client_cpu: float  # seconds
    server_cpu: float
    client_packets: int  # client TUN tx_packets: read by the client, i.e. sent into the tunnel
    server_packets: int  # server TUN rx_packets: written by the server, i.e. out of the tunnel


@dataclass
class CpuProbe:
    """Context manager: CPU time of each side's tunnel processes and the packets each side handled."""

    setup: Setup
    start: Optional[CpuSample] = None
    end: Optional[CpuSample] = None

    def _sample(self) -> CpuSample:
        tuns = self.setup.tun_names()
        assert tuns is not None
        client_pids, server_pids = self.setup.pids()
        return CpuSample(cpu_seconds(client_pids), cpu_seconds(server_pids),
                         tun_counter(self.setup.client, tuns[0], "tx_packets"),
                         tun_counter(self.setup.server, tuns[1], "rx_packets"))

    def __enter__(self) -> CpuProbe:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._sample()

    def micros_per_packet(self) -> tuple[float, float]:
        """(client side, server side) microseconds of CPU per packet."""
        assert self.start is not None and self.end is not None
        d = CpuSample(*(b - a for a, b in zip(self.start, self.end)))
        return (1e6 * d.client_cpu / max(d.client_packets, 1),
                1e6 * d.server_cpu / max(d.server_packets, 1))


# --------------------------------------------------------------------------
# Traffic: iperf3 and the UDP echo
# --------------------------------------------------------------------------

def iperf(setup: Setup, seconds: float, extra: Sequence[str] = ()) -> dict:
    """One iperf3 test client -> server; returns the client's JSON ``end`` section.

    The server is started for exactly one test (``-1``) and killed if it lingers.
    """
    server = setup.server.popen(setup.wrap(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: setup.server.is_listening(IPERF_PORT) or server.poll() is not None, 10,
                 message="iperf3 server did not start")
        res = setup.client.run(setup.wrap(["iperf3", "-c", setup.target(), "-p", str(IPERF_PORT), "-J",
                                           "-t", f"{seconds:g}", *extra]),
                               check=False, timeout=seconds + 60)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")
        if "error" in out:
            raise RuntimeError(f"iperf3: {out['error']}")
        return out["end"]
    finally:
        try:
            wait_for(lambda: server.poll() is not None, 5)
        except TimeoutError:
            server.kill()
            server.wait()


def tcp_throughput(setup: Setup, seconds: float) -> float:
    """Received TCP goodput in Mbit/s."""
    return iperf(setup, seconds)["sum_received"]["bits_per_second"] / 1e6


def udp_load(setup: Setup, seconds: float, size: int, pps: Optional[float] = None) -> tuple[float, float]:
    """UDP with ``size``-byte payloads at ``pps`` (None: unlimited): (received packets/s, loss %)."""
    rate = "0" if pps is None else str(int(pps * size * 8))
    recv = iperf(setup, seconds, ["-u", "-b", rate, "-l", str(size)])["sum_received"]
    received = recv["packets"] - recv["lost_packets"]
    return received / recv["seconds"], float(recv["lost_percent"])


def echo_server(port: int) -> None:
    """Echo every UDP datagram back to its sender, forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        while True:
            data, addr = sock.recvfrom(2048)
            sock.sendto(data, addr)


_ECHO_HEADER = struct.Struct("!Id")  # sequence number, perf_counter() at sending


def echo_client(addr: str, port: int, seconds: float, rate: float, size: int = ECHO_SIZE) -> dict:
    """Send ``seconds * rate`` datagrams at ``rate``/s; return {"sent": n, "rtts_ms": [...]}.

    A sequence number and the sending time travel in each datagram, so a
    late echo is still timed right and duplicates are counted once.
    """
    count, interval = max(1, int(seconds * rate)), 1.0 / rate
    rtts: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((addr, port))
        sock.setblocking(False)
        start = time.perf_counter()
        deadline = start + count * interval + ECHO_GRACE
        sent = 0
        while len(rtts) < count:
            now = time.perf_counter()
            if sent < count and now >= start + sent * interval:
                try:
                    sock.send(_ECHO_HEADER.pack(sent, now).ljust(size, b"\0"))
                except OSError:  # a pending ICMP error from an earlier datagram: this one is lost
                    pass
                sent += 1
                continue
            if sent == count and now >= deadline:
                break
            wake = start + sent * interval if sent < count else deadline
            if select.select([sock], [], [], max(0.0, wake - now))[0]:
                _drain_echoes(sock, rtts)
    return {"sent": count, "rtts_ms": [rtts[k] for k in sorted(rtts)]}


def _drain_echoes(sock: socket.socket, rtts: dict[int, float]) -> None:
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        except OSError:  # ICMP unreachable on the connected socket: that echo is lost
            continue
        now = time.perf_counter()
        if len(data) >= _ECHO_HEADER.size:
            seq, sent_at = _ECHO_HEADER.unpack_from(data)
            rtts.setdefault(seq, (now - sent_at) * 1e3)


def _self_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "tunnel.lab.bench", *map(str, args)]


def echo_rtt(setup: Setup, seconds: float) -> tuple[float, float, int]:
    """Round trips of a 50/s UDP echo: (p50 ms, p99 ms, datagrams lost)."""
    server = setup.server.popen(_self_argv("echo-server", ECHO_PORT))
    try:
        wait_for(lambda: setup.server.is_listening(ECHO_PORT, udp=True) or server.poll() is not None, 10,
                 message="echo server did not start")
        if server.poll() is not None:
            raise RuntimeError(f"echo server exited with {server.returncode}")
        res = setup.client.run(_self_argv("echo-client", setup.target(), ECHO_PORT, seconds, ECHO_RATE),
                               timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    out = json.loads(res.stdout)
    rtts = sorted(out["rtts_ms"])
    if not rtts:
        raise RuntimeError("no echo came back")
    return percentile(rtts, 50), percentile(rtts, 99), out["sent"] - len(rtts)


def _sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches ``deadline`` (a schedule, not a guess)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------
# Results: every figure of every run, and their summaries
# --------------------------------------------------------------------------

Series = dict[str, list[float]]  # figure -> one value per run
Table = dict[str, Series]  # row (setup, mode, ...) -> its figures


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, spec: str) -> str:
        """"median (min–max)", or the bare value for a single run or when all runs agree."""
        f = spec.format
        if self.n == 1 or f(self.low) == f(self.high):
            return f(self.median)
        return f"{f(self.median)} ({f(self.low)}–{f(self.high)})"


@dataclass
class Results:
    """Figures per section and row, notes (failures, quirks) per section, ciphers per setup."""

    tables: dict[str, Table] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    ciphers: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # sections that were run

    def add(self, section: str, row: str, figures: dict[str, float]) -> None:
        series = self.tables.setdefault(section, {}).setdefault(row, {})
        for key, value in figures.items():
            series.setdefault(key, []).append(float(value))

    def note(self, section: str, text: str) -> None:
        notes = self.notes.setdefault(section, [])
        if text not in notes:
            notes.append(text)

    def stat(self, section: str, row: str, key: str) -> Optional[Stat]:
        values = self.tables.get(section, {}).get(row, {}).get(key)
        return Stat.of(values) if values else None

    def median(self, section: str, row: str, key: str) -> Optional[float]:
        s = self.stat(section, row, key)
        return s.median if s else None

    def failed(self, section: str, what: str, exc: BaseException) -> None:
        """Record that ``what`` could not be measured, with the first lines of the reason."""
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        progress(f"  {what} FAILED: {reason}")
        self.note(section, f"{what}: could not be measured: {type(exc).__name__}: {reason}")


# --------------------------------------------------------------------------
# Section "single": foundation figures for every setup over one path
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    fmt: str
    ratio: bool = True  # is mptun/other a meaningful figure?
    tunnel_only: bool = False
    higher_is_better: bool = True
    test: str = ""  # the test it comes from (for OpenConnect's DTLS share)
    show_share: bool = False  # print that share in this row (a TLS-heavy test is flagged in every row)


METRICS = [
    Metric("tcp_mbps", "TCP throughput", "Mbit/s", "{:,.0f}", test="tcp", show_share=True),
    Metric("udp_small_pps", f"UDP {SMALL} B received", "packets/s", "{:,.0f}", test="udp_small", show_share=True),
    Metric("udp_small_loss", f"UDP {SMALL} B loss", "%", "{:.1f}", ratio=False, test="udp_small"),
    Metric("udp_large_pps", f"UDP {LARGE} B received", "packets/s", "{:,.0f}", test="udp_large", show_share=True),
    Metric("udp_large_loss", f"UDP {LARGE} B loss", "%", "{:.1f}", ratio=False, test="udp_large"),
    Metric("cpu_client_us", f"CPU client side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True,
           higher_is_better=False, test="udp_small"),
    Metric("cpu_server_us", f"CPU server side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True,
           higher_is_better=False, test="udp_small"),
    Metric("rtt_p50_ms", "RTT p50", "ms", "{:.3f}", higher_is_better=False, test="echo", show_share=True),
    Metric("rtt_p99_ms", "RTT p99", "ms", "{:.3f}", higher_is_better=False, test="echo"),
    Metric("rtt_lost", "echo lost", "datagrams", "{:.0f}", ratio=False, test="echo"),
    Metric("echo_cpu_pct", "CPU during the echo, both ends", "% of a core", "{:.1f}", ratio=False, tunnel_only=True,
           higher_is_better=False, test="echo"),
]
METRIC = {m.key: m for m in METRICS}


def measure_single(setup: Setup, plan: Plan) -> dict[str, float]:
    """All foundation figures of one run of one (started) setup."""
    fig: dict[str, float] = {}

    def say(what: str) -> None:
        progress(f"  {setup.name}: {what}")

    say("TCP")
    with setup.observe("tcp") as extra:
        fig["tcp_mbps"] = tcp_throughput(setup, plan.duration)
    fig.update(extra)
    say(f"UDP {SMALL} B")
    with setup.observe("udp_small") as extra:
        if setup.tun_names() is not None:
            with CpuProbe(setup) as probe:
                fig["udp_small_pps"], fig["udp_small_loss"] = udp_load(setup, plan.duration, SMALL)
            fig["cpu_client_us"], fig["cpu_server_us"] = probe.micros_per_packet()
        else:
            fig["udp_small_pps"], fig["udp_small_loss"] = udp_load(setup, plan.duration, SMALL)
    fig.update(extra)
    say(f"UDP {LARGE} B")
    with setup.observe("udp_large") as extra:
        fig["udp_large_pps"], fig["udp_large_loss"] = udp_load(setup, plan.duration, LARGE)
    fig.update(extra)
    say("UDP echo")
    with setup.observe("echo") as extra:
        pids = [p for side in setup.pids() for p in side]
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        fig["rtt_p50_ms"], fig["rtt_p99_ms"], fig["rtt_lost"] = echo_rtt(setup, plan.echo_duration)
        if pids:  # both sides' tunnel processes, in % of one core, while the echo ran
            fig["echo_cpu_pct"] = 100.0 * (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
    fig.update(extra)
    say(", ".join(f"{k}={METRIC[k].fmt.format(v) if k in METRIC else f'{v:.0f}'}" for k, v in fig.items()))
    return fig


def run_single(args: argparse.Namespace, results: Results) -> None:
    """``plan.runs`` rounds, each measuring every setup once in a fresh one-path lab (interleaved)."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"single path: round {i + 1}/{plan.runs}")
        for name in args.only:
            cls = SETUPS[name]
            missing = [b for b in cls.binaries if shutil.which(b) is None]
            if missing:
                results.note("single", f"{name}: not measured: {', '.join(missing)} not installed"
                             " (apt-get install failed)")
                continue
            try:
                with lab_topology("bench", 1) as (topo, _), started(cls(topo)) as setup:
                    results.add("single", name, measure_single(setup, plan))
                    results.ciphers[name] = setup.cipher()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                results.failed("single", f"{name} (round {i + 1})", exc)


# --------------------------------------------------------------------------
# Multipath sections (mptun on a two-path topology)
# --------------------------------------------------------------------------

def stream_through(setup: MptunSetup, plan_count: int, pps: float, size: int,
                   during: Optional[Callable[[], None]] = None):
    """A numbered UDP stream client -> server through the tunnel (tunnel.lab.stream)."""
    return run_stream(setup.client, setup.server, SERVER_INNER, STREAM_PORT, pps, size, plan_count,
                      setup.stack.workdir, during=during)


def sample_states(setup: MptunSetup, seconds: float, interval: float = 0.1) -> list[str]:
    """The client's path states every ``interval`` s for ``seconds`` (one entry per path and sample)."""
    states: list[str] = []
    t0 = time.monotonic()
    for k in range(max(1, int(seconds / interval))):
        _sleep_until(t0 + k * interval)
        states += [p.get("state", "?") for p in setup.paths()]
    return states


def run_loss(args: argparse.Namespace, results: Results) -> None:
    """Residual loss in duplicate mode over two paths with independent random loss p on each.

    While the stream runs, the client's path states are sampled every 100 ms:
    a path mptun declares down carries no copies, so its down time raises the
    loss above p1*p2.
    """
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"residual loss: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bloss", 2) as (topo, imp), started(MptunSetup(topo, mode="duplicate")) as setup:
                setup.wait_paths(2)
                for p in plan.loss_rates:
                    progress(f"  duplicate, {p:.0%} loss per path: {plan.loss_count} datagrams")
                    imp.apply({(k, d): Impairment(loss=p) for k in range(2) for d in ("up", "down")})
                    states: list[str] = []
                    before = setup.path_loss_counters()
                    res = stream_through(setup, plan.loss_count, plan.loss_pps, plan.loss_size,
                                         during=lambda: states.extend(
                                             sample_states(setup, plan.loss_count / plan.loss_pps)))
                    path_loss = setup.path_loss(before, setup.path_loss_counters())
                    imp.clear()
                    down = 100 * sum(s not in ("up", "degraded") for s in states) / max(1, len(states))
                    expected = p * p
                    results.add("loss", f"{p:.2f}", {
                        "sent": res.sent, "lost": res.lost, "loss_pct": 100 * res.loss_ratio,
                        "expected_pct": 100 * expected, "expected_lost": expected * res.sent,
                        "duplicates": res.duplicates, "down_pct": down,
                        "path_loss_pct": 100 * statistics.mean(path_loss.values())})
                    progress(f"  lost {res.lost} of {res.sent} (expected {expected * res.sent:.1f}),"
                             f" paths down {down:.0f} % of the time")
                    setup.wait_paths(2)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("loss", f"round {i + 1}", exc)


def cut_busiest_path(setup: MptunSetup, imp: Impairments, t0: float, cut_at: float) -> int:
    """Blackhole (both ways) the path that carries the stream, ``cut_at`` s after ``t0``.

    The choice is made from the client's per-path tx counters over the 250 ms
    just before the cut (the stream, 25 datagrams there, dwarfs the probes):
    a mode may move the stream between equal paths now and then.
    """
    _sleep_until(t0 + cut_at - 0.3)
    before = setup.path_counters()
    _sleep_until(t0 + cut_at - 0.05)
    after = setup.path_counters()
    busiest = max(sorted(after), key=lambda k: after[k] - before.get(k, 0))
    _sleep_until(t0 + cut_at)
    imp.blackhole(busiest)
    return busiest


# The rolling outage (issue 16 finding 7: two modems driving through coverage holes): an EF
# stream at ROLLING_PPS; path 0 silent from ROLLING_FIRST[0] to ROLLING_FIRST[1] s (longer than
# the 3 s timeout), and as it comes back path 1 goes silent for the rest of the stream.  The
# outages are scheduled in the delay line (both directions, to the millisecond).
ROLLING_ROW = "rolling outage"  # its row in the failover table
ROLLING_PPS = 50.0
ROLLING_FIRST = (3.0, 9.0)
ROLLING_SECONDS = 12.0
EF_TOS = 0xB8  # DSCP 46 (EF)


def rolling_outage_stream(client: Host, server: Host, imp: Impairments, workdir: Path, *,
                          pps: float = ROLLING_PPS, first: tuple[float, float] = ROLLING_FIRST,
                          seconds: float = ROLLING_SECONDS):
    """Run the rolling outage over a two-path MultipathTopology's ``imp``; returns
    (StreamResult with arrivals, the schedule start in monotonic seconds).  Used by the
    failover section and by tests/test_resilience.py."""
    imp.set(0, Impairment(outages=(first,)))
    imp.set(1, Impairment(outages=((first[1], first[1] + seconds + 60.0),)))
    started: list[float] = []
    try:
        res = run_stream(client, server, SERVER_INNER, STREAM_PORT, pps, 200, int(pps * seconds), workdir,
                         tos=EF_TOS, full=True, during=lambda: started.append(imp.restart_schedule()))
    finally:
        imp.clear()
    return res, started[0]


def run_failover(args: argparse.Namespace, results: Results) -> None:
    """Per mode: longest gap and losses of a 100/s stream when its path is blackholed; then the
    rolling outage in duplicate mode."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"failover: round {i + 1}/{plan.runs}")
        for mode in MODES:
            try:
                with lab_topology("bfail", 2) as (topo, imp):
                    interfaces = [p.client_ifname for p in topo.paths]  # backup's priority: path 0 first
                    with started(MptunSetup(topo, mode=mode, interfaces=interfaces)) as setup:
                        setup.wait_paths(2)
                        cut: list[int] = []
                        res = stream_through(
                            setup, plan.failover_count, plan.failover_pps, 200,
                            during=lambda: cut.append(
                                cut_busiest_path(setup, imp, time.monotonic(), plan.failover_cut_s)))
                        results.add("failover", mode, {"gap_ms": res.longest_gap_ms, "lost": res.lost,
                                                       "reordered": res.reordered, "cut_path": cut[0],
                                                       "sent": res.sent})
                        progress(f"  {mode}: cut path {cut[0]}, longest gap {res.longest_gap_ms:.0f} ms,"
                                 f" lost {res.lost}")
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                results.failed("failover", f"{mode} (round {i + 1})", exc)
        try:
            with lab_topology("broll", 2) as (topo, imp):
                with started(MptunSetup(topo, mode="duplicate")) as setup:
                    setup.wait_paths(2)
                    t0 = time.monotonic()
                    res, _ = rolling_outage_stream(setup.client, setup.server, imp, setup.stack.workdir)
                    held = held_gap_ms(res, ROLLING_PPS, setup.stack.stalls(t0))
                    results.add("failover", ROLLING_ROW, {"gap_ms": res.longest_gap_ms, "held_gap_ms": held,
                                                          "lost": res.lost, "reordered": res.reordered,
                                                          "sent": res.sent})
                    progress(f"  rolling outage: longest gap {res.longest_gap_ms:.0f} ms ({held:.0f} ms less "
                             f"stalls), lost {res.lost}")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("failover", f"rolling outage (round {i + 1})", exc)


def run_aggregation(args: argparse.Namespace, results: Results) -> None:
    """TCP over two rate-limited paths: one raw link, MPTCP, mptun balance."""
    plan: Plan = args.plan
    limit = Impairment(rate_mbit=plan.link_mbit)
    for i in range(plan.runs):
        progress(f"aggregation: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bagg", 2) as (topo, imp):
                imp.apply({(k, d): limit for k in range(2) for d in ("up", "down")})
                with started(RawSetup(topo)) as raw:  # unbound sockets leave through path 0
                    results.add("aggregation", "raw", {"mbps": tcp_throughput(raw, plan.duration)})
                if shutil.which("mptcpize") is None:
                    results.note("aggregation", "MPTCP: not measured: mptcpize not installed")
                else:
                    try:
                        with started(MptcpSetup(topo)) as mp:
                            before = mptcp.mib(topo.client)
                            mbps = tcp_throughput(mp, plan.duration)
                            joined = mptcp.joined_subflows(before, mptcp.mib(topo.client))
                            results.add("aggregation", "mptcp", {"mbps": mbps, "joined": joined})
                    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                        results.failed("aggregation", "MPTCP", exc)
                with started(MptunSetup(topo, mode="balance")) as setup:
                    setup.wait_paths(2)
                    before = setup.path_counters("tx_bytes")
                    mbps = tcp_throughput(setup, plan.duration)
                    after = setup.path_counters("tx_bytes")
                    sent = {k: after[k] - before.get(k, 0) for k in after}
                    share = 100 * max(sent.values()) / max(1, sum(sent.values()))
                    results.add("aggregation", "mptun", {"mbps": mbps, "busiest_share": share})
                progress("  " + ", ".join(f"{row} {results.tables['aggregation'][row]['mbps'][-1]:.1f}"
                                          for row in results.tables.get("aggregation", {})) + " Mbit/s")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("aggregation", f"round {i + 1}", exc)


REORDER_DELAYS_MS = (5, 25)  # one-way delay of path 0 and path 1 in the reorder section
REORDER_HOLD_MS = 100


def _reorder_policy(workdir: Path, reorder: bool) -> str:
    path = Path(workdir) / f"reorder-{reorder}.toml"
    path.write_text('[[class]]\nname = "all"\nmode = "balance"\n'
                    + (f"reorder = true\nreorder_ms = {REORDER_HOLD_MS}\n" if reorder else ""))
    return str(path)


def run_reorder(args: argparse.Namespace, results: Results) -> None:
    """Balance mode over two rate-limited paths with different delays, with and without
    receiver-side reordering: TCP throughput, and order and latency of a UDP stream."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"reorder: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bro", 2) as (topo, imp), tempfile.TemporaryDirectory(prefix="mptun-bench-") as tmp:
                imp.apply({(k, d): Impairment(delay_ms=REORDER_DELAYS_MS[k], rate_mbit=plan.link_mbit)
                           for k in range(2) for d in ("up", "down")})
                with started(RawSetup(topo)) as raw:  # unbound sockets leave through path 0
                    results.add("reorder", "raw", {"mbps": tcp_throughput(raw, plan.duration)})
                for row, reorder in (("balance", False), ("balance+reorder", True)):
                    with started(MptunSetup(topo, mode="balance", policy=_reorder_policy(tmp, reorder))) as setup:
                        setup.wait_paths(2)
                        mbps = tcp_throughput(setup, plan.duration)
                        res = run_stream(topo.client, topo.server, SERVER_INNER, 5008, rate=plan.loss_pps,
                                         size=plan.loss_size, count=plan.loss_count // 2, workdir=tmp)
                        tunnel = setup.stack.server_status()["tunnels"][0]
                        results.add("reorder", row, {
                            "mbps": mbps, "reordered_pct": 100 * res.reordered / max(1, res.received),
                            "lost": res.lost, "p50_ms": res.latency_p50_ms or 0.0,
                            "p99_ms": res.latency_p99_ms or 0.0,
                            "released": tunnel["reorder"]["released"], "timeouts": tunnel["reorder"]["timeouts"]})
                progress("  " + ", ".join(f"{row} {results.tables['reorder'][row]['mbps'][-1]:.1f}"
                                          for row in results.tables.get("reorder", {})) + " Mbit/s")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("reorder", f"round {i + 1}", exc)


def run_cpu(args: argparse.Namespace, results: Results) -> None:
    """CPU per packet at a fixed offered load: duplicate over two paths vs one path."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"duplicate CPU: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bcpu", 2) as (topo, _):
                for row, paths in (("1 path", topo.paths[:1]), ("duplicate, 2 paths", topo.paths)):
                    interfaces = [p.client_ifname for p in paths]
                    with started(MptunSetup(topo, mode="duplicate", interfaces=interfaces)) as setup:
                        setup.wait_paths(len(paths))
                        with CpuProbe(setup) as probe:
                            pps, loss = udp_load(setup, plan.duration, plan.cpu_size, plan.cpu_pps)
                        client_us, server_us = probe.micros_per_packet()
                        results.add("cpu", row, {"cpu_client_us": client_us, "cpu_server_us": server_us,
                                                 "pps": pps, "loss": loss})
                        progress(f"  {row}: client {client_us:.1f} µs, server {server_us:.1f} µs per packet,"
                                 f" {pps:,.0f} packets/s delivered")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("cpu", f"round {i + 1}", exc)


def run_server(args: argparse.Namespace, results: Results) -> None:
    """Server memory per tunnel (tunnel/lab/servermem.py): a real server, simulated clients."""
    from tunnel.lab import servermem

    counts = [20] if args.quick else [20, 100]
    for i in range(args.plan.runs):
        progress(f"server memory: {', '.join(map(str, counts))} simulated tunnels (run {i + 1})")
        try:
            figures = servermem.measure(counts)
        except (RuntimeError, TimeoutError, OSError) as exc:
            results.note("server", f"run {i + 1}: could not be measured: {type(exc).__name__}: {exc}")
            continue
        for n in counts:
            results.add("server", f"{n} tunnels", {
                "rss_mib": figures[str(n)]["rss_kib"] / 1024,
                "kib_per_tunnel": figures[str(n)]["kib_per_tunnel"],
                "base_mib": figures["base_rss_kib"] / 1024,
            })


def run_fleet(args: argparse.Namespace, results: Results) -> None:
    """Aggregate packets/s of 20 clients through one server vs the same 20 over the raw underlay
    (tunnel/lab/fleetpps.py)."""
    from pyroute2.netlink.exceptions import NetlinkError

    from tunnel.lab import fleetpps

    for i in range(args.plan.runs):
        progress(f"fleet: 20 clients flooding {fleetpps.SIZE} B UDP through one server, then raw (run {i + 1})")
        try:
            f = fleetpps.measure(20, args.plan.duration)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError, NetlinkError) as exc:
            results.failed("fleet", f"run {i + 1}", exc)
            continue
        results.add("fleet", "20 clients", {k: f[k] for k in (
            "tunnel_pps", "raw_pps", "ratio", "tunnel_loss", "raw_loss", "server_cpu_us", "per_client_min_pps")})
        progress(f"  tunnel {f['tunnel_pps']:,.0f} packets/s, raw {f['raw_pps']:,.0f} ({f['ratio']:.2f}x),"
                 f" server {f['server_cpu_us']:.1f} µs per packet")


def _marking_rates(n: int) -> dict[str, float]:
    """Packets/s of: plain send, sendmsg with an IP_TOS cmsg (one socket, loopback, 200 B),
    and classification + outer TOS with no policy and with the shipped WebRTC policy."""
    from pathlib import Path as _Path

    from tunnel.policy import Policy, load_policy
    from tunnel.udp import _pack_int

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # small: we measure the sender, drops are fine
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    data = bytes(200)
    cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, _pack_int(0xB8))]
    out = {}
    for name, fn in (("send", lambda: tx.send(data)), ("sendmsg_tos", lambda: tx.sendmsg([data], cmsg))):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = n / (time.perf_counter() - t)
    tx.close()
    rx.close()
    pkts = [bytes([0x45, tos, 0, 228]) + bytes(5) + bytes([proto]) + bytes(2) + bytes([100, 64, 0, 2, 100, 64, 0, 1])
            + port.to_bytes(2, "big") + (443).to_bytes(2, "big") + bytes(200)
            for tos, proto, port in ((0xB8, 17, 5000), (0, 17, 12000), (0x60, 6, 4000), (0, 6, 50000))]
    webrtc = load_policy(_Path(__file__).resolve().parents[2] / "policies" / "webrtc.toml")
    for name, policy in (("classify_none", Policy.single("duplicate")), ("classify_webrtc", webrtc)):
        t = time.perf_counter()
        for i in range(n):
            p = pkts[i & 3]
            policy.outer_tos(policy.classify(p), p)
        out[name] = n / (time.perf_counter() - t)
    return out


def run_marking(args: argparse.Namespace, results: Results) -> None:
    n = 20_000 if args.quick else 200_000
    for i in range(args.plan.runs):
        progress(f"marking: send vs sendmsg+IP_TOS, classification ({n:,} packets, run {i + 1})")
        results.add("marking", "packets/s", _marking_rates(n))


WEBRTC_ROWS = ("raw", "duplicate", "balance", "lowest-rtt")  # raw link, then mptun per mode
WEBRTC_POLICY = REPO_ROOT / "policies" / "webrtc.toml"
WEBRTC_OUTAGE_S = 2.0  # the blackhole scenario's outage, from the middle of the call


def _webrtc_call(cl, row: str, scenario: str, seconds: float) -> tuple[dict, Optional[str]]:
    """One call for a row of the webrtc section; the blackhole scenario cuts the call's path mid-call."""
    from tunnel.lab import webrtc

    def cut(t0: float) -> None:
        if row == "raw":
            cut_paths.append(0)
        else:  # the path carrying the call (lowest-rtt, balance: it may be either)
            stack = cl.stack

            def which(status: dict) -> int:  # as MptunSetup.path_index: by interface name or address
                text = json.dumps(status)
                return next((x.index for x in cl.topo.paths if x.client_ifname in text or x.client_addr in text), -1)

            def counters() -> dict[int, int]:
                return {which(p): p.get("tx_packets", 0) for p in stack.client_status()["paths"]}
            _sleep_until(t0 + seconds / 2 - 0.3)
            before = counters()
            _sleep_until(t0 + seconds / 2)
            after = counters()
            busiest = max(sorted(after), key=lambda k: after[k] - before.get(k, 0))
            cut_paths.append(max(0, busiest))
        _sleep_until(t0 + seconds / 2)
        cl.imp.blackhole(cut_paths[-1])
        _sleep_until(t0 + seconds / 2 + WEBRTC_OUTAGE_S)
        cl.imp.blackhole(cut_paths[-1], on=False)

    def heal() -> None:
        for i in range(len(cl.topo.paths)):
            cl.imp.blackhole(i, on=False)
        if cl.stack is not None:
            cl.wait_paths_up()

    cut_paths: list[int] = []
    via = "raw" if row == "raw" else "tunnel"
    if row == "raw":
        cl.direct(True)
    elif row == "duplicate":
        cl.start_tunnel(policy=WEBRTC_POLICY)  # RTP in the media-ports class: duplicate, EF
    else:
        cl.start_tunnel(mode=row)
    try:
        if scenario == "blackhole":
            return webrtc.judged_call(cl, seconds, via, during=cut, reset=heal)
        return webrtc.judged_call(cl, seconds, via)
    finally:
        heal() if cl.stack is None else [cl.imp.blackhole(i, on=False) for i in range(len(cl.topo.paths))]
        if row == "raw":
            cl.direct(False)
        cl.stop_tunnel()


def run_webrtc(args: argparse.Namespace, results: Results) -> None:
    """A real WebRTC call (aiortc) over the raw link and through mptun per mode, same lab, same run."""
    from tunnel.lab import webrtc

    plan: Plan = args.plan
    for i in range(plan.runs):
        for scenario in ("loss", "blackhole"):
            progress(f"webrtc: {scenario}, round {i + 1}/{plan.runs}")
            try:
                with Lab(unique_prefix("webrtc")) as lab:
                    cl = webrtc.CallLab(lab)
                    try:
                        if scenario == "loss":
                            cl.imp.apply({(k, d): Impairment(loss=0.10) for k in range(2) for d in ("up", "down")})
                        for row in WEBRTC_ROWS:
                            try:
                                fig, why = _webrtc_call(cl, row, scenario, plan.webrtc_seconds)
                            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                                results.failed("webrtc", f"{scenario}, {row} (round {i + 1})", exc)
                                continue
                            flat = {"starved": 0.0 if why is None else 1.0, "stall": webrtc.tunnel_stalled_ms(fig)}
                            for direction, role in (("up", "answer"), ("down", "offer")):
                                a, v = fig[role]["audio"], fig[role]["video"]
                                flat.update({
                                    f"audio_loss_{direction}": a.get("loss_pct", 100.0),
                                    f"audio_wire_loss_{direction}": a.get("rtp_loss_pct", 100.0),
                                    f"video_wire_loss_{direction}": v.get("rtp_loss_pct", 100.0),
                                    f"jitter_{direction}": a.get("jitter_ms", 0.0),
                                    f"gap_{direction}": a.get("net_gap_ms", plan.webrtc_seconds * 1e3),
                                    f"pause_{direction}": v.get("longest_pause_ms", plan.webrtc_seconds * 1e3),
                                    f"frames_{direction}": 100.0 * v.get("frames", 0) / max(1, v.get("frames_sent", 0)),
                                })
                            results.add("webrtc", f"{scenario}|{row}", flat)
                            if why is not None:
                                results.note("webrtc", f"{scenario}, {row} (round {i + 1}): app figures (getStats,"
                                                       f" frames) taken from a starved call: {why}")
                            progress(f"  {row}: audio loss up/down {flat['audio_loss_up']:.1f}/{flat['audio_loss_down']:.1f} %,"
                                     f" gap {flat['gap_up']:.0f}/{flat['gap_down']:.0f} ms")
                    finally:
                        cl.close()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                results.failed("webrtc", f"{scenario} (round {i + 1})", exc)


HOSTILE_FLOODS = ((0, 0), (80, 16), (500, 64))  # silent half-open handshakes/s, source addresses (own /24 each)


def run_hostile(args: argparse.Namespace, results: Results) -> None:
    """A real client's time to its tunnel while silent half-open handshakes flood the server
    (tunnel/lab/starve.py), against the same client with no flood."""
    from tunnel.lab import starve

    for i in range(args.plan.runs):
        for rate, sources in HOSTILE_FLOODS:
            row = "no flood" if not rate else f"{rate}/s from {sources} addresses"
            progress(f"hostile: time to tunnel, {row} (run {i + 1})")
            try:
                with Lab(unique_prefix("bhostile")) as lab:
                    srv, cli = lab.add_host("srv"), lab.add_host("cli")
                    link = lab.link(srv, cli, "198.18.0.0/30")
                    atk = starve.add_attacker(lab, srv)
                    stack = TunnelStack(srv, cli, link.a_addr)
                    try:
                        res = starve.time_to_tunnel(stack, atk, rate, sources)
                    finally:
                        stack.stop()
                results.add("hostile", row, {
                    "ms": res.time_to_tunnel_s * 1e3, "achieved": res.achieved, "half_open": res.half_open_at_start,
                    "attempts": res.client_attempts, "evicted": res.counters["handshakes_evicted"],
                    "refused": res.counters["handshakes_refused"]})
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError, ValueError) as exc:
                results.failed("hostile", f"{row} (round {i + 1})", exc)


RUNNERS: dict[str, Callable[[argparse.Namespace, Results], None]] = {
    "single": run_single, "loss": run_loss, "failover": run_failover,
    "aggregation": run_aggregation, "reorder": run_reorder, "cpu": run_cpu, "server": run_server,
    "fleet": run_fleet, "hostile": run_hostile, "marking": run_marking, "webrtc": run_webrtc,
}


# --------------------------------------------------------------------------
# Targets and the report
# --------------------------------------------------------------------------

@dataclass
class Report:
    meta: dict[str, str]
    results: Results
    plan: Plan

    def single(self, setup: str, key: str) -> Optional[float]:
        return self.results.median("single", setup, key)

    def ratio(self, key: str, num: str, den: str) -> Optional[float]:
        a, b = self.single(num, key), self.single(den, key)
        return a / b if a is not None and b else None

    def added_rtt(self, setup: str) -> Optional[float]:
        """Median p50 RTT of ``setup`` minus that of the raw link, in ms."""
        a, b = self.single(setup, "rtt_p50_ms"), self.single("raw", "rtt_p50_ms")
        return a - b if a is not None and b is not None else None

    def dtls_share(self, setup: str, metric: Metric) -> Optional[float]:
        return self.single(setup, f"dtls_share_{metric.test}") if metric.test else None

    def mostly_tls(self, setup: str, metric: Metric) -> bool:
        share = self.dtls_share(setup, metric)
        return share is not None and share < TLS_FLAG

    def best_peer(self, metric: Metric) -> Optional[tuple[str, float]]:
        """The best peer's (name, median) for ``metric``; figures mostly carried by TLS don't count."""
        figures = [(p, v) for p in PEERS
                   if (v := self.single(p, metric.key)) is not None and not self.mostly_tls(p, metric)]
        if not figures:
            return None
        pick = max if metric.higher_is_better else min
        return pick(figures, key=lambda pv: pv[1])


@dataclass(frozen=True)
class Target:
    text: str
    value: str
    met: Optional[bool]  # None: not measurable with the setups that ran
    info: bool = False  # a figure shown for reference, not a target


def _fmt_ratio(r: Optional[float]) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def _at_least(report: Report, key: str, factor: float, text: str) -> Target:
    r = report.ratio(key, "mptun", "openvpn")
    return Target(text, _fmt_ratio(r), None if r is None else r >= factor)


def foundation_targets(report: Report) -> list[Target]:
    """The performance targets of the foundation issue, checked against this report."""
    mp, ov, mw = report.added_rtt("mptun"), report.added_rtt("openvpn"), report.added_rtt("mptun-nowarm")
    cpu = [report.single("mptun", k) for k in ("cpu_client_us", "cpu_server_us")]
    cpu_known = all(c is not None for c in cpu)
    return [
        _at_least(report, "tcp_mbps", 0.8, "single-path TCP >= 0.8x OpenVPN"),
        _at_least(report, "udp_small_pps", 0.75, f"small-packet ({SMALL} B) UDP packets/s >= 0.75x OpenVPN"),
        Target("added RTT p50 <= OpenVPN's",
               f"mptun +{mp:.3f} ms vs OpenVPN +{ov:.3f} ms" if mp is not None and ov is not None else "-",
               None if mp is None or ov is None else mp <= ov),
        Target("(for reference: the same with `keep_warm = false`)",
               f"mptun +{mw:.3f} ms; CPU during the echo, both ends: {_pct(report, 'mptun-nowarm')}, with"
               f" keep_warm {_pct(report, 'mptun')}, OpenVPN {_pct(report, 'openvpn')}"
               if mw is not None else "-", None, info=True),
        Target("CPU <= 10 µs per packet per side",
               f"client {cpu[0]:.1f} µs, server {cpu[1]:.1f} µs" if cpu_known else "-",
               max(cpu) <= 10.0 if cpu_known else None),  # type: ignore[type-var]
    ]


def _pct(report: Report, setup: str) -> str:
    v = report.single(setup, "echo_cpu_pct")
    return "-" if v is None else f"{v:.1f} % of a core"


def _single_cell(report: Report, setup: str, metric: Metric) -> str:
    stat = report.results.stat("single", setup, metric.key)
    if stat is None or (metric.tunnel_only and setup == "raw"):
        return "-"
    text = stat.fmt(metric.fmt)
    if stat.n < report.plan.runs:
        text += f" [{stat.n} of {report.plan.runs} runs]"
    share = report.dtls_share(setup, metric)
    if share is None:
        return text
    if share < TLS_FLAG:
        return f"**{text} ⚠ DTLS {share:.0f} %: mostly TLS**"
    return f"{text} · DTLS {share:.0f} %" if metric.show_share else text


def figures_table(report: Report) -> list[str]:
    setups = [s for s in SETUP_NAMES if s in report.results.tables.get("single", {})]
    rows = ["| figure | " + " | ".join(setups) + " | mptun / best peer | mptun / openvpn | mptun / raw |",
            "|---|" + "--:|" * (len(setups) + 3)]
    for m in METRICS:
        cells = [_single_cell(report, s, m) for s in setups]
        best = report.best_peer(m) if m.ratio else None
        mp = report.single("mptun", m.key)
        vs_best = f"{mp / best[1]:.2f}x ({best[0]})" if best and mp is not None and best[1] else "-"
        vs_ovpn = _fmt_ratio(report.ratio(m.key, "mptun", "openvpn")) if m.ratio else "-"
        vs_raw = _fmt_ratio(report.ratio(m.key, "mptun", "raw")) if m.ratio and not m.tunnel_only else "-"
        rows.append(f"| {m.label} ({m.unit}) | " + " | ".join(cells) + f" | {vs_best} | {vs_ovpn} | {vs_raw} |")
    added = [report.added_rtt(s) for s in setups]
    rows.append("| added RTT p50 vs raw (ms) | "
                + " | ".join(f"{a:+.3f}" if a is not None else "-" for a in added) + " | - | - | - |")
    return rows


def targets_table(report: Report) -> list[str]:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    rows = ["| target | measured | |", "|---|---|---|"]
    rows += [f"| {t.text} | {t.value} | {'-' if t.info else verdict[t.met]} |" for t in foundation_targets(report)]
    return rows


def _notes(report: Report, section: str) -> list[str]:
    notes = report.results.notes.get(section, [])
    return ["", "Notes:", "", *[f"- {n}" for n in notes]] if notes else []


def _not_run(report: Report, section: str) -> list[str]:
    return [] if section in report.results.ran else ["", "*Not run by this invocation (`--sections`).*"]


def section_header(report: Report) -> list[str]:
    m = report.meta
    return [
        "# mptun benchmarks",
        "",
        "Written by `scripts/bench`; do not edit by hand, run it again.  The machine is",
        "shared and noisy, so read the **ratios**: every figure is the median of the runs",
        "(min–max in brackets), and the setups are measured interleaved, round by round.",
        f"A full default run takes about 22 minutes (this one: {m['elapsed']}); `scripts/bench",
        "--quick` (one run, shorter tests) takes about 2 and prints instead of writing this file.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| kernel | {m['kernel']} |",
        f"| CPU | {m['cpu']} |",
        f"| Python | {m['python']} |",
        f"| mptun commit | {m['commit']} |",
        f"| OpenVPN | {m['openvpn']} |",
        f"| WireGuard | {m['wireguard']} |",
        f"| OpenConnect | {m['openconnect']} |",
        f"| MPTCP | {m['mptcp']} |",
        f"| iperf3 | {m['iperf3']} |",
        f"| command | `{m['command']}` |",
        f"| runs | {m['runs']} per figure; iperf3 tests {m['duration']} s, echo {m['echo_duration']} s |",
    ]


def section_single_path(report: Report) -> list[str]:
    ciphers = report.results.ciphers
    lines = [
        "## Single path",
        "",
        "The impairment lab's topology (`tunnel/lab/topology.py`) with one path and no",
        "impairment: client `cli` -> router `rtr` (forwarding) -> server `srv`, veth links,",
        "MTU 1500.  `raw` is the routed link itself (to the server's underlay address",
        "198.18.250.2); the tunnels carry traffic from the client to the server's tunnel address.",
        "OpenConnect's cells give the share of its bytes its DTLS channel carried (the rest went",
        f"over its TLS channel); under {TLS_FLAG:.0f} % the figure is flagged and not used as \"best peer\".",
        "Data ciphers: " + (", ".join(f"{s} {c}" for s, c in ciphers.items() if s in SETUP_NAMES) or "-")
        + ".",
        *_not_run(report, "single"),
    ]
    if "single" in report.results.ran:
        lines += ["", *figures_table(report), "", "### Targets (foundation issue)", "",
                  *targets_table(report)]
    return lines + _notes(report, "single")


def _row(label: str, *cells: str) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def _cell(report: Report, section: str, row: str, key: str, spec: str) -> str:
    stat = report.results.stat(section, row, key)
    return stat.fmt(spec) if stat else "-"


def section_loss(report: Report) -> list[str]:
    p = report.plan
    lines = [
        "## Multipath: residual loss in duplicate mode",
        "",
        "Two paths, each dropping a share p of the packets at random in both directions",
        "(nftables in the router, independently per path); mptun in `duplicate` mode; a stream",
        f"of {p.loss_count:,} datagrams of {p.loss_size} B at {p.loss_pps:g}/s from client to server through the",
        "tunnel.  With independent losses a datagram is lost only if both copies are, so the",
        "expected residual loss is p1·p2.  \"path loss seen\" checks the lab: the upstream loss of",
        "each path from mptun's own counters (records the client sent on it, probes included,",
        "against records the server received on it), averaged over the two paths.",
        "\"paths down\" is the share of time mptun's client",
        "had a path declared down (sampled every 100 ms during the stream): a down path carries",
        "copies all the same in `duplicate` mode (a path judged down by lost probes may still deliver),",
        "so the stream keeps the benefit of both paths.",
        *_not_run(report, "loss"),
    ]
    table = report.results.tables.get("loss", {})
    if table:
        lines += ["", "| p1 = p2 | path loss seen (%) | receiver: lost | receiver: loss (%) |"
                  " expected: p1·p2 (%) | expected lost | measured / expected | paths down (% of time) |",
                  "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for row in table:
            lost, expected = (report.results.median("loss", row, k) for k in ("lost", "expected_lost"))
            ratio = f"{lost / expected:.1f}x" if lost is not None and expected else "-"
            lines.append(_row(f"{float(row):.0%}", _cell(report, "loss", row, "path_loss_pct", "{:.1f}"),
                              _cell(report, "loss", row, "lost", "{:.0f}"),
                              _cell(report, "loss", row, "loss_pct", "{:.2f}"),
                              _cell(report, "loss", row, "expected_pct", "{:.2f}"),
                              _cell(report, "loss", row, "expected_lost", "{:.1f}"), ratio,
                              _cell(report, "loss", row, "down_pct", "{:.1f}")))
    return lines + _notes(report, "loss")


def section_failover(report: Report) -> list[str]:
    p = report.plan
    interval = 1e3 / p.failover_pps
    lines = [
        "## Multipath: failover gap per mode",
        "",
        f"Two paths, no impairment; a stream of {p.failover_pps:g} datagrams/s ({p.failover_count} in all) through",
        f"mptun; {p.failover_cut_s:g} s into it the path that carried most of the stream over the 250 ms",
        "before (read from the client's per-path counters) is blackholed in both directions at the",
        "router.",
        f"\"longest gap\" is the longest time between two consecutive arrivals ({interval:g} ms = no",
        "interruption); \"lost\" counts datagrams that never arrived, \"reordered\" those that arrived",
        "after a later one.  mptun probes every path every",
        "100 ms and declares it dead after 300 ms of silence (the defaults).  `interfaces` lists",
        "path 0 first, so it is `backup`'s primary.  With two paths `redundant`",
        "(redundancy 2) sends on both, like `duplicate`.  `balance` spreads the stream over both",
        "paths, so the cut loses the datagrams it keeps scheduling on the dead path until that",
        "path is declared dead, while the other path keeps delivering: losses without a long gap.",
        *_not_run(report, "failover"),
    ]
    table = report.results.tables.get("failover", {})
    if table:
        lines += ["", "| mode | longest gap (ms) | lost (datagrams) | reordered (datagrams) | path cut, per run |",
                  "|---|--:|--:|--:|---|"]
        for mode in table:
            if mode == ROLLING_ROW:
                continue
            cuts = ", ".join(f"{c:.0f}" for c in table[mode].get("cut_path", []))
            lines.append(_row(f"`{mode}`", _cell(report, "failover", mode, "gap_ms", "{:.0f}"),
                              _cell(report, "failover", mode, "lost", "{:.0f}"),
                              _cell(report, "failover", mode, "reordered", "{:.0f}"), cuts))
    first, total = ROLLING_FIRST, ROLLING_SECONDS
    lines += [
        "",
        f"Rolling outage (two modems through coverage holes), `duplicate` mode: an EF stream of {ROLLING_PPS:g}",
        f"datagrams/s for {total:g} s; path 0 silent (both ways, in the delay line) from {first[0]:g} s to {first[1]:g} s,",
        f"longer than the 3 s timeout, and from {first[1]:g} s path 1 silent instead, to the end.  The returning",
        "path's session was kept through its outage, so it carries the stream the moment it works.",
        f"\"held\" leaves out the sender's pauses and the daemons' stalls (the OS not running them).",
    ]
    if ROLLING_ROW in table:
        lines += ["", "| case | longest gap (ms) | held gap (ms) | lost (datagrams) | sent |", "|---|--:|--:|--:|--:|",
                  _row(ROLLING_ROW, _cell(report, "failover", ROLLING_ROW, "gap_ms", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "held_gap_ms", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "lost", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "sent", "{:.0f}"))]
    return lines + _notes(report, "failover")


def section_aggregation(report: Report) -> list[str]:
    p = report.plan
    total = 2 * p.link_mbit
    lines = [
        "## Multipath: aggregation in balance mode",
        "",
        f"Two paths, each rate-limited to {p.link_mbit:g} Mbit/s in both directions at the router (tbf,",
        f"50 ms of queue); one iperf3 TCP flow client -> server for {p.duration:g} s: over one raw link",
        "(path 0, no tunnel), with Linux MPTCP over both raw links (`mptcpize run iperf3`, one",
        "subflow endpoint per path), and through mptun in `balance` mode.  All three in the same lab,",
        "one after the other, in every run.",
        *_not_run(report, "aggregation"),
    ]
    results = report.results
    table = results.tables.get("aggregation", {})
    if table:
        raw = results.median("aggregation", "raw", "mbps")
        lines += ["", f"| | Mbit/s | / sum of the links ({total:g}) | / one raw link |", "|---|--:|--:|--:|",
                  _row("sum of the link rates", f"{total:g}", "1.00x", _fmt_ratio(total / raw) if raw else "-")]
        labels = {"raw": "one raw link (path 0)", "mptcp": "Linux MPTCP, 2 subflows", "mptun": "mptun `balance`"}
        for row in ("raw", "mptcp", "mptun"):
            if row not in table:
                continue
            value = results.median("aggregation", row, "mbps")
            lines.append(_row(labels[row], _cell(report, "aggregation", row, "mbps", "{:.1f}"),
                              _fmt_ratio(value / total if value is not None else None),
                              _fmt_ratio(value / raw if value is not None and raw else None)))
        extra = []
        joined = results.stat("aggregation", "mptcp", "joined")
        if joined:
            extra.append(f"MPTCP: the client saw {joined.fmt('{:.0f}')} extra subflows join per run"
                         " (iperf3's control and data connections each get one per extra path).")
        share = results.stat("aggregation", "mptun", "busiest_share")
        if share:
            extra.append(f"mptun: the busier path carried {share.fmt('{:.0f}')} % of the tunnel's bytes"
                         " (50 % = evenly spread).")
        if extra:
            lines += ["", *extra]
    return lines + _notes(report, "aggregation")


def section_reorder(report: Report) -> list[str]:
    p = report.plan
    d0, d1 = REORDER_DELAYS_MS
    lines = [
        "## Multipath: receiver-side reordering in balance mode",
        "",
        f"Two paths, each rate-limited to {p.link_mbit:g} Mbit/s, with {d0} ms and {d1} ms of one-way delay",
        "(the lab's delay line, both directions), so balance mode's packets arrive out of order.",
        f"mptun `balance` without and with `reorder = true` (`reorder_ms = {REORDER_HOLD_MS}`, policy file on the",
        f"client): one iperf3 TCP flow client -> server for {p.duration:g} s, then a UDP stream of",
        f"{p.loss_count // 2} datagrams of {p.loss_size} B at {p.loss_pps:g}/s (share arriving out of order, and its",
        "one-way latency).  `raw` is TCP over path 0 alone (no tunnel), in the same lab and run.",
        *_not_run(report, "reorder"),
    ]
    results = report.results
    table = results.tables.get("reorder", {})
    if table:
        raw = results.median("reorder", "raw", "mbps")
        lines += ["", "| | TCP Mbit/s | / raw path 0 | UDP out of order (%) | UDP latency p50 / p99 (ms) | "
                      "held and released / hold timeouts |", "|---|--:|--:|--:|--:|--:|"]
        for row in ("raw", "balance", "balance+reorder"):
            if row not in table:
                continue
            value = results.median("reorder", row, "mbps")
            if row == "raw":
                lines.append(_row("raw path 0", _cell(report, "reorder", row, "mbps", "{:.1f}"), "1.00x",
                                  "-", "-", "-"))
                continue
            lines.append(_row(
                f"mptun `{row}`", _cell(report, "reorder", row, "mbps", "{:.1f}"),
                _fmt_ratio(value / raw if value is not None and raw else None),
                _cell(report, "reorder", row, "reordered_pct", "{:.1f}"),
                _cell(report, "reorder", row, "p50_ms", "{:.1f}") + " / "
                + _cell(report, "reorder", row, "p99_ms", "{:.1f}"),
                _cell(report, "reorder", row, "released", "{:.0f}") + " / "
                + _cell(report, "reorder", row, "timeouts", "{:.0f}")))
    return lines + _notes(report, "reorder")


def section_cpu(report: Report) -> list[str]:
    p = report.plan
    lines = [
        "## Multipath: CPU cost of duplicate mode",
        "",
        f"iperf3 UDP at {p.cpu_pps:,} datagrams/s of {p.cpu_size} B ({p.cpu_pps * p.cpu_size * 8 / 1e6:.0f} Mbit/s) client ->",
        f"server through mptun for {p.duration:g} s, no impairment: once with one path (`interfaces` = path",
        "0), once in `duplicate` mode over two paths.  CPU per packet as in the single-path",
        "section: each side's CPU time over the packets its TUN device handled, so on the",
        "server side of `duplicate` it includes receiving, decrypting and dropping the second copy.",
        "At this moderate rate each wake-up of the event loop handles few packets, so the cost per",
        "packet is well above the single-path section's flood figure, where batching spreads the",
        "cost of a wake-up over many packets.",
        *_not_run(report, "cpu"),
    ]
    results = report.results
    table = results.tables.get("cpu", {})
    if table:
        lines += ["", "| | client (µs/packet) | server (µs/packet) | delivered (packets/s) | loss (%) |",
                  "|---|--:|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "cpu", row, k, spec) for k, spec in (
                ("cpu_client_us", "{:.1f}"), ("cpu_server_us", "{:.1f}"), ("pps", "{:,.0f}"), ("loss", "{:.1f}")))))
        one, two = "1 path", "duplicate, 2 paths"
        if one in table and two in table:
            ratios = [results.median("cpu", two, k) / results.median("cpu", one, k)  # type: ignore[operator]
                      for k in ("cpu_client_us", "cpu_server_us")]
            lines.append(_row("duplicate / 1 path", *(f"{r:.2f}x" for r in ratios), "-", "-"))
    return lines + _notes(report, "cpu")


def section_server(report: Report) -> list[str]:
    lines = [
        "## Server: memory per tunnel",
        "",
        "A real `mptun server` in a lab namespace; one simulator process runs N in-memory client",
        "cores (real DTLS handshakes over loopback, one certificate and client name each, one path",
        "per tunnel) and keeps them up with their probes; the server's RSS (/proc) is read after",
        "each step.  Per tunnel = (RSS - RSS with no tunnel) / N.",
        *_not_run(report, "server"),
    ]
    table = report.results.tables.get("server", {})
    if table:
        lines += ["", "| | server RSS (MiB) | RSS with no tunnel (MiB) | per tunnel (KiB) |", "|---|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "server", row, k, spec) for k, spec in (
                ("rss_mib", "{:.1f}"), ("base_mib", "{:.1f}"), ("kib_per_tunnel", "{:.0f}")))))
    return lines + _notes(report, "server")


def section_hostile(report: Report) -> list[str]:
    lines = [
        "## Server: a new client under a flood of silent half-open handshakes",
        "",
        "An attacker namespace answers the server's cookie from one address in each of N /24s, takes",
        "the server's first flight (a key exchange and a signature spent on it) and goes silent, holding",
        "a half-open slot (`max_handshakes` = 256).  Once the flood has filled what it can, a real",
        "client starts; the time from its first ClientHello to its tunnel being up, from its log",
        "(tunnel/lab/starve.py).  Before issue 16 a full table refused every new handshake until its",
        "oldest slots timed out (10 s): 260 hellos from 13 addresses blocked a client for 10 s, and in",
        "this lab the old code (99c2b91) gave the client its tunnel after 7.0 s under 80/s from 16",
        "addresses (one run; the client's ClientHello retransmission happened to meet a slot that had",
        "just expired).  No peer is run here: the figure is against the same client with no flood.",
        *_not_run(report, "hostile"),
    ]
    table = report.results.tables.get("hostile", {})
    if table:
        lines += ["", "| flood | time to tunnel (ms) | flood achieved (/s) | half-open when the client started "
                  "| client handshakes | evicted | refused |", "|---|--:|--:|--:|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "hostile", row, k, spec) for k, spec in (
                ("ms", "{:.0f}"), ("achieved", "{:.0f}"), ("half_open", "{:.0f}"), ("attempts", "{:.0f}"),
                ("evicted", "{:.0f}"), ("refused", "{:.0f}")))))
    return lines + _notes(report, "hostile")


def section_fleet(report: Report) -> list[str]:
    lines = [
        "## Server: aggregate packets/s with 20 clients",
        "",
        "A server namespace and 20 client namespaces, each joined to the server by its own veth link",
        "and running a real `mptun client` with that one path.  All 20 at once flood",
        f"`iperf3 -u -b 0 -l {SMALL}` through their tunnels to the server's inner address for",
        f"{report.plan.duration:g} s (one iperf3 receiver per client in the server namespace); then, in",
        "the same lab, the same 20 namespaces flood the server's underlay addresses with no tunnel.",
        "Aggregate = sum of the receivers' (packets - lost) / seconds.  Server CPU per packet: CPU time",
        "of the `mptun server` process over the packets it wrote into its TUN.  Everything (20 client",
        "processes, the server, 40 iperf3) shares the machine's cores, so the clients compete with",
        "the server for CPU.  Loss = offered minus received: under a flood, whatever is slowest drops.",
        *_not_run(report, "fleet"),
    ]
    row = "20 clients"
    if report.results.tables.get("fleet", {}).get(row):
        lines += ["", "| | through mptun (packets/s) | raw underlay (packets/s) | mptun / raw |"
                      " server CPU (µs/packet) | slowest client (packets/s) | loss mptun / raw (%) |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        loss = f"{_cell(report, 'fleet', row, 'tunnel_loss', '{:.0f}')} / {_cell(report, 'fleet', row, 'raw_loss', '{:.0f}')}"
        lines.append(_row(row, *(_cell(report, "fleet", row, k, spec) for k, spec in (
            ("tunnel_pps", "{:,.0f}"), ("raw_pps", "{:,.0f}"), ("ratio", "{:.2f}x"), ("server_cpu_us", "{:.1f}"),
            ("per_client_min_pps", "{:,.0f}"))), loss))
        pps, us = (report.results.median("fleet", row, k) for k in ("tunnel_pps", "server_cpu_us"))
        if pps and us:
            lines += ["", f"The server process was busy {pps * us / 1e4:.0f} % of one core at the median rate"
                          " (packets/s x CPU per packet)."]
    return lines + _notes(report, "fleet")


def section_marking(report: Report) -> list[str]:
    lines = [
        "## DSCP/ECN: cost of per-packet marking and of classification",
        "",
        "In one process, one core: 200-byte datagrams on a connected loopback UDP socket with plain",
        "`send` and with `sendmsg` carrying an IP_TOS control message (how mptun marks each outer",
        "datagram; runs of equal marks share one GSO `sendmsg`, and a mark of 0 needs no control",
        "message); and `Policy.classify` + `outer_tos` over a mix of four packet kinds without a",
        "policy file and with `policies/webrtc.toml`.",
        *_not_run(report, "marking"),
    ]
    results = report.results
    if results.tables.get("marking"):
        keys = (("send", "plain send"), ("sendmsg_tos", "sendmsg + IP_TOS"),
                ("classify_none", "classify, no policy"), ("classify_webrtc", "classify, webrtc policy"))
        lines += ["", "| | packets/s | µs/packet | / plain send |", "|---|--:|--:|--:|"]
        base = results.median("marking", "packets/s", "send")
        for key, label in keys:
            med = results.median("marking", "packets/s", key)
            cell = _cell(report, "marking", "packets/s", key, "{:,.0f}")
            ratio = f"{med / base:.2f}x" if base and key.startswith("send") else "-"
            lines.append(_row(label, cell, f"{1e6 / med:.2f}" if med else "-", ratio))
    return lines + _notes(report, "marking")


def section_method(report: Report) -> list[str]:
    return [
        "## Method",
        "",
        "- Lab: `MultipathTopology` (client, router, server namespaces; path i = 198.18.i.0/30,",
        "  server 198.18.250.2), `Impairments` for loss, rate limits and blackholes (nftables and",
        "  tbf in the router; no delay line is used here, so no delay-line overhead is added).",
        "  A fresh lab per setup and run (single path) or per run (multipath).",
        "- TCP: `iperf3 -t D` client -> server, bits/s as received.",
        f"- UDP: `iperf3 -u -b 0 -l {SMALL}` and `-l {LARGE}` (unlimited rate), received packets/s =",
        "  (packets - lost) / seconds from the receiver's report; loss is mostly the TUN queue",
        "  or the socket buffer in front of whichever process is the bottleneck.",
        f"- CPU per packet: utime + stime (/proc/PID/stat, {_CLK_TCK} Hz ticks) of each side's tunnel",
        f"  processes during the UDP {SMALL} B test, divided by the packets that side handled: the",
        "  client TUN's tx_packets (read by the client) and the server TUN's rx_packets (written",
        "  by the server).  iperf3 shares the same two cores.  A TUN write runs the kernel's",
        "  receive path for the inner packet in the writer's context, so the server side includes",
        "  delivering it to the receiving socket.  ocserv counts its main process, sec-mod and the",
        "  client's worker; wireguard-go is one process with several threads (all counted).",
        f"- RTT: a Python UDP echo, {ECHO_SIZE}-byte datagrams at {ECHO_RATE:g}/s with sequence number",
        "  and `perf_counter` timestamp; p50/p99 by nearest rank; lost = not echoed within",
        f"  {ECHO_GRACE:g} s after the last send.  \"CPU during the echo\": utime + stime of both ends'",
        "  tunnel processes over the echo, in % of one core.",
        "- Streams (multipath sections): `tunnel/lab/stream.py`, numbered datagrams on an absolute",
        "  schedule, every arrival recorded by the receiver (loss, longest gap between arrivals).",
        "- OpenVPN: UDP, `dev tun`, `cipher`/`data-ciphers AES-256-GCM`, TLS with the same ECDSA",
        "  P-256 certificates as mptun, `dh none`, `disable-dco` (user space like mptun),",
        "  `topology subnet` in 100.65.0.0/24, `--verb 1`, defaults otherwise",
        "  (tun-mtu 1500, mssfix 1492).",
        "- WireGuard: `wireguard-go -f` (user space; `WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`,",
        "  since this kernel has the module), keys from `wg genkey`, `wg set`, 100.67.0.0/24,",
        "  MTU 1420, defaults otherwise.",
        "- OpenConnect: `ocserv -f` with certificate authentication (CN as user name, same PKI as",
        "  mptun), `dtls-legacy = true`, 100.66.0.0/24, otherwise close to Debian's example",
        "  configuration; `openconnect --non-inter` with `--certificate`/`--sslkey`, the server key",
        "  pinned with `--servercert pin-sha256:...`, and a `--script` that only sets the TUN",
        "  address and route.  DTLS share: nftables counters in the server namespace on ocserv's",
        "  UDP (DTLS) and TCP (TLS) port, both directions, reset before each test.",
        "- MPTCP: `net.mptcp.enabled=1` and `ip mptcp limits set subflow 2 add_addr_accepted 2` on",
        "  both ends, `ip mptcp endpoint add <path addr> dev <path if> subflow` per client path,",
        "  iperf3 client and server under `mptcpize run`; joins checked in /proc/net/netstat.",
        "- mptun: `mptun server`/`mptun client` via TunnelStack, `log_level = \"info\"`,",
        "  defaults otherwise (mode and `interfaces` as stated per section).",
        "- mptun-nowarm: the same with `keep_warm = false` on both ends (by default, tunnel/warm.py runs",
        "  a dummy pass over the packet path 1.5 ms before the next packet of a periodic flow is due).",
    ]


def section_webrtc(report: Report) -> list[str]:
    p = report.plan
    lines = [
        "## WebRTC: a real call (aiortc) with and without mptun",
        "",
        "`tunnel/lab/webrtc.py`, see docs/WEBRTC.md: an unmodified aiortc peer in the client namespace calls one",
        "in a namespace behind the server (host candidates only) for"
        f" {p.webrtc_seconds:g} s, sending Opus audio (50 packets/s) and",
        "VP8 video (30 frames/s, full-size packets) both ways.  Rows: the same call over path 0 directly (no",
        "tunnel; the router gets a route to the far peer), and through mptun: `duplicate` with",
        "`policies/webrtc.toml` (the call is in its media-ports class), `balance` and `lowest-rtt` without a",
        "policy.  *loss*: 10 % random loss on both paths, both directions, at the router.  *blackhole*:",
        "halfway through, the path carrying the call (path 0 for the raw link; for mptun the one with more",
        f"client tx packets in the 300 ms before) drops everything for {WEBRTC_OUTAGE_S:g} s.",
        "Cells are up (client -> far) / down; audio loss is getStats packetsLost / (received + lost);",
        "wire loss is the same count from an AF_PACKET capture at the receiver (video: before NACK/RTX);",
        "jitter is getStats' (RFC 3550) over the clock rate; the longest gap is between audio RTP",
        "arrivals (kernel timestamps), less any pause of the sender itself; the video pause is the",
        "longest time between two frames the receiving app decoded (WebRTC counts a freeze above",
        "max(3 x frame interval, interval + 150 ms), about 183 ms here).  The last column is the longest",
        "time the OS did not run an mptun process during the call (tunnel/loop.py: a stall; the gaps",
        "include it, the packets waited).",
        *_not_run(report, "webrtc"),
    ]
    table = report.results.tables.get("webrtc", {})

    def pair(row: str, key: str, spec: str) -> str:
        return (_cell(report, "webrtc", row, f"{key}_up", spec) + " / "
                + _cell(report, "webrtc", row, f"{key}_down", spec))
    for scenario in ("loss", "blackhole"):
        rows = [r for r in table if r.startswith(scenario + "|")]
        if not rows:
            continue
        lines += ["", f"**{scenario}**", "",
                  "| | audio loss % | audio wire loss % | video wire loss % | audio jitter (ms) |"
                  " longest audio gap (ms) | longest video pause (ms) | video frames decoded % | mptun stall (ms) |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for row in rows:
            name = row.split("|", 1)[1]
            label = "raw link" if name == "raw" else f"mptun `{name}`"
            lines.append(_row(label, pair(row, "audio_loss", "{:.1f}"), pair(row, "audio_wire_loss", "{:.1f}"),
                              pair(row, "video_wire_loss", "{:.1f}"), pair(row, "jitter", "{:.1f}"),
                              pair(row, "gap", "{:.0f}"), pair(row, "pause", "{:.0f}"),
                              pair(row, "frames", "{:.0f}"),
                              "-" if name == "raw" else _cell(report, "webrtc", row, "stall", "{:.0f}")))
    return lines + _notes(report, "webrtc")


SECTIONS: list[Callable[[Report], list[str]]] = [
    section_header, section_single_path, section_loss, section_failover, section_aggregation,
    section_reorder, section_cpu, section_server, section_fleet, section_hostile, section_marking, section_webrtc,
    section_method]


def render(report: Report) -> str:
    return "\n".join("\n".join(section(report)) + "\n" for section in SECTIONS)


# --------------------------------------------------------------------------
# Environment and command line
# --------------------------------------------------------------------------

def needed_binaries(args: argparse.Namespace) -> list[str]:
    binaries = ["iperf3", "nft"]
    if "single" in args.sections:
        binaries += [b for name in args.only for b in SETUPS[name].binaries]
    if "aggregation" in args.sections:
        binaries += list(MptcpSetup.binaries)
    return sorted(set(binaries))


def ensure_tools(binaries: Iterable[str]) -> None:
    """apt-get install the Debian packages of any missing binaries; a failure is reported, not fatal.

    Debian starts an installed ocserv as a system service: if this installs it
    on a machine run by systemd, that service is stopped and disabled again
    (the benchmark runs its own ocserv in a namespace).
    """
    missing = sorted({APT_PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing:
        return
    progress(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            progress("apt-get install failed; what is missing is reported as not measured")
    if "ocserv" in missing and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "ocserv.service", "ocserv.socket"],
                       capture_output=True)


def _output_of(argv: Sequence[str], cwd: Optional[Path] = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (res.stdout or res.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown'} ({os.cpu_count()} cores)"


def _commit() -> str:
    commit = _output_of(["git", "rev-parse", "--short", "HEAD"], REPO_ROOT) or "unknown"
    dirty = _output_of(["git", "status", "--porcelain", "--", "tunnel"], REPO_ROOT)
    return commit + (" (with uncommitted changes in tunnel/)" if dirty else "")


def _command(argv: Sequence[str]) -> str:
    script = Path(sys.argv[0])
    try:
        shown = str(script.resolve().relative_to(REPO_ROOT))
    except ValueError:
        shown = sys.argv[0]
    return shlex.join([shown, *argv])


def environment(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, str]:
    plan: Plan = args.plan
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "commit": _commit(),
        "openvpn": openvpn.openvpn_version() if shutil.which("openvpn") else "not installed",
        "wireguard": wireguard.versions(),
        "openconnect": openconnect.versions(),
        "mptcp": f"kernel MPTCP, {mptcp.version()}",
        "iperf3": _output_of(["iperf3", "--version"]).splitlines()[0] if shutil.which("iperf3") else "-",
        "command": _command(argv),
        "runs": str(plan.runs),
        "duration": f"{plan.duration:g}",
        "echo_duration": f"{plan.echo_duration:g}",
        "elapsed": "-",
    }


def _name_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what}: choose from {','.join(choices)}; got {text!r}")
        return [n for n in choices if n in names]  # canonical order, no duplicates
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0],
        epilog="A full run (no --quick/--sections/--only) rewrites docs/BENCH.md; a partial one prints"
               " its report on stdout unless --output is given.")
    p.add_argument("--runs", type=int, help=f"runs per figure (median reported; default {Plan.runs})")
    p.add_argument("--duration", type=float, help=f"seconds per iperf3 test (default {Plan.duration:g})")
    p.add_argument("--echo-duration", type=float,
                   help=f"seconds of UDP echo (default {Plan.echo_duration:g})")
    p.add_argument("--quick", action="store_true",
                   help="development: 1 run, shorter tests and streams (prints instead of writing BENCH.md)")
    p.add_argument("--sections", type=_name_list(SECTION_NAMES, "--sections"), default=list(SECTION_NAMES),
                   help=f"comma-separated sections to run (default {','.join(SECTION_NAMES)})")
    p.add_argument("--only", type=_name_list(SETUP_NAMES, "--only"), default=list(SETUP_NAMES),
                   help=f"comma-separated setups for the single-path section (default {','.join(SETUP_NAMES)})")
    p.add_argument("--output", type=Path,
                   help=f"markdown report to (over)write (default for a full run: "
                        f"{DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    return p


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    overrides = {k: v for k, v in (("runs", args.runs), ("duration", args.duration),
                                   ("echo_duration", args.echo_duration)) if v is not None}
    return Plan(**{**vars(plan), **overrides})


def _echo_main(argv: Sequence[str]) -> int:
    if argv[0] == "echo-server":
        echo_server(int(argv[1]))
    else:
        addr, port, seconds, rate = argv[1], int(argv[2]), float(argv[3]), float(argv[4])
        print(json.dumps(echo_client(addr, port, seconds, rate)))
    return 0


_MAIN_PID = os.getpid()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM like Ctrl-C, in this process only.

    pyroute2 forks helpers (to create a namespace) and ends them with SIGTERM;
    raising in such a child would unwind a copy of our stack there and run our
    ``finally`` blocks, deleting the lab under us (seen: "Cannot open network
    namespace ...-cli").
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("echo-server", "echo-client"):
        return _echo_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plan = plan = _plan(args)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)  # tear the labs down on SIGTERM too, as on Ctrl-C
    if plan.runs < 1 or plan.duration <= 0 or plan.echo_duration <= 0:
        parser.error("--runs, --duration and --echo-duration must be positive")
    partial = args.quick or args.sections != list(SECTION_NAMES) or args.only != list(SETUP_NAMES)
    output = args.output or (None if partial else DEFAULT_OUTPUT)
    if os.geteuid() != 0:
        print("scripts/bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    ensure_tools(needed_binaries(args))
    meta = environment(args, argv)
    results = Results()
    started_at = time.monotonic()
    try:
        for section in args.sections:
            results.ran.append(section)
            RUNNERS[section](args, results)
    except KeyboardInterrupt:
        progress("interrupted; labs torn down, nothing written")
        return 130
    elapsed = time.monotonic() - started_at
    meta["elapsed"] = f"{elapsed / 60:.1f} min"
    end_commit = _commit()
    if end_commit != meta["commit"]:  # someone committed or edited tunnel/ meanwhile
        meta["commit"] = f"{meta['commit']} at start, {end_commit} at end"
    report = Report(meta, results, plan)
    text = render(report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        progress(f"done in {elapsed:.0f} s; wrote {output}")
    else:
        progress(f"done in {elapsed:.0f} s (partial run: report on stdout, no file written)")
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(text if output is None else "\n".join(
            line for section in SECTIONS[1:-1] for line in section(report) + [""]))
    return 0


def to_json(report: Report) -> dict:
    results = report.results
    return {
        "meta": report.meta,
        "plan": vars(report.plan),
        "ciphers": results.ciphers,
        "runs": results.tables,
        "summary": {sec: {row: {k: vars(Stat.of(v)) for k, v in series.items()}
                          for row, series in table.items()} for sec, table in results.tables.items()},
        "notes": results.notes,
        "ratios": {k: {"mptun/openvpn": report.ratio(k, "mptun", "openvpn"),
                       "mptun/raw": report.ratio(k, "mptun", "raw")} for k in METRIC},
        "added_rtt_p50_ms": {s: report.added_rtt(s) for s in results.tables.get("single", {})},
        "targets": [vars(t) for t in foundation_targets(report)],
    }


if __name__ == "__main__":
    sys.exit(main())
