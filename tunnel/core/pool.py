"""Inner address assignment: static addresses per client name, the rest from a pool.

A client that comes back gets the address it had (the lease is kept by name
until the pool runs dry, then the oldest idle lease is reused).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional


class PoolExhausted(Exception):
    pass


class _Leases:
    """Leases by client name: static first, then the one the name had, then a new one."""

    network: ipaddress._BaseNetwork
    static: dict
    _leases: dict
    _in_use: set

    def lease(self, name: str):
        if name in self.static:
            addr = self.static[name]
        elif name in self._leases:
            addr = self._leases[name]
        else:
            addr = self._take()
            self._leases[name] = addr
        self._in_use.add(name)
        return ipaddress.ip_interface(f"{addr}/{self.network.prefixlen}")

    def release(self, name: str) -> None:
        """The client is gone; its address stays reserved for it while the pool lasts."""
        self._in_use.discard(name)

    def _take(self):
        addr = self._next_free()
        if addr is not None:
            return addr
        for name in list(self._leases):  # oldest idle lease first (dicts keep insertion order)
            if name not in self._in_use:
                return self._leases.pop(name)
        raise PoolExhausted(f"address pool {self.network} is exhausted")


class AddressPool(_Leases):
    def __init__(
        self,
        server: ipaddress.IPv4Interface,
        static: Optional[dict[str, ipaddress.IPv4Address]] = None,
        first: Optional[ipaddress.IPv4Address] = None,
        last: Optional[ipaddress.IPv4Address] = None,
    ):
        self.server = server
        self.network = server.network
        self.static = dict(static or {})
        hosts = self.network.hosts()
        lo = first or self.network.network_address + 1
        hi = last or self.network.broadcast_address - 1
        reserved = set(self.static.values()) | {server.ip}
        self._free = [h for h in hosts if lo <= h <= hi and h not in reserved]
        self._leases: dict[str, ipaddress.IPv4Address] = {}  # name -> address, kept after disconnect
        self._in_use: set[str] = set()

    def _next_free(self) -> Optional[ipaddress.IPv4Address]:
        return self._free.pop(0) if self._free else None

    @staticmethod
    def parse_static(items: Iterable[tuple[str, str]]) -> dict[str, ipaddress.IPv4Address]:
        return {name: ipaddress.IPv4Address(addr) for name, addr in items}


class AddressPool6(_Leases):
    """IPv6 inner addresses: one /128 per client from ``network`` (e.g. a ULA /64).

    The server has the prefix's first address (``::1``); clients get the next
    free ones in order, or their static address.  Like :class:`AddressPool`, a
    lease is kept by name, so a returning client gets the same address; the
    prefix is usually far too large to run dry, but a small one reuses the
    oldest idle lease.  Client addresses are given out with the prefix's
    length (``fd00:6d70::2/64``) so the client routes the whole prefix into
    the tunnel, as with IPv4.
    """

    def __init__(self, network: ipaddress.IPv6Network, static: Optional[dict[str, ipaddress.IPv6Address]] = None):
        if network.num_addresses < 4:
            raise ValueError(f"{network} has no room for clients")
        self.network = network
        self.server = ipaddress.IPv6Interface(f"{network.network_address + 1}/{network.prefixlen}")
        self.static = dict(static or {})
        self._reserved = set(self.static.values()) | {self.server.ip}
        self._next = int(network.network_address) + 2
        self._last = int(network.broadcast_address)
        self._leases: dict[str, ipaddress.IPv6Address] = {}
        self._in_use: set[str] = set()

    def _next_free(self) -> Optional[ipaddress.IPv6Address]:
        while self._next <= self._last:
            addr = ipaddress.IPv6Address(self._next)
            self._next += 1
            if addr not in self._reserved:
                return addr
        return None
