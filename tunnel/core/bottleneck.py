"""The sender's model of one path's bottleneck: its rate, its base delay and its queue.

Why: ``balance`` sends each packet on the path where it is predicted to arrive
first (:mod:`tunnel.core.scheduler`), and that prediction needs what probes
alone cannot show: how fast a path drains and how much already waits in it.
A packet given to a path now arrives at::

    max(now, free_at) + size / rate + one-way base delay

where ``free_at`` is when the path's bottleneck will have sent everything we
gave it before (a virtual queue, advanced by size / rate per packet sent).

The receiver of a path's DATA tells us, a few times per round trip, which
packet it last got there, how many bytes it has got and when (FEEDBACK,
docs/PROTOCOL.md).  From each FEEDBACK:

- a round-trip sample: now - when that packet was sent - the receiver's ack
  delay (a ring of send times by tunnel sequence number, :data:`RING` deep);
- the base RTT: the lowest sample of the last :data:`BASE_WINDOW` seconds
  (probes' samples count too); the one-way base delay is half of it;
- a one-way delay sample: the receiver's clock at the packet's arrival minus
  our clock at its sending.  The two clocks differ by an unknown constant, so
  only differences mean something: the queue delay that packet met is the
  sample minus the lowest of the window.  One-way, so a queue in the reverse
  direction (the peer's own bulk traffic on the same link) is not taken for
  ours;
- a delivery-rate sample: bytes between two FEEDBACKs over the receiver's
  time between them.  It measures the path's capacity only while a queue of
  ours stood at the bottleneck (measured above :data:`BUSY_QUEUE`, and the
  model had a backlog when the packet left): then the rate follows it.
  Otherwise the path delivered what it was given, so the capacity is at
  least that, and the rate never drops below it.

Each FEEDBACK also corrects the virtual queue: the packet really left the
bottleneck at ``sent + queue delay``; the model said ``free_at`` then; the
difference moves ``free_at`` now, so a wrong rate or traffic we cannot see
(the other end's, another host's on a shared link) costs one feedback interval
of error, not a drifting model.  Corrections are summed in ``shift`` and each
packet's predicted departure is stored net of it, so the packets sent before a
correction are not corrected again when their own FEEDBACK comes.

A path whose FEEDBACK stops while packets are outstanding (its link died; the
estimator needs a dead interval to say so) is predicted later and later: the
time past :attr:`Bottleneck.patience` is added to its arrival, so the traffic
moves to the other paths within a few feedback intervals, not a dead interval.
An answered probe ends that (:meth:`Bottleneck.on_probe`): packets whose
FEEDBACK never comes (sent before the peer knew we wanted it) must not keep a
working path out of use.

Sans-IO: times are passed in; the only state is numbers and four arrays.
"""

from __future__ import annotations

from array import array
from typing import Optional

from tunnel.wire.frames import FEEDBACK_CLOCK as CLOCK  # FEEDBACK's receive-time field wraps here

RING = 2048  # send times kept per path: a FEEDBACK for an older packet gives no sample
MASK = RING - 1
INITIAL_RATE = 1_250_000.0  # bytes/s (10 Mbit/s) until FEEDBACK tells
MIN_RATE = 12_500.0  # bytes/s (100 kbit/s): the model never assumes a path slower than this
INITIAL_RTT = 0.1  # seconds, until a probe or a FEEDBACK gives a sample
BUSY_QUEUE = 0.002  # a queue delay above this means the bottleneck was busy: its delivery rate is its capacity
RATE_GAIN = 0.5  # how far one busy delivery-rate sample moves the rate
RATE_WINDOW = 0.02  # seconds of the receiver's time a delivery-rate sample spans at least
RATE_GROWTH = 2.0  # an idle path's rate grows at most this much per sample
BASE_WINDOW = 10.0  # seconds a base-RTT minimum is trusted (a path whose route changes gets a new one)
FEEDBACK_MIN, FEEDBACK_MAX = 0.002, 0.025  # the FEEDBACK interval asked for: a quarter of the RTT, within these
STALL_GRACE = 0.01  # FEEDBACK may be this much later than expected before a path counts as stalled
US = 1_000_000
HALF_CLOCK = CLOCK >> 1


class Bottleneck:
    __slots__ = (
        "rate", "inv_rate", "free_at", "owd", "base_rtt", "base_at", "base_owd", "base_owd_at",
        "queue", "busy", "shift",
        "fb_at", "fb_seq", "sent_seq", "waiting_since", "patience", "samples",
        "_seqs", "_sent", "_free", "_backlog", "_rx_bytes", "_rx_time",
    )

    def __init__(self, now: float, rtt: Optional[float] = None):
        self.rate = INITIAL_RATE  # bytes/s the bottleneck drains (estimate)
        self.inv_rate = 1.0 / INITIAL_RATE
        self.free_at = now  # when everything given to the path so far has left its bottleneck
        self.base_rtt = INITIAL_RTT if rtt is None else max(0.0, rtt)
        self.base_at = now
        self.owd = self.base_rtt / 2  # one-way base delay
        self.base_owd = -1  # lowest one-way sample of the window (us, offset by the clocks' difference; -1: none)
        self.base_owd_at = now
        self.queue = 0.0  # queue delay the latest FEEDBACK's packet met
        self.busy = False  # that queue said the bottleneck was busy
        self.shift = 0.0  # sum of the corrections made to free_at
        self.fb_at = now  # the latest FEEDBACK
        self.fb_seq = -1  # the highest sequence number FEEDBACK reported
        self.sent_seq = -1  # the highest sequence number sent on the path
        self.waiting_since = 0.0  # packets outstanding past the latest FEEDBACK since (0: none)
        self.patience = INITIAL_RTT + FEEDBACK_MAX + STALL_GRACE  # how long FEEDBACK may take
        self.samples = 0  # FEEDBACKs that gave a round-trip sample
        self._seqs = array("q", [-1]) * RING
        self._sent = array("d", [0.0]) * RING
        self._free = array("d", [0.0]) * RING  # predicted departure, net of ``shift`` at the time
        self._backlog = array("d", [0.0]) * RING  # what the model said was queued before it (s)
        self._rx_bytes = -1  # the previous FEEDBACK's bytes and time (-1: none yet)
        self._rx_time = 0

    # -- per packet ----------------------------------------------------
    def arrival(self, size: int, now: float) -> float:
        """When a packet of ``size`` bytes given to the path now would arrive."""
        f = self.free_at
        t = (f if f > now else now) + size * self.inv_rate + self.owd
        w = self.waiting_since
        if w and now - w > self.patience:
            t += now - w - self.patience
        return t

    def sent(self, seq: int, size: int, now: float) -> None:
        """A packet of ``size`` record bytes went out on the path."""
        f = self.free_at
        i = seq & MASK
        if f > now:
            self._backlog[i] = f - now
        else:
            f = now
            self._backlog[i] = 0.0
        f += size * self.inv_rate
        self.free_at = f
        self._seqs[i] = seq
        self._sent[i] = now
        self._free[i] = f - self.shift
        if seq > self.sent_seq:
            self.sent_seq = seq
        if not self.waiting_since:
            self.waiting_since = now

    # -- feedback ------------------------------------------------------
    def on_probe(self, rtt: float, now: float) -> None:
        """A probe was answered: a round-trip sample, and the path works now.  Packets that
        never got their FEEDBACK (sent before the peer knew we wanted it, or its FEEDBACK was
        lost) stop counting as a stall: the next ones are given the usual patience."""
        if self.waiting_since:
            self.waiting_since = now
        self.on_rtt(rtt, now)

    def on_rtt(self, rtt: float, now: float) -> None:
        """A round-trip sample (a FEEDBACK's or a probe's): the base RTT follows the lowest."""
        if rtt < 0.0:  # the receiver's ack delay overstated (clock granularity)
            rtt = 0.0
        if rtt <= self.base_rtt or now - self.base_at > BASE_WINDOW:
            self.base_rtt = rtt
            self.base_at = now
            self.owd = rtt / 2

    def on_feedback(self, seq: int, rx_bytes: int, rx_time_us: int, ack_delay_us: int,
                    now: float, interval: float) -> None:
        """The receiver got ``seq`` (the highest on this path) at ``rx_time_us`` of its clock,
        ``rx_bytes`` in all, and answered ``ack_delay_us`` later; ``interval`` is the
        FEEDBACK interval asked for."""
        self.fb_at = now
        if seq > self.fb_seq:
            self.fb_seq = seq
        i = seq & MASK
        if self._seqs[i] == seq:
            sent_at = self._sent[i]
            self.on_rtt(now - sent_at - ack_delay_us / US, now)
            self.samples += 1
            queue = self._one_way_queue((rx_time_us - int(sent_at * US)) % CLOCK, now)
            self.queue = queue
            # busy: a queue stood, and it was ours (the model had given the path more than it
            # drains); a radio link's own delay swings, with little sent, say nothing of its rate
            self.busy = queue > BUSY_QUEUE and self._backlog[i] > BUSY_QUEUE
            error = sent_at + queue - (self._free[i] + self.shift)
            self.shift += error
            self.free_at += error
            self.patience = self.base_rtt + queue + 2 * interval + STALL_GRACE
        self._rate_sample(rx_bytes, rx_time_us)
        if self.fb_seq >= self.sent_seq:
            self.waiting_since = 0.0
        else:
            self.waiting_since = now  # later packets are on their way: their FEEDBACK is due within patience

    def _one_way_queue(self, owd: int, now: float) -> float:
        """Seconds above the window's lowest one-way sample (``owd``: us, modulo CLOCK)."""
        base = self.base_owd
        if base < 0 or now - self.base_owd_at > BASE_WINDOW:
            self.base_owd, self.base_owd_at = owd, now
            return 0.0
        above = (owd - base + HALF_CLOCK) % CLOCK - HALF_CLOCK  # signed, across the wrap
        if above <= 0:
            self.base_owd, self.base_owd_at = owd, now
            return 0.0
        return above / US

    def _rate_sample(self, rx_bytes: int, rx_time_us: int) -> None:
        """Bytes over the receiver's time since the sample began, once that spans
        :data:`RATE_WINDOW` (a link that delivers in bursts, as radio links do, would
        give absurd rates over a millisecond)."""
        prev_bytes, prev_time = self._rx_bytes, self._rx_time
        if prev_bytes < 0 or rx_bytes < prev_bytes:
            self._rx_bytes, self._rx_time = rx_bytes, rx_time_us
            return
        dt = ((rx_time_us - prev_time) % CLOCK) / US
        if dt < RATE_WINDOW:
            return
        self._rx_bytes, self._rx_time = rx_bytes, rx_time_us
        if dt > 1.0:  # across a long pause: says nothing of the capacity
            return
        sample = (rx_bytes - prev_bytes) / dt
        if self.busy:
            rate = self.rate + RATE_GAIN * (sample - self.rate)
        elif sample > self.rate:
            rate = min(sample, RATE_GROWTH * self.rate)  # an idle path: at least what it delivered
        else:
            return
        self.rate = rate if rate > MIN_RATE else MIN_RATE
        self.inv_rate = 1.0 / self.rate

    def stalled(self, now: float) -> bool:
        """Packets are outstanding and their FEEDBACK is overdue."""
        w = self.waiting_since
        return bool(w) and now - w > self.patience

    def feedback_interval(self) -> float:
        """How often to ask the receiver for FEEDBACK: a quarter of the base RTT, bounded."""
        return min(FEEDBACK_MAX, max(FEEDBACK_MIN, self.base_rtt / 4))

    def stats(self) -> dict:
        return {
            "rate_kbps": round(self.rate * 8 / 1000, 1),
            "base_rtt_ms": round(self.base_rtt * 1000, 3),
            "queue_ms": round(self.queue * 1000, 3),
            "feedback_samples": self.samples,
        }
