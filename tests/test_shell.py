"""Unit tests of the I/O shell (tunnel/io/shell.py): a ServerShell and a ClientShell with
real cores, on one EventLoop, over the doubles of tests/fakes.py (a TUN and UDP
sockets on a wire).  No namespaces, no root: the shell's own logic (drains, flush
order, error counting, timer re-arming) is what is tested.

The cores are wrapped in a :class:`Recorder`, which the shell takes for the core:
it logs the time the shell passed with each input, so "handled in one wakeup"
(the shell reads the clock once per drain) and "the timer ran" are observable
without looking inside the shell or the core.  The loop runs until a condition
holds, with a deadline; a callback error inside the loop fails the test.
"""

from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from tests.corelab import DGRAM_MTU, SERVER_ADDR, Net, ipv4
from tests.fakes import FakeTun, FakeUdpSocket, Wire
from tunnel.core import events
from tunnel.io.loop import EventLoop
from tunnel.io.shell import ClientShell, ServerShell


def up(i: int) -> bytes:
    """Client -> server inner packets, all of one size (so that one GSO run can carry many)."""
    return ipv4("100.64.0.2", "100.64.0.1", b"up%04d" % i)


def down(i: int) -> bytes:
    return ipv4("100.64.0.1", "100.64.0.2", b"down%04d" % i)


class Recorder:
    """A core as the shell sees it; logs (input, the ``now`` the shell passed) for each input."""

    NOW_ARG = {"receive_datagram": 2, "send_packet": 1, "handle_timer": 0}

    def __init__(self, core):
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "calls", [])

    def __getattr__(self, name):
        attr = getattr(self.core, name)
        i = self.NOW_ARG.get(name)
        if i is None:
            return attr

        def logged(*args, **kw):
            self.calls.append((name, args[i] if len(args) > i else kw["now"]))
            return attr(*args, **kw)

        return logged

    def __setattr__(self, name, value) -> None:  # the shell sets to_tun and timer_dirty on the core
        setattr(self.core, name, value)

    def times(self, name: str, since: int = 0) -> list[float]:
        return [t for n, t in self.calls[since:] if n == name]


def run_until(loop: EventLoop, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run the loop until ``cond()`` (checked every millisecond); fail after ``timeout`` seconds."""
    deadline = loop.time() + timeout
    timed_out = []

    def check() -> None:
        if cond():
            loop.stop()
        elif loop.time() >= deadline:
            timed_out.append(True)
            loop.stop()
        else:
            loop.call_later(0.001, check)

    loop.call_later(0.0, check)
    loop.run_forever()
    assert not timed_out, "condition not reached in time"


def run_for(loop: EventLoop, seconds: float) -> None:
    end = loop.time() + seconds
    run_until(loop, lambda: loop.time() >= end, seconds + 1.0)


class Pair:
    """A server and a client shell on one loop, one wire, two TUN doubles; not yet opened."""

    def __init__(self, pki: Path):
        net = Net(pki)  # only to build the cores as the in-memory lab does
        self.score, self.ccore = Recorder(net.server), Recorder(net.client().core)
        self.wire = Wire()
        self.server_tun, self.client_tun = FakeTun(), FakeTun()
        self.server_sock = self.wire.socket(bind=SERVER_ADDR)
        self.sevents: list = []
        self.cevents: list = []
        self.server = ServerShell(self.score, self.server_tun.fd, [self.server_sock], self.sevents.append)
        self.client = ClientShell(
            self.ccore,
            lambda: self.client_tun.fd,
            lambda key: self.wire.socket(connect=SERVER_ADDR),
            lambda: {"a": (SERVER_ADDR, "a", 0, DGRAM_MTU)},
            self._client_event,
        )
        self.client.loop.close()
        self.loop = self.client.loop = self.server.loop
        self.opened: list = []
        self.up_got: list[bytes] = []
        self.down_got: list[bytes] = []

    def _client_event(self, ev) -> None:
        self.cevents.append(ev)
        if isinstance(ev, events.TunnelUp):  # as tunnel/app/client.py does
            self.client.ensure_tun()

    def open(self, shell) -> None:
        """What Shell.run() does before its loop runs, less the signal handlers."""
        shell.open()
        self.opened.append(shell)

    def close(self) -> None:
        """What Shell.run() does after its loop stopped."""
        for shell in self.opened:
            shell.close()
        self.loop.close()
        self.server_tun.close()
        self.client_tun.close()

    def client_sock(self) -> FakeUdpSocket:
        (sock,) = [s for s in self.wire.opened if s is not self.server_sock and not s.closed]
        return sock

    def joined(self) -> bool:
        return any(isinstance(e, events.PathJoined) for e in self.cevents)

    def bring_up(self) -> "Pair":
        self.open(self.server)
        self.open(self.client)
        run_until(self.loop, self.joined)
        return self

    def at_server(self, n: int) -> list[bytes]:
        """Run until the server's TUN got ``n`` packets (in all); return them."""
        run_until(self.loop, lambda: self.up_got.extend(self.server_tun.written()) or len(self.up_got) >= n)
        return self.up_got

    def at_client(self, n: int) -> list[bytes]:
        run_until(self.loop, lambda: self.down_got.extend(self.client_tun.written()) or len(self.down_got) >= n)
        return self.down_got


@pytest.fixture
def pair(pki: Path):
    p = Pair(pki)
    yield p
    errors = p.loop.callback_errors
    p.close()
    assert errors == 0, "a shell callback raised inside the loop (see the log)"


def test_a_packet_written_to_one_tun_comes_out_of_the_other(pair: Pair) -> None:
    pair.bring_up()
    pair.client_tun.inject(up(1))
    assert pair.at_server(1) == [up(1)]
    pair.server_tun.inject(down(1))
    assert pair.at_client(1) == [down(1)]
    assert pair.client.counters == pair.server.counters == {
        "send_errors": 0, "tun_write_errors": 0, "recv_errors": 0, "warm_passes": 0,
    }


def test_a_connecting_event_opens_the_socket_before_the_first_datagram_goes_out(pair: Pair) -> None:
    pair.open(pair.server)
    pair.open(pair.client)  # adds the path: Connecting, then the ClientHello, in one flush
    sock = pair.client_sock()
    assert [call.dst for call in pair.wire.sent_by(sock)] == [SERVER_ADDR]  # the ClientHello is out
    assert pair.client.counters["send_errors"] == 0
    run_until(pair.loop, pair.joined, timeout=0.5)  # no retransmission needed (DTLS waits 1 s)


def test_each_wakeup_drains_the_tun_and_the_socket(pair: Pair) -> None:
    pair.bring_up()
    c_mark, s_mark, w_mark = len(pair.ccore.calls), len(pair.score.calls), len(pair.wire.sent)
    pkts = [up(i) for i in range(40)]
    pair.client_tun.inject(*pkts)  # all queued before the loop looks
    assert pair.at_server(40) == pkts
    # the client read all 40 in one wakeup: one clock reading, the first packet sent at once,
    # the other 39 in one batch (one GSO send)
    assert len(set(pair.ccore.times("send_packet", c_mark))) == 1
    assert sorted(len(call.datagrams) for call in pair.wire.sent[w_mark:])[-1] == 39
    # the server took the 40 datagrams in one wakeup too
    assert max(Counter(pair.score.times("receive_datagram", s_mark)).values()) >= 40


def test_a_full_tun_counts_write_errors_and_the_tunnel_goes_on(pair: Pair) -> None:
    pair.bring_up()
    assert pair.server_tun.fill() > 0
    pair.client_tun.inject(*(up(i) for i in range(5)))
    run_until(pair.loop, lambda: pair.server.counters["tun_write_errors"] == 5)
    assert pair.server_tun.written() == []  # the 5 were lost, not queued
    pair.client_tun.inject(up(5))
    assert pair.at_server(1) == [up(5)]


def test_a_full_socket_counts_send_errors_and_the_tunnel_goes_on(pair: Pair) -> None:
    pair.bring_up()
    sock = pair.client_sock()
    sock.send_errno = errno.EAGAIN
    pair.client_tun.inject(*(up(i) for i in range(3)))
    run_until(pair.loop, lambda: pair.client.counters["send_errors"] >= 3)
    sock.send_errno = None
    pair.client_tun.inject(up(3))
    assert pair.at_server(1) == [up(3)]


def test_a_receive_error_is_counted_and_the_socket_still_read(pair: Pair) -> None:
    pair.bring_up()
    pair.client_sock().fail_next_recv(errno.ECONNREFUSED)  # an ICMP port unreachable
    run_until(pair.loop, lambda: pair.client.counters["recv_errors"] == 1)
    pair.server_tun.inject(down(1))
    assert pair.at_client(1) == [down(1)]


def test_input_that_needs_the_timer_sooner_rearms_it(pair: Pair) -> None:
    pair.open(pair.server)  # the timers run once at the start
    run_for(pair.loop, 0.2)
    assert len(pair.score.times("handle_timer")) == 1  # then an idle server sleeps (MAX_SLEEP, 1 s)
    pair.open(pair.client)
    run_until(pair.loop, lambda: len(pair.score.times("handle_timer")) > 1, timeout=2.0)
    first_input = pair.score.times("receive_datagram")[0]
    # the new path's first probe is due at once: the server's timer was re-armed for it,
    # not left for the end of the idle sleep (0.8 s after the client came)
    assert pair.score.times("handle_timer")[1] - first_input < 0.4
