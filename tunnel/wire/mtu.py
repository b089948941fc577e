"""MTU arithmetic: inner packets must never fragment on the underlay.

underlay MTU - IP header - UDP header = the datagram (DTLS ciphertext) MTU;
minus the DTLS record overhead and the DATA frame header = the TUN MTU.
"""

from tunnel.wire.dtls import RECORD_OVERHEAD
from tunnel.wire.frames import DATA_OVERHEAD

UDP_HEADER = 8
IP_HEADER = {4: 20, 6: 40}
MIN_INNER_MTU = 576  # IPv4 minimum; below this the tunnel refuses to run


def datagram_mtu(underlay_mtu: int, family: int = 4) -> int:
    return underlay_mtu - IP_HEADER[family] - UDP_HEADER


def inner_mtu(underlay_mtu: int, family: int = 4) -> int:
    return datagram_mtu(underlay_mtu, family) - RECORD_OVERHEAD - DATA_OVERHEAD
