"""Receiver-side reordering (tunnel/core/reorder.py), driven with a manual clock."""
from __future__ import annotations

import struct

import pytest

from tunnel.core.reorder import QSEQ_MOD, Reorderer, floor, queue_of

HOLD = 0.05
NO_FLOOR = -1  # no path has proven anything lost


def push(r: Reorderer, qseq: int, now: float = 0.0, queue: int = 0, seq: int | None = None,
         floor_: int = NO_FLOOR, hold: float = HOLD) -> list:
    out: list = []
    r.push(queue, qseq, hold, qseq if seq is None else seq, f"p{qseq}".encode(), now, floor_, out)
    return out


def names(out: list) -> list[str]:
    return [p.decode() for p in out]


def test_in_order_packets_pass_straight_through() -> None:
    r = Reorderer()
    for i in range(5):
        assert names(push(r, i)) == [f"p{i}"]
    assert r.in_order == 5 and r.held == 0 and r.next_deadline() is None


def test_gap_is_held_until_filled_then_released_in_order() -> None:
    r = Reorderer()
    push(r, 0)
    assert push(r, 2, now=0.001) == [] and push(r, 3, now=0.002) == []
    assert r.held == 2 and r.next_deadline() == pytest.approx(0.001 + HOLD)
    assert names(push(r, 1, now=0.010)) == ["p1", "p2", "p3"]
    assert r.held == 0 and r.released == 2 and r.skipped == 0 and r.next_deadline() is None


def test_hold_time_runs_out_and_the_gap_is_skipped() -> None:
    r = Reorderer()
    push(r, 0)
    push(r, 2, now=1.0)
    push(r, 3, now=1.01)
    out: list = []
    r.expire(1.0 + HOLD - 0.001, out)
    assert out == []  # not yet
    r.expire(1.0 + HOLD, out)
    assert names(out) == ["p2", "p3"]
    assert r.timeouts == 1 and r.skipped == 1
    # the lost packet turns up after all: delivered at once, counted late
    assert names(push(r, 1, now=1.2)) == ["p1"] and r.late == 1
    assert names(push(r, 4, now=1.2)) == ["p4"]


def test_two_gaps_skip_one_at_a_time() -> None:
    r = Reorderer()
    push(r, 0)
    push(r, 2, now=0.0)
    push(r, 5, now=0.03)  # 3 and 4 missing, held later
    out: list = []
    r.expire(HOLD, out)  # p2's deadline: skip 1, deliver 2, still wait for 3 and 4
    assert names(out) == ["p2"] and r.held == 1
    assert names(push(r, 3, now=0.06)) == ["p3"]
    out = []
    r.expire(0.03 + HOLD, out)
    assert names(out) == ["p5"] and r.skipped == 2


def test_a_gap_known_to_be_lost_is_released_at_once() -> None:
    """Every live path has delivered a packet sent after the held one: the gap is a loss."""
    r = Reorderer()
    push(r, 0, seq=10)
    assert push(r, 2, seq=12, floor_=11) == []  # a path has not got past 12 yet: keep waiting
    out: list = []
    r.progress(12, out)
    assert out == []  # floor must pass the held packet's own sequence number
    r.progress(13, out)
    assert names(out) == ["p2"] and r.skipped == 1 and r.timeouts == 0


def test_floor_at_push_releases_immediately() -> None:
    r = Reorderer()
    push(r, 0, seq=1)
    assert names(push(r, 2, seq=5, floor_=9)) == ["p2"]


def test_queues_are_independent() -> None:
    r = Reorderer()
    push(r, 0, queue=1)
    push(r, 0, queue=2)
    assert push(r, 2, queue=1) == []  # queue 1 waits for its 1 ...
    assert names(push(r, 1, queue=2)) == ["p1"]  # ... queue 2 does not
    assert r.held == 1


def test_sequence_numbers_wrap() -> None:
    r = Reorderer()
    push(r, QSEQ_MOD - 2)
    assert names(push(r, QSEQ_MOD - 1)) == [f"p{QSEQ_MOD - 1}"]
    assert push(r, 1) == []
    assert names(push(r, 0)) == ["p0", "p1"]


def test_memory_is_bounded() -> None:
    r = Reorderer(max_held=4)
    push(r, 0)
    for i in range(2, 7):  # 5 packets behind a gap: one too many
        push(r, i)
    assert r.overflows == 1 and r.held == 0 and r.skipped == 1
    assert r.in_order + r.released == 6


def test_queue_of_spreads_flows_and_keeps_one_flow_in_one_queue() -> None:
    def udp(sport: int) -> bytes:
        ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 2, 100, 64, 0, 1])
        return ip + struct.pack(">HHHH", sport, 5001, 8, 0)

    queues = {queue_of(udp(p)) for p in range(40000, 40200)}
    assert len(queues) > 100  # 200 flows over 256 queues
    assert queue_of(udp(40000)) == queue_of(udp(40000))
    assert all(0 <= q < 256 for q in queues)
    assert queue_of(b"\x60" + bytes(38)) == 0  # not a whole IP header: one queue
    v6 = bytes([0x60, 0, 0, 0, 0, 12, 17, 64]) + bytes(15) + b"\x02" + bytes(15) + b"\x01"
    assert len({queue_of(v6 + struct.pack(">HHHH", p, 5001, 8, 0)) for p in range(40000, 40200)}) > 100  # IPv6 too


class P:
    def __init__(self, state: str, rx_seq: int):
        self.state, self.rx_seq = state, rx_seq


def test_floor_ignores_down_paths() -> None:
    assert floor([]) == -1
    assert floor([P("up", 5), P("degraded", 9)]) == 5
    assert floor([P("up", 5), P("down", 1), P("handshaking", 0)]) == 5
    assert floor([P("up", -1), P("up", 7)]) == -1


# -- end to end: real daemons over two paths with different delays ------------------------------------
@pytest.fixture
def unequal_paths(request, tmp_path):
    """Two lab paths, 2 ms (4 Mbit/s) and 25 ms one way each; yields (topology, tmp_path)."""
    from tunnel.lab.impair import Impairment, Impairments
    from tunnel.lab.netns import Lab, unique_prefix
    from tunnel.lab.topology import MultipathTopology

    with Lab(unique_prefix(request.node.name.removeprefix("test_"))) as lab:
        topo = MultipathTopology(lab, n_paths=2)
        with Impairments(topo, seed=3) as imp:
            imp.set(0, Impairment(delay_ms=2, rate_mbit=4))
            imp.set(1, Impairment(delay_ms=25))
            yield topo, tmp_path


def _balanced_stream(topo, tmp_path, reorder: bool):
    from tunnel.lab.netns import wait_for
    from tunnel.lab.stack import SERVER_INNER, TunnelStack
    from tunnel.lab.stream import run_stream

    policy = tmp_path / f"policy-{reorder}.toml"
    policy.write_text('[[class]]\nname = "all"\nmode = "balance"\n'
                      + ("reorder = true\n" if reorder else "reorder = false\n"))
    stack = TunnelStack(topo.server, topo.client, topo.server_addr, workdir=tmp_path / f"stack-{reorder}",
                        server_overrides={"policy": str(policy)},
                        client_overrides={"mode": "balance", "policy": str(policy)})
    stack.start()
    try:
        wait_for(lambda: sum(p.get("joined", False) and p["state"] == "up"
                             for p in stack.client_status()["paths"]) == 2, 15, message="two paths")
        # 6.4 Mbit/s: more than the fast path carries, so balance spills onto the slow one
        res = run_stream(topo.client, topo.server, SERVER_INNER, 5006, rate=800, size=1000, count=2400,
                         workdir=tmp_path)
        return res, stack.server_status()["tunnels"][0]
    finally:
        stack.stop()


@pytest.mark.netns
def test_balance_over_unequal_paths_is_put_back_in_order(unequal_paths) -> None:
    """A stream above the fast path's rate spills onto the slow one (2 ms and 25 ms paths):
    without reordering much arrives out of order; with ``reorder = true`` (balance's default)
    the same stream arrives in order and nothing is lost on the way."""
    topo, tmp_path = unequal_paths
    plain, plain_tunnel = _balanced_stream(topo, tmp_path, reorder=False)
    ordered, tunnel = _balanced_stream(topo, tmp_path, reorder=True)
    print(f"reordered datagrams: plain {plain.reordered}/{plain.received}, "
          f"reorder {ordered.reordered}/{ordered.received}; reorder stats {tunnel['reorder']}; "
          f"latency p50 {plain.latency_p50_ms} -> {ordered.latency_p50_ms} ms")
    assert plain.reordered > plain.received // 10  # the control: the paths really reorder
    assert plain_tunnel["reorder"]["released"] == 0  # and nothing was reordered by the tunnel
    assert ordered.lost == 0 and ordered.received == ordered.sent
    assert ordered.reordered == 0
    assert tunnel["reorder"]["released"] > ordered.received // 10 and tunnel["reorder"]["timeouts"] == 0


def test_bytes_held_are_bounded_over_all_queues() -> None:
    """Issue 16 (finding 6): a peer may send every packet DATA_ORDERED on 256 queues; what the
    receiver holds is bounded in bytes, not only in packets per queue."""
    r = Reorderer(max_bytes=100_000)
    out: list = []
    for q in range(256):
        r.push(q, 0, 1.0, 0, b"x", 0.0, -1, out)  # each queue starts at 0
    for i in range(1, 20):  # a gap (qseq 1 never comes) on every queue, then 1000-byte packets
        for q in range(256):
            r.push(q, 1 + i, 1.0, i, bytes(1000), 0.0, -1, out)
        assert r.held_bytes <= 100_000
    assert r.overflows > 0 and r.held_bytes == sum(len(p) for q in r.waiting for p, _, _ in r._queues[q].held.values())
    assert r.stats()["held_bytes"] == r.held_bytes
