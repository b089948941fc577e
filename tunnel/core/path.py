"""One path: a DTLS session over one underlay address pair, plus its liveness.

A path answers PINGs itself (the PONG carries this side's receive counters),
probes the peer every ``probe_interval``, feeds the estimator, and mirrors the
estimator's up/degraded/down state in ``state``.  A path that has heard
nothing for ``silent_limit`` seconds ends its session (closed): ``timeout``
until its owner keeps it longer.  A path that carries a tunnel is kept through
an outage of any length (the client) or for ``timeout + linger`` (the server),
down and probing, so it carries traffic again the moment its link works,
without a new handshake (docs/PROTOCOL.md, Long outages).  Every record that
is not PING/PONG goes up to the tunnel core.  Sans-IO: datagrams in,
datagrams out, ``now`` passed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Optional

from tunnel.wire import frames
from tunnel.core.bottleneck import CLOCK, US, Bottleneck
from tunnel.wire.dtls import CLOSED, ESTABLISHED, FAILED, DtlsSession
from tunnel.core.estimator import DEGRADED, DOWN, UP, PathEstimator
from tunnel.core.settings import PathSettings

if TYPE_CHECKING:
    from tunnel.core.engine import TunnelEngine

# path states: handshaking, then the estimator's up/degraded/down, then closed
P_HANDSHAKING, P_UP, P_DEGRADED, P_DOWN, P_CLOSED = "handshaking", UP, DEGRADED, DOWN, "closed"
LIVE = (P_UP, P_DEGRADED, P_DOWN)  # established sessions
TICK = 0.02  # the shortest a core's timer sleeps after it ran (a round of extra copies waits this long)
INF = float("inf")


class Path:
    def __init__(
        self,
        dtls: DtlsSession,
        addr,
        now: float,
        settings: PathSettings,
        key: Hashable = None,
        name: str = "",
        handshake_timeout: Optional[float] = None,
    ):
        self.dtls = dtls
        self.addr = addr  # the peer's underlay address
        self.key = key if key is not None else addr  # how the shell knows which socket
        self.name = name  # e.g. the client interface
        self.settings = settings
        self.silent_limit = settings.timeout  # silence that ends the session; the owner raises it once the path joins
        self.seen_at = now  # the latest time the path was given (for the silence in stats)
        self.heard = False  # the peer has sent anything on this session (a handshake that got an answer)
        self.heard_again = False  # a down path heard from the peer after a silence (``changed`` is set too)
        # the server's half-open lifetime is shorter (tunnel/core/admission.py)
        self.handshake_timeout = settings.handshake_timeout if handshake_timeout is None else handshake_timeout
        self.tunnel: Optional[TunnelEngine] = None  # the tunnel this path carries (set by TunnelEngine.attach)
        self.created = now
        self.state = P_HANDSHAKING
        self.reason = ""
        self.priority = 0
        self.peer_key = b""  # server: SHA-256 of the client certificate's public key (the tunnel's owner)
        self.est: Optional[PathEstimator] = None
        self.changed = False  # state changed since the owner last looked (scheduler refresh)
        self.updated = False  # new estimates (a PONG) since the owner last looked
        self.out: list[bytes] = []  # control and handshake datagrams to send to ``addr``
        self._token = 0
        self.tx_records = self.rx_records = self.tx_bytes = self.rx_bytes = 0
        self.malformed = 0  # records that were not valid frames
        self.rx_seq = -1  # highest tunnel sequence number of the DATA this path delivered (reordering, FEEDBACK)
        self.rx_at = 0.0  # when it arrived
        # sending: the model of the path's bottleneck (balance's earliest-arrival scheduling); None: not wanted
        self.bottleneck: Optional[Bottleneck] = None
        # receiving: FEEDBACK the peer asked for (in its PINGs) every ``feedback_interval`` s (0: none)
        self.feedback_interval = 0.0
        self.feedback_due = INF  # the next FEEDBACK may go at once after this
        self.feedback_pending = False  # DATA arrived since the last FEEDBACK
        self.feedbacks_sent = 0
        self._pull_dtls_output()

    # -- estimator views (what the scheduler reads) -------------------
    @property
    def srtt(self) -> Optional[float]:
        return self.est.srtt if self.est else None

    @property
    def loss(self) -> float:
        return self.est.loss if self.est else 0.0

    @property
    def rate(self) -> float:
        return self.est.rate if self.est else 0.0

    @property
    def alive(self) -> bool:
        return self.state != P_CLOSED

    @property
    def established(self) -> bool:
        return self.state in LIVE

    # -- input --------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one datagram; return its records (the core dispatches them, PING and PONG
        included: see :func:`tunnel.core.engine.frame_handlers`)."""
        self.heard = True
        dtls = self.dtls
        records = dtls.receive_datagram(data, now)
        if dtls.out:
            self._pull_dtls_output()
        if self.state == P_HANDSHAKING or dtls.state is not ESTABLISHED:
            self._follow_dtls_state(now)
        if not records:
            return records
        est = self.est
        if self.state == P_DOWN and now - est.last_rx >= est.dead_interval:
            self._heard_again(now)
        est.last_rx = now  # PathEstimator.on_receive, inlined: this runs per packet
        self.rx_records += len(records)
        for rec in records:
            self.rx_bytes += len(rec)
        return records

    def _follow_dtls_state(self, now: float) -> None:
        dtls = self.dtls
        if self.state == P_HANDSHAKING and dtls.state == ESTABLISHED:
            st = self.settings
            self.est = PathEstimator(now, st.probe_interval, st.dead_interval, idle_probe_interval=st.idle_probe_interval)
            self._set(P_UP)
        elif dtls.state in (FAILED, CLOSED):
            self._end(dtls.error)

    def _heard_again(self, now: float) -> None:
        """A down path hears from the peer after a silence (its link is back): probe at once,
        so the peer hears this direction too (its own probes may be far apart while idle) and
        both ends judge the path from fresh answers."""
        self.seen_at = now
        self.heard_again = self.changed = True  # the owner may have held packets for it
        self.ping(now)

    def parse(self, rec: bytes) -> Optional[frames.Frame]:
        """The record's frame, or None (counted as malformed on this path)."""
        try:
            return frames.parse(rec)
        except frames.FrameError:
            self.malformed += 1
            return None

    def on_ping(self, rec: bytes, tos: int, now: float) -> None:
        """PING: answered at once with this side's receive counters (a frame handler)."""
        frame = self.parse(rec)
        if frame is not None:
            self.send(frames.encode(frames.Pong(frame.token, self.rx_records, self.rx_bytes)), now)

    def on_feedback_wanted(self, rec: bytes, tos: int, now: float) -> None:
        """FEEDBACK_WANTED (with each of the peer's PINGs): how often to send FEEDBACK here."""
        frame = self.parse(rec)
        if frame is None:
            return
        interval = frame.interval_ms / 1000.0
        if interval != self.feedback_interval:
            self.feedback_interval = interval
            self.feedback_due = now if interval else INF
            self.feedback_pending = False

    # -- FEEDBACK (tunnel/core/bottleneck.py) -------------------------
    def want_feedback(self, wanted: bool) -> None:
        """Model this path's bottleneck (and ask the peer for FEEDBACK with the PINGs) or stop;
        stopping tells the peer at once (FEEDBACK_WANTED 0), or it would go on reporting."""
        if wanted and self.bottleneck is None:
            self.bottleneck = Bottleneck(self.seen_at, self.srtt)
        elif not wanted and self.bottleneck is not None:
            self.bottleneck = None
            if self.established:
                self.send(frames.encode(frames.FeedbackWanted(0)), self.seen_at)

    def data_arrived(self, now: float) -> None:
        """DATA with a new highest sequence number arrived (only called while FEEDBACK is wanted)."""
        self.rx_at = now
        if now >= self.feedback_due:
            self.send_feedback(now)
        else:
            self.feedback_pending = True

    def send_feedback(self, now: float) -> None:
        ack_delay = now - self.rx_at
        frame = frames.Feedback(self.rx_seq, self.rx_bytes, int(self.rx_at * US) % CLOCK,
                                int(ack_delay * US) if ack_delay > 0 else 0)
        self.send(frames.encode(frame), now)
        self.feedbacks_sent += 1
        self.feedback_due = now + self.feedback_interval
        self.feedback_pending = False

    def on_feedback(self, rec: bytes, tos: int, now: float) -> None:
        """FEEDBACK: the peer's report on the DATA we sent on this path (a frame handler)."""
        frame = self.parse(rec)
        if frame is None:
            return
        b = self.bottleneck
        if b is not None:
            b.on_feedback(frame.seq, frame.rx_bytes, frame.rx_time_us, frame.ack_delay_us, now,
                          b.feedback_interval())

    def on_pong(self, rec: bytes, tos: int, now: float) -> None:
        """PONG: a round-trip sample and the peer's receive counters (a frame handler)."""
        frame = self.parse(rec)
        if frame is None:
            return
        if self.est is None:
            self.malformed += 1
            return
        rtt = self.est.on_pong(frame.token, now, frame.rx_records, frame.rx_bytes)
        if rtt is not None and self.bottleneck is not None:
            self.bottleneck.on_probe(rtt, now)
        self.updated = True
        self._sync_state()

    def set_idle(self, idle: bool, now: float) -> None:
        """Probe slowly while the tunnel carries no traffic (tunnel/core/estimator.py)."""
        est = self.est
        if est is not None and est.idle != idle and self.state in LIVE:
            est.set_idle(idle, now)

    # -- output -------------------------------------------------------
    def send(self, record: bytes, now: float) -> bool:
        """Encrypt one record into ``out``; False if the path cannot send."""
        dgram = self.encrypt(record, now)
        if dgram is None:
            return False
        self.out.append(dgram)
        return True

    def encrypt(self, record: bytes, now: float) -> Optional[bytes]:
        """Encrypt one record and return the datagram (hot path: the caller sends it)."""
        dgram = self.dtls.send(record)
        if dgram is not None:
            self.tx_records += 1
            self.tx_bytes += len(record)
        return dgram

    def ping(self, now: float) -> None:
        """A probe; while the path is modelled, FEEDBACK_WANTED rides in the same datagram
        (a record of its own: a peer that predates it drops that record, not the PING)."""
        self._token += 1
        dgram = self.encrypt(frames.encode(frames.Ping(self._token)), now)
        if dgram is None:
            return
        b = self.bottleneck
        if b is not None:
            ms = max(1, round(b.feedback_interval() * 1000))
            extra = self.encrypt(frames.encode(frames.FeedbackWanted(ms)), now)
            if extra is not None:
                dgram += extra
        self.out.append(dgram)
        self.est.on_probe_sent(self._token, now, self.tx_records)

    def _pull_dtls_output(self) -> None:
        dgrams = self.dtls.datagrams_to_send()
        if dgrams:
            self.out.extend(dgrams)

    # -- timers -------------------------------------------------------
    def service(self, now: float) -> float:
        """Run what is due (a handshake retransmission or its time limit, a probe, the dead
        interval, the silence limit) and return when something is due next."""
        if self.state == P_HANDSHAKING:
            limit = self.created + self.handshake_timeout
            if now >= limit:
                self._end("handshake timed out")
                return INF
            dtls = self.dtls
            t = dtls.get_timer()
            if t is not None and now >= t:
                dtls.handle_timer(now)
                self._pull_dtls_output()
                if dtls.state == FAILED:
                    self._end(dtls.error)
                    return INF
                t = dtls.get_timer()
            return limit if t is None else min(t, limit)
        est = self.est
        if est is None or self.state == P_CLOSED:
            return INF
        due = min(est.next_timer(), est.last_rx + self.silent_limit)
        if self.feedback_pending:
            if now >= self.feedback_due:
                self.send_feedback(now)  # the last DATA of a burst is reported too
            elif self.feedback_due < due:
                due = self.feedback_due
        if now < due:
            return due
        self.seen_at = now
        if now - est.last_rx >= self.silent_limit:
            self._end(f"nothing received for {now - est.last_rx:.1f} s")
            return INF
        if est.probe_due(now):
            self.ping(now)
        est.update(now)
        self._sync_state()
        due = min(est.next_timer(), est.last_rx + self.silent_limit)
        return min(due, self.feedback_due) if self.feedback_pending else due

    def _sync_state(self) -> None:
        if self.est.state != self.state and self.state in LIVE:
            self._set(self.est.state)

    # -- teardown -----------------------------------------------------
    def close(self, record: Optional[bytes], now: float) -> None:
        """Send ``record`` (a CLOSE frame) if established, then close_notify."""
        if self.established and record is not None:
            self.send(record, now)
        self.dtls.close()
        self._pull_dtls_output()
        self._end("closed locally")

    def _end(self, reason: str) -> None:
        if self.state != P_CLOSED:
            self.reason = reason
            self._set(P_CLOSED)

    def _set(self, state: str) -> None:
        self.state = state
        self.changed = True

    def stats(self) -> dict:
        est = self.est
        return {
            "addr": f"{self.addr[0]}:{self.addr[1]}" if self.addr else "",
            "name": self.name,
            "state": self.state,
            "priority": self.priority,
            "rtt_ms": None if est is None or est.srtt is None else round(est.srtt * 1000, 3),
            "loss": 0.0 if est is None else round(est.loss, 4),
            "rate_kbps": 0 if est is None else round(est.rate * 8 / 1000, 1),
            "state_changes": 0 if est is None else est.changes,
            "probing": "idle" if est is not None and est.idle else "active",
            # how long a down path has heard nothing (its session is kept: it works again at once)
            "silent_s": round(max(0.0, self.seen_at - est.last_rx), 1) if est is not None and self.state == P_DOWN else 0.0,
            "tx_packets": self.tx_records,
            "rx_packets": self.rx_records,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "dtls_dropped": self.dtls.records_dropped,
            "malformed": self.malformed,
            "cipher": self.dtls.cipher,
            "feedbacks_sent": self.feedbacks_sent,
            "feedback_ms": round(self.feedback_interval * 1000, 1),
            "bottleneck": None if self.bottleneck is None else self.bottleneck.stats(),
        }

