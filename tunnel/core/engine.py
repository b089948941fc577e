"""The data plane of one tunnel, the same for both roles (sans-IO).

Why a module of its own: the client and the server carry packets the same way
once a tunnel exists, and that code used to be written twice (three times for
receiving DATA on the client).  :class:`TunnelEngine` owns what a tunnel is
made of on the wire: the sequence space, the dedup window, the per-class
schedulers of the policy, the reordering queues, the extra copies of
``target_loss``, idle probing and the per-class statistics.  The cores keep
only what is theirs (the client: path slots, HELLO/JOIN, spares; the server:
admission, the pool and routing), and hand the engine the paths that carry the
tunnel (:attr:`paths`; each of them has ``path.tunnel`` set to the engine).

Both cores write their output to one :class:`Outputs` object that the shell
empties: datagrams as ``(path key, datagram, outer TOS)`` and packets for the
TUN.  What a packet from the tunnel must pass before it reaches the TUN differs
by role, so the engine calls methods a role may override: :meth:`admit` (the
server checks the inner source address; both decapsulate ECN), :meth:`forward`
(the server routes to another client or to its TUN) and :meth:`deliver`, the
two in one (the server's short way for the common packet).

Timers follow one rule here and in the cores: the code that acts on a deadline
is the code that computes it (:meth:`service` runs what is due and returns the
next deadline), so no pair of functions must agree by hand.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from tunnel.wire import frames
from tunnel.core.dedup import DedupWindow
from tunnel.wire.ecn import CE, decapsulate
from tunnel.core.path import TICK, Path
from tunnel.core.policy import Policy
from tunnel.core.reorder import HOLD_FACTOR, HOLD_MARGIN, Reorderer, floor, queue_of
from tunnel.core.scheduler import ExtraCopies, Scheduler
from tunnel.core.warm import warm_pass

IDLE_AFTER = 1.0  # seconds without DATA before the paths probe every idle_probe_interval
INF = float("inf")
HOLD_UNITS_PER_S = 1000 / frames.HOLD_UNIT_MS


class Outputs:
    """What a core produced since the shell last looked.

    One object per core, shared by its engines, so a tunnel appends to the
    lists the shell will take next (the shell swaps the lists, never the object).
    ``timer_dirty``: input may have made the core's next deadline earlier, so the
    shell must run :meth:`handle_timer` again before it sleeps."""

    __slots__ = ("datagrams", "packets", "timer_dirty")

    def __init__(self) -> None:
        self.datagrams: list[tuple] = []  # (path key, datagram, outer TOS)
        self.packets: list[bytes] = []  # for the TUN
        self.timer_dirty = True

    def take_datagrams(self) -> list[tuple]:
        out, self.datagrams = self.datagrams, []
        return out

    def collect(self, path: Path) -> None:
        """Move the path's own output (handshake, probes, control) to the datagrams."""
        key, out = path.key, self.datagrams
        for d in path.out:
            out.append((key, d, 0))
        path.out.clear()


class CoreOutputs:
    """What the shell takes out of a core, the same for both roles: datagrams to send
    (:meth:`datagrams_to_send`), packets for the TUN (``to_tun``), events
    (:meth:`next_event`) and ``timer_dirty``.  A core sets ``out`` and ``_events``."""

    out: Outputs
    _events: deque

    @property
    def to_tun(self) -> list[bytes]:
        return self.out.packets

    @to_tun.setter
    def to_tun(self, packets: list[bytes]) -> None:
        self.out.packets = packets

    @property
    def timer_dirty(self) -> bool:
        return self.out.timer_dirty

    @timer_dirty.setter
    def timer_dirty(self, dirty: bool) -> None:
        self.out.timer_dirty = dirty

    @property
    def outbox(self) -> list:
        """The datagrams produced so far (not taken)."""
        return self.out.datagrams

    def datagrams_to_send(self) -> list[tuple]:
        return self.out.take_datagrams()

    def next_event(self):
        return self._events.popleft() if self._events else None


class TunnelEngine:
    """One tunnel's data plane: send, receive, reorder, idle, statistics."""

    def __init__(self, out: Outputs, policy: Policy, dedup_window: int,
                 idle_probe_interval: Optional[float], pin_flows: bool = False):
        self.out = out
        self.paths: list[Path] = []  # the paths that carry the tunnel
        self.seq = 0
        self.dedup = DedupWindow(dedup_window)
        self.qseq = [0] * 256  # per-queue sequence numbers of DATA_ORDERED (reordering classes)
        self.reorder = Reorderer()
        self.extra = ExtraCopies()  # target_loss copies waiting for their round
        self.extra_due = INF  # when the next round of extra copies goes out
        self.pin_flows = pin_flows
        self.idle_probe_interval = idle_probe_interval  # None: always probe every probe_interval
        self.last_data = -INF  # when DATA last went either way
        self.idle = False  # the paths probe every idle_probe_interval
        self.malformed = 0
        self.ecn_dropped = 0  # Not-ECT packets that arrived with outer CE (RFC 6040)
        self.set_policy(policy)

    # -- policy and paths ------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Install a (new) policy: one scheduler per traffic class."""
        self.policy = policy
        # balance predicts arrival per path: the paths model their bottleneck and ask for FEEDBACK
        self.feedback = any(c.mode == "balance" for c in policy.classes)
        for p in self.paths:
            p.want_feedback(self.feedback)
        self.schedulers = [Scheduler(c.mode, c.redundancy, self.pin_flows, c.target_loss) for c in policy.classes]
        self.class_packets = [0] * len(policy.classes)  # packets per class
        self.class_copies = [0] * len(policy.classes)  # datagrams sent for them (duplicates count)
        self.class_shed = [0] * len(policy.classes)  # balance: packets marked CE or dropped for a full queue
        self.refresh()
        self.out.timer_dirty = True

    @property
    def scheduler(self) -> Scheduler:
        """The default (last) class's scheduler: the only one without a policy file."""
        return self.schedulers[-1]

    def refresh(self) -> None:
        """The paths or their estimates changed: the schedulers follow at once."""
        for s in self.schedulers:
            s.refresh(self.paths)

    def attach(self, path: Path) -> None:
        path.tunnel = self
        path.want_feedback(self.feedback)
        self.paths.append(path)
        self.refresh()

    def detach(self, path: Path) -> None:
        if path.tunnel is self:
            path.tunnel = None
        if path in self.paths:
            self.paths.remove(path)
            self.refresh()

    def detach_all(self) -> None:
        for p in self.paths:
            if p.tunnel is self:
                p.tunnel = None
        self.paths = []
        self.refresh()

    # -- sending -------------------------------------------------------
    def send(self, pkt: bytes, now: float) -> bool:
        """Schedule one IP packet; False if no path may carry it (the caller counts it)."""
        policy = self.policy
        c = policy.classify(pkt)
        sched = self.schedulers[c.index]
        paths = sched.select(pkt, now)
        if not paths:
            return False
        if sched.over:  # balance: every path's queue is full enough; an AQM's verdict
            self.class_shed[c.index] += 1
            pkt = decapsulate(CE, pkt)  # ECN-capable: marked CE; else dropped
            if pkt is None:
                return True
        tos = policy.outer_tos(c, pkt)
        self.last_data = now
        if self.idle:
            self.wake(now)
        self.seq = seq = self.seq + 1
        if c.reorder:
            q = queue_of(pkt)
            qseq = self.qseq[q]
            self.qseq[q] = (qseq + 1) & 0xFFFF
            hold = sched.hold  # the paths' delay spread, or None: the class's reorder_ms
            units = (c.hold_units if hold is None
                     else min(255, int((hold * HOLD_FACTOR + HOLD_MARGIN) * HOLD_UNITS_PER_S) + 1))
            record = frames.encode_data_ordered(seq, q, qseq, units, pkt)
        else:
            record = frames.encode_data(seq, pkt)
        datagrams = self.out.datagrams
        for path in paths:
            dgram = path.encrypt(record, now)
            if dgram is not None:
                datagrams.append((path.key, dgram, tos))
                if path.bottleneck is not None:
                    path.bottleneck.sent(seq, len(record), now)
        self.class_packets[c.index] += 1
        self.class_copies[c.index] += len(paths)
        if sched.extra:  # target_loss: more copies, one round per tick
            self.class_copies[c.index] += sched.extra_copies
            if not self.extra.pending:
                self.extra_due = now + TICK
                self.out.timer_dirty = True
            self.extra.defer(sched.extra, record, tos, seq)
        return True

    # -- receiving -----------------------------------------------------
    def on_data(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        """A DATA record from ``path`` (one of ours)."""
        self.last_data = now
        if self.idle:
            self.wake(now)
        try:
            seq, pkt = frames.parse_data(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if seq > path.rx_seq:
            path.rx_seq = seq
            if path.feedback_interval:
                path.data_arrived(now)
        if self.dedup.accept(seq):  # first: copies of one packet count once below
            self.deliver(pkt, tos, now)
        if self.reorder.waiting:  # this packet may prove a gap in an ordered queue lost
            self.release(now)

    def on_data_ordered(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        """A DATA_ORDERED record: held until its queue is in order (tunnel/core/reorder.py)."""
        self.last_data = now
        if self.idle:
            self.wake(now)
        try:
            seq, queue, qseq, hold_ms, pkt = frames.parse_data_ordered(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if seq > path.rx_seq:
            path.rx_seq = seq
            if path.feedback_interval:
                path.data_arrived(now)
        if not self.dedup.accept(seq):
            return
        admitted = self.admit(pkt, tos)
        if admitted is None:
            return
        if not self.reorder.waiting:
            self.out.timer_dirty = True  # a packet held now has a deadline
        released: list = []
        self.reorder.push(queue, qseq, hold_ms / 1000.0, seq, admitted, now, floor(self.paths), released)
        for p in released:
            self.forward(p, now)

    def deliver(self, pkt: bytes, tos: int, now: float) -> None:
        """A new packet from the tunnel: admit it, then forward it."""
        admitted = self.admit(pkt, tos)
        if admitted is not None:
            self.forward(admitted, now)

    def admit(self, pkt: bytes, tos: int) -> Optional[bytes]:
        """The packet as it may enter (RFC 6040 decapsulation of an outer CE), or None."""
        if tos & 3 == 3:  # outer CE
            pkt = decapsulate(tos, pkt)
            if pkt is None:
                self.ecn_dropped += 1
        return pkt

    def forward(self, pkt: bytes, now: float) -> None:
        """Where an admitted packet goes: the TUN (the server routes: ServerTunnel)."""
        self.out.packets.append(pkt)

    def release(self, now: float, expire: bool = False) -> None:
        """Held packets whose gap is proven lost (or, with ``expire``, held too long) go on."""
        released: list = []
        if expire:
            self.reorder.expire(now, released)
        self.reorder.progress(floor(self.paths), released)
        for p in released:
            self.forward(p, now)

    # -- timers --------------------------------------------------------
    def wake(self, now: float) -> None:
        """Traffic on an idle tunnel: its paths probe at once and every probe_interval again."""
        self.idle = False
        for p in self.paths:
            p.set_idle(False, now)
        self.out.timer_dirty = True

    def service(self, now: float) -> float:
        """Run what is due (a round of extra copies, reorder holds, new estimates, going
        idle) and return when something is due next."""
        t = INF
        if self.extra.pending:
            if now >= self.extra_due:
                self.extra.send(now, self.out.datagrams)
                self.extra_due = now + TICK if self.extra.pending else INF
            t = self.extra_due
        if self.reorder.waiting:
            self.release(now, expire=True)
            d = self.reorder.next_deadline()
            if d is not None and d < t:
                t = d
        paths = self.paths
        if any(p.updated for p in paths):  # new estimates: lowest-rtt and balance follow them
            for p in paths:
                p.updated = False
            self.refresh()
        if self.idle_probe_interval and paths:
            idle_at = self.last_data + IDLE_AFTER
            if now >= idle_at:
                self.idle = True  # no traffic: probe slowly (paths that join later too)
                for p in paths:
                    p.set_idle(True, now)
            elif idle_at < t:
                t = idle_at
        return t

    def warm(self) -> None:
        """keep_warm: one dummy pass over the packet path of every path (tunnel/core/warm.py)."""
        for path in self.paths:
            warm_pass(self.policy, path)

    # -- statistics ----------------------------------------------------
    def stats(self) -> dict:
        """What both roles report of a tunnel's data plane."""
        return {
            "classes": [
                {"name": c.name, "mode": c.mode, "outer_dscp": c.outer_dscp, "packets": n, "copies": k,
                 "shed": s}
                for c, n, k, s in zip(self.policy.classes, self.class_packets, self.class_copies, self.class_shed)
            ],
            "ecn_dropped": self.ecn_dropped,
            "delivered": self.dedup.delivered,
            "duplicates": self.dedup.duplicates,
            "too_old": self.dedup.too_old,
            "reorder": self.reorder.stats(),
            "malformed": self.malformed,
        }


def frame_handlers(default, handlers: dict) -> list:
    """The frame-handler table of a core: one handler per record type (the record's first
    byte), each called as ``handler(path, record, outer_tos, now)``.  PING and PONG are
    the path's own; DATA and DATA_ORDERED go to the tunnel the path carries (to ``default``
    if it carries none yet); ``handlers`` maps the other types the core takes (and may
    override these); every other byte goes to ``default`` (no frame for this role)."""
    table = [default] * 256
    table[frames.PING] = Path.on_ping
    table[frames.PONG] = Path.on_pong
    table[frames.FEEDBACK] = Path.on_feedback
    table[frames.FEEDBACK_WANTED] = Path.on_feedback_wanted
    table[frames.DATA] = _to_tunnel(TunnelEngine.on_data, default)
    table[frames.DATA_ORDERED] = _to_tunnel(TunnelEngine.on_data_ordered, default)
    for kind, handler in handlers.items():
        table[kind] = handler
    return table


def _to_tunnel(method, default):
    def handler(path: Path, rec: bytes, tos: int, now: float) -> None:
        tunnel = path.tunnel
        if tunnel is None:
            default(path, rec, tos, now)
        else:
            method(tunnel, path, rec, tos, now)
    return handler
