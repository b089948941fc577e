"""Tests of the server core (tunnel/core/server.py): admission and refusals, JOIN, the address
pool, routing between clients and the TUN, the pending route, closing, linger, junk and the
server's timers.

On the in-memory lab of tests/corelab.py (ClientCores and a ServerCore wired together,
manual clock, per-path drops and delays).  Every lab test here runs in both clock modes
(the autouse ``drive`` fixture, imported from corelab): the timers run at every step, or
only when the cores' deadlines say.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.corelab import drive  # noqa: F401  (autouse here: every test runs in both clock modes)
from tests.corelab import (
    DEAD, FIRST_CLIENT, INNER_MTU, LINGER, PROBE, ROUTES, STEP, TIMEOUT, Net, RawClient, down_pkt, frames_seen,
    handshake_only, ipv4, one_path, server_snapshot, two_paths, up_pkt,
)
from tunnel.core import events
from tunnel.wire import frames
from tunnel.core.client import BACKOFF_MIN, BACKOFF_REFUSED, C_CONNECTING, C_UP
from tunnel.wire.dtls import ESTABLISHED
from tunnel.core.path import P_DOWN, P_UP, TICK
from tunnel.core.pool import AddressPool


# -- admission: HELLO handling, seen from a bare DTLS client ----------------------------------------
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


def test_unknown_mode_in_hello_is_a_protocol_error(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    got = raw.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL, 6, 0, 0)))
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_PROTOCOL)]
    assert "mode 6" in got[0].reason
    assert net.server.tunnels == {} and net.server.paths == {}


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


def test_server_answers_ping_before_hello(pki: Path) -> None:
    net = Net(pki)
    raw = RawClient(net, pki)
    # the PONG carries the server's receive counters for the path: 1 record (the PING), 9 bytes
    assert raw.send(frames.encode(frames.Ping(42))) == [frames.Pong(42, 1, 9)]
    assert raw.send(b"\x04\x01") == []  # a truncated PING is malformed, not answered (but counted)
    assert net.server.paths[raw.addr].malformed == 1
    assert raw.send(frames.encode(frames.Ping(43))) == [frames.Pong(43, 3, 20)]


def test_data_and_config_before_hello_ignored(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    hello = handshake_only(net, c)
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


# -- JOIN -------------------------------------------------------------------------------------------
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


# -- refusals ---------------------------------------------------------------------------------------
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


# -- the address pool -------------------------------------------------------------------------------
def test_static_address_from_pool(pki: Path) -> None:
    net = Net(pki, static={"alice": ipaddress.IPv4Address("100.64.0.77")})
    c = net.client()
    c.add("a")
    assert c.core.config.addresses == [ipaddress.IPv4Interface("100.64.0.77/24")]


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


# -- routing between clients and the TUN ------------------------------------------------------------
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


# -- closing, silence and linger --------------------------------------------------------------------
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


# -- junk -------------------------------------------------------------------------------------------
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


# -- the server's timer -----------------------------------------------------------------------------
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
