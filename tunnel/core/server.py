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

from tunnel.core import events

from tunnel.wire import frames
from tunnel.core.admission import (
    HALF_OPEN_TIMEOUT, HELLO_DEADLINE, HalfOpenTable, LogLimiter, PrefixRateLimiter, source_prefix,
)
from tunnel.wire.dtls import DTLS_HEADER, DtlsListener, common_name, key_id
from tunnel.wire.ecn import decapsulate
from tunnel.core.engine import CoreOutputs, Outputs, TunnelEngine, frame_handlers
from tunnel.wire.icmp import unreachable, unreachable6
from tunnel.core.path import P_CLOSED, P_DOWN, P_HANDSHAKING, TICK, Path
from tunnel.core.policy import Policy
from tunnel.core.pool import AddressPool, AddressPool6, PoolExhausted
from tunnel.core.revocation import Revocation
from tunnel.core.routes import RouteTable
from tunnel.core.scheduler import MODES
from tunnel.core.settings import ServerSettings

MAX_SLEEP = 1.0  # the longest handle_timer() ever asks to sleep (cookie secrets rotate on a minute scale)
INF = float("inf")
LIMIT_LOG_INTERVAL = 10.0  # a limit that keeps biting is reported at most this often


class ServerTunnel(TunnelEngine):
    """One client's tunnel: the shared data plane plus identity, inner addresses and routing.

    What a packet from the client must pass is the server's: its inner source
    address must be the tunnel's own (or in the LAN the client routes), and it is
    routed by its destination, to the TUN or (client_to_client) to another tunnel."""

    def __init__(self, core: "ServerCore", tid: bytes, name: str, address: ipaddress.IPv4Interface, policy: Policy,
                 mode: str):
        st = core.settings
        super().__init__(core.out, policy, st.dedup_window, st.path.idle_probe_interval)
        self.core = core
        self.id = tid
        self.name = name
        self.owner_key = b""  # SHA-256 of the public key of the certificate that made it (dtls.key_id)
        self.address = address
        self.key = address.ip.packed  # route-table key: inner IPv4 address bytes
        self.prefixes: list[tuple[int, int]] = []  # (network, mask) the client may send from (its routed LAN)
        self.dtls_dropped_gone = 0  # records DTLS dropped on paths no longer in the tunnel
        self.mode = mode  # the mode without a policy (the client's choice or the server's)
        self.spoofed = 0
        self.idle_since: Optional[float] = None  # when the last path went away (or all went silent)
        self.address6: Optional[ipaddress.IPv6Interface] = None  # with pool6 only
        self.key6: Optional[bytes] = None  # its 16 bytes
        self.prefixes6: list[tuple[int, int]] = []  # IPv6 (network, mask) the client may send from

    def deliver(self, pkt: bytes, tos: int, now: float) -> None:
        if (len(pkt) >= 20 and pkt[0] >> 4 == 4 and pkt[12:16] == self.key and tos & 3 != 3
                and self.core.route_table.lookup(pkt[16:20]) is None):
            self.out.packets.append(pkt)  # the common case, per packet: admit and forward in short
        else:
            admitted = self.admit(pkt, tos)
            if admitted is not None:
                self.forward(admitted, now)

    def admit(self, pkt: bytes, tos: int) -> Optional[bytes]:
        """The packet if it may enter (anti-spoofing, RFC 6040 decapsulation), else None."""
        # anti-spoofing: a packet must come from the tunnel's own inner address (or its LAN)
        version = pkt[0] >> 4 if pkt else 0
        if not ((version == 4 and len(pkt) >= 20 and (pkt[12:16] == self.key or _from(self.prefixes, pkt[12:16])))
                or (version == 6 and len(pkt) >= 40
                    and (pkt[8:24] == self.key6 or _from(self.prefixes6, pkt[8:24])))):
            self.spoofed += 1
            return None
        if tos & 3 == 3:  # outer CE (RFC 6040)
            pkt = decapsulate(tos, pkt)
            if pkt is None:
                self.ecn_dropped += 1
        return pkt

    def forward(self, pkt: bytes, now: float) -> None:
        core = self.core
        target = core.route_table.lookup(pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40])
        if target is None or target is self:
            self.out.packets.append(pkt)
        elif core.settings.client_to_client:
            core.send_via(target, pkt, now)
        else:
            core.counters["client_to_client_blocked"] += 1

    def stats(self) -> dict:
        return {
            "name": self.name,
            "address": str(self.address),
            "address6": str(self.address6) if self.address6 else None,
            "mode": self.mode,
            "policy": self.policy.source,
            **super().stats(),
            "spoofed": self.spoofed,
            "dtls_dropped": self.dtls_dropped_gone + sum(p.dtls.records_dropped for p in self.paths),
            "paths": [p.stats() for p in self.paths],
        }


def _from(prefixes: list[tuple[int, int]], src: bytes) -> bool:
    """Is ``src`` (packed) inside one of ``prefixes`` ((network, mask) integers)?"""
    if not prefixes:
        return False
    n = int.from_bytes(src, "big")
    return any(n & mask == net for net, mask in prefixes)


class ServerCore(CoreOutputs):
    def __init__(
        self,
        ctx: SSL.Context,
        settings: ServerSettings,
        pool: AddressPool,
        pool6: Optional[AddressPool6] = None,
        policy: Optional[Policy] = None,
        revocation: Optional[Revocation] = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ):
        if settings.mode != "client" and settings.mode not in MODES:
            raise ValueError(f"unknown mode {settings.mode!r}")
        self.settings = settings
        self.listener = DtlsListener(ctx, settings.datagram_mtu)
        self.pool = pool
        self.pool6 = pool6  # None: the tunnel carries IPv4 only
        self.routes = list(settings.routes)
        self.mode = settings.mode  # "client": use the mode the client asks for in HELLO
        self.revocation = revocation or Revocation()  # CRL serials and denied names
        self.policy = policy  # None: each tunnel uses one class with its client's mode
        self.icmp_unreachable = settings.unknown_destination == "icmp"
        limits = settings.limits
        self._half_open = HalfOpenTable(limits.max_handshakes)  # paths still in the DTLS handshake, by source prefix
        self._refused = False  # the ClientHello being accepted was refused by a handshake limit
        self._handshake_rate = PrefixRateLimiter(limits.handshake_rate)  # per source prefix (tunnel/core/admission.py)
        self._refusal_log = LogLimiter()  # refusals are counted always, logged at a bounded rate
        self._unjoined: dict[tuple, float] = {}  # established paths without a tunnel yet -> when established
        self._limit_logged: dict[str, float] = {}
        self.route_table: RouteTable[ServerTunnel] = RouteTable(limits.pending_queue, limits.pending_expiry)
        self._random = random_bytes
        self.paths: dict[tuple, Path] = {}  # underlay address -> path
        self.tunnels: dict[bytes, ServerTunnel] = {}  # tunnel id -> tunnel
        self._last_tunnel: Optional[ServerTunnel] = None
        self.by_name: dict[str, ServerTunnel] = {}
        self.out = Outputs()
        self._events: deque = deque()
        self._handlers = frame_handlers(self._unexpected, {
            frames.HELLO: self._on_hello_record, frames.CLOSE: self._on_close})
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
    def receive_datagram(self, addr: tuple, data: bytes, now: float, tos: int = 0) -> None:
        """One datagram from ``addr`` (the path's key); ``tos``: its outer TOS byte (for ECN)."""
        path = self.paths.get(addr)
        if path is None:
            self._new_peer(data, addr, now)
            return
        handshaking = path.state == P_HANDSHAKING
        records = path.receive(data, now)
        if path.updated and path.tunnel is not None:  # a PONG: lowest-rtt and balance follow at once
            path.updated = False
            path.tunnel.refresh()
        if handshaking and path.established:
            self.timer_dirty = True  # its first probe is due now
            self._on_established(path, now)
            if not path.alive:  # refused (revoked): nothing it sent counts
                records = []
        handlers = self._handlers
        for rec in records:
            handlers[rec[0]](path, rec, tos, now)
            if path.state is P_CLOSED:  # refused or closed: the rest of the datagram is void
                break
        if path.out:
            self.out.collect(path)
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
            self.out.datagrams.append((addr, r, 0))
        if session is None:
            if replies:
                self.counters["cookies_sent"] += 1
            elif not self._refused:
                self.counters["junk"] += 1
            return
        path = Path(session, addr, now, self.settings.path, handshake_timeout=HALF_OPEN_TIMEOUT)
        self.paths[addr] = path
        self.timer_dirty = True
        self._half_open.add(addr, source_prefix(addr[0]))
        if path.out:
            self.out.collect(path)

    def _admit(self, addr: tuple, now: float) -> bool:
        """May a ClientHello whose cookie is valid start a handshake?  Asked before OpenSSL does
        any work for it (the server's first flight costs a key exchange and a signature)."""
        prefix = source_prefix(addr[0])
        limits = self.settings.limits
        if not self._handshake_rate.allow(prefix, now):
            self.counters["handshakes_rate_limited"] += 1
            self._limit("handshake_rate", addr, f"more than {limits.handshake_rate:g} handshakes/s from {prefix}", now)
        elif len(self._half_open) >= limits.max_handshakes and not self._make_room(prefix, now):
            self.counters["handshakes_refused"] += 1
            self._limit("max_handshakes", addr,
                        f"max_handshakes ({limits.max_handshakes}) in progress, the most of them from {prefix}", now)
        else:
            return True
        self._refused = True
        return False

    def _make_room(self, prefix: str, now: float) -> bool:
        """The half-open table is full: evict the oldest handshake of the busiest source prefix
        if ``prefix`` holds fewer (tunnel/core/admission.py); False if the newcomer is refused."""
        victim = self._half_open.victim(prefix)
        if victim is None:
            return False
        path = self.paths.get(victim)
        self._half_open.discard(victim)
        self.counters["handshakes_evicted"] += 1
        self._limit("handshakes_evicted", victim,
                    f"max_handshakes ({self.settings.limits.max_handshakes}) in progress: the oldest from the busiest source "
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
        JOIN within HELLO_DEADLINE or it is closed (tunnel/core/admission.py)."""
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
        if not self._listed(path.name):
            return self._refuse(path, frames.CLOSE_REFUSED, f"client '{path.name}' is not listed in the server config", now)
        name = path.name
        paths = self.paths
        limits = self.settings.limits
        same = sum(1 for a in self._unjoined if (p := paths.get(a)) is not None and p.name == name)
        if same >= limits.max_paths or len(self._unjoined) >= limits.max_handshakes:
            self.counters["unjoined_refused"] += 1
            self._limit("unjoined_paths", path.addr, f"too many paths without a tunnel ({same} of '{name}', "
                        f"{len(self._unjoined)} in all)", now)
            return self._refuse(path, frames.CLOSE_REFUSED, "too many paths", now)
        self._unjoined[path.addr] = now

    def _listed(self, name: str) -> bool:
        allowed = self.settings.allowed_clients
        return allowed is None or name in allowed

    def _on_hello_record(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        frame = path.parse(rec)
        if frame is not None:
            self._on_hello(path, frame, now)

    def _on_close(self, path: Path, rec: bytes, tos: int, now: float) -> None:
        frame = path.parse(rec)
        if frame is None:
            return
        tunnel = path.tunnel
        path.close(None, now)
        path.reason = f"client closed: {frames.printable(frame.reason) or frame.code}"
        if frame.code == frames.CLOSE_NORMAL and tunnel is not None:  # the client is going away
            self._remove_tunnel(tunnel, path.reason, now, frames.CLOSE_NORMAL)

    @staticmethod
    def _unexpected(path: Path, rec: bytes, tos: int, now: float) -> None:
        """CONFIG, an unknown type, or DATA before HELLO: not for a server."""
        path.malformed += 1

    def _refuse(self, path: Path, code: int, reason: str, now: float, peer_reason: Optional[str] = None) -> None:
        """Close ``path`` with CLOSE ``code``; ``reason`` is logged, ``peer_reason`` (default: the
        same) is what the peer is told: it must not name another client."""
        self._report_refused(path.addr, reason, now)
        path.close(frames.encode(frames.Close(code, reason if peer_reason is None else peer_reason)), now)
        path.reason = "refused"
        self.out.collect(path)

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
        if not self._listed(name):
            return self._refuse(path, frames.CLOSE_REFUSED, f"client '{name}' is not listed in the server config", now)
        attached = path.tunnel
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
        max_tunnels = self.settings.limits.max_tunnels
        if old is None and len(self.tunnels) >= max_tunnels:
            self.counters["tunnels_refused"] += 1
            self._limit("max_tunnels", path.addr, f"max_tunnels ({max_tunnels}) reached", now)
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
        tunnel = ServerTunnel(self, self._random(frames.TUNNEL_ID_LEN), name, address, policy, mode)
        tunnel.owner_key = path.peer_key
        self.tunnels[tunnel.id] = tunnel
        self.by_name[name] = tunnel
        self.route_table.add(ipaddress.IPv4Network(f"{address.ip}/32"), tunnel)
        if address6 is not None:
            tunnel.address6, tunnel.key6 = address6, address6.ip.packed
            self.route_table.add(ipaddress.IPv6Network(f"{address6.ip}/128"), tunnel)
        for prefix in self.settings.client_routes.get(name, ()):
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
        max_paths = self.settings.limits.max_paths
        if len(tunnel.paths) >= max_paths:
            self.counters["paths_refused"] += 1
            self._limit("max_paths", path.addr, f"max_paths ({max_paths}) reached for '{tunnel.name}'", now)
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
            self.out.collect(p)
            self._drop_path(p, "stale: replaced by a newer path of the client", now)

    def _attach(self, tunnel: ServerTunnel, path: Path, now: float) -> None:
        self._unjoined.pop(path.addr, None)
        st = self.settings
        path.silent_limit = st.path.timeout + st.linger  # kept through an outage, down (docs/PROTOCOL.md)
        tunnel.attach(path)
        tunnel.idle_since = None
        self._send_config(tunnel, path, now)
        for pkt in self.route_table.flush(tunnel, now):  # the pending route is live again
            self.send_via(tunnel, pkt, now)

    def _send_config(self, tunnel: ServerTunnel, path: Path, now: float) -> None:
        st = self.settings
        config = frames.Config(
            tunnel.id,
            [tunnel.address] + ([tunnel.address6] if tunnel.address6 is not None else []),
            st.inner_mtu,
            int(st.path.probe_interval * 1000),
            int(st.path.timeout * 1000),
            self.routes,
        )
        path.send(frames.encode(config), now)
        self.out.collect(path)

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
        self.send_via(tunnel, pkt, now)

    def send_via(self, tunnel: ServerTunnel, pkt: bytes, now: float) -> None:
        """Send one packet through ``tunnel`` (from the TUN, or from another client)."""
        self._last_tunnel = tunnel  # the one keep_warm warms
        if not tunnel.send(pkt, now):
            self.counters["no_path"] += 1

    def warm(self) -> None:
        """keep_warm: one dummy pass over the packet path of the tunnel that sent last (tunnel/core/warm.py)."""
        tunnel = self._last_tunnel
        if tunnel is not None and self.tunnels.get(tunnel.id) is tunnel:
            tunnel.warm()

    # -- timers and teardown -----------------------------------------
    def handle_timer(self, now: float) -> float:
        """Run everything that is due and return when to run again (absolute time): a
        path's probe, dead interval, timeout or handshake retransmission, a HELLO
        deadline, a reorder hold, a round of extra copies, a tunnel's silence and
        linger, a held packet's expiry; :data:`MAX_SLEEP` at most.  Each deadline is
        computed by the code that acts on it.  It asks to run again :data:`TICK` later
        at the soonest (each run walks every path: a server with many clients runs it at
        most every TICK; one with a few sleeps between probes).  Input that may need it
        sooner sets ``timer_dirty`` and the shell runs it again."""
        self.timer_dirty = False  # set again below if what ran may want the timer sooner than computed
        self.listener.cookies.rotate(now)
        t = now + MAX_SLEEP
        while self._unjoined:  # oldest first: paths that never sent HELLO/JOIN
            addr, since = next(iter(self._unjoined.items()))
            if now < since + HELLO_DEADLINE:
                t = min(t, since + HELLO_DEADLINE)
                break
            del self._unjoined[addr]
            path = self.paths.get(addr)
            if path is not None and path.alive and path.tunnel is None:
                self.counters["hello_timeouts"] += 1
                self._refuse(path, frames.CLOSE_PROTOCOL, f"no HELLO within {HELLO_DEADLINE:g} s of the handshake", now)
                if path.changed:
                    self._path_changed(path, now)
        for path in list(self.paths.values()):
            pt = path.service(now)
            if path.out:
                self.out.collect(path)
            if path.changed:
                self._path_changed(path, now)
            if pt < t:
                t = pt
        self.route_table.expire(now)
        d = self.route_table.next_expiry()
        if d is not None and d < t:
            t = d
        for tunnel in list(self.tunnels.values()):
            tt = self._service_tunnel(tunnel, now)
            if tt < t:
                t = tt
        if self.timer_dirty:  # e.g. packets released to a tunnel whose timers ran already: next tick
            t = now
        self.timer_dirty = False
        return max(t, now + TICK)

    def _service_tunnel(self, tunnel: ServerTunnel, now: float) -> float:
        """A tunnel's timers: its data plane's, its paths' silence and its linger."""
        t = tunnel.service(now)
        st = self.settings
        timeout, linger = st.path.timeout, st.linger
        if tunnel.paths:  # paths all silent for `timeout` count as none (docs/PROTOCOL.md, Long outages)
            heard = max(p.est.last_rx if p.est is not None else p.created for p in tunnel.paths)
            if now - heard >= timeout:
                if tunnel.idle_since is None:  # packets wait in the pending route meanwhile
                    tunnel.idle_since = heard + timeout
            else:
                if tunnel.idle_since is not None:  # heard again: what was held goes out
                    tunnel.idle_since = None
                    for pkt in self.route_table.flush(tunnel, now):
                        self.send_via(tunnel, pkt, now)
                t = min(t, heard + timeout)
        if tunnel.idle_since is not None:
            if now - tunnel.idle_since >= linger:
                if tunnel.paths:  # silent ones (each is closed at timeout + linger anyway)
                    self._remove_tunnel(tunnel, f"no path for {linger:g} s", now, frames.CLOSE_UNKNOWN_TUNNEL)
                else:
                    self._forget_tunnel(tunnel, f"no path for {linger:g} s")
                return INF
            t = min(t, tunnel.idle_since + linger)
        return t

    def _path_changed(self, path: Path, now: float) -> None:
        path.changed = False
        tunnel = path.tunnel
        if path.heard_again:  # after a silence: packets held while every path was silent go out now
            path.heard_again = False
            if tunnel is not None and tunnel.idle_since is not None and tunnel.paths:
                tunnel.idle_since = None
                for pkt in self.route_table.flush(tunnel, now):
                    self.send_via(tunnel, pkt, now)
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
        tunnel = path.tunnel
        if tunnel is None:
            if not path.name and reason not in ("closed locally", "refused"):
                self.counters["handshakes_failed"] += 1
                self._report_refused(path.addr, reason, now)
            return
        self._events.append(events.PathDown(path.addr, reason))
        if path in tunnel.paths:
            tunnel.dtls_dropped_gone += path.dtls.records_dropped
            tunnel.detach(path)
            if not tunnel.paths:  # a path dropped for silence counts its silence towards linger
                timeout = self.settings.path.timeout
                tunnel.idle_since = min(now, path.est.last_rx + timeout) if path.est is not None else now
                self.timer_dirty = True

    def _remove_tunnel(self, tunnel: ServerTunnel, reason: str, now: float, code: int) -> None:
        for path in list(tunnel.paths):
            path.close(frames.encode(frames.Close(code, reason)), now)
            self.out.collect(path)
            path.changed = False
            self.paths.pop(path.addr, None)
        tunnel.detach_all()
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
            self.out.collect(path)
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
            tunnel = path.tunnel
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
