"""A multipath lab topology: client, router, server, and N underlay paths.

Why: mptun's point is running over several underlay paths at once, so its
multipath, failover and hot-plug tests need a client with several links whose
quality can be spoiled one by one.  Impairing a link needs a box in the
middle, so the paths do not join client and server directly: they end on a
router, which forwards to the server over one shared link.  The router is
where :mod:`tunnel.lab.impair` applies delay, loss, rate limits and outages,
transparently to whatever tunnel runs between client and server.

Layout (N paths; ``veth<k>a`` / ``veth<k>b`` are :meth:`Lab.link`'s names,
``k`` counts the links of the lab, so the server link is ``veth0``)::

    cli                          rtr                            srv
    veth1b 198.18.0.2/30 ---- veth1a 198.18.0.1/30
    veth2b 198.18.1.2/30 ---- veth2a 198.18.1.1/30  veth0a 198.18.250.1/30 ---- veth0b 198.18.250.2/30
    ...    198.18.i.2/30 ---- ...    198.18.i.1/30

- path ``i`` (0 <= i < 250) is the subnet ``198.18.i.0/30``; the router has
  ``.1``, the client ``.2``;
- the router forwards (``ip_forward=1``) with reverse-path filtering off
  everywhere (the delay line re-injects packets on TUN devices, and the client
  receives on path ``i`` replies whose best reverse route is path 0);
- the client has one route to the whole underlay ``198.18.0.0/15`` per path,
  ``via 198.18.i.1 dev <path i> metric 100+i``.  A socket bound to path ``i``'s
  device (``SO_BINDTODEVICE``) therefore reaches the server through path
  ``i``; an unbound socket uses path 0.  A source rule (``from 198.18.i.2
  lookup 100+i``, the same route in table ``100+i``) does the same for sockets
  bound to path ``i``'s address;
- the server routes ``198.18.0.0/15`` back via the router.  Neither host gets a
  default route, so a tunnel is free to install one.

App layer only, like the rest of :mod:`tunnel.lab`.

``python -m tunnel.lab.topology probe ...`` is the paced UDP echo client the
impairment tests and measurements run inside the namespaces (:func:`probe`).
"""
from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from tunnel.lab.netns import UNDERLAY, Host, Lab

SERVER_SUBNET = "198.18.250.0/30"  # router .1, server .2
MAX_PATHS = 250  # path subnets 198.18.0.0/30 .. 198.18.249.0/30 stay clear of SERVER_SUBNET
CLIENT_METRIC = 100  # path i's route has metric CLIENT_METRIC + i (path 0 preferred)
CLIENT_TABLE = 100  # path i's source-rule table is CLIENT_TABLE + i


def path_subnet(index: int) -> str:
    """The underlay subnet of path ``index``: ``198.18.<index>.0/30``."""
    if not 0 <= index < MAX_PATHS:
        raise ValueError(f"path index {index} outside 0..{MAX_PATHS - 1}")
    return f"198.18.{index}.0/30"


@dataclass(frozen=True)
class Path:
    """One underlay path: a veth link between client and router."""

    index: int
    client_ifname: str
    client_addr: str
    router_ifname: str
    router_addr: str
    subnet: str


class MultipathTopology:
    """Hosts ``cli``, ``rtr``, ``srv`` in ``lab`` joined as described in the module doc.

    ``lab`` owns everything (namespaces, processes); closing it tears the
    topology down.  ``mtu`` applies to every link.
    """

    def __init__(self, lab: Lab, n_paths: int = 2, mtu: int = 1500) -> None:
        if n_paths < 1:
            raise ValueError("a topology needs at least one path")
        self.lab = lab
        self.mtu = mtu
        self.client = lab.add_host("cli")
        self.router = lab.add_host("rtr")
        self.server = lab.add_host("srv")
        for host in (self.client, self.router):
            _disable_rp_filter(host)  # before the links, so their veths inherit it
        self.router.sysctl("net.ipv4.ip_forward", 1)
        server_link = lab.link(self.router, self.server, SERVER_SUBNET, mtu=mtu)
        self.router_server_ifname = server_link.a_ifname
        self.router_server_addr = server_link.a_addr
        self.server_ifname = server_link.b_ifname
        self.server_addr = server_link.b_addr
        with self.server.ipr() as ipr:
            ipr.route("add", dst=str(UNDERLAY), gateway=self.router_server_addr)
        self.paths: list[Path] = []
        for _ in range(n_paths):
            self.add_path()

    def add_path(self) -> Path:
        """Add one more client<->router link (e.g. for hot-plug tests) and return it."""
        index = len(self.paths)
        subnet = path_subnet(index)
        link = self.lab.link(self.router, self.client, subnet, mtu=self.mtu)
        path = Path(index, link.b_ifname, link.b_addr, link.a_ifname, link.a_addr, subnet)
        self.paths.append(path)
        self._add_client_routes(path)
        with self.client.ipr() as ipr:
            ipr.rule("add", src=path.client_addr, src_len=32, table=CLIENT_TABLE + index,
                     priority=CLIENT_TABLE + index)
        return path

    def set_path_link(self, index: int, up: bool) -> None:
        """Bring the client side of path ``index`` down or up.

        The kernel drops a device's routes when it goes down; they are put back
        when it comes up again.
        """
        path = self.paths[index]
        self.client.set_link(path.client_ifname, up=up)
        if up:
            self._add_client_routes(path)

    def _add_client_routes(self, path: Path) -> None:
        with self.client.ipr() as ipr:
            oif = ipr.link_lookup(ifname=path.client_ifname)[0]
            for table, metric in ((254, CLIENT_METRIC + path.index), (CLIENT_TABLE + path.index, 0)):
                ipr.route("replace", dst=str(UNDERLAY), gateway=path.router_addr, oif=oif,
                          table=table, priority=metric)


def _disable_rp_filter(host: Host) -> None:
    for scope in ("all", "default"):
        host.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)


# --------------------------------------------------------------------------
# UDP probe: a paced, timestamping echo client (the echo server is bench's)
# --------------------------------------------------------------------------

_PROBE = struct.Struct("!I")  # sequence number; timestamps stay with the sender


def probe(addr: str, port: int, count: int, rate: float, size: int = 64,
          device: Optional[str] = None, grace: float = 1.0) -> dict:
    """Send ``count`` datagrams at ``rate``/s to an echo server; time the echoes.

    With ``device`` the socket is bound to that interface (``SO_BINDTODEVICE``),
    i.e. to one path.  Returns ``{"sent": [t, ...], "recv": [[seq, t], ...]}``:
    the ``time.monotonic()`` of each sending (index = sequence number) and of
    each echo, in arrival order (so reordering shows), duplicates included.
    CLOCK_MONOTONIC is shared by all namespaces, so these instants compare
    directly with the delay line's outage schedule.
    """
    interval = 1.0 / rate
    sent: list[float] = []
    recv: list[list] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.setblocking(False)  # not connected: a path without a route just loses datagrams
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if len(sent) < count and now >= start + len(sent) * interval:
                sent.append(now)
                try:
                    sock.sendto(_PROBE.pack(len(sent) - 1).ljust(size, b"\0"), (addr, port))
                except OSError:  # no route (path down): this datagram is lost
                    pass
                continue
            wake = start + len(sent) * interval if len(sent) < count else sent[-1] + grace
            if len(sent) == count and (now >= wake or len(recv) >= count):
                break
            if select.select([sock], [], [], max(0.0, wake - now))[0]:
                _drain(sock, (addr, port), recv)
    return {"sent": sent, "recv": recv}


def _drain(sock: socket.socket, peer: tuple[str, int], recv: list[list]) -> None:
    while True:
        try:
            data, sender = sock.recvfrom(65535)
        except BlockingIOError:
            return
        if sender == peer and len(data) >= _PROBE.size:
            recv.append([_PROBE.unpack_from(data)[0], time.monotonic()])


def probe_argv(addr: str, port: int, count: int, rate: float, size: int = 64,
               device: Optional[str] = None, grace: float = 1.0) -> list[str]:
    """The command line running :func:`probe` in a namespace (``Host.run``); prints its JSON."""
    argv = [sys.executable, "-m", "tunnel.lab.topology", "probe", addr, str(port), str(count),
            str(rate), "--size", str(size), "--grace", str(grace)]
    return argv + (["--device", device] if device else [])


def echo_server_argv(port: int) -> list[str]:
    """The command line of a UDP echo server on ``port`` (for ``Host.popen``): bench's."""
    return [sys.executable, "-m", "tunnel.lab.bench", "echo-server", str(port)]


def rtts_ms(result: dict) -> list[float]:
    """Round-trip times (ms) of a :func:`probe` result, in sequence order, first echo only."""
    first: dict[int, float] = {}
    for seq, t in result["recv"]:
        first.setdefault(seq, t)
    return [(first[s] - result["sent"][s]) * 1e3 for s in sorted(first)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.lab.topology")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cli = sub.add_parser("probe", help="paced UDP echo client; prints JSON")
    cli.add_argument("addr")
    cli.add_argument("port", type=int)
    cli.add_argument("count", type=int)
    cli.add_argument("rate", type=float, help="datagrams per second")
    cli.add_argument("--size", type=int, default=64)
    cli.add_argument("--device", help="bind to this interface (SO_BINDTODEVICE)")
    cli.add_argument("--grace", type=float, default=1.0, help="seconds to wait after the last send")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.addr, args.port, args.count, args.rate, args.size,
                           args.device, args.grace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
