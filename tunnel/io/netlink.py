"""Interface configuration over rtnetlink (pyroute2): addresses, MTU, state, routes.

Called at start-up and when the tunnel's CONFIG changes, never per packet.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class NetlinkErrorMsg(Exception):
    pass


def _index(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise NetlinkErrorMsg(f"no interface named {ifname}")
    return idx[0]


def configure_interface(
    ifname: str,
    addresses: Iterable,
    mtu: int,
    routes: Iterable = (),
) -> None:
    """Set ``ifname``'s MTU and addresses (replacing old ones), bring it up, add routes.

    IPv6 is switched off on the device unless an IPv6 address is among
    ``addresses``: an IPv6-enabled TUN emits link-local chatter (MLD, router
    solicitations) the peer could only count as junk.  With an IPv6 address,
    IPv6 is switched on without a link-local address and without router
    advertisements, so the device has only the tunnel's address.
    """
    try:
        _configure(ifname, list(addresses), mtu, routes)
    except NetlinkError as exc:
        raise NetlinkErrorMsg(f"cannot configure {ifname}: {exc}") from None
    except OSError as exc:  # e.g. the device vanished, or no CAP_NET_ADMIN
        raise NetlinkErrorMsg(f"cannot configure {ifname}: {exc}") from None


def _configure(ifname: str, addresses: list, mtu: int, routes: Iterable) -> None:
    if any(a.version == 6 for a in addresses):
        _enable_ipv6(ifname)
    else:
        _disable_ipv6(ifname)
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        ipr.link("set", index=idx, mtu=mtu)
        wanted = {(str(a.ip), a.network.prefixlen) for a in addresses}
        for msg in ipr.get_addr(index=idx):
            have = (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"])
            if have not in wanted and (msg["family"] == socket.AF_INET or (
                    msg["family"] == socket.AF_INET6 and not have[0].startswith("fe80"))):
                ipr.addr("del", index=idx, address=have[0], prefixlen=have[1])
        present = {(msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]) for msg in ipr.get_addr(index=idx)}
        for ip, plen in wanted - present:
            ipr.addr("add", index=idx, address=ip, prefixlen=plen)
        ipr.link("set", index=idx, state="up")
        for net in routes:
            try:
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx,
                          family=socket.AF_INET6 if net.version == 6 else socket.AF_INET)
            except NetlinkError as exc:
                raise NetlinkErrorMsg(f"route {net} via {ifname}: {exc}") from None


def _disable_ipv6(ifname: str) -> None:
    # a sysctl, not rtnetlink: pyroute2 has no call for it, so write procfs directly
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 in this kernel or namespace: nothing to silence


def _enable_ipv6(ifname: str) -> None:
    """IPv6 on, but no link-local address (addr_gen_mode 1) and no router advertisements."""
    base = f"/proc/sys/net/ipv6/conf/{ifname}/"
    try:
        for key, value in (("addr_gen_mode", "1"), ("accept_ra", "0"), ("disable_ipv6", "0")):
            with open(base + key, "w") as f:
                f.write(value)
    except OSError as exc:
        raise NetlinkErrorMsg(f"cannot enable IPv6 on {ifname}: {exc}") from None


def route_mtu(dst: str) -> Optional[int]:
    """MTU of the interface the kernel would use to reach ``dst`` (None if unknown)."""
    family = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=dst, family=family)
        except NetlinkError:
            return None
        if not routes:
            return None
        mtu = None
        metrics = routes[0].get_attr("RTA_METRICS")
        if metrics is not None:
            mtu = metrics.get_attr("RTAX_MTU")
        if mtu:
            return mtu
        oif = routes[0].get_attr("RTA_OIF")
        links = ipr.get_links(oif) if oif else []
        return links[0].get_attr("IFLA_MTU") if links else None


def interface_mtu(ifname: str) -> int:
    with IPRoute() as ipr:
        return ipr.get_links(_index(ipr, ifname))[0].get_attr("IFLA_MTU")


def address_mtu(address: str) -> Optional[int]:
    """MTU of the interface that holds ``address`` (None for a wildcard or unknown address)."""
    if ipaddress.ip_address(address).is_unspecified:
        return None
    with IPRoute() as ipr:
        for msg in ipr.get_addr(address=address):
            links = ipr.get_links(msg["index"])
            if links:
                return links[0].get_attr("IFLA_MTU")
    return None


def usable_interfaces(exclude: Iterable[str] = ()) -> list[tuple[str, int, str, int]]:
    """(name, index, first IPv4 address, MTU) of each interface that is up and has an address.

    Loopback and the names in ``exclude`` (our own TUN) are left out.
    """
    skip = set(exclude) | {"lo"}
    out = []
    with IPRoute() as ipr:
        addrs: dict[int, str] = {}
        for msg in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(msg["index"], msg.get_attr("IFA_ADDRESS"))
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            up = link["flags"] & 1 and link.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN")
            if name in skip or not up or link["index"] not in addrs:
                continue
            out.append((name, link["index"], addrs[link["index"]], link.get_attr("IFLA_MTU")))
    return out


def reachable_via(dst: str, ifindex: int) -> bool:
    """Does the main routing table have a route through interface ``ifindex`` covering ``dst``?

    (``ip route get ... oif`` is no test: with an output interface given, the
    kernel falls back to treating any destination as on-link.)
    """
    want = ipaddress.ip_address(dst)
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            oifs = {route.get_attr("RTA_OIF")}
            multipath = route.get_attr("RTA_MULTIPATH")
            if multipath:
                oifs |= {nh["oif"] for nh in multipath}
            if ifindex not in oifs:
                continue
            prefix = f"{route.get_attr('RTA_DST') or '0.0.0.0'}/{route['dst_len']}"
            if want in ipaddress.ip_network(prefix, strict=False):
                return True
    return False


RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40


class LinkWatcher:
    """Tells the shell that links, addresses or routes changed (so it rescans).

    A bare NETLINK_ROUTE socket subscribed to the link/address/route groups:
    only its readability is used, the messages are drained unparsed and the
    shell rescans with pyroute2.  (pyroute2 0.9's IPRoute runs its own
    asyncio machinery and cannot be polled from the shell's epoll loop.)
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return n
            except OSError:  # ENOBUFS: we missed messages; a rescan covers them anyway
                return n + 1
            n += 1

    def close(self) -> None:
        self.sock.close()
