"""Tests of one path (tunnel/core/path.py): probing, the PONG's receive counters, degraded,
down and recovered, silence beyond the timeout, the handshake time limit.

Most run on the in-memory lab of tests/corelab.py (ClientCores and a ServerCore wired
together, manual clock, per-path drops and delays), each in both clock modes (the autouse
``drive`` fixture, imported from corelab): the timers run at every step, or only when the
cores' deadlines say.  At the end, one Path alone (TestPathAlone): over a real DTLS
client/server pair, driven by hand with a manual clock, checking what ``service(now)`` does
and which deadline it gives.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.corelab import drive  # noqa: F401  (autouse here: every test runs in both clock modes)
from tests.corelab import (
    CLIENT_IP, DEAD, DGRAM_MTU, PROBE, SERVER_ADDR, STEP, T0, TIMEOUT, Net, down_pkt, frames_seen, one_path, two_paths,
    backup_pair, up_pkt,
)
from tunnel.core import events
from tunnel.wire import frames
from tunnel.core.client import C_UP
from tunnel.core.engine import frame_handlers
from tunnel.core.estimator import RECOVER_PROBES
from tunnel.core.path import INF, P_CLOSED, P_DEGRADED, P_DOWN, P_HANDSHAKING, P_UP
from tunnel.core.path import Path as CorePath
from tunnel.core.settings import HANDSHAKE_TIMEOUT, PathSettings
from tunnel.wire.dtls import DtlsListener, DtlsSession, make_context


# -- probes and PONGs -------------------------------------------------------------------------------
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


# -- degraded, down, recovered ----------------------------------------------------------------------
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


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_way_loss_moves_traffic_off_the_path_quickly(pki: Path, direction: str) -> None:
    net, c = backup_pair(pki)
    if direction == "up":
        def on_b() -> bool:  # the client still sends upstream on b
            return [p.key for p in c.core.scheduler.select(up_pkt(), 0.0)] == ["b"]
    else:
        sb = net.spath(c, "b")

        def on_b() -> bool:  # the server still sends downstream on b
            return net.tunnel().scheduler.select(down_pkt(), 0.0) == [sb]
    assert on_b()
    (net.drop_up if direction == "up" else net.drop_down).add("b")
    t_cut = net.now
    t_moved = net.run_until(lambda: not on_b(), TIMEOUT + 1.0)
    assert t_moved - t_cut <= 2 * DEAD


# -- silence longer than the timeout ----------------------------------------------------------------
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


# -- the DTLS session: handshake time limit, replays ------------------------------------------------
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


def test_replayed_datagram_dropped_by_dtls(pki: Path) -> None:
    net, c = one_path(pki)
    c.send_up(up_pkt())
    ((_, d, _),) = c.core.datagrams_to_send()
    for _ in range(3):
        net.server.receive_datagram(c.addr("a"), d, net.now)
    assert len(net.server.to_tun) == 1
    assert net.tunnel().paths[0].dtls.records_dropped == 2


# -- one Path alone: a real DTLS pair, a manual clock, no lab ---------------------------------------
SETTINGS = PathSettings(probe_interval=PROBE, dead_interval=DEAD, idle_probe_interval=None, timeout=TIMEOUT,
                        handshake_timeout=4.0)
CLIENT_ADDR = (CLIENT_IP, 40000)
RECORDS = frame_handlers(lambda path, rec, tos, now: None, {})  # PING and PONG to the path, as in the cores


def take(path: CorePath) -> list[bytes]:
    out, path.out = path.out, []
    return out


def deliver(path: CorePath, datagram: bytes, now: float) -> list[bytes]:
    """Feed one datagram to ``path`` and dispatch its records through the cores' frame table."""
    records = path.receive(datagram, now)
    for rec in records:
        RECORDS[rec[0]](path, rec, 0, now)
    return records


def client_path(pki: Path, now: float) -> CorePath:
    ctx = make_context("client", pki / "alice.crt", pki / "alice.key", pki / "ca.crt", "srv")
    return CorePath(DtlsSession.client(ctx, DGRAM_MTU, now), SERVER_ADDR, now, SETTINGS, key="a")


def established_pair(pki: Path, now: float) -> tuple[CorePath, CorePath]:
    """A client Path and the server's Path of the same session, handshaken at ``now``."""
    client = client_path(pki, now)
    listener = DtlsListener(make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"), DGRAM_MTU)
    server = None
    for _ in range(10):
        for d in take(client):
            if server is None:
                session, replies = listener.accept(d, CLIENT_ADDR, now)
                if session is not None:
                    server = CorePath(session, CLIENT_ADDR, now, SETTINGS)
                for r in replies:
                    deliver(client, r, now)
            else:
                deliver(server, d, now)
        for d in take(server) if server is not None else []:
            deliver(client, d, now)
        if client.established and server is not None and server.established:
            return client, server
    raise AssertionError("handshake did not finish")


class TestPathAlone:
    """Path.service(now) with a manual clock: what it does at a deadline, and the next one it gives.
    No lab here, so the lab's clock modes do not apply: this ``drive`` replaces the module's."""

    @pytest.fixture
    def drive(self) -> None:
        return None

    def test_service_gives_the_handshake_limit_and_ends_the_path_at_it(self, pki: Path) -> None:
        path = client_path(pki, T0)  # nobody answers
        limit = T0 + SETTINGS.handshake_timeout
        assert path.state == P_HANDSHAKING and take(path)  # the ClientHello
        t = T0
        for _ in range(100):
            due = path.service(t)
            if path.state != P_HANDSHAKING:
                break
            # the earlier of the DTLS retransmission timer and the handshake's time limit
            assert due == min(path.dtls.get_timer() or INF, limit) and t < due <= limit
            assert path.service((t + due) / 2) == due and path.state == P_HANDSHAKING  # nothing before it
            t = due
        assert t == limit and due == INF
        assert path.state == P_CLOSED and not path.alive and path.reason == "handshake timed out"

    def test_an_established_path_probes_every_probe_interval_and_gives_the_next_probe_time(self, pki: Path) -> None:
        client, server = established_pair(pki, T0)
        assert client.state == server.state == P_UP
        t = T0
        for i in range(1, 9):
            due = client.service(t)
            assert due == t + PROBE  # the next probe (the dead interval and the silence limit are later)
            assert client.est.probes_sent == i
            (ping,) = take(client)
            assert [rec[0] for rec in deliver(server, ping, t)] == [frames.PING]
            (pong,) = take(server)  # answered at once, with the server's receive counters
            assert [frames.parse(rec) for rec in deliver(client, pong, t)] == [
                frames.Pong(i, server.rx_records, server.rx_bytes)]
            assert client.service(t + PROBE / 2) == due and not client.out  # no probe before it is due
            t = due
        assert client.state == P_UP and client.srtt == 0.0 and client.est.probes_lost == 0
        assert client.tx_records == server.rx_records == 8

    def test_silence_beyond_the_silent_limit_ends_the_path(self, pki: Path) -> None:
        client, _ = established_pair(pki, T0)  # then the server is never heard again
        last_rx = client.est.last_rx
        assert client.silent_limit == TIMEOUT  # the settings' timeout until the owner changes it
        client.silent_limit = limit = TIMEOUT - PROBE / 2  # off the probe times: only its own deadline is on time
        t, states = T0, {}
        while client.alive and t < T0 + 2 * TIMEOUT:
            due = client.service(t)
            take(client)
            states.setdefault(client.state, t)
            assert due <= last_rx + limit or not client.alive  # the silence limit is a deadline it gives
            t = due if client.alive else t
        assert states[P_DOWN] == last_rx + DEAD  # down after the dead interval, still alive then
        assert t == last_rx + limit and client.state == P_CLOSED
        assert client.reason == f"nothing received for {limit:.1f} s"
        assert client.service(t + 1.0) == INF

    def test_a_path_its_owner_keeps_stays_down_and_probing_through_any_silence(self, pki: Path) -> None:
        client, _ = established_pair(pki, T0)
        client.silent_limit = INF  # what a core does once the path carries a tunnel
        t = T0
        while t < T0 + 5 * TIMEOUT:
            t = client.service(t)
            take(client)
        assert client.alive and client.state == P_DOWN
        assert client.est.probes_sent == round(5 * TIMEOUT / PROBE)  # one per probe interval, down or not
