"""Tests of the data plane (tunnel/core/engine.py, TunnelEngine, the same for both roles):
sequence numbers and dedup across paths, the scheduling modes, reordering, per-tunnel
statistics and idle probing.

Most run on the in-memory lab of tests/corelab.py (ClientCores and a ServerCore wired
together, manual clock, per-path drops and delays), each in both clock modes (the autouse
``drive`` fixture, imported from corelab): the timers run at every step, or only when the
cores' deadlines say.  At the end, the engine alone (TestEngineAlone): fake paths, a manual
clock, what ``send``, ``on_data`` and ``service`` put in the engine's Outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corelab import drive  # noqa: F401  (autouse here: every test runs in both clock modes)
from tests.corelab import (
    DEAD, INNER_MTU, PROBE, STEP, T0, Client, Net, backup_pair, client_snapshot, down_pkt, frames_seen, ipv4, one_path,
    flow_pkt, server_snapshot, two_paths, up_pkt,
)
from tunnel.wire import frames
from tunnel.core.client import C_UP
from tunnel.core.engine import IDLE_AFTER, INF, Outputs, TunnelEngine
from tunnel.core.bottleneck import Bottleneck
from tunnel.core.path import P_CLOSED, P_DOWN, P_UP, TICK
from tunnel.core.policy import Policy, TrafficClass
from tunnel.core.reorder import HOLD_MARGIN


# -- packets both ways, dedup across the paths ------------------------------------------------------
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


# -- scheduling modes over real paths ---------------------------------------------------------------
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
    # equal paths: each packet goes where it arrives first, which alternates (what one packet
    # adds to a path's queue makes the other one earlier)
    assert sorted(keys) == ["a"] * 5 + ["b"] * 5
    assert all(keys[i] != keys[i + 1] for i in range(9))
    net.pump()
    t = net.tunnel()
    assert net.server.to_tun == [up_pkt(i) for i in range(10)] and t.dedup.duplicates == 0
    # the sequence numbers are the tunnel's: the two paths carried complementary halves (balance
    # reorders by default: DATA_ORDERED)
    seqs = {k: [f.seq for f in frames_seen(plain, "server", frames.DataOrdered, c.addr(k))] for k in "ab"}
    assert sorted(seqs["a"] + seqs["b"]) == list(range(1, 11))


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
    net, c = backup_pair(pki)
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


# -- reordering for balance classes (DATA_ORDERED) --------------------------------------------------
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
    net.advance(0.5)  # the probes measure path b's extra 30 ms
    # a burst larger than path a's queue budget: the rest spills to b, which arrives later
    ups = [flow_pkt(i) for i in range(60)]
    keys = [k for p in ups for k in c.send_up(p)]
    assert keys[0] == "a" and set(keys) == {"a", "b"}  # the fast path first, both carried some
    net.advance(0.2)
    assert net.server.to_tun == ups  # in the order sent, although b's share came 30 ms late
    st = net.tunnel().reorder.stats()
    assert st["released"] > 0 and st["skipped"] == 0 and st["held"] == 0 and st["timeouts"] == 0
    # and down: the server's reordering class sends DATA_ORDERED too
    downs = [flow_pkt(i, up=False) for i in range(60)]
    keys = [k for p in downs for k in net.send_down(p)]
    assert set(keys) == {"a", "b"}
    net.advance(0.2)
    assert c.core.to_tun == downs
    assert c.core.stats()["reorder"]["released"] > 0


def test_balance_without_reorder_delivers_out_of_order(pki: Path) -> None:
    """The control for the test above: the same paths and burst with ``reorder = false``
    arrive out of order."""
    from tunnel.core.policy import parse_policy

    policy = parse_policy({"class": [{"name": "bulk", "mode": "balance", "reorder": False}]}, "test")
    net, c = two_paths(pki, mode="balance", policy=policy)
    net.delay["b"] = 0.030
    net.advance(0.5)
    ups = [flow_pkt(i) for i in range(60)]
    for p in ups:
        c.send_up(p)
    net.advance(0.2)
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
    net.advance(0.5)  # the probes have measured both paths: no delay spread
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
    # the hold is the paths' predicted delay spread (none here) plus a margin, not reorder_ms (100)
    assert HOLD_MARGIN <= net.now - start <= HOLD_MARGIN + 2 * STEP
    assert t.reorder.stats()["timeouts"] == 1


# -- statistics -------------------------------------------------------------------------------------
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


# -- idle probing -----------------------------------------------------------------------------------
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


# -- TunnelEngine alone: fake paths, a manual clock, no lab -----------------------------------------
class FakePath:
    """What the engine and its schedulers read of a path: ``encrypt`` returns the record itself."""

    def __init__(self, key: str, loss: float = 0.0, priority: int = 0):
        self.key, self.loss, self.priority = key, loss, priority
        self.state, self.srtt, self.rate = P_UP, 0.01, 0.0
        self.tunnel = None
        self.rx_seq = -1
        self.updated = False
        self.idle = False
        self.bottleneck = None
        self.feedback_interval = 0.0

    @property
    def alive(self) -> bool:
        return self.state != P_CLOSED

    def want_feedback(self, wanted: bool) -> None:
        self.bottleneck = Bottleneck(0.0, self.srtt) if wanted else None

    def encrypt(self, record: bytes, now: float) -> bytes:
        return record

    def set_idle(self, idle: bool, now: float) -> None:
        self.idle = idle


def engine(*paths: FakePath, mode: str = "duplicate", target_loss=None, outer_dscp: int = 0,
           idle_probe_interval=None) -> TunnelEngine:
    policy = Policy([TrafficClass("default", 0, mode, 2, outer_dscp, target_loss=target_loss)])
    e = TunnelEngine(Outputs(), policy, 64, idle_probe_interval)
    for p in paths:
        e.attach(p)
    return e


def sent(e: TunnelEngine) -> list[tuple[str, int, int]]:
    """The datagrams the engine put out, as (path key, sequence number, TOS); taken."""
    return [(key, frames.parse_data(d)[0], tos) for key, d, tos in e.out.take_datagrams()]


class TestEngineAlone:
    """TunnelEngine with fake paths.  No lab here, so the lab's clock modes do not apply:
    this ``drive`` replaces the module's."""

    @pytest.fixture
    def drive(self) -> None:
        return None

    def test_send_numbers_packets_and_puts_one_datagram_per_selected_path(self) -> None:
        a, b = FakePath("a"), FakePath("b", priority=1)
        ect0 = bytearray(up_pkt())
        ect0[1] = 0b10  # inner ECN: ECT(0), copied to the outer header
        e = engine(a, b, outer_dscp=46)
        tos = 46 << 2 | 0b10
        assert e.send(bytes(ect0), T0) and e.send(bytes(ect0), T0)
        assert sent(e) == [("a", 1, tos), ("b", 1, tos), ("a", 2, tos), ("b", 2, tos)]  # duplicate: every path
        assert e.stats()["classes"][0]["packets"] == 2 and e.stats()["classes"][0]["copies"] == 4
        e.set_policy(Policy.single("backup"))  # one path: the sequence space goes on
        assert e.send(up_pkt(), T0) and sent(e) == [("a", 3, 0)]
        e.detach_all()
        assert not e.send(up_pkt(), T0) and sent(e) == [] and e.seq == 3  # no path: nothing, not numbered

    def test_on_data_delivers_each_sequence_number_once(self) -> None:
        a, b = FakePath("a"), FakePath("b")
        e = engine(a, b)
        p1, p2, p3 = (up_pkt(i) for i in (1, 2, 3))
        e.on_data(a, frames.encode_data(1, p1), 0, T0)
        e.on_data(b, frames.encode_data(1, p1), 0, T0)  # the copy on the other path
        e.on_data(b, frames.encode_data(3, p3), 0, T0)
        e.on_data(a, frames.encode_data(2, p2), 0, T0)  # late, but new: delivered (no reordering class)
        e.on_data(a, frames.encode_data(3, p3), 0, T0)
        assert e.out.packets == [p1, p3, p2]
        assert (a.rx_seq, b.rx_seq) == (3, 3)
        st = e.stats()
        assert (st["delivered"], st["duplicates"]) == (3, 2)
        e.on_data(a, frames.encode_data(4, up_pkt(4)), 0b11, T0)  # outer CE on a Not-ECT packet (RFC 6040)
        assert e.out.packets == [p1, p3, p2] and e.stats()["ecn_dropped"] == 1

    def test_target_loss_copies_go_out_one_round_per_tick(self) -> None:
        a, b = FakePath("a", loss=0.3), FakePath("b", loss=0.3)  # 9 % for one copy each; 0.1 % wanted
        e = engine(a, b, target_loss=0.001)
        assert e.scheduler.extra == [[a, b], [a, b]]
        e.out.timer_dirty = False
        e.send(up_pkt(), T0)
        assert sent(e) == [("a", 1, 0), ("b", 1, 0)] and e.out.timer_dirty  # the first copies, and a deadline
        assert e.service(T0 + TICK / 2) == T0 + TICK and sent(e) == []  # not back to back
        assert e.service(T0 + TICK) == T0 + 2 * TICK and sent(e) == [("a", 1, 0), ("b", 1, 0)]
        assert e.service(T0 + 2 * TICK) == INF and sent(e) == [("a", 1, 0), ("b", 1, 0)]
        assert e.service(T0 + 3 * TICK) == INF and sent(e) == []
        assert e.stats()["classes"][0]["copies"] == 6

    def test_idle_after_idle_after_seconds_without_data_and_traffic_wakes_it(self) -> None:
        a = FakePath("a")
        e = engine(a, idle_probe_interval=0.5)
        e.send(up_pkt(), T0)
        assert e.service(T0 + IDLE_AFTER / 2) == T0 + IDLE_AFTER and not e.idle and not a.idle
        assert e.service(T0 + IDLE_AFTER) == INF and e.idle and a.idle  # the paths probe slowly
        e.out.timer_dirty = False
        e.send(up_pkt(), T0 + 5)
        assert not e.idle and not a.idle and e.out.timer_dirty  # at once: the paths probe fast again
        assert e.service(T0 + 5 + IDLE_AFTER) == INF and e.idle
        e.on_data(a, frames.encode_data(9, up_pkt()), 0, T0 + 10)  # traffic the other way wakes it too
        assert not e.idle and not a.idle
        never = engine(FakePath("b"))  # without idle_probe_interval: always probing fast
        assert never.service(T0 + 100) == INF and not never.idle


# -- FEEDBACK: the receiver's report that balance's earliest-arrival choice runs on ----------------
def test_balance_asks_for_feedback_and_its_models_learn_the_paths(pki: Path) -> None:
    net, c = _reorder_pair(pki)  # path b 30 ms slower each way
    net.advance(0.5)
    for i in range(200):
        c.send_up(flow_pkt(i))
        net.advance(0.002)
    net.advance(0.2)
    sa, sb = net.spath(c, "a"), net.spath(c, "b")
    assert sa.feedback_interval > 0 and sb.feedback_interval > 0  # asked for in FEEDBACK_WANTED
    assert sa.feedbacks_sent > 0  # the server reported the DATA it got on a
    ba, bb = c.path("a").bottleneck, c.path("b").bottleneck
    assert ba.samples > 0
    assert bb.base_rtt >= ba.base_rtt + 0.055  # b's extra 60 ms round trip is in its model


def test_duplicate_mode_neither_asks_for_nor_sends_feedback(pki: Path) -> None:
    net, c = two_paths(pki, mode="duplicate")
    for i in range(50):
        c.send_up(up_pkt(i))
        net.advance(0.01)
    assert c.path("a").bottleneck is None
    assert net.spath(c, "a").feedback_interval == 0 and net.spath(c, "a").feedbacks_sent == 0


def test_a_peer_that_predates_feedback_still_answers_the_probes(pki: Path) -> None:
    """FEEDBACK_WANTED rides in the PING's datagram as a record of its own: a server that
    does not know it drops that record (malformed) and still answers the PING."""
    net, c = _reorder_pair(pki)
    old = net.server._handlers
    old[frames.FEEDBACK_WANTED] = old[0x7F]  # what an older server does with an unknown frame type
    old[frames.FEEDBACK] = old[0x7F]
    net.advance(2.0)
    assert c.path("a").state == P_UP and c.path("b").state == P_UP
    assert net.spath(c, "a").feedback_interval == 0  # it never learnt it was asked
    ups = [flow_pkt(i) for i in range(20)]
    for p in ups:
        c.send_up(p)
    net.advance(0.3)
    assert sorted(net.server.to_tun) == sorted(ups)


def test_leaving_balance_tells_the_peer_to_stop_its_feedback(pki: Path) -> None:
    """A policy without balance drops the models and says FEEDBACK_WANTED 0 at once: the peer
    would otherwise go on reporting on every path for as long as DATA flows."""
    from tunnel.core.policy import Policy

    net, c = _reorder_pair(pki)
    net.advance(0.5)
    assert net.spath(c, "a").feedback_interval > 0
    c.core.set_policy(Policy.single("duplicate"))
    net.advance(0.05)
    assert c.path("a").bottleneck is None
    assert net.spath(c, "a").feedback_interval == 0 and net.spath(c, "b").feedback_interval == 0
    sent_before = net.spath(c, "a").feedbacks_sent
    for i in range(20):
        c.send_up(up_pkt(i))
        net.advance(0.01)
    assert net.spath(c, "a").feedbacks_sent == sent_before


class TestShed:
    """balance's AQM: when even the best path's queue (model and latest FEEDBACK) is above
    QUEUE_LIMIT, an ECT packet goes out marked CE and a Not-ECT one is dropped, both counted."""

    @pytest.fixture
    def drive(self) -> None:
        return None

    def _full(self, *paths: FakePath, now: float) -> None:
        from tunnel.core.scheduler import QUEUE_LIMIT

        for p in paths:
            p.bottleneck.free_at = now + 2 * QUEUE_LIMIT
            p.bottleneck.queue = 2 * QUEUE_LIMIT

    def test_full_queues_mark_ect_and_drop_the_rest(self) -> None:
        a, b = FakePath("a"), FakePath("b")
        e = engine(a, b, mode="balance")
        assert a.bottleneck is not None
        self._full(a, b, now=10.0)
        plain = up_pkt(1)
        ect = bytearray(up_pkt(2))
        ect[1] = 0b10
        assert e.send(plain, 10.0) is True  # handled: dropped on purpose, not "no path"
        assert e.out.take_datagrams() == []
        assert e.send(bytes(ect), 10.0) is True
        [(_, dgram, tos)] = e.out.take_datagrams()
        seq, inner = frames.parse_data(dgram)
        assert inner[1] & 3 == 3  # marked CE
        assert e.stats()["classes"][0]["shed"] == 2

    def test_a_model_alone_does_not_shed(self) -> None:
        """The latest FEEDBACK must agree: a model whose rate is too low must not drop."""
        a, b = FakePath("a"), FakePath("b")
        e = engine(a, b, mode="balance")
        self._full(a, b, now=10.0)
        a.bottleneck.queue = b.bottleneck.queue = 0.0
        assert e.send(up_pkt(1), 10.0)
        assert len(e.out.take_datagrams()) == 1
        assert e.stats()["classes"][0]["shed"] == 0
