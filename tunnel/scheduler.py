"""Which paths carry the next packet.

Modes (per traffic class; one mode for all traffic until the policy issue):
- ``duplicate``: every established path, down ones included (hitless failover,
  for media): a path judged down by lost probes may still deliver copies, and a
  copy on a dead path costs nothing, while skipping a live one costs packets;
- ``redundant``: the best ``k`` paths;
- ``lowest-rtt``: one path, the one with the lowest smoothed RTT; it changes
  only when another is clearly better (10 %) or the current one fails;
- ``balance``: one path per packet, smooth weighted round robin; paths share
  equally until one shows congestion loss, then congested paths are weighted
  by what they deliver (rate x (1 - loss)) and the others get at least as much
  plus a probing margin (a path's measured rate is what it was given, not what
  it could carry, so weighting loss-free paths by it would starve the path that
  happened to get less); ``pin_flows`` keeps a 5-tuple on one path;
- ``backup``: the first usable path in priority order.

"Usable" means up; if no path is up, degraded ones; if none is, down ones (a
packet sent on a path that may be dead beats a packet dropped for sure).
Per-packet work is small: the candidate set and weights are recomputed in
:meth:`refresh` (on a tick or a state change), not per packet.  Pure: paths
are any objects with ``state``, ``srtt``, ``loss``, ``rate`` and ``priority``.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

from tunnel.estimator import DEGRADED, DOWN, UP

MODES = ("duplicate", "redundant", "lowest-rtt", "balance", "backup")
SWITCH_MARGIN = 0.9  # lowest-rtt: another path must be 10 % faster to take over
RATE_FLOOR = 125_000.0  # 1 Mbit/s: a path with no measured rate yet still gets a share
PROBE_BOOST = 1.25  # an uncongested path gets 25 % more than it delivered, to find its capacity
CONGESTED = 0.05  # smoothed loss from which a path counts as congested (random loss stays below)


class SchedulerError(ValueError):
    pass


def _usable(paths: Sequence) -> list:
    for wanted in (UP, DEGRADED, DOWN):
        chosen = [p for p in paths if p.state == wanted]
        if chosen:
            return chosen
    return []


def _score(p) -> float:
    """Lower is better: RTT inflated by loss (unknown RTT counts as 1 s)."""
    rtt = p.srtt if p.srtt is not None else 1.0
    return rtt * (1.0 + 10.0 * p.loss)


class Scheduler:
    def __init__(self, mode: str = "duplicate", redundancy: int = 2, pin_flows: bool = False):
        if mode not in MODES:
            raise SchedulerError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.redundancy = max(1, redundancy)
        self.pin_flows = pin_flows
        self._chosen: list = []  # what duplicate/redundant/lowest-rtt/backup send on
        self._wrr: list = []  # balance: [path, weight, current]
        self._total = 0.0
        self._current = None  # lowest-rtt: the path in use

    def refresh(self, paths: Sequence) -> None:
        """Recompute the candidates from the paths' states and estimates."""
        usable = _usable(paths)
        mode = self.mode
        if mode == "duplicate":
            self._chosen = [p for p in paths if p.state in (UP, DEGRADED, DOWN)]
        elif mode == "redundant":
            live = [p for p in paths if p.state in (UP, DEGRADED)]
            self._chosen = sorted(live or usable, key=lambda p: (p.state != UP, _score(p)))[: self.redundancy]
        elif mode == "lowest-rtt":
            self._chosen = [self._pick_lowest_rtt(usable)] if usable else []
        elif mode == "backup":
            self._chosen = sorted(usable, key=lambda p: p.priority)[:1]
        else:
            self._refresh_weights(usable)

    def _pick_lowest_rtt(self, usable: list):
        best = min(usable, key=_score)
        cur = self._current
        if cur is not None and cur in usable and _score(best) > SWITCH_MARGIN * _score(cur):
            return cur
        self._current = best
        return best

    def _refresh_weights(self, usable: list) -> None:
        old = {id(entry[0]): entry[2] for entry in self._wrr}
        self._wrr = []
        congested = [max(p.rate, RATE_FLOOR) * (1.0 - p.loss) for p in usable if p.loss >= CONGESTED]
        floor = max(congested, default=0.0)
        for p in usable:
            rate = max(p.rate, RATE_FLOOR)
            if not congested:
                weight = 1.0  # nobody is congested: equal shares
            elif p.loss >= CONGESTED:
                weight = rate * (1.0 - p.loss)
            else:
                weight = max(rate, floor) * PROBE_BOOST
            self._wrr.append([p, max(weight, 1e-3), old.get(id(p), 0.0)])
        self._total = sum(e[1] for e in self._wrr)

    def select(self, packet: bytes) -> list:
        """The paths that carry ``packet`` (empty if there is none)."""
        if self.mode != "balance":
            return self._chosen
        wrr = self._wrr
        if len(wrr) <= 1:
            return [wrr[0][0]] if wrr else []
        if self.pin_flows:
            h = flow_hash(packet)
            if h is not None:
                return [self._by_hash(h)]
        # smooth weighted round robin (as in nginx): deterministic, evenly interleaved
        best = None
        for entry in wrr:
            entry[2] += entry[1]
            if best is None or entry[2] > best[2]:
                best = entry
        best[2] -= self._total
        return [best[0]]

    def _by_hash(self, h: int):
        point = (h % 1_000_003) / 1_000_003 * self._total
        for entry in self._wrr:
            point -= entry[1]
            if point < 0:
                return entry[0]
        return self._wrr[-1][0]


def flow_hash(packet: bytes) -> Optional[int]:
    """Hash of the IPv4 5-tuple (addresses, protocol, ports for TCP/UDP); None if not IPv4."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    proto = packet[9]
    ihl = (packet[0] & 0x0F) * 4
    key = packet[12:20] + bytes([proto])
    if proto in (6, 17) and len(packet) >= ihl + 4:
        key += packet[ihl : ihl + 4]
    return zlib.crc32(key)
