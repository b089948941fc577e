"""Tests for tunnel.core.estimator: RTT, loss and rate from PING/PONG, and the up/degraded/down states.

Pure: a manual clock, PINGs and PONGs are method calls.  Times are multiples
of 1/64 s and the intervals powers-of-two fractions, so every comparison with
an interval is exact in binary floating point.
"""

from __future__ import annotations

import pytest

from tunnel.core import estimator
from tunnel.core.estimator import DEGRADED, DOWN, UP, PathEstimator

PROBE, DEAD = 0.125, 0.375
T0 = 1000.0


class Probe:
    """Drives one estimator like a path does: PINGs numbered 1, 2, ...; counters by hand."""

    def __init__(self, now: float = T0, **kw):
        kw.setdefault("probe_interval", PROBE)
        kw.setdefault("dead_interval", DEAD)
        self.est = PathEstimator(now, **kw)
        self.token = 0
        self.tx = 0  # records we sent on the path
        self.peer_rx = 0  # records the peer received
        self.peer_bytes = 0

    def ping(self, now: float) -> int:
        self.token += 1
        self.tx += 1
        self.peer_rx += 1  # the PING itself arrives
        self.est.on_probe_sent(self.token, now, self.tx)
        return self.token

    def pong(self, token: int, now: float, peer_rx: int | None = None, peer_bytes: int | None = None) -> None:
        self.est.on_receive(now)
        self.est.on_pong(token, now, self.peer_rx if peer_rx is None else peer_rx,
                         self.peer_bytes if peer_bytes is None else peer_bytes)

    def round(self, now: float, rtt: float = 1 / 64, sent: int = 0, lost: int = 0, nbytes: int = 0) -> None:
        """``sent`` DATA records (``lost`` of them never arrive), then a PING answered after ``rtt``."""
        self.tx += sent
        self.peer_rx += sent - lost
        self.peer_bytes += nbytes
        tok = self.ping(now)
        self.pong(tok, now + rtt)
        self.est.update(now + rtt)


# -- RTT ----------------------------------------------------------------------------
def test_initial_state() -> None:
    est = PathEstimator(T0)
    assert est.state == UP and est.srtt is None and est.loss == 0.0 and est.rate == 0.0
    assert (est.probe_interval, est.dead_interval) == (estimator.PROBE_INTERVAL, estimator.DEAD_INTERVAL)
    assert est.recover_probes == estimator.RECOVER_PROBES == 3
    assert est.loss_degraded == estimator.LOSS_DEGRADED == 0.2
    assert est.changes == est.probes_sent == est.probes_lost == 0


def test_rtt_smoothing_rfc6298() -> None:
    p = Probe()
    tok = p.ping(T0)
    p.pong(tok, T0 + 0.1)
    assert p.est.srtt == pytest.approx(0.1) and p.est.rttvar == pytest.approx(0.05)
    tok = p.ping(T0 + 1)
    p.pong(tok, T0 + 1.2)
    # rttvar = 3/4 * 0.05 + 1/4 * |0.1 - 0.2|, srtt = 7/8 * 0.1 + 1/8 * 0.2
    assert p.est.rttvar == pytest.approx(0.0625)
    assert p.est.srtt == pytest.approx(0.1125)
    for i in range(200):  # converges on a steady RTT
        tok = p.ping(T0 + 2 + i)
        p.pong(tok, T0 + 2 + i + 0.03)
    assert p.est.srtt == pytest.approx(0.03, rel=1e-6)
    assert p.est.rttvar == pytest.approx(0.0, abs=1e-6)


def test_pong_with_unknown_token_is_ignored() -> None:
    p = Probe()
    p.est.on_pong(77, T0 + 0.1, 5, 500)
    assert p.est.srtt is None and p.est._last_ack is None
    tok = p.ping(T0)
    p.pong(tok, T0 + 0.05)
    p.pong(tok, T0 + 0.5)  # a duplicated PONG gives no second sample
    assert p.est.srtt == pytest.approx(0.05)


# -- loss -------------------------------------------------------------------------------
def test_loss_from_pong_counters() -> None:
    p = Probe()
    p.round(T0)  # first PONG: the baseline, no loss sample yet
    assert p.est.loss == 0.0
    # 99 DATA + the PING = 100 records sent since the last acknowledged PING; the peer got 90
    p.round(T0 + 1, sent=99, lost=10)
    assert p.tx == 101 and p.peer_rx == 91
    interval = 1 - 90 / 100
    assert interval == pytest.approx(0.1)
    assert p.est.loss == pytest.approx(estimator.LOSS_GAIN * interval)  # 0.025
    p.round(T0 + 2, sent=99, lost=10)
    assert p.est.loss == pytest.approx(0.025 + 0.25 * (0.1 - 0.025))
    for i in range(60):  # the EWMA converges on the interval loss
        p.round(T0 + 3 + i, sent=99, lost=10)
    assert p.est.loss == pytest.approx(0.1, abs=1e-6)
    for i in range(60):  # and back to zero
        p.round(T0 + 100 + i, sent=99)
    assert p.est.loss == pytest.approx(0.0, abs=1e-6)


def test_loss_is_clamped() -> None:
    p = Probe()
    p.round(T0)
    # the peer reports more than we sent in the interval (late records of an earlier one): no negative loss
    p.tx += 10
    tok = p.ping(T0 + 1)
    p.pong(tok, T0 + 1.01, peer_rx=p.peer_rx + 30)
    assert p.est.loss == 0.0
    # and a peer that got none of them: the interval loss is 1
    before = p.est._last_ack[2]
    p.tx += 9
    tok = p.ping(T0 + 2)
    p.pong(tok, T0 + 2.01, peer_rx=before)
    assert p.est.loss == pytest.approx(estimator.LOSS_GAIN * 1.0)


def test_no_loss_sample_without_records_sent() -> None:
    p = Probe()
    tok = p.ping(T0)
    p.pong(tok, T0 + 0.01)
    # a PONG for a PING that left before the baseline's (overtaken order): nothing sent in between
    p.est._last_ack = (T0 + 0.01, p.tx, p.peer_rx, 0)
    p.est._pings[99] = (T0 + 0.02, p.tx)
    p.est.on_pong(99, T0 + 0.03, p.peer_rx, 0)
    assert p.est.loss == 0.0


# -- rate -------------------------------------------------------------------------------
def test_delivery_rate() -> None:
    p = Probe()
    p.round(T0, rtt=0.0)
    assert p.est.rate == 0.0
    p.round(T0 + 1, rtt=0.0, sent=10, nbytes=100_000)  # 100 kB in 1 s
    assert p.est.rate == pytest.approx(estimator.RATE_GAIN * 100_000)
    for i in range(80):
        p.round(T0 + 2 + i, rtt=0.0, sent=10, nbytes=100_000)
    assert p.est.rate == pytest.approx(100_000, rel=1e-6)
    for i in range(80):  # half the time per 100 kB: twice the rate
        p.round(T0 + 100 + i / 2, rtt=0.0, sent=10, nbytes=100_000)
    assert p.est.rate == pytest.approx(200_000, rel=1e-6)


# -- up -> down -> up -------------------------------------------------------------------
def test_down_after_dead_interval_exactly() -> None:
    """Down once no PONG came for the dead interval (no RTT measured yet: the configured one)."""
    est = PathEstimator(T0, PROBE, DEAD)
    est.on_probe_sent(1, T0 + 1 - 1 / 64, 1)
    est.on_pong(1, T0 + 1, 1, 0)
    est.srtt, est.rttvar = 0.0, 0.0  # a zero RTT: the dead interval is exactly DEAD
    est.on_receive(T0 + 1.5)  # the peer's own traffic does not prove our direction
    assert est.update(T0 + 1 + DEAD - 1 / 64) == UP
    assert est.update(T0 + 1 + DEAD - 1e-9) == UP
    assert est.changes == 0
    assert est.update(T0 + 1 + DEAD) == DOWN
    assert est.loss == 1.0 and est.changes == 1
    assert est.update(T0 + 5) == DOWN and est.changes == 1  # stays down, counted once


def test_down_needs_recover_probes_pongs() -> None:
    p = Probe()
    p.round(T0)
    assert p.est.update(T0 + 1) == DOWN
    t = T0 + 1
    for n in range(1, estimator.RECOVER_PROBES):
        t += PROBE
        tok = p.ping(t)
        p.pong(tok, t + 1 / 64)
        assert p.est.update(t + 1 / 64) == DOWN, f"up after {n} PONG(s)"
        assert p.est.loss > 0  # still the outage's loss
    t += PROBE
    tok = p.ping(t)
    p.pong(tok, t + 1 / 64)
    assert p.est.state == UP and p.est.update(t + 1 / 64) == UP
    assert p.est.loss == 0.0  # the outage said nothing about the link now
    assert p.est.changes == 2


def test_recovery_streak_restarts_after_new_silence() -> None:
    p = Probe()
    p.round(T0)
    p.est.update(T0 + 1)
    t = T0 + 1
    for _ in range(estimator.RECOVER_PROBES - 1):  # two good PONGs ...
        t += PROBE
        tok = p.ping(t)
        p.pong(tok, t)
        p.est.update(t)
    t += DEAD  # ... then silence again: the streak starts over
    assert p.est.update(t) == DOWN
    for n in range(estimator.RECOVER_PROBES):
        assert p.est.state == DOWN
        t += PROBE
        tok = p.ping(t)
        p.pong(tok, t)
        p.est.update(t)
    assert p.est.state == UP


def test_recover_probes_parameter() -> None:
    p = Probe(recover_probes=1)
    p.round(T0)
    p.est.update(T0 + 1)
    assert p.est.state == DOWN
    p.round(T0 + 1.125)
    assert p.est.state == UP


# -- up -> degraded -> up ---------------------------------------------------------------
def test_degraded_above_threshold_and_back_only_after_streak_below_half() -> None:
    p = Probe()
    p.round(T0)
    t = T0
    # half of every interval lost: 0.125, 0.21875 > 0.2
    t += 1
    p.round(t, sent=9, lost=5)
    assert p.est.loss == pytest.approx(0.125) and p.est.state == UP
    t += 1
    p.round(t, sent=9, lost=5)
    assert p.est.loss == pytest.approx(0.21875) and p.est.state == DEGRADED
    assert p.est.changes == 1
    # loss-free intervals: the loss decays, but the path stays degraded until
    # RECOVER_PROBES PONGs in a row saw it below loss_degraded / 2
    below = 0
    while p.est.state == DEGRADED:
        t += 1
        p.round(t, sent=9)
        if p.est.loss < p.est.loss_degraded / 2:
            below += 1
        else:
            assert below == 0
            assert p.est.loss <= p.est.loss_degraded  # below the threshold but not good enough yet
        assert below <= estimator.RECOVER_PROBES
    assert below == estimator.RECOVER_PROBES
    assert p.est.state == UP and p.est.changes == 2


def test_degraded_streak_reset_by_a_bad_interval() -> None:
    p = Probe()
    p.round(T0)
    t = T0
    while p.est.state == UP:
        t += 1
        p.round(t, sent=9, lost=5)
    while p.est.loss >= 0.1:
        t += 1
        p.round(t, sent=9)
    assert p.est._good_streak == 1  # one PONG below half
    t += 1
    p.round(t, sent=99, lost=60)  # a bad interval: the streak starts over
    assert p.est.loss >= 0.1 and p.est._good_streak == 0 and p.est.state == DEGRADED


def test_degraded_then_down_then_up() -> None:
    p = Probe()
    p.round(T0)
    t = T0
    while p.est.state == UP:
        t += 1
        p.round(t, sent=9, lost=5)
    assert p.est.state == DEGRADED
    t += 1
    assert p.est.update(t) == DOWN  # silence wins over loss
    for _ in range(estimator.RECOVER_PROBES):
        t += PROBE
        tok = p.ping(t)
        p.pong(tok, t)
        p.est.update(t)
    assert p.est.state == UP and p.est.loss == 0.0


def test_no_loss_sample_across_an_outage() -> None:
    p = Probe()
    p.round(T0)
    p.est.update(T0 + 1)
    # 50 records went into the void during the outage; the counters across it are not a sample
    p.tx += 50
    tok = p.ping(T0 + 1.5)
    p.pong(tok, T0 + 1.5)
    assert p.est.loss == 1.0  # unchanged: the first PONG after an outage is a new baseline


# -- lost probes --------------------------------------------------------------------------
def test_overtaken_pings_count_as_lost() -> None:
    p = Probe()
    t1, t2, t3 = p.ping(T0), p.ping(T0 + PROBE), p.ping(T0 + 2 * PROBE)
    assert p.est.probes_sent == 3
    p.pong(t3, T0 + 2 * PROBE + 0.01)
    assert p.est.probes_lost == 2 and p.est._pings == {}
    assert p.est.srtt == pytest.approx(0.01)
    p.pong(t1, T0 + 1)  # the late PONG of an overtaken PING changes nothing
    p.pong(t2, T0 + 1)
    assert p.est.probes_lost == 2 and p.est.srtt == pytest.approx(0.01)


def test_outstanding_pings_are_bounded() -> None:
    p = Probe()
    for i in range(estimator.MAX_OUTSTANDING + 5):
        p.ping(T0 + i * PROBE)
    assert len(p.est._pings) == estimator.MAX_OUTSTANDING
    assert p.est.probes_lost == 5
    assert min(p.est._pings) == 6  # the oldest went first
    p.pong(p.token, T0 + 10)
    assert p.est.probes_lost == 5 + estimator.MAX_OUTSTANDING - 1


# -- timers -----------------------------------------------------------------------------------
def test_probe_due_and_next_timer() -> None:
    est = PathEstimator(T0, PROBE, DEAD)
    assert est.probe_due(T0)  # the first PING goes at once
    assert est.next_timer() == T0
    est.on_probe_sent(1, T0, 1)
    assert not est.probe_due(T0 + PROBE - 1 / 64) and est.probe_due(T0 + PROBE)
    assert est.next_timer() == T0 + PROBE
    est.on_pong(1, T0 + 0.0625, 1, 0)
    est.srtt, est.rttvar = 0.0, 0.0  # keep the dead interval at DEAD for exact arithmetic
    est.on_probe_sent(2, T0 + PROBE, 2)
    est.on_probe_sent(3, T0 + 2 * PROBE, 3)
    # no PONG since T0 + 1/16: the dead timer comes before the next probe
    est.on_probe_sent(4, T0 + 3 * PROBE, 4)
    assert est.next_timer() == min(T0 + 4 * PROBE, T0 + 0.0625 + DEAD) == T0 + 0.0625 + DEAD
    est.on_pong(4, T0 + 3 * PROBE, 4, 0)
    est.srtt, est.rttvar = 0.0, 0.0
    assert est.next_timer() == T0 + 4 * PROBE


def test_dead_interval_stretches_with_the_rtt() -> None:
    """A slow link is not declared dead while its answers are on their way."""
    est = PathEstimator(T0, PROBE, DEAD)
    est.on_probe_sent(1, T0, 1)
    est.on_pong(1, T0 + 0.6, 1, 0)  # a 600 ms RTT (satellite)
    assert est.effective_dead_interval == pytest.approx(0.6 + 4 * 0.3 + PROBE)
    assert est.update(T0 + 0.6 + 1.0) == UP
    assert est.update(T0 + 0.6 + est.effective_dead_interval) == DOWN
