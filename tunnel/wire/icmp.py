"""ICMP destination unreachable for packets the server cannot route (RFC 792, RFC 1812 4.3.2.7).

Built only for the first fragment of a non-ICMP-error packet (no errors about
errors), quoting the original header and 8 bytes, like a router would.
IPv6: ICMPv6 destination unreachable, address unreachable (RFC 4443 3.1),
quoting as much of the packet as fits in 1280 bytes, with the checksum over
the IPv6 pseudo-header; none for multicast destinations, for an unspecified
or multicast source, for later fragments, or about ICMPv6 errors (RFC 4443 2.4).
"""

from __future__ import annotations

import struct

from tunnel.wire.ecn import ipv4_checksum

HOST_UNREACHABLE = 1
_ERROR_TYPES = {3, 4, 5, 11, 12}


def unreachable(src: bytes, pkt: bytes, code: int = HOST_UNREACHABLE) -> bytes | None:
    """The ICMP error from ``src`` (4 bytes) about IPv4 ``pkt``, or None if none may be sent."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if len(pkt) < ihl or int.from_bytes(pkt[6:8], "big") & 0x1FFF:  # truncated or a later fragment
        return None
    if pkt[9] == 1 and len(pkt) > ihl and pkt[ihl] in _ERROR_TYPES:
        return None
    quote = pkt[: ihl + 8]
    icmp = bytearray(struct.pack(">BBHI", 3, code, 0, 0) + quote)
    csum = ipv4_checksum(bytes(icmp) + (b"\x00" if len(icmp) % 2 else b""))
    icmp[2:4] = csum.to_bytes(2, "big")
    total = 20 + len(icmp)
    hdr = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0xC0, total, 0, 0, 64, 1, 0, src, pkt[12:16]))
    hdr[10:12] = ipv4_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + bytes(icmp)


ADDRESS_UNREACHABLE6 = 3
_MIN_MTU6 = 1280
_EXT_HEADERS6 = {0, 43, 60}  # hop-by-hop, routing, destination options (length in 8-octet units)


def unreachable6(src: bytes, pkt: bytes, code: int = ADDRESS_UNREACHABLE6) -> bytes | None:
    """The ICMPv6 error from ``src`` (16 bytes) about IPv6 ``pkt``, or None if none may be sent."""
    if len(pkt) < 40 or pkt[0] >> 4 != 6 or pkt[24] == 0xFF or pkt[8] == 0xFF or pkt[8:24] == bytes(16):
        return None
    nxt, off = pkt[6], 40
    for _ in range(8):  # walk a few extension headers to find out what the packet carries
        if nxt in _EXT_HEADERS6 and len(pkt) >= off + 8:
            nxt, off = pkt[off], off + 8 * (pkt[off + 1] + 1)
        elif nxt == 44 and len(pkt) >= off + 8:  # fragment header
            if int.from_bytes(pkt[off + 2 : off + 4], "big") >> 3:
                return None  # not the first fragment
            nxt, off = pkt[off], off + 8
        else:
            break
    if nxt == 58 and len(pkt) > off and pkt[off] < 128:
        return None  # an ICMPv6 error itself
    body = struct.pack(">BBHI", 1, code, 0, 0) + pkt[: _MIN_MTU6 - 40 - 8]
    dst = pkt[8:24]
    pseudo = src + dst + struct.pack(">IxxxB", len(body), 58)
    csum = ipv4_checksum(pseudo + body + (b"\x00" if len(body) % 2 else b""))  # same ones' complement sum
    body = body[:2] + csum.to_bytes(2, "big") + body[4:]
    return struct.pack(">IHBB", 6 << 28, len(body), 58, 64) + src + dst + body
