"""What a benchmark run sends and where: the plan (runs, durations, stream sizes), the
section and setup names, and the ports and payload sizes that the setups, the measurements
and the report all use.  It is kept apart so the report can describe a run without
importing the code that runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[3]
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
SECTION_NAMES = ("single", "loss", "failover", "aggregation", "unequal", "reorder", "cpu", "server", "fleet",
                 "hostile", "marking", "webrtc")


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
    unequal_duration: float = 10.0  # seconds of each TCP flow of the unequal-paths section (its UDP stream: half)
    cpu_pps: int = 5000  # offered load of the CPU test ...
    cpu_size: int = LARGE  # ... in datagrams of this size
    webrtc_seconds: float = 10.0  # length of each WebRTC call


QUICK = Plan(runs=1, duration=2.0, echo_duration=3.0, loss_count=1000, failover_count=250, webrtc_seconds=6.0,
             unequal_duration=4.0)
