"""Tests for the sans-IO cores: ClientCores and a ServerCore wired together in memory,
on the lab of tests/corelab.py (manual clock, per-path drops and delays).

Every test here runs in both clock modes (the autouse ``drive`` fixture): the timers
run at every step, or only when the cores' deadlines say.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Callable

import pytest

from tests.corelab import (
    DEAD, DRIVE, FIRST_CLIENT, INNER_MTU, LINGER, PROBE, ROUTES, STEP, T0, TIMEOUT, Client, Net, RawClient, down_pkt,
    client_core, frames_seen, ipv4, one_path, two_paths, up_pkt,
)
from tunnel.core import events
from tunnel.wire import frames
from tunnel.core.client import (
    BACKOFF_MIN, BACKOFF_REFUSED, C_CLOSED, C_CONNECTING, C_UP, REBIND_AFTER, SILENT_ATTEMPT, SILENT_BACKOFF, ClientCore,
)
from tunnel.wire.dtls import ESTABLISHED
from tunnel.core.estimator import RECOVER_PROBES
from tunnel.core.path import P_DEGRADED, P_DOWN, P_UP, TICK
from tunnel.core.settings import HANDSHAKE_TIMEOUT
from tunnel.core.pool import AddressPool


@pytest.fixture(autouse=True, params=["step", "deadline"])
def drive(request):
    DRIVE["mode"] = request.param
    yield request.param
    DRIVE["mode"] = "step"


# -- coming up ---------------------------------------------------------------------------------
def test_tunnel_comes_up(pki: Path, plain) -> None:
    net, c = one_path(pki)
    kinds = [type(e) for _, e in c.events]
    assert kinds == [events.Connecting, events.PathUp, events.TunnelUp, events.PathJoined]
    connecting, path_up, tunnel_up, joined = (e for _, e in c.events)
    assert connecting == events.Connecting("a", 1)
    assert path_up.addr == "a" and path_up.peer == "srv" and path_up.cipher.startswith("ECDHE-")
    assert joined == events.PathJoined("a", "a")
    cfg = tunnel_up.config
    assert cfg.addresses == [FIRST_CLIENT]
    assert cfg.mtu == INNER_MTU == 1422
    assert (cfg.keepalive_ms, cfg.timeout_ms) == (125, 2000)  # the server's probe interval and timeout
    assert cfg.routes == ROUTES
    assert cfg.tunnel_id == (1).to_bytes(16, "big") == c.core.tunnel_id
    st = c.core.stats()
    assert st["state"] == "up" and st["mode"] == "duplicate" and st["address"] == "100.64.0.2/24"
    assert [(p["name"], p["state"], p["joined"]) for p in st["paths"]] == [("a", "up", True)]

    assert [type(e) for _, e in net.sevents] == [events.PathUp, events.ClientConnected]
    assert net.sev(events.PathUp)[0].peer == "alice"
    assert net.sev(events.ClientConnected) == [events.ClientConnected("alice", "100.64.0.2/24", c.addr("a"), False)]
    assert net.server.counters["cookies_sent"] == 1
    t = net.tunnel()
    assert t.name == "alice" and t.address == FIRST_CLIENT and [p.addr for p in t.paths] == [c.addr("a")]
    assert t.scheduler.mode == "duplicate" and t.stats()["mode"] == "duplicate"
    assert net.server.route_table.lookup(FIRST_CLIENT.ip.packed) is t
    # on the wire: HELLO(v1, new tunnel, duplicate, k=2, priority 0) up, CONFIG down
    assert frames_seen(plain, "server", frames.Hello) == [frames.Hello(1, frames.NEW_TUNNEL, 1, 2, 0)]
    assert frames_seen(plain, "client", frames.Config) == [cfg]


def test_static_address_from_pool(pki: Path) -> None:
    net = Net(pki, static={"alice": ipaddress.IPv4Address("100.64.0.77")})
    c = net.client()
    c.add("a")
    assert c.core.config.addresses == [ipaddress.IPv4Interface("100.64.0.77/24")]


def test_hello_mode_numbers(pki: Path) -> None:
    from tunnel.core.scheduler import MODES

    for i, mode in enumerate(MODES, start=1):
        assert client_core(None, mode=mode).hello_mode == i
    with pytest.raises(ValueError):
        client_core(None, mode="fastest")


def test_two_paths_one_tunnel(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    tid = c.core.tunnel_id
    # one path created the tunnel, the other JOINed it
    hellos = frames_seen(plain, "server", frames.Hello)
    assert sorted(hellos, key=lambda h: h.priority) == [
        frames.Hello(1, frames.NEW_TUNNEL, 1, 2, 0),
        frames.Hello(1, tid, 1, 2, 1),
    ]
    assert len(net.server.tunnels) == 1
    t = net.tunnel()
    assert sorted(p.addr for p in t.paths) == sorted([c.addr("a"), c.addr("b")])
    assert sorted(p.priority for p in t.paths) == [0, 1]
    assert len(net.sev(events.ClientConnected)) == 1
    (sj,) = net.sev(events.PathJoined)
    assert sj == events.PathJoined(c.addr("b"), "alice")
    # client: one TunnelUp, both paths joined, the CONFIG of both paths is the same
    assert len(c.evs(events.TunnelUp)) == 1
    assert sorted(e.key for e in c.evs(events.PathJoined)) == ["a", "b"]
    configs = frames_seen(plain, "client", frames.Config)
    assert len(configs) == 2 and configs[0] == configs[1] == c.core.config
    assert [p["joined"] for p in c.core.stats()["paths"]] == [True, True]
    assert len(t.stats()["paths"]) == 2


def test_only_one_path_creates_the_tunnel(pki: Path, plain) -> None:
    """Both handshakes finish before any CONFIG: the second path waits and then JOINs."""
    net = Net(pki)
    c = net.client()
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.pump()
    assert all(c.path(k).established for k in "ab")
    assert c.joined() == ["a", "b"]
    assert [h.tunnel_id for h in frames_seen(plain, "server", frames.Hello)] == [frames.NEW_TUNNEL, c.core.tunnel_id]
    assert len(net.server.tunnels) == 1


def test_path_added_later_joins_at_once(pki: Path, plain) -> None:
    net, c = one_path(pki)
    net.advance(0.5)
    c.add("c", priority=3)
    assert c.joined() == ["a", "c"]
    assert frames_seen(plain, "server", frames.Hello)[-1] == frames.Hello(1, c.core.tunnel_id, 1, 2, 3)
    assert len(c.evs(events.TunnelUp)) == 1 and c.evs(events.PathJoined)[-1] == events.PathJoined("c", "c")
    assert len(net.tunnel().paths) == 2


# -- packets --------------------------------------------------------------------------------------
def test_client_packet_reaches_server_tun(pki: Path) -> None:
    net, c = one_path(pki)
    pkts = [up_pkt(i) for i in range(5)]
    pkts.append(ipv4("100.64.0.2", "10.9.1.1", b"x" * (INNER_MTU - 20)))  # full-size, to a pushed route
    for p in pkts:
        assert c.send_up(p) == ["a"]
    net.pump()
    assert net.server.to_tun == pkts
    assert net.tunnel().dedup.delivered == len(pkts) and net.tunnel().spoofed == 0


def test_server_packet_reaches_client_tun(pki: Path) -> None:
    net, c = one_path(pki)
    pkts = [down_pkt(i) for i in range(5)]
    pkts.append(ipv4("8.8.8.8", "100.64.0.2", b"y" * (INNER_MTU - 20)))
    for p in pkts:
        assert net.send_down(p) == ["a"]
    net.pump()
    assert c.core.to_tun == pkts
    assert c.core.stats()["delivered"] == len(pkts)


def test_forged_source_dropped_and_counted(pki: Path) -> None:
    net, c = one_path(pki)
    c.send_up(ipv4("100.64.0.99", "100.64.0.1"))  # another client's address
    c.send_up(ipv4("192.0.2.1", "100.64.0.1"))
    net.pump()
    assert net.server.to_tun == []
    assert net.tunnel().spoofed == 2 and net.tunnel().stats()["spoofed"] == 2
    good = up_pkt()
    c.send_up(good)
    net.pump()
    assert net.server.to_tun == [good]


def test_short_and_non_ipv4_packets_from_tunnel_dropped(pki: Path) -> None:
    net, c = one_path(pki)
    path = c.path("a")
    v6 = bytes([0x60]) + bytes(39)
    for i, pkt in enumerate([b"\x45" * 19, v6, b"\x45"], start=1):
        net.server.receive_datagram(c.addr("a"), path.encrypt(frames.encode_data(i, pkt), net.now), net.now)
    assert net.server.to_tun == [] and net.tunnel().spoofed == 3
    # the client refuses to send non-IPv4 in the first place
    assert c.send_up(v6) == []
    assert c.core.counters["not_ipv4"] == 1 and c.core.datagrams_to_send() == []


def test_packet_to_unknown_destination_counted(pki: Path) -> None:
    net, c = one_path(pki)
    assert net.send_down(down_pkt(dst="100.64.0.99")) == []
    assert net.send_down(down_pkt(dst="10.9.0.1")) == []  # a pushed route is not a client
    assert net.server.counters["no_route"] == 2
    net.server.send_packet(bytes([0x60]) + bytes(39), net.now)
    net.server.send_packet(b"\x45" * 10, net.now)
    assert net.server.counters["not_ipv4"] == 2
    assert net.server.datagrams_to_send() == []


def test_packets_while_down_are_counted(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    assert c.send_up(up_pkt()) == []
    assert c.core.counters["dropped_no_path"] == 1 and c.core.stats()["dropped_no_path"] == 1
    c.add("a", pump=False)  # handshaking: still no path carries the tunnel
    assert c.send_up(up_pkt()) == [] and c.core.counters["dropped_no_path"] == 2
    assert net.send_down(down_pkt()) == []
    assert net.server.counters["no_route"] == 1


def test_tunnel_wide_dedup(pki: Path) -> None:
    """The same sequence number in two different DTLS records is delivered once."""
    net, c = one_path(pki)
    pkt = up_pkt()
    for _ in range(2):
        d = c.path("a").encrypt(frames.encode_data(7, pkt), net.now)
        net.server.receive_datagram(c.addr("a"), d, net.now)
    assert net.server.to_tun == [pkt]
    assert net.tunnel().dedup.duplicates == 1


def test_dedup_window_spans_the_paths(pki: Path) -> None:
    """A sequence number that came on one path is a duplicate on the other, both ways."""
    net, c = two_paths(pki)
    pkt = up_pkt()
    for key in ("a", "b", "a"):
        d = c.path(key).encrypt(frames.encode_data(1000, pkt), net.now)
        net.server.receive_datagram(c.addr(key), d, net.now)
    assert net.server.to_tun == [pkt] and net.tunnel().dedup.duplicates == 2
    t = net.tunnel()
    spaths = {p.addr: p for p in t.paths}
    for key in ("b", "a"):
        d = spaths[c.addr(key)].encrypt(frames.encode_data(500, down_pkt()), net.now)
        c.core.receive_datagram(key, d, net.now)
    assert c.core.to_tun == [down_pkt()] and c.core.stats()["duplicates"] == 1


def test_replayed_datagram_dropped_by_dtls(pki: Path) -> None:
    net, c = one_path(pki)
    c.send_up(up_pkt())
    ((_, d, _),) = c.core.datagrams_to_send()
    for _ in range(3):
        net.server.receive_datagram(c.addr("a"), d, net.now)
    assert len(net.server.to_tun) == 1
    assert net.tunnel().paths[0].dtls.records_dropped == 2


# -- duplicate mode ---------------------------------------------------------------------------------
def test_duplicate_mode_sends_on_every_path_and_delivers_once(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    ups = [up_pkt(i) for i in range(10)]
    for p in ups:
        assert c.send_up(p) == ["a", "b"]
    net.pump()
    t = net.tunnel()
    assert net.server.to_tun == ups
    assert (t.dedup.delivered, t.dedup.duplicates, t.dedup.too_old) == (10, 10, 0)  # one duplicate per packet
    downs = [down_pkt(i) for i in range(10)]
    for p in downs:
        assert sorted(net.send_down(p)) == ["a", "b"]
    net.pump()
    assert c.core.to_tun == downs
    st = c.core.stats()
    assert (st["delivered"], st["duplicates"], st["too_old"]) == (10, 10, 0)
    # one sequence space for the tunnel: each path carried numbers 1..10, the copies share them
    for key in ("a", "b"):
        assert [f.seq for f in frames_seen(plain, "server", frames.Data, c.addr(key))] == list(range(1, 11))
        assert [f.seq for f in frames_seen(plain, "client", frames.Data, c.addr(key))] == list(range(1, 11))


def test_balance_mode_spreads_packets_over_the_paths(pki: Path, plain) -> None:
    net, c = two_paths(pki, mode="balance")
    assert net.tunnel().scheduler.mode == "balance"
    keys = [k for i in range(10) for k in c.send_up(up_pkt(i))]
    assert sorted(keys) == ["a"] * 5 + ["b"] * 5  # no measured rates yet: equal shares, one path per packet
    assert all(keys[i] != keys[i + 1] for i in range(9))
    net.pump()
    t = net.tunnel()
    assert net.server.to_tun == [up_pkt(i) for i in range(10)] and t.dedup.duplicates == 0
    # the sequence numbers are the tunnel's: the two paths carried complementary halves
    seqs = {k: [f.seq for f in frames_seen(plain, "server", frames.Data, c.addr(k))] for k in "ab"}
    assert sorted(seqs["a"] + seqs["b"]) == list(range(1, 11))


# -- probes ------------------------------------------------------------------------------------------------
def test_probes_every_interval_on_both_sides_with_or_without_traffic(pki: Path, plain) -> None:
    net = Net(pki)
    c = net.client()
    net.delay["a"] = 2 * STEP
    c.add("a", pump=False)
    net.run_until(lambda: c.core.state == C_UP, 1.0)
    net.advance(0.5)
    path, spath = c.path("a"), net.spath(c, "a")
    sent0, ssent0 = path.est.probes_sent, spath.est.probes_sent
    net.advance(1.0)  # quiet
    assert path.est.probes_sent - sent0 == 8 and spath.est.probes_sent - ssent0 == 8
    sent0, ssent0 = path.est.probes_sent, spath.est.probes_sent

    def traffic() -> None:
        c.send_up(up_pkt())
        net.send_down(down_pkt())

    net.advance(1.0, each=traffic)  # busy: the probes go on all the same
    assert path.est.probes_sent - sent0 == 8 and spath.est.probes_sent - ssent0 == 8
    net.advance(2 * STEP)  # the last packets are still on the wire
    assert len(net.server.to_tun) == len(c.core.to_tun) == 64
    # RTT: 2 x 2 steps, measured on both sides
    assert path.srtt == pytest.approx(4 * STEP) and spath.srtt == pytest.approx(4 * STEP)
    assert c.core.stats()["paths"][0]["rtt_ms"] == pytest.approx(62.5)
    assert path.loss == 0.0 and spath.loss == 0.0 and path.est.probes_lost == 0
    assert path.rate > 0 and spath.rate > 0
    assert path.state == spath.state == P_UP and c.core.state == C_UP


def test_pong_carries_the_receive_counters(pki: Path, plain) -> None:
    net, c = one_path(pki)
    net.advance(0.5)
    for i in range(5):
        c.send_up(up_pkt(i, size=100))
    net.pump()
    spath = net.spath(c, "a")
    path = c.path("a")
    # the next PING of the client: the PONG reports the server's counters including that PING
    net.now = path.est.last_probe + PROBE
    c.core.handle_timer(net.now)
    (ping,) = c.core.datagrams_to_send()
    net.server.receive_datagram(c.addr("a"), ping[1], net.now)
    rx, rx_bytes = spath.rx_records, spath.rx_bytes
    for addr, d, _ in net.server.datagrams_to_send():
        plain.delivered(net.now, False, addr, d)  # handed over by hand: the tap must see it too
        c.core.receive_datagram("a", d, net.now)
    pong = frames_seen(plain, "client", frames.Pong)[-1]
    assert (pong.rx_records, pong.rx_bytes) == (rx, rx_bytes)
    assert rx == path.tx_records and rx_bytes == path.tx_bytes  # nothing lost
    assert spath.stats()["rx_packets"] == rx


def test_pings_are_answered_on_every_path(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    net.advance(1.0)
    for key in ("a", "b"):
        p, sp, addr = c.path(key), net.spath(c, key), c.addr(key)
        assert p.srtt == 0.0 and sp.srtt == 0.0  # the in-memory wire has no delay
        assert frames_seen(plain, "server", frames.Ping, addr) and frames_seen(plain, "client", frames.Ping, addr)
        assert frames_seen(plain, "server", frames.Pong, addr) and frames_seen(plain, "client", frames.Pong, addr)


def test_lossy_path_becomes_degraded_and_recovers(pki: Path) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    toggle = itertools.cycle([True, False])
    # every second DATA datagram on path a is lost upstream (PINGs and PONGs are small and get through)
    net.drop = lambda direction, key, d: direction == "up" and key == "a" and len(d) > 150 and next(toggle)
    i = itertools.count()

    def traffic() -> None:
        c.send_up(up_pkt(next(i), size=150))

    t_deg = net.run_until(lambda: c.path("a").state == P_DEGRADED, 3.0, each=traffic)
    assert c.evs(events.PathState)[-1] == events.PathState("a", "a", "degraded")
    assert c.path("a").loss > 0.2 and c.path("b").loss == 0.0
    assert c.core.stats()["paths"][0]["state"] == "degraded"
    # duplicate mode keeps using the degraded path, and b delivers everything exactly once
    n = next(i)
    assert c.send_up(up_pkt(n)) == ["a", "b"]
    net.pump()
    assert net.server.to_tun == [up_pkt(k, size=150) for k in range(n)] + [up_pkt(n)]
    net.drop = None
    t_up = net.run_until(lambda: c.path("a").state == P_UP, 3.0, each=traffic)
    assert t_up - t_deg > RECOVER_PROBES * PROBE  # hysteresis: not at the first good interval
    assert c.evs(events.PathState)[-1] == events.PathState("a", "a", "up")
    assert c.path("a").loss < 0.1


# -- dead paths --------------------------------------------------------------------------------------------
def test_path_down_after_dead_interval_traffic_continues_on_the_other(pki: Path) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    pb, spb = c.path("b"), net.spath(c, "b")
    net.cut("b")
    last, slast = pb.est.last_rx, spb.est.last_rx
    t_down = net.run_until(lambda: pb.state == P_DOWN, 1.0)
    assert t_down == last + DEAD  # exactly: not a tick earlier
    assert c.events[-1] == (t_down, events.PathState("b", "b", "down"))
    assert c.core.state == C_UP and not c.evs(events.TunnelDown) and not c.evs(events.PathDown)
    net.run_until(lambda: spb.state == P_DOWN, 1.0)
    assert net.stimes(events.PathState) == [slast + DEAD]
    assert net.sev(events.PathState) == [events.PathState(c.addr("b"), "alice", "down")]
    # traffic goes on over a, both ways (duplicate mode still puts copies on the down path:
    # probes lost to random loss can make a live path look down; here b is really cut)
    ups, downs = [up_pkt(i) for i in range(5)], [down_pkt(i) for i in range(5)]
    for u, d in zip(ups, downs):
        assert c.send_up(u) == ["a", "b"]
        assert net.send_down(d) == ["a", "b"]
    net.pump()
    assert net.server.to_tun == ups and c.core.to_tun == downs
    assert net.tunnel().dedup.duplicates == 0  # nothing came through the cut path
    assert pb.alive and spb.alive  # down, not closed: the sessions wait for the link


def test_down_path_comes_back_after_recover_probes_pongs(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    pb = c.path("b")
    net.cut("b")
    net.run_until(lambda: pb.state == P_DOWN, 1.0)
    net.advance(0.5)
    n_before = len(plain.seen("client", frames.Pong, c.addr("b")))
    net.mend("b")
    t_up = net.run_until(lambda: pb.state == P_UP, 1.0)
    pongs = [s.time for s in plain.seen("client", frames.Pong, c.addr("b"))[n_before:]]
    # hysteresis: the first RECOVER_PROBES - 1 PONGs leave it down (no PathState until t_up,
    # checked below), the next brings it up
    assert len(pongs) == RECOVER_PROBES and pongs[-1] == t_up and pongs[-2] < t_up
    assert c.events[-1] == (t_up, events.PathState("b", "b", "up"))
    assert pb.loss == 0.0 and pb.est.changes == 2
    net.run_until(lambda: net.spath(c, "b").state == P_UP, 1.0)
    assert c.send_up(up_pkt()) == ["a", "b"]
    assert sorted(net.send_down(down_pkt())) == ["a", "b"]
    assert c.core.stats()["paths"][1]["state_changes"] == 2


def test_a_path_silent_longer_than_timeout_keeps_its_session_and_carries_data_at_once(pki: Path, plain) -> None:
    """Issue 16 finding 7: an outage of 6 s (three times the timeout) does not end the path's
    session on either side; the moment the link works again DATA flows both ways on the same
    session (no handshake, no JOIN, no TunnelDown), and the sequence space goes on."""
    net, c = one_path(pki)
    t, tid, path, spath, old_addr = net.tunnel(), c.core.tunnel_id, c.path("a"), net.spath(c, "a"), c.addr("a")
    sent = {"up": 0, "down": 0}
    arrived: dict = {"up": [], "down": []}

    def traffic() -> None:  # a packet each way every step (64/s), like a media stream
        sent["up"] += 1
        sent["down"] += 1
        c.send_up(up_pkt(sent["up"]))
        net.server.send_packet(down_pkt(sent["down"]), net.now)
        if net.server.to_tun:
            arrived["up"].append(net.now)
            net.server.to_tun.clear()
        if c.core.to_tun:
            arrived["down"].append(net.now)
            c.core.to_tun.clear()

    net.advance(0.5, each=traffic)
    net.cut("a")
    t_cut = net.now
    net.advance(6.0, each=traffic)
    assert 6.0 > 2 * TIMEOUT
    # both ends still hold the session, down, and say how long it has been silent
    assert path.alive and path.state == P_DOWN and spath.alive and spath.state == P_DOWN
    assert net.server.paths[old_addr] is spath and t.paths == [spath]
    st = c.core.stats()["paths"][0]
    assert st["state"] == "down" and 5.5 <= st["silent_s"] <= 6.0
    assert 5.5 <= net.server.stats()["tunnels"][0]["paths"][0]["silent_s"] <= 6.0
    assert c.core.state == C_UP and not c.evs(events.TunnelDown) and not c.evs(events.PathDown)
    assert not net.sev(events.PathDown) and not net.sev(events.ClientGone)
    assert c.core.stats()["rebind_attempts"] >= 2  # spares kept trying (a server that lost the session)
    handshakes = len(c.evs(events.PathUp))
    n_hello = len(frames_seen(plain, "server", frames.Hello))
    net.mend("a")
    t_mend = net.now
    arrived["up"].clear(), arrived["down"].clear()
    net.advance(1.0, each=traffic)
    # the first datagram after the link works gets through: within 200 ms, data again both ways
    assert arrived["up"][0] - t_mend <= 0.2 and arrived["down"][0] - t_mend <= 0.2
    # here at once: sent at the first step after the mend, seen by traffic() at the next
    assert arrived["up"][0] - t_mend <= 2 * STEP and arrived["down"][0] - t_mend <= 2 * STEP
    # on the same sessions: no new handshake completed, no HELLO/JOIN, no rebinding
    assert c.path("a") is path and net.server.paths[old_addr] is spath and c.addr("a") == old_addr
    assert len(c.evs(events.PathUp)) == handshakes and len(frames_seen(plain, "server", frames.Hello)) == n_hello
    assert c.core.stats()["rebinds"] == 0 and net.server.counters["paths_replaced"] == 0
    assert path.state == P_UP and spath.state == P_UP and c.core.stats()["paths"][0]["silent_s"] == 0.0
    assert net.tunnel() is t and c.core.tunnel_id == tid and len(net.sev(events.ClientConnected)) == 1
    # the sequence space went on: nothing was restarted
    assert frames_seen(plain, "server", frames.Data)[-1].seq == sent["up"]
    assert t_mend - t_cut == pytest.approx(6.0)


def test_a_rolling_outage_loses_no_media(pki: Path) -> None:
    """Issue 16 finding 7, the rolling case (two modems through coverage holes): path a is silent
    for 6 s (longer than the timeout); as it comes back, path b goes silent.  Duplicate mode must
    carry the stream on a at once: no gap beyond one packet interval (+ 200 ms at most), and
    no packet lost either way (the switch happens between two packets)."""
    net, c = two_paths(pki)
    interval = 2 * STEP  # 32 packets/s each way
    sent = {"up": 0, "down": 0}
    got: dict = {"up": [], "down": []}  # arrival times

    def collect() -> None:
        for side, tun in (("up", net.server.to_tun), ("down", c.core.to_tun)):
            got[side] += [net.now] * len(tun)
            tun.clear()

    def traffic() -> None:
        collect()
        if round((net.now - T0) / STEP) % 2 == 0:
            sent["up"] += 1
            sent["down"] += 1
            c.send_up(up_pkt(sent["up"]))
            net.server.send_packet(down_pkt(sent["down"]), net.now)

    net.advance(1.0, each=traffic)
    start = {k: len(v) for k, v in got.items()}
    sent_before = dict(sent)
    net.cut("a")
    net.advance(6.0, each=traffic)
    net.mend("a")
    net.cut("b")
    net.advance(3.0, each=traffic)
    collect()  # what arrived in the last step
    for side in ("up", "down"):
        times = got[side][start[side]:]
        assert len(times) == sent[side] - sent_before[side], (side, len(times), sent[side] - sent_before[side])
        gap = max(b - a for a, b in zip(times, times[1:]))
        assert gap <= interval + 0.2, (side, gap)
        assert gap <= interval + STEP, (side, gap)  # in fact: not one packet late
    assert c.core.stats()["rebinds"] == 0 and net.server.counters["paths_replaced"] == 0
    assert sorted(c.joined()) == ["a", "b"] and c.path("a").state == P_UP and c.path("b").state == P_DOWN


def test_a_server_restart_during_a_long_outage_still_recovers_with_a_new_handshake(pki: Path) -> None:
    """The kept session is useless when the server lost it: the spare sessions that keep trying
    during the outage find the new server, hear that the tunnel is unknown and start a new one."""
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    net.cut("a")
    net.advance(3 * TIMEOUT)
    assert c.core.state == C_UP and c.path("a").state == P_DOWN  # still holding the old session
    net.restart_server()
    net.mend("a")
    t0 = net.now
    t_up = net.run_until(lambda: c.core.state == C_UP and c.core.tunnel_id not in (tid, frames.NEW_TUNNEL), 3.0)
    assert t_up - t0 <= SILENT_ATTEMPT + SILENT_BACKOFF + 0.1  # the next spare attempt
    assert c.evs(events.TunnelDown) == [events.TunnelDown("the server no longer knows the tunnel")]
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert c.send_up(up_pkt()) == ["a"] and net.send_down(down_pkt()) == ["a"]


def test_a_link_event_retries_at_once(pki: Path) -> None:
    """A link or address event (the shell's netlink watcher) makes a silent path try again now:
    a spare attempt that has heard nothing is restarted instead of running out its second."""
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    net.cut("a")
    slot = c.core.slots["a"]
    net.advance(2.0)
    net.run_until(lambda: slot.spare is not None and net.now - slot.spare.created >= 2 * SILENT_BACKOFF, 2.0)
    net.restart_server()  # the kept session is lost: only a new handshake helps
    net.mend("a")
    t0 = net.now
    c.core.link_changed(t0)
    c.drain()
    net.pump()
    assert c.times(events.Connecting, lambda e: e.key == events.SpareKey("a"))[-1] == t0
    t_up = net.run_until(lambda: c.core.state == C_UP and c.core.tunnel_id not in (tid, frames.NEW_TUNNEL), 2.0)
    assert t_up - t0 <= 2 * STEP  # without the event: the unheard spare's second, then SILENT_BACKOFF
    # a refusal's wait is not cut short by a link event
    slot.retry_at, slot.refused = net.now + BACKOFF_REFUSED, True
    c.core.link_changed(net.now)
    assert slot.retry_at == net.now + BACKOFF_REFUSED


def test_backoff_grows_while_server_is_unreachable(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    net.cut("a")
    c.add("a")
    t0 = net.now
    net.advance(3 * HANDSHAKE_TIMEOUT + 2)
    conns = [(t, e) for t, e in c.events if isinstance(e, events.Connecting)]
    assert [e.attempt for _, e in conns] == [1, 2, 3, 4]
    times = [t - t0 for t, _ in conns]
    # each attempt: handshake timeout, then 0.25, 0.5, 1 s of backoff
    assert times == [0, HANDSHAKE_TIMEOUT + 0.25, 2 * HANDSHAKE_TIMEOUT + 0.75, 3 * HANDSHAKE_TIMEOUT + 1.75]
    downs = c.evs(events.PathDown)
    assert len(downs) == 3 and all(d.reason == "handshake timed out" for d in downs)
    assert not c.evs(events.TunnelDown)  # it never was up
    assert net.server.paths == {} and net.server.counters["cookies_sent"] == 0
    # the server comes back: the next attempt succeeds and the backoff is reset
    net.mend("a")
    net.run_until(lambda: c.core.state == C_UP, HANDSHAKE_TIMEOUT + 2.5)
    assert c.core.slots["a"].backoff == BACKOFF_MIN


def test_backoff_is_per_path(pki: Path) -> None:
    net, c = one_path(pki)
    net.cut("b")
    c.add("b")
    net.advance(2 * HANDSHAKE_TIMEOUT + 1)
    assert [e.attempt for e in c.evs(events.Connecting) if e.key == "b"] == [1, 2, 3]
    assert c.core.slots["a"].attempts == 1 and c.core.slots["a"].backoff == BACKOFF_MIN
    assert c.core.state == C_UP and c.joined() == ["a"]


def test_server_keeps_a_silent_path_down_then_forgets_the_client_after_linger(pki: Path) -> None:
    """A path that carries a tunnel is kept (down) past the timeout, so it works again at once
    when its link does; a client whose paths have all been silent for timeout + linger is
    forgotten (paths, tunnel, route, address), so the server's memory stays bounded."""
    net, c = one_path(pki)
    t = net.tunnel()
    spath = t.paths[0]
    net.drop_up.add("a")
    last = spath.est.last_rx
    net.run_until(lambda: spath.state == P_DOWN, 1.0)
    assert net.stimes(events.PathState) == [last + DEAD]
    net.advance(2 * TIMEOUT)
    # kept: still in the tunnel, down, probing; its status says how long it has been silent
    assert net.server.paths == {c.addr("a"): spath} and t.paths == [spath] and spath.state == P_DOWN
    assert not net.sev(events.PathDown)
    (st,) = net.server.stats()["tunnels"][0]["paths"]
    assert st["state"] == "down" and st["silent_s"] == pytest.approx(net.now - last, abs=PROBE)
    # silent for the timeout: it counts as no path for the pending route (a few packets wait) and linger
    assert t.idle_since == last + TIMEOUT
    assert net.send_down(down_pkt()) == [] and net.server.route_table.pending(t) == 1
    t_forgot = net.run_until(lambda: net.sev(events.ClientGone), TIMEOUT + LINGER)
    assert t_forgot == last + TIMEOUT + LINGER
    assert net.sev(events.PathDown) == [events.PathDown(c.addr("a"), f"nothing received for {TIMEOUT + LINGER:.1f} s")]
    assert net.stimes(events.PathDown) == [t_forgot]
    assert net.sev(events.ClientGone) == [events.ClientGone("alice", "100.64.0.2/24", "no path for 5 s")]
    assert net.server.tunnels == {} and net.server.paths == {} and len(net.server.route_table) == 0
    assert net.server.by_name == {}
    net.send_down(down_pkt())
    assert net.server.counters["no_route"] == 1


def test_a_client_that_comes_back_within_linger_keeps_its_tunnel_on_the_kept_session(pki: Path) -> None:
    """Silent for longer than the timeout but less than timeout + linger: the server still holds
    the path's session, so the client's next datagram is simply accepted."""
    net, c = one_path(pki)
    t, spath = net.tunnel(), net.tunnel().paths[0]
    net.cut("a")
    net.advance(TIMEOUT + LINGER - 1.0)
    assert t.paths == [spath] and net.server.tunnels == {t.id: t}
    assert t.idle_since is not None and net.send_down(down_pkt(5)) == []  # held: no path heard from
    c.core.to_tun.clear()
    net.mend("a")
    c.send_up(up_pkt(1))
    net.pump()
    assert net.server.to_tun == [up_pkt(1)] and spath.est.last_rx == net.now
    assert c.core.to_tun == [down_pkt(5)] and t.idle_since is None  # the held packet follows at once
    net.advance(LINGER + 1.0)
    assert net.server.tunnels == {t.id: t} and t.paths == [spath] and not net.sev(events.ClientGone)


# -- scheduling modes over real paths ---------------------------------------------------------------------
def test_lowest_rtt_uses_one_path_and_switches_when_it_goes_down(pki: Path) -> None:
    net = Net(pki)
    c = net.client(mode="lowest-rtt")
    net.delay.update(a=STEP, b=4 * STEP)
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    net.advance(1.0)
    assert net.tunnel().scheduler.mode == "lowest-rtt"  # the server follows the client's mode
    assert c.path("a").srtt == pytest.approx(2 * STEP) and c.path("b").srtt == pytest.approx(8 * STEP)
    for i in range(5):
        assert c.send_up(up_pkt(i)) == ["a"]
        assert net.send_down(down_pkt(i)) == ["a"]
    net.cut("a")
    net.run_until(lambda: c.path("a").state == P_DOWN, 1.0)
    assert c.send_up(up_pkt()) == ["b"]
    net.run_until(lambda: net.spath(c, "a").state == P_DOWN, 1.0)
    assert net.send_down(down_pkt()) == ["b"]
    # a comes back, clearly faster: traffic returns to it
    net.mend("a")
    net.run_until(lambda: c.path("a").state == P_UP, 1.0)
    assert c.send_up(up_pkt()) == ["a"]
    net.run_until(lambda: net.spath(c, "a").state == P_UP, 1.0)
    assert net.send_down(down_pkt()) == ["a"]
    net.pump()
    assert net.tunnel().dedup.duplicates == 0 and c.core.stats()["duplicates"] == 0


def test_lowest_rtt_moves_to_a_path_that_turns_out_faster(pki: Path) -> None:
    net = Net(pki)
    c = net.client(mode="lowest-rtt")
    net.delay.update(a=4 * STEP, b=STEP)
    c.add("a", pump=False)
    net.run_until(lambda: c.core.state == C_UP, 2.0)
    c.add("b", pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    net.advance(2.0)
    assert c.path("b").srtt < 0.9 * c.path("a").srtt  # b is 4 times faster, both up
    assert c.send_up(up_pkt()) == ["b"]


def test_backup_mode_uses_priority_order(pki: Path) -> None:
    net = Net(pki)
    c = net.client(mode="backup")
    c.add("a", priority=1, pump=False)
    c.add("b", priority=0, pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    net.advance(0.5)
    t = net.tunnel()
    assert t.scheduler.mode == "backup"
    assert {p.addr: p.priority for p in t.paths} == {c.addr("a"): 1, c.addr("b"): 0}  # from the HELLOs
    assert c.send_up(up_pkt()) == ["b"] and net.send_down(down_pkt()) == ["b"]
    net.cut("b")
    net.run_until(lambda: c.path("b").state == P_DOWN and net.spath(c, "b").state == P_DOWN, 1.0)
    assert c.send_up(up_pkt(1)) == ["a"] and net.send_down(down_pkt(1)) == ["a"]
    net.pump()
    assert net.server.to_tun[-1] == up_pkt(1) and c.core.to_tun[-1] == down_pkt(1)
    net.mend("b")
    net.run_until(lambda: c.path("b").state == P_UP and net.spath(c, "b").state == P_UP, 1.0)
    assert c.send_up(up_pkt(2)) == ["b"] and net.send_down(down_pkt(2)) == ["b"]


def test_server_mode_follows_the_client_or_its_own(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki, key="r1")
    assert isinstance(raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 3, 0, 0)))[0], frames.Config)
    t = net.tunnel()
    assert t.scheduler.mode == "lowest-rtt" and t.scheduler.redundancy == 2
    raw = RawClient(net, pki, key="r2")  # a new tunnel of the same client replaces it
    raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 0, 5, 0)))  # mode 0: no preference
    assert net.tunnel().scheduler.mode == "duplicate"
    raw = RawClient(net, pki, key="r3")
    raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 2, 3, 0)))
    assert (net.tunnel().scheduler.mode, net.tunnel().scheduler.redundancy) == ("redundant", 3)

    fixed = Net(pki, mode="backup")
    raw = RawClient(fixed, pki)
    raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 1, 0, 0)))
    assert fixed.tunnel().scheduler.mode == "backup"
    with pytest.raises(ValueError):
        Net(pki, mode="fastest")


def test_unknown_mode_in_hello_is_a_protocol_error(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    got = raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 6, 0, 0)))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_PROTOCOL)]
    assert "mode 6" in got[0].reason
    assert net.server.tunnels == {} and net.server.paths == {}


# -- JOIN --------------------------------------------------------------------------------------------------
def test_join_from_another_session_of_the_same_client(pki: Path) -> None:
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    raw = RawClient(net, pki, "alice")
    got = raw.send(frames.encode(frames.Hello(1, tid, 0, 0, 4)))
    assert got == [frames.Config(tid, [FIRST_CLIENT], INNER_MTU, 125, 2000, ROUTES)]
    t = net.tunnel()
    assert [p.addr for p in t.paths] == [c.addr("a"), raw.addr] and t.paths[1].priority == 4
    assert net.sev(events.PathJoined) == [events.PathJoined(raw.addr, "alice")]
    assert len(net.sev(events.ClientConnected)) == 1
    assert sorted(net.send_down(down_pkt())) == ["a", "raw"]  # duplicate: the new path carries too
    # DATA on the joined path counts in the tunnel's sequence space
    raw.send(frames.encode_data(1, up_pkt(1)))
    c.send_up(up_pkt(2))  # the client's own first DATA is number 1 too: a duplicate
    net.pump()
    assert net.server.to_tun == [up_pkt(1)] and t.dedup.duplicates == 1


def test_join_with_another_clients_certificate_is_refused(pki: Path, plain) -> None:
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    raw = RawClient(net, pki, "bob")
    got = raw.send(frames.encode(frames.Hello(1, tid)))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_REFUSED)]
    assert got[0].reason == "refused"  # the peer is not told whose tunnel it is
    assert net.sev(events.Refused) == [events.Refused(raw.addr, "client 'bob' may not join the tunnel of 'alice'")]
    assert raw.addr not in net.server.paths and "bob" not in net.server.by_name
    t = net.tunnel()
    assert [p.addr for p in t.paths] == [c.addr("a")]
    assert net.send_down(down_pkt()) == ["a"]


def test_join_of_an_unknown_tunnel_starts_a_new_tunnel(pki: Path, plain) -> None:
    net = Net(pki)
    c = net.client()
    bogus = bytes([0x99]) * 16
    c.core.tunnel_id = bogus  # a tunnel id the server never gave out
    c.add("a")
    closes = frames_seen(plain, "client", frames.Close)
    assert [(f.code, f.reason) for f in closes] == [(frames.CLOSE_UNKNOWN_TUNNEL, "unknown tunnel")]
    assert c.core.tunnel_id == frames.NEW_TUNNEL  # forgotten
    assert c.evs(events.PathDown) == [events.PathDown("a", "server closed the path: unknown tunnel")]
    assert net.sev(events.Refused) == [events.Refused(c.addr("a"), "unknown tunnel")]
    t_close = net.now
    t_up = net.run_until(lambda: c.core.state == C_UP, 1.0)
    assert t_up == t_close + STEP  # no backoff: the next timer tick
    assert c.evs(events.Connecting)[-1] == events.Connecting("a", 2)
    assert [h.tunnel_id for h in frames_seen(plain, "server", frames.Hello)] == [bogus, frames.NEW_TUNNEL]
    assert c.core.tunnel_id == net.tunnel().id != bogus
    assert len(c.evs(events.TunnelUp)) == 1


def test_server_restart_client_recovers_with_a_new_tunnel(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    old_tid = c.core.tunnel_id
    for i in range(3):
        c.send_up(up_pkt(i))
    net.advance(0.5)
    fresh = net.restart_server()
    t_restart = net.now
    n_old = len(net.sevents)
    assert c.send_up(up_pkt(3)) == ["a", "b"]
    net.pump()
    assert fresh.counters["junk"] == 2 and fresh.paths == {}  # old-session records from nobody
    t_back = net.run_until(
        lambda: c.core.state == C_UP and c.core.tunnel_id not in (old_tid, frames.NEW_TUNNEL)
        and c.joined() == ["a", "b"],
        TIMEOUT + 2.0,
    )
    assert c.evs(events.TunnelDown)
    # the paths came back, JOINed the tunnel the server had forgotten, and were told so
    unknown = [e for e in net.sev(events.Refused) if e.reason == "unknown tunnel"]
    assert unknown
    assert all(f.code == frames.CLOSE_UNKNOWN_TUNNEL for f in frames_seen(plain, "client", frames.Close))
    assert len(c.evs(events.TunnelUp)) == 2
    t = net.tunnel()
    assert t.id == c.core.tunnel_id and sorted(p.addr for p in t.paths) == sorted(c.addr(k) for k in "ab")
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert [e.replaced for _, e in net.sevents[n_old:] if isinstance(e, events.ClientConnected)] == [False]
    for key in "ab":
        # down after the dead interval; REBIND_AFTER later a spare session from a new socket JOINs,
        # hears that the tunnel is unknown, and the path starts over at once (no wait for the timeout)
        assert [e.reason for e in c.evs(events.PathDown) if e.addr == key] == ["the server no longer knows the tunnel"]
        assert [e.attempt for e in c.evs(events.Connecting) if e.key == key] == [1, 2]
        assert [e.attempt for e in c.evs(events.Connecting) if e.key == events.SpareKey(key)] == [1]
    assert t_back - t_restart < DEAD + REBIND_AFTER + 0.1
    t_refused = net.stimes(events.Refused)[0]
    assert c.times(events.Connecting)[-1] == t_refused + STEP  # the new tunnel at once
    # a new tunnel, a new sequence space: the next DATA is number 1 again, delivered once
    up = up_pkt(7)
    c.send_up(up)
    net.pump()
    assert fresh.to_tun == [up] and t.dedup.duplicates == 1
    assert [f.seq for f in frames_seen(plain, "server", frames.Data, t.paths[0].addr)] == [1]
    assert sorted(net.send_down(down_pkt())) == ["a", "b"]


def test_tunnel_without_paths_lingers_then_is_forgotten(pki: Path, plain) -> None:
    net, c = one_path(pki)
    t, tid = net.tunnel(), c.core.tunnel_id
    for i in range(3):
        c.send_up(up_pkt(i))
    net.pump()
    c.remove("a")  # the only path goes away
    assert net.sev(events.PathDown) == [events.PathDown(c.addr("a"), "client closed: interface gone")]
    assert t.paths == [] and t.idle_since == net.now and net.server.tunnels == {tid: t}
    assert c.evs(events.TunnelDown) == [events.TunnelDown("interface gone")] and c.core.state == C_CONNECTING
    net.advance(LINGER - STEP)
    assert not net.sev(events.ClientGone)
    # back within linger: the JOIN finds the tunnel, with its address and sequence space
    c.add("a2")
    assert c.joined() == ["a2"] and c.core.tunnel_id == tid and net.tunnel() is t
    assert t.idle_since is None and net.sev(events.PathJoined) == [events.PathJoined(c.addr("a2"), "alice")]
    assert len(net.sev(events.ClientConnected)) == 1 and len(c.evs(events.TunnelUp)) == 2
    c.send_up(up_pkt(3))
    net.pump()
    assert frames_seen(plain, "server", frames.Data)[-1].seq == 4 and net.server.to_tun[-1] == up_pkt(3)
    net.advance(LINGER + 1)
    assert not net.sev(events.ClientGone)  # a tunnel with a path does not linger out
    c.remove("a2")
    t_idle = net.now
    t_gone = net.run_until(lambda: net.sev(events.ClientGone), LINGER + 0.1)
    assert t_gone == t_idle + LINGER
    assert net.sev(events.ClientGone) == [events.ClientGone("alice", "100.64.0.2/24", "no path for 5 s")]
    assert net.server.tunnels == {} and len(net.server.route_table) == 0
    # too late: the JOIN is for an unknown tunnel, and the client starts a new one (same address)
    c.add("a3")
    net.run_until(lambda: c.core.state == C_UP, 1.0)
    assert c.core.tunnel_id != tid and net.tunnel().id == c.core.tunnel_id
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert frames_seen(plain, "client", frames.Close)[-1].code == frames.CLOSE_UNKNOWN_TUNNEL


def test_remove_path_closes_it_and_the_server_drops_just_that_path(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    c.remove("b")
    assert frames_seen(plain, "server", frames.Close, c.addr("b")) == [frames.Close(frames.CLOSE_PATH, "interface gone")]
    assert net.sev(events.PathDown) == [events.PathDown(c.addr("b"), "client closed: interface gone")]
    t = net.tunnel()
    assert [p.addr for p in t.paths] == [c.addr("a")] and t.idle_since is None
    assert not net.sev(events.ClientGone)
    assert c.evs(events.PathDown) == [events.PathDown("b", "interface gone")]
    assert not c.evs(events.TunnelDown) and c.core.state == C_UP and list(c.core.slots) == ["a"]
    assert c.send_up(up_pkt()) == ["a"] and net.send_down(down_pkt()) == ["a"]
    net.advance(2.0)
    assert [e.key for e in c.evs(events.Connecting)] == ["a", "b"]  # a removed path is not retried
    c.remove("nonexistent")  # harmless


HELLO_DGRAM = 13 + 8 + 21 + 16  # DTLS header, explicit nonce, HELLO, AES-GCM tag
CONFIG_DGRAM = 13 + 8 + 37 + 16  # the same around this lab's 37-byte CONFIG


@pytest.mark.parametrize("lost", ["HELLO of the creating path", "CONFIG of the joining path"])
def test_one_lost_hello_or_config_is_repaired(pki: Path, lost: str) -> None:
    net = Net(pki)
    c = net.client()
    dropped: list = []

    def drop(direction: str, key, d: bytes) -> bool:
        if dropped:
            return False
        if lost.startswith("HELLO") and (direction, len(d)) == ("up", HELLO_DGRAM):
            dropped.append(d)
        elif lost.startswith("CONFIG") and (direction, key, len(d)) == ("down", "b", CONFIG_DGRAM):
            dropped.append(d)
        return bool(dropped)

    net.drop = drop
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.advance(5.0)
    assert len(dropped) == 1
    assert all(c.path(k).state == P_UP for k in "ab")  # both sessions fine all along
    assert c.joined() == ["a", "b"]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_way_loss_moves_traffic_off_the_path_quickly(pki: Path, direction: str) -> None:
    net = Net(pki)
    c = net.client(mode="backup")
    c.add("a", priority=1, pump=False)
    c.add("b", priority=0, pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    net.advance(0.5)
    if direction == "up":
        def on_b() -> bool:  # the client still sends upstream on b
            return [p.key for p in c.core.scheduler.select(up_pkt())] == ["b"]
    else:
        sb = net.spath(c, "b")

        def on_b() -> bool:  # the server still sends downstream on b
            return net.tunnel().scheduler.select(down_pkt()) == [sb]
    assert on_b()
    (net.drop_up if direction == "up" else net.drop_down).add("b")
    t_cut = net.now
    t_moved = net.run_until(lambda: not on_b(), TIMEOUT + 1.0)
    assert t_moved - t_cut <= 2 * DEAD


@pytest.mark.parametrize("second", ["CLOSE", "CONFIG"])
def test_records_after_a_close_in_the_same_datagram_are_ignored(pki: Path, second: str) -> None:
    net, c = one_path(pki)
    sp = net.spath(c, "a")
    rec = frames.encode(frames.Close(0, "again")) if second == "CLOSE" else frames.encode(c.core.config)
    # a datagram may hold several DTLS records; the server only ever sends one, but nothing a
    # peer sends may raise out of the core
    d = sp.encrypt(frames.encode(frames.Close(0, "bye")), net.now) + sp.encrypt(rec, net.now)
    c.core.receive_datagram("a", d, net.now)
    assert c.core.slots["a"].path is None and c.core.state == C_CONNECTING
    assert c.core.scheduler.select(up_pkt()) == []


def test_forgotten_tunnel_is_reported_down(pki: Path) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    net.restart_server()
    # before the old sessions time out, an interface change brings a new path: its JOIN is refused
    c.remove("a")
    c.add("a2")
    assert c.evs(events.PathDown)[-1] == events.PathDown("a2", "server closed the path: unknown tunnel")
    assert c.joined() == [] and c.core.tunnel_id == frames.NEW_TUNNEL
    assert c.core.state == C_CONNECTING
    assert c.evs(events.TunnelDown)


# -- closing and refusals ---------------------------------------------------------------------------------
def test_client_close(pki: Path, plain) -> None:
    """A client that shuts down (CLOSE_NORMAL) ends its tunnel at once: no lingering."""
    net, c = two_paths(pki)
    c.core.close(net.now)
    net.pump()
    closes = frames_seen(plain, "server", frames.Close)
    assert closes and all(f == frames.Close(frames.CLOSE_NORMAL, "client shutting down") for f in closes)
    assert net.server.paths == {} and net.server.tunnels == {} and len(net.server.route_table) == 0
    assert c.core.state == C_CLOSED
    (gone,) = net.sev(events.ClientGone)
    assert gone.name == "alice" and gone.reason == "client closed: client shutting down"
    net.advance(3)  # a closed client never reconnects
    assert len(c.evs(events.Connecting)) == 2
    c.add("c")
    assert "c" not in c.core.slots


def test_same_client_gets_same_address_after_reconnect(pki: Path) -> None:
    net, alice = one_path(pki)
    alice.core.close(net.now)
    net.pump()
    bob = net.client("bob")  # another client takes the next address meanwhile
    bob.add("b")
    assert bob.core.config.addresses == [ipaddress.IPv4Interface("100.64.0.3/24")]
    again = net.client()  # a new alice process: her tunnel ended when she closed; the lease stays hers
    again.add("a2")
    assert again.core.config.addresses == [FIRST_CLIENT]
    assert net.sev(events.ClientConnected)[-1] == events.ClientConnected(
        "alice", "100.64.0.2/24", again.addr("a2"), False
    )
    (gone,) = net.sev(events.ClientGone)
    assert gone.name == "alice" and "client shutting down" in gone.reason
    assert len(net.server.tunnels) == 2


def test_new_tunnel_of_the_same_client_replaces_the_old_one(pki: Path, plain) -> None:
    net, first = two_paths(pki)
    old = net.tunnel()
    second = net.client()
    second.add("x")
    closes = frames_seen(plain, "client", frames.Close)
    assert [c.code for c in closes] == [frames.CLOSE_REPLACED] * 2
    assert sorted(e.addr for e in first.evs(events.PathDown)) == ["a", "b"]
    assert len(first.evs(events.TunnelDown)) == 1
    t = net.tunnel()
    assert t is not old and t.id == second.core.tunnel_id and [p.addr for p in t.paths] == [second.addr("x")]
    assert t.address == old.address == FIRST_CLIENT
    assert net.sev(events.ClientConnected)[-1].replaced is True


def test_unlisted_client_refused(pki: Path, plain) -> None:
    net = Net(pki, allowed={"bob"})
    c = net.client()
    c.add("a")
    closes = frames_seen(plain, "client", frames.Close)
    assert [f.code for f in closes] == [frames.CLOSE_REFUSED]
    assert "'alice' is not listed" in closes[0].reason
    (refused,) = net.sev(events.Refused)
    assert refused.addr == c.addr("a") and "not listed" in refused.reason
    assert not net.sev(events.ClientConnected)
    assert net.server.tunnels == {} and net.server.paths == {}
    assert not c.evs(events.TunnelUp)
    (down,) = c.evs(events.PathDown)
    assert "not listed" in down.reason
    assert c.core.slots["a"].retry_at == net.now + BACKOFF_REFUSED  # refused: retry slowly
    # and an unlisted client cannot JOIN either: it is refused as its handshake completes, before
    # any HELLO (a path that never sends one is not kept either)
    raw = RawClient(net, pki, "alice", key="raw", established=False)
    assert [(type(f), f.code) for f in raw.frames] == [(frames.Close, frames.CLOSE_REFUSED)]
    assert raw.dtls.state != ESTABLISHED and raw.addr not in net.server.paths


def test_listed_client_accepted(pki: Path) -> None:
    net = Net(pki, allowed={"alice"})
    c = net.client()
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.pump()
    assert c.joined() == ["a", "b"]


def test_client_from_other_ca_refused(pki: Path) -> None:
    net = Net(pki)
    c = net.client("mallory", client_pki=pki / "other")
    c.add("a")
    (refused,) = net.sev(events.Refused)
    assert "unable to get local issuer certificate" in refused.reason
    assert net.server.counters["handshakes_failed"] == 1 and net.server.paths == {}
    (down,) = c.evs(events.PathDown)
    assert "handshake failed" in down.reason
    assert c.core.slots["a"].retry_at == net.now + BACKOFF_MIN


def test_server_close(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    net.server.close(net.now)
    net.pump()
    closes = frames_seen(plain, "client", frames.Close)
    assert closes == [frames.Close(frames.CLOSE_NORMAL, "server shutting down")] * 2
    assert sorted(e.addr for e in c.evs(events.PathDown)) == ["a", "b"]
    (down,) = c.evs(events.TunnelDown)
    assert "server shutting down" in down.reason
    assert net.server.tunnels == {} and net.server.paths == {}
    (gone,) = net.sev(events.ClientGone)
    assert gone.reason == "server shutting down"
    # not a refusal: the paths retry after the normal backoff
    assert c.core.slots["a"].retry_at == net.now + BACKOFF_MIN


# -- junk and out-of-order control ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "junk",
    [b"", b"\x17" * 60, b"hello", b"\x15\xfe\xfd" + bytes(10) + b"\x00\x02\x02\x00",
     b"\x16\xfe\xfd" + bytes(10) + b"\x00\x10" + b"\x01" * 16, b"\x16" * 12],
)
def test_junk_from_unknown_address(pki: Path, junk: bytes) -> None:
    net = Net(pki)
    net.server.receive_datagram(("203.0.113.9", 9), junk, net.now)
    assert net.server.counters["junk"] == 1
    assert net.server.paths == {} and net.server.datagrams_to_send() == []
    assert net.server.next_event() is None


def test_junk_on_a_live_path_is_dropped(pki: Path) -> None:
    net, c = two_paths(pki)
    for junk in (b"\x17" * 60, b"\x16\xfe\xfd" + bytes(10) + b"\x00\x01\x00", b"x"):
        net.server.receive_datagram(c.addr("a"), junk, net.now)
        c.core.receive_datagram("a", junk, net.now)
        c.core.receive_datagram("unknown key", junk, net.now)
    assert c.core.state == C_UP and all(p.state == P_UP for p in net.tunnel().paths)
    pkt = up_pkt()
    c.send_up(pkt)
    net.pump()
    assert net.server.to_tun == [pkt]


def test_empty_datagram_on_a_live_path(pki: Path) -> None:
    net, c = one_path(pki)
    net.server.receive_datagram(c.addr("a"), b"", net.now)
    c.core.receive_datagram("a", b"", net.now)
    assert c.core.state == C_UP


def _handshake_only(net: Net, c: Client) -> list[bytes]:
    """Run the DTLS handshake of path "a"; return the client's HELLO datagram(s), not yet delivered."""
    c.add("a", pump=False)
    for _ in range(10):
        out = c.core.datagrams_to_send()
        if c.core.slots["a"].hello_at is not None:
            return [d for _, d, _ in out]
        for _, d, _ in out:
            net.server.receive_datagram(c.addr("a"), d, net.now)
        for _, d, _ in net.server.datagrams_to_send():
            c.core.receive_datagram("a", d, net.now)
        c.drain()
    raise AssertionError("handshake did not finish")


def test_data_and_config_before_hello_ignored(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    hello = _handshake_only(net, c)
    s, path = net.server, c.path("a")
    pkt = up_pkt()
    early = [
        frames.encode_data(1, pkt),
        frames.encode(frames.Config(bytes(16), [FIRST_CLIENT], 1400, 1000, 5000)),
        frames.encode(frames.Pong(99)),  # unsolicited PONG: ignored by the path
        b"\x07garbage",
    ]
    for rec in early:
        s.receive_datagram(c.addr("a"), path.encrypt(rec, net.now), net.now)
    assert s.to_tun == [] and s.tunnels == {}
    (spath,) = s.paths.values()
    assert spath.state == P_UP and spath.malformed == 3  # DATA, CONFIG, unknown type
    for d in hello:
        s.receive_datagram(c.addr("a"), d, net.now)
    for _, d, _ in s.datagrams_to_send():
        c.core.receive_datagram("a", d, net.now)
    assert c.core.state == C_UP and len(s.tunnels) == 1
    assert s.to_tun == []  # the early DATA was not delivered later either


def test_data_before_config_ignored_by_client(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    hello = _handshake_only(net, c)
    s, core = net.server, c.core
    for d in hello:
        s.receive_datagram(c.addr("a"), d, net.now)
    config = s.datagrams_to_send()  # held back
    spath = s.paths[c.addr("a")]
    early = ipv4("100.64.0.1", "100.64.0.2", b"early")
    core.receive_datagram("a", spath.encrypt(frames.encode_data(1, early), net.now), net.now)
    core.receive_datagram("a", spath.encrypt(frames.encode(frames.Hello()), net.now), net.now)
    assert core.to_tun == [] and core.state == C_CONNECTING and core.counters["malformed"] == 2
    for _, d, _ in config:
        core.receive_datagram("a", d, net.now)
    assert core.state == C_UP
    late = ipv4("100.64.0.1", "100.64.0.2", b"late")
    s.send_packet(late, net.now)
    for _, d, _ in s.datagrams_to_send():
        core.receive_datagram("a", d, net.now)
    assert core.to_tun == [late]


# -- HELLO handling, seen from a bare DTLS client ---------------------------------------------------------
def test_hello_wrong_version_refused(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    got = raw.send(frames.encode(frames.Hello(2, frames.NEW_TUNNEL)))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_VERSION)]
    assert "version 2" in got[0].reason
    assert net.server.tunnels == {} and net.server.paths == {}
    assert [type(e) for _, e in net.sevents] == [events.PathUp, events.Refused]


def test_repeated_hello_gets_the_same_config_and_hello_for_another_tunnel_is_refused(pki: Path) -> None:
    """A client whose CONFIG was lost asks again: the answer is the same tunnel, not a new one."""
    net = Net(pki)
    raw = RawClient(net, pki)
    (config,) = raw.send(frames.encode(frames.Hello()))
    assert raw.send(frames.encode(frames.Hello())) == [config]
    assert raw.send(frames.encode(frames.Hello(1, config.tunnel_id))) == [config]
    assert len(net.server.tunnels) == 1
    got = raw.send(frames.encode(frames.Hello(1, b"x" * 16)))  # a HELLO for another tunnel on a joined path
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_PROTOCOL)]
    assert raw.addr not in net.server.paths


def test_server_answers_ping_before_hello(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    # the PONG carries the server's receive counters for the path: 1 record (the PING), 9 bytes
    assert raw.send(frames.encode(frames.Ping(42))) == [frames.Pong(42, 1, 9)]
    assert raw.send(b"\x04\x01") == []  # a truncated PING is malformed, not answered (but counted)
    assert net.server.paths[raw.addr].malformed == 1
    assert raw.send(frames.encode(frames.Ping(43))) == [frames.Pong(43, 3, 20)]


def test_server_answers_close_by_dropping_the_path(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    raw.send(frames.encode(frames.Hello()))
    assert len(net.server.tunnels) == 1
    raw.send(frames.encode(frames.Close(frames.CLOSE_PATH, "bye")))  # this path ends, the tunnel lingers
    assert net.server.paths == {} and net.tunnel().paths == []
    assert net.sev(events.PathDown) == [events.PathDown(raw.addr, "client closed: bye")]
    net.advance(LINGER)
    assert net.server.tunnels == {}


def test_close_normal_from_the_client_ends_the_tunnel_at_once(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    raw.send(frames.encode(frames.Hello()))
    raw.send(frames.encode(frames.Close(frames.CLOSE_NORMAL, "bye")))
    assert net.server.paths == {} and net.server.tunnels == {}
    assert net.sev(events.ClientGone)[-1].reason == "client closed: bye"


def test_half_open_handshake_times_out(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    c.add("a", pump=False)
    # deliver the ClientHellos, never the client's last flight
    for _ in range(2):
        for _, d, _ in c.core.datagrams_to_send():
            net.server.receive_datagram(c.addr("a"), d, net.now)
        for _, d, _ in net.server.datagrams_to_send():
            c.core.receive_datagram("a", d, net.now)
    assert list(net.server.paths) == [c.addr("a")]
    net.drop_up.add("a")
    net.advance(HANDSHAKE_TIMEOUT + 2 * STEP)
    assert net.server.paths == {}
    assert net.server.counters["handshakes_failed"] == 1
    assert [e.reason for e in net.sev(events.Refused)] == ["handshake timed out"]


# -- several clients, pool exhaustion -------------------------------------------------------------------------
def test_two_clients_routed_by_inner_address(pki: Path) -> None:
    net, a = two_paths(pki)
    b = net.client("bob")
    b.add("bob-1")
    assert b.core.config.addresses == [ipaddress.IPv4Interface("100.64.0.3/24")]
    assert len(net.server.tunnels) == 2
    to_a, to_b = down_pkt(1), down_pkt(2, dst="100.64.0.3")
    assert net.send_down(to_b) == ["bob-1"]
    assert sorted(net.send_down(to_a)) == ["a", "b"]
    net.pump()
    assert a.core.to_tun == [to_a] and b.core.to_tun == [to_b]
    # bob cannot send with alice's source address
    b.send_up(up_pkt())
    net.pump()
    assert net.server.to_tun == [] and net.server.by_name["bob"].spoofed == 1
    assert net.server.by_name["alice"].spoofed == 0


def test_pool_exhausted_refuses_next_client(pki: Path, plain) -> None:
    net = Net(pki, pool=AddressPool(ipaddress.IPv4Interface("100.64.0.1/30")))
    a = net.client()
    a.add("a")
    b = net.client("bob")
    b.add("b")
    assert b.core.state != C_UP
    closes = frames_seen(plain, "client", frames.Close)
    assert [f.code for f in closes] == [frames.CLOSE_REFUSED] and "exhausted" in closes[0].reason
    assert list(net.server.by_name) == ["alice"]
    assert b.core.slots["b"].retry_at == net.now + BACKOFF_REFUSED
    # alice's second path JOINs: a JOIN needs no new address
    a.add("a2")
    assert a.joined() == ["a", "a2"]


def test_pending_route_holds_packets_until_a_path_is_back(pki: Path) -> None:
    """Issue 6: packets for a tunnel without path wait (3 at most), are flushed in order, or expire."""
    net, c = one_path(pki)
    t = net.tunnel()
    c.remove("a")  # the path is gone (a silent path is kept: it carries the packets instead)
    assert t.paths == []
    pkts = [down_pkt() + bytes([i]) for i in range(5)]
    for p in pkts:
        net.send_down(p)
    assert net.server.route_table.pending(t) == 3 and net.server.route_table.pending_dropped == 2
    c.core.to_tun.clear()
    c.add("a2")
    net.run_until(lambda: c.core.to_tun, 5.0)  # the client JOINs again: the queue is flushed
    assert c.core.to_tun[:3] == pkts[:3]
    # past the expiry they are dropped and counted
    c.remove("a2")
    assert not t.paths
    net.send_down(pkts[0])
    net.advance(net.server.route_table.pending_expiry + 0.1)
    assert net.server.route_table.pending(t) == 0 and net.server.route_table.pending_expired == 1


# -- reordering for balance classes (DATA_ORDERED) -------------------------------------------------------
REORDER_POLICY = {"class": [{"name": "bulk", "mode": "balance", "reorder": True, "reorder_ms": 100}]}


def _reorder_pair(pki: Path):
    from tunnel.core.policy import parse_policy

    policy = parse_policy(REORDER_POLICY, "test")
    net, c = two_paths(pki, mode="balance", policy=policy)
    net.server.set_policy(policy)
    net.delay["b"] = 0.030  # path b is 30 ms slower each way: balance mode reorders
    return net, c


def test_balance_with_reorder_delivers_in_order_over_unequal_paths(pki: Path) -> None:
    net, c = _reorder_pair(pki)
    ups = [up_pkt(i) for i in range(20)]
    keys = [k for p in ups for k in c.send_up(p)]
    assert set(keys) == {"a", "b"}  # both paths carried some
    net.advance(0.1)
    assert net.server.to_tun == ups  # in the order sent, although b's half came 30 ms late
    st = net.tunnel().reorder.stats()
    assert st["released"] > 0 and st["skipped"] == 0 and st["held"] == 0
    # and down: the server's reordering class sends DATA_ORDERED too
    downs = [down_pkt(i) for i in range(20)]
    for p in downs:
        net.send_down(p)
    net.advance(0.1)
    assert c.core.to_tun == downs
    assert c.core.stats()["reorder"]["released"] > 0


def test_balance_without_reorder_delivers_out_of_order(pki: Path) -> None:
    """The control for the test above: the same paths without ``reorder`` reorder packets."""
    net, c = two_paths(pki, mode="balance")
    net.delay["b"] = 0.030
    ups = [up_pkt(i) for i in range(20)]
    for p in ups:
        c.send_up(p)
    net.advance(0.1)
    assert sorted(net.server.to_tun) == sorted(ups) and net.server.to_tun != ups


def test_reorder_gap_from_a_lost_packet_is_skipped_when_the_other_path_passes_it(pki: Path) -> None:
    """A packet lost on path a: once path a delivers a later packet, the gap is known lost
    and the held packets go on at once, long before the hold time (100 ms)."""
    net, c = _reorder_pair(pki)
    net.delay["b"] = 0.0
    lost = {"n": 0}

    def drop(direction, key, data):  # lose the second DATA datagram on path a (not the queue's first)
        if direction == "up" and key == "a" and len(data) > 60:
            lost["n"] += 1
            return lost["n"] == 2
        return False

    net.drop = drop
    ups = [up_pkt(i) for i in range(10)]
    for p in ups:
        c.send_up(p)
    net.pump()
    net.drop = None
    assert lost["n"] == 5
    st = net.tunnel().reorder.stats()
    assert len(net.server.to_tun) == 9 and st["skipped"] == 1 and st["timeouts"] == 0
    assert net.server.to_tun == [p for p in ups if p in net.server.to_tun]  # in order, one missing


def test_reorder_hold_time_runs_out_when_no_path_proves_the_loss(pki: Path) -> None:
    net, c = _reorder_pair(pki)
    net.delay["b"] = 0.0
    sent = []

    def drop(direction, key, data):  # DATA on a is lost while ``sent`` says so
        return direction == "up" and key == "a" and len(data) > 60 and bool(sent)

    net.drop = drop
    c.send_up(up_pkt(0))  # a: delivered
    c.send_up(up_pkt(1))  # b: delivered
    net.pump()
    sent.append(True)
    for i in (2, 3):  # a (lost), then b: b's packet waits for a gap no path can explain
        c.send_up(up_pkt(i))
    net.pump()
    t = net.tunnel()
    assert net.server.to_tun == [up_pkt(0), up_pkt(1)] and t.reorder.held == 1
    start = net.now
    net.run_until(lambda: net.server.to_tun[-1] == up_pkt(3), 0.5)
    assert 0.1 <= net.now - start <= 0.1 + 2 * STEP
    assert t.reorder.stats()["timeouts"] == 1


def test_tunnel_keeps_counting_dtls_drops_of_paths_that_are_gone(pki: Path) -> None:
    net, c = two_paths(pki)
    rec = c.path("b").dtls.send(frames.encode_data(10_000, up_pkt(1)))
    flipped = rec[:-1] + bytes([rec[-1] ^ 1])
    net.server.receive_datagram(c.addr("b"), flipped, net.now)
    assert net.tunnel().stats()["dtls_dropped"] == 1
    c.remove("b")  # the path goes away (CLOSE_PATH): its drops stay in the tunnel's count
    net.pump()
    st = net.tunnel().stats()
    assert len(st["paths"]) == 1 and st["paths"][0]["dtls_dropped"] == 0 and st["dtls_dropped"] == 1


# -- the client's timer: deadlines, not a fixed tick ---------------------------------------------
def test_idle_client_runs_its_timer_only_to_probe(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    ests = [c.path(k).est for k in ("a", "b")]
    runs0, probes0 = c.timer_runs, sum(e.probes_sent for e in ests)
    net.advance(2.0)
    runs, probes = c.timer_runs - runs0, sum(e.probes_sent for e in ests) - probes0
    assert probes == 2 * round(2.0 / PROBE)  # both paths keep probing, in both modes
    if drive == "step":
        assert runs == round(2.0 / STEP)
    else:
        assert runs <= probes  # one timer per probe (the two paths' probes may share one)
        # no polling in the steady state: the timer is the earliest path deadline
        assert c.armed == min(c.path(k).service(net.now) for k in ("a", "b")) > net.now
    assert c.path("a").state == c.path("b").state == P_UP and c.core.state == C_UP


def client_snapshot(c: Client) -> Callable[[], object]:
    """What the client's timers change, for Client.invariant."""
    core = c.core
    return lambda: (
        len(core.outbox), len(core._events), len(core.to_tun),
        [(k, s.path and s.path.state, s.joined, s.hello_at, s.spare is not None, s.retry_at)
         for k, s in core.slots.items()])


def test_the_client_timers_never_act_before_the_deadline_they_gave(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    c.invariant = client_snapshot(c)
    net.cut("b")  # through a path going down, a spare session, and back
    net.advance(1.5)
    net.mend("b")
    net.advance(1.5)
    c.remove("b")
    net.cut("a")  # the last path: the tunnel goes down and reconnects with back-off
    net.advance(TIMEOUT + 1.0)
    net.mend("a")
    net.advance(2.0)
    assert c.core.state == C_UP
    assert c.checked > 100 or drive == "step"


@pytest.mark.parametrize("lost", ["HELLO", "CONFIG"])
def test_the_client_timers_cover_hello_retries(pki: Path, lost: str, drive) -> None:
    net = Net(pki)
    c = net.client()
    c.invariant = client_snapshot(c)
    dropped: list = []

    def drop(direction: str, key, d: bytes) -> bool:
        if not dropped and (direction, len(d)) == (("up", HELLO_DGRAM) if lost == "HELLO" else ("down", CONFIG_DGRAM)):
            dropped.append(net.now)
            return True
        return False

    net.drop = drop
    c.add("a", pump=False)
    t_joined = net.run_until(lambda: c.joined() == ["a"], 3.0)
    assert len(dropped) == 1
    from tunnel.core.client import HELLO_RETRY

    assert dropped[0] + HELLO_RETRY <= t_joined < dropped[0] + HELLO_RETRY + 2 * STEP  # retried on time
    assert c.checked > 10 or drive == "step"


def server_snapshot(net: Net) -> Callable[[], object]:
    server = net.server
    return lambda: (
        len(server.outbox), len(server._events), len(server.to_tun),
        sorted((str(a), p.state) for a, p in server.paths.items()),
        sorted((t.name, len(t.paths), t.idle_since) for t in server.tunnels.values()))


def test_the_server_timers_never_act_before_the_deadline_they_gave(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    net.server_invariant = server_snapshot(net)
    net.cut("b")  # server-side dead interval, then back
    net.advance(1.0)
    net.mend("b")
    net.advance(1.0)
    net.cut("a")
    net.cut("b")  # the client vanishes: its paths time out, the tunnel lingers, then is forgotten
    t_cut = net.now
    t_gone = net.run_until(lambda: not net.server.tunnels, TIMEOUT + LINGER + 1.0)
    assert t_gone >= t_cut + TIMEOUT + LINGER - 0.5
    assert net.server_checked > 100 or drive == "step"
    assert net.server.handle_timer(net.now) == net.now + 1.0  # nobody there: the server sleeps (MAX_SLEEP)


def test_idle_server_runs_its_timer_only_for_deadlines(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    runs0 = net.server_timer_runs
    net.advance(2.0)
    runs = net.server_timer_runs - runs0
    if drive == "step":
        assert runs == round(2.0 / STEP)
    else:  # its own probes on two paths: 2 x 16, some shared
        assert runs <= 2 * round(2.0 / PROBE)
        # the shell's rule: never sooner than TICK after the last run
        assert net.server_armed >= net.server_ran_at + TICK


# -- idle probing ---------------------------------------------------------------------------------
IDLE_PROBE = 0.5


def idle_pair(pki: Path) -> tuple[Net, Client]:
    net = Net(pki, idle_probe=IDLE_PROBE)
    return two_paths(pki, net, idle_probe_interval=IDLE_PROBE)


def probes(c: Client, net: Net) -> list[int]:
    return [c.path(k).est.probes_sent for k in "ab"] + [net.spath(c, k).est.probes_sent for k in "ab"]


def test_an_idle_tunnel_probes_slowly_and_traffic_brings_fast_probes_back_at_once(pki: Path) -> None:
    from tunnel.core.engine import IDLE_AFTER

    net, c = idle_pair(pki)
    net.advance(IDLE_AFTER + 0.5)  # no DATA: both ends go idle
    ests = [c.path(k).est for k in "ab"] + [net.spath(c, k).est for k in "ab"]
    assert all(e.idle for e in ests)
    assert c.core.stats()["paths"][0]["probing"] == "idle"
    p0 = probes(c, net)
    net.advance(4.0)
    sent = [b - a for a, b in zip(p0, probes(c, net))]
    assert all(round(4.0 / IDLE_PROBE) - 1 <= n <= round(4.0 / IDLE_PROBE) for n in sent), sent  # not 32 each
    assert all(c.path(k).state == P_UP for k in "ab") and c.core.state == C_UP  # idle, not dead
    # one packet up: the client's paths probe at the next timer, the server's once the DATA arrived
    p1 = probes(c, net)
    c.send_up(up_pkt())
    net.pump()
    net.advance(STEP)
    assert [b - a for a, b in zip(p1, probes(c, net))] == [1, 1, 1, 1]
    assert not any(e.idle for e in ests)
    p2 = probes(c, net)
    net.advance(0.5, each=lambda: c.send_up(up_pkt()))
    assert all(b - a >= 0.5 / PROBE - 1 for a, b in zip(p2, probes(c, net)))  # every PROBE again
    net.advance(IDLE_AFTER + 0.25)
    assert all(e.idle for e in ests)  # and idle again once it stops


def test_a_path_that_dies_while_idle_is_found_by_its_slow_probes(pki: Path) -> None:
    net, c = idle_pair(pki)
    net.advance(2.0)
    pb = c.path("b")
    assert pb.est.idle
    net.cut("b")
    last = pb.est.last_ack
    t_down = net.run_until(lambda: pb.state == P_DOWN, 3.0)
    idle_dead = DEAD * IDLE_PROBE / PROBE
    assert last + idle_dead <= t_down <= last + idle_dead + 2 * STEP  # the stretched dead interval
    assert c.path("a").state == P_UP and c.core.state == C_UP


def test_when_traffic_resumes_a_path_that_missed_its_idle_probe_goes_down_fast(pki: Path) -> None:
    """A path whose last idle probe was answered gets one dead interval to answer the
    first fast probe (no false "down" from the slow probes' age); one that missed its
    last idle probe goes down as soon as traffic needs it to be right."""
    net, c = idle_pair(pki)
    net.advance(2.0)
    pa, pb = c.path("a"), c.path("b")
    net.cut("b")
    net.advance(IDLE_PROBE + DEAD + 0.1)  # b missed an idle probe, not yet dead by the idle measure
    assert pb.state == P_UP and pa.state == P_UP
    t0 = net.now
    c.send_up(up_pkt())
    net.pump()
    t_down = net.run_until(lambda: pb.state == P_DOWN, 1.0, each=lambda: c.send_up(up_pkt()))
    assert t_down - t0 <= 2 * STEP  # at the first timer: it is not given the grace
    net.advance(1.0, each=lambda: c.send_up(up_pkt()))
    assert pa.state == P_UP  # a answered all along: never down
    assert pa.est.changes == 0


def test_idle_probing_keeps_the_timer_invariants(pki: Path, drive) -> None:
    net, c = idle_pair(pki)
    c.invariant, net.server_invariant = client_snapshot(c), server_snapshot(net)
    net.advance(3.0)  # active -> idle
    net.advance(0.25, each=lambda: c.send_up(up_pkt()))  # idle -> active
    net.advance(2.0)  # and idle again
    net.cut("b")
    net.advance(2.5)
    assert (c.checked > 200 and net.server_checked > 200) or drive == "step"


def test_without_idle_probe_interval_the_core_always_probes_fast(pki: Path) -> None:
    net, c = two_paths(pki)
    net.advance(3.0)
    assert not c.path("a").est.idle and not net.spath(c, "a").est.idle
    p0 = probes(c, net)
    net.advance(1.0)
    assert all(b - a == round(1.0 / PROBE) for a, b in zip(p0, probes(c, net)))
