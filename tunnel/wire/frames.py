"""Tunnel frames: what one DTLS record's plaintext carries (see docs/PROTOCOL.md).

Every record holds exactly one frame: a QUIC varint frame type, then the
frame's fields.  Varints use aioquic's Buffer.  Parsing never raises anything
but :class:`FrameError`; the receiver counts those and drops the record.
DATA is the hot path: :func:`encode_data` and the fast branch in
:func:`parse` avoid building objects where they can.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Union

from aioquic.buffer import Buffer, BufferReadError


def printable(text: str) -> str:
    """``text`` with every unprintable character (newlines, escapes, other controls) written as
    a Python escape: strings a peer chose (a CLOSE reason, a certificate name) end up in log
    lines, and a raw newline there would forge a log line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)

PROTOCOL_VERSION = 1
TUNNEL_ID_LEN = 16
NEW_TUNNEL = bytes(TUNNEL_ID_LEN)

HELLO, CONFIG, DATA, PING, PONG, CLOSE, DATA_ORDERED = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
FEEDBACK, FEEDBACK_WANTED = 0x08, 0x09
FEEDBACK_CLOCK = 1 << 30  # FEEDBACK's receive time counts microseconds modulo this (a 4-byte varint)
# Largest DATA header: DATA_ORDERED's type (1 byte) + sequence number (varint, at
# most 8 bytes) + queue (1) + queue sequence number (2) + hold time (1).  The inner
# MTU leaves room for it, so any packet may be sent in either DATA frame.
DATA_OVERHEAD = 1 + 8 + 4
HOLD_UNIT_MS = 4  # DATA_ORDERED's hold field counts 4 ms units (up to 1020 ms)

# CLOSE reason codes
# CLOSE_NORMAL ends the tunnel (shutdown); CLOSE_PATH ends only the path it arrives on.
CLOSE_NORMAL, CLOSE_REFUSED, CLOSE_PROTOCOL, CLOSE_REPLACED, CLOSE_VERSION, CLOSE_UNKNOWN_TUNNEL, CLOSE_PATH = range(7)

MAX_REASON = 200
MAX_ROUTES = 256


class FrameError(ValueError):
    """A record that is not a valid frame (unknown type, truncated, bad field)."""


@dataclass
class Hello:
    version: int = PROTOCOL_VERSION
    tunnel_id: bytes = NEW_TUNNEL  # all-zero: create a new tunnel; else JOIN this one
    mode: int = 0  # scheduling mode the client asks for (0: the server's choice, else MODES index + 1)
    redundancy: int = 0  # k for the redundant mode (0: default)
    priority: int = 0  # this path's rank for backup mode (0 = first choice)


Prefix = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Interface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


@dataclass
class Config:
    tunnel_id: bytes
    addresses: list[Interface]  # the client's inner addresses with prefix length
    mtu: int
    keepalive_ms: int
    timeout_ms: int
    routes: list[Prefix] = field(default_factory=list)


@dataclass
class Data:
    seq: int
    payload: bytes


@dataclass
class DataOrdered:
    """DATA for a class the receiver delivers in order (balance mode with ``reorder``)."""

    seq: int
    queue: int  # 0-255: the flow's queue at the receiver
    qseq: int  # 0-65535: sequence number within the queue (wraps)
    hold_ms: int  # the longest the receiver may hold this packet for a gap before it
    payload: bytes


@dataclass
class Ping:
    token: int


@dataclass
class Pong:
    token: int
    rx_records: int = 0  # records the PONG's sender received on this path so far (PING included)
    rx_bytes: int = 0  # and their plaintext bytes


@dataclass
class Feedback:
    """What the receiver of a path's DATA tells its sender (tunnel/core/bottleneck.py)."""

    seq: int  # highest tunnel sequence number of the DATA this path delivered
    rx_bytes: int  # record bytes received on this path so far
    rx_time_us: int  # when that packet arrived (the receiver's clock, microseconds modulo FEEDBACK_CLOCK)
    ack_delay_us: int = 0  # how long after that arrival this FEEDBACK was sent


@dataclass
class FeedbackWanted:
    """Send FEEDBACK on this path every ``interval_ms`` (0: stop).  Sent in the PING's datagram,
    as a record of its own: a peer that predates FEEDBACK drops it and still answers the PING."""

    interval_ms: int


@dataclass
class Close:
    code: int = CLOSE_NORMAL
    reason: str = ""


Frame = Union[Hello, Config, Data, DataOrdered, Ping, Pong, Feedback, FeedbackWanted, Close]


# -- encoding ----------------------------------------------------------
_DATA_HEADER = struct.Struct(">BQ").pack
_unpack_u64 = struct.Struct(">Q").unpack_from
_VARINT_8 = 0xC000000000000000  # QUIC varint length prefix for 8 bytes


def encode_data(seq: int, payload: bytes) -> bytes:
    """DATA frame for one inner IP packet (hot path).

    The sequence number always takes the 8-byte varint form (RFC 9000 allows
    non-minimal encodings): one struct call, and a constant 9-byte header.
    """
    if seq >> 62:
        raise ValueError(f"sequence number {seq} does not fit a varint")
    return _DATA_HEADER(DATA, _VARINT_8 | seq) + payload


_ORDERED_HEADER = struct.Struct(">BQBHB")
_pack_ordered = _ORDERED_HEADER.pack
_unpack_ordered = _ORDERED_HEADER.unpack_from


def encode_data_ordered(seq: int, queue: int, qseq: int, hold_units: int, payload: bytes) -> bytes:
    """DATA_ORDERED frame (hot path for reordering classes): a constant 13-byte header.

    ``hold_units`` counts :data:`HOLD_UNIT_MS`; ``qseq`` is taken modulo 2**16.
    """
    if seq >> 62:
        raise ValueError(f"sequence number {seq} does not fit a varint")
    return _pack_ordered(DATA_ORDERED, _VARINT_8 | seq, queue, qseq & 0xFFFF, hold_units) + payload


def parse_data_ordered(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(seq, queue, qseq, hold_ms, payload) of a record starting with DATA_ORDERED."""
    if len(data) > 13 and data[0] == DATA_ORDERED and data[1] >= 0xC0:  # the form mptun sends
        _, seq, queue, qseq, hold = _unpack_ordered(data)
        return seq & 0x3FFFFFFFFFFFFFFF, queue, qseq, hold * HOLD_UNIT_MS, data[13:]
    frame = parse(data)
    if not isinstance(frame, DataOrdered):
        raise FrameError("not a DATA_ORDERED frame")
    return frame.seq, frame.queue, frame.qseq, frame.hold_ms, frame.payload


def parse_data(data: bytes) -> tuple[int, bytes]:
    """(seq, payload) of a record known to start with the DATA type (hot path)."""
    if len(data) > 9 and data[1] >= 0xC0:  # the 8-byte form mptun sends
        return _unpack_u64(data, 1)[0] & 0x3FFFFFFFFFFFFFFF, data[9:]
    frame = parse(data)
    return frame.seq, frame.payload


def _push_prefix(buf: Buffer, version: int, packed: bytes, prefixlen: int) -> None:
    buf.push_uint8(version)
    buf.push_bytes(packed)
    buf.push_uint8(prefixlen)


def encode(frame: Frame) -> bytes:
    """Encode any frame (control frames; DATA may use :func:`encode_data`)."""
    if isinstance(frame, Data):
        return encode_data(frame.seq, frame.payload)
    if isinstance(frame, DataOrdered):
        if not 0 <= frame.hold_ms <= 255 * HOLD_UNIT_MS or frame.hold_ms % HOLD_UNIT_MS:
            raise ValueError(f"hold {frame.hold_ms} ms is not a multiple of {HOLD_UNIT_MS} ms up to 1020")
        return encode_data_ordered(frame.seq, frame.queue, frame.qseq, frame.hold_ms // HOLD_UNIT_MS, frame.payload)
    buf = Buffer(capacity=64 + MAX_REASON + 18 * 2 * MAX_ROUTES)
    if isinstance(frame, Hello):
        buf.push_uint_var(HELLO)
        buf.push_uint_var(frame.version)
        _push_tunnel_id(buf, frame.tunnel_id)
        buf.push_uint_var(frame.mode)
        buf.push_uint_var(frame.redundancy)
        buf.push_uint_var(frame.priority)
    elif isinstance(frame, Config):
        buf.push_uint_var(CONFIG)
        _push_tunnel_id(buf, frame.tunnel_id)
        buf.push_uint_var(len(frame.addresses))
        for a in frame.addresses:
            _push_prefix(buf, a.version, a.ip.packed, a.network.prefixlen)
        buf.push_uint_var(frame.mtu)
        buf.push_uint_var(frame.keepalive_ms)
        buf.push_uint_var(frame.timeout_ms)
        buf.push_uint_var(len(frame.routes))
        for r in frame.routes:
            _push_prefix(buf, r.version, r.network_address.packed, r.prefixlen)
    elif isinstance(frame, Ping):
        buf.push_uint_var(PING)
        buf.push_uint64(frame.token)
    elif isinstance(frame, Pong):
        buf.push_uint_var(PONG)
        buf.push_uint64(frame.token)
        buf.push_uint_var(frame.rx_records)
        buf.push_uint_var(frame.rx_bytes)
    elif isinstance(frame, Feedback):
        if not 0 <= frame.rx_time_us < FEEDBACK_CLOCK:
            raise ValueError(f"receive time {frame.rx_time_us} is not below {FEEDBACK_CLOCK}")
        buf.push_uint_var(FEEDBACK)
        buf.push_uint_var(frame.seq)
        buf.push_uint_var(frame.rx_bytes)
        buf.push_uint_var(frame.rx_time_us)
        buf.push_uint_var(frame.ack_delay_us)
    elif isinstance(frame, FeedbackWanted):
        buf.push_uint_var(FEEDBACK_WANTED)
        buf.push_uint_var(frame.interval_ms)
    elif isinstance(frame, Close):
        reason = frame.reason.encode()[:MAX_REASON]
        buf.push_uint_var(CLOSE)
        buf.push_uint_var(frame.code)
        buf.push_uint_var(len(reason))
        buf.push_bytes(reason)
    else:
        raise TypeError(f"not a frame: {frame!r}")
    return buf.data


def _push_tunnel_id(buf: Buffer, tid: bytes) -> None:
    if len(tid) != TUNNEL_ID_LEN:
        raise ValueError("tunnel id must be 16 bytes")
    buf.push_bytes(tid)


# -- parsing -----------------------------------------------------------
def parse(data: bytes) -> Frame:
    """Parse one record's plaintext into a frame, or raise FrameError."""
    if not data:
        raise FrameError("empty record")
    buf = Buffer(data=data)
    try:
        ftype = buf.pull_uint_var()
        if ftype == DATA:
            seq = buf.pull_uint_var()
            payload = data[buf.tell() :]
            if not payload:
                raise FrameError("DATA frame without a packet")
            return Data(seq, payload)
        if ftype == DATA_ORDERED:
            seq = buf.pull_uint_var()
            queue, qseq, hold = buf.pull_uint8(), buf.pull_uint16(), buf.pull_uint8()
            payload = data[buf.tell() :]
            if not payload:
                raise FrameError("DATA_ORDERED frame without a packet")
            return DataOrdered(seq, queue, qseq, hold * HOLD_UNIT_MS, payload)
        if ftype == PING:
            frame: Frame = Ping(buf.pull_uint64())
        elif ftype == PONG:
            frame = Pong(buf.pull_uint64(), buf.pull_uint_var(), buf.pull_uint_var())
        elif ftype == FEEDBACK:
            frame = Feedback(buf.pull_uint_var(), buf.pull_uint_var(), buf.pull_uint_var(), buf.pull_uint_var())
            if frame.rx_time_us >= FEEDBACK_CLOCK:
                raise FrameError(f"FEEDBACK receive time {frame.rx_time_us} is not below {FEEDBACK_CLOCK}")
        elif ftype == FEEDBACK_WANTED:
            frame = FeedbackWanted(buf.pull_uint_var())
        elif ftype == HELLO:
            version, tid = buf.pull_uint_var(), buf.pull_bytes(TUNNEL_ID_LEN)
            frame = Hello(version, tid, buf.pull_uint_var(), buf.pull_uint_var(), buf.pull_uint_var())
        elif ftype == CONFIG:
            tid = buf.pull_bytes(TUNNEL_ID_LEN)
            addresses = [_pull_interface(buf) for _ in range(_pull_count(buf))]
            mtu, keepalive, timeout = buf.pull_uint_var(), buf.pull_uint_var(), buf.pull_uint_var()
            routes = [_pull_interface(buf).network for _ in range(_pull_count(buf))]
            if not 576 <= mtu <= 65535:
                raise FrameError(f"CONFIG mtu {mtu} out of range")
            frame = Config(tid, addresses, mtu, keepalive, timeout, routes)
        elif ftype == CLOSE:
            code = buf.pull_uint_var()
            n = buf.pull_uint_var()
            if n > MAX_REASON:
                raise FrameError("CLOSE reason too long")
            frame = Close(code, buf.pull_bytes(n).decode("utf-8", "replace"))  # printable() before logging it
        else:
            raise FrameError(f"unknown frame type {ftype:#x}")
    except BufferReadError:
        raise FrameError("truncated frame") from None
    if not buf.eof():
        raise FrameError(f"{len(data) - buf.tell()} trailing bytes after frame type {ftype:#x}")
    return frame


def _pull_count(buf: Buffer) -> int:
    n = buf.pull_uint_var()
    if n > MAX_ROUTES:
        raise FrameError(f"list of {n} entries is too long")
    return n


def _pull_interface(buf: Buffer) -> Interface:
    family = buf.pull_uint8()
    if family == 4:
        addr = ipaddress.IPv4Address(buf.pull_bytes(4))
        limit = 32
    elif family == 6:
        addr = ipaddress.IPv6Address(buf.pull_bytes(16))
        limit = 128
    else:
        raise FrameError(f"unknown address family {family}")
    plen = buf.pull_uint8()
    if plen > limit:
        raise FrameError(f"prefix length {plen} > {limit}")
    return ipaddress.ip_interface(f"{addr}/{plen}")
