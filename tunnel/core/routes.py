"""Server route table: inner destination -> tunnel, with pending routes.

Each client's inner address is a host route; prefixes a client may route
(its LAN, from the server config) are prefix routes; lookup is longest-prefix
match (host routes by dict, then the few prefixes, longest first).  IPv4 and
IPv6 share the table: a destination is 4 or 16 bytes, and each family has its
own prefix list.

A tunnel that exists but has no path (its client is between paths) is a
*pending* route: packets for it wait in a small bounded queue (like the Linux
multicast pending queue, 3 packets by default) and expire after a while; when
a path comes back the queue is flushed in order.  Sans-IO: ``now`` is passed in.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Generic, Hashable, Optional, TypeVar

T = TypeVar("T", bound=Hashable)

PENDING_SIZE = 3
PENDING_EXPIRY = 10.0


class RouteTable(Generic[T]):
    def __init__(self, pending_size: int = PENDING_SIZE, pending_expiry: float = PENDING_EXPIRY):
        self.pending_size = pending_size
        self.pending_expiry = pending_expiry
        self._hosts: dict[bytes, T] = {}
        self._prefixes: list[tuple[int, int, int, T]] = []  # (prefixlen, network int, mask int, target), longest first
        self._prefixes6: list[tuple[int, int, int, T]] = []  # the same for IPv6
        self._pending: dict[T, deque] = {}
        self.pending_dropped = 0  # queue full
        self.pending_expired = 0

    # -- routes -------------------------------------------------------
    def add(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network, target: T) -> None:
        if prefix.prefixlen == prefix.max_prefixlen:
            self._hosts[prefix.network_address.packed] = target
            return
        entries = self._prefixes if prefix.version == 4 else self._prefixes6
        entries[:] = [e for e in entries if (e[0], e[1]) != (prefix.prefixlen, int(prefix.network_address))]
        entries.append((prefix.prefixlen, int(prefix.network_address), int(prefix.netmask), target))
        entries.sort(key=lambda e: -e[0])

    def remove(self, target: T) -> None:
        """Drop every route (and the pending queue) of ``target``."""
        self._hosts = {k: v for k, v in self._hosts.items() if v is not target}
        self._prefixes = [e for e in self._prefixes if e[3] is not target]
        self._prefixes6 = [e for e in self._prefixes6 if e[3] is not target]
        self.pending_expired += len(self._pending.pop(target, ()))  # they will never be delivered

    def lookup(self, dst: bytes) -> Optional[T]:
        """The target for a 4-byte IPv4 or 16-byte IPv6 destination, or None."""
        target = self._hosts.get(dst)
        prefixes = self._prefixes if len(dst) == 4 else self._prefixes6
        if target is not None or not prefixes:
            return target
        value = int.from_bytes(dst, "big")
        for _, net, mask, target in prefixes:
            if value & mask == net:
                return target
        return None

    def __len__(self) -> int:
        return len(self._hosts) + len(self._prefixes) + len(self._prefixes6)

    # -- pending routes -----------------------------------------------
    def enqueue(self, target: T, packet: bytes, now: float) -> bool:
        """Hold ``packet`` until ``target`` has a path; False (and counted) if the queue is full."""
        queue = self._pending.setdefault(target, deque())
        self._expire_queue(queue, now)
        if len(queue) >= self.pending_size:
            self.pending_dropped += 1
            return False
        queue.append((now + self.pending_expiry, packet))
        return True

    def flush(self, target: T, now: float) -> list[bytes]:
        """The packets still valid for ``target``, in arrival order (the queue empties)."""
        queue = self._pending.pop(target, None)
        if not queue:
            return []
        self._expire_queue(queue, now)
        return [pkt for _, pkt in queue]

    def expire(self, now: float) -> None:
        for target, queue in list(self._pending.items()):
            self._expire_queue(queue, now)
            if not queue:
                del self._pending[target]

    def _expire_queue(self, queue: deque, now: float) -> None:
        while queue and queue[0][0] <= now:
            queue.popleft()
            self.pending_expired += 1

    def next_expiry(self) -> Optional[float]:
        """When the oldest queued packet expires (None: nothing queued)."""
        return min((q[0][0] for q in self._pending.values() if q), default=None)

    def pending(self, target: T) -> int:
        return len(self._pending.get(target, ()))
