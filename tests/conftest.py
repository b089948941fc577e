"""Shared pytest fixtures: a test PKI and a wire tap for the in-memory core lab
(tests/corelab.py), and network-namespace labs (see tunnel/lab/netns.py).

Tests marked ``netns`` are skipped, with the reason, unless we are root and
``ip netns`` works.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

import pytest

import time

from tunnel.app.certs import create_ca, issue_client, issue_server
from tunnel.lab.netns import Host, Lab, Link, unique_prefix, wait_for
from tunnel.lab.stack import PORT, SERVER_INNER, TunnelStack
from tunnel.lab.stream import run_stream

from tests import corelab
from tests.wiretap import Tap

STREAM_PORT = 5004


@cache
def _netns_unavailable() -> str | None:
    """Why netns tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "netns tests need root"
    if shutil.which("ip") is None:
        return "netns tests need iproute2 ('ip' not found)"
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"'ip netns' unavailable: {res.stderr.strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("netns") and (reason := _netns_unavailable()):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA with server "srv", clients "alice" and "bob", and "mallory" of another CA (other/)."""
    d = tmp_path_factory.mktemp("pki")
    create_ca(d)
    issue_server(d, "srv")
    issue_client(d, "alice")
    issue_client(d, "bob")  # a second client of the same CA
    create_ca(d / "other", name="Other CA")
    issue_client(d / "other", "mallory")
    return d


@pytest.fixture
def plain() -> Iterator[Tap]:
    """A wire tap on the in-memory lab (tests/corelab.py): every record each side decrypted.
    Read it with ``corelab.frames_seen`` or the Tap's own ``frames``/``seen``."""
    tap = corelab.TAP["tap"] = Tap()
    yield tap
    corelab.TAP["tap"] = None


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """An empty Lab with a unique prefix taken from the test name; always closed."""
    with Lab(unique_prefix(request.node.name.removeprefix("test_"))) as the_lab:
        yield the_lab


@dataclass
class TwoHosts:
    lab: Lab
    client: Host
    server: Host
    link: Link  # a = server, b = client

    @property
    def server_addr(self) -> str:
        return self.link.a_addr

    @property
    def client_addr(self) -> str:
        return self.link.b_addr


@pytest.fixture
def two_hosts(lab: Lab) -> TwoHosts:
    """Hosts "srv" and "cli" joined by one veth link in 198.18.0.0/30.

    srv (link side a) is 198.18.0.1, cli (side b) is 198.18.0.2; also available
    as ``.server_addr`` / ``.client_addr``.
    """
    server, client = lab.add_host("srv"), lab.add_host("cli")
    return TwoHosts(lab, client, server, lab.link(server, client, "198.18.0.0/30"))


@pytest.fixture
def tunnel_stack(two_hosts: TwoHosts, tmp_path):
    """A running mptun server (in srv) and client (in cli) over the two_hosts link.

    Not started: the test may set overrides first; call ``.start()``.  Always stopped.
    """
    from tunnel.lab.stack import TunnelStack

    stack = TunnelStack(two_hosts.server, two_hosts.client, two_hosts.server_addr, workdir=tmp_path / "stack")
    stack.hosts = two_hosts  # type: ignore[attr-defined]
    try:
        yield stack
    finally:
        stack.stop()


class Multipath:
    """Client and server namespaces joined by one veth link per path (198.18.4i.0/30,
    server .1, client .2); the server listens on each link address and the client is
    told all of them, so each client interface gets exactly one path (the only server
    address it has a route to).  ``stack`` is the TunnelStack; set overrides, then start."""

    def __init__(self, lab, tmp_path, n_paths: int = 2, mode: str = "duplicate"):
        self.lab = lab
        self.server = lab.add_host("srv")
        self.client = lab.add_host("cli")
        self.links = [self.add_link(i) for i in range(n_paths)]
        self.stack = TunnelStack(self.server, self.client, self.links[0].a_addr, workdir=tmp_path / "stack")
        listen = [f"{l.a_addr}:{PORT}" for l in self.links] + [f"198.18.{4 * i}.1:{PORT}" for i in range(n_paths, 3)]
        self.stack.server_overrides["listen"] = listen
        self.stack.client_overrides["server"] = listen
        self.stack.client_overrides["mode"] = mode

    def add_link(self, i: int):
        return self.lab.link(self.server, self.client, f"198.18.{4 * i}.0/30")

    def start(self) -> "Multipath":
        # addresses for links that may be hot-plugged later must exist on the server at start
        for i in range(len(self.links), 3):
            self.server.run(["ip", "addr", "add", f"198.18.{4 * i}.1/32", "dev", "lo"])
        self.stack.start()
        self.wait_paths(len(self.links))
        return self

    def client_paths(self) -> list[dict]:
        return self.stack.client_status()["paths"]

    def server_paths(self) -> list[dict]:
        tunnels = self.stack.server_status()["tunnels"]
        return tunnels[0]["paths"] if tunnels else []

    def wait_paths(self, n: int, timeout: float = 10.0) -> None:
        wait_for(
            lambda: sum(p["joined"] and p["state"] == "up" for p in self.client_paths()) == n
            and len(self.server_paths()) == n,
            timeout,
            message=f"expected {n} joined paths; client: {self.client_paths()}",
        )

    def blackhole(self, i: int) -> None:
        """Drop everything on link i, both ways (from the client namespace)."""
        ifname = self.links[i].b_ifname
        rules = (
            "add table inet bh\n"
            "add chain inet bh out { type filter hook output priority 0; }\n"
            "add chain inet bh in { type filter hook input priority 0; }\n"
            f"add rule inet bh out oifname {ifname} drop\n"
            f"add rule inet bh in iifname {ifname} drop\n"
        )
        self.nft(self.client, rules)

    def random_loss(self, percent: int) -> None:
        """Drop ``percent`` % of the UDP datagrams leaving on every link, both ends, independently."""
        for host, is_client in ((self.client, True), (self.server, False)):
            rules = ["add table inet loss", "add chain inet loss out { type filter hook output priority 0; }"]
            for link in self.links:
                ifname = link.b_ifname if is_client else link.a_ifname
                rules.append(f"add rule inet loss out oifname {ifname} meta l4proto udp numgen random mod 100 < {percent} drop")
            self.nft(host, "\n".join(rules) + "\n")

    def nft(self, host, rules: str) -> None:
        path = self.stack.workdir / f"nft-{host.name}-{time.monotonic_ns()}.rules"
        path.write_text(rules)
        host.run(["nft", "-f", str(path)])

    def stream(self, rate: float, count: int, during=None, size: int = 200, tos=None, full: bool = False):
        return run_stream(
            self.client, self.server, SERVER_INNER, STREAM_PORT, rate, size, count, self.stack.workdir,
            during=during, tos=tos, full=full,
        )


@pytest.fixture
def multipath(lab, tmp_path):
    made: list[Multipath] = []

    def make(n_paths: int = 2, mode: str = "duplicate") -> Multipath:
        mp = Multipath(lab, tmp_path, n_paths, mode)
        made.append(mp)
        return mp

    yield make
    for mp in made:
        mp.stack.stop()
