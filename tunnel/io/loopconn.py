"""Stream connections served from the shell's event loop without ever blocking it.

What the control socket (tunnel/app/control.py) and the metrics server (tunnel/app/metrics.py)
share: a table of non-blocking connections, each with a deadline timer; an answer is
sent as far as the socket takes it and the rest retried from a timer (the loop has no
writable events); a dropped connection leaves no reader and no timer behind.  How
requests are read and what is answered stay with each server.
"""

from __future__ import annotations

import socket
from typing import Optional


class Conn:
    """One accepted connection: its socket, what was read, what is still to be written."""

    __slots__ = ("sock", "fd", "buf", "out", "deadline", "retry")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out: Optional[memoryview] = None  # the answer, as far as it is not sent yet
        self.deadline = None  # the loop's timer for the whole exchange
        self.retry = None  # the loop's timer for the next write, while the socket buffer is full


class LoopServer:
    """The connection table of a listening socket; subclasses read requests (``_read``) and
    may say what happens to a connection refused, timed out or failing to be accepted.

    At most MAX_CONNS connections are served at once; more are closed when accepted, which
    keeps the listening socket from staying readable.  Each has ``timeout`` seconds for the
    whole exchange (``_expire`` then)."""

    MAX_CONNS = 16
    ACCEPT_BATCH = 16  # connections accepted per wakeup at most: the loop has other work
    WRITE_RETRY = 0.01  # the socket buffer was full: try again after this
    timeout = 5.0

    def __init__(self) -> None:
        self._loop = None
        self._sock: Optional[socket.socket] = None
        self._conns: dict[int, Conn] = {}

    def _listen(self, sock: socket.socket, loop) -> None:
        """Serve ``sock`` (bound, listening, non-blocking) from ``loop``: ``_accept`` when readable."""
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self.ACCEPT_BATCH):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wakeup
                self._accept_failed(exc)
                return
            if len(self._conns) >= self.MAX_CONNS:
                self._refused()
                sock.close()
                continue
            sock.setblocking(False)
            c = self._conn(sock)
            self._conns[c.fd] = c
            c.deadline = self._loop.call_later(self.timeout, lambda c=c: self._expire(c))
            self._loop.add_reader(c.fd, self._read, c)

    def _conn(self, sock: socket.socket) -> Conn:
        return Conn(sock)

    def _read(self, c: Conn) -> None:
        """``c`` is readable: read what came, and answer once the request is complete."""
        raise NotImplementedError

    def _accept_failed(self, exc: OSError) -> None:
        """accept() failed (not for want of a connection); it is tried again on the next wakeup."""

    def _refused(self) -> None:
        """A connection was closed at accept: MAX_CONNS were being served."""

    def _expire(self, c: Conn) -> None:
        """``c`` passed its deadline."""
        self._drop(c)

    def _write(self, c: Conn) -> None:
        """Send what is left of ``c.out``; the rest from a timer; ``_sent`` when all is out."""
        c.retry = None
        if self._conns.get(c.fd) is not c:
            return
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # the client went away
            self._drop(c)
            return
        c.out = c.out[n:]
        if len(c.out):
            c.retry = self._loop.call_later(self.WRITE_RETRY, lambda: self._write(c))
        else:
            self._sent(c)

    def _sent(self, c: Conn) -> None:
        """The whole answer is written: by default the connection is done."""
        self._drop(c)

    def _release(self, c: Conn) -> None:
        """The loop forgets the connection (it is closed, or someone else owns it now)."""
        del self._conns[c.fd]
        self._loop.remove_reader(c.fd)
        for timer in (c.deadline, c.retry):
            if timer is not None:
                timer.cancel()

    def _drop(self, c: Conn) -> None:
        if self._conns.get(c.fd) is not c:
            return
        self._release(c)
        c.sock.close()

    def _stop_listening(self) -> None:
        """Drop every connection and close the listening socket."""
        for c in list(self._conns.values()):
            self._drop(c)
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
