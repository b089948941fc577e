"""ECN at decapsulation, RFC 6040 normal mode.

Encapsulation copies the inner ECN field to the outer header (policy.outer_tos).
At decapsulation only an outer CE changes anything: an ECT inner packet
becomes CE (so the congestion the underlay signalled reaches the endpoints),
and a Not-ECT inner packet is dropped (its endpoints cannot be told).  The
IPv4 header checksum is updated incrementally (RFC 1624).
"""

from __future__ import annotations

from typing import Optional

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3


def decapsulate(outer_tos: int, pkt: bytes) -> Optional[bytes]:
    """The inner packet to deliver (maybe marked CE), or None to drop it."""
    if outer_tos & 3 != CE:
        return pkt
    version = pkt[0] >> 4 if pkt else 0
    if version == 4 and len(pkt) >= 20:
        inner = pkt[1] & 3
        if inner == CE:
            return pkt
        if inner == NOT_ECT:
            return None
        out = bytearray(pkt)
        old_word = (out[0] << 8) | out[1]
        out[1] |= CE
        _fix_checksum(out, old_word, (out[0] << 8) | out[1])
        return bytes(out)
    if version == 6 and len(pkt) >= 40:
        inner = (pkt[1] >> 4) & 3
        if inner == CE:
            return pkt
        if inner == NOT_ECT:
            return None
        out = bytearray(pkt)
        out[1] |= CE << 4  # no header checksum in IPv6
        return bytes(out)
    return None


def _fix_checksum(hdr: bytearray, old: int, new: int) -> None:
    """HC' = ~(~HC + ~m + m') in ones' complement arithmetic (RFC 1624, eqn. 3)."""
    hc = (hdr[10] << 8) | hdr[11]
    s = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hc = ~s & 0xFFFF
    hdr[10], hdr[11] = hc >> 8, hc & 0xFF


def ipv4_checksum(hdr: bytes) -> int:
    """Full header checksum (for tests and for building packets)."""
    s = 0
    for i in range(0, len(hdr), 2):
        s += (hdr[i] << 8) | hdr[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
