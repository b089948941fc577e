"""Tests for the sans-IO cores: a ClientCore and a ServerCore wired together in memory.

A manual clock (``Lab.now``) drives everything; datagrams move between the two
cores only when the test pumps them, so loss, delay and replay are explicit.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest

from tunnel import events, frames, mtu
from tunnel.certs import create_ca, issue_client, issue_server
from tunnel.client_core import BACKOFF_MIN, BACKOFF_REFUSED, C_HELLO_SENT, C_UP, ClientCore
from tunnel.dtls import ESTABLISHED, DtlsSession, make_context
from tunnel.path import HANDSHAKE_TIMEOUT, P_UP
from tunnel.pool import AddressPool
from tunnel.server_core import ServerCore

SERVER_ADDR = ("198.18.0.1", 4433)
CLIENT_IP = "198.18.0.2"
SERVER_INNER = ipaddress.IPv4Interface("100.64.0.1/24")
FIRST_CLIENT = ipaddress.IPv4Interface("100.64.0.2/24")
DGRAM_MTU = mtu.datagram_mtu(1500)
INNER_MTU = mtu.inner_mtu(1500)
ROUTES = [ipaddress.IPv4Network("10.9.0.0/16")]
KEEPALIVE, TIMEOUT = 1.0, 5.0
STEP = 0.05


def ipv4(src: str, dst: str, payload: bytes = b"payload", proto: int = 17) -> bytes:
    """A minimal IPv4 packet (checksum left zero: the cores do not check it)."""
    total = 20 + len(payload)
    header = bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, proto, 0, 0])
    return header + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + payload


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    create_ca(d)
    issue_server(d, "srv")
    issue_client(d, "alice")
    issue_client(d, "bob")
    create_ca(d / "other", name="Other CA")
    issue_client(d / "other", "mallory")
    return d


class Lab:
    """One client, one server, a wire between them and a manual clock."""

    def __init__(self, pki: Path, *, client: str = "alice", client_pki: Path | None = None,
                 allowed: set[str] | None = None, static: dict | None = None,
                 pool: AddressPool | None = None):
        self.now = 1000.0
        ids = itertools.count(1)
        cdir = client_pki or pki
        self.server = ServerCore(
            make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"),
            DGRAM_MTU,
            pool or AddressPool(SERVER_INNER, static),
            INNER_MTU,
            routes=ROUTES,
            keepalive=KEEPALIVE,
            timeout=TIMEOUT,
            allowed_clients=allowed,
            random_bytes=lambda n: next(ids).to_bytes(n, "big"),
        )
        self.client = ClientCore(
            make_context("client", cdir / f"{client}.crt", cdir / f"{client}.key", pki / "ca.crt", "srv"),
            SERVER_ADDR,
            DGRAM_MTU,
            KEEPALIVE,
            TIMEOUT,
        )
        self.port = 40000
        self.drop_c2s = self.drop_s2c = False
        self.cevents: list[tuple[float, object]] = []
        self.sevents: list[tuple[float, object]] = []
        self.stray: list[tuple[bytes, tuple]] = []  # server datagrams to the client's old addresses

    @property
    def client_addr(self) -> tuple:
        return (CLIENT_IP, self.port)

    def drain_events(self) -> None:
        while (ev := self.client.next_event()) is not None:
            self.cevents.append((self.now, ev))
            if isinstance(ev, events.Connecting) and ev.attempt > 1:
                self.port += 1  # like the shell: a fresh socket (source port) per attempt
        while (ev := self.server.next_event()) is not None:
            self.sevents.append((self.now, ev))

    def pump(self) -> None:
        for _ in range(100):
            self.drain_events()
            moved = False
            for d in self.client.datagrams_to_send():
                moved = True
                if not self.drop_c2s:
                    self.server.receive_datagram(d, self.client_addr, self.now)
            for d, addr in self.server.datagrams_to_send():
                moved = True
                if addr != self.client_addr:
                    self.stray.append((d, addr))
                elif not self.drop_s2c:
                    self.client.receive_datagram(d, self.now)
            if not moved:
                break
        self.drain_events()

    def tick(self) -> None:
        self.client.handle_timer(self.now)
        self.server.handle_timer(self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, round(self.now + STEP, 6))
            self.tick()

    def up(self) -> "Lab":
        self.client.connect(self.now)
        self.pump()
        assert self.client.state == C_UP, self.cevents
        return self

    def client_events(self, cls) -> list:
        return [e for _, e in self.cevents if isinstance(e, cls)]

    def server_events(self, cls) -> list:
        return [e for _, e in self.sevents if isinstance(e, cls)]

    def first_time(self, evs, cls, after: float = 0.0) -> float:
        return next(t for t, e in evs if isinstance(e, cls) and t >= after)

    def tunnel(self):
        (t,) = self.server.tunnels.values()
        return t


@pytest.fixture
def plain(monkeypatch) -> list[tuple[str, bytes]]:
    """Every decrypted record, as (receiving side, record)."""
    log: list[tuple[str, bytes]] = []
    orig = DtlsSession.receive_datagram

    def spy(self, data, now):
        recs = orig(self, data, now)
        log.extend(("client" if self.is_client else "server", r) for r in recs)
        return recs

    monkeypatch.setattr(DtlsSession, "receive_datagram", spy)
    return log


def frames_seen(log, side: str, cls) -> list:
    out = []
    for who, rec in log:
        if who == side:
            try:
                f = frames.parse(rec)
            except frames.FrameError:
                continue
            if isinstance(f, cls):
                out.append(f)
    return out


# -- coming up -------------------------------------------------------------------------
def test_tunnel_comes_up(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    kinds = [type(e) for _, e in lab.cevents]
    assert kinds == [events.Connecting, events.PathUp, events.TunnelUp]
    connecting, path_up, tunnel_up = (e for _, e in lab.cevents)
    assert connecting == events.Connecting(SERVER_ADDR, 1)
    assert path_up.addr == SERVER_ADDR and path_up.peer == "srv" and path_up.cipher.startswith("ECDHE-")
    cfg = tunnel_up.config
    assert cfg.addresses == [FIRST_CLIENT]
    assert cfg.mtu == INNER_MTU == 1426
    assert (cfg.keepalive_ms, cfg.timeout_ms) == (1000, 5000)
    assert cfg.routes == ROUTES
    assert cfg.tunnel_id == (1).to_bytes(16, "big") == lab.client.tunnel_id
    assert lab.client.stats()["address"] == "100.64.0.2/24"

    s_kinds = [type(e) for _, e in lab.sevents]
    assert s_kinds == [events.PathUp, events.ClientConnected]
    assert lab.server_events(events.PathUp)[0].peer == "alice"
    assert lab.server_events(events.ClientConnected) == [
        events.ClientConnected("alice", "100.64.0.2/24", lab.client_addr, False)
    ]
    assert lab.server.counters["cookies_sent"] == 1
    t = lab.tunnel()
    assert t.name == "alice" and t.address == FIRST_CLIENT and t.paths[0].addr == lab.client_addr
    assert lab.server.routes_v4 == {FIRST_CLIENT.ip.packed: t}
    # the exchange on the wire: HELLO(v1, new tunnel) up, CONFIG down
    assert frames_seen(plain, "server", frames.Hello) == [frames.Hello(1, frames.NEW_TUNNEL)]
    assert frames_seen(plain, "client", frames.Config) == [cfg]


def test_static_address_from_pool(pki: Path) -> None:
    lab = Lab(pki, static={"alice": ipaddress.IPv4Address("100.64.0.77")}).up()
    assert lab.client.config.addresses == [ipaddress.IPv4Interface("100.64.0.77/24")]


# -- packets --------------------------------------------------------------------------
def test_client_packet_reaches_server_tun(pki: Path) -> None:
    lab = Lab(pki).up()
    pkts = [ipv4("100.64.0.2", "100.64.0.1", b"p%d" % i) for i in range(5)]
    pkts.append(ipv4("100.64.0.2", "10.9.1.1", b"x" * (INNER_MTU - 20)))  # full-size, to a pushed route
    for p in pkts:
        lab.client.send_packet(p, lab.now)
    lab.pump()
    assert lab.server.to_tun == pkts
    assert lab.tunnel().dedup.delivered == len(pkts) and lab.tunnel().spoofed == 0


def test_server_packet_reaches_client_tun(pki: Path) -> None:
    lab = Lab(pki).up()
    pkts = [ipv4("100.64.0.1", "100.64.0.2", b"q%d" % i) for i in range(5)]
    pkts.append(ipv4("8.8.8.8", "100.64.0.2", b"y" * (INNER_MTU - 20)))
    for p in pkts:
        lab.server.send_packet(p, lab.now)
    lab.pump()
    assert lab.client.to_tun == pkts
    assert lab.client.stats()["delivered"] == len(pkts)


def test_forged_source_dropped_and_counted(pki: Path) -> None:
    lab = Lab(pki).up()
    lab.client.send_packet(ipv4("100.64.0.99", "100.64.0.1"), lab.now)  # another client's address
    lab.client.send_packet(ipv4("192.0.2.1", "100.64.0.1"), lab.now)
    lab.pump()
    assert lab.server.to_tun == []
    assert lab.tunnel().spoofed == 2
    assert lab.tunnel().stats()["spoofed"] == 2
    good = ipv4("100.64.0.2", "100.64.0.1")
    lab.client.send_packet(good, lab.now)
    lab.pump()
    assert lab.server.to_tun == [good]


def test_short_and_non_ipv4_packets_from_tunnel_dropped(pki: Path) -> None:
    lab = Lab(pki).up()
    path = lab.client.path
    v6 = bytes([0x60]) + bytes(39)
    for i, pkt in enumerate([b"\x45" * 19, v6, b"\x45"], start=1):
        lab.server.receive_datagram(path.encrypt(frames.encode_data(i, pkt), lab.now), lab.client_addr, lab.now)
    assert lab.server.to_tun == [] and lab.tunnel().spoofed == 3
    # the client refuses to send non-IPv4 in the first place
    lab.client.send_packet(v6, lab.now)
    assert lab.client.not_ipv4 == 1 and lab.client.datagrams_to_send() == []


def test_packet_to_unknown_destination_counted(pki: Path) -> None:
    lab = Lab(pki).up()
    lab.server.send_packet(ipv4("100.64.0.1", "100.64.0.99"), lab.now)
    lab.server.send_packet(ipv4("100.64.0.1", "10.9.0.1"), lab.now)  # a pushed route is not a client
    assert lab.server.counters["no_route"] == 2
    lab.server.send_packet(bytes([0x60]) + bytes(39), lab.now)
    lab.server.send_packet(b"\x45" * 10, lab.now)
    assert lab.server.counters["not_ipv4"] == 2
    assert lab.server.datagrams_to_send() == []


def test_packets_while_down_are_counted(pki: Path) -> None:
    lab = Lab(pki)
    lab.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), lab.now)
    assert lab.client.dropped_not_up == 1 and lab.client.datagrams_to_send() == []
    lab.server.send_packet(ipv4("100.64.0.1", "100.64.0.2"), lab.now)
    assert lab.server.counters["no_route"] == 1


def test_tunnel_wide_dedup(pki: Path) -> None:
    """The same sequence number in two different DTLS records is delivered once."""
    lab = Lab(pki).up()
    pkt = ipv4("100.64.0.2", "100.64.0.1")
    for _ in range(2):
        d = lab.client.path.encrypt(frames.encode_data(7, pkt), lab.now)
        lab.server.receive_datagram(d, lab.client_addr, lab.now)
    assert lab.server.to_tun == [pkt]
    assert lab.tunnel().dedup.duplicates == 1


def test_replayed_datagram_dropped_by_dtls(pki: Path) -> None:
    lab = Lab(pki).up()
    lab.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), lab.now)
    (d,) = lab.client.datagrams_to_send()
    for _ in range(3):
        lab.server.receive_datagram(d, lab.client_addr, lab.now)
    assert len(lab.server.to_tun) == 1
    assert lab.tunnel().paths[0].dtls.records_dropped == 2


# -- keepalive and RTT ----------------------------------------------------------------------
def test_keepalive_ping_after_silence_and_rtt(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    t_up = lab.now
    path = lab.client.path
    lab.advance(KEEPALIVE - STEP)
    assert frames_seen(plain, "server", frames.Ping) == []  # not yet
    assert path.srtt is None
    # the keepalive comes due; the PING takes 20 ms to the server, the PONG 30 ms back
    lab.now = t_up + KEEPALIVE
    lab.client.handle_timer(lab.now)
    out = lab.client.datagrams_to_send()
    assert len(out) == 1
    lab.now += 0.020
    lab.server.receive_datagram(out[0], lab.client_addr, lab.now)
    assert [type(f) for f in frames_seen(plain, "server", (frames.Ping, frames.Pong))] == [frames.Ping]
    back = lab.server.datagrams_to_send()
    assert len(back) == 1 and back[0][1] == lab.client_addr
    lab.now += 0.030
    lab.client.receive_datagram(back[0][0], lab.now)
    pong = frames_seen(plain, "client", frames.Pong)
    assert pong == [frames.Pong(frames_seen(plain, "server", frames.Ping)[0].token)]
    assert path.srtt == pytest.approx(0.050)
    assert lab.client.stats()["paths"][0]["rtt_ms"] == pytest.approx(50.0)
    # silence goes on: PINGs keep coming every keepalive, the server pings too
    lab.advance(3 * KEEPALIVE)
    assert len(frames_seen(plain, "server", frames.Ping)) >= 3
    assert len(frames_seen(plain, "client", frames.Ping)) >= 2
    assert lab.tunnel().paths[0].srtt is not None
    assert lab.client.state == C_UP


def test_no_ping_while_traffic_flows(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    for _ in range(40):  # 4 s of packets both ways every 100 ms
        lab.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), lab.now)
        lab.server.send_packet(ipv4("100.64.0.1", "100.64.0.2"), lab.now)
        lab.advance(0.1)
    assert frames_seen(plain, "server", frames.Ping) == []
    assert frames_seen(plain, "client", frames.Ping) == []
    assert len(lab.server.to_tun) == len(lab.client.to_tun) == 40


# -- dead paths and reconnect ------------------------------------------------------------------
def test_dead_path_reconnect_and_replace(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    t_up, old_addr = lab.now, lab.client_addr
    old_tunnel = lab.tunnel()
    lab.drop_s2c = True  # the server stops answering
    lab.advance(TIMEOUT - STEP)
    assert lab.client.state == C_UP and not lab.client_events(events.TunnelDown)
    lab.advance(2 * STEP)
    t_down = lab.first_time(lab.cevents, events.TunnelDown)
    assert t_up + TIMEOUT <= t_down <= t_up + TIMEOUT + STEP + 1e-6
    (down,) = lab.client_events(events.PathDown)
    assert down.addr == SERVER_ADDR and "nothing received" in down.reason
    lab.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), lab.now)
    assert lab.client.dropped_not_up == 1
    lab.drop_s2c = False  # the server is reachable again
    lab.advance(BACKOFF_MIN + 2 * STEP)
    t_conn = lab.first_time(lab.cevents, events.Connecting, after=t_up + 0.001)
    assert t_conn == pytest.approx(t_down + BACKOFF_MIN, abs=STEP + 1e-6)
    assert lab.client_events(events.Connecting)[-1] == events.Connecting(SERVER_ADDR, 2)
    assert lab.client.state == C_UP
    # a new handshake happened (a second HelloVerifyRequest) from the new source port
    assert lab.server.counters["cookies_sent"] == 2
    assert lab.client_addr != old_addr
    # the server replaced the old tunnel: same name, same inner address
    connected = lab.server_events(events.ClientConnected)
    assert connected[-1] == events.ClientConnected("alice", "100.64.0.2/24", lab.client_addr, True)
    gone = lab.server_events(events.ClientGone)
    assert len(gone) == 1 and gone[0].name == "alice" and "replaced" in gone[0].reason
    new_tunnel = lab.tunnel()
    assert new_tunnel is not old_tunnel and new_tunnel.id != old_tunnel.id
    assert list(lab.server.paths) == [lab.client_addr]
    assert lab.client.config.addresses == [FIRST_CLIENT]
    assert lab.client.tunnel_id == new_tunnel.id
    assert any(addr == old_addr for _, addr in lab.stray)  # the CLOSE for the old path
    # and traffic flows again both ways
    up = ipv4("100.64.0.2", "100.64.0.1", b"after")
    down_pkt = ipv4("100.64.0.1", "100.64.0.2", b"after")
    lab.client.send_packet(up, lab.now)
    lab.server.send_packet(down_pkt, lab.now)
    lab.pump()
    assert lab.server.to_tun[-1] == up and lab.client.to_tun[-1] == down_pkt


def test_backoff_grows_while_server_is_unreachable(pki: Path) -> None:
    lab = Lab(pki)
    lab.drop_c2s = lab.drop_s2c = True
    lab.client.connect(lab.now)
    t0 = lab.now
    lab.pump()
    lab.advance(3 * HANDSHAKE_TIMEOUT + 2)
    conns = [(t, e) for t, e in lab.cevents if isinstance(e, events.Connecting)]
    assert [e.attempt for _, e in conns] == [1, 2, 3, 4]
    times = [t - t0 for t, _ in conns]
    # each attempt: handshake timeout, then 0.25, 0.5, 1 s of backoff
    expected = [0, HANDSHAKE_TIMEOUT + 0.25, 2 * HANDSHAKE_TIMEOUT + 0.75, 3 * HANDSHAKE_TIMEOUT + 1.75]
    assert times == pytest.approx(expected, abs=STEP + 1e-6)
    downs = lab.client_events(events.PathDown)
    assert len(downs) == 3 and all(d.reason == "handshake timed out" for d in downs)
    assert not lab.client_events(events.TunnelDown)  # it never was up
    # the server never saw anything
    assert lab.server.paths == {} and lab.server.counters["cookies_sent"] == 0
    # the server comes back: the next attempt succeeds and the backoff is reset
    lab.drop_c2s = lab.drop_s2c = False
    lab.advance(HANDSHAKE_TIMEOUT + 2.5)
    assert lab.client.state == C_UP
    assert lab.client._backoff == BACKOFF_MIN


def test_server_drops_silent_client(pki: Path) -> None:
    lab = Lab(pki).up()
    t_up = lab.now
    lab.drop_c2s = True
    lab.advance(TIMEOUT + 2 * STEP)
    t_gone = lab.first_time(lab.sevents, events.ClientGone)
    assert t_up + TIMEOUT <= t_gone <= t_up + TIMEOUT + STEP + 1e-6
    assert lab.server.tunnels == {} and lab.server.paths == {} and lab.server.routes_v4 == {}
    assert "nothing received" in lab.server_events(events.PathDown)[0].reason
    lab.server.send_packet(ipv4("100.64.0.1", "100.64.0.2"), lab.now)
    assert lab.server.counters["no_route"] == 1


def test_client_close(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    lab.client.close(lab.now)
    lab.pump()
    assert frames_seen(plain, "server", frames.Close) == [frames.Close(frames.CLOSE_NORMAL, "client shutting down")]
    assert lab.server.tunnels == {} and lab.server.paths == {}
    (gone,) = lab.server_events(events.ClientGone)
    assert gone.name == "alice" and "client shutting down" in gone.reason
    assert "client closed" in lab.server_events(events.PathDown)[0].reason
    lab.advance(10)  # a closed client never reconnects
    assert len(lab.client_events(events.Connecting)) == 1


def test_same_client_gets_same_address_after_reconnect(pki: Path) -> None:
    lab = Lab(pki).up()
    lab.client.close(lab.now)
    lab.pump()
    # another client takes the next address meanwhile
    other = Lab(pki, client="bob")
    other.server = lab.server
    other.port = 41000
    other.up()
    assert other.client.config.addresses == [ipaddress.IPv4Interface("100.64.0.3/24")]
    again = Lab(pki)
    again.server = lab.server
    again.port = 42000
    again.up()
    assert again.client.config.addresses == [FIRST_CLIENT]


# -- refusals ------------------------------------------------------------------------------------
def test_unlisted_client_refused(pki: Path, plain) -> None:
    lab = Lab(pki, allowed={"bob"})
    lab.client.connect(lab.now)
    lab.pump()
    closes = frames_seen(plain, "client", frames.Close)
    assert [c.code for c in closes] == [frames.CLOSE_REFUSED]
    assert "'alice' is not listed" in closes[0].reason
    (refused,) = lab.server_events(events.Refused)
    assert refused.addr == lab.client_addr and "not listed" in refused.reason
    assert not lab.server_events(events.ClientConnected)
    assert lab.server.tunnels == {} and lab.server.paths == {}
    assert not lab.client_events(events.TunnelUp)
    (down,) = lab.client_events(events.PathDown)
    assert "not listed" in down.reason
    # refused: retry slowly
    assert lab.client.get_timer() == pytest.approx(lab.now + BACKOFF_REFUSED)


def test_listed_client_accepted(pki: Path) -> None:
    Lab(pki, allowed={"alice"}).up()


def test_client_from_other_ca_refused(pki: Path) -> None:
    lab = Lab(pki, client="mallory", client_pki=pki / "other")
    lab.client.connect(lab.now)
    lab.pump()
    (refused,) = lab.server_events(events.Refused)
    assert "unable to get local issuer certificate" in refused.reason
    assert lab.server.counters["handshakes_failed"] == 1 and lab.server.paths == {}
    (down,) = lab.client_events(events.PathDown)
    assert "handshake failed" in down.reason
    assert lab.client.get_timer() == pytest.approx(lab.now + BACKOFF_MIN)


def test_server_close(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    lab.server.close(lab.now)
    lab.pump()
    closes = frames_seen(plain, "client", frames.Close)
    assert len(closes) == 1 and closes[0].reason == "server shutting down"
    (down,) = lab.client_events(events.TunnelDown)
    assert "server shutting down" in down.reason
    assert lab.server.tunnels == {} and lab.server.paths == {}
    (gone,) = lab.server_events(events.ClientGone)
    assert gone.reason == "server shutting down"
    # not a refusal: the client retries after the normal backoff
    assert lab.client.get_timer() == pytest.approx(lab.now + BACKOFF_MIN)


def test_server_close_code_is_normal(pki: Path, plain) -> None:
    lab = Lab(pki).up()
    lab.server.close(lab.now)
    lab.pump()
    assert [c.code for c in frames_seen(plain, "client", frames.Close)] == [frames.CLOSE_NORMAL]


# -- junk and out-of-order control ---------------------------------------------------------
@pytest.mark.parametrize(
    "junk",
    [b"", b"\x17" * 60, b"hello", b"\x15\xfe\xfd" + bytes(10) + b"\x00\x02\x02\x00",
     b"\x16\xfe\xfd" + bytes(10) + b"\x00\x10" + b"\x01" * 16, b"\x16" * 12],
)
def test_junk_from_unknown_address(pki: Path, junk: bytes) -> None:
    lab = Lab(pki)
    lab.server.receive_datagram(junk, ("203.0.113.9", 9), lab.now)
    assert lab.server.counters["junk"] == 1
    assert lab.server.paths == {} and lab.server.datagrams_to_send() == []
    assert lab.server.next_event() is None


def test_junk_on_a_live_path_is_dropped(pki: Path) -> None:
    lab = Lab(pki).up()
    for junk in (b"\x17" * 60, b"\x16\xfe\xfd" + bytes(10) + b"\x00\x01\x00", b"x"):
        lab.server.receive_datagram(junk, lab.client_addr, lab.now)
        lab.client.receive_datagram(junk, lab.now)
    assert lab.client.state == C_UP and lab.tunnel().paths[0].state == P_UP
    pkt = ipv4("100.64.0.2", "100.64.0.1")
    lab.client.send_packet(pkt, lab.now)
    lab.pump()
    assert lab.server.to_tun == [pkt]


def test_empty_datagram_on_a_live_path(pki: Path) -> None:
    lab = Lab(pki).up()
    lab.server.receive_datagram(b"", lab.client_addr, lab.now)
    lab.client.receive_datagram(b"", lab.now)
    assert lab.client.state == C_UP


def _handshake_only(lab: Lab) -> list[bytes]:
    """Run the DTLS handshake; return the client's HELLO datagram(s), not yet delivered."""
    c, s = lab.client, lab.server
    c.connect(lab.now)
    for _ in range(10):
        out = c.datagrams_to_send()
        if c.state == C_HELLO_SENT:
            return out
        for d in out:
            s.receive_datagram(d, lab.client_addr, lab.now)
        for d, _ in s.datagrams_to_send():
            c.receive_datagram(d, lab.now)
    raise AssertionError("handshake did not finish")


def test_data_and_config_before_hello_ignored(pki: Path) -> None:
    lab = Lab(pki)
    hello = _handshake_only(lab)
    s, path = lab.server, lab.client.path
    pkt = ipv4("100.64.0.2", "100.64.0.1")
    early = [
        frames.encode_data(1, pkt),
        frames.encode(frames.Config(bytes(16), [FIRST_CLIENT], 1400, 1000, 5000)),
        frames.encode(frames.Pong(99)),  # unsolicited PONG: ignored by the path
        b"\x07garbage",
    ]
    for rec in early:
        s.receive_datagram(path.encrypt(rec, lab.now), lab.client_addr, lab.now)
    assert s.to_tun == [] and s.tunnels == {}
    (spath,) = s.paths.values()
    assert spath.state == P_UP and spath.malformed == 3  # DATA, CONFIG, unknown type
    for d in hello:
        s.receive_datagram(d, lab.client_addr, lab.now)
    for d, _ in s.datagrams_to_send():
        lab.client.receive_datagram(d, lab.now)
    assert lab.client.state == C_UP and len(s.tunnels) == 1
    assert s.to_tun == []  # the early DATA was not delivered later either


def test_data_before_config_ignored_by_client(pki: Path) -> None:
    lab = Lab(pki)
    hello = _handshake_only(lab)
    s, c = lab.server, lab.client
    for d in hello:
        s.receive_datagram(d, lab.client_addr, lab.now)
    config = s.datagrams_to_send()  # held back
    spath = s.paths[lab.client_addr]
    early = ipv4("100.64.0.1", "100.64.0.2", b"early")
    c.receive_datagram(spath.encrypt(frames.encode_data(1, early), lab.now), lab.now)
    c.receive_datagram(spath.encrypt(frames.encode(frames.Hello()), lab.now), lab.now)
    assert c.to_tun == [] and c.state == C_HELLO_SENT and c.malformed == 2
    for d, _ in config:
        c.receive_datagram(d, lab.now)
    assert c.state == C_UP
    late = ipv4("100.64.0.1", "100.64.0.2", b"late")
    s.send_packet(late, lab.now)
    for d, _ in s.datagrams_to_send():
        c.receive_datagram(d, lab.now)
    assert c.to_tun == [late]


# -- HELLO handling, seen from a bare DTLS client ------------------------------------------
class RawClient:
    """A DTLS session without ClientCore, to send the server arbitrary frames."""

    def __init__(self, lab: Lab, pki: Path, name: str = "alice", port: int = 45000):
        self.lab, self.addr = lab, (CLIENT_IP, port)
        ctx = make_context("client", pki / f"{name}.crt", pki / f"{name}.key", pki / "ca.crt", "srv")
        self.dtls = DtlsSession.client(ctx, DGRAM_MTU, lab.now)
        self.frames: list = []
        for _ in range(10):
            self._exchange(self.dtls.datagrams_to_send())
            if self.dtls.state == ESTABLISHED:
                break
        assert self.dtls.state == ESTABLISHED

    def _exchange(self, out: list[bytes]) -> None:
        for d in out:
            self.lab.server.receive_datagram(d, self.addr, self.lab.now)
        for d, addr in self.lab.server.datagrams_to_send():
            assert addr == self.addr
            for rec in self.dtls.receive_datagram(d, self.lab.now):
                self.frames.append(frames.parse(rec))

    def send(self, *records: bytes) -> list:
        before = len(self.frames)
        self._exchange([self.dtls.send(r) for r in records])
        return self.frames[before:]


def test_hello_wrong_version_refused(pki: Path) -> None:
    lab = Lab(pki)
    raw = RawClient(lab, pki)
    got = raw.send(frames.encode(frames.Hello(2, frames.NEW_TUNNEL)))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_VERSION)]
    assert "version 2" in got[0].reason
    assert lab.server.tunnels == {} and lab.server.paths == {}
    assert lab.server.next_event() is not None  # PathUp
    assert isinstance(lab.server.next_event(), events.Refused)


def test_join_is_not_accepted_yet(pki: Path) -> None:
    lab = Lab(pki).up()
    raw = RawClient(lab, pki, "alice")
    got = raw.send(frames.encode(frames.Hello(1, lab.client.tunnel_id)))  # JOIN of a live tunnel
    assert [(type(f), f.code, f.reason) for f in got] == [(frames.Close, frames.CLOSE_REFUSED, "unknown tunnel")]
    assert len(lab.server.tunnels) == 1 and lab.tunnel().paths[0].addr == lab.client_addr


def test_second_hello_on_a_path_is_a_protocol_error(pki: Path) -> None:
    lab = Lab(pki)
    raw = RawClient(lab, pki)
    got = raw.send(frames.encode(frames.Hello()))
    assert [type(f) for f in got] == [frames.Config]
    got = raw.send(frames.encode(frames.Hello()))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_PROTOCOL)]
    assert raw.addr not in lab.server.paths


def test_server_answers_ping_before_hello(pki: Path) -> None:
    lab = Lab(pki)
    raw = RawClient(lab, pki)
    assert raw.send(frames.encode(frames.Ping(42))) == [frames.Pong(42)]
    assert raw.send(b"\x04\x01") == []  # a truncated PING is malformed, not answered
    assert lab.server.paths[raw.addr].malformed == 1


def test_server_answers_close_by_dropping_the_tunnel(pki: Path) -> None:
    lab = Lab(pki)
    raw = RawClient(lab, pki)
    raw.send(frames.encode(frames.Hello()))
    assert len(lab.server.tunnels) == 1
    raw.send(frames.encode(frames.Close(frames.CLOSE_NORMAL, "bye")))
    assert lab.server.tunnels == {} and lab.server.paths == {}


def test_half_open_handshake_times_out(pki: Path) -> None:
    lab = Lab(pki)
    lab.client.connect(lab.now)
    # deliver the ClientHellos, never the client's last flight
    for _ in range(2):
        for d in lab.client.datagrams_to_send():
            lab.server.receive_datagram(d, lab.client_addr, lab.now)
        for d, _ in lab.server.datagrams_to_send():
            lab.client.receive_datagram(d, lab.now)
    assert list(lab.server.paths) == [lab.client_addr]
    lab.drop_c2s = True
    lab.advance(HANDSHAKE_TIMEOUT + 2 * STEP)
    assert lab.server.paths == {}
    assert lab.server.counters["handshakes_failed"] == 1
    assert [e.reason for e in lab.server_events(events.Refused)] == ["handshake timed out"]


# -- several clients, server restart, pool exhaustion -------------------------------------
def _second_client(lab: Lab, pki: Path, name: str, port: int) -> Lab:
    other = Lab(pki, client=name)
    other.server = lab.server
    other.port = port
    return other.up()


def test_two_clients_routed_by_inner_address(pki: Path) -> None:
    a = Lab(pki).up()
    b = _second_client(a, pki, "bob", 41000)
    assert b.client.config.addresses == [ipaddress.IPv4Interface("100.64.0.3/24")]
    assert len(a.server.tunnels) == 2
    to_a, to_b = ipv4("100.64.0.1", "100.64.0.2", b"a"), ipv4("100.64.0.1", "100.64.0.3", b"b")
    a.server.send_packet(to_b, a.now)
    a.server.send_packet(to_a, a.now)
    out = a.server.datagrams_to_send()
    assert sorted(addr for _, addr in out) == sorted([a.client_addr, b.client_addr])
    for d, addr in out:
        (a if addr == a.client_addr else b).client.receive_datagram(d, a.now)
    assert a.client.to_tun == [to_a] and b.client.to_tun == [to_b]
    # bob cannot send with alice's source address
    b.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), b.now)
    b.pump()
    assert a.server.to_tun == [] and a.server.by_name["bob"].spoofed == 1
    assert a.server.by_name["alice"].spoofed == 0


def test_pool_exhausted_refuses_next_client(pki: Path, plain) -> None:
    a = Lab(pki, pool=AddressPool(ipaddress.IPv4Interface("100.64.0.1/30"))).up()
    b = Lab(pki, client="bob")
    b.server, b.port = a.server, 41000
    b.client.connect(b.now)
    b.pump()
    assert b.client.state != C_UP
    closes = [c for c in frames_seen(plain, "client", frames.Close)]
    assert [c.code for c in closes] == [frames.CLOSE_REFUSED] and "exhausted" in closes[0].reason
    assert list(a.server.by_name) == ["alice"]
    assert b.client.get_timer() == pytest.approx(b.now + BACKOFF_REFUSED)


def test_server_restart_client_reconnects(pki: Path) -> None:
    lab = Lab(pki).up()
    t_up = lab.now
    # the server process restarts: all state gone, same address
    fresh = Lab(pki).server
    lab.server = fresh
    lab.client.send_packet(ipv4("100.64.0.2", "100.64.0.1"), lab.now)
    lab.pump()
    assert fresh.counters["junk"] == 1 and fresh.paths == {}  # an old-session record from nobody
    lab.advance(TIMEOUT + BACKOFF_MIN + 3 * STEP)
    assert lab.client_events(events.TunnelDown)
    assert lab.first_time(lab.cevents, events.TunnelDown) <= t_up + TIMEOUT + STEP + 1e-6
    assert lab.client.state == C_UP
    assert lab.client.config.addresses == [FIRST_CLIENT]
    assert lab.server_events(events.ClientConnected)[-1].replaced is False
