"""Shared app-layer plumbing: logging set-up and socket creation."""

from __future__ import annotations

import logging
import socket
import sys

SOCKET_BUFFER = 4 * 1024 * 1024


def setup_logging(role: str, level: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s mptun-{role} %(levelname)s %(message)s"))
    log = logging.getLogger("mptun")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    # *BUFFORCE (CAP_NET_ADMIN) lifts the net.core.[rw]mem_max cap; fall back to the capped option.
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return s


def fmt_addr(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "?"
