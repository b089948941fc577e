"""Server state machine (sans-IO): DTLS listener, tunnels of many paths, inner routing.

Datagrams from an unknown address go to the stateless cookie listener; a
verified handshake becomes a :class:`Path`.  Its HELLO either creates a
tunnel for the client named by its certificate (tunnel id 0; an older tunnel
of that client is replaced) or JOINs an existing tunnel, which only the same
client may do.  Packets from the TUN are routed by inner destination address
and scheduled over the tunnel's paths; packets from a tunnel must carry that
tunnel's inner source address (anti-spoofing) and pass its dedup window.  A
tunnel whose paths are all gone lingers for a while so the client can JOIN
again without losing its address or sequence space.
"""

from __future__ import annotations

import ipaddress
import os
from collections import deque
from typing import Callable, Optional

from OpenSSL import SSL

from tunnel import events, frames
from tunnel.admission import (
    HALF_OPEN_TIMEOUT, HANDSHAKE_RATE, HELLO_DEADLINE, MAX_HANDSHAKES, HalfOpenTable, LogLimiter,
    PrefixRateLimiter, source_prefix,
)
from tunnel.dedup import DEFAULT_WINDOW, DedupWindow
from tunnel.dtls import DTLS_HEADER, DtlsListener, common_name, key_id
from tunnel.ecn import decapsulate
from tunnel.icmp import unreachable, unreachable6
from tunnel.path import P_DOWN, P_HANDSHAKING, TICK, Path
from tunnel.policy import Policy
from tunnel.pool import AddressPool, AddressPool6, PoolExhausted
from tunnel.reorder import Reorderer, floor, queue_of
from tunnel.revocation import Revocation
from tunnel.routes import PENDING_EXPIRY, PENDING_SIZE, RouteTable
from tunnel.scheduler import MODES, ExtraCopies, Scheduler
from tunnel.warm import warm_pass

LINGER = 30.0  # seconds a tunnel without paths is kept for the client to come back
IDLE_AFTER = 1.0  # seconds without DATA before a tunnel's paths probe every idle_probe_interval
MAX_SLEEP = 1.0  # the longest next_timer() ever waits (cookie secrets rotate on a minute scale)
INF = float("inf")
LIMIT_LOG_INTERVAL = 10.0  # a limit that keeps biting is reported at most this often


class ServerTunnel:
    """One client's tunnel: identity, inner address, sequence space, paths, scheduler."""

    __slots__ = (
        "id", "name", "address", "key", "paths", "seq", "dedup", "policy", "schedulers", "prefixes",
        "class_packets", "class_copies", "spoofed", "malformed", "ecn_dropped", "idle_since", "mode",
        "qseq", "reorder", "address6", "key6", "prefixes6", "dtls_dropped_gone", "last_data", "idle", "owner_key",
    )

    def __init__(self, tid: bytes, name: str, address: ipaddress.IPv4Interface, window: int, policy: Policy, mode: str):
        self.id = tid
        self.name = name
        self.owner_key = b""  # SHA-256 of the public key of the certificate that made it (dtls.key_id)
        self.address = address
        self.key = address.ip.packed  # route-table key: inner IPv4 address bytes
        self.prefixes: list[tuple[int, int]] = []  # (network, mask) the client may send from (its routed LAN)
        self.paths: list[Path] = []
        self.seq = 0
        self.dedup = DedupWindow(window)
        self.qseq = [0] * 256  # per-queue sequence numbers of DATA_ORDERED (reordering classes)
        self.dtls_dropped_gone = 0  # records DTLS dropped on paths no longer in the tunnel
        self.reorder = Reorderer()
        self.mode = mode  # the mode without a policy (the client's choice or the server's)
        self.set_policy(policy)
        self.spoofed = 0
        self.malformed = 0
        self.ecn_dropped = 0
        self.idle_since: Optional[float] = None  # when the last path went away
        self.last_data = float("-inf")  # when DATA last went either way (idle probing after IDLE_AFTER)
        self.idle = False  # its paths probe every idle_probe_interval
        self.address6: Optional[ipaddress.IPv6Interface] = None  # with pool6 only
        self.key6: Optional[bytes] = None  # its 16 bytes
        self.prefixes6: list[tuple[int, int]] = []  # IPv6 (network, mask) the client may send from

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.schedulers = [Scheduler(c.mode, c.redundancy, target_loss=c.target_loss) for c in policy.classes]
        self.class_packets = [0] * len(policy.classes)
        self.class_copies = [0] * len(policy.classes)
        self.refresh()

    @property
    def scheduler(self) -> Scheduler:
        """The default (last) class's scheduler: the only one without a policy file."""
        return self.schedulers[-1]

    def refresh(self) -> None:
        for s in self.schedulers:
            s.refresh(self.paths)

    def stats(self) -> dict:
        return {
            "name": self.name,
            "address": str(self.address),
            "address6": str(self.address6) if self.address6 else None,
            "mode": self.mode,
            "policy": self.policy.source,
            "classes": [
                {"name": c.name, "mode": c.mode, "outer_dscp": c.outer_dscp, "packets": n, "copies": k}
                for c, n, k in zip(self.policy.classes, self.class_packets, self.class_copies)
            ],
            "ecn_dropped": self.ecn_dropped,
            "delivered": self.dedup.delivered,
            "duplicates": self.dedup.duplicates,
            "too_old": self.dedup.too_old,
            "reorder": self.reorder.stats(),
            "spoofed": self.spoofed,
            "malformed": self.malformed,
            "dtls_dropped": self.dtls_dropped_gone + sum(p.dtls.records_dropped for p in self.paths),
            "paths": [p.stats() for p in self.paths],
        }


class ServerCore:
    def __init__(
        self,
        ctx: SSL.Context,
        mtu: int,
        pool: AddressPool,
        inner_mtu: int,
        routes: list = (),
        mode: str = "client",
        probe_interval: float = 0.1,
        dead_interval: float = 0.3,
        timeout: float = 3.0,
        allowed_clients: Optional[set[str]] = None,
        window: int = DEFAULT_WINDOW,
        linger: float = LINGER,
        random_bytes: Callable[[int], bytes] = os.urandom,
        policy: Optional[Policy] = None,
        client_routes: Optional[dict[str, list]] = None,
        client_to_client: bool = False,
        unknown_destination: str = "drop",
        max_tunnels: int = 1024,
        max_paths: int = 8,
        handshake_rate: float = HANDSHAKE_RATE,
        max_handshakes: int = MAX_HANDSHAKES,
        pending_size: int = PENDING_SIZE,
        pending_expiry: float = PENDING_EXPIRY,
        revocation: Optional[Revocation] = None,
        pool6: Optional[AddressPool6] = None,
        idle_probe_interval: Optional[float] = None,
    ):
        if mode != "client" and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.listener = DtlsListener(ctx, mtu)
        self.pool = pool
        self.pool6 = pool6  # None: the tunnel carries IPv4 only
        self.inner_mtu = inner_mtu
        self.routes = list(routes)
        self.mode = mode  # "client": use the mode the client asks for in HELLO
        self.probe_interval = probe_interval
        self.dead_interval = dead_interval
        self.idle_probe_interval = idle_probe_interval  # None: always probe every probe_interval
        self.timeout = timeout
        self.allowed = allowed_clients  # None: any client with a certificate from our CA
        self.revocation = revocation or Revocation()  # CRL serials and denied names
        self.window = window
        self.linger = linger
        self.policy = policy  # None: each tunnel uses one class with its client's mode
        self.client_routes = client_routes or {}  # name -> prefixes the client routes (its LAN)
        self.client_to_client = client_to_client
        self.icmp_unreachable = unknown_destination == "icmp"
        self.max_tunnels = max_tunnels
        self.max_paths = max_paths
        self.handshake_rate = handshake_rate
        self.max_handshakes = max_handshakes
        self._half_open = HalfOpenTable(max_handshakes)  # paths still in the DTLS handshake, by source prefix
        self._refused = False  # the ClientHello being accepted was refused by a handshake limit
        self._handshake_rate = PrefixRateLimiter(handshake_rate)  # per source prefix (tunnel/admission.py)
        self._refusal_log = LogLimiter()  # refusals are counted always, logged at a bounded rate
        self._unjoined: dict[tuple, float] = {}  # established paths without a tunnel yet -> when established
        self._limit_logged: dict[str, float] = {}
        self.route_table: RouteTable[ServerTunnel] = RouteTable(pending_size, pending_expiry)
        self._random = random_bytes
        self.paths: dict[tuple, Path] = {}  # underlay address -> path
        self._tunnel_of: dict[tuple, ServerTunnel] = {}  # underlay address -> tunnel (after HELLO)
        self.tunnels: dict[bytes, ServerTunnel] = {}  # tunnel id -> tunnel
        self.timer_dirty = True  # input may have made next_timer() earlier: the shell asks again
        self._timer_ran = -INF  # when handle_timer last ran (next_timer() is at least TICK after it)
        self._last_tunnel: Optional[ServerTunnel] = None
        self.by_name: dict[str, ServerTunnel] = {}
        self.outbox: list[tuple[tuple, bytes, int]] = []  # (peer address, datagram, outer TOS)
        self._extra = ExtraCopies()  # target_loss copies waiting for the next tick
        self.to_tun: list[bytes] = []
        self._events: deque = deque()
        self.counters = {
            "junk": 0,  # datagrams from unknown addresses that were no handshake
            "cookies_sent": 0,
            "handshakes_failed": 0,
            "no_route": 0,  # packets from the TUN for an address no tunnel has
            "no_path": 0,  # packets for a tunnel that has no path right now
            "not_ipv4": 0,  # neither IPv4 nor (with pool6) IPv6
            "local6": 0,  # IPv6 multicast or link-local packets from the TUN: for this link only
            "icmp_sent": 0,  # unreachables for packets with no route (unknown_destination = "icmp")
            "client_to_client_blocked": 0,
            "tunnels_refused": 0,  # max_tunnels
            "paths_refused": 0,  # max_paths
            "handshakes_rate_limited": 0,
            "revoked": 0,  # handshakes refused and tunnels closed for a revoked or denied client
            "handshakes_refused": 0,  # max_handshakes: full, and the sender's prefix holds the most slots
            "handshakes_evicted": 0,  # half-open handshakes that made room for one from a less busy prefix
            "hello_timeouts": 0,  # established paths closed for sending no HELLO/JOIN within HELLO_DEADLINE
            "unjoined_refused": 0,  # established paths refused: too many without a tunnel (per name or in all)
            "identity_refused": 0,  # JOIN or tunnel replacement by a certificate with another key
            "refusals_unlogged": 0,  # refusals counted but not logged (rate limit of the refusal lines)
            "paths_replaced": 0,  # stale paths a JOIN replaced (NAT rebinding, reconnect after an outage)
        }

    # -- datagrams from the network ----------------------------------
    def receive_datagram(self, data: bytes, addr: tuple, now: float, tos: int = 0) -> None:
        """One datagram from ``addr``; ``tos``: its outer TOS byte (for ECN)."""
        path = self.paths.get(addr)
        if path is None:
            self._new_peer(data, addr, now)
            return
        handshaking = path.state == P_HANDSHAKING
        records = path.receive(data, now)
        if path.updated:  # a PONG: lowest-rtt and balance follow the new estimates at once
            t = self._tunnel_of.get(addr)
            if t is not None:
                path.updated = False
                t.refresh()
        if handshaking and path.established:
            self.timer_dirty = True  # its first probe is due now
            self._on_established(path, now)
            if not path.alive:  # refused (revoked): nothing it sent counts
                records = []
        if records:
            tunnel = self._tunnel_of.get(addr)
            for rec in records:
                if rec[0] == frames.DATA and tunnel is not None:
                    self._on_data(tunnel, path, rec, tos, now)
                elif rec[0] == frames.DATA_ORDERED and tunnel is not None:
                    self._on_data_ordered(tunnel, path, rec, tos, now)
                else:
                    self._on_control(path, tunnel, rec, now)
                    if not path.alive:  # refused or closed: ignore the rest of the datagram
                        break
        if path.out:
            self._flush(path)
        if path.changed:
            self._path_changed(path, now)

    def _new_peer(self, data: bytes, addr: tuple, now: float) -> None:
        if len(data) < DTLS_HEADER or data[0] != 22:
            self.counters["junk"] += 1
            return
        self._refused = False
        try:
            session, replies = self.listener.accept(data, addr, now, lambda: self._admit(addr, now))
        except Exception:  # pyOpenSSL can raise odd errors on garbage; nothing is kept
            self.counters["junk"] += 1
            return
        for r in replies:
            self.outbox.append((addr, r, 0))
        if session is None:
            if replies:
                self.counters["cookies_sent"] += 1
            elif not self._refused:
                self.counters["junk"] += 1
            return
        path = Path(session, addr, now, self.probe_interval, self.dead_interval, self.timeout,
                    idle_probe_interval=self.idle_probe_interval, handshake_timeout=HALF_OPEN_TIMEOUT)
        self.paths[addr] = path
        self.timer_dirty = True
        self._half_open.add(addr, source_prefix(addr[0]))
        if path.out:
            self._flush(path)

    def _admit(self, addr: tuple, now: float) -> bool:
        """May a ClientHello whose cookie is valid start a handshake?  Asked before OpenSSL does
        any work for it (the server's first flight costs a key exchange and a signature)."""
        prefix = source_prefix(addr[0])
        if not self._handshake_rate.allow(prefix, now):
            self.counters["handshakes_rate_limited"] += 1
            self._limit("handshake_rate", addr, f"more than {self.handshake_rate:g} handshakes/s from {prefix}", now)
        elif len(self._half_open) >= self.max_handshakes and not self._make_room(prefix, now):
            self.counters["handshakes_refused"] += 1
            self._limit("max_handshakes", addr,
                        f"max_handshakes ({self.max_handshakes}) in progress, the most of them from {prefix}", now)
        else:
            return True
        self._refused = True
        return False

    def _make_room(self, prefix: str, now: float) -> bool:
        """The half-open table is full: evict the oldest handshake of the busiest source prefix
        if ``prefix`` holds fewer (tunnel/admission.py); False if the newcomer is refused."""
        victim = self._half_open.victim(prefix)
        if victim is None:
            return False
        path = self.paths.get(victim)
        self._half_open.discard(victim)
        self.counters["handshakes_evicted"] += 1
        self._limit("handshakes_evicted", victim,
                    f"max_handshakes ({self.max_handshakes}) in progress: the oldest from the busiest source "
                    f"prefix {source_prefix(victim[0])} made room", now)
        if path is not None and path.state == P_HANDSHAKING:  # silently: it never proved anything
            path.close(None, now)
            path.out.clear()
            path.changed = False
            del self.paths[victim]
        return True

    def _limit(self, kind: str, addr, reason: str, now: float) -> None:
        """Report a biting limit (at most every LIMIT_LOG_INTERVAL per kind; the counter counts all)."""
        last = self._limit_logged.get(kind)
        if last is None or now - last >= LIMIT_LOG_INTERVAL:
            self._limit_logged[kind] = now
            self._events.append(events.LimitHit(kind, addr, reason))

    def _on_established(self, path: Path, now: float = 0.0) -> None:
        """The handshake completed: everything that can be checked before HELLO is checked now
        (name, revocation, listing, how many paths without a tunnel), and the path must HELLO or
        JOIN within HELLO_DEADLINE or it is closed (tunnel/admission.py)."""
        self._half_open.discard(path.addr)
        cert = path.dtls.peer_certificate
        path.name = common_name(cert) if cert is not None else ""
        path.peer_key = key_id(cert) if cert is not None else b""
        self._events.append(events.PathUp(path.addr, path.name, path.dtls.cipher))
        if not path.name:
            return self._refuse(path, frames.CLOSE_REFUSED, "client certificate without a common name (CN)", now)
        reason = self.revocation.check(path.name, cert.serial_number if cert is not None else None)
        if reason is not None:
            self.counters["revoked"] += 1
            return self._refuse(path, frames.CLOSE_REFUSED, reason, now)
        if self.allowed is not None and path.name not in self.allowed:
            return self._refuse(path, frames.CLOSE_REFUSED, f"client '{path.name}' is not listed in the server config", now)
        name = path.name
        paths = self.paths
        same = sum(1 for a in self._unjoined if (p := paths.get(a)) is not None and p.name == name)
        if same >= self.max_paths or len(self._unjoined) >= self.max_handshakes:
            self.counters["unjoined_refused"] += 1
            self._limit("unjoined_paths", path.addr, f"too many paths without a tunnel ({same} of '{name}', "
                        f"{len(self._unjoined)} in all)", now)
            return self._refuse(path, frames.CLOSE_REFUSED, "too many paths", now)
        self._unjoined[path.addr] = now

    def _on_data(self, tunnel: ServerTunnel, path: Path, rec: bytes, tos: int, now: float) -> None:
        tunnel.last_data = now
        if tunnel.idle:
            self._wake(tunnel, now)
        try:
            seq, pkt = frames.parse_data(rec)
        except frames.FrameError:
            tunnel.malformed += 1
            return
        if seq > path.rx_seq:
            path.rx_seq = seq
        if not tunnel.dedup.accept(seq):  # first: copies of one packet count once below
            return
        if (len(pkt) >= 20 and pkt[0] >> 4 == 4 and pkt[12:16] == tunnel.key and tos & 3 != 3
                and self.route_table.lookup(pkt[16:20]) is None):
            self.to_tun.append(pkt)  # the common case, per packet: _admit_packet and _deliver in short
        else:
            pkt = self._admit_packet(tunnel, pkt, tos)
            if pkt is not None:
                self._deliver(tunnel, pkt, now)
        if tunnel.reorder.waiting:  # this packet may prove a gap in an ordered queue lost
            self._reorder_release(tunnel, now)

    def _on_data_ordered(self, tunnel: ServerTunnel, path: Path, rec: bytes, tos: int, now: float) -> None:
        tunnel.last_data = now
        if tunnel.idle:
            self._wake(tunnel, now)
        try:
            seq, queue, qseq, hold_ms, pkt = frames.parse_data_ordered(rec)
        except frames.FrameError:
            tunnel.malformed += 1
            return
        if seq > path.rx_seq:
            path.rx_seq = seq
        if not tunnel.dedup.accept(seq):
            return
        pkt = self._admit_packet(tunnel, pkt, tos)
        if pkt is None:
            return
        out: list = []
        if not tunnel.reorder.waiting:
            self.timer_dirty = True  # a packet held now has a deadline
        tunnel.reorder.push(queue, qseq, hold_ms / 1000.0, seq, pkt, now, floor(tunnel.paths), out)
        for p in out:
            self._deliver(tunnel, p, now)

    def _reorder_release(self, tunnel: ServerTunnel, now: float, expire: bool = False) -> None:
        out: list = []
        if expire:
            tunnel.reorder.expire(now, out)
        tunnel.reorder.progress(floor(tunnel.paths), out)
        for p in out:
            self._deliver(tunnel, p, now)

    def _admit_packet(self, tunnel: ServerTunnel, pkt: bytes, tos: int) -> Optional[bytes]:
        """The packet if it may enter (anti-spoofing, RFC 6040 decapsulation), else None."""
        # anti-spoofing: a packet must come from the tunnel's own inner address (or its LAN)
        version = pkt[0] >> 4
        if not ((version == 4 and len(pkt) >= 20 and (pkt[12:16] == tunnel.key or self._from_prefix(tunnel, pkt)))
                or (version == 6 and len(pkt) >= 40
                    and (pkt[8:24] == tunnel.key6 or self._from_prefix6(tunnel, pkt)))):
            tunnel.spoofed += 1
            return None
        if tos & 3 == 3:  # outer CE (RFC 6040)
            pkt = decapsulate(tos, pkt)
            if pkt is None:
                tunnel.ecn_dropped += 1
                return None
        return pkt

    def _deliver(self, tunnel: ServerTunnel, pkt: bytes, now: float) -> None:
        target = self.route_table.lookup(pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40])
        if target is None or target is tunnel:
            self.to_tun.append(pkt)
        elif self.client_to_client:
            self._send_via(target, pkt, now)
        else:
            self.counters["client_to_client_blocked"] += 1

    @staticmethod
    def _from_prefix(tunnel: ServerTunnel, pkt: bytes) -> bool:
        if not tunnel.prefixes:
            return False
        src = int.from_bytes(pkt[12:16], "big")
        return any(src & mask == net for net, mask in tunnel.prefixes)

    @staticmethod
    def _from_prefix6(tunnel: ServerTunnel, pkt: bytes) -> bool:
        if not tunnel.prefixes6:
            return False
        src = int.from_bytes(pkt[8:24], "big")
        return any(src & mask == net for net, mask in tunnel.prefixes6)

    def _on_control(self, path: Path, tunnel: Optional[ServerTunnel], rec: bytes, now: float) -> None:
        try:
            frame = frames.parse(rec)
        except frames.FrameError:
            path.malformed += 1
            return
        if isinstance(frame, frames.Hello):
            self._on_hello(path, frame, now)
        elif isinstance(frame, frames.Close):
            path.close(None, now)
            path.reason = f"client closed: {frames.printable(frame.reason) or frame.code}"
            if frame.code == frames.CLOSE_NORMAL and tunnel is not None:  # the client is going away
                self._remove_tunnel(tunnel, path.reason, now, frames.CLOSE_NORMAL)
        else:
            path.malformed += 1

    def _refuse(self, path: Path, code: int, reason: str, now: float, peer_reason: Optional[str] = None) -> None:
        """Close ``path`` with CLOSE ``code``; ``reason`` is logged, ``peer_reason`` (default: the
        same) is what the peer is told: it must not name another client."""
        self._report_refused(path.addr, reason, now)
        path.close(frames.encode(frames.Close(code, reason if peer_reason is None else peer_reason)), now)
        path.reason = "refused"
        self._flush(path)

    def _report_refused(self, addr: tuple, reason: str, now: float) -> None:
        """A Refused event for the log, at a bounded rate per source prefix and in all."""
        log = self._refusal_log
        if log.allow(source_prefix(addr[0]), now):
            self._events.append(events.Refused(addr, reason, log.take_suppressed()))
        else:
            self.counters["refusals_unlogged"] += 1

    def _on_hello(self, path: Path, hello: frames.Hello, now: float) -> None:
        name = path.name
        if hello.version != frames.PROTOCOL_VERSION:
            return self._refuse(path, frames.CLOSE_VERSION, f"protocol version {hello.version} not supported", now)
        if self.allowed is not None and name not in self.allowed:
            return self._refuse(path, frames.CLOSE_REFUSED, f"client '{name}' is not listed in the server config", now)
        attached = self._tunnel_of.get(path.addr)
        if attached is not None:
            if hello.tunnel_id in (frames.NEW_TUNNEL, attached.id):  # our CONFIG was lost: send it again
                return self._send_config(attached, path, now)
            return self._refuse(path, frames.CLOSE_PROTOCOL, "HELLO for another tunnel on a joined path", now)
        if not 0 <= hello.mode <= len(MODES):
            return self._refuse(path, frames.CLOSE_PROTOCOL, f"unknown scheduling mode {hello.mode}", now)
        path.priority = hello.priority
        if hello.tunnel_id != frames.NEW_TUNNEL:
            return self._on_join(path, hello, now)
        old = self.by_name.get(name)
        if old is None and len(self.tunnels) >= self.max_tunnels:
            self.counters["tunnels_refused"] += 1
            self._limit("max_tunnels", path.addr, f"max_tunnels ({self.max_tunnels}) reached", now)
            return self._refuse(path, frames.CLOSE_REFUSED, "server full", now)
        note = ""
        if old is not None and old.owner_key != path.peer_key:
            # Another certificate of the same name (a re-issued one, or a second one the CA should
            # not have issued).  It may not take a tunnel that is still in use; one whose paths are
            # all silent or gone it may, and the log says so.
            if any(p.established and p.state != P_DOWN for p in old.paths):
                self.counters["identity_refused"] += 1
                return self._refuse(
                    path, frames.CLOSE_REFUSED,
                    f"a certificate of '{name}' with another key (SHA-256 of its public key "
                    f"{path.peer_key.hex()[:16]}...) may not replace the live tunnel of the key "
                    f"{old.owner_key.hex()[:16]}...", now, "refused")
            note = (f"a certificate with another key ({path.peer_key.hex()[:16]}..., was "
                    f"{old.owner_key.hex()[:16]}...) replaced its tunnel, which had no live path")
        if old is not None:
            self._remove_tunnel(old, "replaced by a new connection of the same client", now, frames.CLOSE_REPLACED)
        try:
            address = self.pool.lease(name)
        except PoolExhausted as exc:
            return self._refuse(path, frames.CLOSE_REFUSED, str(exc), now)
        address6 = None
        if self.pool6 is not None:
            try:
                address6 = self.pool6.lease(name)
            except PoolExhausted as exc:
                self.pool.release(name)
                return self._refuse(path, frames.CLOSE_REFUSED, str(exc), now)
        mode = self.mode if self.mode != "client" else MODES[(hello.mode or 1) - 1]
        policy = self.policy or Policy.single(mode, hello.redundancy or 2)
        tunnel = ServerTunnel(self._random(frames.TUNNEL_ID_LEN), name, address, self.window, policy, mode)
        tunnel.owner_key = path.peer_key
        self.tunnels[tunnel.id] = tunnel
        self.by_name[name] = tunnel
        self.route_table.add(ipaddress.IPv4Network(f"{address.ip}/32"), tunnel)
        if address6 is not None:
            tunnel.address6, tunnel.key6 = address6, address6.ip.packed
            self.route_table.add(ipaddress.IPv6Network(f"{address6.ip}/128"), tunnel)
        for prefix in self.client_routes.get(name, ()):
            self.route_table.add(prefix, tunnel)
            (tunnel.prefixes if prefix.version == 4 else tunnel.prefixes6).append(
                (int(prefix.network_address), int(prefix.netmask)))
        self._attach(tunnel, path, now)
        self._events.append(events.ClientConnected(name, str(address), path.addr, old is not None, note))

    def _on_join(self, path: Path, hello: frames.Hello, now: float) -> None:
        tunnel = self.tunnels.get(hello.tunnel_id)
        if tunnel is None:
            return self._refuse(path, frames.CLOSE_UNKNOWN_TUNNEL, "unknown tunnel", now)
        if tunnel.name != path.name:
            return self._refuse(path, frames.CLOSE_REFUSED,
                                f"client '{path.name}' may not join the tunnel of '{tunnel.name}'", now, "refused")
        if tunnel.owner_key != path.peer_key:
            self.counters["identity_refused"] += 1
            return self._refuse(
                path, frames.CLOSE_REFUSED,
                f"a certificate of '{path.name}' with another key (SHA-256 of its public key "
                f"{path.peer_key.hex()[:16]}..., the tunnel's {tunnel.owner_key.hex()[:16]}...) may not join its tunnel",
                now, "refused")
        self._replace_stale(tunnel, now)
        if len(tunnel.paths) >= self.max_paths:
            self.counters["paths_refused"] += 1
            self._limit("max_paths", path.addr, f"max_paths ({self.max_paths}) reached for '{tunnel.name}'", now)
            return self._refuse(path, frames.CLOSE_REFUSED, "too many paths", now)
        self._attach(tunnel, path, now)
        self._events.append(events.PathJoined(path.addr, tunnel.name))

    def _replace_stale(self, tunnel: ServerTunnel, now: float) -> None:
        """A JOIN replaces the tunnel's stale paths: no PONG for the dead interval (silent ones
        included).  The client rejoins from a new source port when a path stops answering (NAT
        rebinding, docs/PROTOCOL.md), so the old one is most likely gone for good.  A down path
        that answers again is not stale (its first PONG after an outage counts, not the three
        that bring it up): its link is back, and the client keeps it and drops its spare."""
        stale = [p for p in tunnel.paths if now - p.est.last_ack >= p.est.effective_dead_interval]
        for p in stale:
            self.counters["paths_replaced"] += 1
            p.close(frames.encode(frames.Close(frames.CLOSE_PATH, "replaced by a newer path of the client")), now)
            self._flush(p)
            self._drop_path(p, "stale: replaced by a newer path of the client", now)

    def _attach(self, tunnel: ServerTunnel, path: Path, now: float) -> None:
        self._unjoined.pop(path.addr, None)
        path.silent_limit = self.timeout + self.linger  # kept through an outage, down (docs/PROTOCOL.md)
        tunnel.paths.append(path)
        tunnel.idle_since = None
        tunnel.refresh()
        self._tunnel_of[path.addr] = tunnel
        self._send_config(tunnel, path, now)
        for pkt in self.route_table.flush(tunnel, now):  # the pending route is live again
            self._send_via(tunnel, pkt, now)

    def _send_config(self, tunnel: ServerTunnel, path: Path, now: float) -> None:
        config = frames.Config(
            tunnel.id,
            [tunnel.address] + ([tunnel.address6] if tunnel.address6 is not None else []),
            self.inner_mtu,
            int(self.probe_interval * 1000),
            int(self.timeout * 1000),
            self.routes,
        )
        path.send(frames.encode(config), now)
        self._flush(path)

    # -- packets from the TUN device ----------------------------------
    def send_packet(self, pkt: bytes, now: float) -> None:
        version = pkt[0] >> 4 if pkt else 0
        if version == 4 and len(pkt) >= 20:
            dst = pkt[16:20]
        elif version == 6 and len(pkt) >= 40 and self.pool6 is not None:
            if pkt[24] == 0xFF or (pkt[8] == 0xFE and pkt[9] & 0xC0 == 0x80):
                self.counters["local6"] += 1  # multicast (the TUN's own MLD) or link-local: this link only
                return
            dst = pkt[24:40]
        else:
            self.counters["not_ipv4"] += 1
            return
        tunnel = self.route_table.lookup(dst)
        if tunnel is None:
            self.counters["no_route"] += 1
            if self.icmp_unreachable:
                if version == 4:
                    reply = unreachable(self.pool.server.ip.packed, pkt)
                else:
                    reply = unreachable6(self.pool6.server.ip.packed, pkt)  # type: ignore[union-attr]
                if reply is not None:
                    self.to_tun.append(reply)
                    self.counters["icmp_sent"] += 1
            return
        if not tunnel.paths or tunnel.idle_since is not None:  # a pending route: hold a few packets until a path is back
            if not self.route_table.enqueue(tunnel, pkt, now):
                self.counters["no_path"] += 1
            return
        self._send_via(tunnel, pkt, now)

    def _wake(self, tunnel: ServerTunnel, now: float) -> None:
        """Traffic on an idle tunnel: its paths probe at once and every probe_interval again."""
        tunnel.idle = False
        for p in tunnel.paths:
            p.set_idle(False, now)
        self.timer_dirty = True

    def _send_via(self, tunnel: ServerTunnel, pkt: bytes, now: float) -> None:
        tunnel.last_data = now
        if tunnel.idle:
            self._wake(tunnel, now)
        self._last_tunnel = tunnel  # the one keep_warm warms
        policy = tunnel.policy
        c = policy.classify(pkt)
        sched = tunnel.schedulers[c.index]
        paths = sched.select(pkt)
        if not paths:
            self.counters["no_path"] += 1
            return
        tos = policy.outer_tos(c, pkt)
        tunnel.seq = seq = tunnel.seq + 1
        if c.reorder:
            q = queue_of(pkt)
            qseq = tunnel.qseq[q]
            tunnel.qseq[q] = (qseq + 1) & 0xFFFF
            record = frames.encode_data_ordered(seq, q, qseq, c.hold_units, pkt)
        else:
            record = frames.encode_data(seq, pkt)
        outbox = self.outbox
        for path in paths:
            dgram = path.encrypt(record, now)
            if dgram is not None:
                outbox.append((path.addr, dgram, tos))
        tunnel.class_packets[c.index] += 1
        tunnel.class_copies[c.index] += len(paths)
        if sched.extra:  # target_loss: more copies, one round per tick
            tunnel.class_copies[c.index] += sched.extra_copies
            if not self._extra.pending:
                self.timer_dirty = True
            self._extra.defer(sched.extra, record, tos)

    def warm(self) -> None:
        """keep_warm: one dummy pass over the packet path of the tunnel that sent last (tunnel/warm.py)."""
        tunnel = self._last_tunnel
        if tunnel is not None and self.tunnels.get(tunnel.id) is tunnel:
            for path in tunnel.paths:
                warm_pass(tunnel.policy, path)

    # -- output -------------------------------------------------------
    def _flush(self, path: Path) -> None:
        addr = path.addr
        for d in path.out:
            self.outbox.append((addr, d, 0))
        path.out.clear()

    def datagrams_to_send(self) -> list[tuple[tuple, bytes, int]]:
        out, self.outbox = self.outbox, []
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    # -- timers and teardown -----------------------------------------
    def next_timer(self, now: float) -> float:
        """When :meth:`handle_timer` must run next (absolute time): at
        :meth:`next_deadline`, but not sooner than :data:`TICK` after it last ran
        (each run walks every path: a server with many clients runs it at most
        every TICK, as with a fixed tick; one with a few sleeps between probes).
        Input that may need it sooner sets ``timer_dirty`` and the shell asks again."""
        return max(self.next_deadline(now), self._timer_ran + TICK)

    def next_deadline(self, now: float) -> float:
        """The earliest moment handle_timer has something to do: a path's probe,
        dead interval, timeout or handshake retransmission, a reorder hold, a
        tunnel's linger, a queued packet's expiry; :data:`MAX_SLEEP` at most."""
        t = now + MAX_SLEEP
        if self._extra.pending:  # one round of extra copies per timer
            t = now + TICK
        if self._unjoined:
            t = min(t, next(iter(self._unjoined.values())) + HELLO_DEADLINE)
        for path in self.paths.values():
            pt = path.get_timer()
            if pt is not None and pt < t:
                t = pt
        for tunnel in self.tunnels.values():
            if tunnel.reorder.waiting:
                d = tunnel.reorder.next_deadline()
                if d is not None and d < t:
                    t = d
            if tunnel.idle_since is not None and tunnel.idle_since + self.linger < t:
                t = tunnel.idle_since + self.linger
            if self.idle_probe_interval and tunnel.paths:
                if not tunnel.idle:
                    if tunnel.last_data + IDLE_AFTER < t:
                        t = max(tunnel.last_data + IDLE_AFTER, now)
                elif any(p.est is not None and not p.est.idle and p.established for p in tunnel.paths):
                    return now  # a path that joined an idle tunnel: make it probe slowly too
            for p in tunnel.paths:
                if p.updated:
                    return now
        d = self.route_table.next_expiry()
        return t if d is None or d > t else d

    def handle_timer(self, now: float) -> None:
        self._timer_ran = now
        self.listener.cookies.rotate(now)
        while self._unjoined:  # oldest first: paths that never sent HELLO/JOIN
            addr, since = next(iter(self._unjoined.items()))
            if now - since < HELLO_DEADLINE:
                break
            del self._unjoined[addr]
            path = self.paths.get(addr)
            if path is not None and path.alive and addr not in self._tunnel_of:
                self.counters["hello_timeouts"] += 1
                self._refuse(path, frames.CLOSE_PROTOCOL, f"no HELLO within {HELLO_DEADLINE:g} s of the handshake", now)
                if path.changed:
                    self._path_changed(path, now)
        for path in list(self.paths.values()):
            t = path.get_timer()
            if t is not None and now >= t:
                path.handle_timer(now)
                if path.out:
                    self._flush(path)
                if path.changed:
                    self._path_changed(path, now)
        self.route_table.expire(now)
        if self._extra.pending:
            self._extra.send(now, self.outbox, lambda path: path.addr)
        for tunnel in list(self.tunnels.values()):
            if tunnel.reorder.waiting:
                self._reorder_release(tunnel, now, expire=True)
            if any(p.updated for p in tunnel.paths):  # new estimates: lowest-rtt and balance follow them
                for p in tunnel.paths:
                    p.updated = False
                tunnel.refresh()
            if self.idle_probe_interval and now - tunnel.last_data >= IDLE_AFTER and tunnel.paths:
                tunnel.idle = True  # no traffic: probe slowly (new paths too)
                for p in tunnel.paths:
                    p.set_idle(True, now)
            if tunnel.paths:  # paths all silent for `timeout` count as none (docs/PROTOCOL.md, Long outages)
                heard = max(p.est.last_rx if p.est is not None else p.created for p in tunnel.paths)
                if now - heard >= self.timeout:
                    if tunnel.idle_since is None:  # packets wait in the pending route meanwhile
                        tunnel.idle_since = heard + self.timeout
                        self.timer_dirty = True
                elif tunnel.idle_since is not None:  # heard again: what was held goes out
                    tunnel.idle_since = None
                    for pkt in self.route_table.flush(tunnel, now):
                        self._send_via(tunnel, pkt, now)
            if tunnel.idle_since is not None and now - tunnel.idle_since >= self.linger:
                if tunnel.paths:  # silent ones (each is closed at timeout + linger anyway)
                    self._remove_tunnel(tunnel, f"no path for {self.linger:g} s", now, frames.CLOSE_UNKNOWN_TUNNEL)
                else:
                    self._forget_tunnel(tunnel, f"no path for {self.linger:g} s")

    def _path_changed(self, path: Path, now: float) -> None:
        path.changed = False
        tunnel = self._tunnel_of.get(path.addr)
        if path.heard_again:  # after a silence: packets held while every path was silent go out now
            path.heard_again = False
            if tunnel is not None and tunnel.idle_since is not None and tunnel.paths:
                tunnel.idle_since = None
                for pkt in self.route_table.flush(tunnel, now):
                    self._send_via(tunnel, pkt, now)
            if path.state == P_DOWN:
                return  # no state change to report
        if path.alive:
            if tunnel is not None:
                tunnel.refresh()
                self._events.append(events.PathState(path.addr, tunnel.name, path.state))
            return
        self._drop_path(path, path.reason, now)

    def _drop_path(self, path: Path, reason: str, now: float) -> None:
        if self.paths.get(path.addr) is not path:
            return
        del self.paths[path.addr]
        self._half_open.discard(path.addr)
        self._unjoined.pop(path.addr, None)
        tunnel = self._tunnel_of.pop(path.addr, None)
        if tunnel is None:
            if not path.name and reason not in ("closed locally", "refused"):
                self.counters["handshakes_failed"] += 1
                self._report_refused(path.addr, reason, now)
            return
        self._events.append(events.PathDown(path.addr, reason))
        if path in tunnel.paths:
            tunnel.paths.remove(path)
            tunnel.dtls_dropped_gone += path.dtls.records_dropped
            tunnel.refresh()
            if not tunnel.paths:  # a path dropped for silence counts its silence towards linger
                tunnel.idle_since = min(now, path.est.last_rx + self.timeout) if path.est is not None else now
                self.timer_dirty = True

    def _remove_tunnel(self, tunnel: ServerTunnel, reason: str, now: float, code: int) -> None:
        for path in list(tunnel.paths):
            path.close(frames.encode(frames.Close(code, reason)), now)
            self._flush(path)
            path.changed = False
            self.paths.pop(path.addr, None)
            self._tunnel_of.pop(path.addr, None)
        tunnel.paths.clear()
        self._forget_tunnel(tunnel, reason)

    def _forget_tunnel(self, tunnel: ServerTunnel, reason: str) -> None:
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        if self.by_name.get(tunnel.name) is tunnel:
            del self.by_name[tunnel.name]
        self.route_table.remove(tunnel)
        self.pool.release(tunnel.name)
        if self.pool6 is not None:
            self.pool6.release(tunnel.name)
        self._events.append(events.ClientGone(tunnel.name, str(tunnel.address), reason))

    def close(self, now: float) -> None:
        """Tell every client we are going (CLOSE + close_notify)."""
        for tunnel in list(self.tunnels.values()):
            self._remove_tunnel(tunnel, "server shutting down", now, frames.CLOSE_NORMAL)
        for path in list(self.paths.values()):
            path.close(None, now)
            self._flush(path)
        self.paths.clear()
        self._unjoined.clear()

    def set_revocation(self, revocation: Revocation, now: float) -> list[str]:
        """New revocation data (SIGHUP); closes the tunnels (all paths) and the handshaken
        paths of clients it now refuses.  Returns the reasons, one per client closed."""
        self.revocation = revocation
        closed = []
        for path in list(self.paths.values()):
            if self.paths.get(path.addr) is not path or not path.established or not path.alive:
                continue
            cert = path.dtls.peer_certificate
            reason = revocation.check(path.name, cert.serial_number if cert is not None else None, handshake=False)
            if reason is None:
                continue
            self.counters["revoked"] += 1
            closed.append(reason)
            tunnel = self._tunnel_of.get(path.addr)
            if tunnel is not None:
                self._remove_tunnel(tunnel, f"disconnected: {reason}", now, frames.CLOSE_REFUSED)
            else:
                self._refuse(path, frames.CLOSE_REFUSED, reason, now)
                self._drop_path(path, "refused", now)
        return closed

    def set_policy(self, policy: Optional[Policy]) -> None:
        """A new (reloaded) policy for every tunnel; None: each back to its client's mode."""
        self.policy = policy
        for t in self.tunnels.values():
            t.set_policy(policy or Policy.single(t.mode))
        self.timer_dirty = True

    def stats(self) -> dict:
        return {
            "tunnels": [t.stats() for t in self.tunnels.values()],
            "handshaking": sum(1 for p in self.paths.values() if p.state == P_HANDSHAKING),
            "revocation": self.revocation.stats(),
            "counters": {
                **self.counters,
                "pending_dropped": self.route_table.pending_dropped,
                "pending_expired": self.route_table.pending_expired,
            },
        }
