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

The tunnel's data plane is the shared :class:`~tunnel.core.engine.TunnelEngine`;
this module keeps only what is the client's: path slots, HELLO/JOIN, spares
and reconnects.  Inputs: :meth:`add_path`, :meth:`remove_path`,
:meth:`receive_datagram`, :meth:`send_packet`, :meth:`handle_timer` (which
returns when it must run next).  Outputs (the same for both roles):
:meth:`datagrams_to_send` (``(key, datagram, tos)``), ``to_tun``,
:meth:`next_event`.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Optional

from OpenSSL import SSL

from tunnel.core import events

from tunnel.wire import frames
from tunnel.wire.dtls import DtlsSession, common_name
from tunnel.core.engine import CoreOutputs, Outputs, TunnelEngine, frame_handlers
from tunnel.core.events import SpareKey
from tunnel.core.path import P_CLOSED, P_DOWN, P_HANDSHAKING, Path
from tunnel.core.policy import Policy
from tunnel.core.scheduler import MODES
from tunnel.core.settings import ClientSettings

BACKOFF_MIN = 0.25
BACKOFF_MAX = 5.0
BACKOFF_REFUSED = 10.0  # after the server refused us, retry slowly
HELLO_RETRY = 0.5  # resend HELLO/JOIN when no CONFIG came back within this time
# NAT rebinding and outages (docs/PROTOCOL.md, Reconnect): a joined path keeps its session however
# long it is silent (it is down and keeps probing, so it carries traffic again as soon as its link
# works).  One that is down and has received nothing at all for REBIND_AFTER beyond its dead
# interval starts a spare session from a new socket (a new source port, so a new NAT mapping)
# beside the silent one; the spare JOINs and, once it has CONFIG, replaces the silent session (it
# is dropped if the old one gets a PONG again first: the old session works both ways).  A
# reconnect handshake (or spare) that hears nothing at all for SILENT_ATTEMPT (or 4 RTTs of the
# path's last session, if longer) is abandoned and retried after SILENT_BACKOFF: at most one
# ClientHello per 1.25 s per path while an outage lasts.
REBIND_AFTER = 0.2
SILENT_ATTEMPT = 1.0
SILENT_BACKOFF = 0.25
SPARE_LIMIT = 3.0  # a spare session that has not joined by then is given up (and retried)
INF = float("inf")
MAX_SLEEP = 1.0  # the longest handle_timer() ever asks to sleep (a safety net: live paths probe far more often)

C_CONNECTING, C_UP, C_CLOSED = "connecting", "up", "closed"


class PathSlot:
    """A configured path: where it goes, its current session (if any) and its spare."""

    __slots__ = (
        "key", "server", "name", "priority", "mtu", "path", "retry_at", "backoff", "hello_at", "attempts",
        "srtt", "spare", "spare_hello_at", "spare_retry", "refused",
    )

    def __init__(self, key: Hashable, server: tuple, name: str, priority: int, mtu: int):
        self.key, self.server, self.name, self.priority, self.mtu = key, server, name, priority, mtu
        self.path: Optional[Path] = None
        self.retry_at: Optional[float] = None  # reconnect at (no session meanwhile)
        self.backoff = BACKOFF_MIN
        self.hello_at: Optional[float] = None  # when HELLO/JOIN went out (None: not sent on this session)
        self.attempts = 0
        self.srtt: Optional[float] = None  # the last session's RTT (None: never established)
        self.spare: Optional[Path] = None  # a second session from a new socket while the path is silent
        self.spare_hello_at = 0.0
        self.spare_retry = 0.0  # no new spare before this
        self.refused = False  # waiting BACKOFF_REFUSED after the server refused us (a link event does not shorten it)

    @property
    def joined(self) -> bool:
        """The session carries the tunnel (CONFIG arrived on it)."""
        return self.path is not None and self.path.tunnel is not None


class ClientCore(CoreOutputs):
    def __init__(self, ctx: SSL.Context, settings: ClientSettings = ClientSettings(), policy: Optional[Policy] = None):
        self.ctx = ctx
        self.settings = settings
        self.mode = settings.mode
        self.hello_mode = MODES.index(settings.mode) + 1
        self.redundancy = settings.redundancy
        self.out = Outputs()
        self.engine = self._new_engine(policy or Policy.single(settings.mode, settings.redundancy))
        self.state = C_CONNECTING
        self.slots: dict[Hashable, PathSlot] = {}
        self.config: Optional[frames.Config] = None
        self.tunnel_id = frames.NEW_TUNNEL
        self._events: deque = deque()
        self._creating: Optional[PathSlot] = None  # the slot whose HELLO(0) is in flight
        self.counters = {
            "malformed": 0,  # records that were no valid frame, or a frame a client does not take
            "dropped_no_path": 0,  # packets from the TUN while no path carried the tunnel
            "not_ipv4": 0,  # neither IPv4 nor (with an IPv6 address from CONFIG) IPv6
            "local6": 0,  # IPv6 link-local/multicast packets from the TUN (ND, MLD): never carried
            "rebinds": 0,  # silent sessions replaced by a spare from a new source port
            "rebind_attempts": 0,  # spare sessions started
        }
        self.ipv6 = False  # the CONFIG gave an IPv6 address: IPv6 packets are carried too
        self._spares: dict = {}  # SpareKey -> slot
        self._promoted: dict = {}  # SpareKey -> slot whose path is that spare now
        self._handlers = frame_handlers(self._unexpected, {
            frames.CONFIG: self._on_config_record, frames.CLOSE: self._on_close})
        # a spare session until its CONFIG promotes it (the server sends no DATA before CONFIG)
        self._spare_handlers = frame_handlers(self._unexpected, {
            frames.DATA: self._ignore, frames.DATA_ORDERED: self._ignore,
            frames.CONFIG: self._on_spare_config, frames.CLOSE: self._on_spare_close})

    def _new_engine(self, policy: Policy) -> TunnelEngine:
        st = self.settings
        return TunnelEngine(self.out, policy, st.dedup_window, st.path.idle_probe_interval, st.pin_flows)

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def set_policy(self, policy: Policy) -> None:
        """Install a (new) policy: one scheduler per traffic class."""
        self.engine.set_policy(policy)

    @property
    def schedulers(self) -> list:
        return self.engine.schedulers

    @property
    def scheduler(self):
        """The default (last) class's scheduler: the only one without a policy file."""
        return self.engine.scheduler

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
            self.out.collect(slot.path)
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
                if slot.srtt is not None and not path.heard and now - path.created >= SILENT_BACKOFF:
                    self._abandon(slot, "the link changed", now, 0.0, report=False)
            elif path.state == P_DOWN and slot.joined:
                path.ping(now)
                self.out.collect(path)
                spare = slot.spare
                if spare is not None and not spare.heard and now - spare.created >= SILENT_BACKOFF:
                    self._drop_spare(slot, now)
                    spare = None
                est = path.est
                if spare is None and now - est.last_rx >= est.effective_dead_interval + REBIND_AFTER:
                    self._start_spare(slot, now)
        self.timer_dirty = True

    def _session(self, slot: PathSlot, key: Hashable, now: float) -> Path:
        """A new DTLS session towards the slot's server (its first flight is in the outputs)."""
        path = Path(DtlsSession.client(self.ctx, slot.mtu, now), slot.server, now, self.settings.path,
                    key=key, name=slot.name)
        path.priority = slot.priority
        self.out.collect(path)
        return path

    def _connect(self, slot: PathSlot, now: float) -> None:
        slot.attempts += 1
        slot.retry_at = slot.hello_at = None
        self._events.append(events.Connecting(slot.key, slot.attempts))
        slot.path = self._session(slot, slot.key, now)

    def close(self, now: float) -> None:
        for slot in self.slots.values():
            if slot.path is not None and slot.path.alive:
                slot.path.close(frames.encode(frames.Close(frames.CLOSE_NORMAL, "client shutting down")), now)
                self.out.collect(slot.path)
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
            self.timer_dirty = True
        records = path.receive(data, now)
        if path.updated and path.tunnel is not None:  # a PONG: lowest-rtt and balance follow at once
            path.updated = False
            path.tunnel.refresh()
        if handshaking and path.established:
            self._on_established(slot, now)
        handlers = self._handlers
        for rec in records:
            handlers[rec[0]](path, rec, tos, now)
            if path.state is P_CLOSED:  # a CLOSE ended the path: the rest of the datagram is void
                break
        if path.out:
            self.out.collect(path)
        if path.changed and slot.path is path:
            self.timer_dirty = True
            self._path_changed(slot, now)

    def _ignore(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        pass

    def _on_established(self, slot: PathSlot, now: float) -> None:
        path = slot.path
        if slot.srtt is None:
            slot.srtt = 0.0
        cert = path.dtls.peer_certificate
        self._events.append(events.PathUp(slot.key, common_name(cert) if cert else "?", path.dtls.cipher))
        self._send_hello(slot, now)

    def _hello(self, slot: PathSlot) -> bytes:
        return frames.encode(frames.Hello(frames.PROTOCOL_VERSION, self.tunnel_id, self.hello_mode, self.redundancy,
                                          slot.priority))

    def _send_hello(self, slot: PathSlot, now: float) -> None:
        path = slot.path
        if slot.hello_at is not None or path is None or not path.established:
            return
        if self.tunnel_id == frames.NEW_TUNNEL:
            creating = self._creating
            if creating is not None and creating is not slot and creating.path is not None and creating.path.alive:
                return  # another path is creating the tunnel: JOIN once CONFIG is here
            self._creating = slot
        path.send(self._hello(slot), now)
        self.out.collect(path)
        slot.hello_at = now

    def _parse(self, rec: bytes) -> Optional[frames.Frame]:
        try:
            return frames.parse(rec)
        except frames.FrameError:
            self.counters["malformed"] += 1
            return None

    def _unexpected(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        """HELLO, an unknown type, or DATA before the path joined: not for a client."""
        self.counters["malformed"] += 1

    def _on_config_record(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        frame = self._parse(rec)
        if frame is not None:
            self._on_config(self.slots[path.key], frame, now)

    def _on_close(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        frame = self._parse(rec)
        if frame is None:
            return
        path.close(None, now)
        backoff = None
        if frame.code == frames.CLOSE_REFUSED:
            backoff = BACKOFF_REFUSED
        elif frame.code == frames.CLOSE_UNKNOWN_TUNNEL:
            self._forget_tunnel()
            backoff = 0.0
        reason = frames.printable(frame.reason) or frame.code  # the server's words, escaped for the log
        self._lost(self.slots[path.key], f"server closed the path: {reason}", now, backoff=backoff)

    def _on_config(self, slot: PathSlot, config: frames.Config, now: float) -> None:
        new_tunnel = config.tunnel_id != self.tunnel_id
        if new_tunnel:  # a new sequence space: the old tunnel's paths no longer carry anything
            for other in self.slots.values():  # joined to a tunnel that is gone: JOIN the new one
                if other is not slot and other.joined:
                    other.hello_at = None
            old = self.engine
            old.detach_all()
            self.engine = self._new_engine(old.policy)
        self.tunnel_id = config.tunnel_id
        self._creating = None
        slot.path.silent_limit = INF  # joined: kept through any outage (spares cover a lost session)
        slot.backoff = BACKOFF_MIN
        self.engine.attach(slot.path)
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
            s.hello_at = None
        self.engine.detach_all()
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
        if path.tunnel is not None:
            path.tunnel.refresh()
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
        was_joined = slot.joined
        if path is not None:
            if path.srtt is not None:
                slot.srtt = path.srtt
            self.engine.detach(path)
        slot.hello_at = None
        if self._creating is slot:
            self._creating = None
            for other in self.slots.values():  # let another path create the tunnel
                self._send_hello(other, now)
        if report:
            self._events.append(events.PathDown(slot.key, reason))
        if was_joined and not self.engine.paths and self.state == C_UP:
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

    # -- packets from the TUN -------------------------------------------
    def send_packet(self, packet: bytes, now: float) -> None:
        """An IP packet read from the TUN device."""
        if not packet or packet[0] >> 4 != 4:
            if not packet or packet[0] >> 4 != 6 or not self.ipv6 or len(packet) < 40:
                self.counters["not_ipv4"] += 1  # IPv6 only when the server gave an IPv6 address
                return
            if packet[24] == 0xFF or (packet[8] == 0xFE and packet[9] & 0xC0 == 0x80):
                self.counters["local6"] += 1  # multicast or from a link-local address: for this link only
                return
        if self.state != C_UP or not self.engine.send(packet, now):
            self.counters["dropped_no_path"] += 1

    def warm(self) -> None:
        """keep_warm: one dummy pass over the packet path of every joined path (see tunnel/core/warm.py)."""
        if self.state == C_UP:
            self.engine.warm()

    # -- timers -------------------------------------------------------
    def handle_timer(self, now: float) -> float:
        """Run everything that is due and return when to run again (absolute time).

        Every deadline is computed by the code that acts on it (``_service_slot``,
        ``Path.service``, ``TunnelEngine.service``), so an idle tunnel wakes only to
        probe.  Running it early is always safe: it acts only on what is due.  After
        input that may need it sooner the core sets ``timer_dirty`` and the shell runs
        it again.

        It walks the slots twice: what one slot does can move another's deadline (a
        lost creating path lets the others send HELLO), so the second walk, which
        finds nothing more due, reads every deadline as the first one left it."""
        if self.state != C_CLOSED:
            self._service_all(now)
        t = self._service_all(now) if self.state != C_CLOSED else now + MAX_SLEEP
        self.timer_dirty = False
        return t

    def _service_all(self, now: float) -> float:
        t = now + MAX_SLEEP
        for slot in list(self.slots.values()):
            st = self._service_slot(slot, now)
            if st < t:
                t = st
        et = self.engine.service(now)
        return et if et < t else t

    def _service_slot(self, slot: PathSlot, now: float) -> float:
        """A slot's timers: reconnect back-off, its session's, HELLO retries, silence and spares."""
        if slot.retry_at is not None:
            if now < slot.retry_at:
                return slot.retry_at
            self._connect(slot, now)
        path = slot.path
        if path is None:
            return INF
        t = path.service(now)
        if path.out:
            self.out.collect(path)
        if path.changed and slot.path is path:
            self._path_changed(slot, now)
        if slot.path is not path:  # the session ended: its reconnect is the next thing
            return INF if slot.retry_at is None else slot.retry_at
        if slot.hello_at is not None and not slot.joined:
            if now >= slot.hello_at + HELLO_RETRY:
                slot.hello_at = None  # HELLO or CONFIG was lost: ask again
                self._send_hello(slot, now)
            if slot.hello_at is not None:
                t = min(t, slot.hello_at + HELLO_RETRY)
        st = self._check_silence(slot, path, now)
        return st if st < t else t

    def _check_silence(self, slot: PathSlot, path: Path, now: float) -> float:
        """Long outages (SILENT_ATTEMPT) and NAT rebinding (REBIND_AFTER: a spare session)."""
        if path.state == P_HANDSHAKING:
            if slot.srtt is None or path.heard:
                return INF
            due = path.created + max(SILENT_ATTEMPT, 4 * slot.srtt)
            if now < due:
                return due
            self._abandon(slot, "no answer from the server", now, SILENT_BACKOFF, report=False)
            return INF if slot.retry_at is None else slot.retry_at
        spare = slot.spare
        if not slot.joined or (spare is not None and path.est.last_ack > spare.created):
            if spare is not None:  # the old session answers again (a PONG: both ways): it stays
                self._drop_spare(slot, now)
            return INF
        if path.state != P_DOWN:
            return INF
        if spare is None:
            est = path.est
            # nothing at all received (not only no PONG): a lossy path that still delivers keeps its session
            due = max(est.last_rx + est.effective_dead_interval + REBIND_AFTER, slot.spare_retry)
            if now < due:
                return due
            self._start_spare(slot, now)
            spare = slot.spare
        t = spare.service(now)
        if spare.out:
            self.out.collect(spare)
        silent_until = INF if spare.heard else spare.created + max(SILENT_ATTEMPT, 4 * (slot.srtt or 0.0))
        limit = spare.created + SPARE_LIMIT
        if not spare.alive or now >= silent_until or now >= limit:
            self._drop_spare(slot, now, SILENT_BACKOFF)
            return slot.spare_retry
        if spare.established:
            if now >= slot.spare_hello_at + HELLO_RETRY:
                self._spare_join(slot, now)
            t = min(t, slot.spare_hello_at + HELLO_RETRY)
        return min(t, silent_until, limit)

    # -- NAT rebinding: a spare session per silent path ----------------
    def _start_spare(self, slot: PathSlot, now: float) -> None:
        key = SpareKey(slot.key)
        self._promoted.pop(key, None)
        self.counters["rebind_attempts"] += 1
        slot.spare_hello_at = 0.0
        self._spares[key] = slot
        self._events.append(events.Connecting(key, slot.attempts))  # the shell opens a new socket for it
        slot.spare = self._session(slot, key, now)

    def _drop_spare(self, slot: PathSlot, now: float, retry: float = 0.0) -> None:
        spare, slot.spare = slot.spare, None
        self._spares.pop(spare.key, None)
        if spare.established and spare.alive:  # the server may hold it: tell it (on the spare's socket)
            spare.close(frames.encode(frames.Close(frames.CLOSE_PATH, "spare session not needed")), now)
        elif spare.alive:
            spare.close(None, now)
        self.out.collect(spare)
        slot.spare_retry = now + retry

    def _spare_datagram(self, slot: PathSlot, data: bytes, now: float, tos: int) -> None:
        spare = slot.spare
        handshaking = spare.state == P_HANDSHAKING
        records = spare.receive(data, now)
        if handshaking and spare.established:
            self._spare_join(slot, now)
        for rec in records:
            # once CONFIG promoted the spare, the rest of the datagram is the tunnel's (e.g. held packets)
            (self._handlers if slot.path is spare else self._spare_handlers)[rec[0]](spare, rec, tos, now)
            if spare.state is P_CLOSED or (slot.spare is not spare and slot.path is not spare):
                return
        self.out.collect(spare)
        if not spare.alive and slot.spare is spare:
            self._drop_spare(slot, now, SILENT_BACKOFF)

    def _on_spare_config(self, spare: Path, rec: bytes, tos: int, now: float) -> None:
        frame = self._parse(rec)
        if frame is None:
            return
        if frame.tunnel_id != self.tunnel_id:
            self.counters["malformed"] += 1
            return
        slot = self._spares[spare.key]
        old = slot.path
        if old is not None and old.est is not None and old.est.last_ack > spare.created:
            self._drop_spare(slot, now)  # the old session got a PONG meanwhile: it stays
        else:
            self._promote(slot, now)

    def _on_spare_close(self, spare: Path, rec: bytes, tos: int, now: float) -> None:
        frame = self._parse(rec)
        if frame is not None:
            slot = self._spares[spare.key]
            spare.close(None, now)
            self._drop_spare(slot, now, SILENT_BACKOFF)
            if frame.code == frames.CLOSE_UNKNOWN_TUNNEL:  # the server forgot the tunnel: start over
                self._forget_tunnel()
                for other in list(self.slots.values()):  # and silent sessions belong to the old server
                    if other.path is not None and other.path.alive and (other is slot or other.path.state == P_DOWN):
                        self._abandon(other, "the server no longer knows the tunnel", now, 0.0)

    def _spare_join(self, slot: PathSlot, now: float) -> None:
        if self.tunnel_id == frames.NEW_TUNNEL:
            return
        slot.spare.send(self._hello(slot), now)
        self.out.collect(slot.spare)
        slot.spare_hello_at = now

    def _promote(self, slot: PathSlot, now: float) -> None:
        """The spare joined the tunnel: it replaces the silent session (dropped without a word:
        its socket closes, and the server has replaced it on the JOIN)."""
        spare, old = slot.spare, slot.path
        slot.spare = None
        key = spare.key
        del self._spares[key]
        self._promoted[key] = slot
        self.out.collect(spare)
        self.out.datagrams = [(slot.key if k == key else k, d, t) for k, d, t in self.out.datagrams]
        spare.key = slot.key
        spare.silent_limit = INF  # joined, like the session it replaces
        old.close(None, now)
        old.out.clear()
        old.changed = False
        self.engine.detach(old)
        self.engine.attach(spare)
        slot.path = spare
        slot.backoff = BACKOFF_MIN
        self.counters["rebinds"] += 1
        self._events.append(events.Rebound(slot.key))
        self._events.append(events.PathJoined(slot.key, slot.name))

    def stats(self) -> dict:
        paths = []
        for slot in self.slots.values():
            if slot.path is not None:
                st = slot.path.stats()
            else:
                st = {"addr": f"{slot.server[0]}:{slot.server[1]}", "name": slot.name, "state": "reconnecting"}
            st["joined"] = slot.joined
            paths.append(st)
        engine = self.engine.stats()
        c = self.counters
        return {
            "state": self.state,
            "mode": self.mode,
            "policy": self.policy.source,
            "classes": engine["classes"],
            "ecn_dropped": engine["ecn_dropped"],
            "address": str(self.config.addresses[0]) if self.config else None,
            "delivered": engine["delivered"],
            "duplicates": engine["duplicates"],
            "too_old": engine["too_old"],
            "reorder": engine["reorder"],
            "malformed": c["malformed"] + engine["malformed"],
            "dropped_no_path": c["dropped_no_path"],
            "not_ipv4": c["not_ipv4"],
            "address6": next((str(a) for a in self.config.addresses if a.version == 6), None) if self.config else None,
            "local6": c["local6"],
            "rebinds": c["rebinds"],
            "rebind_attempts": c["rebind_attempts"],
            "paths": paths,
        }
