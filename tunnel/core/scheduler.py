"""Which paths carry the next packet.

Modes (per traffic class; one mode for all traffic until the policy issue):
- ``duplicate``: every established path, down ones included (hitless failover,
  for media): a path judged down by lost probes may still deliver copies, and a
  copy on a dead path costs nothing, while skipping a live one costs packets;
- ``redundant``: the best ``k`` paths;
- ``lowest-rtt``: one path, the one with the lowest smoothed RTT; it changes
  only when another is clearly better (10 %) or the current one fails;
- ``balance``: one path per packet, the one where it is predicted to arrive
  first: queued bytes / rate + one-way base delay, from each path's
  :class:`~tunnel.core.bottleneck.Bottleneck` (the receiver's FEEDBACK keeps
  it true), among the paths whose queue is within :data:`QUEUE_BUDGET` (ECF,
  BLEST and DEMS are relatives).  The fast path fills first; once its queue
  reaches the budget the slower ones take the rest, although it arrives later
  there, and the receiver puts each flow back in order (the hold,
  :attr:`Scheduler.hold`).  Pure earliest arrival would wait for the fast
  path's queue to reach the slow path's extra delay, and a drop-tail buffer
  overflows before that (docs/BENCH.md, issue 18's figures).  Until the
  paths have models (and with ``pin_flows``), smooth weighted round robin:
  paths share equally until one shows congestion loss, then congested paths
  are weighted by what they deliver and the others get at least as much plus a
  probing margin; ``pin_flows`` keeps a 5-tuple on one path;
- ``backup``: the first usable path in priority order.

``target_loss`` (duplicate and redundant): when the estimated loss of the
chosen copies together (the product of the paths' measured loss, as if
independent) is above the target, extra copies go on the least lossy live
paths, up to :data:`MAX_COPIES` per path, until the estimate is below it.
Two paths at 10 % random loss give 1 % with one copy each; a third copy brings
it to 0.1 %.  :attr:`Scheduler.extra` lists them in rounds; the cores send each
round one timer tick after the previous one, not back to back with the first
copy, which a burst (or a router's GRO merging the two datagrams) would take
together.  The receiver's duplicate window drops the extras.

"Usable" means up; if no path is up, degraded ones; if none is, down ones (a
packet sent on a path that may be dead beats a packet dropped for sure).
Per-packet work is small: the candidate set and weights are recomputed in
:meth:`refresh` (on a tick or a state change), not per packet.  Pure: paths
are any objects with ``state``, ``srtt``, ``loss``, ``rate`` and ``priority``.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

from tunnel.core.estimator import DEGRADED, DOWN, UP

MODES = ("duplicate", "redundant", "lowest-rtt", "balance", "backup")
SWITCH_MARGIN = 0.9  # lowest-rtt: another path must be 10 % faster to take over
RATE_FLOOR = 125_000.0  # 1 Mbit/s: a path with no measured rate yet still gets a share
PROBE_BOOST = 1.25  # an uncongested path gets 25 % more than it delivered, to find its capacity
CONGESTED = 0.05  # smoothed loss from which a path counts as congested (random loss stays below)
MAX_COPIES = 3  # target_loss: at most this many copies of a packet on one path
# balance: a path whose bottleneck already holds this much (seconds) takes more only when every
# path does; the rest spills to the others, which arrive later, and the receiver puts it back in
# order.  A bond must keep every link busy: waiting for the fast path's queue to reach the slow
# path's extra delay fills a drop-tail buffer (a tbf, a modem) first, and the flow backs off.
QUEUE_BUDGET = 0.010
# balance: when even the best path's bottleneck already holds this much (the model's queue and
# the latest measured one), the packet is marked CE
# (ECN-capable) or dropped at the tunnel's entry, as an AQM would: the flow backs off before the
# links' own buffers (deep on cellular links) fill, so a media class beside it keeps its latency
QUEUE_LIMIT = 0.050
INF = float("inf")


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
    def __init__(self, mode: str = "duplicate", redundancy: int = 2, pin_flows: bool = False,
                 target_loss: Optional[float] = None):
        if mode not in MODES:
            raise SchedulerError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.redundancy = max(1, redundancy)
        self.pin_flows = pin_flows
        self.target_loss = target_loss if mode in ("duplicate", "redundant") else None
        self.extra: list = []  # target_loss: rounds of extra copies, each a list of paths (empty: none)
        self.extra_copies = 0  # copies per packet added for target_loss (at the last refresh)
        self._chosen: list = []  # what duplicate/redundant/lowest-rtt/backup send on
        self._wrr: list = []  # balance: [path, weight, current]
        self._models: list = []  # balance: (path, its Bottleneck) for earliest arrival (empty: WRR)
        self.hold = None  # balance: seconds the receiver may wait for this packet's predecessors (None: unknown)
        self.over = False  # balance: the chosen path's queue is above QUEUE_LIMIT (mark or drop this packet)
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
            models = [(p, getattr(p, "bottleneck", None)) for p in usable]
            self._models = models if len(models) > 1 and all(b is not None for _, b in models) else []
            if not self._models:
                self.hold = None
                self.over = False
        if self.target_loss is not None:
            self._add_copies()

    def _add_copies(self) -> None:
        chosen = self._chosen
        residual = 1.0
        for p in chosen:
            residual *= p.loss if p.state != DOWN else 1.0
        live = sorted((p for p in chosen if p.state != DOWN and p.loss < 1.0), key=lambda p: p.loss)
        rounds = []
        for _ in range(MAX_COPIES - 1):
            extra = []
            for p in live:
                if residual <= self.target_loss:
                    break
                extra.append(p)
                residual *= p.loss
            if not extra:
                break
            rounds.append(extra)
        self.extra = rounds
        self.extra_copies = sum(len(r) for r in rounds)

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

    def select(self, packet: bytes, now: float) -> list:
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
        if self._models:
            return [self._earliest(len(packet), now)]
        # smooth weighted round robin (as in nginx): deterministic, evenly interleaved
        best = None
        for entry in wrr:
            entry[2] += entry[1]
            if best is None or entry[2] > best[2]:
                best = entry
        best[2] -= self._total
        return [best[0]]

    def _earliest(self, size: int, now: float):
        """balance: the path where a packet of ``size`` bytes arrives first, among those
        whose queue is within :data:`QUEUE_BUDGET` (all of them if none is); sets
        :attr:`hold` to when the packets already on the paths are predicted to have
        arrived (from now): the longest the receiver may have to wait for them
        (reordering classes put it in DATA_ORDERED)."""
        best = spill = None
        first = first_any = INF
        latest = 0.0
        budget = now + QUEUE_BUDGET
        for p, b in self._models:
            f = b.free_at
            t = b.arrival(size, now)
            if t < first_any:
                spill, first_any = p, t
            if f <= budget and t < first:
                best, first = p, t
            last = f + b.owd  # when the path's last packet arrives
            if last > latest:
                latest = last
        if best is None:
            best = spill
            b = best.bottleneck  # the model says so, and so did the latest FEEDBACK
            self.over = b.free_at - now > QUEUE_LIMIT and b.queue > QUEUE_LIMIT
        else:
            self.over = False
        # measured from now, not from this packet's predicted arrival: a path faster than its
        # model delivers it early, and it must still wait for the packets on the slower paths
        self.hold = latest - now if latest > now else 0.0
        return best

    def _by_hash(self, h: int):
        point = (h % 1_000_003) / 1_000_003 * self._total
        for entry in self._wrr:
            point -= entry[1]
            if point < 0:
                return entry[0]
        return self._wrr[-1][0]


def flow_hash(packet: bytes) -> Optional[int]:
    """Hash of the 5-tuple (addresses, protocol, ports for TCP/UDP); None if not IP.

    For IPv6 the protocol is the first next-header field (extension headers are
    not followed: such packets hash by addresses and that header type)."""
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        nxt = packet[6]
        key = packet[8:40] + bytes([nxt])
        if nxt in (6, 17) and len(packet) >= 44:
            key += packet[40:44]
        return zlib.crc32(key)
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    proto = packet[9]
    ihl = (packet[0] & 0x0F) * 4
    key = packet[12:20] + bytes([proto])
    if proto in (6, 17) and len(packet) >= ihl + 4:
        key += packet[ihl : ihl + 4]
    return zlib.crc32(key)


class ExtraCopies:
    """The extra copies ``target_loss`` asked for, sent one round per timer tick.

    A copy sent back to back with the first one shares its fate on a bursty
    link (and in a router that merges the two datagrams with GRO), so each
    round waits for the next tick.  Bounded: beyond ``limit`` waiting packets
    the oldest lose their extra copies (counted in ``dropped``).
    """

    __slots__ = ("pending", "limit", "dropped")

    def __init__(self, limit: int = 4096):
        self.pending: list = []  # (rounds of paths, record, outer TOS, tunnel sequence number)
        self.limit = limit
        self.dropped = 0

    def defer(self, rounds: list, record: bytes, tos: int, seq: int) -> None:
        self.pending.append((rounds, record, tos, seq))
        if len(self.pending) > self.limit:
            self.dropped += 1
            del self.pending[0]

    def send(self, now: float, outbox: list) -> None:
        """Encrypt this tick's round of every waiting packet into ``outbox`` (as
        ``(path.key, datagram, tos)``); keep the later rounds for the next tick."""
        later = []
        for rounds, record, tos, seq in self.pending:
            for path in rounds[0]:
                if path.alive:
                    dgram = path.encrypt(record, now)
                    if dgram is not None:
                        outbox.append((path.key, dgram, tos))
                        if path.bottleneck is not None:
                            path.bottleneck.sent(seq, len(record), now)
            if len(rounds) > 1:
                later.append((rounds[1:], record, tos, seq))
        self.pending = later
