"""Receiver-side reordering for balance classes (sans-IO, injected clock).

Balance mode spreads one flow over paths with different delays, so its packets
arrive out of order; TCP reads that as loss.  A class with ``reorder = true``
sends DATA_ORDERED frames: besides the tunnel-wide sequence number (dedup) each
carries a *queue* (the flow's 5-tuple hash, so flows do not block each other),
a per-queue sequence number and the longest time the receiver may hold it.

The receiver delivers each queue in order.  A packet that arrives ahead of a
gap is held until the gap fills, or until its hold time runs out, or until the
gap is known to be a loss: every live path has delivered a packet sent after
the held one (paths are FIFO, so the missing packet would have arrived first).
Then the gap is skipped.  A packet that arrives after its gap was skipped is
delivered at once (late beats lost).  Memory is bounded: at most ``max_held``
packets per queue, beyond which the oldest gap is skipped, and at most
``max_bytes`` held over all queues of a tunnel, beyond which the gaps of the
queues that have waited longest are skipped.  The byte bound matters because
the *sender's* policy decides which packets are DATA_ORDERED (docs/POLICY.md):
a peer may send every packet ordered, on up to 256 queues.
"""

from __future__ import annotations

from typing import Iterable, Optional

from tunnel.core.scheduler import flow_hash

QSEQ_MOD = 1 << 16  # the per-queue sequence number is 16 bits on the wire
HALF = QSEQ_MOD >> 1
DEFAULT_MAX_HELD = 256
# a packet is held for the gap before it at most HOLD_FACTOR x the paths' predicted delay spread
# plus HOLD_MARGIN: predictions err most where it matters (a radio link's capacity halves within
# a round trip), a late packet whose gap was skipped costs the flow a retransmission, and a
# generous hold costs little: a gap that every path has passed is released at once anyway
HOLD_FACTOR = 1.5
HOLD_MARGIN = 0.020
DEFAULT_MAX_BYTES = 1 << 20  # packets held for reordering, per tunnel (1 MiB: ~700 full-size packets)


def queue_of(packet: bytes) -> int:
    """The receiver queue of a packet's flow (0-255): its 5-tuple hash, folded."""
    h = flow_hash(packet)
    if h is None:
        return 0
    return (h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) & 0xFF


def floor(paths: Iterable) -> int:
    """Lowest, over the paths that are up or degraded, of the highest tunnel sequence
    number each delivered (``Path.rx_seq``); -1 if there is none.  A down path is
    left out: what it carried is lost or late either way."""
    low = None
    for p in paths:
        if (p.state == "up" or p.state == "degraded") and (low is None or p.rx_seq < low):
            low = p.rx_seq
    return -1 if low is None else low


class _Queue:
    __slots__ = ("next", "held", "deadline")

    def __init__(self, first: int):
        self.next = first
        self.held: dict[int, tuple[bytes, float, int]] = {}  # qseq -> (packet, deadline, tunnel seq)
        self.deadline = 0.0  # earliest deadline among held packets (valid while held)


class Reorderer:
    """In-order delivery per queue; ``out`` lists receive the packets to deliver."""

    def __init__(self, max_held: int = DEFAULT_MAX_HELD, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_held = max_held
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._queues: dict[int, _Queue] = {}
        self.waiting: set[int] = set()  # queues holding packets (empty: nothing to do)
        self.in_order = 0  # delivered without waiting
        self.released = 0  # delivered after waiting for a gap to fill
        self.late = 0  # arrived after their gap was skipped
        self.skipped = 0  # sequence numbers given up on (lost, or late later)
        self.timeouts = 0  # gaps skipped because the hold time ran out
        self.overflows = 0  # gaps skipped because too many packets were held

    @property
    def held(self) -> int:
        return sum(len(self._queues[q].held) for q in self.waiting)

    def push(self, queue: int, qseq: int, hold: float, seq: int, packet: bytes, now: float,
             floor: int, out: list) -> None:
        """One packet of ``queue``; ``seq`` is its tunnel sequence number and ``floor``
        the lowest, over the live paths, of the highest tunnel sequence number each
        has delivered (a gap before a held packet whose seq is below it is a loss)."""
        q = self._queues.get(queue)
        if q is None:
            self._queues[queue] = _Queue((qseq + 1) % QSEQ_MOD)
            self.in_order += 1
            out.append(packet)
            return
        d = (qseq - q.next) % QSEQ_MOD
        if d == 0:
            self.in_order += 1
            out.append(packet)
            q.next = (qseq + 1) % QSEQ_MOD
            if q.held:
                self._drain(queue, q, out)
        elif d >= HALF:  # behind: its gap was skipped already (or a stray copy)
            self.late += 1
            out.append(packet)
        else:
            if qseq in q.held:
                return  # cannot happen after dedup; keep the first
            deadline = now + hold
            if not q.held:
                q.deadline = deadline
                self.waiting.add(queue)
            elif deadline < q.deadline:
                q.deadline = deadline
            q.held[qseq] = (packet, deadline, seq)
            self.held_bytes += len(packet)
            if len(q.held) > self.max_held:
                self.overflows += 1
                self._skip(queue, q, out)
            else:
                self._release_lost(queue, q, floor, out)
            while self.held_bytes > self.max_bytes and self.waiting:
                self.overflows += 1  # the queue that has waited longest gives up its first gap
                oldest = min(self.waiting, key=lambda k: self._queues[k].deadline)
                self._skip(oldest, self._queues[oldest], out)

    def _head(self, q: _Queue) -> int:
        nxt = q.next
        return min(q.held, key=lambda s: (s - nxt) % QSEQ_MOD)

    def _skip(self, queue: int, q: _Queue, out: list) -> None:
        """Give up on the gap before the first held packet, deliver what follows it."""
        head = self._head(q)
        self.skipped += (head - q.next) % QSEQ_MOD
        q.next = head
        self._drain(queue, q, out)

    def _drain(self, queue: int, q: _Queue, out: list) -> None:
        held = q.held
        nxt = q.next
        while nxt in held:
            pkt = held.pop(nxt)[0]
            self.held_bytes -= len(pkt)
            out.append(pkt)
            self.released += 1
            nxt = (nxt + 1) % QSEQ_MOD
        q.next = nxt
        if held:
            q.deadline = min(v[1] for v in held.values())
        else:
            self.waiting.discard(queue)

    def _release_lost(self, queue: int, q: _Queue, floor: int, out: list) -> None:
        while q.held:
            head = self._head(q)
            if q.held[head][2] >= floor:
                return
            self._skip(queue, q, out)

    def progress(self, floor: int, out: list) -> None:
        """The paths' floor advanced: release gaps that are now known to be losses."""
        for queue in list(self.waiting):
            q = self._queues[queue]
            self._release_lost(queue, q, floor, out)

    def next_deadline(self) -> Optional[float]:
        if not self.waiting:
            return None
        return min(self._queues[q].deadline for q in self.waiting)

    def expire(self, now: float, out: list) -> None:
        """Skip the gaps whose held packets have waited their longest."""
        for queue in list(self.waiting):
            q = self._queues[queue]
            while q.held and q.deadline <= now:
                self.timeouts += 1
                self._skip(queue, q, out)

    def stats(self) -> dict:
        return {"in_order": self.in_order, "released": self.released, "late": self.late,
                "skipped": self.skipped, "timeouts": self.timeouts, "overflows": self.overflows,
                "held": self.held, "held_bytes": self.held_bytes}
