"""A wire tap for the in-memory lab: decrypts the DTLS 1.2 datagrams the lab carries.

Tests check what went over the wire (a HELLO's fields, the DATA sequence numbers
on each path, the CLOSE a client got) without reaching into the cores: the lab
registers :meth:`Tap.keylog` as the keylog callback of every DTLS context it
makes (pyOpenSSL's ``Context.set_keylog_callback``, the SSLKEYLOGFILE
mechanism), and hands :meth:`Tap.delivered` every datagram it delivers.  The tap
reads the randoms and the cipher suite from the clear handshake, derives the
record keys (RFC 5246 section 6.3) and opens each application-data record
(AES-GCM, RFC 5288; ChaCha20-Poly1305, RFC 7905).  What it logs is what the
receiving side decrypted, in order: datagrams the lab lost never arrive here.
A record that does not open (a replay or a forgery the receiver also drops) is
skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Optional

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from tunnel.wire import frames

APPLICATION_DATA, HANDSHAKE = 23, 22
CLIENT_HELLO, SERVER_HELLO = 1, 2

# cipher suite -> (AEAD, key length, fixed IV length, PRF hash); mptun's list (tunnel/wire/dtls.py CIPHERS)
SUITES = {
    0xC02B: (AESGCM, 16, 4, hashlib.sha256),  # ECDHE-ECDSA-AES128-GCM-SHA256
    0xC02C: (AESGCM, 32, 4, hashlib.sha384),  # ECDHE-ECDSA-AES256-GCM-SHA384
    0xCCA9: (ChaCha20Poly1305, 32, 12, hashlib.sha256),  # ECDHE-ECDSA-CHACHA20-POLY1305
    0xC02F: (AESGCM, 16, 4, hashlib.sha256),  # ECDHE-RSA-AES128-GCM-SHA256
    0xC030: (AESGCM, 32, 4, hashlib.sha384),  # ECDHE-RSA-AES256-GCM-SHA384
    0xCCA8: (ChaCha20Poly1305, 32, 12, hashlib.sha256),  # ECDHE-RSA-CHACHA20-POLY1305
}


def _prf(secret: bytes, label: bytes, seed: bytes, n: int, hash_) -> bytes:
    """The TLS 1.2 PRF (P_hash)."""
    out, a = b"", label + seed
    while len(out) < n:
        a = hmac.new(secret, a, hash_).digest()
        out += hmac.new(secret, a + label + seed, hash_).digest()
    return out[:n]


def records(datagram: bytes):
    """(type, epoch and sequence number as 8 bytes, version, fragment) of each record."""
    i = 0
    while i + 13 <= len(datagram):
        ctype, version, seq8, length = datagram[i], datagram[i + 1 : i + 3], datagram[i + 3 : i + 11], \
            struct.unpack(">H", datagram[i + 11 : i + 13])[0]
        yield ctype, seq8, version, datagram[i + 13 : i + 13 + length]
        i += 13 + length


@dataclass(eq=False)
class _Connection:
    """One DTLS session on the wire, known by the client's address(es)."""

    client_random: Optional[bytes] = None
    server_random: Optional[bytes] = None
    suite: Optional[int] = None
    keys: Optional[dict] = None  # sender side ("client"/"server") -> (aead, fixed iv)
    opened: set = field(default_factory=set)  # (sender, epoch and sequence): the receiver drops replays


@dataclass
class Seen:
    """One record a side decrypted: when, which side, the client address of the session."""

    time: float
    side: str  # the receiving side: "client" or "server"
    conn: _Connection  # the session
    record: bytes

    def frame(self):
        try:
            return frames.parse(self.record)
        except frames.FrameError:
            return None


@dataclass
class Tap:
    masters: dict = field(default_factory=dict)  # client random -> master secret
    conns: dict = field(default_factory=dict)  # client address -> _Connection
    log: list[Seen] = field(default_factory=list)

    def keylog(self, _conn, line: bytes) -> None:
        """pyOpenSSL keylog callback: ``CLIENT_RANDOM <random> <master secret>`` (TLS 1.2)."""
        parts = line.split()
        if len(parts) == 3 and parts[0] == b"CLIENT_RANDOM":
            self.masters[bytes.fromhex(parts[1].decode())] = bytes.fromhex(parts[2].decode())

    def delivered(self, now: float, to_server: bool, client_addr: tuple, datagram: bytes) -> None:
        """A datagram the lab handed to a receiver (``to_server``: client -> server)."""
        side = "server" if to_server else "client"
        for conn, rec in self._decode(to_server, client_addr, datagram, True):
            self.log.append(Seen(now, side, conn, rec))

    def peek(self, to_server: bool, datagram: bytes) -> list:
        """The frames in a datagram on its way (for a lab's ``drop`` filter), whichever known
        session it belongs to; nothing is logged or learnt."""
        out = []
        for _conn, rec in self._decode(to_server, None, datagram, False):
            try:
                out.append(frames.parse(rec))
            except frames.FrameError:
                pass
        return out

    def _decode(self, to_server: bool, client_addr: tuple, datagram: bytes, received: bool):
        sender = "client" if to_server else "server"
        conn = self.conns.get(client_addr)
        for ctype, seq8, version, body in records(datagram):
            if ctype == HANDSHAKE and seq8[:2] == b"\0\0" and received:
                conn = self._handshake(client_addr, conn, body)
            elif ctype == APPLICATION_DATA:
                rec = None
                if conn is not None:
                    rec = self._open(conn, sender, ctype, seq8, version, body, received)
                else:  # a session seen from a new address (NAT rebinding): the one whose keys open it
                    for other in set(self.conns.values()):
                        rec = self._open(other, sender, ctype, seq8, version, body, received)
                        if rec is not None:
                            conn = other
                            if received:
                                self.conns[client_addr] = other
                            break
                if rec is not None:
                    yield conn, rec

    def _handshake(self, client_addr: tuple, conn: Optional[_Connection], body: bytes) -> Optional[_Connection]:
        i = 0
        while i + 12 <= len(body):
            kind = body[i]
            frag_off, frag_len = int.from_bytes(body[i + 6 : i + 9], "big"), int.from_bytes(body[i + 9 : i + 12], "big")
            msg = body[i + 12 : i + 12 + frag_len]
            if frag_off == 0 and len(msg) >= 34:
                if kind == CLIENT_HELLO:  # a new session on this address (the cookie retry repeats the random)
                    random = msg[2:34]
                    if conn is None or conn.client_random != random:
                        conn = self.conns[client_addr] = _Connection(client_random=random)
                elif kind == SERVER_HELLO and conn is not None:
                    conn.server_random = msg[2:34]
                    sid = msg[34]
                    conn.suite = int.from_bytes(msg[35 + sid : 37 + sid], "big")
                    conn.keys = None
            i += 12 + frag_len
        return conn

    def _keys(self, conn: _Connection) -> Optional[dict]:
        if conn.keys is None:
            master = self.masters.get(conn.client_random)
            if master is None or conn.server_random is None or conn.suite not in SUITES:
                return None
            aead, klen, ivlen, hash_ = SUITES[conn.suite]
            block = _prf(master, b"key expansion", conn.server_random + conn.client_random, 2 * (klen + ivlen), hash_)
            ck, sk = block[:klen], block[klen : 2 * klen]
            civ, siv = block[2 * klen : 2 * klen + ivlen], block[2 * klen + ivlen :]
            conn.keys = {"client": (aead(ck), civ), "server": (aead(sk), siv)}
        return conn.keys

    def _open(self, conn: _Connection, sender: str, ctype: int, seq8: bytes, version: bytes, body: bytes,
              received: bool = True):
        keys = self._keys(conn)
        if keys is None:
            return None
        if (sender, seq8) in conn.opened:
            return None
        aead, iv = keys[sender]
        if len(iv) == 4:  # AES-GCM: fixed IV + the record's explicit nonce
            nonce, sealed, plain_len = iv + body[:8], body[8:], len(body) - 8 - 16
        else:  # ChaCha20-Poly1305: IV xor the padded sequence number, no explicit nonce
            nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq8))
            sealed, plain_len = body, len(body) - 16
        aad = seq8 + bytes([ctype]) + version + struct.pack(">H", plain_len)
        try:
            rec = aead.decrypt(nonce, sealed, aad)
        except Exception:  # cryptography's InvalidTag, or a record too short to hold a tag
            return None
        if received:
            conn.opened.add((sender, seq8))
        return rec

    # -- reading the log -------------------------------------------------
    def seen(self, side: str, cls, addr: Optional[tuple] = None) -> list[Seen]:
        """What ``side`` received of frame class ``cls`` (only on the session the client has,
        or had, at address ``addr``, if given)."""
        conn = None if addr is None else self.conns.get(addr)
        return [s for s in self.log
                if s.side == side and (addr is None or s.conn is conn) and isinstance(s.frame(), cls)]

    def frames(self, side: str, cls, addr: Optional[tuple] = None) -> list:
        return [s.frame() for s in self.seen(side, cls, addr)]
