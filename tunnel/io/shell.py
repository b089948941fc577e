"""The I/O shell: an epoll loop owns the UDP sockets and the TUN fd and feeds the cores.

Each readable fd is drained until EAGAIN in one wakeup (one packet per wakeup
costs ~1.8x), outputs are flushed in batches, and one loop timer drives the
core's timers: it fires when the core's ``handle_timer()`` last said (an idle
client wakes only to probe its paths), and input that may need it sooner
(``core.timer_dirty``) makes the shell run them again once the wakeup is drained.  Nothing here knows the
protocol; everything here is I/O.
Write errors (EAGAIN/ENOBUFS on a full socket or TUN queue) are counted, not
fatal.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from typing import Callable, Hashable, Optional

from tunnel.core import events
from tunnel.io.loop import EventLoop, TimerHandle
from tunnel.core.path import TICK
from tunnel.io.udp import BatchSocket
from tunnel.core.warm import SKIP, Warmer

log = logging.getLogger("mptun")

BATCH = 64  # flush outputs at least every BATCH packets inside one drain
READ_SIZE = 65535
_TRANSIENT = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Shell:
    """Common parts: the loop, the tick, signals, the TUN reader and writer."""

    def __init__(self, core, tun_fd: Optional[int], on_reload: Optional[Callable[[], None]] = None):
        self.core = core
        self.on_reload = on_reload  # SIGHUP
        self.metrics = None  # a MetricsServer, started and closed with the loop
        self.tun_fd = tun_fd
        self.control = None  # the control socket's server (tunnel/app/control.py), set by the app like metrics
        self.loop = EventLoop()
        self.counters = {"send_errors": 0, "tun_write_errors": 0, "recv_errors": 0, "warm_passes": 0}
        self._tick_handle: Optional[TimerHandle] = None
        self._tick_at = float("inf")  # when the core's timer is armed for
        self.keep_warm = False  # set from the configuration (default on); see tunnel/core/warm.py
        self._warmer = Warmer()
        self._warm_handle: Optional[TimerHandle] = None
        self._last_io = 0.0
        self._tun_written = 0  # packets written to the TUN (a drain that wrote some carried data)
        self.after_start: Optional[Callable[[], None]] = None  # once everything is set up (privilege drop)
        self._sock_of: dict = {}  # server: sender address -> the socket it was heard on (other than the first)

    # -- TUN ----------------------------------------------------------
    def _on_tun_readable(self) -> None:
        fd, core, read = self.tun_fd, self.core, os.read
        now = self.loop.time()
        n = 0
        while True:
            try:
                pkt = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.counters["recv_errors"] += 1
                break
            core.send_packet(pkt, now)
            n += 1
            if n == 1:
                self.send_out()  # latency: the first packet leaves before we look for more
            elif n % BATCH == 0:
                self.flush()
        self.flush()
        self._last_io = now
        if n and self.keep_warm:
            self._arrived(fd, now)

    def write_tun(self) -> None:
        pkts = self.core.to_tun
        if not pkts:
            return
        self.core.to_tun = []
        fd, write = self.tun_fd, os.write
        for pkt in pkts:
            try:
                write(fd, pkt)
            except OSError:
                self.counters["tun_write_errors"] += 1
        self._tun_written += len(pkts)

    def _arrived(self, source, now: float) -> None:
        """A drain from ``source`` carried data: plan passes just before its next packet is due."""
        if self._warmer.arrival(source, now):
            self._arm_warm(now)

    def _arm_warm(self, now: float) -> None:
        when = self._warmer.next_pass()
        if when is not None:
            self._warm_handle = self.loop.call_precise(when - now, self._warm)

    def _warm(self) -> None:
        """One keep_warm pass: the fds drained (a packet that came early is handled now;
        otherwise the read code ran on EAGAIN) and the core's dummy pass."""
        self._warm_handle = None
        now = self.loop.time()
        self._warmer.take(now)
        if now - self._last_io >= SKIP:  # else real packets ran the code just now
            self._drain_all()
            self.core.warm()
            self.counters["warm_passes"] += 1
        if self._warm_handle is None:  # a packet drained above may have planned a new train
            self._arm_warm(now)

    def _drain_all(self) -> None:
        raise NotImplementedError

    def _drain_socket(self, sock: BatchSocket, key: Optional[Hashable], source: Hashable, record: bool = False) -> None:
        """Drain one UDP socket into the core.  ``key``: the path's key (a client's socket is
        connected to one server), or None: the sender's address is the key (the server's);
        ``source``: what keep_warm knows the socket as; ``record``: remember which socket a
        sender was heard on (the server's replies leave by the same one)."""
        receive, recv = self.core.receive_datagram, sock.recv_batch
        sock_of = self._sock_of
        now = self.loop.time()
        written = self._tun_written
        n = 0
        while True:
            try:
                dgrams, addr, tos = recv()
            except BlockingIOError:
                break
            except OSError:  # counted (e.g. an ICMP port unreachable on a client's connected socket);
                self.counters["recv_errors"] += 1  # stop this drain: an error that repeats must not spin the loop
                break
            if record and addr not in sock_of:
                sock_of[addr] = sock
            k = addr if key is None else key
            for data in dgrams:
                receive(k, data, now, tos)
            if n == 0 and self.tun_fd is not None:
                self.write_tun()  # latency: the first packet is delivered before we look for more
            n += len(dgrams)
            if n >= BATCH:
                self.flush()
                n = 1
        self.flush()
        self._last_io = now
        if self._tun_written != written and self.keep_warm:
            self._arrived(source, now)

    # -- timers, events, signals --------------------------------------
    def _tick(self) -> None:
        """Run the core's timers; they say when to run again (the loop timer is re-armed)."""
        now = self.loop.time()
        when = self.core.handle_timer(now)
        if when <= now:  # still due right after it ran: retry on the old tick, do not spin
            when = now + TICK
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._tick_at = when
        self._tick_handle = self.loop.call_later(max(0.0, when - now), self._tick)
        self.flush()

    def _check_timer(self) -> None:
        """After input that may need the core's timers sooner (``timer_dirty``): run them as
        soon as this wakeup's fds are drained (they act only on what is due, and say when
        they are due next)."""
        core = self.core
        if core.timer_dirty and self._tick_handle is not None:
            core.timer_dirty = False
            if self._tick_at > self.loop.time():
                self._tick_handle.cancel()
                self._tick_at = self.loop.time()
                self._tick_handle = self.loop.call_later(0.0, self._tick)

    def handle_events(self) -> None:
        while (ev := self.core.next_event()) is not None:
            self.on_event(ev)

    def on_event(self, ev) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Send what the core produced, write to the TUN, handle events."""
        raise NotImplementedError

    def send_out(self) -> None:
        """Send the datagrams the core produced (and nothing else)."""
        raise NotImplementedError

    def stop(self) -> None:
        self.loop.stop()

    def _send_error(self, exc: OSError) -> None:
        if exc.errno not in _TRANSIENT:
            log.debug("send failed: %s", exc)
        self.counters["send_errors"] += 1

    def run(self) -> None:
        """Run until SIGINT/SIGTERM, then tell the peer and release everything."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.stop)
        if self.on_reload is not None:
            self.loop.add_signal_handler(signal.SIGHUP, self.on_reload)
        self.open()
        try:
            if self.after_start is not None:
                self.after_start()
            self.loop.run_forever()
        finally:
            self.close()
            self.loop.close()

    def open(self) -> None:
        """Register the fds, the control socket and the metrics server; run the timers once
        (they arm themselves).  :meth:`run` calls it; tests drive the loop themselves."""
        self.start()
        if self.control is not None:
            self.control.start(self.loop)
        if self.metrics is not None:
            self.metrics.start(self.loop)
        self._tick()

    def close(self) -> None:
        """Tell the peer (CLOSE), send it, and release every fd (the loop itself stays)."""
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._warm_handle is not None:
            self._warm_handle.cancel()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.core.close(self.loop.time())
        self.flush()
        self.shutdown()

    def status(self) -> dict:
        return {**self.core.stats(), "io": dict(self.counters), "loop": self.loop.stall_stats()}

    def start(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class ServerShell(Shell):
    def __init__(
        self, core, tun_fd: int, sockets: list[socket.socket], on_event: Callable, on_reload=None
    ):
        super().__init__(core, tun_fd, on_reload)
        self.sockets = [BatchSocket(s) for s in sockets]
        self._on_event = on_event

    def start(self) -> None:
        for s in self.sockets:
            s.sock.setblocking(False)
            self.loop.add_reader(s.fileno(), self._on_sock_readable, s)
        self.loop.add_reader(self.tun_fd, self._on_tun_readable)

    def _drain_all(self) -> None:
        self._on_tun_readable()
        for sock in self.sockets:
            self._on_sock_readable(sock)

    def _on_sock_readable(self, sock: BatchSocket) -> None:
        # replies go out on sockets[0] unless the sender was heard on another socket
        self._drain_socket(sock, None, sock, sock is not self.sockets[0])

    def send_out(self) -> None:
        out = self.core.datagrams_to_send()
        if not out:
            return
        default, sock_of = self.sockets[0], self._sock_of
        if len(out) == 1:  # latency: one datagram, the shortest way out
            addr, dgram, tos = out[0]
            sock_of.get(addr, default).send_one(dgram, addr, self._send_error, tos)
            return
        for addr, tos, dgrams in _runs(out):
            sock_of.get(addr, default).send_batch(dgrams, addr, self._send_error, tos)

    def flush(self) -> None:
        self.send_out()
        self.write_tun()
        self.handle_events()
        self._check_timer()
        if len(self._sock_of) > 4 * len(self.core.paths) + 64:
            self._sock_of = {a: s for a, s in self._sock_of.items() if a in self.core.paths}

    def on_event(self, ev) -> None:
        self._on_event(ev)

    def shutdown(self) -> None:
        for s in self.sockets:
            self.loop.remove_reader(s.fileno())
            s.close()
        self.loop.remove_reader(self.tun_fd)


class ClientShell(Shell):
    """One connected UDP socket per path, bound to its interface; a fresh one (new
    source port) for each session, so a stale session the server still holds
    never swallows the new handshake.  Paths follow the interfaces: a netlink
    watcher triggers a rescan (``discover``) whenever links or addresses change.
    """

    RESCAN_DELAY = 0.05  # debounce a burst of netlink notifications

    def __init__(
        self,
        core,
        tun_factory: Callable[[], int],
        make_socket: Callable[[Hashable], socket.socket],
        discover: Callable[[], dict],
        on_event: Callable,
        watcher=None,
        on_reload=None,
    ):
        super().__init__(core, None, on_reload)
        self._tun_factory = tun_factory
        self._make_socket = make_socket
        self._discover = discover
        self._on_event = on_event
        self._watcher = watcher
        self._rescan_handle: Optional[TimerHandle] = None
        self.socks: dict[Hashable, BatchSocket] = {}

    def start(self) -> None:
        if self._watcher is not None:
            self.loop.add_reader(self._watcher.fileno(), self._on_netlink)
        self.rescan()

    # -- paths follow the interfaces ---------------------------------
    def _on_netlink(self) -> None:
        self._watcher.drain()
        if self._rescan_handle is None:
            self._rescan_handle = self.loop.call_later(self.RESCAN_DELAY, self.rescan)

    def rescan(self) -> None:
        self._rescan_handle = None
        try:
            wanted = self._discover()
        except Exception as exc:  # netlink trouble must not kill the tunnel
            log.warning("interface scan failed: %s", exc)
            return
        now = self.loop.time()
        core = self.core
        for key in [k for k in core.slots if k not in wanted]:
            core.remove_path(key, now)
            self.flush()  # the CLOSE goes out on the old socket
            self._close_socket(key)
            self._close_socket(events.SpareKey(key))
        for key, (server, name, priority, mtu) in wanted.items():
            if key not in core.slots:
                core.add_path(key, server, now, name=name, priority=priority, mtu=mtu)
        link_changed = getattr(core, "link_changed", None)
        if link_changed is not None:  # silent paths try again now, not after their back-off
            link_changed(now)
        self.flush()

    def _open_socket(self, key: Hashable) -> None:
        self._close_socket(key)
        try:
            sock = BatchSocket(self._make_socket(key.base if isinstance(key, events.SpareKey) else key))
        except OSError as exc:
            log.warning("path %s: cannot open a socket: %s", key, exc)
            return
        sock.sock.setblocking(False)
        self.socks[key] = sock
        self.loop.add_reader(sock.fileno(), self._on_sock_readable, key, sock)

    def _close_socket(self, key: Hashable) -> None:
        self._warmer.forget(key)
        sock = self.socks.pop(key, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def ensure_tun(self) -> None:
        if self.tun_fd is None:
            self.tun_fd = self._tun_factory()
            self.loop.add_reader(self.tun_fd, self._on_tun_readable)

    # -- I/O ----------------------------------------------------------
    def _drain_all(self) -> None:
        if self.tun_fd is not None:
            self._on_tun_readable()
        for key, sock in list(self.socks.items()):
            if self.socks.get(key) is sock:  # a packet drained before may have closed it
                self._on_sock_readable(key, sock)

    def _on_sock_readable(self, key: Hashable, sock: BatchSocket) -> None:
        self._drain_socket(sock, key, key)

    def flush(self) -> None:
        self.handle_events()  # first: a Connecting event opens the socket, TunnelUp makes the TUN
        self.send_out()
        if self.tun_fd is not None:
            self.write_tun()
        self._check_timer()

    def send_out(self) -> None:
        out = self.core.datagrams_to_send()
        if not out:
            return
        socks = self.socks
        if len(out) == 1:  # latency: one datagram, the shortest way out
            key, dgram, tos = out[0]
            sock = socks.get(key)
            if sock is None:
                self.counters["send_errors"] += 1
            else:
                sock.send_one(dgram, None, self._send_error, tos)
            return
        for key, tos, dgrams in _runs(out):
            sock = socks.get(key)
            if sock is None:
                self.counters["send_errors"] += len(dgrams)
            else:
                sock.send_batch(dgrams, None, self._send_error, tos)

    def on_event(self, ev) -> None:
        if isinstance(ev, events.Connecting):
            self._open_socket(ev.key)
        elif isinstance(ev, events.Rebound):  # the spare session's socket becomes the path's
            self._close_socket(ev.key)
            sock = self.socks.pop(events.SpareKey(ev.key), None)
            if sock is not None:
                self.loop.remove_reader(sock.fileno())
                self.socks[ev.key] = sock
                self.loop.add_reader(sock.fileno(), self._on_sock_readable, ev.key, sock)
        self._on_event(ev)

    def shutdown(self) -> None:
        for key in list(self.socks):
            self._close_socket(key)
        if self._watcher is not None:
            self.loop.remove_reader(self._watcher.fileno())
            self._watcher.close()
        if self.tun_fd is not None:
            self.loop.remove_reader(self.tun_fd)


def _runs(out: list[tuple[Hashable, bytes, int]]):
    """Consecutive runs of datagrams with the same destination and TOS (order kept)."""
    run: list[bytes] = []
    last = last_tos = None
    for key, dgram, tos in out:
        if (key != last or tos != last_tos) and run:
            yield last, last_tos, run
            run = []
        last, last_tos = key, tos
        run.append(dgram)
    if run:
        yield last, last_tos, run
