"""One path: a DTLS session over one underlay address pair, plus its liveness.

A path answers PINGs itself, measures RTT from PONGs (RFC 6298 smoothing),
sends a keepalive PING when it has been quiet, and declares itself dead when
nothing arrived for ``timeout`` seconds.  Every other record goes up to the
tunnel core.  Sans-IO: datagrams in, datagrams out, ``now`` passed in.
"""

from __future__ import annotations

from typing import Optional

from tunnel import frames
from tunnel.dtls import CLOSED, ESTABLISHED, FAILED, HANDSHAKING, DtlsSession

# path states
P_HANDSHAKING, P_UP, P_DEAD, P_CLOSED = "handshaking", "up", "dead", "closed"
HANDSHAKE_TIMEOUT = 10.0
_PING_TYPE = frames.PING
_PONG_TYPE = frames.PONG


class Path:
    def __init__(self, dtls: DtlsSession, addr, now: float, keepalive: float = 1.0, timeout: float = 5.0):
        self.dtls = dtls
        self.addr = addr
        self.keepalive = keepalive
        self.timeout = timeout
        self.created = now
        self.last_rx = now
        self.last_tx = now
        self.last_ping = now
        self.state = P_HANDSHAKING
        self.reason = ""
        self.out: list[bytes] = []  # datagrams to send to ``addr``
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self._pings: dict[int, float] = {}
        self._token = 0
        self.tx_packets = self.rx_packets = self.tx_bytes = self.rx_bytes = 0
        self.malformed = 0  # records that were not valid frames
        self._pull_dtls_output()

    # -- input --------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one datagram; return the records the tunnel core must handle."""
        dtls = self.dtls
        records = dtls.receive_datagram(data, now)
        if dtls.out:
            self._pull_dtls_output()
        if self.state is not P_UP or dtls.state is not ESTABLISHED:
            self._follow_dtls_state()
        if not records:
            return records
        self.last_rx = now
        if len(records) == 1:  # the common case: one record, usually DATA
            rec = records[0]
            self.rx_packets += 1
            self.rx_bytes += len(rec)
            if rec[0] == _PING_TYPE or rec[0] == _PONG_TYPE:
                self._on_ping_pong(rec, now)
                return []
            return records
        self.rx_packets += len(records)
        out = []
        for rec in records:
            self.rx_bytes += len(rec)
            t = rec[0]
            if t == _PING_TYPE or t == _PONG_TYPE:
                self._on_ping_pong(rec, now)
            else:
                out.append(rec)
        return out

    def _follow_dtls_state(self) -> None:
        dtls = self.dtls
        if self.state == P_HANDSHAKING:
            if dtls.state == ESTABLISHED:
                self.state = P_UP
            elif dtls.state in (FAILED, CLOSED):
                self._end(P_CLOSED, dtls.error)
        elif self.state == P_UP and dtls.state in (FAILED, CLOSED):
            self._end(P_CLOSED, dtls.error)

    def _on_ping_pong(self, rec: bytes, now: float) -> None:
        try:
            frame = frames.parse(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if isinstance(frame, frames.Ping):
            self.send(frames.encode(frames.Pong(frame.token)), now)
            return
        sent = self._pings.pop(frame.token, None)
        if sent is None:
            return
        rtt = now - sent
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

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
            self.last_tx = now
            self.tx_packets += 1
            self.tx_bytes += len(record)
        return dgram

    def ping(self, now: float) -> None:
        self.last_ping = now
        self._token = (self._token + 1) & 0xFFFFFFFFFFFFFFFF
        if len(self._pings) > 16:  # unanswered pings: keep the newest only
            self._pings.clear()
        self._pings[self._token] = now
        self.send(frames.encode(frames.Ping(self._token)), now)

    def _pull_dtls_output(self) -> None:
        dgrams = self.dtls.datagrams_to_send()
        if dgrams:
            self.out.extend(dgrams)

    # -- timers -------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        if self.state == P_HANDSHAKING:
            t = self.dtls.get_timer()
            limit = self.created + HANDSHAKE_TIMEOUT
            return limit if t is None else min(t, limit)
        if self.state == P_UP:
            return min(self.last_ping + self.keepalive, self.last_rx + self.timeout)
        return None

    def handle_timer(self, now: float) -> None:
        if self.state == P_HANDSHAKING:
            if now >= self.created + HANDSHAKE_TIMEOUT:
                self._end(P_DEAD, "handshake timed out")
                return
            self.dtls.handle_timer(now)
            self._pull_dtls_output()
            if self.dtls.state == FAILED:
                self._end(P_CLOSED, self.dtls.error)
        elif self.state == P_UP:
            if now - self.last_rx >= self.timeout:
                self._end(P_DEAD, f"nothing received for {now - self.last_rx:.1f} s")
            elif now - self.last_ping >= self.keepalive and (
                now - self.last_tx >= self.keepalive or now - self.last_rx >= self.keepalive
            ):
                self.ping(now)

    # -- teardown -----------------------------------------------------
    def close(self, record: Optional[bytes], now: float) -> None:
        """Send ``record`` (a CLOSE frame) if up, then close_notify."""
        if self.state == P_UP and record is not None:
            self.send(record, now)
        self.dtls.close()
        self._pull_dtls_output()
        self._end(P_CLOSED, "closed locally")

    def _end(self, state: str, reason: str) -> None:
        if self.state in (P_DEAD, P_CLOSED):
            return
        self.state = state
        self.reason = reason

    @property
    def alive(self) -> bool:
        return self.state in (P_HANDSHAKING, P_UP)

    def stats(self) -> dict:
        return {
            "addr": f"{self.addr[0]}:{self.addr[1]}" if self.addr else "",
            "state": self.state,
            "rtt_ms": None if self.srtt is None else round(self.srtt * 1000, 3),
            "tx_packets": self.tx_packets,
            "rx_packets": self.rx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "dtls_dropped": self.dtls.records_dropped,
            "malformed": self.malformed,
            "cipher": self.dtls.cipher,
        }
