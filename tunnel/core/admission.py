"""Admission at the server: which senders may cost it a handshake, and who makes room.

Why a module of its own: a handshake that got past the cookie (so its source address
is real) costs the server a key exchange and a signature, and until it completes it
holds one of ``max_handshakes`` half-open slots.  A sender with no certificate can
pass the cookie check and then go silent.  If the oldest slot simply waited out its
lifetime, a few hundred such hellos would lock every real client out (new tunnels,
new paths, NAT-rebinding recovery) for as long as the flood lasts.  So:

- **Rates are counted per source prefix**, not per address: a /24 for IPv4, a /64
  for IPv6 (a host rotates freely inside its /64, and one IPv4 host rarely owns more
  than a /24).  :class:`PrefixRateLimiter` is a token bucket per prefix.
- **Half-open slots are shared fairly between prefixes.**  When the table is full, a
  new handshake from a prefix that holds fewer slots than the busiest prefix takes
  the *oldest* slot of the busiest prefix; one from the busiest prefix itself is
  refused.  A real client from anywhere else therefore always gets a slot at once,
  however many slots a flood holds, and the flood's own slots churn.  A slot lives
  at most :data:`HALF_OPEN_TIMEOUT` (a real handshake needs one round trip, or a
  few retransmissions on a lossy path).
- **Refusals are logged at a bounded rate** (:class:`LogLimiter`): one line per
  prefix per :data:`REFUSAL_LOG_INTERVAL` and :data:`REFUSAL_LOG_BURST` lines in all
  per interval; the rest are counted (status and /metrics) and the next line that is
  logged says how many were not.

Sans-IO: plain data, ``now`` passed in.
"""

from __future__ import annotations

import ipaddress
from typing import Hashable, Optional

HANDSHAKE_RATE = 10.0  # verified handshakes per second per source prefix (burst: twice that)
MAX_HANDSHAKES = 256  # half-open (verified, not yet established) handshakes at once, all sources
HALF_OPEN_TIMEOUT = 4.0  # seconds the server keeps a handshake that has not completed
HANDSHAKE_SOURCES = 4096  # source prefixes tracked for the handshake rate (least recent forgotten)
PREFIX_V4 = 24  # sources inside one IPv4 /24 count as one for rates and fair shares
PREFIX_V6 = 64  # ... and inside one IPv6 /64
HELLO_DEADLINE = 5.0  # an established path must HELLO/JOIN within this (the client sends it at once)
REFUSAL_LOG_INTERVAL = 10.0  # at most one refusal line per prefix this often ...
REFUSAL_LOG_BURST = 10  # ... and at most this many refusal lines in all per interval


def source_prefix(ip: str) -> str:
    """The prefix a source address is counted under (``198.51.100.0/24``, ``2001:db8:1:2::/64``);
    the address itself if it does not parse (never raises: addresses come from the kernel)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    length = PREFIX_V4 if addr.version == 4 else PREFIX_V6
    return str(ipaddress.ip_network(f"{addr}/{length}", strict=False))


class PrefixRateLimiter:
    """A token bucket per source prefix (``rate`` per second, burst twice that).  State is
    kept only for senders whose cookie was valid, and for at most ``sources`` prefixes."""

    def __init__(self, rate: float, sources: int = HANDSHAKE_SOURCES):
        self.rate = rate
        self.sources = sources
        self._buckets: dict[str, tuple[float, float]] = {}  # prefix -> (tokens, at); insertion = recency

    def allow(self, prefix: str, now: float) -> bool:
        burst = 2 * self.rate
        tokens, at = self._buckets.pop(prefix, (burst, now))
        tokens = min(burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[prefix] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.sources:
            del self._buckets[next(iter(self._buckets))]
        return allowed


class HalfOpenTable:
    """The handshakes in progress, oldest first, with a count per source prefix."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: dict[Hashable, str] = {}  # addr -> prefix; insertion order = age
        self._per_prefix: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, addr: Hashable) -> bool:
        return addr in self._entries

    def add(self, addr: Hashable, prefix: str) -> None:
        if addr in self._entries:
            return
        self._entries[addr] = prefix
        self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1

    def discard(self, addr: Hashable) -> None:
        prefix = self._entries.pop(addr, None)
        if prefix is not None:
            n = self._per_prefix[prefix] - 1
            if n:
                self._per_prefix[prefix] = n
            else:
                del self._per_prefix[prefix]

    def count(self, prefix: str) -> int:
        return self._per_prefix.get(prefix, 0)

    def victim(self, prefix: str) -> Optional[Hashable]:
        """The table is full and a handshake from ``prefix`` wants a slot: the oldest slot of
        the busiest prefix if ``prefix`` holds fewer than that one, else None (refuse it)."""
        if not self._per_prefix:
            return None
        busiest = max(self._per_prefix.values())
        if self.count(prefix) >= busiest:
            return None
        for addr, p in self._entries.items():  # oldest first
            if self._per_prefix[p] == busiest:
                return addr
        return None

    def addresses(self) -> list:
        return list(self._entries)


class LogLimiter:
    """Rate limit for log lines about refused peers (the counters count every refusal)."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, burst: int = REFUSAL_LOG_BURST,
                 sources: int = HANDSHAKE_SOURCES):
        self.interval = interval
        self.burst = burst
        self.sources = sources
        self._last: dict[str, float] = {}  # prefix -> when its last line was logged; insertion = recency
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0  # lines not logged since the last one that was (reported with it)
        self.total_suppressed = 0

    def allow(self, prefix: str, now: float) -> bool:
        """True: log this refusal (then read and reset ``suppressed``); False: count it only."""
        if now - self._window_start >= self.interval:
            self._window_start, self._in_window = now, 0
        last = self._last.get(prefix)
        if (last is not None and now - last < self.interval) or self._in_window >= self.burst:
            self.suppressed += 1
            self.total_suppressed += 1
            return False
        self._last.pop(prefix, None)
        self._last[prefix] = now
        if len(self._last) > self.sources:
            del self._last[next(iter(self._last))]
        self._in_window += 1
        return True

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
