"""Shared pytest fixtures: network-namespace labs (see tunnel/lab/netns.py).

Tests marked ``netns`` are skipped, with the reason, unless we are root and
``ip netns`` works.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from typing import Iterator

import pytest

from tunnel.lab.netns import Host, Lab, Link, unique_prefix


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
