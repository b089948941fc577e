"""Per-path estimates (RTT, loss, delivery rate) and the up/degraded/down state.

Both ends probe every path with a PING every ``probe_interval``; the PONG
carries the answering side's receive counters for that path, so each PONG
also tells how many of the records we sent since the previous one arrived
(loss) and how many bytes (delivery rate).  RTT follows RFC 6298 smoothing.

A path is alive for sending only while our probes are answered: the peer's
own PINGs prove just the other direction, and a link can fail one way.  The
dead interval stretches with the RTT (srtt + 4 rttvar + one probe interval)
so a slow link is not declared dead while its answers are on their way.

An idle tunnel (no DATA either way for a while, the core decides) probes every
``idle_probe_interval`` instead, with the dead interval stretched by the same
factor: an idle path costs a fraction of the datagrams (a metered LTE link pays
for every probe).  When traffic resumes, the path probes at once; if its last
idle probe was answered it is given one dead interval (``grace_until``) to
answer that one before it counts as down.

States have hysteresis so a flapping link does not flip the scheduler:
  up -> down        no PONG for the dead interval
  up -> degraded    smoothed loss above ``loss_degraded``
  degraded -> up    ``recover_probes`` PONGs in a row with loss below half that
  down -> up        ``recover_probes`` PONGs in a row
Sans-IO: ``now`` is passed in; nothing here reads a clock.
"""

from __future__ import annotations

from typing import Optional

UP, DEGRADED, DOWN = "up", "degraded", "down"

PROBE_INTERVAL = 0.1
DEAD_INTERVAL = 0.3
RECOVER_PROBES = 3
LOSS_DEGRADED = 0.2
LOSS_GAIN = 0.25  # EWMA gain for the per-interval loss
RATE_GAIN = 0.25
MAX_OUTSTANDING = 32


class PathEstimator:
    __slots__ = (
        "probe_interval", "dead_interval", "recover_probes", "loss_degraded",
        "state", "srtt", "rttvar", "loss", "rate", "last_rx", "last_ack", "last_probe",
        "_pings", "_last_ack", "_good_streak", "changes", "probes_sent", "probes_lost",
        "idle", "idle_probe_interval", "_active", "grace_until",
    )

    def __init__(
        self,
        now: float,
        probe_interval: float = PROBE_INTERVAL,
        dead_interval: float = DEAD_INTERVAL,
        recover_probes: int = RECOVER_PROBES,
        loss_degraded: float = LOSS_DEGRADED,
        idle_probe_interval: Optional[float] = None,
    ):
        self.probe_interval = probe_interval
        self.dead_interval = dead_interval
        self._active = (probe_interval, dead_interval)
        self.idle_probe_interval = max(idle_probe_interval or probe_interval, probe_interval)
        self.idle = False
        self.grace_until = 0.0  # not down before this (traffic resumed after idleness)
        self.recover_probes = recover_probes
        self.loss_degraded = loss_degraded
        self.state = UP
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self.loss = 0.0
        self.rate = 0.0  # bytes/s the peer received on this path (smoothed)
        self.last_rx = now
        self.last_ack = now  # last PONG (the session was just proven by the handshake)
        self.last_probe = now - probe_interval  # probe at once
        self._pings: dict[int, tuple[float, int]] = {}  # token -> (sent at, our tx records then)
        self._last_ack: Optional[tuple[float, int, int, int]] = None  # (time, our tx, peer rx, peer rx bytes)
        self._good_streak = 0
        self.changes = 0  # state changes so far (flap counter)
        self.probes_sent = 0
        self.probes_lost = 0

    # -- inputs -------------------------------------------------------
    def on_receive(self, now: float) -> None:
        """Any authenticated record arrived on this path."""
        self.last_rx = now

    def probe_due(self, now: float) -> bool:
        return now - self.last_probe >= self.probe_interval

    def on_probe_sent(self, token: int, now: float, tx_records: int) -> None:
        """``tx_records``: records sent on this path so far, the PING included."""
        self.last_probe = now
        self.probes_sent += 1
        if len(self._pings) >= MAX_OUTSTANDING:
            oldest = min(self._pings)
            del self._pings[oldest]
            self.probes_lost += 1
        self._pings[token] = (now, tx_records)

    def on_pong(self, token: int, now: float, peer_rx: int, peer_rx_bytes: int) -> Optional[float]:
        """A PONG; returns its round-trip sample (None: not a PONG for a PING we wait for)."""
        sent = self._pings.pop(token, None)
        if sent is None:
            return None
        sent_at, tx = sent
        for older in [t for t in self._pings if t < token]:  # overtaken: those pings were lost
            del self._pings[older]
            self.probes_lost += 1
        self.last_ack = now
        rtt = now - sent_at
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        if self._last_ack is not None:
            t0, tx0, rx0, bytes0 = self._last_ack
            n_sent, n_recv = tx - tx0, peer_rx - rx0
            if n_sent > 0:
                interval_loss = min(1.0, max(0.0, 1.0 - n_recv / n_sent))
                self.loss += LOSS_GAIN * (interval_loss - self.loss)
            if now > t0:
                self.rate += RATE_GAIN * ((peer_rx_bytes - bytes0) / (now - t0) - self.rate)
        self._last_ack = (now, tx, peer_rx, peer_rx_bytes)
        self._on_good_probe()
        return rtt

    def _on_good_probe(self) -> None:
        if self.state == UP:
            return
        if self.state == DEGRADED and self.loss >= self.loss_degraded / 2:
            self._good_streak = 0
            return
        self._good_streak += 1
        if self._good_streak >= self.recover_probes:
            if self.state == DOWN:
                self.loss = 0.0  # the outage said nothing about the link's loss now
            self._set(UP)

    # -- state --------------------------------------------------------
    @property
    def effective_dead_interval(self) -> float:
        if self.srtt is None:
            return self.dead_interval
        return max(self.dead_interval, self.srtt + 4 * self.rttvar + self.probe_interval)

    def set_idle(self, idle: bool, now: float) -> None:
        """The tunnel went idle (probe slowly) or has traffic again (probe now)."""
        if idle == self.idle:
            return
        probe, dead = self._active
        if idle:
            k = self.idle_probe_interval / probe
            self.idle, self.probe_interval, self.dead_interval = True, self.idle_probe_interval, dead * k
            return
        answered = now - self.last_ack < self.idle_probe_interval + dead  # the last idle probe was
        self.idle, self.probe_interval, self.dead_interval = False, probe, dead
        self.last_probe = now - probe  # probe at once
        if answered and self.state != DOWN:
            self.grace_until = now + self.effective_dead_interval

    def update(self, now: float) -> str:
        """Re-evaluate the state at ``now``; returns it."""
        if now - self.last_ack >= self.effective_dead_interval and now >= self.grace_until:
            if self.state != DOWN:
                self.loss = 1.0
                self._last_ack = None  # counters across an outage mean nothing
                self._set(DOWN)
            self._good_streak = 0
        elif self.state == UP and self.loss > self.loss_degraded:
            self._set(DEGRADED)
        return self.state

    def _set(self, state: str) -> None:
        self.state = state
        self._good_streak = 0
        self.changes += 1

    def next_timer(self) -> float:
        """When :meth:`update` or a probe is next due (absolute time)."""
        if self.state == DOWN:
            return self.last_probe + self.probe_interval
        dead = max(self.last_ack + self.effective_dead_interval, self.grace_until)
        return min(self.last_probe + self.probe_interval, dead)
