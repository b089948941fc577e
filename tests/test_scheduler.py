"""Tests for tunnel.core.scheduler: which paths carry a packet, in every mode.

Pure: the paths are fake objects with the attributes the scheduler reads.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import pytest

from tunnel.core import scheduler
from tunnel.core.estimator import DEGRADED, DOWN, UP
from tunnel.core.scheduler import MODES, RATE_FLOOR, Scheduler, SchedulerError, flow_hash


@dataclass(eq=False)
class FakePath:
    name: str
    state: str = UP
    srtt: Optional[float] = 0.05
    loss: float = 0.0
    rate: float = 0.0
    priority: int = 0

    def __repr__(self) -> str:
        return self.name


def ipv4(src: str = "100.64.0.2", dst: str = "100.64.0.1", proto: int = 17, sport: int = 1000, dport: int = 53,
         payload: bytes = b"x", ihl: int = 5) -> bytes:
    options = bytes(4 * (ihl - 5))
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + payload if proto in (6, 17) else payload
    total = 4 * ihl + len(l4)
    header = bytes([0x40 | ihl, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, proto, 0, 0])
    return header + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + options + l4


PKT = ipv4()


def sched(mode: str, paths: list, **kw) -> Scheduler:
    s = Scheduler(mode, **kw)
    s.refresh(paths)
    return s


def counts(s: Scheduler, n: int, packet: bytes = PKT) -> Counter:
    c: Counter = Counter()
    for _ in range(n):
        for p in s.select(packet, 0.0):
            c[p.name] += 1
    return c


# -- construction ---------------------------------------------------------------------
def test_modes() -> None:
    assert MODES == ("duplicate", "redundant", "lowest-rtt", "balance", "backup")


@pytest.mark.parametrize("mode", ["", "fastest", "Duplicate", "client", None])
def test_unknown_mode_raises(mode) -> None:
    with pytest.raises(SchedulerError, match="unknown mode"):
        Scheduler(mode)
    assert issubclass(SchedulerError, ValueError)


def test_defaults_and_redundancy_floor() -> None:
    s = Scheduler()
    assert (s.mode, s.redundancy, s.pin_flows) == ("duplicate", 2, False)
    assert Scheduler("redundant", redundancy=0).redundancy == 1
    assert Scheduler("redundant", redundancy=-3).redundancy == 1


@pytest.mark.parametrize("mode", MODES)
def test_no_paths_selects_nothing(mode: str) -> None:
    s = Scheduler(mode)
    assert s.select(PKT, 0.0) == []
    s.refresh([])
    assert s.select(PKT, 0.0) == []


@pytest.mark.parametrize("mode", MODES)
def test_paths_that_are_not_live_are_never_chosen(mode: str) -> None:
    s = sched(mode, [FakePath("h", state="handshaking"), FakePath("c", state="closed")])
    assert s.select(PKT, 0.0) == []


@pytest.mark.parametrize("mode", MODES)
def test_one_path_every_mode(mode: str) -> None:
    a = FakePath("a")
    s = sched(mode, [a])
    assert all(s.select(PKT, 0.0) == [a] for _ in range(5))


# -- duplicate ----------------------------------------------------------------------------
def test_duplicate_sends_on_every_established_path_down_ones_included() -> None:
    """Probes lost to random loss can make a live path look down: its copies still help."""
    a, b, c, d = FakePath("a"), FakePath("b", state=DEGRADED), FakePath("c", state=DOWN), FakePath("d", srtt=None)
    s = sched("duplicate", [a, b, c, d])
    assert s.select(PKT, 0.0) == [a, b, c, d]
    assert counts(s, 100) == {"a": 100, "b": 100, "c": 100, "d": 100}


def test_duplicate_never_uses_a_path_that_is_not_established() -> None:
    a, b = FakePath("a", state=DOWN), FakePath("b", state=DOWN)
    s = sched("duplicate", [a, b, FakePath("h", state="handshaking"), FakePath("x", state="closed")])
    assert s.select(PKT, 0.0) == [a, b]


def test_selection_is_fixed_until_refresh() -> None:
    a, b = FakePath("a"), FakePath("b")
    s = sched("backup", [a, b])
    a.state = DOWN
    assert s.select(PKT, 0.0) == [a]  # per-packet work does not look at the paths
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [b]


# -- redundant ---------------------------------------------------------------------------------
def test_redundant_takes_the_k_best() -> None:
    a = FakePath("a", srtt=0.030)
    b = FakePath("b", srtt=0.010)
    c = FakePath("c", srtt=0.020)
    d = FakePath("d", srtt=0.005, loss=0.9)  # score 0.005 * (1 + 9) = 0.05: the fastest RTT, but lossy
    s = sched("redundant", [a, b, c, d], redundancy=2)
    assert s.select(PKT, 0.0) == [b, c]
    assert counts(s, 10) == {"b": 10, "c": 10}
    assert sched("redundant", [a, b, c, d], redundancy=3).select(PKT, 0.0) == [b, c, a]
    assert len(sched("redundant", [a, b], redundancy=5).select(PKT, 0.0)) == 2


def test_redundant_unknown_rtt_counts_as_one_second() -> None:
    a, b, c = FakePath("a", srtt=None), FakePath("b", srtt=0.9), FakePath("c", srtt=1.5)
    assert sched("redundant", [a, b, c], redundancy=2).select(PKT, 0.0) == [b, a]


def test_redundant_prefers_up_over_degraded_over_down() -> None:
    """k copies: up paths first, then degraded ones fill up to k; down ones only if nothing lives."""
    up = FakePath("up", srtt=0.5)
    deg = FakePath("deg", state=DEGRADED, srtt=0.001)
    down = FakePath("down", state=DOWN, srtt=0.001)
    assert sched("redundant", [up, deg, down], redundancy=2).select(PKT, 0.0) == [up, deg]
    assert sched("redundant", [up, deg, down], redundancy=1).select(PKT, 0.0) == [up]
    up.state = DOWN
    assert sched("redundant", [up, deg, down], redundancy=2).select(PKT, 0.0) == [deg]
    deg.state = DOWN
    assert sched("redundant", [up, deg, down], redundancy=2).select(PKT, 0.0) == [deg, down]


# -- lowest-rtt --------------------------------------------------------------------------------
def test_lowest_rtt_picks_the_fastest() -> None:
    a, b, c = FakePath("a", srtt=0.050), FakePath("b", srtt=0.020), FakePath("c", srtt=0.080)
    s = sched("lowest-rtt", [a, b, c])
    assert s.select(PKT, 0.0) == [b] and counts(s, 50) == {"b": 50}


def test_lowest_rtt_score_includes_loss() -> None:
    a = FakePath("a", srtt=0.020, loss=0.2)  # 0.020 * 3 = 0.060
    b = FakePath("b", srtt=0.050)
    assert sched("lowest-rtt", [a, b]).select(PKT, 0.0) == [b]


def test_lowest_rtt_hysteresis_ten_percent() -> None:
    a, b = FakePath("a", srtt=0.100), FakePath("b", srtt=0.120)
    s = sched("lowest-rtt", [a, b])
    assert s.select(PKT, 0.0) == [a]
    b.srtt = 0.095  # better, but not by 10 %: stay
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [a]
    b.srtt = 0.0905
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [a]
    b.srtt = 0.089  # more than 10 % faster: switch
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [b]
    a.srtt = 0.085  # and the same margin protects b now
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [b]
    a.srtt = 0.070
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [a]


def test_lowest_rtt_switches_at_once_when_the_current_path_fails() -> None:
    a, b = FakePath("a", srtt=0.010), FakePath("b", srtt=0.200)
    s = sched("lowest-rtt", [a, b])
    assert s.select(PKT, 0.0) == [a]
    a.state = DOWN
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [b]
    a.state = UP  # back, and clearly faster: back to a
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [a]
    s.refresh([b])  # a removed
    assert s.select(PKT, 0.0) == [b]


def test_lowest_rtt_degraded_current_gives_way_to_an_up_path() -> None:
    a, b = FakePath("a", srtt=0.010), FakePath("b", srtt=0.200)
    s = sched("lowest-rtt", [a, b])
    a.state = DEGRADED
    s.refresh([a, b])
    assert s.select(PKT, 0.0) == [b]


# -- backup -------------------------------------------------------------------------------------
def test_backup_uses_priority_order() -> None:
    a = FakePath("a", priority=2, srtt=0.001)
    b = FakePath("b", priority=0, srtt=0.5)
    c = FakePath("c", priority=1)
    s = sched("backup", [a, b, c])
    assert s.select(PKT, 0.0) == [b]
    b.state = DOWN
    s.refresh([a, b, c])
    assert s.select(PKT, 0.0) == [c]
    c.state = DEGRADED
    s.refresh([a, b, c])
    assert s.select(PKT, 0.0) == [a]  # an up path beats a degraded one of higher priority
    a.state = DOWN
    s.refresh([a, b, c])
    assert s.select(PKT, 0.0) == [c]
    c.state = DOWN
    s.refresh([a, b, c])
    assert s.select(PKT, 0.0) == [b]  # all down: still the first choice
    b.state = UP
    s.refresh([a, b, c])
    assert s.select(PKT, 0.0) == [b]


def test_fallback_up_degraded_down_in_single_path_modes() -> None:
    for mode in ("lowest-rtt", "backup", "redundant", "balance"):
        up, deg, down = FakePath("up"), FakePath("deg", state=DEGRADED), FakePath("down", state=DOWN)
        s = sched(mode, [down, deg, up], redundancy=1)
        assert {p.name for _ in range(20) for p in s.select(PKT, 0.0)} == {"up"}, mode
        up.state = DOWN
        s.refresh([down, deg, up])
        assert {p.name for _ in range(20) for p in s.select(PKT, 0.0)} == {"deg"}, mode
        deg.state = DOWN
        s.refresh([down, deg, up])
        got = {p.name for _ in range(20) for p in s.select(PKT, 0.0)}
        assert got and got <= {"down", "deg", "up"}, mode


# -- balance ----------------------------------------------------------------------------------------
def test_balance_shares_equally_until_a_path_is_congested() -> None:
    """A loss-free path's measured rate is what it was given: it must not starve the other."""
    a = FakePath("a", rate=1_000_000)
    b = FakePath("b", rate=3_000_000, loss=0.02)  # random loss below the congestion mark
    c = counts(sched("balance", [a, b]), 10_000)
    assert c == {"a": 5_000, "b": 5_000}


def test_balance_weights_a_congested_path_by_what_it_delivers() -> None:
    a = FakePath("a", rate=1_000_000, loss=0.1)  # congested: 0.9e6
    b = FakePath("b", rate=500_000)  # loss-free: at least a's weight, plus the probing margin
    c = counts(sched("balance", [a, b]), 10_000)
    assert c["b"] / 10_000 == pytest.approx(1.125 / 2.025, abs=0.01)


def test_balance_weights_follow_loss() -> None:
    a = FakePath("a", rate=2_000_000, loss=0.5)  # 2e6 * (1 - 0.5) = 1e6
    b = FakePath("b", rate=2_000_000, loss=0.2)  # 1.6e6
    s = sched("balance", [a, b])
    c = counts(s, 10_000)
    assert c["a"] / 10_000 == pytest.approx(1.0 / 2.6, abs=0.01)


def test_balance_loss_free_paths_get_a_probing_boost() -> None:
    a = FakePath("a", rate=1_000_000)  # loss-free: 1.25e6
    b = FakePath("b", rate=1_000_000, loss=0.05)  # 0.95e6
    c = counts(sched("balance", [a, b]), 10_000)
    assert c["a"] / 10_000 == pytest.approx(1.25 / 2.2, abs=0.01)


def test_balance_unmeasured_paths_get_the_rate_floor() -> None:
    a, b = FakePath("a"), FakePath("b", rate=RATE_FLOOR / 10)
    c = counts(sched("balance", [a, b]), 10_000)
    assert c == {"a": 5_000, "b": 5_000}
    big = FakePath("big", rate=3 * RATE_FLOOR, loss=0.5)
    small = FakePath("small", loss=0.5)  # congested and unmeasured: the floor
    c = counts(sched("balance", [small, big]), 10_000)
    assert c["big"] / 10_000 == pytest.approx(0.75, abs=0.01)


def test_balance_is_smooth() -> None:
    """Smooth weighted round robin: 1:1 alternates, 1:2 never sends three in a row to one path."""
    a, b = FakePath("a"), FakePath("b")
    s = sched("balance", [a, b])
    seq = [s.select(PKT, 0.0)[0].name for _ in range(10)]
    assert seq in (["a", "b"] * 5, ["b", "a"] * 5)
    a.loss = 0.5  # both congested, delivering 1 : 2
    c2 = FakePath("c", rate=2 * RATE_FLOOR, loss=0.5)
    s = sched("balance", [a, c2])
    seq = "".join(s.select(PKT, 0.0)[0].name for _ in range(30))
    assert seq.count("c") == 20 and "ccc" not in seq and "aa" not in seq


def test_balance_only_uses_the_best_state() -> None:
    a = FakePath("a", rate=1e6)
    b = FakePath("b", rate=9e6, state=DEGRADED)
    assert counts(sched("balance", [a, b]), 100) == {"a": 100}


def test_balance_keeps_credit_across_refresh() -> None:
    a, b = FakePath("a"), FakePath("b")
    s = sched("balance", [a, b])
    first = s.select(PKT, 0.0)[0]
    s.refresh([a, b])  # an unchanged refresh does not restart the rotation
    assert s.select(PKT, 0.0)[0] is not first


# -- pin_flows -----------------------------------------------------------------------------------------
def test_pin_flows_keeps_a_five_tuple_on_one_path() -> None:
    a, b, c = FakePath("a", rate=1e6), FakePath("b", rate=2e6), FakePath("c", rate=1e6)
    s = sched("balance", [a, b, c], pin_flows=True)
    for sport in range(1000, 1050):
        flow = [ipv4(sport=sport, payload=bytes([i]) * i) for i in range(1, 20)]
        chosen = {s.select(p, 0.0)[0].name for p in flow}
        assert len(chosen) == 1, sport


def test_pin_flows_spreads_many_flows_by_weight() -> None:
    a, b = FakePath("a", rate=1e6, loss=0.5), FakePath("b", rate=3e6, loss=0.5)  # congested: 1 : 3
    s = sched("balance", [a, b], pin_flows=True)
    c: Counter = Counter()
    for i in range(10_000):
        src = f"100.64.{i // 250}.{i % 250 + 1}"
        c[s.select(ipv4(src=src, proto=6, sport=1024 + i % 50000, dport=443), 0.0)[0].name] += 1
    assert c["b"] / 10_000 == pytest.approx(0.75, abs=0.03)


def test_pin_flows_without_a_flow_falls_back_to_round_robin() -> None:
    a, b = FakePath("a"), FakePath("b")
    s = sched("balance", [a, b], pin_flows=True)
    not_ip = bytes(40)  # version 0: no flow to read
    assert counts(s, 100, not_ip) == {"a": 50, "b": 50}


def test_pin_flows_only_matters_for_balance() -> None:
    a, b = FakePath("a"), FakePath("b")
    assert sched("duplicate", [a, b], pin_flows=True).select(PKT, 0.0) == [a, b]


# -- flow_hash ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proto", [6, 17])
def test_flow_hash_tcp_udp_uses_ports(proto: int) -> None:
    h = flow_hash(ipv4(proto=proto, sport=1000, dport=53))
    assert h is not None and h == flow_hash(ipv4(proto=proto, sport=1000, dport=53, payload=b"other payload"))
    assert h != flow_hash(ipv4(proto=proto, sport=1001, dport=53))
    assert h != flow_hash(ipv4(proto=proto, sport=1000, dport=54))
    assert h != flow_hash(ipv4(proto=proto, src="100.64.0.3"))
    assert h != flow_hash(ipv4(proto=proto, dst="100.64.0.9"))
    assert flow_hash(ipv4(proto=6)) != flow_hash(ipv4(proto=17))


def test_flow_hash_respects_ip_options() -> None:
    plain = flow_hash(ipv4(proto=17, sport=5, dport=6))
    with_options = flow_hash(ipv4(proto=17, sport=5, dport=6, ihl=7))
    assert plain == with_options
    assert flow_hash(ipv4(proto=17, sport=5, dport=7, ihl=7)) != with_options


@pytest.mark.parametrize("proto", [1, 47, 50, 132])
def test_flow_hash_other_protocols_use_addresses_and_protocol(proto: int) -> None:
    h = flow_hash(ipv4(proto=proto, payload=b"\x08\x00abcd"))
    assert h is not None and h == flow_hash(ipv4(proto=proto, payload=b"\x00\x00zzzzzz"))
    assert h != flow_hash(ipv4(proto=proto, dst="100.64.0.7"))


def ipv6(src: str = "fd00::2", dst: str = "fd00::1", nxt: int = 17, sport: int = 1000, dport: int = 53,
         payload: bytes = b"x") -> bytes:
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + payload if nxt in (6, 17) else payload
    return (bytes([0x60, 0, 0, 0]) + len(l4).to_bytes(2, "big") + bytes([nxt, 64])
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + l4)


@pytest.mark.parametrize("nxt", [6, 17])
def test_flow_hash_ipv6_uses_addresses_and_ports(nxt: int) -> None:
    h = flow_hash(ipv6(nxt=nxt))
    assert h is not None and h == flow_hash(ipv6(nxt=nxt, payload=b"other payload"))
    assert h != flow_hash(ipv6(nxt=nxt, sport=1001))
    assert h != flow_hash(ipv6(nxt=nxt, dport=54))
    assert h != flow_hash(ipv6(nxt=nxt, src="fd00::3"))
    assert h != flow_hash(ipv6(nxt=nxt, dst="fd00::9"))
    assert flow_hash(ipv6(nxt=58, payload=b"\x80\x00ab")) == flow_hash(ipv6(nxt=58, payload=b"\x81\x00cd"))
    assert flow_hash(bytes([0x60]) + bytes(38)) is None  # shorter than an IPv6 header


def test_flow_hash_truncated_transport_header() -> None:
    # a UDP packet too short to hold the ports hashes by addresses and protocol alone
    short = ipv4(proto=17, sport=1, dport=2)[:22]
    assert flow_hash(short) == flow_hash(ipv4(proto=17, sport=1, dport=2)[:20])
    assert flow_hash(short) is not None


@pytest.mark.parametrize(
    "packet",
    [b"", b"\x45", b"\x45" + bytes(18), bytes([0x60]) + bytes(38), bytes([0x00]) + bytes(30), b"\xff" * 40],
)
def test_flow_hash_not_a_whole_ip_header(packet: bytes) -> None:
    assert flow_hash(packet) is None


def test_flow_hash_is_stable() -> None:
    # crc32 of the 5-tuple: the same on every run and every host (no per-process hash seed)
    import zlib

    pkt = ipv4(src="10.0.0.1", dst="10.0.0.2", proto=6, sport=80, dport=443)
    key = bytes([10, 0, 0, 1, 10, 0, 0, 2, 6]) + (80).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert flow_hash(pkt) == zlib.crc32(key)


def test_module_constants() -> None:
    assert scheduler.SWITCH_MARGIN == 0.9
    assert scheduler.PROBE_BOOST == 1.25


# -- target_loss: extra copies while the estimated residual loss is above the target ----------------
def test_target_loss_adds_copies_on_the_least_lossy_path_until_below_target() -> None:
    a, b = FakePath("a", loss=0.10), FakePath("b", loss=0.12)
    s = Scheduler("duplicate", target_loss=0.005)
    s.refresh([a, b])
    # 0.10 * 0.12 = 1.2 % > 0.5 %: one more copy on a (the less lossy) -> 0.12 %
    assert s.select(b"", 0.0) == [a, b]  # the first copies, sent at once
    assert s.extra == [[a]] and s.extra_copies == 1  # the extra one, sent a tick later


def test_target_loss_met_by_plain_duplicates_adds_nothing() -> None:
    a, b = FakePath("a", loss=0.02), FakePath("b", loss=0.02)
    s = Scheduler("duplicate", target_loss=0.005)
    s.refresh([a, b])
    assert s.select(b"", 0.0) == [a, b] and s.extra == [] and s.extra_copies == 0


def test_target_loss_on_one_path_sends_up_to_max_copies() -> None:
    a = FakePath("a", loss=0.3)
    s = Scheduler("duplicate", target_loss=0.001)
    s.refresh([a])
    assert s.select(b"", 0.0) == [a]
    assert s.extra == [[a]] * (scheduler.MAX_COPIES - 1)  # 2.7 % is still above, but copies are capped


def test_target_loss_ignores_down_and_dead_paths() -> None:
    a, b = FakePath("a", loss=0.10), FakePath("b", state=DOWN, loss=1.0)
    s = Scheduler("duplicate", target_loss=0.005)
    s.refresh([a, b])
    assert s.select(b"", 0.0) == [a, b]
    assert s.extra == [[a], [a]]  # 10 % -> 1 % -> 0.1 %, none extra on b


def test_target_loss_only_for_copying_modes() -> None:
    assert Scheduler("balance", target_loss=0.01).target_loss is None
    assert Scheduler("redundant", target_loss=0.01).target_loss == 0.01
