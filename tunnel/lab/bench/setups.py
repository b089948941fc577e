"""The ways of carrying traffic from the client to the server of a lab topology that the
bench compares: the raw routed link (and MPTCP over it), OpenVPN, wireguard-go, openconnect
against ocserv, and mptun (with and without ``keep_warm``).

Each setup is a small class that only knows how to start and stop itself, which address to
send to, which processes do the tunnelling, which TUN devices they use and which cipher
they negotiated; one driver (:mod:`tunnel.lab.bench.measure`) measures them all the same way."""

from __future__ import annotations

import json
import shutil
import subprocess
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import ClassVar, Iterator, Optional

from tunnel.lab import mptcp, openconnect, openvpn, wireguard
from tunnel.lab.bench.results import progress
from tunnel.lab.impair import Impairments
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.stack import SERVER_INNER, TunnelStack
from tunnel.lab.topology import MultipathTopology


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
    """mptun with ``keep_warm = false`` on both ends: what tunnel/core/warm.py is worth."""

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
