"""Capture the outer TOS byte of the tunnel's UDP datagrams on a lab interface.

Runs inside a namespace (``python -m tunnel.lab.capture IFACE PORT SECONDS OUT``)
with an AF_PACKET socket, so tests can check the DSCP/ECN marks that really
went over the underlay without tshark.  Writes JSON: a list of
[ip_length, tos] for every IPv4 UDP packet to or from PORT.  With a fifth
argument ``payloads``: a list of [src, sport, dst, dport, payload hex] instead
(the hostile-traffic tests replay captured records with it).
"""

from __future__ import annotations

import json
import socket
import sys
import time

ETH_P_IP = 0x0800


def capture(iface: str, port: int, seconds: float, payloads: bool = False) -> list[list]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))  # cooked: no link header
    s.bind((iface, ETH_P_IP))
    s.settimeout(0.2)
    seen: list[list[int]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            pkt = s.recv(65535)
        except socket.timeout:
            continue
        if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 17:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        sport = int.from_bytes(pkt[ihl : ihl + 2], "big")
        dport = int.from_bytes(pkt[ihl + 2 : ihl + 4], "big")
        if port in (sport, dport):
            if payloads:
                seen.append([socket.inet_ntoa(pkt[12:16]), sport, socket.inet_ntoa(pkt[16:20]), dport,
                             pkt[ihl + 8 : int.from_bytes(pkt[2:4], "big")].hex()])
            else:
                seen.append([int.from_bytes(pkt[2:4], "big"), pkt[1]])
    return seen


def main() -> int:
    iface, port, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    result = capture(iface, port, seconds, payloads=sys.argv[5:6] == ["payloads"])
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    import os

    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
