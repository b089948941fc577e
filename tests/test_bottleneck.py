"""The bottleneck model and balance's earliest-arrival choice, sans-IO with a manual clock.

A small simulated network stands in for the links: each path is a FIFO that drains at its
capacity and then delays by its one-way delay; the receiver answers with FEEDBACK every
interval, as tunnel/core/path.py does, and the FEEDBACK takes the path's delay back.  The
sender offers a constant stream and the scheduler picks a path per packet.
"""

from __future__ import annotations

import heapq

import pytest

from tunnel.core.bottleneck import BUSY_QUEUE, INITIAL_RATE, RATE_GROWTH, Bottleneck
from tunnel.core.estimator import DOWN, UP
from tunnel.core.scheduler import QUEUE_BUDGET, Scheduler

SIZE = 1200
US = 1_000_000


class SimPath:
    """What the scheduler reads of a path, plus a simulated link behind it."""

    def __init__(self, name: str, mbit: float, delay: float):
        self.name, self.key = name, name
        self.capacity = mbit * 125_000  # bytes/s
        self.delay = delay
        self.state, self.srtt, self.loss, self.rate, self.priority = UP, 2 * delay, 0.0, 0.0, 0
        self.bottleneck = Bottleneck(0.0, 2 * delay)
        self.link_free = 0.0  # when the simulated link has sent what it holds
        self.rx_bytes = 0
        self.rx_seq = -1
        self.rx_at = 0.0
        self.fb_due = 0.0
        self.pending = False
        self.sent = 0
        self.dead = False


class Sim:
    """Events in time order: packets arriving at the receiver, FEEDBACK arriving at the sender."""

    def __init__(self, *paths: SimPath, interval: float = 0.005):
        self.paths = list(paths)
        self.sched = Scheduler("balance")
        self.sched.refresh(self.paths)
        self.now = 0.0
        self.seq = 0
        self.events: list = []
        self.interval = interval
        self.arrivals: list[tuple[float, int]] = []  # (arrival time, seq)

    def send(self, size: int = SIZE) -> SimPath:
        [p] = self.sched.select(bytes(size), self.now)
        self.seq += 1
        p.bottleneck.sent(self.seq, size, self.now)
        p.sent += 1
        if not p.dead:
            depart = max(self.now, p.link_free) + size / p.capacity
            p.link_free = depart
            heapq.heappush(self.events, (depart + p.delay, self.seq, "rx", p, size))
        return p

    def _feedback(self, p: SimPath, t: float) -> None:
        args = (p.rx_seq, p.rx_bytes, int(p.rx_at * US) % (1 << 30), int((t - p.rx_at) * US))
        heapq.heappush(self.events, (t + p.delay, -1, "fb", p, args))
        p.fb_due = t + self.interval
        p.pending = False

    def run_until(self, t_end: float) -> None:
        while self.events and self.events[0][0] <= t_end:
            t, seq, kind, p, arg = heapq.heappop(self.events)
            self.now = t
            if kind == "rx":
                p.rx_bytes += arg
                self.arrivals.append((t, seq))
                if seq > p.rx_seq:
                    p.rx_seq, p.rx_at = seq, t
                    if t >= p.fb_due:
                        self._feedback(p, t)
                    else:
                        p.pending = True
                        heapq.heappush(self.events, (p.fb_due, 0, "fbtimer", p, None))
            elif kind == "fbtimer":
                if p.pending and t >= p.fb_due:
                    self._feedback(p, t)
            else:
                p.bottleneck.on_feedback(*arg, t, self.interval)
        self.now = t_end

    def stream(self, mbit: float, seconds: float, size: int = SIZE) -> dict[str, int]:
        """Offer ``mbit`` for ``seconds``; returns packets per path."""
        gap = size / (mbit * 125_000)
        counts = {p.name: 0 for p in self.paths}
        end = self.now + seconds
        t = self.now
        while t < end:
            self.run_until(t)
            counts[self.send(size).name] += 1
            t += gap
        self.run_until(end)
        return counts


def test_the_rate_follows_a_busy_path_and_only_rises_on_an_idle_one() -> None:
    b = Bottleneck(0.0, 0.02)
    b.sent(1, 1000, 0.0)
    b.on_feedback(1, 1000, 10_000, 0, 0.02, 0.005)  # no queue: idle
    b.sent(2, 1000, 0.02)
    b.on_feedback(2, 2000, 30_000, 0, 0.04, 0.005)  # 1000 bytes in 20 ms = 50 kB/s < initial
    assert b.rate == INITIAL_RATE and not b.busy  # an idle path delivered what it was given
    b.sent(3, 100_000, 0.04)
    b.on_feedback(3, 102_000, 50_000, 0, 0.06, 0.005)  # 5 MB/s, idle: the rate rises, at most doubling
    assert b.rate == pytest.approx(RATE_GROWTH * INITIAL_RATE) and not b.busy
    b.sent(40, 50_000, 0.06)  # a backlog of ours before packet 4: its queue says the path is busy
    b.sent(4, 1000, 0.06)
    b.on_feedback(4, 103_000, 70_000 + 2 * BUSY_QUEUE * 1_000_000, 0, 0.06 + 0.02 + 2 * BUSY_QUEUE, 0.005)
    assert b.busy and b.rate < RATE_GROWTH * INITIAL_RATE  # queued: follows the measured rate down


def test_a_queue_we_did_not_build_says_nothing_of_the_rate() -> None:
    """A radio link's delay swings with little sent: a measured queue without a backlog of ours
    in the model is not a capacity sample (the rate would follow what little was sent)."""
    b = Bottleneck(0.0, 0.02)
    for seq, t in ((1, 0.0), (2, 0.03)):
        b.sent(seq, 1000, t)
    b.on_feedback(1, 1000, 10_000, 0, 0.02, 0.005)
    b.on_feedback(2, 2000, 10_000 + 30_000 + 20_000, 0, 0.07, 0.005)  # 20 ms more one-way delay
    assert b.queue == pytest.approx(0.020) and not b.busy
    assert b.rate == INITIAL_RATE


def test_the_base_rtt_is_the_lowest_sample_and_ack_delay_is_left_out() -> None:
    b = Bottleneck(0.0, None)
    b.sent(5, 100, 1.0)
    b.on_feedback(5, 100, 0, 3000, 1.033, 0.005)  # 33 ms, of which 3 ms waiting at the receiver
    assert b.base_rtt == pytest.approx(0.030)
    assert b.owd == pytest.approx(0.015)
    b.on_probe(0.050, 1.1)  # a higher probe sample does not raise it
    assert b.base_rtt == pytest.approx(0.030)


def test_equal_paths_share_equally() -> None:
    a, b = SimPath("a", 20, 0.02), SimPath("b", 20, 0.02)
    sim = Sim(a, b)
    counts = sim.stream(30, 2.0)
    assert abs(counts["a"] - counts["b"]) <= 0.05 * sum(counts.values())


def test_the_fast_path_alone_while_it_has_room() -> None:
    """Below the fast path's capacity nothing goes on the slow one after the models learn."""
    fast, slow = SimPath("fast", 30, 0.005), SimPath("slow", 10, 0.05)
    sim = Sim(fast, slow)
    sim.stream(15, 1.0)
    counts = sim.stream(15, 2.0)
    assert counts["slow"] <= 0.02 * counts["fast"]
    assert fast.bottleneck.rate == pytest.approx(fast.capacity, rel=0.3) or fast.bottleneck.rate > 15 * 125_000


def test_unequal_paths_3_to_1_carry_more_than_the_fast_one() -> None:
    """Offered more than both together: each path carries about its capacity, and the
    queues stay near the budget (the model does not overfill a path)."""
    fast, slow = SimPath("fast", 30, 0.005), SimPath("slow", 10, 0.03)
    sim = Sim(fast, slow)
    sim.stream(25, 1.0)
    t0 = sim.now
    n0 = len(sim.arrivals)
    sim.stream(38, 3.0)
    delivered = sum(1 for t, _ in sim.arrivals[n0:] if t >= t0 + 0.5) * SIZE * 8 / (sim.now - t0 - 0.5) / 1e6
    assert delivered > 33  # more than the fast path's 30 Mbit/s
    assert fast.bottleneck.rate == pytest.approx(fast.capacity, rel=0.15)
    assert slow.bottleneck.rate == pytest.approx(slow.capacity, rel=0.15)
    # the real queue of the fast path stays near the budget, not at the slow path's extra delay
    assert fast.link_free - sim.now < QUEUE_BUDGET + 0.02


def test_a_path_whose_rate_halves_gets_half() -> None:
    a, b = SimPath("a", 20, 0.01), SimPath("b", 20, 0.01)
    sim = Sim(a, b)
    sim.stream(50, 1.0)
    a.capacity /= 2  # the radio got worse
    sim.stream(50, 1.0)
    counts = sim.stream(50, 1.0)
    assert a.bottleneck.rate == pytest.approx(a.capacity, rel=0.2)
    assert counts["b"] > 1.6 * counts["a"]


def test_a_path_that_stops_loses_its_traffic_within_a_few_feedback_intervals() -> None:
    a, b = SimPath("a", 20, 0.01), SimPath("b", 20, 0.01)
    sim = Sim(a, b)
    sim.stream(10, 1.0)
    a.dead = True  # silently: nothing arrives, no FEEDBACK comes (the estimator has not seen it)
    before = a.sent
    sim.stream(10, 0.2)
    lost = a.sent - before
    # a took everything (equal idle paths: ties go to the first); the stall moves the stream to b
    # after its patience (base RTT + queue + 2 feedback intervals + grace = 40 ms) and the last
    # FEEDBACK's way: well within 0.1 s (104 packets), not after a dead interval (0.3 s)
    assert lost < 0.1 * 10 * 125_000 / SIZE, lost
    assert a.bottleneck.stalled(sim.now)
    after = a.sent
    sim.stream(10, 0.3)
    assert a.sent - after <= 2  # it stays out while stalled
    a.dead = False
    a.bottleneck.on_probe(0.02, sim.now)  # a probe answered: the path works again
    assert not a.bottleneck.stalled(sim.now)


def test_a_down_path_is_not_chosen() -> None:
    a, b = SimPath("a", 20, 0.01), SimPath("b", 20, 0.01)
    sim = Sim(a, b)
    a.state = DOWN
    sim.sched.refresh(sim.paths)
    counts = sim.stream(10, 0.2)
    assert counts["a"] == 0


def test_hold_covers_the_packets_on_the_slower_path() -> None:
    fast, slow = SimPath("fast", 30, 0.005), SimPath("slow", 10, 0.05)
    sim = Sim(fast, slow)
    sim.stream(50, 1.0)
    holds = []
    for _ in range(200):
        p = sim.send()
        if p is fast:
            holds.append(sim.sched.hold)
    # a fast-path packet may have to wait for the slow path's last packet: about its delay
    assert max(holds) >= 0.045
