"""ICMP destination unreachable for packets the server cannot route (RFC 792, RFC 1812 4.3.2.7).

Built only for the first fragment of a non-ICMP-error packet (no errors about
errors), quoting the original header and 8 bytes, like a router would.
"""

from __future__ import annotations

import struct

from tunnel.ecn import ipv4_checksum

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
