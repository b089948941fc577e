"""Batched UDP I/O: GSO on send (UDP_SEGMENT), GRO on receive (UDP_GRO), and
the outer TOS byte per datagram (IP_TOS ancillary data out, IP_RECVTOS in).

Python has no sendmmsg/recvmmsg.  Linux UDP segmentation offload gives the
same effect: one sendmsg carries up to 64 equal-sized datagrams, and a socket
with UDP_GRO receives a train of them in one recvmsg.  On a veth the sender's
syscall also pays for the receiver's network stack, so fewer, larger
traversals are most of the win.  Both fall back to one datagram per call when
the kernel or device refuses.

DSCP/ECN marking rides in the same sendmsg as a control message, per call, so
one socket serves every traffic class without a setsockopt per packet; a
datagram with TOS 0 needs none (the socket's default is 0).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Callable, Iterable

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
MAX_SEGMENTS = 64  # the kernel accepts up to 64 (older) or 128 segments per send
MAX_GSO_BYTES = 65000  # IP payload limit (65535) less headers, with margin
IP_RECVTOS = getattr(socket, "IP_RECVTOS", 13)
_CMSG_SPACE = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(4)  # UDP_GRO segment size + IP_TOS
_pack_u16 = struct.Struct("=H").pack
_pack_int = struct.Struct("=i").pack


class BatchSocket:
    """A UDP socket plus GSO/GRO state; ``gso``/``gro`` say whether they are on."""

    def __init__(self, sock: socket.socket, gso: bool = True, gro: bool = True):
        self.sock = sock
        self.gso = gso
        self.gro = False
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receive ------------------------------------------------------
    def recv_batch(self, size: int = 65535) -> tuple[list[bytes], tuple, int]:
        """Datagrams of one receive (several if GRO coalesced them), the sender and
        their outer TOS byte (GRO only coalesces datagrams with equal TOS).

        Raises BlockingIOError when the socket is empty.
        """
        data, anc, _flags, addr = self.sock.recvmsg(size, _CMSG_SPACE)
        tos, seg = 0, 0
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind == socket.IP_TOS:
                tos = value[0]
            elif level == SOL_UDP and kind == UDP_GRO:
                seg = int.from_bytes(value[:4], sys.byteorder)
        if 0 < seg < len(data):
            return [data[i : i + seg] for i in range(0, len(data), seg)], addr, tos
        return [data], addr, tos

    # -- send ---------------------------------------------------------
    def send_batch(self, dgrams: list[bytes], addr, on_error: Callable[[OSError], None], tos: int = 0) -> None:
        """Send datagrams to one address (None: the connected peer) with outer TOS
        ``tos``, coalescing runs of equal size with GSO."""
        tos_cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, _pack_int(tos))] if tos else []
        if not self.gso or len(dgrams) == 1:
            self._send_each(dgrams, addr, on_error, tos_cmsg)
            return
        for run in _runs(dgrams):
            if len(run) == 1:
                self._send_each(run, addr, on_error, tos_cmsg)
                continue
            cmsg = [(SOL_UDP, UDP_SEGMENT, _pack_u16(len(run[0])))] + tos_cmsg
            try:
                if addr is None:
                    self.sock.sendmsg([b"".join(run)], cmsg)
                else:
                    self.sock.sendmsg([b"".join(run)], cmsg, 0, addr)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self.gso = False  # this path cannot offload: stop trying
                    self._send_each(run, addr, on_error, tos_cmsg)
                else:
                    for _ in run:  # e.g. EAGAIN on a full send buffer: every datagram of the run is lost
                        on_error(exc)

    def send_one(self, dgram: bytes, addr, on_error: Callable[[OSError], None], tos: int = 0) -> None:
        """Send one datagram (the common case at low rates: no GSO, one call)."""
        try:
            if tos:
                cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, _pack_int(tos))]
                if addr is None:
                    self.sock.sendmsg([dgram], cmsg)
                else:
                    self.sock.sendmsg([dgram], cmsg, 0, addr)
            elif addr is None:
                self.sock.send(dgram)
            else:
                self.sock.sendto(dgram, addr)
        except OSError as exc:
            on_error(exc)

    def _send_each(self, dgrams: Iterable[bytes], addr, on_error: Callable[[OSError], None], cmsg: list) -> None:
        sock = self.sock
        for d in dgrams:
            try:
                if cmsg:
                    if addr is None:
                        sock.sendmsg([d], cmsg)
                    else:
                        sock.sendmsg([d], cmsg, 0, addr)
                elif addr is None:
                    sock.send(d)
                else:
                    sock.sendto(d, addr)
            except OSError as exc:
                on_error(exc)

    def close(self) -> None:
        self.sock.close()


def _runs(dgrams: list[bytes]) -> Iterable[list[bytes]]:
    """Split into GSO-able runs: equal sizes, only the last one may be shorter."""
    run: list[bytes] = []
    size = total = 0
    for d in dgrams:
        n = len(d)
        if run and (n > size or total + n > MAX_GSO_BYTES or len(run) >= MAX_SEGMENTS):
            yield run
            run = []
        if not run:
            size, total = n, 0
        run.append(d)
        total += n
        if n < size:  # a shorter datagram ends the run
            yield run
            run = []
    if run:
        yield run
