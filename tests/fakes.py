"""Test doubles for the shell's I/O boundary: a TUN device and UDP sockets.

Like wireguard-go's ``tun/tuntest`` and ``conn/bindtest``: the shell runs its real
code (the epoll loop, BatchSocket's GSO/TOS handling, the drain loops) against
doubles that tests can fill, read, hold full or make fail.  Both are built on real
file descriptors (AF_UNIX datagram socketpairs), because the shell waits for them
in epoll; nothing here knows the tunnel protocol or the cores.

- :class:`FakeTun`: the shell's end is a plain fd (``os.read``/``os.write``, one
  packet per call, non-blocking, like a TUN fd); the test's end injects packets
  "from the kernel" and reads what the shell wrote.  :meth:`FakeTun.fill` makes the
  shell's writes fail with EAGAIN, as on a TUN whose queue is full.
- :class:`Wire` and :class:`FakeUdpSocket`: what ``socket.socket`` offers the
  shell and ``tunnel.io.udp.BatchSocket`` (bind/connect, send/sendto/sendmsg with the
  IP_TOS and UDP_SEGMENT control messages, recvmsg with IP_TOS), carried by a
  wire that delivers by address and logs every send call.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)


def _dgram_pair(sndbuf: Optional[int] = None) -> tuple[socket.socket, socket.socket]:
    """A non-blocking AF_UNIX datagram pair: one datagram per read, readable in epoll."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        if sndbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return a, b


class FakeTun:
    """A TUN double: ``fd`` is the shell's end; ``inject``/``written`` are the kernel's side."""

    def __init__(self, sndbuf: Optional[int] = None):
        self._shell_end, self._kernel_end = _dgram_pair(sndbuf)
        self.fd = self._shell_end.fileno()
        self.filler = 0  # packets put in by fill(), discarded by written()

    def inject(self, *pkts: bytes) -> None:
        """Packets an application sent into the tunnel: the shell reads them from ``fd``."""
        for pkt in pkts:
            self._kernel_end.send(pkt)

    def written(self) -> list[bytes]:
        """Every packet the shell wrote since the last call (what the kernel would deliver)."""
        out = []
        while True:
            try:
                out.append(self._kernel_end.recv(65535))
            except BlockingIOError:
                break
        skip, self.filler = min(self.filler, len(out)), max(0, self.filler - len(out))
        return out[skip:]

    def fill(self) -> int:
        """Fill the queue towards the kernel so that the shell's next write fails with EAGAIN,
        as on a full TUN queue; ``written()`` empties it again.  Returns the packets it took."""
        n = 0
        while True:
            try:
                self._shell_end.send(b"\x00" * 1024)
            except BlockingIOError:
                break
            n += 1
        self.filler += n
        return n

    def close(self) -> None:
        self._shell_end.close()
        self._kernel_end.close()


@dataclass
class Sent:
    """One send call on a FakeUdpSocket: the datagrams it carried (several with GSO)."""

    src: tuple
    dst: Optional[tuple]
    tos: int
    datagrams: list[bytes]


@dataclass
class Wire:
    """The network between FakeUdpSockets: delivers each datagram to the socket bound to
    its destination (or loses it), logs every send call in ``sent``, and loses what
    ``drop(src, dst, datagram)`` says."""

    host: str = "198.18.0.2"  # the address sockets bound to nothing get
    sent: list[Sent] = field(default_factory=list)
    lost: list[tuple[tuple, Optional[tuple], bytes]] = field(default_factory=list)
    drop: Optional[Callable[[tuple, Optional[tuple], bytes], bool]] = None
    sockets: dict = field(default_factory=dict)  # bound address -> FakeUdpSocket
    opened: list["FakeUdpSocket"] = field(default_factory=list)
    _ports: itertools.count = field(default_factory=lambda: itertools.count(40000))

    def socket(self, bind: Optional[tuple] = None, connect: Optional[tuple] = None) -> "FakeUdpSocket":
        s = FakeUdpSocket(self)
        self.opened.append(s)
        if bind is not None:
            s.bind(bind)
        if connect is not None:
            s.connect(connect)
        return s

    def _bind(self, sock: "FakeUdpSocket", addr: tuple) -> tuple:
        if addr[1] == 0:
            addr = (addr[0] or self.host, next(self._ports))
        if addr in self.sockets:
            raise OSError(errno.EADDRINUSE, "address in use")
        self.sockets[addr] = sock
        return addr

    def _carry(self, src: tuple, dst: tuple, tos: int, datagrams: list[bytes]) -> None:
        self.sent.append(Sent(src, dst, tos, datagrams))
        for d in datagrams:
            to = self.sockets.get(dst)
            if (self.drop is not None and self.drop(src, dst, d)) or to is None or not to._arrive(d, src, tos):
                self.lost.append((src, dst, d))

    def sent_by(self, sock: "FakeUdpSocket") -> list[Sent]:
        return [c for c in self.sent if c.src == sock.addr]


class FakeUdpSocket:
    """Enough of ``socket.socket`` (AF_INET, SOCK_DGRAM) for the shell and BatchSocket.

    ``fileno()`` is a real fd that is readable while datagrams wait.  Set
    ``send_errno`` to make every send fail (EAGAIN: a full send buffer); call
    :meth:`fail_next_recv` to make one receive fail (ECONNREFUSED: an ICMP port
    unreachable on a connected socket).  ``gso=False`` refuses UDP_SEGMENT with EIO
    like a device that cannot offload.
    """

    def __init__(self, wire: Wire):
        self.wire = wire
        self._rx, self._tx = _dgram_pair()  # _rx is what epoll watches; the wire writes into _tx
        self._meta: deque = deque()  # (sender, tos), one per datagram waiting in _rx
        self.addr: Optional[tuple] = None
        self.peer: Optional[tuple] = None
        self.options: dict = {}
        self.blocking = True
        self.closed = False
        self.send_errno: Optional[int] = None
        self.gso = True

    # -- set-up --------------------------------------------------------
    def fileno(self) -> int:
        return self._rx.fileno()

    def setsockopt(self, level: int, option: int, value) -> None:
        self.options[(level, option)] = value

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def bind(self, addr: tuple) -> None:
        self.addr = self.wire._bind(self, addr)

    def connect(self, addr: tuple) -> None:
        if self.addr is None:
            self.bind(("", 0))
        self.peer = addr

    def getsockname(self) -> tuple:
        return self.addr

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.wire.sockets.get(self.addr) is self:
                del self.wire.sockets[self.addr]
            self._rx.close()
            self._tx.close()

    # -- receive -------------------------------------------------------
    def _arrive(self, data: bytes, src: tuple, tos: int) -> bool:
        """A datagram from the wire; False if the receive queue is full (it is lost)."""
        if self.closed or (self.peer is not None and src != self.peer):
            return False  # a connected socket takes only its peer's datagrams
        try:
            self._tx.send(data)
        except BlockingIOError:
            return False
        self._meta.append((src, tos))
        return True

    def fail_next_recv(self, code: int = errno.ECONNREFUSED) -> None:
        """The receive after the datagrams waiting now raises OSError(code) (the fd turns
        readable for it)."""
        self._tx.send(b"")
        self._meta.append((None, code))

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0):
        data = self._rx.recv(bufsize)  # BlockingIOError when empty, as a non-blocking socket
        src, tos = self._meta.popleft()
        if src is None:  # fail_next_recv
            raise OSError(tos, os.strerror(tos))
        anc = []
        if self.options.get((socket.IPPROTO_IP, getattr(socket, "IP_RECVTOS", 13))):
            anc.append((socket.IPPROTO_IP, socket.IP_TOS, bytes([tos])))
        return data, anc, 0, src

    # -- send ----------------------------------------------------------
    def _check_send(self, dst: Optional[tuple]) -> tuple:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.send_errno is not None:
            raise OSError(self.send_errno, os.strerror(self.send_errno))
        if dst is None:
            if self.peer is None:
                raise OSError(errno.EDESTADDRREQ, "not connected")
            dst = self.peer
        if self.addr is None:
            self.bind(("", 0))
        return dst

    def send(self, data: bytes) -> int:
        self.wire._carry(self.addr, self._check_send(None), 0, [bytes(data)])
        return len(data)

    def sendto(self, data: bytes, addr: tuple) -> int:
        self.wire._carry(self.addr, self._check_send(addr), 0, [bytes(data)])
        return len(data)

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address: Optional[tuple] = None) -> int:
        dst = self._check_send(address)
        data = b"".join(buffers)
        tos, seg = 0, 0
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IP and kind == socket.IP_TOS:
                tos = struct.unpack("=i", value)[0]
            elif level == SOL_UDP and kind == UDP_SEGMENT:
                if not self.gso:
                    raise OSError(errno.EIO, "no GSO here")
                seg = struct.unpack("=H", value)[0]
        dgrams = [data[i : i + seg] for i in range(0, len(data), seg)] if seg else [data]
        self.wire._carry(self.addr, dst, tos, dgrams)
        return len(data)
