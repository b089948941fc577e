"""Client tunnel state machine (sans-IO): one tunnel over any number of paths.

Each path (one local interface towards one server address, named by a
hashable ``key`` the shell chooses) runs its own DTLS session.  The first
path to finish its handshake sends HELLO with tunnel id 0 and gets CONFIG
with the tunnel id; every other path then JOINs that id (HELLO with the id).
A joined path keeps its session through an outage of any length (down,
probing), so it carries traffic again the moment its link works; a spare
session from a new socket covers a server that lost the session or a NAT that
lost the mapping.  A path whose session ends reconnects with exponential
backoff and JOINs again; the tunnel, its TUN device and its sequence space
live on.  If the server no longer knows the tunnel (it restarted), the client
starts a new one.

Inputs: :meth:`add_path`, :meth:`remove_path`, :meth:`receive_datagram`,
:meth:`send_packet`, :meth:`handle_timer`.  Outputs:
:meth:`datagrams_to_send` (``(key, datagram, tos)``), ``to_tun``,
:meth:`next_event`.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Optional

from OpenSSL import SSL

from tunnel import events, frames
from tunnel.dedup import DEFAULT_WINDOW, DedupWindow
from tunnel.dtls import DtlsSession, common_name
from tunnel.ecn import decapsulate
from tunnel.events import SpareKey
from tunnel.path import P_DOWN, P_HANDSHAKING, TICK, Path
from tunnel.policy import Policy
from tunnel.reorder import Reorderer, floor, queue_of
from tunnel.scheduler import ExtraCopies
from tunnel.scheduler import MODES, Scheduler
from tunnel.warm import warm_pass

BACKOFF_MIN = 0.25
BACKOFF_MAX = 5.0
BACKOFF_REFUSED = 10.0  # after the server refused us, retry slowly
HELLO_RETRY = 0.5  # resend HELLO/JOIN when no CONFIG came back within this time
# NAT rebinding and outages (docs/PROTOCOL.md, Reconnect): a joined path keeps its session however
# long it is silent (it is down and keeps probing, so it carries traffic again as soon as its link
# works).  One that is down and has
# received nothing at all for REBIND_AFTER beyond its dead interval starts a spare session from
# a new socket (a new source port, so a new NAT mapping) beside the silent one; the spare JOINs
# and, once it has CONFIG, replaces the silent session (it is dropped if the old one gets a PONG
# again first: the old session works both ways).  A reconnect handshake (or spare) that hears nothing at all for SILENT_ATTEMPT
# (or 4 RTTs of the path's last session, if longer) is abandoned and retried after
# SILENT_BACKOFF: at most one ClientHello per 1.25 s per path while an outage lasts.
REBIND_AFTER = 0.2
SILENT_ATTEMPT = 1.0
SILENT_BACKOFF = 0.25
SPARE_LIMIT = 3.0  # a spare session that has not joined by then is given up (and retried)
INF = float("inf")
IDLE_AFTER = 1.0  # seconds without DATA before the paths probe every idle_probe_interval
MAX_SLEEP = 1.0  # the longest next_timer() ever waits (a safety net: every live path probes far more often)

C_CONNECTING, C_UP, C_CLOSED = "connecting", "up", "closed"


class PathSlot:
    """A configured path: where it goes, and its current session (if any)."""

    __slots__ = (
        "key", "server", "name", "priority", "mtu", "path", "retry_at", "backoff", "hello_sent", "hello_at", "joined", "attempts",
        "heard", "srtt", "spare", "spare_heard", "spare_hello_at", "spare_retry", "refused",
    )

    def __init__(self, key: Hashable, server: tuple, name: str, priority: int, mtu: int):
        self.key, self.server, self.name, self.priority, self.mtu = key, server, name, priority, mtu
        self.path: Optional[Path] = None
        self.retry_at: Optional[float] = None
        self.backoff = BACKOFF_MIN
        self.hello_sent = False
        self.hello_at = 0.0
        self.joined = False
        self.attempts = 0
        self.heard = False  # the current handshake got an answer
        self.srtt: Optional[float] = None  # the last session's RTT (None: never established)
        self.spare: Optional[Path] = None  # a second session from a new socket while the path is silent
        self.spare_heard = False
        self.spare_hello_at = 0.0
        self.spare_retry = 0.0
        self.refused = False  # waiting BACKOFF_REFUSED after the server refused us (a link event does not shorten it)


class ClientCore:
    def __init__(
        self,
        ctx: SSL.Context,
        mode: str = "duplicate",
        redundancy: int = 2,
        pin_flows: bool = False,
        probe_interval: float = 0.1,
        dead_interval: float = 0.3,
        timeout: float = 3.0,
        window: int = DEFAULT_WINDOW,
        policy: Optional[Policy] = None,
        idle_probe_interval: Optional[float] = None,
    ):
        self.ctx = ctx
        self.pin_flows = pin_flows
        self.mode = mode
        self.set_policy(policy or Policy.single(mode, redundancy))
        self.hello_mode = MODES.index(mode) + 1
        self.redundancy = redundancy
        self.probe_interval = probe_interval
        self.dead_interval = dead_interval
        self.idle_probe_interval = idle_probe_interval  # None: always probe every probe_interval
        self.timeout = timeout
        self.window = window
        self._last_data = float("-inf")  # when DATA last went either way
        self._idle = False  # the joined paths probe every idle_probe_interval
        self.state = C_CONNECTING
        self.timer_dirty = True  # input may have made next_timer() earlier: the shell asks again
        self.slots: dict[Hashable, PathSlot] = {}
        self.config: Optional[frames.Config] = None
        self.tunnel_id = frames.NEW_TUNNEL
        self.to_tun: list[bytes] = []
        self.outbox: list[tuple[Hashable, bytes, int]] = []  # (path key, datagram, outer TOS)
        self._events: deque = deque()
        self._creating: Optional[PathSlot] = None  # the slot whose HELLO(0) is in flight
        self._joined: list[Path] = []  # paths that carry the tunnel
        self._seq = 0
        self._dedup = DedupWindow(window)
        self._qseq = [0] * 256  # per-queue sequence numbers of DATA_ORDERED (reordering classes)
        self._reorder = Reorderer()
        self._extra = ExtraCopies()
        self.malformed = 0
        self.dropped_no_path = 0  # packets from the TUN while no path carried the tunnel
        self.not_ipv4 = 0
        self.ipv6 = False  # the CONFIG gave an IPv6 address: IPv6 packets are carried too
        self.local6 = 0  # IPv6 link-local/multicast packets from the TUN (ND, MLD): never carried
        self.ecn_dropped = 0  # Not-ECT packets that arrived with outer CE (RFC 6040)
        self.rebinds = 0  # silent sessions replaced by a spare from a new source port
        self.rebind_attempts = 0  # spare sessions started
        self._spares: dict = {}  # SpareKey -> slot
        self._promoted: dict = {}  # SpareKey -> slot whose path is that spare now

    def set_policy(self, policy: Policy) -> None:
        """Install a (new) policy: one scheduler per traffic class."""
        self.policy = policy
        self.schedulers = [Scheduler(c.mode, c.redundancy, self.pin_flows, c.target_loss) for c in policy.classes]
        self.timer_dirty = True
        self.class_packets = [0] * len(policy.classes)  # packets per class
        self.class_copies = [0] * len(policy.classes)  # datagrams sent for them (duplicates count)
        self._refresh()

    @property
    def scheduler(self) -> Scheduler:
        """The default (last) class's scheduler: the only one without a policy file."""
        return self.schedulers[-1]

    def _refresh(self) -> None:
        joined = getattr(self, "_joined", [])
        for s in self.schedulers:
            s.refresh(joined)

    # -- paths --------------------------------------------------------
    def add_path(self, key: Hashable, server: tuple, now: float, name: str = "", priority: int = 0, mtu: int = 1472) -> None:
        """Start a path (``mtu``: the UDP payload size that fits its underlay)."""
        if key in self.slots or self.state == C_CLOSED:
            return
        slot = PathSlot(key, server, name, priority, mtu)
        self.slots[key] = slot
        self._connect(slot, now)
        self.timer_dirty = True

    def remove_path(self, key: Hashable, now: float, reason: str = "interface gone") -> None:
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        self.timer_dirty = True
        if slot.path is not None and slot.path.alive:
            slot.path.close(frames.encode(frames.Close(frames.CLOSE_PATH, reason)), now)
            self._collect(slot.path)
        self._lost(slot, reason, now, reconnect=False)

    def link_changed(self, now: float) -> None:
        """The underlay changed (the shell saw a link, address or route event): a silent path
        may work again now, so do not wait for the next probe, spare attempt or back-off.  A
        down path probes at once and may start a spare at once; a reconnect waiting for its
        back-off, or a handshake that heard nothing, starts again now.  Attempts younger than
        SILENT_BACKOFF are left alone, so a burst of events does not become a burst of
        handshakes."""
        if self.state == C_CLOSED:
            return
        for slot in list(self.slots.values()):
            path = slot.path
            if slot.retry_at is not None:
                if not slot.refused:
                    slot.retry_at = min(slot.retry_at, now)
            elif path is None:
                continue
            elif path.state == P_HANDSHAKING:
                if slot.srtt is not None and not slot.heard and now - path.created >= SILENT_BACKOFF:
                    self._abandon(slot, "the link changed", now, 0.0, report=False)
            elif path.state == P_DOWN and slot.joined:
                path.ping(now)
                self._collect(path)
                spare = slot.spare
                if spare is not None and not slot.spare_heard and now - spare.created >= SILENT_BACKOFF:
                    self._drop_spare(slot, now)
                    spare = None
                est = path.est
                if spare is None and now - est.last_rx >= est.effective_dead_interval + REBIND_AFTER:
                    self._start_spare(slot, now)
        self.timer_dirty = True

    def _connect(self, slot: PathSlot, now: float) -> None:
        slot.attempts += 1
        slot.retry_at = None
        slot.hello_sent = slot.joined = slot.heard = False
        self._events.append(events.Connecting(slot.key, slot.attempts))
        dtls = DtlsSession.client(self.ctx, slot.mtu, now)
        slot.path = Path(
            dtls, slot.server, now, self.probe_interval, self.dead_interval, self.timeout, key=slot.key, name=slot.name,
            idle_probe_interval=self.idle_probe_interval,
        )
        slot.path.priority = slot.priority
        self._collect(slot.path)

    def close(self, now: float) -> None:
        for slot in self.slots.values():
            if slot.path is not None and slot.path.alive:
                slot.path.close(frames.encode(frames.Close(frames.CLOSE_NORMAL, "client shutting down")), now)
                self._collect(slot.path)
        self.state = C_CLOSED
        self.timer_dirty = True

    # -- input --------------------------------------------------------
    def receive_datagram(self, key: Hashable, data: bytes, now: float, tos: int = 0) -> None:
        """One datagram from path ``key``; ``tos``: its outer TOS byte (for ECN)."""
        slot = self.slots.get(key)
        if slot is None or slot.path is None or not slot.path.alive:
            self.timer_dirty = True
            spare_of = self._spares.get(key)
            if spare_of is not None and spare_of.spare is not None:
                self._spare_datagram(spare_of, data, now, tos)
            elif (promoted := self._promoted.get(key)) is not None and promoted.key in self.slots:
                # read from the spare's socket in the same drain as the CONFIG that promoted it
                self.receive_datagram(promoted.key, data, now, tos)
            return
        path = slot.path
        handshaking = path.state == P_HANDSHAKING
        if handshaking:
            slot.heard = True
            self.timer_dirty = True
        records = path.receive(data, now)
        if path.updated and slot.joined:  # a PONG: lowest-rtt and balance follow the new estimates at once
            path.updated = False
            self._refresh()
        if handshaking and path.established:
            self._on_established(slot, now)
        for rec in records:
            if slot.path is not path:  # a CLOSE earlier in this datagram ended the path
                break
            if rec[0] == frames.DATA and slot.joined:
                self._last_data = now
                if self._idle:
                    self._wake(now)
                try:
                    seq, payload = frames.parse_data(rec)
                except frames.FrameError:
                    self.malformed += 1
                    continue
                if seq > path.rx_seq:
                    path.rx_seq = seq
                if self._dedup.accept(seq):
                    if tos & 3 == 3:  # outer CE (RFC 6040)
                        payload = decapsulate(tos, payload)
                        if payload is None:
                            self.ecn_dropped += 1
                            continue
                    self.to_tun.append(payload)
                if self._reorder.waiting:  # this packet may prove a gap in an ordered queue lost
                    self._reorder.progress(floor(self._joined), self.to_tun)
            elif rec[0] == frames.DATA_ORDERED and slot.joined:
                self.timer_dirty = True  # a held packet has a deadline
                self._last_data = now
                if self._idle:
                    self._wake(now)
                self._on_data_ordered(path, rec, tos, now)
            else:
                self.timer_dirty = True
                self._on_control(slot, rec, now)
        if path.out:
            self._collect(path)
        if path.changed and slot.path is path:
            self.timer_dirty = True
            self._path_changed(slot, now)

    def _on_data_ordered(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        try:
            seq, queue, qseq, hold_ms, payload = frames.parse_data_ordered(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if seq > path.rx_seq:
            path.rx_seq = seq
        if not self._dedup.accept(seq):
            return
        if tos & 3 == 3:  # outer CE (RFC 6040)
            payload = decapsulate(tos, payload)
            if payload is None:
                self.ecn_dropped += 1
                return
        self._reorder.push(queue, qseq, hold_ms / 1000.0, seq, payload, now, floor(self._joined), self.to_tun)

    def _on_established(self, slot: PathSlot, now: float) -> None:
        path = slot.path
        if slot.srtt is None:
            slot.srtt = 0.0
        cert = path.dtls.peer_certificate
        self._events.append(events.PathUp(slot.key, common_name(cert) if cert else "?", path.dtls.cipher))
        self._send_hello(slot, now)

    def _send_hello(self, slot: PathSlot, now: float) -> None:
        path = slot.path
        if slot.hello_sent or path is None or not path.established:
            return
        if self.tunnel_id == frames.NEW_TUNNEL:
            creating = self._creating
            if creating is not None and creating is not slot and creating.path is not None and creating.path.alive:
                return  # another path is creating the tunnel: JOIN once CONFIG is here
            self._creating = slot
        hello = frames.Hello(frames.PROTOCOL_VERSION, self.tunnel_id, self.hello_mode, self.redundancy, slot.priority)
        path.send(frames.encode(hello), now)
        self._collect(path)
        slot.hello_sent = True
        slot.hello_at = now

    def _on_control(self, slot: PathSlot, rec: bytes, now: float) -> None:
        try:
            frame = frames.parse(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if isinstance(frame, frames.Config):
            self._on_config(slot, frame, now)
        elif isinstance(frame, frames.Close):
            slot.path.close(None, now)
            backoff = None
            if frame.code == frames.CLOSE_REFUSED:
                backoff = BACKOFF_REFUSED
            elif frame.code == frames.CLOSE_UNKNOWN_TUNNEL:
                self._forget_tunnel()
                backoff = 0.0
            reason = frames.printable(frame.reason) or frame.code  # the server's words, escaped for the log
            self._lost(slot, f"server closed the path: {reason}", now, backoff=backoff)
        else:
            self.malformed += 1  # HELLO, or DATA before the path joined: not for a client

    def _on_config(self, slot: PathSlot, config: frames.Config, now: float) -> None:
        new_tunnel = config.tunnel_id != self.tunnel_id
        if new_tunnel:
            self._seq = 0
            self._dedup = DedupWindow(self.window)
            self._qseq = [0] * 256
            self._reorder = Reorderer()
            for other in self.slots.values():  # joined to a tunnel that is gone
                if other is not slot and other.joined:
                    other.joined = other.hello_sent = False
            self._joined = []
        self.tunnel_id = config.tunnel_id
        self._creating = None
        slot.joined = True
        slot.path.silent_limit = INF  # joined: kept through any outage (spares cover a lost session)
        slot.backoff = BACKOFF_MIN
        self._joined.append(slot.path)
        self._refresh()
        if new_tunnel or self.state != C_UP:
            self.config = config
            self.ipv6 = any(a.version == 6 for a in config.addresses)
            self.state = C_UP
            self._events.append(events.TunnelUp(config))
        self._events.append(events.PathJoined(slot.key, slot.name))
        for other in self.slots.values():
            self._send_hello(other, now)

    def _forget_tunnel(self) -> None:
        self.tunnel_id = frames.NEW_TUNNEL
        for s in self.slots.values():
            s.joined = s.hello_sent = False
        self._joined = []
        self._refresh()
        if self.state == C_UP:
            self.state = C_CONNECTING
            self._events.append(events.TunnelDown("the server no longer knows the tunnel"))

    def _path_changed(self, slot: PathSlot, now: float) -> None:
        path = slot.path
        path.changed = False
        if path.heard_again:  # heard after a silence: still down, nothing to report
            path.heard_again = False
            if path.state == P_DOWN:
                return
        if not path.alive:
            self._lost(slot, path.reason, now)
            return
        if slot.joined:
            self._refresh()
            self._events.append(events.PathState(slot.key, slot.name, path.state))

    def _abandon(self, slot: PathSlot, reason: str, now: float, backoff: float, report: bool = True) -> None:
        """Give up the slot's session locally (its socket closes with it: no CLOSE) and reconnect."""
        path = slot.path
        path.close(None, now)
        path.out.clear()
        self._lost(slot, reason, now, backoff=backoff, report=report)

    def _lost(
        self, slot: PathSlot, reason: str, now: float, backoff: Optional[float] = None, reconnect: bool = True,
        report: bool = True,
    ) -> None:
        path = slot.path
        if slot.spare is not None:
            self._drop_spare(slot, now)
        if path is not None and path.srtt is not None:
            slot.srtt = path.srtt
        if path is not None and path in self._joined:
            self._joined.remove(path)
            self._refresh()
        was_joined = slot.joined
        slot.joined = slot.hello_sent = False
        if self._creating is slot:
            self._creating = None
            for other in self.slots.values():  # let another path create the tunnel
                self._send_hello(other, now)
        if report:
            self._events.append(events.PathDown(slot.key, reason))
        if was_joined and not self._joined and self.state == C_UP:
            self.state = C_CONNECTING
            self._events.append(events.TunnelDown(reason))
        if reconnect and self.state != C_CLOSED and slot.key in self.slots:
            delay = backoff if backoff is not None else slot.backoff
            slot.retry_at = now + delay
            slot.refused = backoff == BACKOFF_REFUSED
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)
        if path is not None:
            path.changed = False
        slot.path = None

    # -- output -------------------------------------------------------
    def send_packet(self, packet: bytes, now: float) -> None:
        """An IP packet read from the TUN device."""
        if not packet or packet[0] >> 4 != 4:
            if not packet or packet[0] >> 4 != 6 or not self.ipv6 or len(packet) < 40:
                self.not_ipv4 += 1  # IPv6 only when the server gave an IPv6 address
                return
            if packet[24] == 0xFF or (packet[8] == 0xFE and packet[9] & 0xC0 == 0x80):
                self.local6 += 1  # multicast or from a link-local address: for this link only
                return
        policy = self.policy
        c = policy.classify(packet)
        sched = self.schedulers[c.index]
        paths = sched.select(packet)
        if not paths or self.state != C_UP:
            self.dropped_no_path += 1
            return
        tos = policy.outer_tos(c, packet)
        self._last_data = now
        if self._idle:
            self._wake(now)
        self._seq = seq = self._seq + 1
        if c.reorder:
            q = queue_of(packet)
            qseq = self._qseq[q]
            self._qseq[q] = (qseq + 1) & 0xFFFF
            record = frames.encode_data_ordered(seq, q, qseq, c.hold_units, packet)
        else:
            record = frames.encode_data(seq, packet)
        outbox = self.outbox
        for path in paths:
            dgram = path.encrypt(record, now)
            if dgram is not None:
                outbox.append((path.key, dgram, tos))
        self.class_packets[c.index] += 1
        self.class_copies[c.index] += len(paths)
        if sched.extra:  # target_loss: more copies, one round per tick
            self.timer_dirty = True
            self.class_copies[c.index] += sched.extra_copies
            self._extra.defer(sched.extra, record, tos)

    def _wake(self, now: float) -> None:
        """Traffic on an idle tunnel: its paths probe at once and every probe_interval again."""
        self._idle = False
        for p in self._joined:
            p.set_idle(False, now)
        self.timer_dirty = True

    def warm(self) -> None:
        """keep_warm: one dummy pass over the packet path of every joined path (see tunnel/warm.py)."""
        if self.state == C_UP:
            for path in self._joined:
                warm_pass(self.policy, path)

    def _collect(self, path: Path) -> None:
        key = path.key
        for d in path.out:
            self.outbox.append((key, d, 0))
        path.out.clear()

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes, int]]:
        out, self.outbox = self.outbox, []
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    # -- timers -------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        timers = []
        for slot in self.slots.values():
            if slot.retry_at is not None:
                timers.append(slot.retry_at)
            elif slot.path is not None:
                t = slot.path.get_timer()
                if t is not None:
                    timers.append(t)
                if slot.spare is not None and (t := slot.spare.get_timer()) is not None:
                    timers.append(t)
        return min(timers) if timers else None

    def next_timer(self, now: float) -> float:
        """When :meth:`handle_timer` must run next (absolute time).

        It mirrors handle_timer's conditions (``_slot_timer``): probes, dead
        intervals, timeouts, handshake retransmissions, HELLO retries, reconnect
        back-offs, silence and spare-session limits, reorder deadlines, so an idle
        tunnel wakes only to probe.  Extra copies (one round per tick) ask for
        :data:`TICK`; new estimates to apply, for now.  Early is always safe:
        handle_timer acts only on what is due.  After input that may need an
        earlier timer the core sets ``timer_dirty`` and the shell asks again.
        """
        if self.state == C_CLOSED:
            return now + MAX_SLEEP
        t = now + MAX_SLEEP
        if self._extra.pending:
            t = now + TICK
        if self._reorder.waiting:
            d = self._reorder.next_deadline()
            if d is not None and d < t:
                t = d
        for slot in self.slots.values():
            st = self._slot_timer(slot, now)
            if st < t:
                t = st
        if self.idle_probe_interval and self._joined:
            if not self._idle:
                t = min(t, max(self._last_data + IDLE_AFTER, now))
            elif any(p.est is not None and not p.est.idle and p.established for p in self._joined):
                return now  # a path that joined while idle: make it probe slowly too
        return t

    def _slot_timer(self, slot: PathSlot, now: float) -> float:
        """When handle_timer next has something to do for ``slot`` (see handle_timer
        and _check_silence, which this follows branch by branch)."""
        if slot.retry_at is not None:
            return slot.retry_at
        path = slot.path
        if path is None:
            return INF
        if path.updated and slot.joined:  # new estimates: the schedulers follow them at once
            return now
        t = path.get_timer()
        if t is None:
            t = INF
        if slot.hello_sent and not slot.joined:
            t = min(t, slot.hello_at + HELLO_RETRY)
        if path.state == P_HANDSHAKING:
            if slot.srtt is not None and not slot.heard:
                t = min(t, path.created + max(SILENT_ATTEMPT, 4 * slot.srtt))
            return t
        spare = slot.spare
        if not slot.joined or (spare is not None and path.est.last_ack > spare.created):
            return t if spare is None else now  # a spare whose path answers again is dropped
        if path.state != P_DOWN:
            return t
        if spare is None:
            est = path.est
            return min(t, max(est.last_rx + est.effective_dead_interval + REBIND_AFTER, slot.spare_retry))
        if not spare.alive:
            return now
        st = spare.get_timer()
        if st is not None:
            t = min(t, st)
        if not slot.spare_heard:
            t = min(t, spare.created + max(SILENT_ATTEMPT, 4 * (slot.srtt or 0.0)))
        t = min(t, spare.created + SPARE_LIMIT)
        if spare.established:
            t = min(t, slot.spare_hello_at + HELLO_RETRY)
        return t

    def handle_timer(self, now: float) -> None:
        if self.state == C_CLOSED:
            return
        for slot in list(self.slots.values()):
            if slot.retry_at is not None:
                if now >= slot.retry_at:
                    self._connect(slot, now)
                continue
            path = slot.path
            if path is None:
                continue
            t = path.get_timer()
            if t is not None and now >= t:
                path.handle_timer(now)
                if path.out:
                    self._collect(path)
                if path.changed and slot.path is path:
                    self._path_changed(slot, now)
            if slot.hello_sent and not slot.joined and slot.path is path and now - slot.hello_at >= HELLO_RETRY:
                slot.hello_sent = False  # HELLO or CONFIG was lost: ask again
                self._send_hello(slot, now)
            if slot.path is path:
                self._check_silence(slot, path, now)
        if self._extra.pending:
            self._extra.send(now, self.outbox, lambda path: path.key)
        if self._reorder.waiting:
            self._reorder.expire(now, self.to_tun)
            self._reorder.progress(floor(self._joined), self.to_tun)
        if any(p.updated for p in self._joined):  # new estimates: lowest-rtt and balance follow them
            for p in self._joined:
                p.updated = False
            self._refresh()
        if self.idle_probe_interval and self._joined and now - self._last_data >= IDLE_AFTER:
            self._idle = True  # no traffic: probe slowly (paths that join later too)
            for p in self._joined:
                p.set_idle(True, now)

    def _check_silence(self, slot: PathSlot, path: Path, now: float) -> None:
        """Long outages (SILENT_ATTEMPT) and NAT rebinding (REBIND_AFTER: start a spare session)."""
        if path.state == P_HANDSHAKING:
            if slot.srtt is not None and not slot.heard and now - path.created >= max(SILENT_ATTEMPT, 4 * slot.srtt):
                self._abandon(slot, "no answer from the server", now, SILENT_BACKOFF, report=False)
            return
        spare = slot.spare
        if not slot.joined or (spare is not None and path.est.last_ack > spare.created):
            if spare is not None:  # the old session answers again (a PONG: both ways): it stays
                self._drop_spare(slot, now)
            return
        if path.state != P_DOWN:
            return
        if spare is None:
            est = path.est
            # nothing at all received (not only no PONG): a lossy path that still delivers keeps its session
            if now - est.last_rx >= est.effective_dead_interval + REBIND_AFTER and now >= slot.spare_retry:
                self._start_spare(slot, now)
            return
        t = spare.get_timer()
        if t is not None and now >= t:
            spare.handle_timer(now)
            self._collect(spare)
        if not spare.alive:
            self._drop_spare(slot, now, SILENT_BACKOFF)
        elif not slot.spare_heard and now - spare.created >= max(SILENT_ATTEMPT, 4 * (slot.srtt or 0.0)):
            self._drop_spare(slot, now, SILENT_BACKOFF)
        elif now - spare.created >= SPARE_LIMIT:
            self._drop_spare(slot, now, SILENT_BACKOFF)
        elif spare.established and now - slot.spare_hello_at >= HELLO_RETRY:
            self._spare_join(slot, now)

    # -- NAT rebinding: a spare session per silent path ----------------
    def _start_spare(self, slot: PathSlot, now: float) -> None:
        key = SpareKey(slot.key)
        self._promoted.pop(key, None)
        self.rebind_attempts += 1
        slot.spare_heard = False
        slot.spare_hello_at = 0.0
        self._spares[key] = slot
        self._events.append(events.Connecting(key, slot.attempts))  # the shell opens a new socket for it
        dtls = DtlsSession.client(self.ctx, slot.mtu, now)
        slot.spare = Path(
            dtls, slot.server, now, self.probe_interval, self.dead_interval, self.timeout, key=key, name=slot.name,
            idle_probe_interval=self.idle_probe_interval,
        )
        slot.spare.priority = slot.priority
        self._collect(slot.spare)

    def _drop_spare(self, slot: PathSlot, now: float, retry: float = 0.0) -> None:
        spare, slot.spare = slot.spare, None
        self._spares.pop(spare.key, None)
        if spare.established and spare.alive:  # the server may hold it: tell it (on the spare's socket)
            spare.close(frames.encode(frames.Close(frames.CLOSE_PATH, "spare session not needed")), now)
        elif spare.alive:
            spare.close(None, now)
        self._collect(spare)
        slot.spare_retry = now + retry

    def _spare_datagram(self, slot: PathSlot, data: bytes, now: float, tos: int) -> None:
        spare = slot.spare
        handshaking = spare.state == P_HANDSHAKING
        slot.spare_heard = True
        records = spare.receive(data, now)
        if handshaking and spare.established:
            self._spare_join(slot, now)
        for i, rec in enumerate(records):
            if rec[0] == frames.DATA or rec[0] == frames.DATA_ORDERED:
                continue  # not joined yet: the server sends no DATA before CONFIG
            try:
                frame = frames.parse(rec)
            except frames.FrameError:
                self.malformed += 1
                continue
            if isinstance(frame, frames.Config) and frame.tunnel_id == self.tunnel_id:
                old = slot.path
                if old is not None and old.est is not None and old.est.last_ack > spare.created:
                    self._drop_spare(slot, now)  # the old session got a PONG meanwhile: it stays
                    return
                self._promote(slot, now)
                for rest in records[i + 1 :]:  # e.g. packets the server held for the tunnel
                    if rest[0] == frames.DATA:
                        self._spare_data(rest, tos)
                    elif rest[0] == frames.DATA_ORDERED and slot.path is not None:
                        self._on_data_ordered(slot.path, rest, tos, now)
                return
            if isinstance(frame, frames.Close):
                spare.close(None, now)
                self._drop_spare(slot, now, SILENT_BACKOFF)
                if frame.code == frames.CLOSE_UNKNOWN_TUNNEL:  # the server forgot the tunnel: start over
                    self._forget_tunnel()
                    for other in list(self.slots.values()):  # and silent sessions belong to the old server
                        if other.path is not None and other.path.alive and (other is slot or other.path.state == P_DOWN):
                            self._abandon(other, "the server no longer knows the tunnel", now, 0.0)
                return
            self.malformed += 1
        self._collect(spare)
        if not spare.alive:
            self._drop_spare(slot, now, SILENT_BACKOFF)

    def _spare_data(self, rec: bytes, tos: int) -> None:
        try:
            seq, payload = frames.parse_data(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if self._dedup.accept(seq):
            if tos & 3 == 3:
                payload = decapsulate(tos, payload)
                if payload is None:
                    self.ecn_dropped += 1
                    return
            self.to_tun.append(payload)

    def _spare_join(self, slot: PathSlot, now: float) -> None:
        if self.tunnel_id == frames.NEW_TUNNEL:
            return
        hello = frames.Hello(frames.PROTOCOL_VERSION, self.tunnel_id, self.hello_mode, self.redundancy, slot.priority)
        slot.spare.send(frames.encode(hello), now)
        self._collect(slot.spare)
        slot.spare_hello_at = now

    def _promote(self, slot: PathSlot, now: float) -> None:
        """The spare joined the tunnel: it replaces the silent session (dropped without a word:
        its socket closes, and the server has replaced it on the JOIN)."""
        spare, old = slot.spare, slot.path
        slot.spare = None
        key = spare.key
        del self._spares[key]
        self._promoted[key] = slot
        self._collect(spare)
        self.outbox = [(slot.key if k == key else k, d, t) for k, d, t in self.outbox]
        spare.key = slot.key
        spare.silent_limit = INF  # joined, like the session it replaces
        old.close(None, now)
        old.out.clear()
        old.changed = False
        if old in self._joined:
            self._joined.remove(old)
        self._joined.append(spare)
        slot.path = spare
        slot.backoff = BACKOFF_MIN
        self.rebinds += 1
        self._refresh()
        self._events.append(events.Rebound(slot.key))
        self._events.append(events.PathJoined(slot.key, slot.name))

    def _class_stats(self) -> list[dict]:
        return [
            {"name": c.name, "mode": c.mode, "outer_dscp": c.outer_dscp, "packets": n, "copies": k}
            for c, n, k in zip(self.policy.classes, self.class_packets, self.class_copies)
        ]

    def stats(self) -> dict:
        paths = []
        for slot in self.slots.values():
            if slot.path is not None:
                st = slot.path.stats()
            else:
                st = {"addr": f"{slot.server[0]}:{slot.server[1]}", "name": slot.name, "state": "reconnecting"}
            st["joined"] = slot.joined
            paths.append(st)
        return {
            "state": self.state,
            "mode": self.mode,
            "policy": self.policy.source,
            "classes": self._class_stats(),
            "ecn_dropped": self.ecn_dropped,
            "address": str(self.config.addresses[0]) if self.config else None,
            "delivered": self._dedup.delivered,
            "duplicates": self._dedup.duplicates,
            "too_old": self._dedup.too_old,
            "reorder": self._reorder.stats(),
            "malformed": self.malformed,
            "dropped_no_path": self.dropped_no_path,
            "not_ipv4": self.not_ipv4,
            "address6": next((str(a) for a in self.config.addresses if a.version == 6), None) if self.config else None,
            "local6": self.local6,
            "rebinds": self.rebinds,
            "rebind_attempts": self.rebind_attempts,
            "paths": paths,
        }
