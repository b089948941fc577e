"""Benchmark mptun against OpenVPN and the bare link; writes docs/BENCH.md.

Why: mptun's foundation targets are relative ("TCP >= 0.8x OpenVPN", ...),
and the machine it is developed on is small, shared and noisy, so absolute
figures mean little.  This module measures three setups over the same veth
link, interleaved run by run so slow phases of the machine hit all of them,
and reports medians with their spread plus the ratios the targets talk about:

- ``raw``: the plain veth (what the link can do at all),
- ``openvpn``: OpenVPN 2.6 in user space, UDP, AES-256-GCM (the yardstick),
- ``mptun``: a real ``mptun server`` / ``mptun client`` pair (TunnelStack).

One driver measures every setup; a setup only knows how to start and stop
itself, which address to send to, which processes do the tunnelling and which
TUN devices they use (for CPU per packet).  Every namespace and process lives
in a :class:`~tunnel.lab.netns.Lab`, so everything is torn down on any error
or Ctrl-C.

BENCH.md is rewritten entirely on each run from one generator function per
section (``SECTIONS``); later issues (multipath, failover...) add a section.

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
import socket
import statistics
import struct
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, NamedTuple, Optional, Sequence

from tunnel.lab import openvpn
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.stack import SERVER_INNER, TunnelStack

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "BENCH.md"
UNDERLAY_SUBNET = "198.18.0.0/30"  # server (link side a) .1, client (side b) .2
IPERF_PORT = 5201
ECHO_PORT = 7007
ECHO_SIZE = 64
ECHO_RATE = 50.0  # datagrams per second
ECHO_GRACE = 1.0  # seconds to wait for late echoes after the last send
SMALL, LARGE = 100, 1200  # UDP payload sizes
SETUP_NAMES = ("raw", "openvpn", "mptun")
APT_PACKAGES = {"iperf3": "iperf3", "openvpn": "openvpn"}  # binary -> Debian package


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Setups: how to bring up each kind of path between the two namespaces
# --------------------------------------------------------------------------

class Setup(ABC):
    """One way of carrying traffic from ``client`` to ``server`` in a fresh lab."""

    name: ClassVar[str]
    # (client-side, server-side) TUN device names, or None when there is no tunnel.
    tun_names: ClassVar[Optional[tuple[str, str]]] = None

    def __init__(self, server: Host, client: Host, server_addr: str) -> None:
        self.server = server
        self.client = client
        self.server_addr = server_addr

    @abstractmethod
    def start(self) -> None:
        """Bring the path up; return only once traffic flows."""

    def stop(self) -> None:
        """Stop what start() started and remove temporary files (the Lab kills leftovers)."""

    @abstractmethod
    def target(self) -> str:
        """The server's address as the client must use it (through the tunnel, if any)."""

    def pids(self) -> tuple[list[int], list[int]]:
        """(client side, server side) pids of the processes that do the tunnelling."""
        return [], []

    def cipher(self) -> str:
        """The data-channel cipher in use, for the report."""
        return "none"


class RawSetup(Setup):
    """The plain veth link: the ceiling for everything else."""

    name = "raw"

    def start(self) -> None:
        wait_for(lambda: self.client.ping(self.server_addr, timeout=0.5), 5,
                 message="raw link does not answer pings")

    def target(self) -> str:
        return self.server_addr


class OpenVpnSetup(Setup):
    """OpenVPN 2.6 in user space (see tunnel/lab/openvpn.py for the configuration)."""

    name = "openvpn"
    tun_names = (openvpn.TUN, openvpn.TUN)

    def __init__(self, server: Host, client: Host, server_addr: str) -> None:
        super().__init__(server, client, server_addr)
        self.pair = openvpn.OpenVpnPair(server, client, server_addr)

    def start(self) -> None:
        self.pair.start()

    def stop(self) -> None:
        try:
            self.pair.stop()
        finally:
            self.pair.remove_workdir()

    def target(self) -> str:
        return self.pair.server_inner

    def pids(self) -> tuple[list[int], list[int]]:
        return _pids(self.pair.client_proc), _pids(self.pair.server_proc)

    def cipher(self) -> str:
        return openvpn.CIPHER  # forced on both ends by cipher/data-ciphers


class MptunSetup(Setup):
    """Real ``mptun server`` / ``mptun client`` processes, logging at info like a deployment."""

    name = "mptun"
    tun_names = ("mptun0", "mptun0")  # as configured by TunnelStack

    def __init__(self, server: Host, client: Host, server_addr: str) -> None:
        super().__init__(server, client, server_addr)
        quiet = {"log_level": "info"}
        self.stack = TunnelStack(server, client, server_addr,
                                 server_overrides=dict(quiet), client_overrides=dict(quiet))

    def start(self) -> None:
        self.stack.start()

    def stop(self) -> None:
        try:
            self.stack.stop()
        finally:
            shutil.rmtree(self.stack.workdir, ignore_errors=True)

    def target(self) -> str:
        return SERVER_INNER

    def pids(self) -> tuple[list[int], list[int]]:
        return _pids(self.stack.client_proc), _pids(self.stack.server_proc)

    def cipher(self) -> str:
        """Negotiated by DTLS; the client logs "connected to A: server 'N', CIPHER"."""
        for line in self.stack.client_log.read_text(errors="replace").splitlines():
            if "connected to" in line and ", " in line:
                return line.rsplit(", ", 1)[1].strip()
        return "unknown"


SETUPS: dict[str, type[Setup]] = {cls.name: cls for cls in (RawSetup, OpenVpnSetup, MptunSetup)}


def _pids(proc: Optional[subprocess.Popen]) -> list[int]:
    # `ip netns exec` execs the command, so the Popen pid is the tunnel process itself.
    return [proc.pid] if proc is not None else []


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
        link = ipr.get_links(ifname=ifname)[0]
        return int(link.get_attr("IFLA_STATS64")[counter])


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
        assert self.setup.tun_names is not None
        client_pids, server_pids = self.setup.pids()
        client_tun, server_tun = self.setup.tun_names
        return CpuSample(cpu_seconds(client_pids), cpu_seconds(server_pids),
                         tun_counter(self.setup.client, client_tun, "tx_packets"),
                         tun_counter(self.setup.server, server_tun, "rx_packets"))

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
    server = setup.server.popen(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: setup.server.is_listening(IPERF_PORT) or server.poll() is not None, 10,
                 message="iperf3 server did not start")
        res = setup.client.run(["iperf3", "-c", setup.target(), "-p", str(IPERF_PORT), "-J",
                                "-t", f"{seconds:g}", *extra], check=False, timeout=seconds + 60)
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


def udp_flood(setup: Setup, seconds: float, size: int) -> tuple[float, float]:
    """Unlimited-rate UDP with ``size``-byte payloads: (received packets/s, loss %)."""
    recv = iperf(setup, seconds, ["-u", "-b", "0", "-l", str(size)])["sum_received"]
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


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(rank) - 1]


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    fmt: str
    ratio: bool = True  # is mptun/openvpn a meaningful figure?
    tunnel_only: bool = False


METRICS = [
    Metric("tcp_mbps", "TCP throughput", "Mbit/s", "{:,.0f}"),
    Metric("udp_small_pps", f"UDP {SMALL} B received", "packets/s", "{:,.0f}"),
    Metric("udp_small_loss", f"UDP {SMALL} B loss", "%", "{:.1f}", ratio=False),
    Metric("udp_large_pps", f"UDP {LARGE} B received", "packets/s", "{:,.0f}"),
    Metric("udp_large_loss", f"UDP {LARGE} B loss", "%", "{:.1f}", ratio=False),
    Metric("cpu_client_us", f"CPU client side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True),
    Metric("cpu_server_us", f"CPU server side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True),
    Metric("rtt_p50_ms", "RTT p50", "ms", "{:.3f}"),
    Metric("rtt_p99_ms", "RTT p99", "ms", "{:.3f}"),
    Metric("rtt_lost", "echo lost", "datagrams", "{:.0f}", ratio=False),
]
METRIC = {m.key: m for m in METRICS}


def measure(setup: Setup, args: argparse.Namespace) -> dict[str, float]:
    """All figures of one run of one (started) setup."""
    fig: dict[str, float] = {}

    def say(what: str) -> None:
        progress(f"  {setup.name}: {what}")

    say("TCP")
    fig["tcp_mbps"] = tcp_throughput(setup, args.duration)
    say(f"UDP {SMALL} B")
    probe = CpuProbe(setup) if setup.tun_names is not None else None
    with probe or nullcontext():
        fig["udp_small_pps"], fig["udp_small_loss"] = udp_flood(setup, args.duration, SMALL)
    if probe is not None:
        fig["cpu_client_us"], fig["cpu_server_us"] = probe.micros_per_packet()
    say(f"UDP {LARGE} B")
    fig["udp_large_pps"], fig["udp_large_loss"] = udp_flood(setup, args.duration, LARGE)
    say("UDP echo")
    fig["rtt_p50_ms"], fig["rtt_p99_ms"], fig["rtt_lost"] = echo_rtt(setup, args.echo_duration)
    say(", ".join(f"{k}={METRIC[k].fmt.format(v)}" for k, v in fig.items()))
    return fig


def run_setup_once(name: str, args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """A fresh lab (client + server namespace, one veth), the setup started in it, measured.

    Returns the figures and the data cipher the setup used.
    """
    with Lab(unique_prefix("bench")) as lab:
        server, client = lab.add_host("srv"), lab.add_host("cli")
        link = lab.link(server, client, UNDERLAY_SUBNET)
        setup = SETUPS[name](server, client, link.a_addr)
        try:
            progress(f"  {name}: starting")
            setup.start()
            return measure(setup, args), setup.cipher()
        finally:
            setup.stop()


Runs = dict[str, dict[str, list[float]]]  # setup -> metric -> one value per run


def run_all(args: argparse.Namespace) -> tuple[Runs, dict[str, str]]:
    """``args.runs`` rounds, each measuring every setup once (interleaved against drift).

    Returns the figures and each setup's data cipher.
    """
    runs: Runs = {name: {} for name in args.only}
    ciphers: dict[str, str] = {}
    for i in range(args.runs):
        progress(f"round {i + 1}/{args.runs}")
        for name in args.only:
            figures, ciphers[name] = run_setup_once(name, args)
            for key, value in figures.items():
                runs[name].setdefault(key, []).append(value)
    return runs, ciphers


# --------------------------------------------------------------------------
# Summary, targets and the report
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Report:
    meta: dict[str, str]
    runs: Runs
    ciphers: dict[str, str]
    stats: dict[str, dict[str, Stat]] = field(init=False)

    def __post_init__(self) -> None:
        self.stats = {s: {k: Stat.of(v) for k, v in m.items()} for s, m in self.runs.items()}

    def median(self, setup: str, key: str) -> Optional[float]:
        stat = self.stats.get(setup, {}).get(key)
        return stat.median if stat else None

    def ratio(self, key: str, num: str, den: str) -> Optional[float]:
        a, b = self.median(num, key), self.median(den, key)
        return a / b if a is not None and b else None

    def added_rtt(self, setup: str) -> Optional[float]:
        """Median p50 RTT of ``setup`` minus that of the raw link, in ms."""
        a, b = self.median(setup, "rtt_p50_ms"), self.median("raw", "rtt_p50_ms")
        return a - b if a is not None and b is not None else None


@dataclass(frozen=True)
class Target:
    text: str
    value: str
    met: Optional[bool]  # None: not measurable with the setups that ran


def _fmt_ratio(r: Optional[float]) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def _at_least(report: Report, key: str, factor: float, text: str) -> Target:
    r = report.ratio(key, "mptun", "openvpn")
    return Target(text, _fmt_ratio(r), None if r is None else r >= factor)


def foundation_targets(report: Report) -> list[Target]:
    """The performance targets of the foundation issue, checked against this report."""
    mp, ov = report.added_rtt("mptun"), report.added_rtt("openvpn")
    cpu = [report.median("mptun", k) for k in ("cpu_client_us", "cpu_server_us")]
    cpu_known = all(c is not None for c in cpu)
    return [
        _at_least(report, "tcp_mbps", 0.8, "single-path TCP >= 0.8x OpenVPN"),
        _at_least(report, "udp_small_pps", 0.75, f"small-packet ({SMALL} B) UDP packets/s >= 0.75x OpenVPN"),
        Target("added RTT p50 <= OpenVPN's",
               f"mptun +{mp:.3f} ms vs OpenVPN +{ov:.3f} ms" if mp is not None and ov is not None else "-",
               None if mp is None or ov is None else mp <= ov),
        Target("CPU <= 10 µs per packet per side",
               f"client {cpu[0]:.1f} µs, server {cpu[1]:.1f} µs" if cpu_known else "-",
               max(cpu) <= 10.0 if cpu_known else None),  # type: ignore[type-var]
    ]


def _cell(report: Report, setup: str, metric: Metric) -> str:
    stat = report.stats.get(setup, {}).get(metric.key)
    if stat is None or (metric.tunnel_only and setup == "raw"):
        return "-"
    f = metric.fmt.format
    if len(report.runs[setup][metric.key]) == 1:
        return f(stat.median)
    return f"{f(stat.median)} ({f(stat.low)}–{f(stat.high)})"


def figures_table(report: Report) -> list[str]:
    rows = ["| figure | raw | openvpn | mptun | mptun/openvpn | mptun/raw |",
            "|---|--:|--:|--:|--:|--:|"]
    for m in METRICS:
        cells = [_cell(report, s, m) for s in SETUP_NAMES]
        vs_ovpn = _fmt_ratio(report.ratio(m.key, "mptun", "openvpn")) if m.ratio else "-"
        vs_raw = _fmt_ratio(report.ratio(m.key, "mptun", "raw")) if m.ratio and not m.tunnel_only else "-"
        rows.append(f"| {m.label} ({m.unit}) | " + " | ".join(cells) + f" | {vs_ovpn} | {vs_raw} |")
    added = [report.added_rtt(s) for s in SETUP_NAMES]
    rows.append("| added RTT p50 vs raw (ms) | "
                + " | ".join(f"{a:+.3f}" if a is not None else "-" for a in added) + " | - | - |")
    return rows


def targets_table(report: Report) -> list[str]:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    rows = ["| target | measured | |", "|---|---|---|"]
    rows += [f"| {t.text} | {t.value} | {verdict[t.met]} |" for t in foundation_targets(report)]
    return rows


def section_header(report: Report) -> list[str]:
    m = report.meta
    return [
        "# mptun benchmarks",
        "",
        "Written by `scripts/bench`; do not edit by hand, run it again.  The machine is",
        "shared and noisy, so read the **ratios**: every figure is the median of the runs",
        "(min–max in brackets), and the setups are measured interleaved, round by round.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| kernel | {m['kernel']} |",
        f"| CPU | {m['cpu']} |",
        f"| Python | {m['python']} |",
        f"| mptun commit | {m['commit']} |",
        f"| OpenVPN | {m['openvpn']} |",
        f"| iperf3 | {m['iperf3']} |",
        f"| command | `{m['command']}` |",
        f"| runs | {m['runs']} per figure; iperf3 tests {m['duration']} s, echo {m['echo_duration']} s |",
    ]


def section_single_path(report: Report) -> list[str]:
    return [
        "## Single path (foundation)",
        "",
        "Two namespaces joined by one veth link (MTU 1500); traffic goes from the client",
        "namespace to the server namespace: `raw` to the server's underlay address,",
        "`openvpn` and `mptun` to the server's tunnel address.",
        "Data ciphers: " + ", ".join(f"{s} {c}" for s, c in report.ciphers.items()) + ".",
        "",
        *figures_table(report),
        "",
        "### Targets (foundation issue)",
        "",
        *targets_table(report),
    ]


def section_method(report: Report) -> list[str]:
    return [
        "## Method",
        "",
        "- TCP: `iperf3 -t D` client -> server, bits/s as received.",
        f"- UDP: `iperf3 -u -b 0 -l {SMALL}` and `-l {LARGE}` (unlimited rate), received packets/s =",
        "  (packets - lost) / seconds from the receiver's report; loss is mostly the TUN queue",
        "  or the socket buffer in front of whichever process is the bottleneck.",
        f"- CPU per packet: utime + stime (/proc/PID/stat, {_CLK_TCK} Hz ticks) of each side's tunnel",
        f"  process during the UDP {SMALL} B test, divided by the packets that side handled: the",
        "  client TUN's tx_packets (read by the client) and the server TUN's rx_packets (written",
        "  by the server).  Both tunnels are single processes; iperf3 shares the same cores.",
        "  A TUN write runs the kernel's receive path for the inner packet in the writer's",
        "  context, so the server side includes delivering it to the receiving socket.",
        f"- RTT: a Python UDP echo, {ECHO_SIZE}-byte datagrams at {ECHO_RATE:g}/s with sequence number",
        "  and `perf_counter` timestamp; p50/p99 by nearest rank; lost = not echoed within",
        f"  {ECHO_GRACE:g} s after the last send.",
        "- OpenVPN: UDP, `dev tun`, `cipher`/`data-ciphers AES-256-GCM`, TLS with the same ECDSA",
        "  P-256 certificates as mptun, `dh none`, `disable-dco` (user space like mptun),",
        "  `topology subnet` in 100.65.0.0/24, `--verb 1`, defaults otherwise",
        "  (tun-mtu 1500, mssfix 1492).",
        "- mptun: `mptun server`/`mptun client` via TunnelStack, `log_level = \"info\"`,",
        "  defaults otherwise.",
    ]


SECTIONS: list[Callable[[Report], list[str]]] = [section_header, section_single_path, section_method]


def render(report: Report) -> str:
    return "\n".join("\n".join(section(report)) + "\n" for section in SECTIONS)


# --------------------------------------------------------------------------
# Environment and command line
# --------------------------------------------------------------------------

def ensure_tools(binaries: Iterable[str]) -> None:
    """apt-get install the Debian packages of any missing binaries."""
    missing = sorted({APT_PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing:
        return
    progress(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


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
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "commit": _commit(),
        "openvpn": openvpn.openvpn_version() if shutil.which("openvpn") else "not installed",
        "iperf3": _output_of(["iperf3", "--version"]).splitlines()[0] if shutil.which("iperf3") else "-",
        "command": _command(argv),
        "runs": str(args.runs),
        "duration": f"{args.duration:g}",
        "echo_duration": f"{args.echo_duration:g}",
    }


def _setup_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(SETUP_NAMES)}; got {text!r}")
    return [n for n in SETUP_NAMES if n in names]  # canonical order, no duplicates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median reported; default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 test (default 5)")
    p.add_argument("--echo-duration", type=float, default=10.0, help="seconds of UDP echo (default 10)")
    p.add_argument("--only", type=_setup_list, default=list(SETUP_NAMES),
                   help="comma-separated setups to measure (default raw,openvpn,mptun)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"markdown report to (over)write (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    return p


def _echo_main(argv: Sequence[str]) -> int:
    if argv[0] == "echo-server":
        echo_server(int(argv[1]))
    else:
        addr, port, seconds, rate = argv[1], int(argv[2]), float(argv[3]), float(argv[4])
        print(json.dumps(echo_client(addr, port, seconds, rate)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("echo-server", "echo-client"):
        return _echo_main(argv)
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.echo_duration <= 0:
        build_parser().error("--runs, --duration and --echo-duration must be positive")
    if os.geteuid() != 0:
        print("scripts/bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    ensure_tools(["iperf3"] + (["openvpn"] if "openvpn" in args.only else []))
    meta = environment(args, argv)
    started = time.monotonic()
    try:
        runs, ciphers = run_all(args)
    except KeyboardInterrupt:
        progress("interrupted; labs torn down, nothing written")
        return 130
    end_commit = _commit()
    if end_commit != meta["commit"]:  # someone committed or edited tunnel/ meanwhile
        meta["commit"] = f"{meta['commit']} at start, {end_commit} at end"
    report = Report(meta, runs, ciphers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(report))
    progress(f"done in {time.monotonic() - started:.0f} s; wrote {args.output}")
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print("\n".join(section_single_path(report)))
    return 0


def to_json(report: Report) -> dict:
    return {
        "meta": report.meta,
        "ciphers": report.ciphers,
        "runs": report.runs,
        "summary": {s: {k: vars(st) for k, st in m.items()} for s, m in report.stats.items()},
        "ratios": {k: {"mptun/openvpn": report.ratio(k, "mptun", "openvpn"),
                       "mptun/raw": report.ratio(k, "mptun", "raw")} for k in METRIC},
        "added_rtt_p50_ms": {s: report.added_rtt(s) for s in report.runs},
        "targets": [vars(t) for t in foundation_targets(report)],
    }


if __name__ == "__main__":
    sys.exit(main())
