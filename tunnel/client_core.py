"""Client tunnel state machine (sans-IO).

connect -> DTLS handshake -> HELLO -> CONFIG -> up; DATA both ways.  When the
path dies (timeout, DTLS failure, CLOSE from the server) the client reconnects
with exponential backoff, keeping its TUN device, so applications only see a
pause.  Inputs: :meth:`receive_datagram`, :meth:`send_packet`,
:meth:`handle_timer`; outputs: :meth:`datagrams_to_send`, ``to_tun``,
:meth:`next_event`.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from OpenSSL import SSL

from tunnel import events, frames
from tunnel.dedup import DedupWindow
from tunnel.dtls import DtlsSession, common_name
from tunnel.path import P_UP, Path

BACKOFF_MIN = 0.25
BACKOFF_MAX = 5.0
BACKOFF_REFUSED = 10.0  # after the server refused us, retry slowly

C_IDLE, C_CONNECTING, C_HELLO_SENT, C_UP, C_CLOSED = "idle", "connecting", "hello-sent", "up", "closed"


class ClientCore:
    def __init__(
        self,
        ctx: SSL.Context,
        server: tuple,
        mtu: int,
        keepalive: float = 1.0,
        timeout: float = 5.0,
        window: int = 4096,
    ):
        self.ctx = ctx
        self.server = server
        self.mtu = mtu  # ciphertext MTU: the UDP payload size that fits the underlay
        self.keepalive = keepalive
        self.timeout = timeout
        self.state = C_IDLE
        self.path: Optional[Path] = None
        self.config: Optional[frames.Config] = None
        self.tunnel_id = frames.NEW_TUNNEL
        self.to_tun: list[bytes] = []
        self.outbox: list[bytes] = []  # encrypted DATA datagrams
        self._events: deque = deque()
        self._seq = 0
        self._dedup = DedupWindow(window)
        self._window = window
        self._retry_at: Optional[float] = None
        self._backoff = BACKOFF_MIN
        self.attempts = 0
        self.malformed = 0
        self.dropped_not_up = 0  # packets from the TUN while the tunnel was down
        self.not_ipv4 = 0

    # -- lifecycle ----------------------------------------------------
    def connect(self, now: float) -> None:
        self.attempts += 1
        self._events.append(events.Connecting(self.server, self.attempts))
        self.path = Path(DtlsSession.client(self.ctx, self.mtu, now), self.server, now, self.keepalive, self.timeout)
        self.state = C_CONNECTING
        self._retry_at = None

    def close(self, now: float) -> None:
        if self.path is not None and self.path.alive:
            self.path.close(frames.encode(frames.Close(frames.CLOSE_NORMAL, "client shutting down")), now)
        self.state = C_CLOSED

    # -- input --------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float) -> None:
        path = self.path
        if path is None or not path.alive:
            return
        was_up = path.state == P_UP
        records = path.receive(data, now)
        if not was_up and path.state == P_UP:
            self._on_path_established(now)
        for rec in records:
            if rec[0] == frames.DATA and self.state == C_UP:
                try:
                    seq, payload = frames.parse_data(rec)
                except frames.FrameError:
                    self.malformed += 1
                    continue
                if self._dedup.accept(seq):
                    self.to_tun.append(payload)
            else:
                self._on_control(rec, now)
        if not path.alive:
            self._path_lost(path.reason, now)

    def _on_path_established(self, now: float) -> None:
        path = self.path
        cert = path.dtls.peer_certificate
        self._events.append(events.PathUp(path.addr, common_name(cert) if cert else "?", path.dtls.cipher))
        path.send(frames.encode(frames.Hello(frames.PROTOCOL_VERSION, frames.NEW_TUNNEL)), now)
        self.state = C_HELLO_SENT

    def _on_control(self, rec: bytes, now: float) -> None:
        try:
            frame = frames.parse(rec)
        except frames.FrameError:
            self.malformed += 1
            return
        if isinstance(frame, frames.Config):
            if self.tunnel_id != frame.tunnel_id:
                self._seq = 0
                self._dedup = DedupWindow(self._window)
            self.tunnel_id = frame.tunnel_id
            self.config = frame
            self.state = C_UP
            self._backoff = BACKOFF_MIN
            self._events.append(events.TunnelUp(frame))
        elif isinstance(frame, frames.Close):
            self.path.close(None, now)
            backoff = BACKOFF_REFUSED if frame.code == frames.CLOSE_REFUSED else None
            self._path_lost(f"server closed the tunnel: {frame.reason or frame.code}", now, backoff)
        else:
            self.malformed += 1  # HELLO or an unexpected DATA: not for a client

    def _path_lost(self, reason: str, now: float, backoff: Optional[float] = None) -> None:
        if self.state == C_CLOSED or self._retry_at is not None:
            return
        was_up = self.state == C_UP
        self._events.append(events.PathDown(self.server, reason))
        if was_up:
            self._events.append(events.TunnelDown(reason))
        self.state = C_CONNECTING
        delay = backoff if backoff is not None else self._backoff
        self._retry_at = now + delay
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    # -- output -------------------------------------------------------
    def send_packet(self, packet: bytes, now: float) -> None:
        """An IP packet read from the TUN device."""
        if self.state != C_UP:
            self.dropped_not_up += 1
            return
        if packet[0] >> 4 != 4:
            self.not_ipv4 += 1  # the tunnel carries IPv4 only (for now)
            return
        self._seq = seq = self._seq + 1
        dgram = self.path.encrypt(frames.encode_data(seq, packet), now)
        if dgram is not None:
            self.outbox.append(dgram)

    def datagrams_to_send(self) -> list[bytes]:
        path = self.path
        if path is not None and path.out:  # control and handshake datagrams go first
            out, path.out = path.out, []
            out.extend(self.outbox)
            self.outbox = []
            return out
        out, self.outbox = self.outbox, []
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    # -- timers -------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        if self._retry_at is not None:
            return self._retry_at
        return self.path.get_timer() if self.path is not None else None

    def handle_timer(self, now: float) -> None:
        if self.state == C_CLOSED:
            return
        if self._retry_at is not None:
            if now >= self._retry_at:
                self.connect(now)
            return
        path = self.path
        if path is None:
            return
        path.handle_timer(now)
        if not path.alive:
            self._path_lost(path.reason, now)

    def stats(self) -> dict:
        return {
            "state": self.state,
            "address": str(self.config.addresses[0]) if self.config else None,
            "delivered": self._dedup.delivered,
            "duplicates": self._dedup.duplicates,
            "too_old": self._dedup.too_old,
            "malformed": self.malformed,
            "dropped_not_up": self.dropped_not_up,
            "not_ipv4": self.not_ipv4,
            "paths": [self.path.stats()] if self.path else [],
        }
